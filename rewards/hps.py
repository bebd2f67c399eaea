"""Human Preference Score v2 / v2.1 (Wu et al. 2023, "HPSv2"; REWARDS_AND_EVAL.md §2.2).

Architecture: open_clip ``ViT-H-14`` built with ``pretrained=None`` (naming the laion2B tag would download 3.9 GB of base
weights that the HPS checkpoint overwrites), then the HPS ``state_dict`` loaded from a local file with
``torch.load(weights_only=True)``. Score = cos(e_img, e_txt), both L2-normalised, no logit scale (the benchmark
reports 100·cos). v2.0 and v2.1 scores are not comparable: the class records ``version``.

Do not use the ``hpsv2`` PyPI package (its wheel lacks the BPE vocabulary and it downloads at call time).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import Tensor

from flowalign.errors import UserError
from flowalign.rewards.base import Checkpoint, Reward, check_inputs, freeze, hub_file, torch_dtype
from flowalign.rewards.clip_common import CLIP_MEAN, CLIP_STD, batched, clip_preprocess, l2n, to_pil, unique_index

logger = logging.getLogger("flowalign.rewards")

HPS_REPO = "xswu/HPSv2"


def load_hps_state(path: str) -> dict:
    """The open_clip state dict inside an HPS checkpoint: ``{"state_dict": …}`` or a bare dict; ``module.`` stripped."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise UserError(f"hps: {path!r} holds no state_dict (expected an HPS_v2*_compressed.pt checkpoint)")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


class HPSv2(Reward):
    """HPS v2.0 (``HPS_v2_compressed.pt``); ``HPSv21`` is v2.1.

    Args:
        checkpoint: the HPS ``.pt`` file, a directory holding it, or a hub repo id (default ``xswu/HPSv2``; hub only
            with network or a warm cache). ``path`` is an alias (so ``build_reward("hps", path=...)`` works).
        arch: open_clip architecture name (``ViT-H-14``; tests register a tiny one with ``open_clip.add_model_config``).
        device, dtype, batch_size: as for ``PickScore``.
        parity: score through uint8 → PIL → open_clip's validation transform (not differentiable).
    """

    name = "hps"
    version = "v2.0"
    filename = "HPS_v2_compressed.pt"
    differentiable = True
    kind = "image"
    measures = "human preference (HPDv2): cos(image, prompt) of the HPS-tuned open_clip ViT-H/14"
    typical_range = "cos ~0.2–0.35 (benchmark reports ×100)"

    def __init__(self, checkpoint: Optional[str] = None, arch: str = "ViT-H-14", device="cpu", dtype=torch.float32,
                 batch_size: int = 32, parity: bool = False, path: Optional[str] = None):
        import open_clip

        if checkpoint is not None and path is not None and checkpoint != path:
            raise UserError("hps: pass the checkpoint once (checkpoint= or path=, not both)")
        source = checkpoint if checkpoint is not None else path
        file = hub_file(source, HPS_REPO, self.filename, f"hps {self.version}", "checkpoint")
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        try:
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)  # open_clip warns "initialized randomly": the HPS weights are loaded next
            try:
                model = open_clip.create_model(arch, pretrained=None, device="cpu")
            finally:
                root.setLevel(level)
        except RuntimeError as err:
            raise UserError(f"hps: unknown open_clip architecture {arch!r} ({err})") from err
        missing, unexpected = model.load_state_dict(load_hps_state(file), strict=False)
        n = len(model.state_dict())
        if len(missing) > n // 2:
            raise UserError(f"hps: {file!r} does not fit open_clip {arch!r} ({len(missing)}/{n} weights missing)")
        if missing or unexpected:
            logger.warning("hps: loading %s into %s: missing %s, unexpected %s", file, arch, missing[:8], unexpected[:8])
        self.model = freeze(model).to(self.device, self.dtype)
        self.tokenizer = open_clip.get_tokenizer(arch)
        cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(cfg.get("mean", CLIP_MEAN))
        self.std = tuple(cfg.get("std", CLIP_STD))
        if cfg.get("resize_mode", "shortest") != "shortest" or cfg.get("interpolation", "bicubic") != "bicubic":
            logger.warning("hps: %s preprocess %s differs from the tensor path (shortest side, bicubic)", arch, cfg)
        self._cfg = cfg
        self._pil_transform = None
        self.arch, self.checkpoint = arch, file
        self.batch_size = int(batch_size)
        self.parity = bool(parity)
        self.differentiable = not self.parity

    def _pixels(self, images: Tensor) -> Tensor:
        if not self.parity:
            return clip_preprocess(images.to(self.device), self.size, self.size, self.mean, self.std).to(self.dtype)
        if self._pil_transform is None:
            import open_clip

            self._pil_transform = open_clip.image_transform(
                self.size, is_train=False, mean=self.mean, std=self.std,
                resize_mode=self._cfg.get("resize_mode"), interpolation=self._cfg.get("interpolation"))
        return torch.stack([self._pil_transform(im) for im in to_pil(images)]).to(self.device, self.dtype)

    def embed_images(self, images: Tensor) -> Tensor:
        """[N,3,H,W] in [0,1] → L2-normalised fp32 image embeddings [N,D]."""
        return torch.cat([l2n(self.model.encode_image(self._pixels(images[s])).float())
                          for s in batched(images.shape[0], self.batch_size)])

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> Tensor:
        check_inputs(images, prompts, self.kind)
        uniq, index = unique_index(prompts)
        tokens = self.tokenizer(uniq).to(self.device)  # [U, 77]
        txt = l2n(self.model.encode_text(tokens).float())[index.to(self.device)]  # [B, D]
        img = self.embed_images(images)  # [B, D]
        return (img * txt).sum(-1).float().to(images.device)  # [B]


class HPSv21(HPSv2):
    """HPS v2.1 (``HPS_v2.1_compressed.pt``); same architecture and score as v2.0, different weights."""

    name = "hpsv21"
    version = "v2.1"
    filename = "HPS_v2.1_compressed.pt"
    measures = "human preference (HPDv2), v2.1 weights: cos(image, prompt) of the HPS-tuned open_clip ViT-H/14"


HPSv2.checkpoints = (Checkpoint("checkpoint", f"{HPS_REPO}/{HPSv2.filename}",
                                f"hf download {HPS_REPO} {HPSv2.filename} --local-dir DIR; checkpoint=DIR/{HPSv2.filename}"),)
HPSv21.checkpoints = (Checkpoint("checkpoint", f"{HPS_REPO}/{HPSv21.filename}",
                                 f"hf download {HPS_REPO} {HPSv21.filename} --local-dir DIR; checkpoint=DIR/{HPSv21.filename}"),)
