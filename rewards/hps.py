"""Human Preference Score v2 / v2.1 (Wu et al. 2023, "HPSv2"; REWARDS_AND_EVAL.md §2.2).

Architecture: open_clip ``ViT-H-14``. The HPS ``state_dict`` (a local file, ``torch.load(weights_only=True)``) is
converted to a transformers ``CLIPModel`` by ``flowalign.rewards.open_clip_convert`` (the same network; checked against
open_clip's own features in the tests), so neither open_clip nor torchvision is needed and no 3.9 GB laion2B base is
downloaded. The tokenizer is open_clip's BPE, i.e. the CLIP tokenizer of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
(77 tokens, truncated with the end-of-text token kept). Score = cos(e_img, e_txt), both L2-normalised, no logit scale
(the benchmark reports 100·cos). v2.0 and v2.1 scores are not comparable: the class records ``version``.

Do not use the ``hpsv2`` PyPI package (its wheel lacks the BPE vocabulary and it downloads at call time).
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from flowalign.errors import UserError
from flowalign.rewards.base import (TOKENIZER_FILES, Checkpoint, Reward, check_inputs, freeze, hub_errors, hub_file,
                                    nan_unless_finite, resolve_source, setting, torch_dtype)
from flowalign.rewards.clip_common import CLIP_MEAN, CLIP_STD, batched, clip_preprocess, features, l2n, pil_pixels, \
    unique_index
from flowalign.rewards.open_clip_convert import build_hf_clip, load_arch

logger = logging.getLogger("flowalign.rewards")

HPS_REPO = "xswu/HPSv2"
HPS_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def load_hps_state(path: str) -> dict:
    """The open_clip state dict inside an HPS checkpoint: ``{"state_dict": …}`` or a bare dict; ``module.`` stripped."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — any unreadable file is the user's input error
        raise UserError(f"hps: cannot read {path!r} as a torch checkpoint ({type(err).__name__})") from err
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
        arch: open_clip architecture: ``ViT-H-14`` or the path of an open_clip model-config JSON (tests use a tiny one).
        tokenizer: CLIP tokenizer directory or hub id (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        device, dtype, batch_size: as for ``PickScore``.
        parity: score through uint8 → PIL → open_clip's validation transform (not differentiable).
    """

    name = "hps"
    version = "v2.0"
    filename = "HPS_v2_compressed.pt"
    differentiable = True
    kind = "image"
    measures = "human preference (HPDv2): cos(image, prompt) of the HPS-tuned ViT-H/14 (open_clip's checkpoint, run as a transformers CLIP: open_clip not needed)"
    typical_range = "cos ~0.2–0.35 (benchmark reports ×100)"

    def __init__(self, checkpoint: Optional[str] = None, arch: str = "ViT-H-14", tokenizer: str = HPS_TOKENIZER,
                 device="cpu", dtype=torch.float32, batch_size: int = 32, parity: bool = False,
                 path: Optional[str] = None):
        from transformers import AutoTokenizer

        if checkpoint is not None and path is not None and checkpoint != path:
            raise UserError("hps: pass the checkpoint once (checkpoint= or path=, not both)")
        source = checkpoint if checkpoint is not None else path
        self._refuse_other_version(source)
        # hints name the reward as asked for (hps or hpsv21): its settings are reward.kwargs.<name>.*
        file = hub_file(source, HPS_REPO, self.filename, self.name, "checkpoint", reward=self.name)
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        cfg = load_arch(arch)
        model = build_hf_clip(load_hps_state(file), cfg, what=f"hps {self.version}", label=str(arch))
        self.model = freeze(model).to(self.device, self.dtype)
        what = f"{self.name} tokenizer"
        tp = resolve_source(tokenizer, what, "tokenizer", reward=self.name)
        # AutoTokenizer: CLIPTokenizer builds an empty one offline
        with hub_errors(tp, what, "tokenizer", reward=self.name, include=TOKENIZER_FILES):
            self.tokenizer = AutoTokenizer.from_pretrained(tp)
        vocab = int(model.config.text_config.vocab_size)
        if len(self.tokenizer) != vocab:
            raise UserError(f"{self.name}: tokenizer {tp!r} has {len(self.tokenizer)} tokens, the text tower {vocab}: "
                            f"pass the CLIP tokenizer of the checkpoint (default {HPS_TOKENIZER}) with "
                            f"{setting('tokenizer', 'DIR', self.name)}")
        self.size = int(model.config.vision_config.image_size)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        pre = cfg.get("preprocess_cfg") or {}  # open_clip configs may set it; ViT-H-14 uses the OpenAI mean / std
        self.mean, self.std = tuple(pre.get("mean", CLIP_MEAN)), tuple(pre.get("std", CLIP_STD))
        if pre.get("resize_mode", "shortest") != "shortest" or pre.get("interpolation", "bicubic") != "bicubic":
            logger.warning("hps: %s preprocess_cfg %s differs from the shortest-side bicubic resize used here", arch, pre)
        self.arch, self.checkpoint = arch, file
        self.batch_size = int(batch_size)
        self.parity = bool(parity)
        self.differentiable = not self.parity

    def _refuse_other_version(self, source: Optional[str]) -> None:
        """One-line ``UserError`` when ``source`` is the other version's checkpoint (by its canonical file name, or a
        directory holding only that one): v2.0 and v2.1 scores differ, so ``version`` must name the weights scored."""
        if source is None:
            return
        s = os.path.expanduser(str(source))
        for other in (HPSv2, HPSv21):
            if other.filename == self.filename:
                continue
            named = os.path.basename(os.path.normpath(s)) == other.filename
            only = (os.path.isdir(s) and not os.path.isfile(os.path.join(s, self.filename))
                    and os.path.isfile(os.path.join(s, other.filename)))
            if named or only:
                held = "is" if named else "holds only"
                raise UserError(f"{self.name}: {str(source)!r} {held} the HPS {other.version} checkpoint "
                                f"({other.filename}) but reward {self.name!r} is HPS {self.version}: use reward "
                                f"{other.name!r} for it, or pass {self.filename}")

    def _pixels(self, images: Tensor) -> Tensor:
        if self.parity:
            return pil_pixels(images, self.size, self.mean, self.std).to(self.device, self.dtype)
        return clip_preprocess(images.to(self.device), self.size, self.size, self.mean, self.std).to(self.dtype)

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Prompts → token ids [N, 77]: <start> BPE… <end>, truncated to 77 with <end> kept (as open_clip)."""
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.context_length, truncation=True,
                             return_tensors="pt")
        return tok["input_ids"].to(self.device)  # [N, 77]

    def embed_text(self, prompts: Sequence[str]) -> Tensor:
        """Prompts → L2-normalised fp32 text embeddings [N, D] (causal tower pooled at <end>; no padding mask, as
        open_clip: positions after <end> cannot reach it)."""
        return l2n(features(self.model.get_text_features(input_ids=self.tokenize(prompts))).float())

    def embed_images(self, images: Tensor) -> Tensor:
        """[N,3,H,W] in [0,1] → L2-normalised fp32 image embeddings [N,D]."""
        return torch.cat([l2n(features(self.model.get_image_features(pixel_values=self._pixels(images[s]))).float())
                          for s in batched(images.shape[0], self.batch_size)])

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> Tensor:
        check_inputs(images, prompts, self.kind)
        uniq, index = unique_index(prompts)
        txt = self.embed_text(uniq)[index.to(self.device)]  # [B, D]
        img = self.embed_images(images)  # [B, D]
        return nan_unless_finite((img * txt).sum(-1).float().to(images.device), images)  # [B]


class HPSv21(HPSv2):
    """HPS v2.1 (``HPS_v2.1_compressed.pt``); same architecture and score as v2.0, different weights."""

    name = "hpsv21"
    version = "v2.1"
    filename = "HPS_v2.1_compressed.pt"
    measures = "human preference (HPDv2), v2.1 weights: cos(image, prompt) of the HPS-tuned ViT-H/14 (open_clip's checkpoint, run as a transformers CLIP: open_clip not needed)"


_TOKENIZER_CKPT = Checkpoint("tokenizer", HPS_TOKENIZER,
                             f"hf download {HPS_TOKENIZER} --include '*.json' '*.txt' --local-dir DIR; tokenizer=DIR")
HPSv2.checkpoints = (Checkpoint("checkpoint", f"{HPS_REPO}/{HPSv2.filename}",
                                f"hf download {HPS_REPO} {HPSv2.filename} --local-dir DIR; checkpoint=DIR/{HPSv2.filename}"),
                     _TOKENIZER_CKPT)
HPSv21.checkpoints = (Checkpoint("checkpoint", f"{HPS_REPO}/{HPSv21.filename}",
                                 f"hf download {HPS_REPO} {HPSv21.filename} --local-dir DIR; checkpoint=DIR/{HPSv21.filename}"),
                      _TOKENIZER_CKPT)
