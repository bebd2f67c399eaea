"""Shapes-world verifier rewards (SHAPES_WORLD.md §3; REWARDS_AND_EVAL.md §1 interface).

``ShapesStrict`` is GenEval-style correctness (1 iff every clause of the prompt holds),
``ShapesStrictIntact`` the same with the integrity gate (no merged or stroke-like component) and
``ShapesPartial`` the mean clause score (Flow-GRPO's partial credit, the dense training reward). Both run
the exact scene verifier of :mod:`flowalign.shapes.verify` on CPU (numpy, < 1 ms per 32×32 image) and
are not differentiable. Prompts must be in the shapes grammar; anything else raises ``UserError``
naming the unknown word. An image with non-finite values scores NaN (a failed sample, masked by training).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from flowalign.errors import UserError
from flowalign.shapes.grammar import Spec, parse
from flowalign.shapes.verify import INTACT_MAX_AREA, INTACT_MAX_ELONGATION, SOFT_TEMPS, VerifyRecord, verify


class _ShapesVerifierReward:
    """Shared machinery: prompt parsing with a cache, batch verification, field extraction."""

    name = "shapes"
    differentiable = False
    kind = "image"
    field = "partial"

    def __init__(self) -> None:
        self._specs: dict[str, Spec] = {}

    @staticmethod
    def _parse(prompt: str) -> Any:
        return parse(prompt)

    def spec(self, prompt: str) -> Spec:
        """The parsed prompt (cached; the grammar is closed so the cache stays small)."""
        s = self._specs.get(prompt)
        if s is None:
            s = self._specs[prompt] = self._parse(prompt)
        return s

    def validate_prompts(self, prompts: Sequence[str]) -> None:
        """One-line ``UserError`` for the first prompt outside the shapes grammar, before anything is sampled
        (trainer and ``flowalign eval`` call it on their prompt sets; scoring would only fail after sampling)."""
        for p in dict.fromkeys(prompts):
            try:
                self.spec(p)
            except UserError:
                other = self._other_world(p)
                if other:
                    raise UserError(other) from None
                raise

    def _other_world(self, prompt: str) -> str:
        """The error line for a prompt of the other shapes world (a still reward given a motion prompt, e.g.
        ``shapes_strict`` on ``shapes_video``): which reward to use; '' when the prompt is in neither grammar."""
        from flowalign.shapes.motion import parse as parse_motion

        try:
            parse_motion(prompt)
        except UserError:
            return ""
        return (f"reward {self.name!r} scores still scenes of the shapes grammar and {prompt!r} is a motion prompt; "
                f"for videos use shapes_motion_strict or shapes_motion_partial")

    def _inputs(self, images: Tensor, prompts: Sequence[str]) -> tuple[list[Spec], np.ndarray, np.ndarray]:
        """(parsed specs, images as np [B, H, W, 3], finite mask [B]) after checking shapes and prompts."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} takes images [B,3,H,W], got shape {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        specs = [self.spec(p) for p in prompts]  # parse first: a bad prompt fails before any work
        arr = images.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
        return specs, arr, np.isfinite(arr).reshape(arr.shape[0], -1).all(-1)  # ..., [B]

    def records(self, images: Tensor, prompts: Sequence[str]) -> list[Optional[VerifyRecord]]:
        """Full verifier records (detected objects, clause scores) per image; None for a non-finite image."""
        specs, arr, finite = self._inputs(images, prompts)
        return [verify(arr[i], specs[i]) if finite[i] else None for i in range(arr.shape[0])]

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> Tensor:
        recs = self.records(images, prompts)
        vals = [float("nan") if r is None else getattr(r, self.field) for r in recs]
        return torch.tensor(vals, dtype=torch.float32, device=images.device)  # [B]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ShapesStrict(_ShapesVerifierReward):
    """1.0 iff the image satisfies every clause of its prompt (exact counts, colors, relation), else 0.0."""

    name = "shapes_strict"
    field = "strict"


class ShapesStrictIntact(_ShapesVerifierReward):
    """``shapes_strict`` with the verifier's integrity gate: 1.0 iff every clause holds and no detected object is
    larger or more elongated than any rendered shape (merged objects, strokes; ``flowalign.shapes.verify``, step 5)."""

    name = "shapes_strict_intact"
    field = "strict_intact"
    measures = ("shapes world: shapes_strict and no merged or stroke-like component "
                f"(area ≤ {INTACT_MAX_AREA:g} px at 32×32, elongation ≤ {INTACT_MAX_ELONGATION:g})")
    typical_range = "{0, 1}"


class ShapesPartial(_ShapesVerifierReward):
    """Mean clause score in [0, 1]: counts by 1 − |found − want|/want, colors and relation 0/1."""

    name = "shapes_partial"
    field = "partial"


def check_temps(temps: Any) -> dict[str, float]:
    """``temps`` of ``shapes_soft`` as a dict of floats, or a one-line ``UserError``: a mapping (or None) whose keys
    are ``SOFT_TEMPS``' and whose values are finite numbers > 0 (a width of 0 divides by zero, a negative one turns
    a threshold around)."""
    known = ", ".join(SOFT_TEMPS)
    if temps is None:
        return {}
    if not isinstance(temps, Mapping):
        raise UserError(f"shapes_soft: temps must be a mapping of logistic widths (keys: {known}), got {temps!r}")
    unknown = [k for k in temps if k not in SOFT_TEMPS]
    if unknown:
        raise UserError(f"shapes_soft: unknown temps key {unknown[0]!r} (known: {known})")
    out: dict[str, float] = {}
    for k, v in temps.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise UserError(f"shapes_soft: temps.{k} must be a finite number > 0 (default {SOFT_TEMPS[k]:g}), "
                            f"got {v!r}")
        out[k] = float(v)
    return out


class ShapesSoft(_ShapesVerifierReward):
    """Smooth relaxation of ``shapes_partial`` for training (:func:`flowalign.shapes.verify.soft_score`).

    The verifier's thresholds (speck area, triangle skewness, square kurtosis, relation margin) become logistic
    with widths ``temps`` (default ``SOFT_TEMPS``), so the reward also ranks rollouts that tie on every hard
    clause by how far each is from the next threshold. Evaluate with ``shapes_strict`` / ``shapes_partial``.
    """

    name = "shapes_soft"
    field = "soft"

    def __init__(self, temps: Optional[Mapping[str, float]] = None) -> None:
        super().__init__()
        self.temps = check_temps(temps)  # e.g. {"area": 1.0}: a one-line UserError for any other key or value

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> Tensor:
        from flowalign.shapes.verify import verify_soft

        specs, arr, finite = self._inputs(images, prompts)
        vals = [verify_soft(arr[i], specs[i], self.temps)[0] if finite[i] else float("nan") for i in range(arr.shape[0])]
        return torch.tensor(vals, dtype=torch.float32, device=images.device)  # [B]


def shapes_records(images: Tensor, prompts: Sequence[str]) -> list[Optional[VerifyRecord]]:
    """Verifier records for reports (None where an image is non-finite)."""
    return ShapesPartial().records(images, prompts)


class _ShapesMotionReward(_ShapesVerifierReward):
    """Verifier rewards of the shapes world in motion (:mod:`flowalign.shapes.motion`, SHAPES_WORLD.md §6) on videos
    [B, F, 3, H, W] in [0, 1]: per-object presence in every frame, direction and steadiness of the tracked centroid.
    Prompts must be in the motion grammar (a one-line ``UserError`` otherwise); a video with non-finite values
    scores NaN."""

    name = "shapes_motion"
    kind = "video"

    @staticmethod
    def _parse(prompt: str) -> Any:
        from flowalign.shapes.motion import parse as parse_motion

        return parse_motion(prompt)

    def _other_world(self, prompt: str) -> str:
        try:
            parse(prompt)
        except UserError:
            return ""
        return (f"reward {self.name!r} scores videos of motion prompts and {prompt!r} is a still scene; add a motion "
                f"(e.g. '{prompt} moving up'), or score still images with shapes_strict or shapes_partial")

    def records(self, videos: Tensor, prompts: Sequence[str]) -> list:
        """Full verifier records (clauses, tracks) per video; None for a non-finite one."""
        from flowalign.shapes.motion import verify_motion

        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"{type(self).__name__} takes videos [B,F,3,H,W], got shape {tuple(videos.shape)}")
        if len(prompts) != videos.shape[0]:
            raise ValueError(f"{videos.shape[0]} videos but {len(prompts)} prompts")
        specs = [self.spec(p) for p in prompts]  # parse first: a bad prompt fails before any work
        arr = videos.detach().to("cpu", torch.float32).permute(0, 1, 3, 4, 2).numpy()  # [B, F, H, W, 3]
        finite = np.isfinite(arr).reshape(arr.shape[0], -1).all(-1)  # [B]
        return [verify_motion(arr[i], specs[i]) if finite[i] else None for i in range(arr.shape[0])]


class ShapesMotionStrict(_ShapesMotionReward):
    """1.0 iff every object of the prompt is held in every frame and moves steadily in its direction, else 0.0."""

    name = "shapes_motion_strict"
    field = "strict"


class ShapesMotionPartial(_ShapesMotionReward):
    """Mean clause score in [0, 1]: per object the share of frames that hold it, direction 0/1, steady 0/1."""

    name = "shapes_motion_partial"
    field = "partial"
