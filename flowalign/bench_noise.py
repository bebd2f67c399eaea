"""``flowalign bench noise-variance``: which steps' SDE noise decides the reward.

GRPO can only credit what the rollout noise changes. This benchmark rolls out P prompts × K initial noises ×
M members per initial noise, where the M members share their initial noise x_1 and differ only in the SDE
noise ξ_t of the steps inside a window (Euler everywhere else), and splits the reward variance
(law of total variance, per prompt):

    Var_prompt[r] = E_k[ Var_m[r | x_1 = k] ] + Var_k[ E_m[r | x_1 = k] ]
                    └── within-x_1: the window's noise ──┘   └── between initial noises ──┘

The within-x_1 share is the part of a group's reward spread that the window's transitions — the only ones a
GRPO update can credit — can account for. Comparing windows (all stochastic steps, single steps, early vs late)
shows where the reward is decided under a kernel and noise level. Members of a window are seeded identically
across windows, so the windows differ only in where the noise goes.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Sequence

import torch
from torch import Tensor

from flowalign.config import MAX_STEPS
from flowalign.errors import CommandParser, UserError


def variance_split(r: Tensor) -> dict[str, float]:
    """Split rewards ``r`` [P, K, M] (prompt, initial noise, member) into within- and between-x_1 variance.

    Population (ddof 0) variances averaged over prompts, so ``within + between == total`` exactly:
    total = mean_p Var_{k,m} r, within = mean_{p,k} Var_m r, between = mean_p Var_k mean_m r.
    ``spread`` is the fraction of (prompt, x_1) cells whose M members do not all get the same reward.
    """
    if r.dim() != 3 or r.shape[2] < 2:
        raise ValueError(f"rewards must be [P, K, M] with M >= 2, got {tuple(r.shape)}")
    r = r.double()
    total = r.flatten(1).var(1, unbiased=False).mean()  # mean over prompts of Var over (k, m)
    within = r.var(2, unbiased=False).mean()  # mean over (p, k) of Var over m
    between = r.mean(2).var(1, unbiased=False).mean()  # mean over p of Var over k of the cell means
    spread = (r.amax(2) > r.amin(2)).double().mean()
    return {"mean": float(r.mean()), "total": float(total), "within": float(within), "between": float(between),
            "within_share": float(within / total) if total > 0 else float("nan"), "spread": float(spread)}


def step_std(kernel: str, sigma: Tensor, sigma_next: Tensor, eta: Tensor) -> Tensor:
    """The kernel's per-coordinate noise std s_t of the step σ → σ' (it does not depend on x or v)."""
    from flowalign.samplers.kernels import get_kernel

    zero = torch.zeros(1, 1)
    return get_kernel(kernel)(zero, zero, sigma, sigma_next, eta).std.reshape(-1)[0]


def default_windows(steps: int) -> str:
    """The default ``--windows`` for T = ``steps``: every stochastic step, the trainer's first F = ⌊0.6·T⌋ (the
    shapes config's ``sampler.train_fraction``) and the rest, the first three steps alone, and 3..F; windows that
    do not fit T (HI <= T − 1) are left out, so any ``--steps`` works without the flag."""
    f = min(max(1, math.floor(0.6 * steps + 1e-9)), steps - 1)
    cands = [(0, steps - 1), (0, f), (f, steps - 1), (0, 1), (1, 2), (2, 3), (3, f)]
    keep = dict.fromkeys((lo, hi) for lo, hi in cands if 0 <= lo < hi <= steps - 1)
    return ";".join(f"{lo},{hi}" for lo, hi in keep)


def _parse_windows(spec: str, steps: int) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        try:
            lo, hi = (int(v) for v in part.split(","))
        except ValueError:
            raise UserError(f"--windows: {part!r} is not LO,HI (two integers); e.g. --windows '0,9;0,1;6,9'") from None
        if not 0 <= lo < hi <= steps - 1:
            raise UserError(f"--windows: {lo},{hi} must satisfy 0 <= LO < HI <= T-1 = {steps - 1} "
                            "(the last step is always Euler)")
        out.append((lo, hi))
    if not out:
        raise UserError("--windows is empty; give at least one LO,HI, e.g. --windows '0,9'")
    return out


def bench_noise_variance(argv: Sequence[str]) -> None:
    """Print, per SDE window, how much of the reward's within-prompt variance the window's noise explains."""
    from tqdm.auto import tqdm

    from flowalign.bench_credit import _shapes_prompts
    from flowalign.bench_snr import SDE_KERNELS, add_common_args, check_common
    from flowalign.models import load_model
    from flowalign.rewards import build_reward
    from flowalign.rewards.video import for_outputs
    from flowalign.sample import check_guidance
    from flowalign.samplers.loop import eta_schedule, sample

    ap = CommandParser(prog="flowalign bench noise-variance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reward", default="shapes_partial", help="reward to score (e.g. shapes_partial, saturation)")
    ap.add_argument("--kernel", default="flow_sde", choices=SDE_KERNELS, help="SDE kernel")
    ap.add_argument("--eta", type=float, default=0.7, help="kernel noise level")
    ap.add_argument("--steps", type=int, default=10, help="rollout steps T")
    ap.add_argument("--windows", default=None,
                    help="';'-separated LO,HI: SDE noise only on steps LO..HI-1 (Euler elsewhere); default, with F = "
                         "floor(0.6 T) the trainer's trained steps: all, the first F, the rest, steps 0, 1 and 2 alone, "
                         "and 3..F (at T = 10: '0,9;0,6;6,9;0,1;1,2;2,3;3,6')")
    ap.add_argument("--prompts", type=int, default=16, help="shapes prompts (round-robin over the grammar's tasks)")
    ap.add_argument("--inits", type=int, default=4, help="initial noises per prompt (K)")
    ap.add_argument("--members", type=int, default=8, help="rollouts per initial noise (M), differing in step noise")
    ap.add_argument("--guidance", type=float, default=4.0, help="CFG scale of the rollouts")
    add_common_args(ap)
    args = ap.parse_args(list(argv))
    if not 2 <= args.steps <= MAX_STEPS:
        raise UserError(f"--steps={args.steps} must be between 2 and {MAX_STEPS}")
    windows = _parse_windows(default_windows(args.steps) if args.windows is None else args.windows, args.steps)
    if args.prompts < 1 or args.inits < 1 or args.members < 2:
        raise UserError("noise-variance needs --prompts >= 1, --inits >= 1 and --members >= 2")
    if not (math.isfinite(args.eta) and args.eta > 0):  # NaN/inf noise gave a NaN table with exit code 0
        raise UserError(f"--eta={args.eta} must be a finite number > 0 (at 0 every member is the same ODE sample)")
    check_guidance(args.guidance)
    check_common(args)
    if args.threads is not None:  # else torch's own (OMP_NUM_THREADS where set)
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    # an unknown name, or a video reward for this image model, fails before the model loads (as train and eval do)
    reward = for_outputs(build_reward(args.reward), "image")
    model = load_model("shapes", args.shapes_path, guidance_scale=args.guidance)
    prompts = _shapes_prompts(args.prompts, seed=3)
    P, K, M = len(prompts), args.inits, args.members
    cond_index = torch.arange(P).repeat_interleave(K * M)  # [B]
    group = torch.arange(P * K).repeat_interleave(M)  # [B] one group per (prompt, x_1)
    sigmas = model.schedule(args.steps)
    with torch.no_grad():
        cond = model.encode(prompts)
        x1 = model.init_noise(P * K, torch.Generator().manual_seed(args.seed))  # [P·K, *latent]
        noise = x1.repeat_interleave(M, 0)  # [B, *latent] members share x_1
    texts = [prompts[int(i)] for i in cond_index]
    rows: list[dict[str, Any]] = []
    print(f"noise-variance: {P} prompts × {K} initial noises × {M} members = {P * K * M} rollouts per window, "  # noqa: T201
          f"{args.kernel} a={args.eta:g}, T={args.steps}, sigmas {[round(float(s), 3) for s in sigmas[:-1]]}, "
          f"reward {args.reward}")
    print(f"{'window':<14}{'std of noise':>22}{'mean':>8}{'Var total':>11}{'within x_1':>12}"  # noqa: T201
          f"{'share':>7}{'cells with spread':>19}")
    for lo, hi in tqdm(windows, desc="windows", unit="window"):
        eta = eta_schedule(args.steps, args.eta, window=(lo, hi - lo))  # [T]
        with torch.no_grad():
            traj = sample(model.velocity, noise, sigmas, cond, eta=eta, kernel=args.kernel,
                          generator=torch.Generator().manual_seed(args.seed + 1), cond_index=cond_index, group=group,
                          prompts=texts)
            r = reward(model.decode(traj.final), texts).float().cpu().view(P, K, M)  # [P, K, M]
        stats = variance_split(r)
        stds = [round(float(step_std(args.kernel, sigmas[t], sigmas[t + 1], eta[t])), 3) for t in range(lo, hi)]
        rows.append({"window": [lo, hi], "step_std": stds, **{k: round(v, 5) for k, v in stats.items()}})
        std_txt = ",".join(f"{s:.2f}" for s in stds[:4]) + ("…" if len(stds) > 4 else "")
        print(f"steps {lo}..{hi - 1:<6}{std_txt:>22}{stats['mean']:>8.3f}{stats['total']:>11.4f}"  # noqa: T201
              f"{stats['within']:>12.4f}{stats['within_share']:>7.2f}{stats['spread']:>19.2f}")
    wall = time.perf_counter() - t_start
    print(f"wall time {wall:.0f}s")  # noqa: T201
    if args.json:
        from flowalign.io import atomic_write_json

        atomic_write_json(args.json, {"prompts": P, "inits": K, "members": M, "kernel": args.kernel, "eta": args.eta,
                                      "steps": args.steps, "reward": args.reward, "seed": args.seed,
                                      "guidance": args.guidance, "path": args.shapes_path or None, "windows": rows,
                                      "wall_s": round(wall, 1)})
    sys.stdout.flush()
