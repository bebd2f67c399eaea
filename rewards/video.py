"""Per-frame video wrapper around an image reward (REWARDS_AND_EVAL.md §2.10).

``PerFrame(image_reward, stride, reduce)`` scores frames 0, stride, 2·stride, … of [B,F,3,H,W] videos in ONE batched
call of B·F′ images and reduces over frames (NaN frames are ignored; all-NaN gives NaN):

| reduce          | definition                                   | reference use                               |
|-----------------|----------------------------------------------|---------------------------------------------|
| ``first``       | frame 0 only (only frame 0 is scored)        | DanceGRPO Wan2.1: HPS-v2.1 on the first frame |
| ``mean_positive`` | mean over frames with reward > 0, else 0   | Flow-GRPO Wan OCR, stride 4                 |
| ``mean``, ``min`` | plain mean / minimum                       | flowalign defaults: ``mean``, stride 4      |

Optional temporal-consistency term [flowalign], added as ``temporal_weight · C`` over consecutive frames of the whole
video (stride 1, so flicker between adjacent frames is seen):
  * ``temporal="embedding"``: C = mean cosine between consecutive frames' image embeddings from the wrapped reward's
    ``embed_images`` (CLIP-family rewards: PickScore, CLIPScore, HPS, aesthetic); C ∈ [−1, 1], 1 = identical content;
  * ``temporal="pixel"``: C = 1 − mean |x_{f+1} − x_f| over pixels, ∈ [0, 1], 1 = a still video;
  * ``temporal="auto"`` (default): ``embedding`` when the reward has ``embed_images``, else ``pixel``.
It stops per-frame rewards from paying for flicker. Both terms are differentiable.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from flowalign.errors import UserError
from flowalign.rewards.base import Reward, check_inputs


def _nanmean(s: Tensor) -> Tensor:  # [B, F'] -> [B]
    return s.nanmean(dim=1)


def _nanmin(s: Tensor) -> Tensor:
    filled = torch.where(torch.isnan(s), torch.full_like(s, float("inf")), s)
    out = filled.min(dim=1).values  # [B]
    return torch.where(torch.isinf(out) & torch.isnan(s).all(dim=1), torch.full_like(out, float("nan")), out)


def _first(s: Tensor) -> Tensor:
    return s[:, 0]


def _mean_positive(s: Tensor) -> Tensor:
    pos = s > 0  # NaN compares False
    n = pos.sum(dim=1)  # [B]
    total = torch.where(pos, s, torch.zeros_like(s)).sum(dim=1)
    out = torch.where(n > 0, total / n.clamp_min(1), torch.zeros_like(total))
    return torch.where(torch.isnan(s).all(dim=1), torch.full_like(out, float("nan")), out)


REDUCTIONS = {"mean": _nanmean, "min": _nanmin, "first": _first, "mean_positive": _mean_positive}


def pixel_consistency(videos: Tensor) -> Tensor:
    """1 − mean |x_{f+1} − x_f| per video; [B,F,3,H,W] → [B]."""
    return 1.0 - (videos[:, 1:].float() - videos[:, :-1].float()).abs().mean(dim=(1, 2, 3, 4))


def embedding_consistency(embeddings: Tensor) -> Tensor:
    """Mean cosine of consecutive frame embeddings; [B,F,D] (any norm) → [B]."""
    e = embeddings / embeddings.norm(dim=-1, keepdim=True)
    return (e[:, 1:] * e[:, :-1]).sum(-1).mean(dim=1)


class PerFrame(Reward):
    """Video reward from an image reward, scored per frame in one batched call.

    Args:
        reward: an image ``RewardModel``.
        stride: score frames 0, stride, 2·stride, … (ignored for ``reduce="first"``).
        reduce: ``mean`` | ``min`` | ``first`` | ``mean_positive`` (see module docstring).
        temporal_weight: weight of the temporal-consistency term (0 = off).
        temporal: ``auto`` | ``embedding`` | ``pixel``.
    """

    kind = "video"

    def __init__(self, reward, stride: int = 4, reduce: str = "mean", temporal_weight: float = 0.0,
                 temporal: str = "auto"):
        if reduce not in REDUCTIONS:
            raise UserError(f"per-frame reward: unknown reduce {reduce!r} (use one of {', '.join(REDUCTIONS)})")
        if int(stride) < 1:
            raise UserError(f"per-frame reward: stride must be >= 1, got {stride}")
        if getattr(reward, "kind", "image") != "image":
            raise UserError(f"per-frame reward: {getattr(reward, 'name', reward)!r} is not an image reward")
        if temporal == "auto":
            temporal = "embedding" if hasattr(reward, "embed_images") else "pixel"
        if temporal not in ("embedding", "pixel"):
            raise UserError(f"per-frame reward: unknown temporal {temporal!r} (use auto, embedding or pixel)")
        if temporal == "embedding" and not hasattr(reward, "embed_images"):
            raise UserError(f"per-frame reward: {getattr(reward, 'name', reward)!r} has no embed_images; use temporal='pixel'")
        self.reward, self.stride, self.reduce = reward, int(stride), reduce
        self.temporal_weight, self.temporal = float(temporal_weight), temporal
        self.name = f"{getattr(reward, 'name', 'reward')}@frames"
        self.differentiable = bool(getattr(reward, "differentiable", False))
        self.measures = f"{getattr(reward, 'measures', '')} (per frame, {reduce})"
        self.checkpoints = getattr(reward, "checkpoints", ())
        self.typical_range = getattr(reward, "typical_range", "")

    def validate_prompts(self, prompts: Sequence[str]) -> None:
        """The wrapped reward's prompt check (the shapes verifier parses its prompts), so that the trainer and
        ``flowalign eval`` refuse a prompt set before sampling, as they do for the image reward itself."""
        check = getattr(self.reward, "validate_prompts", None)
        if check is not None:
            check(prompts)

    def frame_indices(self, num_frames: int) -> list[int]:
        return [0] if self.reduce == "first" else list(range(0, num_frames, self.stride))

    def frame_scores(self, videos: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> Tensor:
        """Per-frame scores [B, F′] (frames ``frame_indices(F)``), float32 on the caller's device."""
        check_inputs(videos, prompts, "video")
        b, f = videos.shape[:2]
        idx = self.frame_indices(f)
        frames = videos[:, idx].reshape(b * len(idx), *videos.shape[2:])  # [B·F', 3, H, W]
        reps = [p for p in prompts for _ in idx]
        meta = None if metadata is None else [m for m in metadata for _ in idx]
        return self.reward(frames, reps, meta).float().to(videos.device).view(b, len(idx))  # [B, F']

    def temporal_consistency(self, videos: Tensor) -> Tensor:
        """The temporal term C [B] over consecutive frames (see module docstring)."""
        b, f = videos.shape[:2]
        if f < 2:
            raise ValueError("per-frame reward: temporal consistency needs at least 2 frames")
        if self.temporal == "pixel":
            return pixel_consistency(videos)
        emb = self.reward.embed_images(videos.reshape(b * f, *videos.shape[2:]))  # [B·F, D]
        return embedding_consistency(emb.float().to(videos.device).view(b, f, -1))

    def __call__(self, videos: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> Tensor:
        from flowalign.rewards.base import nan_unless_finite

        score = REDUCTIONS[self.reduce](self.frame_scores(videos, prompts, metadata))  # [B]
        if self.temporal_weight != 0.0:
            score = score + self.temporal_weight * self.temporal_consistency(videos)
        # a non-finite pixel in any frame, sampled or not, is a diverged video: NaN (as the remote path scores it)
        return nan_unless_finite(score.float(), videos)


def for_outputs(reward, outputs: str, per_frame: Optional[Mapping[str, Any]] = None):
    """``reward`` as it must score a model whose decoded outputs are ``outputs`` ("image" or "video").

    An image reward on a video model is wrapped in ``PerFrame(reward, **per_frame)`` (default: every 4th frame,
    mean); a video reward on an image model is a one-line ``UserError``; otherwise ``reward`` itself. The trainer
    and ``flowalign eval`` pass every reward through this, so e.g. HPS scores Wan videos frame by frame.
    """
    kind = getattr(reward, "kind", "image")
    name = getattr(reward, "name", reward)
    if outputs == "video" and kind == "image":
        return PerFrame(reward, **dict(per_frame or {}))
    if outputs == "image" and kind == "video":
        raise UserError(f"reward {name!r} scores videos but the model makes images; choose an image reward")
    return reward


def check_per_frame(options: Mapping[str, Any], what: str = "reward.per_frame") -> None:
    """One-line ``UserError`` for PerFrame options that ``PerFrame`` would refuse, checked before any model loads."""
    from flowalign.rewards.catalog import check_kwargs

    check_kwargs(PerFrame, options, what, reserved=("reward",))
    if "reduce" in options and options["reduce"] not in REDUCTIONS:
        raise UserError(f"{what}: unknown reduce {options['reduce']!r} (use one of {', '.join(REDUCTIONS)})")
    stride = options.get("stride", 1)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise UserError(f"{what}: stride must be an integer >= 1, got {stride!r}")
    if options.get("temporal", "auto") not in ("auto", "embedding", "pixel"):
        raise UserError(f"{what}: unknown temporal {options['temporal']!r} (use auto, embedding or pixel)")
    weight = options.get("temporal_weight", 0.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise UserError(f"{what}: temporal_weight must be a number, got {weight!r}")


def check_temporal(options: Mapping[str, Any], reward_names: Sequence[str], what: str = "reward.per_frame") -> None:
    """``temporal="embedding"`` needs every image reward it wraps to have ``embed_images`` (the CLIP-family rewards):
    a one-line ``UserError`` otherwise, from the reward classes, so before the (video) model loads rather than when
    ``PerFrame`` is built after it."""
    if options.get("temporal") != "embedding":
        return
    from flowalign.rewards import resolve

    lacking = [n for n in dict.fromkeys(reward_names)
               if getattr(resolve(n), "kind", "image") == "image" and not hasattr(resolve(n), "embed_images")]
    if lacking:
        raise UserError(f"{what}: temporal=embedding needs image embeddings, which {', '.join(map(repr, lacking))} "
                        f"{'has' if len(lacking) == 1 else 'have'} not (pickscore, clipscore, hps, hpsv21 and aesthetic "
                        f"have them); use temporal=pixel")
