"""Render shapes-world scenes that satisfy a :class:`~flowalign.shapes.grammar.Spec` (SHAPES_WORLD.md §1).

Numpy only. Geometry is in units of the 32×32 canvas ("base pixels") and scaled by ``size / 32``:

* each object lives in a square box of side ``s`` ∈ [7, 9] base px (jittered per object): a circle of
  diameter ``s``, a square of side 0.85·s (so its area is close to the circle's), an upright isosceles
  triangle with base and height ``s`` (apex up);
* boxes keep ≥ 1 base px from the border and ≥ 2 base px from each other (Chebyshev gap between boxes),
  so anti-aliased edges of two objects never touch;
* ``position`` scenes: the subject's center is offset from the reference's center along the relation's
  axis by at least (s₁ + s₂)/2 + gap (more than one object size), and the cross-axis offset is at most
  half the along-axis offset, so a GenEval-style relation test holds with a wide margin;
* anti-aliasing: shapes are drawn on a 4× supersampled grid (pixel-centre sampling) and box-downsampled.

Placement is rejection sampling over many candidate layouts at once (vectorised); if none fits, the
object sizes shrink by 10% and it tries again. Deterministic given the generator.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from flowalign.shapes.grammar import BACKGROUND, COLORS, Spec

BASE = 32.0  # geometry below is in pixels of a 32×32 canvas
SIZE_RANGE = (7.0, 9.0)  # object box side, base px
BORDER = 1.0  # min distance box → canvas edge, base px
GAP = 2.0  # min Chebyshev gap between two boxes, base px
SUPERSAMPLE = 4
_CANDIDATES = 256  # layouts tried per rejection round
_ROUNDS = 8


def _shape_mask(shape: str, cx: float, cy: float, s: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean coverage of one shape on sample points (xs [1,W], ys [H,1]) in output-pixel units."""
    if shape == "circle":
        r = s / 2
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        h = 0.85 * s / 2
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    if shape == "triangle":
        # apex (cx, cy - s/2), base from (cx - s/2, cy + s/2) to (cx + s/2, cy + s/2); half-width grows linearly
        t = (ys - (cy - s / 2)) / s  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= t * s / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _expand(spec: Spec) -> list[tuple[str, str]]:
    """(color, shape) of each object instance, subject first."""
    return [(o.color, o.shape) for o in spec.objects for _ in range(o.count)]


def _valid_layouts(c: np.ndarray, s: np.ndarray, spec: Spec) -> np.ndarray:
    """c [K, N, 2] candidate centers, s [N] sizes (base px) → bool [K] layouts that meet every constraint."""
    n = s.shape[0]
    ok = np.ones(c.shape[0], dtype=bool)
    for i in range(n):
        for j in range(i + 1, n):
            d = np.abs(c[:, i] - c[:, j]).max(axis=-1)  # [K] Chebyshev distance of centers
            ok &= d >= (s[i] + s[j]) / 2 + GAP
    if spec.relation is not None:
        dx = c[:, 0, 0] - c[:, 1, 0]  # subject − reference; image y grows downward
        dy = c[:, 0, 1] - c[:, 1, 1]
        along, cross = {
            "left of": (-dx, dy),
            "right of": (dx, dy),
            "above": (-dy, dx),
            "below": (dy, dx),
        }[spec.relation]
        ok &= (along >= (s[0] + s[1]) / 2 + GAP) & (np.abs(cross) <= 0.5 * along)
    return ok


def layout(spec: Spec, rng: np.random.Generator) -> list[dict]:
    """Object placements in base (32×32) pixels: [{"color", "shape", "center": (x, y), "size": s}]."""
    objs = _expand(spec)
    n = len(objs)
    s = rng.uniform(*SIZE_RANGE, size=n)  # [N]
    for _ in range(64):
        for _ in range(_ROUNDS):
            lo = BORDER + s / 2  # [N]
            hi = BASE - BORDER - s / 2
            c = lo[None, :, None] + rng.random((_CANDIDATES, n, 2)) * (hi - lo)[None, :, None]  # [K, N, 2]
            ok = _valid_layouts(c, s, spec)
            if ok.any():
                k = int(np.argmax(ok))
                return [
                    {"color": col, "shape": shp, "center": (float(c[k, i, 0]), float(c[k, i, 1])), "size": float(s[i])}
                    for i, (col, shp) in enumerate(objs)
                ]
        s = s * 0.9
    raise RuntimeError(f"could not place the objects of {spec}")  # unreachable for the grammar's ≤ 4 objects


def draw(placements: Sequence[dict], size: int = 32) -> np.ndarray:
    """Rasterise placements (base-px geometry) to float32 [size, size, 3] in [0, 1], anti-aliased."""
    k = SUPERSAMPLE
    scale = size / BASE
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = np.asarray(BACKGROUND, dtype=np.float32)
    # sample points: centres of the k×k sub-pixels, in output-pixel units
    sub = (np.arange(k) + 0.5) / k
    for p in placements:
        cx, cy = p["center"][0] * scale, p["center"][1] * scale
        s = p["size"] * scale
        # only touch the output pixels inside the object's box (+1 px)
        x0, x1 = max(int(np.floor(cx - s / 2)) - 1, 0), min(int(np.ceil(cx + s / 2)) + 1, size)
        y0, y1 = max(int(np.floor(cy - s / 2)) - 1, 0), min(int(np.ceil(cy + s / 2)) + 1, size)
        xs = (np.arange(x0, x1)[:, None] + sub[None, :]).reshape(1, -1)  # [1, Wk]
        ys = (np.arange(y0, y1)[:, None] + sub[None, :]).reshape(-1, 1)  # [Hk, 1]
        m = _shape_mask(p["shape"], cx, cy, s, xs, ys).astype(np.float32)  # [Hk, Wk]
        a = m.reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3))[..., None]  # [h, w, 1] coverage
        col = np.asarray(COLORS[p["color"]], dtype=np.float32)
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + col * a
    return img


def render_scene(spec: Spec, size: int = 32, rng: Optional[np.random.Generator] = None) -> tuple[np.ndarray, list[dict]]:
    """(image float32 [size, size, 3], placements) for a scene that satisfies ``spec``."""
    rng = np.random.default_rng() if rng is None else rng
    placements = layout(spec, rng)
    return draw(placements, size), placements


def render(spec: Spec, size: int = 32, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """A scene satisfying ``spec``: float32 [size, size, 3] in [0, 1]. ``rng=None`` draws fresh entropy."""
    return render_scene(spec, size, rng)[0]


def render_batch(specs: Sequence[Spec], size: int = 32, seed: int = 0) -> np.ndarray:
    """float32 [N, size, size, 3]; image i uses ``default_rng((seed, i))``, so it does not depend on the others."""
    out = np.empty((len(specs), size, size, 3), dtype=np.float32)
    for i, spec in enumerate(specs):
        out[i] = render(spec, size, np.random.default_rng((seed, i)))
    return out
