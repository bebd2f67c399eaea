"""``flowalign bench <name>``: benchmarks that measure and print figures (never estimates).

``BENCHES`` maps a name to a function ``(argv) -> dict`` of measured figures; ``cli_main`` runs one and
prints its figures as ``key: value`` lines (and optionally JSON).
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Callable, Optional, Sequence

from flowalign.errors import CommandParser, UserError


def bench_shapes_sample(argv: Sequence[str]) -> dict:
    """Time loading the shipped shapes model and sampling N images (ODE, Euler, CFG) on this machine.

    Figures are split: importing torch and diffusers (which imports transformers and peft) is a once-per-process
    library cost, timed in a fresh Python process (in this one ``flowalign`` has imported them already, so it timed
    0 s); ``load_plus_first_sample_s`` is building the model, reading its weights and sampling the images;
    ``process_total_s`` is the two together, from a cold ``python`` to the first images.
    """
    ap = CommandParser(prog="flowalign bench shapes-sample")
    ap.add_argument("--path", default="", help="model directory ('' = the shipped model)")
    ap.add_argument("--n", type=int, default=16, help="images to sample")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default: the model's sample_steps)")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=3, help="timed sampling repeats after the first")
    from flowalign.bench_snr import add_output_args, check_json_out

    add_output_args(ap)  # --json PATH and --overwrite, as every bench (a bare --json prints the JSON instead)
    args = ap.parse_args(list(argv))
    check_json_out(args.json, args.overwrite)
    for flag, value, low in (("n", args.n, 1), ("steps", args.steps, 1), ("threads", args.threads, 1),
                             ("repeats", args.repeats, 0)):
        if value is not None and value < low:
            raise UserError(f"--{flag} must be at least {low}, got {value}")
    from flowalign.config import check_max_steps

    check_max_steps(args.steps)
    # NaN or a negative scale sampled NaN images with exit code 0 (checked here: flowalign.sample imports torch,
    # which import_torch_s times)
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise UserError(f"--guidance must be a finite number >= 0 (1 = no CFG), got {args.guidance}")

    import_torch_s, import_diffusers_s = _cold_import_times()
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import diffusers.models.transformers.transformer_sd3  # noqa: F401  (diffusers pulls in transformers and peft)

    from flowalign.models.shapes import ShapesModel
    from flowalign.samplers.loop import sample

    t_libs = time.perf_counter()
    model = ShapesModel.from_pretrained(args.path, guidance_scale=args.guidance)
    t_load = time.perf_counter()
    steps = model.config.sample_steps if args.steps is None else args.steps
    from flowalign.shapes.grammar import generate_prompts

    prompts = [r["prompt"] for r in generate_prompts(max(1, -(-args.n // 6)), seed=1)][: args.n]

    def run_once(seed: int) -> torch.Tensor:
        with torch.no_grad():
            cond = model.encode(prompts)
            x = model.init_noise(len(prompts), torch.Generator().manual_seed(seed))
            traj = sample(model.velocity, x, model.schedule(steps), cond, eta=0.0, kernel="euler")
            return model.decode(traj.final)

    images = run_once(0)
    t_first = time.perf_counter()
    times = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        run_once(r + 1)
        times.append(time.perf_counter() - t0)
    nfe = steps * (1 if model.guidance_scale == 1.0 else 2)
    figures = {
        "path": args.path or "(the shipped model)",
        "images": len(prompts),
        "steps": steps,
        "guidance": model.guidance_scale,
        "velocity_evaluations_per_image": steps,  # the NFE that train, steer and bench credit count (a CFG pair = 1)
        "transformer_passes_per_image": nfe,  # conditional and unconditional passes counted apart
        "threads": torch.get_num_threads(),
        "params_M": round(sum(model.num_parameters().values()) / 1e6, 3),
        "import_torch_s": round(import_torch_s, 3),  # in a fresh process
        "import_diffusers_s": round(import_diffusers_s, 3),
        "load_model_s": round(t_load - t_libs, 3),
        "first_sample_s": round(t_first - t_load, 3),
        "load_plus_first_sample_s": round(t_first - t_libs, 3),
        "process_total_s": round(import_torch_s + import_diffusers_s + t_first - t_libs, 3),
        "warm_sample_s_median": round(sorted(times)[len(times) // 2], 3) if times else None,
        "image_shape": list(images.shape),
    }
    if args.json:
        from flowalign.io import atomic_write_json

        atomic_write_json(args.json, figures)
    return figures


def _cold_import_times() -> tuple[float, float]:
    """Seconds to ``import torch`` and then diffusers' SD3 transformer (with transformers and peft) in a fresh Python
    process, as a user's first command pays them."""
    import json
    import subprocess
    import sys

    code = ("import json, time; t = time.perf_counter(); import torch; a = time.perf_counter(); "
            "import diffusers.models.transformers.transformer_sd3; b = time.perf_counter(); "
            "print(json.dumps([a - t, b - a]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    torch_s, libs_s = json.loads(out.strip().splitlines()[-1])
    return float(torch_s), float(libs_s)


def bench_credit(argv: Sequence[str]) -> None:
    """NFE, reward calls and wall time per prompt group of every credit method (prints its own table)."""
    from flowalign.bench_credit import bench_credit as run

    code = run(list(argv))
    if code:
        raise SystemExit(code)


def bench_grad_snr(argv: Sequence[str]) -> None:
    """Split-half cosine of GRPO gradient estimates per credit method (prints its own table)."""
    from flowalign.bench_snr import bench_grad_snr as run

    run(list(argv))


def bench_noise_variance(argv: Sequence[str]) -> None:
    """Share of the reward variance that each SDE window's noise explains (prints its own table)."""
    from flowalign.bench_noise import bench_noise_variance as run

    run(list(argv))


def bench_sample_gap(argv: Sequence[str]) -> None:
    """Pixel statistics, strict accuracy and x̂₀ error by noise level: renders against the model's samples."""
    from flowalign.bench_gap import bench_sample_gap as run

    run(list(argv))


def bench_motion_prior(argv: Sequence[str]) -> None:
    """Centroid travel of the prompted object in the video model's x̂₀, by noise level (prints its own table)."""
    from flowalign.bench_motion import bench_motion_prior as run

    run(list(argv))


def bench_train_memory(argv: Sequence[str]) -> None:
    """Activation memory and time of a training forward + backward, without and with gradient checkpointing."""
    from flowalign.bench_memory import bench_train_memory as run

    run(list(argv))


BENCHES: dict[str, tuple[Callable[[Sequence[str]], Optional[dict]], str]] = {
    "shapes-sample": (bench_shapes_sample, "load the shipped shapes model and sample 16 images; print timings"),
    "credit": (bench_credit, "NFE / reward calls / wall time per prompt group of each credit method vs upstream"),
    "grad-snr": (bench_grad_snr, "signal in one GRPO gradient estimate per credit method (split-half cosine)"),
    "noise-variance": (bench_noise_variance, "which steps' SDE noise decides the reward (variance split per window)"),
    "sample-gap": (bench_sample_gap, "the model's own samples against rendered scenes: pixel stats, x0 error by t"),
    "motion-prior": (bench_motion_prior, "how far the shapes video model's x0 moves the prompted object, by noise level"),
    "train-memory": (bench_train_memory, "activation memory and time of a training step, without and with gradient checkpointing"),
}
OWN_TABLE = {"credit", "grad-snr", "noise-variance", "sample-gap", "motion-prior", "train-memory"}


def cli_main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write("usage: flowalign bench <name> [args]\n\nbenchmarks:\n")
        for name, (_, doc) in BENCHES.items():
            sys.stdout.write(f"  {name:<16} {doc}\n")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        import difflib

        close = difflib.get_close_matches(name, list(BENCHES), n=1)
        raise UserError(f"unknown benchmark {name!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                                          f" (known: {', '.join(BENCHES)})"))
    try:
        if name in OWN_TABLE:  # these print their own table and take `--json PATH` themselves
            BENCHES[name][0](rest)
            return 0
        # a bare `--json` (last, or before another option) prints the figures as JSON; `--json PATH` writes a file
        at = rest.index("--json") if "--json" in rest else -1
        as_json = at >= 0 and (at + 1 == len(rest) or rest[at + 1].startswith("-"))
        if as_json:
            rest = rest[:at] + rest[at + 1:]
        figures = BENCHES[name][0](rest)
    except UserError as err:  # the line says which benchmark, as its argument errors do
        err.command = err.command or f"bench {name}"
        raise
    if figures is None:  # the benchmark printed its own table
        return 0
    if as_json:
        sys.stdout.write(json.dumps(figures) + "\n")
    else:
        for k, v in figures.items():
            sys.stdout.write(f"{k}: {v}\n")
    return 0
