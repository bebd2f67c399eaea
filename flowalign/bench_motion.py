"""``flowalign bench motion-prior``: does a shapes video model's x̂₀ move the prompted object, noise level by noise level?

A video model draws a moving object only if its x̂₀ moves it already at the high noise levels where sampling settles
the layout. For one colour and shape and each of the four directions, this renders ``--clips`` clips of "a {color}
{shape} moving {direction}", noises them to each σ in ``--levels`` (one shared ε) and measures how far the object's
centroid in the model's x̂₀ = x_σ − σ·v(x_σ, σ) travels from the first frame to the last, along the prompt's
direction (``xhat_travel``; ``motion_travel`` measures a clip). Beside it: the clips themselves, and the mean of
``--mean-clips`` renders of the prompt — E[x₀ | prompt], which is the ideal x̂₀ at σ = 1, where the input is pure
noise. A model whose x̂₀ moves the object at σ = 0.8 but not at σ = 1 continues a motion it can see but does not
start one (docs/shapes.md, "Why it does not move").
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import torch
from torch import Tensor

from flowalign.errors import CommandParser, UserError


def motion_travel(frames: Tensor, color: Sequence[float], direction: Sequence[float]) -> Tensor:
    """Centroid travel, first frame → last, of the pixels closest to ``color``, along ``direction``, in pixels.

    frames [B, F, 3, H, W] in [0, 1]; ``color`` an RGB triple in [0, 1]; ``direction`` a unit (dx, dy) with y pointing
    down. Per frame each pixel weighs relu(s − q₇₅(s)) with s = −‖pixel − color‖ and q₇₅ the frame's 75th percentile,
    so a blurred, low-contrast prediction is located as well as a crisp render. Returns [B] (positive = the way of
    ``direction``).
    """
    c = torch.as_tensor(color, dtype=frames.dtype).view(1, 1, 3, 1, 1)
    s = -(frames - c).norm(dim=2)  # [B, F, H, W]
    w = (s - s.flatten(2).quantile(0.75, dim=-1)[..., None, None]).clamp_min(0)  # [B, F, H, W]
    h, wd = frames.shape[-2:]
    ys = torch.arange(h, dtype=frames.dtype).view(1, 1, h, 1)
    xs = torch.arange(wd, dtype=frames.dtype).view(1, 1, 1, wd)
    mass = w.sum((2, 3)).clamp_min(1e-8)  # [B, F]
    cx, cy = (w * xs).sum((2, 3)) / mass, (w * ys).sum((2, 3)) / mass  # [B, F] each
    dx, dy = float(direction[0]), float(direction[1])
    along = cx * dx + cy * dy  # [B, F]
    return along[:, -1] - along[:, 0]  # [B]


@torch.no_grad()
def xhat_travel(model: Any, x0: Tensor, cond: Any, levels: Sequence[float], eps: Tensor, color: Sequence[float],
                direction: Sequence[float]) -> list[float]:
    """Mean ``motion_travel`` of the model's x̂₀ = x_σ − σ·v(x_σ, σ) at each σ in ``levels``; x_σ = (1 − σ)·x0 + σ·ε.

    x0, eps [B, C, F, H, W] in the model's data range; ``model.velocity`` with its own guidance scale. An exact
    velocity (v = ε − x0) gives the clips' own travel at every level.
    """
    out = []
    for sigma in levels:
        xt = (1.0 - sigma) * x0 + sigma * eps  # [B, C, F, H, W]
        v = model.velocity(xt, torch.full((x0.shape[0],), float(sigma), device=x0.device), cond).float()
        out.append(float(motion_travel(model.decode(xt - sigma * v).cpu(), color, direction).mean()))
    return out


def bench_motion_prior(argv: Sequence[str]) -> None:
    """Print, per direction, the travel of the clips, of the ideal σ = 1 prediction and of x̂₀ at each σ."""
    import numpy as np

    from flowalign.bench_gap import _floats
    from flowalign.bench_snr import add_output_args, check_json_out
    from flowalign.models import load_model
    from flowalign.sample import check_guidance
    from flowalign.shapes import motion as M
    from flowalign.shapes.grammar import COLORS, SHAPES

    ap = CommandParser(prog="flowalign bench motion-prior", description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", default="", help="shapes video model directory ('' = the shipped model)")
    ap.add_argument("--color", default="red", help=f"object colour ({', '.join(COLORS)})")
    ap.add_argument("--shape", default="circle", help=f"object shape ({', '.join(SHAPES)})")
    ap.add_argument("--clips", type=int, default=8, help="rendered clips per direction")
    ap.add_argument("--mean-clips", type=int, default=400, help="renders averaged for the ideal σ = 1 prediction")
    ap.add_argument("--levels", default="1.0,0.95,0.9,0.8,0.7,0.5", help="comma-separated noise levels σ in (0, 1]")
    ap.add_argument("--guidance", type=float, default=1.0, help="CFG scale of the velocity (1 = the conditional branch)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--seed", type=int, default=0, help="seed of the rendered clips and their noise")
    add_output_args(ap)
    args = ap.parse_args(list(argv))
    levels = _floats(args.levels, "levels")
    if any(not 0.0 < s <= 1.0 for s in levels):
        raise UserError(f"--levels={args.levels}: every noise level must lie in (0, 1]")
    if args.color not in COLORS or args.shape not in SHAPES:
        raise UserError(f"--color {args.color!r} / --shape {args.shape!r}: choose a colour from {', '.join(COLORS)} "
                        f"and a shape from {', '.join(SHAPES)}")
    for flag, value in (("clips", args.clips), ("mean-clips", args.mean_clips), ("threads", args.threads)):
        if value < 1:
            raise UserError(f"--{flag}={value} must be >= 1")
    check_guidance(args.guidance)
    if not 0 <= args.seed < (1 << 32):  # the renders' numpy generators take no negative seed
        raise UserError(f"--seed must be between 0 and 2**32 (exclusive), got {args.seed}")
    check_json_out(args.json, args.overwrite)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model = load_model("shapes_video", args.path, guidance_scale=args.guidance)
    color = COLORS[args.color]
    print(f"motion-prior: {args.color} {args.shape}, {args.clips} clips per direction, guidance {args.guidance:g}; "  # noqa: T201
          "travel first → last frame along the prompt's direction, px")
    print(f"{'direction':<10}{'clips':>7}{'E[x0]':>7}  " + "".join(f"{'σ=' + format(s, 'g'):>8}" for s in levels))  # noqa: T201
    rows = []
    for k, (name, d) in enumerate(M.DIRECTIONS.items()):
        spec = M.MotionSpec((M.MovingObject(args.color, args.shape, name),))
        prompt = M.to_prompt(spec)
        clips = torch.from_numpy(M.render_motion_batch([spec] * args.clips, seed=args.seed * 1_000 + k))  # [B,F,H,W,3]
        clips = clips.permute(0, 1, 4, 2, 3).float()  # [B, F, 3, H, W]
        mean = torch.from_numpy(np.mean(M.render_motion_batch([spec] * args.mean_clips, seed=args.seed * 1_000 + 500 + k),
                                        axis=0, keepdims=True)).permute(0, 1, 4, 2, 3).float()  # [1, F, 3, H, W]
        x0 = model.encode_images(clips)  # [B, C, F, H, W]
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed * 1_000 + k)).to(x0)
        with torch.no_grad():
            cond = model.encode([prompt] * args.clips)
        row = {"direction": name, "prompt": prompt, "clips": round(float(motion_travel(clips, color, d).mean()), 3),
               "mean_clip": round(float(motion_travel(mean, color, d)[0]), 3),
               "xhat": {format(s, "g"): round(v, 3) for s, v in
                        zip(levels, xhat_travel(model, x0, cond, levels, eps, color, d))}}
        rows.append(row)
        print(f"{name:<10}{row['clips']:>7.2f}{row['mean_clip']:>7.2f}  "  # noqa: T201
              + "".join(f"{v:>8.2f}" for v in row["xhat"].values()))
    sys.stdout.flush()
    if args.json:
        from flowalign.io import atomic_write_json

        atomic_write_json(args.json, {"rows": rows, "guidance": args.guidance, "path": args.path or "(shipped)",
                                      "wall_s": round(time.perf_counter() - t_start, 2)})
