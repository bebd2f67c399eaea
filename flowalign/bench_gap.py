"""``flowalign bench sample-gap``: how a shapes model's own samples differ from the scenes it was trained on.

Fitting a model to its own samples (self-distillation, ``train.nft_optimality=self``) is a fixed point only if
the samples look, to the model, like its training data. This benchmark draws the same prompts as rendered
ground-truth scenes (the pretraining distribution) and as the model's ODE samples at each of the ``--steps`` step
counts (10 and 40 by default), and reports for each source

- pixel statistics (mean, std over all pixels of images in [0, 1]) and the verifier's strict accuracy;
- the model's denoising error at fixed noise levels t: E‖x̂₀(x_t, t) − x₀‖² with x_t = (1 − t)·x₀ + t·ε and
  x̂₀ = x_t − t·v_θ(x_t, t), per element, in the data range [−1, 1] (``denoise_error``).

Where a source's error is *lower* than the renders' at high t, its images lie closer to the model's own
high-noise prediction (a blurred average) than real scenes do: the gap a self-consuming loop widens
(docs/results.md, "Self-distillation without CFG"). ``--lora`` measures a trained policy instead of the base.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import torch
from torch import Tensor

from flowalign.config import MAX_STEPS
from flowalign.errors import CommandParser, UserError


@torch.no_grad()
def denoise_error(velocity, x0: Tensor, cond: Any, levels: Sequence[float], eps: Tensor) -> list[float]:
    """Mean squared x̂₀ error per noise level: mean over rows and elements of (x_t − t·v(x_t, t) − x₀)².

    ``velocity(x, sigma [B], cond) -> v`` is the model's (guided) velocity; ``x0`` [B, *latent] data in the
    model's range; ``eps`` [B, *latent] the noise, shared by every level so levels differ only in t. For the exact
    velocity of a single point x₀ (v = ε − x₀) every error is 0. Returns one float per level.
    """
    out = []
    for t in levels:
        xt = (1.0 - t) * x0 + t * eps  # [B, *latent]
        v = velocity(xt, torch.full((x0.shape[0],), float(t), device=x0.device), cond).float()  # [B, *latent]
        out.append(float(((xt - t * v) - x0).pow(2).mean()))
    return out


def _floats(spec: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{what}: {spec!r} is not a comma-separated list of numbers") from None
    if not vals:
        raise UserError(f"--{what} is empty")
    return vals


def bench_sample_gap(argv: Sequence[str]) -> None:
    """Print, per source (renders, ODE samples), pixel statistics, strict accuracy and x̂₀ error by noise level."""
    import numpy as np

    from flowalign.bench_credit import _shapes_prompts
    from flowalign.bench_snr import add_common_args, check_common
    from flowalign.models import load_model
    from flowalign.sample import check_guidance, check_lora_dir, generate, load_lora_checked
    from flowalign.shapes.grammar import parse
    from flowalign.shapes.render import render
    from flowalign.shapes.verify import verify

    ap = CommandParser(prog="flowalign bench sample-gap", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=96, help="shapes prompts (round-robin over the grammar's tasks)")
    ap.add_argument("--steps", default="10,40", help="comma-separated Euler step counts of the ODE samples")
    ap.add_argument("--guidance", type=float, default=1.0, help="CFG scale of the samples and of the denoiser")
    ap.add_argument("--levels", default="0.03,0.08,0.15,0.3,0.5,0.7,0.85,0.95",
                    help="comma-separated noise levels t in (0, 1) at which to measure the x̂₀ error")
    ap.add_argument("--lora", default=None, help="LoRA directory to apply (e.g. runs/x/checkpoints/step-N)")
    add_common_args(ap)
    args = ap.parse_args(list(argv))
    if not all(s.is_integer() for s in _floats(args.steps, "steps")):
        raise UserError(f"--steps={args.steps}: every step count must be a whole number, e.g. --steps 10,40")
    steps = [int(s) for s in _floats(args.steps, "steps")]
    levels = _floats(args.levels, "levels")
    if any(not 1 <= s <= MAX_STEPS for s in steps):
        raise UserError(f"--steps={args.steps}: every step count must be between 1 and {MAX_STEPS}")
    if any(not 0.0 < t < 1.0 for t in levels):
        raise UserError(f"--levels={args.levels}: every noise level must lie in (0, 1)")
    if args.prompts < 1:
        raise UserError(f"--prompts={args.prompts} must be >= 1")
    check_guidance(args.guidance)
    check_common(args, seed_min=0)  # the renders' numpy generators take no negative seed
    if args.lora:
        check_lora_dir(args.lora)  # a missing or unreadable LoRA file fails here, before the model loads
    if args.threads is not None:  # else torch's own (OMP_NUM_THREADS where set)
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    model = load_model("shapes", args.shapes_path, guidance_scale=args.guidance)
    if args.lora:
        load_lora_checked(model, args.lora)  # a LoRA of another model fails in one line, not a traceback
    prompts = _shapes_prompts(args.prompts, seed=args.seed + 5)
    n = len(prompts)
    size = model.latent_shape[-1]
    scenes = np.stack([render(parse(p), size, np.random.default_rng((args.seed, i))) for i, p in enumerate(prompts)])
    sources = {"renders": torch.from_numpy(scenes).permute(0, 3, 1, 2).float()}  # [n, 3, H, W] in [0, 1]
    for s in steps:
        sources[f"ode {s} steps"] = generate(model, prompts, [args.seed * 100_003 + i for i in range(n)], steps=s,
                                             guidance_scale=args.guidance)  # [n, 3, H, W] in [0, 1]
    eps = torch.randn((n, *model.latent_shape), generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        cond = model.encode(prompts)
    print(f"sample-gap: {n} prompts, guidance {args.guidance:g}, "  # noqa: T201
          f"{'LoRA ' + args.lora if args.lora else 'base'}; x̂₀ error (mean squared, data range [-1, 1]) at t =")
    print(f"{'source':<16}{'mean':>7}{'std':>7}{'strict':>8}  " + "".join(f"{t:>8g}" for t in levels))  # noqa: T201
    rows: list[dict[str, Any]] = []
    for name, img in sources.items():
        strict = float(np.mean([verify(img[i].permute(1, 2, 0).numpy(), prompts[i]).strict for i in range(n)]))
        x0 = model.encode_images(img.to(model.device))  # [n, 3, H, W] in [-1, 1]
        err = denoise_error(model.velocity, x0, cond, levels, eps.to(model.device))
        row = {"source": name, "pixel_mean": round(float(img.mean()), 4), "pixel_std": round(float(img.std()), 4),
               "strict": round(strict, 4), "x0_error": {f"{t:g}": round(e, 5) for t, e in zip(levels, err)}}
        rows.append(row)
        print(f"{name:<16}{row['pixel_mean']:>7.3f}{row['pixel_std']:>7.3f}{strict:>8.3f}  "  # noqa: T201
              + "".join(f"{e:>8.4f}" for e in err))
    wall = time.perf_counter() - t_start
    print(f"wall time {wall:.0f}s")  # noqa: T201
    if args.json:
        from flowalign.io import atomic_write_json

        atomic_write_json(args.json, {"prompts": n, "guidance": args.guidance, "lora": args.lora, "levels": levels,
                                      "sources": rows, "wall_s": round(wall, 1)})
    sys.stdout.flush()
