"""PickScore (Kirstain et al. 2023, "Pick-a-Pic"; REWARDS_AND_EVAL.md §2.1).

score = exp(logit_scale) · ⟨normalise(f_txt), normalise(f_img)⟩ with the PickScore_v1 CLIP ViT-H/14 and the
laion CLIP-ViT-H-14 processor; exp(logit_scale) ≈ 100, so scores sit around 18–24 (flow_grpo divides by 26 via
``Scaled``). DAS uses the raw cosine (100× smaller): keep λ and β consistent with the scale.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from flowalign.rewards.base import Checkpoint, Reward, check_inputs, nan_unless_finite
from flowalign.rewards.clip_common import ClipPairReward, HFClip

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _has_processor(path: str) -> bool:
    names = ("preprocessor_config.json", "processor_config.json")  # transformers 4 / 5 layouts
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in names)


class PickScore(ClipPairReward, Reward):
    """PickScore v1.

    Args:
        path: model directory (a transformers ``CLIPModel``) or hub id; default ``yuvalkirstain/PickScore_v1``.
        processor_path: processor directory or hub id; default: ``path`` when it holds a processor, else
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
        device, dtype: where and in which precision the tower runs (fp32 for parity, bf16 fine for training).
        batch_size: images per forward pass.
        parity: score through uint8 → PIL → the library processor (not differentiable) instead of the tensor path.
    """

    name = "pickscore"
    differentiable = True
    kind = "image"
    measures = "human preference (Pick-a-Pic): exp(logit_scale)·cos(image, prompt) of the PickScore CLIP ViT-H/14"
    typical_range = "~18–24 (flow_grpo uses /26)"
    checkpoints = (
        Checkpoint("path", PICKSCORE_MODEL, f"hf download {PICKSCORE_MODEL} --local-dir DIR; path=DIR"),
        Checkpoint("processor_path", PICKSCORE_PROCESSOR,
                   f"hf download {PICKSCORE_PROCESSOR} --include '*.json' '*.txt' --local-dir DIR; processor_path=DIR"),
    )

    def __init__(self, path: str = PICKSCORE_MODEL, processor_path: Optional[str] = None, device="cpu",
                 dtype=torch.float32, batch_size: int = 32, parity: bool = False):
        if processor_path is None:
            processor_path = path if _has_processor(os.path.expanduser(str(path))) else PICKSCORE_PROCESSOR
        self.clip = HFClip(path, processor_path, "pickscore", device=device, dtype=dtype)
        self.batch_size = int(batch_size)
        self.parity = bool(parity)
        self.differentiable = not self.parity

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> Tensor:
        check_inputs(images, prompts, self.kind)
        scale = self.clip.logit_scale.exp()  # [] fp32, read before the tower's cast to dtype
        return nan_unless_finite((scale * self.cosine(images, prompts)).float().to(images.device), images)  # [B]
