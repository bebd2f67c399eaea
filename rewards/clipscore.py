"""CLIPScore (Radford et al. 2021 CLIP; Hessel et al. 2021 CLIPScore; REWARDS_AND_EVAL.md §2.5).

Forms (``form=``):
  * ``logit`` (default): exp(logit_scale)·cos = 100·cos for OpenAI CLIP, flow_grpo's CLIP reward before its /30;
  * ``cos``: the raw cosine (ImageReward-style baselines, FK, DAS);
  * ``clipscore``: w·max(cos, 0) with w = 2.5 (Hessel et al. eq. 1; torchmetrics uses w = 100).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from flowalign.errors import UserError
from flowalign.rewards.base import Checkpoint, Reward, check_inputs, nan_unless_finite
from flowalign.rewards.clip_common import ClipPairReward, HFClip

CLIP_L14 = "openai/clip-vit-large-patch14"


def _logit(cos: Tensor, scale: Tensor, w: float) -> Tensor:
    return scale * cos


def _cos(cos: Tensor, scale: Tensor, w: float) -> Tensor:
    return cos


def _hessel(cos: Tensor, scale: Tensor, w: float) -> Tensor:
    return w * cos.clamp_min(0.0)


FORMS = {"logit": _logit, "cos": _cos, "clipscore": _hessel}


class CLIPScore(ClipPairReward, Reward):
    """Prompt-image agreement of a transformers CLIP model.

    Args:
        path: ``CLIPModel`` directory or hub id (default ``openai/clip-vit-large-patch14``).
        processor_path: processor directory or hub id (default: ``path``).
        form: ``logit`` | ``cos`` | ``clipscore`` (see module docstring).  w: the Hessel weight for ``clipscore``.
        device, dtype, batch_size, parity: as for ``PickScore``.
    """

    name = "clipscore"
    differentiable = True
    kind = "image"
    measures = "prompt-image agreement: exp(logit_scale)·cos of CLIP ViT-L/14 (form=logit|cos|clipscore)"
    typical_range = "logit ~20–40 (cos ~0.2–0.4; flow_grpo uses logit/30)"
    checkpoints = (Checkpoint("path", CLIP_L14, f"hf download {CLIP_L14} --local-dir DIR; path=DIR"),)

    def __init__(self, path: str = CLIP_L14, processor_path: Optional[str] = None, form: str = "logit", w: float = 2.5,
                 device="cpu", dtype=torch.float32, batch_size: int = 32, parity: bool = False):
        if form not in FORMS:
            raise UserError(f"clipscore: unknown form {form!r} (use one of {', '.join(FORMS)})")
        self.form, self.w = form, float(w)
        self.clip = HFClip(path, processor_path, "clipscore", device=device, dtype=dtype)
        self.batch_size = int(batch_size)
        self.parity = bool(parity)
        self.differentiable = not self.parity

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> Tensor:
        check_inputs(images, prompts, self.kind)
        scale = self.clip.logit_scale.exp()  # [] fp32, read before the tower's cast to dtype
        s = FORMS[self.form](self.cosine(images, prompts), scale, self.w).float().to(images.device)  # [B]
        return nan_unless_finite(s, images)  # [B]
