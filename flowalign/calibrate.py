"""DenseGRPO reward-aware noise calibration (METHODS.md §4.1) and ``flowalign calibrate``.

The SDE's diffusion coefficient is replaced by a free per-step value ψ_t: the ``dance_sde`` kernel with a
per-step η = ψ (s_t = ψ_t·√Δ_t). Before training, ψ is tuned so that each step's dense reward gains
ΔR_it = V_full(x_{t+1}) − V_full(x_t) are balanced between positive and negative:

    repeat I times: sample N trajectories with noise ψ, compute ΔR_it
        for each calibrated t: if |#{ΔR_it > 0} − #{ΔR_it < 0}| < ε1: ψ_t += ε2  else ψ_t −= ε2;  ψ_t ≥ 0

ε1 = 2, ε2 = 0.01 (paper); I = 10, N = 48 (flowalign defaults); ψ starts at Flow-GRPO's g_t with a = 0.7.
The result is written as JSON whose ``eta`` list is a per-step η for ``dance_sde`` (the same ψ must be used
for the rollout log-prob and the KL).
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from flowalign.samplers.loop import sample
from flowalign.types import Cond, VelocityFn
from flowalign.values import ScoreFn, probe_values

logger = logging.getLogger(__name__)


def initial_psi(sigmas: Tensor, a: float = 0.7, last_step_zero: bool = True) -> Tensor:
    """Flow-GRPO's diffusion coefficient g_t = a·sqrt(σ_t/(1 − σ̃_t)) as a per-step ψ [T] (METHODS.md §2.2).

    σ̃_t = σ_t if σ_t < 1 else σ_1. The last step is deterministic (ψ = 0) unless ``last_step_zero`` is off.
    """
    sig = sigmas.detach().cpu().to(torch.float64)
    s, s1 = sig[:-1], sig[1]
    s_tilde = torch.where(s < 1, s, s1)
    psi = a * torch.sqrt(s / (1 - s_tilde))  # [T]
    if last_step_zero:
        psi[-1] = 0.0
    return psi.to(torch.float32)


def calibration_update(psi: Tensor, gains: Tensor, *, eps1: float = 2.0, eps2: float = 0.01,
                       steps: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One DenseGRPO calibration update (METHODS.md §4.1).

    ``gains`` [N, T] reward gains ΔR of N trajectories (NaN entries ignored); ``steps`` [T] bool selects the
    calibrated steps (default: all). A balanced step (|#pos − #neg| < ε1) gets ψ_t + ε2, an unbalanced one
    ψ_t − ε2, clamped at 0; a step without one finite gain keeps its ψ_t (0 positive and 0 negative there is no
    evidence of balance). Returns (new ψ [T], imbalance #pos − #neg [T]).
    """
    g = gains.detach().to(torch.float64)
    ok = torch.isfinite(g)
    pos = ((g > 0) & ok).sum(0)  # [T]
    neg = ((g < 0) & ok).sum(0)
    imbalance = pos - neg  # [T]
    balanced = imbalance.abs() < eps1
    step = torch.where(balanced, torch.full_like(psi, eps2), torch.full_like(psi, -eps2))
    step = torch.where(ok.any(0).to(step.device), step, torch.zeros_like(step))
    if steps is not None:
        step = torch.where(steps.to(torch.bool), step, torch.zeros_like(step))
    return (psi + step).clamp_min(0.0), imbalance


def reward_gains(velocity: VelocityFn, noise: Tensor, sigmas: Tensor, cond: Cond, cond_index: Tensor,
                 psi: Tensor, score: ScoreFn, weights: Mapping[str, float], *,
                 generator: Optional[torch.Generator] = None, probe: str = "ode:full",
                 max_batch: Optional[int] = None) -> Tensor:
    """ΔR [N, T] of N ``dance_sde`` rollouts with per-step η = ψ, values V_full of every state (weighted sum)."""
    traj = sample(velocity, noise, sigmas, cond, eta=psi, kernel="dance_sde", generator=generator,
                  cond_index=cond_index, keep_velocities=True)
    mask = torch.ones(traj.batch_size, traj.steps + 1, dtype=torch.bool)
    vals = probe_values(velocity, traj, mask, probe, score, max_batch=max_batch)
    v = sum(float(w) * vals[k].to(torch.float64) for k, w in weights.items())  # [N, T+1]
    return v[:, 1:] - v[:, :-1]


def calibrate_noise(make_batch: Callable[[int], tuple[Tensor, Cond, Tensor]], velocity: VelocityFn, sigmas: Tensor,
                    score: ScoreFn, weights: Mapping[str, float], *, psi0: Optional[Tensor] = None,
                    iterations: int = 10, eps1: float = 2.0, eps2: float = 0.01, seed: int = 0,
                    probe: str = "ode:full", max_batch: Optional[int] = None,
                    steps: Optional[Tensor] = None, progress: bool = False) -> tuple[Tensor, list[dict]]:
    """Run I calibration iterations (DenseGRPO §4.1). ``make_batch(i) -> (noise [N,*], cond, cond_index [N])``.

    ``steps`` [T] bool = calibrated steps (default: every step but the last, which stays deterministic).
    Returns (ψ [T], history: one dict per iteration with ψ before the update and the per-step imbalance).
    ``progress`` shows a progress bar over the iterations.
    """
    from tqdm.auto import tqdm

    t_steps = int(sigmas.shape[0]) - 1
    psi = initial_psi(sigmas) if psi0 is None else psi0.detach().cpu().to(torch.float32).clone()
    if steps is None:
        steps = torch.arange(t_steps) < t_steps - 1
    psi = torch.where(steps, psi, torch.zeros_like(psi))
    history = []
    for it in tqdm(range(iterations), desc="calibration", unit="it", disable=not progress):
        noise, cond, cond_index = make_batch(it)
        gen = torch.Generator(device=noise.device).manual_seed(seed * 1000003 + it)
        gains = reward_gains(velocity, noise, sigmas, cond, cond_index, psi, score, weights, generator=gen,
                             probe=probe, max_batch=max_batch)
        new, imb = calibration_update(psi, gains, eps1=eps1, eps2=eps2, steps=steps)
        history.append({"iteration": it, "psi": psi.tolist(), "imbalance": imb.tolist(),
                        "mean_gain": torch.nanmean(gains, dim=0).tolist()})
        logger.info("calibration %d/%d: imbalance %s", it + 1, iterations, imb.tolist())
        psi = new
    return psi, history


def _setting(key: str, value, cli: bool) -> str:
    """How a user sets ``key``: ``sampler.steps=4`` in a config override, ``--steps 4`` on a command line."""
    return f"--{key} {value}" if cli else f"sampler.{key}={value}"


def read_eta_file(path: str, steps: Optional[int], kernel: Optional[str], *, cli: bool = False,
                  missing_hint: str = "write it with `flowalign calibrate`") -> tuple[list[float], dict]:
    """The per-step ``eta`` list of a file written by ``flowalign calibrate`` (any JSON with such a list), and the
    whole file, checked without the model: readable, finite numbers >= 0, one per step when ``steps`` is given, and
    written for ``kernel`` when the file names one and ``kernel`` is given. Errors are one line naming the setting
    to change, as a config override (``sampler.steps=4``) or, with ``cli``, as a flag (``--steps 4``); the sigma grid
    needs the model (:func:`check_eta_grid`)."""
    import json
    import math
    from pathlib import Path

    from flowalign.errors import UserError

    what = f"--eta-file {path!r}" if cli else f"sampler.eta_file={path!r}"
    try:
        data = json.loads(Path(path).read_text())
        eta = data["eta"]
    except FileNotFoundError:
        raise UserError(f"{what} not found (a relative path is read from the working directory, {Path.cwd()}); "
                        f"{missing_hint}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read a per-step 'eta' list from {what} ({type(e).__name__}); write it with "
                        f"`flowalign calibrate`") from e
    if not isinstance(eta, list):
        raise UserError(f"{what}: 'eta' must be a list of per-step noise levels, got {type(eta).__name__}; write it "
                        f"with `flowalign calibrate`")
    if steps is not None and len(eta) != steps:
        raise UserError(f"{what} has {len(eta)} etas but {_setting('steps', steps, cli)}; they must match (set "
                        f"{_setting('steps', len(eta), cli)}, or calibrate with --steps {steps})")
    for t, v in enumerate(eta):  # a noise level is a finite number >= 0 (a NaN or a string would fail mid-rollout)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise UserError(f"{what}: eta[{t}] = {v!r} is not a finite number >= 0; write the file with "
                            f"`flowalign calibrate`")
    named = data.get("kernel") if isinstance(data, dict) else None
    if named is not None and kernel is not None and named != kernel:
        raise UserError(f"{what} holds {named} noise levels but {_setting('kernel', kernel, cli)}; set "
                        f"{_setting('kernel', named, cli)}")
    return [float(v) for v in eta], data if isinstance(data, dict) else {}


def check_eta_grid(data: Mapping, sigmas: Tensor, what: str, steps: int) -> None:
    """Refuse (one line) an eta file calibrated on another sigma grid than ``sigmas`` [T+1] (another model, shift or
    step count): ψ_t is a noise level of that grid's steps. A file without ``sigmas`` is not checked."""
    from flowalign.errors import UserError

    grid = data.get("sigmas")
    if grid is None:
        return
    try:
        g = torch.tensor([float(v) for v in grid], dtype=torch.float64)
    except (TypeError, ValueError):
        raise UserError(f"{what}: 'sigmas' must be a list of numbers; write the file with `flowalign calibrate`") from None
    if g.shape[0] != sigmas.shape[0] or not torch.allclose(g, sigmas.detach().cpu().double(), atol=1e-5):
        raise UserError(f"{what} was calibrated on another sigma grid (another model, shift or step count) than this "
                        f"one's; calibrate for this model with --steps {steps}")


def cli_main(argv: Sequence[str]) -> int:
    """``flowalign calibrate``: DenseGRPO noise calibration → a JSON per-step η for the ``dance_sde`` kernel."""
    import math

    from flowalign import data as D
    from flowalign.errors import CommandParser, UserError
    from flowalign.io import atomic_write_json
    from flowalign.models import load_model

    ap = CommandParser(prog="flowalign calibrate", description="DenseGRPO's reward-aware per-step noise calibration: "
                                 "adjusts each step's noise level until its reward gains balance, and writes the "
                                 "per-step eta file that `flowalign train` reads as sampler.eta_file (with "
                                 "sampler.kernel=dance_sde and the same --steps; the run keeps a copy) and "
                                 "`flowalign sample --eta-file` draws with.")
    ap.add_argument("--model", default="shapes", help="model family (flowalign.models.MODELS)")
    ap.add_argument("--path", default="", help="model directory or hub id ('' = the family default)")
    ap.add_argument("--prompts", "--prompt-file", dest="prompts", default="shapes-train",
                    help="prompt set (built-in name or file; --prompt-file: the same)")
    ap.add_argument("--reward", action="append", default=None, metavar="NAME[=W]",
                    help="reward and weight, NAME=W or NAME:W (repeatable; default shapes_partial=1)")
    ap.add_argument("--reward-arg", action="append", default=[], metavar="NAME.KEY=VALUE",
                    help="reward constructor argument, as for `flowalign eval`, e.g. remote.url=http://host:8000 or "
                         "pickscore.path=/weights/PickScore_v1 (repeatable)")
    ap.add_argument("--per-frame", action="append", default=[], metavar="KEY=VALUE",
                    help="video models: how image rewards score the frames, e.g. reduce=first or stride=2 (PerFrame "
                         "options, as the trainer's reward.per_frame; default every 4th frame, mean; repeatable)")
    from flowalign.evaluate import add_model_arg

    add_model_arg(ap)  # e.g. height/width: the resolution sets FLUX's sigma grid, so calibrate at the training one
    ap.add_argument("--steps", type=int, default=10, help="rollout steps T")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    ap.add_argument("--n", type=int, default=48, help="trajectories per iteration N")
    ap.add_argument("--group-size", type=int, default=24, help="rollouts per prompt within the N")
    ap.add_argument("--iterations", type=int, default=10, help="calibration iterations I")
    ap.add_argument("--eps1", type=float, default=2.0, help="balance threshold ε1")
    ap.add_argument("--eps2", type=float, default=0.01, help="ψ step ε2")
    ap.add_argument("--init-a", type=float, default=0.7, help="initial ψ = Flow-GRPO g_t with this a")
    ap.add_argument("--probe", default="ode:full", help="value probe mode")
    ap.add_argument("--max-batch", type=int, default=None, help="rows per model forward while probing")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt draws and initial noise of every iteration")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    ap.add_argument("--out", required=True, help="output JSON (its 'eta' list is the per-step η of dance_sde); an "
                                                 "existing file is refused unless --overwrite")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out file (an earlier calibration)")
    args = ap.parse_args(list(argv))
    # every argument is checked before the model loads and before anything is written
    from pathlib import Path

    from flowalign.rewards import resolve as resolve_reward
    from flowalign.sample import check_guidance, check_out_parent, check_positive
    from flowalign.values import parse_mode

    check_positive(steps=args.steps, iterations=args.iterations, max_batch=args.max_batch)
    if args.steps < 2:  # the last step stays deterministic, so T = 1 leaves nothing to calibrate
        raise UserError(f"--steps {args.steps}: nothing to calibrate (the last step is deterministic); use --steps >= 2")
    check_guidance(args.guidance)
    # seed·1000003 must fit a generator seed (a traceback after the model loaded), and the CPU generator keeps only
    # 32 bits, so larger seeds would only repeat smaller ones
    if not -(1 << 32) < args.seed < (1 << 32):
        raise UserError(f"--seed must be between -2**32 and 2**32 (exclusive), got {args.seed}")
    from flowalign.sample import check_device

    check_device(args.device)
    if args.n < 1 or args.group_size < 1 or args.n % args.group_size:
        raise UserError(f"--n ({args.n}) must be a positive multiple of --group-size ({args.group_size})")
    from flowalign.config import MAX_ROLLOUTS

    if args.n > MAX_ROLLOUTS:  # a typo's rollouts would be allocated at once and the process killed for memory
        raise UserError(f"--n {args.n} trajectories per iteration is above the limit of {MAX_ROLLOUTS} (the trainer's "
                        f"groups_per_iter x group_size limit); lower --n")
    try:
        parse_mode(args.probe)
    except ValueError:
        raise UserError(f"--probe {args.probe!r} is not a probe mode; use x0, ode:M, ode:full, ode2:M or ode2:full "
                        f"(M = sub-steps >= 1)") from None
    for flag, value in (("eps1", args.eps1), ("eps2", args.eps2)):
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--{flag} must be a positive number, got {value}")
    if not (math.isfinite(args.init_a) and args.init_a >= 0):
        raise UserError(f"--init-a must be a number >= 0 (the initial noise level), got {args.init_a}")
    if Path(args.out).is_dir():
        raise UserError(f"--out {args.out!r} is a directory; pass the path of a JSON file, e.g. "
                        f"{Path(args.out) / 'eta.json'}")
    if Path(args.out).exists() and not args.overwrite:  # the result of an earlier (long) calibration
        raise UserError(f"--out {args.out!r} exists already; pass --overwrite to replace it, or choose a new --out")
    check_out_parent(args.out)
    weights: dict[str, float] = {}
    for spec in args.reward or ["shapes_partial=1"]:
        name, _, w = spec.replace(":", "=", 1).partition("=")  # NAME:W too, as steer --reward writes it
        try:
            weights[name] = float(w) if w else 1.0
            if not math.isfinite(weights[name]):
                raise ValueError
        except ValueError:
            raise UserError(f"--reward {spec!r}: the weight must be a number, e.g. --reward {name}=1") from None
        resolve_reward(name)  # an unknown name fails here, before the model loads
    if not any(weights.values()):  # a reward that is 0 everywhere: no step gains anything, the eta is noise
        raise UserError(f"--reward weights are all 0 ({', '.join(args.reward or [])}); give at least one reward a "
                        f"non-zero weight, e.g. --reward shapes_partial=1")
    from flowalign.evaluate import parse_component_args
    from flowalign.models import resolve as resolve_model
    from flowalign.rewards.catalog import build_reward_checked
    from flowalign.rewards.video import for_outputs

    from flowalign.evaluate import guidance_with_model_args, model_args_jsonable

    reward_kwargs, per_frame, model_kwargs = parse_component_args(args, list(weights))
    args.guidance = guidance_with_model_args(args.guidance, model_kwargs)  # one scale, or a one-line refusal
    outputs = getattr(resolve_model(args.model), "output_kind", "image")
    records = D.load_prompts(args.prompts)
    # built before the model loads: a reward that cannot be built (remote without its url, a missing weights path)
    # or a video reward for an image model is one line, not a traceback after the load; an image reward on a video
    # model scores its frames (PerFrame), as in train and eval
    rewards = {k: for_outputs(build_reward_checked(k, reward_kwargs[k], f"--reward-arg: reward {k!r}"), outputs,
                              per_frame) for k in weights}
    kw = {**model_kwargs, **({} if args.guidance is None else {"guidance_scale": args.guidance})}
    model = load_model(args.model, args.path, device=args.device, **kw)
    texts = list(dict.fromkeys(r.prompt for r in records))
    # prompts are drawn at random per iteration: check them all here, not mid-run (as train and eval do)
    for obj in [model, *rewards.values()]:
        check = getattr(obj, "validate_prompts", None)
        if check is not None:
            check(texts)
    sigmas = model.schedule(args.steps).to(args.device)
    n_groups = args.n // args.group_size
    prompt_gen = torch.Generator().manual_seed(args.seed)

    def make_batch(it: int):
        idx = torch.randint(len(records), (n_groups,), generator=prompt_gen).tolist()
        prompts = [records[i].prompt for i in idx]
        cond = model.encode(prompts)
        cond_index = torch.arange(n_groups, device=args.device).repeat_interleave(args.group_size)
        # offset by 2**31: calibrate_noise seeds the SDE noise with seed·1000003 + it, and at seed 0 an equal seed
        # made the first step's noise equal to the initial noise (the CPU generator keeps only the low 32 bits)
        noise = model.init_noise(args.n, torch.Generator().manual_seed((1 << 31) + args.seed * 7919 + it))
        make_batch.prompts = prompts
        return noise.to(args.device), cond, cond_index

    def score(latents: Tensor, rows: Tensor) -> dict[str, Tensor]:
        images = model.decode(latents)
        ps = [make_batch.prompts[int(r) // args.group_size] for r in rows]
        return {k: r(images, ps).float() for k, r in rewards.items()}

    psi0 = initial_psi(sigmas, args.init_a)
    psi, history = calibrate_noise(make_batch, model.velocity, sigmas, score, weights, psi0=psi0,
                                   iterations=args.iterations, eps1=args.eps1, eps2=args.eps2, seed=args.seed,
                                   probe=args.probe, max_batch=args.max_batch, progress=True)
    guidance = getattr(model, "guidance_scale", None)  # the CFG scale the rollouts used (--guidance or the model's)
    out = {"kernel": "dance_sde", "eta": [round(float(p), 6) for p in psi], "sigmas": sigmas.cpu().tolist(),
           "initial_eta": psi0.tolist(), "init_a": args.init_a, "model": args.model, "path": args.path,
           "guidance": None if guidance is None else float(guidance), "steps": args.steps, "prompts": args.prompts,
           "seed": args.seed, "rewards": weights,
           **({"model_args": model_args_jsonable(model_kwargs)} if model_kwargs else {}),
           **({"reward_args": reward_kwargs} if any(reward_kwargs.values()) else {}),
           **({"per_frame": per_frame} if per_frame and outputs == "video" else {}),
           "n": args.n, "group_size": args.group_size, "iterations": args.iterations,
           "eps1": args.eps1, "eps2": args.eps2, "probe": args.probe, "history": history,
           "final_imbalance": history[-1]["imbalance"] if history else None}
    atomic_write_json(args.out, out)
    logger.info("calibrated ψ written to %s: %s", args.out, out["eta"])
    print(f"calibrated eta (dance_sde, T={args.steps}): {out['eta']}\nwritten to {args.out}")  # noqa: T201 (CLI)
    return 0
