"""The shapes world in motion (SHAPES_WORLD.md §6): prompts, a renderer and a tracking verifier for short videos.

Prompts (a closed grammar; colors and shapes as in :mod:`flowalign.shapes.grammar`):

==========  =====================================================  ===============================================
task        template                                               example
==========  =====================================================  ===============================================
motion      a {color} {shape} moving {direction}                   a red circle moving to the right
two_motion  a {c1} {s1} moving {d1} and a {c2} {s2} moving {d2}    a blue square moving up and a green circle
            (s1 != s2, so each object is known by its shape)       moving to the left
==========  =====================================================  ===============================================

``direction`` ∈ {to the left, to the right, up, down} (image x grows rightward, y downward).

**Renderer.** F frames (default 8; at least ``MIN_FRAMES`` = 5, the fewest in which the slowest object travels
``MIN_TRAVEL``, so that every rendered clip passes the verifier) of the 32×32 scene: each object keeps its color,
shape and size and moves in a straight line at a constant speed of ``SPEED_RANGE`` base px per frame (a path of
5.6–9.8 px over 8 frames), with a small cross-axis drift of at most ``DRIFT_MAX`` of the along-axis speed; the
whole path stays ≥ 1 px from the border, and two objects' boxes keep the shapes world's 2 px gap in every frame.
Deterministic given the rng.

**Verifier** (numpy; the image verifier's :func:`~flowalign.shapes.verify.detect` on every frame). For each object
the prompt names, in each frame: the detected objects of its shape (any color); the frame *holds* the object when
exactly one object of that shape is there and it has the object's color (an extra object of a named shape breaks
it, as the image verifier's exact counts do). The clauses per object:

* ``present[color shape]``: the share of frames that hold it (identity kept: same color and shape throughout);
* ``direction[color shape]``: over the frames that hold it (at least half of them, first and last apart by
  ≥ F/2 frames), the centroid's displacement from the first to the last has an along-axis component
  ≥ ``MIN_TRAVEL`` base px and a cross-axis component ≤ ``CROSS_MAX`` × along-axis (else 0);
* ``steady[color shape]``: 1 if no step between consecutive holding frames moves back along the axis by more
  than ``BACKSTEP`` base px per frame (no reversal or jitter), given ``direction`` holds; else 0.

``partial`` = mean clause score, ``strict`` = 1 iff every clause is 1. Videos whose frames are not all finite
are the caller's to mask (the reward classes give NaN).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from flowalign.errors import UserError
from flowalign.shapes.grammar import COLORS, SHAPES, did_you_mean, unknown_word
from flowalign.shapes.render import BASE, BORDER, GAP, SIZE_RANGE, draw

TASKS: tuple[str, ...] = ("motion", "two_motion")
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                              "down": (0.0, 1.0)}
_DIRECTION_TEXT: dict[str, str] = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
FRAMES = 8
SPEED_RANGE = (0.8, 1.4)  # base px per frame
DRIFT_MAX = 0.15  # cross-axis speed / along-axis speed in the renderer
MIN_TRAVEL = 3.0  # base px of along-axis displacement first → last holding frame for the direction clause
CROSS_MAX = 0.5  # |cross-axis| / along-axis displacement allowed by the direction clause
BACKSTEP = 0.75  # base px per frame a step may move back along the axis before steady fails
# The fewest frames in which the slowest rendered object still travels MIN_TRAVEL first → last (speed·(F − 1) ≥
# MIN_TRAVEL): with fewer, the direction clause fails correctly rendered clips (4 frames: 2.4 px at 0.8 px/frame).
MIN_FRAMES = math.ceil(MIN_TRAVEL / SPEED_RANGE[0]) + 1  # 5


def check_frames(frames: Any, what: str = "frames") -> int:
    """``frames`` as a frame count the motion verifier can judge (≥ ``MIN_FRAMES``), or a one-line ``UserError``
    naming ``what`` (the option or config key it came from) and why."""
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < MIN_FRAMES:
        raise UserError(f"{what} must be an integer >= {MIN_FRAMES}, got {frames!r}: the motion verifier needs an "
                        f"object at the slowest speed ({SPEED_RANGE[0]:g} px/frame) to travel {MIN_TRAVEL:g} px from "
                        f"the first frame to the last, so shorter clips fail even when rendered correctly")
    return int(frames)


@dataclass(frozen=True)
class MovingObject:
    """One object of the prompt: its color, shape and direction of motion."""

    color: str
    shape: str
    direction: str


@dataclass(frozen=True)
class MotionSpec:
    """A parsed motion prompt."""

    objects: tuple[MovingObject, ...]
    task: str = "motion"


# ----------------------------------------------------------------------------------------------- text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def to_prompt(spec: MotionSpec) -> str:
    """Canonical prompt text; ``parse(to_prompt(s)) == s``."""
    return " and ".join(f"{_article(o.color)} {o.color} {o.shape} moving {_DIRECTION_TEXT[o.direction]}"
                        for o in spec.objects)


def vocabulary() -> list[str]:
    """Every word the motion grammar can produce (for the video model's word-level tokenizer): sorted and stable."""
    return sorted({"a", "an", "and", "moving", "to", "the", "left", "right", "up", "down", *COLORS, *SHAPES})


def _hint() -> str:
    return (f"colors: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; directions: "
            f"{', '.join(_DIRECTION_TEXT.values())}; templates: 'a red circle moving to the right', "
            f"'a blue square moving up and a green circle moving to the left'")


def _outside(prompt: str, why: str) -> UserError:
    return UserError(f"prompt {prompt!r} is outside the shapes motion grammar: {why} ({_hint()})")


_PHRASE = re.compile(r"^(a|an) (\S+) (\S+) moving (to the left|to the right|up|down)$")


def parse(prompt: str) -> MotionSpec:
    """Parse a motion prompt; raise :class:`UserError` naming what is wrong. Lenient about case, surrounding
    whitespace, runs of spaces and a trailing period."""
    if not isinstance(prompt, str):
        raise UserError(f"prompt must be a string, got {type(prompt).__name__}")
    text = re.sub(r"\s+", " ", prompt.strip().lower())
    text = text[:-1].rstrip() if text.endswith(".") else text
    if not text:
        raise _outside(prompt, "it is empty")
    parts = text.split(" and ")
    if len(parts) > 2:
        raise _outside(prompt, f"at most two moving objects, got {len(parts)}")
    objs = []
    for part in parts:
        m = _PHRASE.match(part)
        if m is None:
            words, vocab = part.split(" "), vocabulary()
            bad = next((w for w in words if w not in set(vocab)), None)
            why = unknown_word(bad, vocab) if bad else f"{part!r} is not 'a COLOR SHAPE moving DIRECTION'"
            raise _outside(prompt, why)
        _, color, shape, direction = m.groups()
        if color not in COLORS:
            raise _outside(prompt, f"expected a color, got {color!r}{did_you_mean(color, COLORS)}")
        if shape not in SHAPES:
            raise _outside(prompt, f"expected a shape, got {shape!r}{did_you_mean(shape, SHAPES)}")
        objs.append(MovingObject(color, shape, direction.split(" ")[-1]))
    if len(objs) == 2 and objs[0].shape == objs[1].shape:
        raise _outside(prompt, f"two moving objects need different shapes (both are {objs[0].shape}s)")
    return MotionSpec(tuple(objs), "motion" if len(objs) == 1 else "two_motion")


def enumerate_specs(task: str) -> list[MotionSpec]:
    """Every distinct specification of ``task`` in a fixed order."""
    singles = [MovingObject(c, s, d) for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS)]
    if task == "motion":
        return [MotionSpec((o,), "motion") for o in singles]
    if task == "two_motion":
        return [MotionSpec((a, b), "two_motion") for a, b in itertools.product(singles, singles) if a.shape < b.shape]
    raise ValueError(f"unknown motion task {task!r}; choose from {TASKS}")


def generate_prompts(n_per_task: int, seed: int, exclude: Iterable[str] = (), tasks: Iterable[str] = TASKS
                     ) -> list[dict]:
    """``n_per_task`` distinct prompts per task (fewer if the task has fewer), none in ``exclude``:
    [{"prompt", "task"}], reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    skip = set(exclude)
    out = []
    for task in tasks:
        cands = [s for s in enumerate_specs(task) if to_prompt(s) not in skip]
        take = rng.permutation(len(cands))[: n_per_task]
        out += [{"prompt": to_prompt(cands[int(i)]), "task": task} for i in sorted(take)]
    return out


# ----------------------------------------------------------------------------------------------- render


def _paths(spec: MotionSpec, frames: int, rng: np.random.Generator) -> list[dict]:
    """Per object: {"color", "shape", "size", "centers": [F, 2] base px} with every frame inside the canvas and
    two objects' boxes ≥ GAP apart in every frame (rejection sampling over many candidates at once)."""
    n = len(spec.objects)
    t = np.arange(frames, dtype=np.float64)  # [F]
    for _ in range(64):
        size = rng.uniform(*SIZE_RANGE, size=n)  # [N]
        speed = rng.uniform(*SPEED_RANGE, size=n)  # [N]
        drift = rng.uniform(-DRIFT_MAX, DRIFT_MAX, size=n) * speed  # [N]
        vel = np.stack([np.asarray(DIRECTIONS[o.direction]) * speed[i]
                        + np.asarray(DIRECTIONS[o.direction][::-1]) * drift[i] for i, o in enumerate(spec.objects)])
        shift = vel[:, None, :] * t[None, :, None]  # [N, F, 2] displacement from frame 0
        lo = BORDER + size[:, None] / 2 - shift.min(1)  # [N, 2] start range that keeps every frame inside
        hi = BASE - BORDER - size[:, None] / 2 - shift.max(1)
        if (hi < lo).any():
            continue
        k = 256
        start = lo[None] + rng.random((k, n, 2)) * (hi - lo)[None]  # [K, N, 2]
        ok = np.ones(k, dtype=bool)
        if n == 2:
            c0 = start[:, 0, None, :] + shift[0][None]  # [K, F, 2]
            c1 = start[:, 1, None, :] + shift[1][None]
            ok &= (np.abs(c0 - c1).max(-1) >= (size[0] + size[1]) / 2 + GAP).all(-1)
        if ok.any():
            j = int(np.argmax(ok))
            return [{"color": o.color, "shape": o.shape, "size": float(size[i]),
                     "centers": start[j, i][None] + shift[i]} for i, o in enumerate(spec.objects)]
    raise RuntimeError(f"could not place the paths of {spec}")  # unreachable for the grammar's ≤ 2 objects


def render_motion(spec: MotionSpec, frames: int = FRAMES, size: int = 32, rng: Optional[np.random.Generator] = None
                  ) -> np.ndarray:
    """A video satisfying ``spec``: float32 [frames, size, size, 3] in [0, 1]. ``rng=None`` draws fresh entropy.
    ``frames`` below ``MIN_FRAMES`` is refused (``check_frames``): the verifier could not pass such a clip."""
    frames = check_frames(frames)
    rng = np.random.default_rng() if rng is None else rng
    paths = _paths(spec, frames, rng)
    return np.stack([draw([{"color": p["color"], "shape": p["shape"], "size": p["size"],
                            "center": (float(p["centers"][f, 0]), float(p["centers"][f, 1]))} for p in paths], size)
                     for f in range(frames)])  # [F, H, W, 3]


def render_motion_batch(specs: Sequence[MotionSpec], frames: int = FRAMES, size: int = 32, seed: int = 0
                        ) -> np.ndarray:
    """float32 [N, frames, size, size, 3]; video i uses ``default_rng((seed, i))``."""
    return np.stack([render_motion(s, frames, size, np.random.default_rng((seed, i))) for i, s in enumerate(specs)])


# ----------------------------------------------------------------------------------------------- verify


@dataclass
class MotionRecord:
    """What the verifier tracked in one video and how it scored against the prompt."""

    strict: float
    partial: float
    clauses: dict[str, float] = field(default_factory=dict)
    tracks: dict[str, list[Optional[tuple[float, float]]]] = field(default_factory=dict)  # centroid per frame or None


def _clauses(obj: MovingObject, per_frame: Sequence[Sequence[dict]], scale: float) -> tuple[dict[str, float], list]:
    name = f"{obj.color} {obj.shape}"
    track: list[Optional[tuple[float, float]]] = []
    for objs in per_frame:
        same = [o for o in objs if o["shape"] == obj.shape]
        track.append(same[0]["centroid"] if len(same) == 1 and same[0]["color"] == obj.color else None)
    held = [f for f, c in enumerate(track) if c is not None]
    frames = len(per_frame)
    out = {f"present[{name}]": len(held) / frames, f"direction[{name}]": 0.0, f"steady[{name}]": 0.0}
    if len(held) * 2 < frames or held[-1] - held[0] < frames / 2:
        return out, track
    ax = np.asarray(DIRECTIONS[obj.direction])  # unit vector of the prompt's direction
    pos = np.asarray([track[f] for f in held], dtype=np.float64) / scale  # [H, 2] in base px
    d = pos[-1] - pos[0]
    along, cross = float(d @ ax), float(abs(d @ ax[::-1]))
    if along >= MIN_TRAVEL and cross <= CROSS_MAX * along:
        out[f"direction[{name}]"] = 1.0
        steps = (np.diff(pos, axis=0) @ ax) / np.diff(np.asarray(held, dtype=np.float64))  # [H-1] px per frame
        out[f"steady[{name}]"] = float(bool((steps >= -BACKSTEP).all()))
    return out, track


def verify_motion(video: Any, spec: Union[MotionSpec, str]) -> MotionRecord:
    """Score one video [F, H, W, 3] (or [F, 3, H, W]) in [0, 1] against a motion prompt (see the module doc)."""
    from flowalign.shapes.verify import detect

    if isinstance(spec, str):
        spec = parse(spec)
    arr = np.asarray(video, dtype=np.float32)
    if arr.ndim != 4:
        raise ValueError(f"a video is [F, H, W, 3] or [F, 3, H, W], got shape {arr.shape}")
    if arr.shape[-1] != 3 and arr.shape[1] == 3:
        arr = arr.transpose(0, 2, 3, 1)
    scale = arr.shape[2] / BASE
    per_frame = [detect(frame) for frame in arr]
    clauses: dict[str, float] = {}
    tracks = {}
    for obj in spec.objects:
        c, tr = _clauses(obj, per_frame, scale)
        clauses.update(c)
        tracks[f"{obj.color} {obj.shape}"] = tr
    vals = list(clauses.values())
    return MotionRecord(strict=float(all(v == 1.0 for v in vals)), partial=float(np.mean(vals)), clauses=clauses,
                        tracks=tracks)
