"""LAION aesthetic predictor v2 (Schuhmann, "improved-aesthetic-predictor"; REWARDS_AND_EVAL.md §2.4).

score = MLP(normalise(e_img)) with e_img the 768-d projected CLIP ViT-L/14 image embedding, L2-normalised, and the
head ``sac+logos+ava1-l14-linearMSE.pth``: Linear 768→1024, Dropout, Linear →128, Dropout, Linear →64, Dropout,
Linear →16, Linear →1 (no activations; dropout is inactive in eval). State-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``
(an optional ``mlp.``/``model.``/``module.`` prefix is stripped); any other layout fails loudly.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from flowalign.errors import UserError
from flowalign.rewards.base import Checkpoint, Reward, check_inputs, freeze, nan_unless_finite
from flowalign.rewards.clip_common import ClipImageReward, HFClip

logger = logging.getLogger("flowalign.rewards")

CLIP_L14 = "openai/clip-vit-large-patch14"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
_LINEARS = (0, 2, 4, 6, 7)  # Sequential indices of the five Linear layers (Dropouts at 1, 3, 5)


def mlp_head(state: dict, what: str) -> nn.Sequential:
    """The 5-linear MLP head (aesthetic v2 and ImageReward share the layout) built from and loaded with ``state``.

    Layer sizes come from the weights; the key set must be exactly ``layers.{0,2,4,6,7}.{weight,bias}``.
    """
    state = {k: v for k, v in state.items()}
    for prefix in ("module.", "model.", "mlp."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if state and not any(k.startswith("layers.") for k in state):
        state = {f"layers.{k}": v for k, v in state.items()}
    want = {f"layers.{i}.{p}" for i in _LINEARS for p in ("weight", "bias")}
    if set(state) != want:
        raise UserError(
            f"{what}: unexpected head keys (missing {sorted(want - set(state))[:4]}, unexpected "
            f"{sorted(set(state) - want)[:4]}); expected the 5-linear MLP layout layers.{{0,2,4,6,7}}.weight/bias"
        )
    dims = [state["layers.0.weight"].shape[1]] + [state[f"layers.{i}.weight"].shape[0] for i in _LINEARS]
    head = nn.Sequential(
        nn.Linear(dims[0], dims[1]), nn.Dropout(0.2),
        nn.Linear(dims[1], dims[2]), nn.Dropout(0.2),
        nn.Linear(dims[2], dims[3]), nn.Dropout(0.1),
        nn.Linear(dims[3], dims[4]),
        nn.Linear(dims[4], dims[5]),
    )
    try:
        _Wrap(head).load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        raise UserError(f"{what}: head weights do not fit the MLP layout ({str(err).splitlines()[-1].strip()})") from err
    return freeze(head)


class _Wrap(nn.Module):
    def __init__(self, layers: nn.Sequential):
        super().__init__()
        self.layers = layers


class Aesthetic(ClipImageReward, Reward):
    """LAION aesthetic v2: CLIP ViT-L/14 embedding → MLP head (raw output, higher is better).

    Args:
        path: CLIP directory or hub id (default ``openai/clip-vit-large-patch14``).
        head: the head file ``sac+logos+ava1-l14-linearMSE.pth`` (a local path; required; see ``HEAD_URL``).
        processor_path: image-processor directory or hub id (default: ``path``).
        device, dtype, batch_size, parity: as for ``PickScore``. The head always runs in fp32.
    """

    name = "aesthetic"
    differentiable = True
    kind = "image"
    measures = "LAION aesthetic predictor v2: MLP on the normalised CLIP ViT-L/14 image embedding (prompt ignored)"
    typical_range = "~1–10; SD-class images ~5–6.5"
    checkpoints = (
        Checkpoint("path", CLIP_L14, f"hf download {CLIP_L14} --local-dir DIR; path=DIR"),
        Checkpoint("head", None, f"{HEAD_FILE}: download {HEAD_URL} (3.7 MB, MIT; also in the DAS and flow_grpo repos); head=FILE"),
    )

    def __init__(self, path: str = CLIP_L14, head: Optional[str] = None, processor_path: Optional[str] = None,
                 device="cpu", dtype=torch.float32, batch_size: int = 32, parity: bool = False):
        if head is None:
            raise UserError(f"aesthetic: pass head=PATH to {HEAD_FILE} (download it from {HEAD_URL})")
        head_path = os.path.expanduser(str(head))
        if os.path.isdir(head_path):
            head_path = os.path.join(head_path, HEAD_FILE)
        if not os.path.isfile(head_path):
            raise UserError(f"aesthetic: head file {head!r} does not exist (download {HEAD_URL})")
        self.clip = HFClip(path, processor_path, "aesthetic", device=device, dtype=dtype, vision_only=True)
        state = torch.load(head_path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        self.head = mlp_head(state, "aesthetic").to(self.clip.device)
        self.batch_size = int(batch_size)
        self.parity = bool(parity)
        self.differentiable = not self.parity

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> Tensor:
        check_inputs(images, prompts, self.kind)
        s = self.head(self.embed_images(images)).squeeze(-1).float().to(images.device)  # [B]
        return nan_unless_finite(s, images)  # [B]
