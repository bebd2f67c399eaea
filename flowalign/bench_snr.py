"""``flowalign bench grad-snr``: how much signal one GRPO gradient estimate carries, per credit method.

A split-half test at the start of training (θ = the base with its LoRA at the zero init):

1. Roll out P prompts × K groups × G members once with the training kernel, score them, and compute every
   per-(rollout, step) gradient ∇_θ log p_θ(x_{t+1} | x_t) of the LoRA parameters (``per_step_grads``).
2. For each credit method, its advantages A[i, t] (the trainer's ``assign_credit`` on the same rollouts, the
   process-reward core probing them) turn those into the on-policy GRPO gradient of a set H of rollouts,
   ĝ_H = (1/|H|)·Σ_{i∈H, t trained} A[i, t]·∇log p[i, t] (the first optimizer step of an iteration, ratio 1).
3. Two disjoint halves of whole groups give two independent estimates; their cosine c has expectation
   ≈ S / (S + V/n) for n rollouts per half (S = ‖E ĝ‖², V = the per-rollout variance trace), so
   n·(1 − c)/c estimates the rollouts per update at which signal and noise are equal (c = 0.5).

c near 0 means an update is almost all noise; comparing methods on the same rollouts shows which credit
assigner extracts more signal per rollout (their cost per rollout is ``flowalign bench credit``). The
spread over splits reuses one set of rollouts, so it understates the uncertainty: rerun with ``--seed``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from flowalign.config import check_max_steps
from flowalign.errors import CommandParser, UserError

SDE_KERNELS = ("flow_sde", "dance_sde", "cps", "ddim_sde")  # the stochastic kernels of flowalign.samplers.kernels

# the chain-plan methods of `bench credit` (credit assigner + options); the kernel is shared (--kernel)
CREDITS = ("flow_grpo", "dense_full", "dense_ode2", "dense_x0", "tp_full", "tp_ode2", "vgpo_x0", "euphonium_x0")


def per_step_grads(velocity, params: Sequence[torch.nn.Parameter], traj, steps: Sequence[int], *, kernel: str,
                   reduce: str = "mean", progress: bool = False) -> Tensor:
    """∇_θ log p_θ(x_{t+1} | x_t) for every rollout and listed step, flattened over ``params``: [len(steps), B, D].

    One backward per (rollout, step): the per-pair gradients must stay separate (memory: 4·len(steps)·B·D bytes).
    """
    from flowalign.samplers import gather_cond, step_log_prob

    d = sum(p.numel() for p in params)
    out = torch.zeros(len(steps), traj.batch_size, d)  # [S, B, D]
    sig = traj.sigmas
    from tqdm.auto import tqdm

    for i in tqdm(range(traj.batch_size), desc="per-step gradients", unit="rollout", disable=not progress):
        b = torch.tensor([i])
        cond = gather_cond(traj.cond, traj.cond_index[b])
        for h, t in enumerate(steps):
            tt = torch.tensor([t])
            for p in params:
                p.grad = None
            lp, _ = step_log_prob(velocity, traj.latents[b, tt], traj.latents[b, tt + 1], sig[tt], sig[tt + 1],
                                  traj.eta[tt], cond, kernel=kernel, reduce=reduce)  # [1]
            lp.sum().backward()
            out[h, i] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                                   for p in params])
    for p in params:
        p.grad = None
    return out


def group_halves(n_groups: int, group_size: int, splits: int, seed: int) -> Tensor:
    """Random splits of whole groups into two halves, as per-rollout weights 1/|half|: [splits, 2, n_groups·G].

    Both halves hold ⌊n_groups/2⌋ groups (with an odd count one random group sits out each split): the
    n(1 − c)/c reading of the cosine assumes two estimates of equal size n.
    """
    if n_groups < 2:
        raise ValueError("a split-half test needs at least 2 groups")
    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(splits, 2, n_groups * group_size)
    half = n_groups // 2
    for s in range(splits):
        perm = torch.randperm(n_groups, generator=gen)
        for k in range(2):
            rows = torch.cat([torch.arange(g * group_size, (g + 1) * group_size)
                              for g in perm[: 2 * half][k::2].tolist()])
            w[s, k, rows] = 1.0 / rows.numel()
    return w


def split_half_cosine(grads: Tensor, adv: Tensor, steps: Sequence[int], weights: Tensor,
                      select: Optional[Sequence[int]] = None) -> Tensor:
    """Cosine between the two halves' GRPO gradients ĝ = Σ_i w_i Σ_t A[i, t]·∇log p[i, t], per split: [splits].

    ``grads`` [S, B, D] from ``per_step_grads`` over ``steps``; ``adv`` [B, T]; ``select`` = the positions in
    ``steps`` to include (default all). NaN for a split where either half's gradient is exactly zero (e.g. all
    its advantages are 0): the cosine is undefined there, not 0 (which would read as "pure noise").
    """
    sel = range(len(steps)) if select is None else select
    g = sum(torch.einsum("skb,bd->skd", weights * adv[:, steps[h]].float(), grads[h]) for h in sel)  # [splits, 2, D]
    c = torch.nn.functional.cosine_similarity(g[:, 0], g[:, 1], dim=1)  # [splits]
    zero = (g[:, 0] == 0).all(1) | (g[:, 1] == 0).all(1)  # [splits]
    return torch.where(zero, torch.full_like(c, float("nan")), c)


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The options every shapes-world diagnostic bench shares (model path, threads, seed, JSON output, --overwrite)."""
    ap.add_argument("--shapes-path", "--path", dest="shapes_path", default="",
                    help="shapes model directory ('' = the shipped model; --path: the same, as sample names it)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own: OMP_NUM_THREADS where set, else the cores)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts' noise and of every random draw")
    add_output_args(ap)


JSON_HELP = "also write the figures to this JSON file (an existing file is refused unless --overwrite)"
OVERWRITE_HELP = "replace an existing --json file (the figures of an earlier run)"


def add_output_args(ap: argparse.ArgumentParser) -> None:
    """Every bench's ``--json PATH`` and ``--overwrite``: a bench's figures are a measurement that may have taken long,
    so an existing file is not replaced silently."""
    ap.add_argument("--json", default=None, help=JSON_HELP)
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def check_out_file(path: Optional[str], flag: str, overwrite: bool, example: str) -> None:
    """One-line ``UserError``, before the bench runs, when its output file ``path`` (given as ``flag``) names a
    directory, exists and ``overwrite`` is off, or cannot be written (under a file, an unwritable directory: the write
    would fail after the whole run)."""
    from pathlib import Path

    from flowalign.sample import check_out_parent

    if not path:
        return
    if Path(path).is_dir():
        raise UserError(f"{flag} {path!r} is a directory; pass the path of a {Path(example).suffix[1:].upper()} "
                        f"file, e.g. {Path(path) / example}")
    if Path(path).exists() and not overwrite:
        raise UserError(f"{flag} {path!r} exists already; pass --overwrite to replace it, or choose a new {flag}")
    check_out_parent(path, flag)


def check_json_out(path: Optional[str], overwrite: bool = False) -> None:
    """``check_out_file`` for ``--json``."""
    check_out_file(path, "--json", overwrite, "bench.json")


def check_common(args: argparse.Namespace, *, seed_min: Optional[int] = None) -> None:
    """One-line ``UserError`` for ``add_common_args``' ``--threads`` below 1 (was silently 1) and a ``--seed`` that
    the generators would refuse only after the model loaded (``seed_min=0`` where numpy draws from it), then
    ``check_json_out``."""
    from flowalign.sample import check_seed

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if seed_min is not None and not seed_min <= args.seed < (1 << 32):
        raise UserError(f"--seed must be between {seed_min} and 2**32 (exclusive), got {args.seed}")
    check_seed(args.seed)
    check_json_out(args.json, args.overwrite)


def bench_grad_snr(argv: Sequence[str]) -> None:
    """Print the split-half gradient cosine of each credit method on one set of shapes-world rollouts."""
    from flowalign.bench_credit import METHODS, _shapes_prompts
    from flowalign.config import CreditConfig
    from flowalign.credit import CreditInput, assign_credit, clipped_heads
    from flowalign.models import load_model
    from flowalign.rewards import build_reward
    from flowalign.rewards.video import for_outputs
    from flowalign.samplers.loop import eta_schedule, live_eta, sample
    from flowalign.values import make_probe

    ap = CommandParser(prog="flowalign bench grad-snr", description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="flow_grpo,dense_full,dense_ode2,dense_x0,tp_full,vgpo_x0",
                    help=f"comma list of: {', '.join(CREDITS)}")
    ap.add_argument("--reward", default="shapes_partial", help="reward to credit (e.g. shapes_partial, saturation)")
    ap.add_argument("--prompts", type=int, default=8, help="shapes prompts (round-robin over the grammar's tasks)")
    ap.add_argument("--groups-per-prompt", type=int, default=8, help="groups of G rollouts per prompt")
    ap.add_argument("--group-size", type=int, default=8, help="rollouts per group G")
    ap.add_argument("--steps", type=int, default=10, help="rollout steps T")
    ap.add_argument("--kernel", default="flow_sde", choices=SDE_KERNELS, help="SDE kernel shared by every method")
    ap.add_argument("--eta", type=float, default=0.7, help="kernel noise level")
    ap.add_argument("--train-fraction", type=float, default=0.6, help="train the first ⌊f·T⌋ stochastic steps")
    ap.add_argument("--window", default=None, metavar="LO,HI",
                    help="SDE (and train) only steps LO..HI-1, Euler elsewhere (sampler.window_*); overrides "
                         "--train-fraction")
    ap.add_argument("--init-noise", choices=("member", "group"), default="member",
                    help="one initial noise per rollout, or one per group (sampler.init_noise)")
    ap.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA whose gradients are measured (alpha = 2 x rank)")
    ap.add_argument("--adv-clip", type=float, default=CreditConfig().adv_clip, help="advantage clip A_max (credit.adv_clip)")
    ap.add_argument("--splits", type=int, default=40, help="random half splits of the groups")
    add_common_args(ap)
    args = ap.parse_args(list(argv))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in CREDITS]
    if bad:
        raise UserError(f"unknown grad-snr method(s) {bad}; choose from {', '.join(CREDITS)}")
    if not methods:  # was a table without rows, after the rollouts and gradients
        raise UserError(f"--methods {args.methods!r} names no method; choose from {', '.join(CREDITS)}")
    for flag, value in (("prompts", args.prompts), ("groups-per-prompt", args.groups_per_prompt)):
        if value < 1:  # two negative counts multiply to a positive number of groups
            raise UserError(f"--{flag} must be at least 1, got {value}")
    if args.prompts * args.groups_per_prompt < 2 or args.group_size < 2:
        raise UserError("grad-snr needs at least 2 groups (--prompts × --groups-per-prompt) of at least 2 rollouts")
    if not 0 < args.train_fraction < 1:
        raise UserError(f"--train-fraction={args.train_fraction} must be in (0, 1)")
    if not args.adv_clip > 0:  # NaN too: it clips every advantage to NaN
        raise UserError(f"--adv-clip={args.adv_clip} must be > 0")
    if not math.isfinite(args.eta):  # inf noise gives NaN rollouts and rewards, no error
        raise UserError(f"--eta must be a finite number, got {args.eta}")
    for flag, value in (("steps", args.steps), ("splits", args.splits), ("lora-rank", args.lora_rank)):
        if value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    check_max_steps(args.steps)
    check_common(args)
    window = None
    if args.window is not None:
        try:
            lo, hi = (int(v) for v in args.window.split(","))
        except ValueError:
            raise UserError(f"--window={args.window!r} must be two integers LO,HI, e.g. --window 2,8") from None
        if not 0 <= lo < hi <= args.steps - 1:
            raise UserError(f"--window={args.window} must satisfy 0 <= LO < HI <= T-1 = {args.steps - 1}")
        window = (lo, hi - lo)
    adv_clip = args.adv_clip
    eta = eta_schedule(args.steps, args.eta, window=window)  # [T]
    n_train = args.steps - 1 if window else min(int(math.floor(args.train_fraction * args.steps + 1e-9)), args.steps - 1)
    steps = [t for t in range(n_train) if float(eta[t]) > 0]
    if not steps:
        raise UserError(f"no stochastic step is trained (--steps={args.steps}, --train-fraction={args.train_fraction}, "
                        f"--eta={args.eta:g}); raise --eta, --steps or --train-fraction")
    # the kernel's noiseless steps on the unshifted grid, before the model loads: a shift moves only interior σ, and a
    # kernel's std vanishes at the grid's ends (ddim_sde at σ = 1); the model's own grid is checked again below
    if not [t for t in steps if float(live_eta(args.kernel, torch.linspace(1.0, 0.0, args.steps + 1), eta)[t]) > 0]:
        raise UserError(f"no trained step has noise: --kernel {args.kernel} draws none at σ = 1 (step 0); widen --window "
                        "or raise --train-fraction")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    # an unknown name, or a video reward for this image model, fails before the model loads (as train and eval do)
    reward = for_outputs(build_reward(args.reward), "image")
    model = load_model("shapes", args.shapes_path)
    eta = live_eta(args.kernel, model.schedule(args.steps), eta)  # as the trainer: a zero-std step (ddim_sde's σ = 1) is Euler
    steps = [t for t in steps if float(eta[t]) > 0]
    if not steps:
        raise UserError(f"no trained step has noise: --kernel {args.kernel} draws none at σ = 1 (step 0); widen --window "
                        "or raise --train-fraction")
    torch.manual_seed(args.seed)
    params = model.add_lora(args.lora_rank, 2 * args.lora_rank)
    prompts = _shapes_prompts(args.prompts, seed=3)
    per_prompt = args.groups_per_prompt * args.group_size
    cond_index = torch.arange(len(prompts)).repeat_interleave(per_prompt)  # [B]
    group = torch.arange(cond_index.numel()) // args.group_size  # [B] consecutive members form a group
    with torch.no_grad():
        cond = model.encode(prompts)
        gen = torch.Generator().manual_seed(args.seed)
        noise = (model.init_noise(cond_index.numel(), gen) if args.init_noise == "member" else
                 model.init_noise(int(group.max()) + 1, gen).repeat_interleave(args.group_size, 0))  # [B, *latent]
        traj = sample(model.velocity, noise, model.schedule(args.steps), cond, eta=eta, kernel=args.kernel,
                      generator=torch.Generator().manual_seed(args.seed + 1), cond_index=cond_index, group=group,
                      keep_velocities=True, prompts=prompts)

    def score(latents: Tensor, rows: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            return {args.reward: reward(model.decode(latents),
                                        [prompts[int(traj.cond_index[int(r)])] for r in rows]).float().cpu()}

    term = score(traj.final, torch.arange(traj.batch_size))
    t_roll = time.perf_counter()
    grads = per_step_grads(model.velocity, params, traj, steps, kernel=args.kernel, progress=True)  # [S, B, D]
    t_grad = time.perf_counter()
    weights = group_halves(len(prompts) * args.groups_per_prompt, args.group_size, args.splits, args.seed)
    probe = make_probe(model.velocity, traj, score, terminal=term)
    trained = torch.zeros(traj.batch_size, args.steps, dtype=torch.bool)
    trained[:, steps] = True
    n_half = (len(prompts) * args.groups_per_prompt // 2) * args.group_size  # rollouts per half (group_halves)
    print(f"grad-snr: {len(prompts)} prompts × {args.groups_per_prompt} groups × G={args.group_size} "  # noqa: T201
          f"= {traj.batch_size} rollouts ({n_half} per half), {args.kernel} a={args.eta:g}, T={args.steps}, "
          f"initial noise per {args.init_noise}, "
          f"trained steps {steps}, reward {args.reward} (mean {float(term[args.reward].nanmean()):.3f}), "
          f"{grads.shape[-1]} LoRA parameters; rollout {t_roll - t_start:.0f}s, gradients {t_grad - t_roll:.0f}s")
    print(f"{'method':<14}{'cos':>7}{'± split':>9}{'n for c=0.5':>13}   per trained step")  # noqa: T201
    results: dict[str, Any] = {"rollouts": traj.batch_size, "per_half": n_half, "steps": steps,
                               "reward": args.reward, "reward_mean": float(term[args.reward].nanmean()), "methods": {}}
    for m in methods:
        _plan, _kernel, _eta, credit, opts, _p = METHODS[m]
        out = assign_credit(credit, CreditInput(traj=traj, rewards=term, reward_weights={args.reward: 1.0},
                                                trained=trained, probe=probe, adv_clip=adv_clip), opts)
        # at ratio 1 the clipped terms of all heads (main + e.g. Euphonium's process head) add up
        adv = sum(clipped_heads(out, trained, adv_clip).values())  # [B, T]
        c = split_half_cosine(grads, adv, steps, weights)  # [splits]; NaN where a half has no gradient
        c = c[torch.isfinite(c)]
        mean = float(c.mean()) if c.numel() else float("nan")  # NaN: the advantages give no gradient at all
        spread = float(c.std()) if c.numel() > 1 else 0.0
        need = n_half * (1 - mean) / mean if mean > 0 else float("inf")
        per = [float(split_half_cosine(grads, adv, steps, weights, [h]).nanmean()) for h in range(len(steps))]
        results["methods"][m] = {"cos": round(mean, 4), "split_std": round(spread, 4),
                                 "rollouts_for_c_half": None if math.isinf(need) else round(need),
                                 "per_step": [round(v, 3) for v in per]}
        need_txt = (("no gradient" if bool((adv == 0).all()) else "undefined") if math.isnan(mean) else
                    "≥ ∞" if math.isinf(need) else f"{need:,.0f}")
        print(f"{m:<14}{mean:>+7.3f}{spread:>9.3f}{need_txt:>13}   "  # noqa: T201
              + " ".join(f"t{t}:{v:+.2f}" for t, v in zip(steps, per)))
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    if args.json:
        from flowalign.io import atomic_write_json

        atomic_write_json(args.json, results)
    sys.stdout.flush()
