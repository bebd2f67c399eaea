"""The sampling loop, branching, and re-scoring of stored transitions (METHODS.md §2, DESIGN.md §1).

One loop serves ODE sampling, full SDE and windowed SDE: the per-step η tensor decides which steps are
stochastic (η_t > 0) and carry a log-probability. The loop draws ξ; kernels only return Gaussians.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from flowalign.samplers.kernels import gaussian_log_prob, get_kernel
from flowalign.types import Cond, Trajectory, Transition, VelocityFn


def gather_cond(cond: Cond, index: Tensor) -> Cond:
    """Rows of a per-prompt Cond for each sample (``index`` [B] into dim 0 of every tensor)."""
    return {k: v.index_select(0, index.to(v.device)) for k, v in cond.items()}


def eta_schedule(steps: int, eta: float | Tensor = 0.0, *, window: Optional[tuple[int, int]] = None,
                 last_step_noise: bool = False) -> Tensor:
    """Per-step noise scale η [T].

    A float gives η on every step; ``window=(t0, n)`` keeps η only on steps t0 … t0+n−1 (Flow-GRPO-Fast /
    MixGRPO windows, METHODS.md §2.6) and 0 (Euler) elsewhere. The last step is deterministic unless
    ``last_step_noise`` (quirk Q1: Flow-GRPO's noisy last step is never trained).
    """
    if isinstance(eta, Tensor) and eta.dim() == 1:
        if eta.shape[0] != steps:
            raise ValueError(f"eta has {eta.shape[0]} entries, expected one per step ({steps})")
        out = eta.detach().to(torch.float32).clone()  # [T]
    else:
        out = torch.full((steps,), float(eta), dtype=torch.float32)  # [T]
    if window is not None:
        t0, n = window
        if n == 0:  # METHODS.md §2.6: n = 0 is the window [0, T−1), every step but the last
            t0, n = 0, steps - 1
        mask = torch.zeros(steps, dtype=torch.bool, device=out.device)
        mask[t0:t0 + n] = True
        out = torch.where(mask, out, torch.zeros_like(out))
    if not last_step_noise:
        out[-1] = 0.0
    return out


def live_eta(kernel, sigmas: Tensor, eta: Tensor, **kernel_kwargs) -> Tensor:
    """``eta`` [T] or [B, T] with η set to 0 on the steps where the kernel's std is 0 at η > 0 (``ddim_sde`` at σ = 1,
    a step whose density is undefined, METHODS.md §2.5): such a step draws no noise, so it is an ODE step — sampled
    as Euler, never trained, skipped by value probes. Other steps are unchanged."""
    kern = get_kernel(kernel)
    steps = int(sigmas.shape[0]) - 1
    sig = sigmas.detach().to(torch.float32).cpu()  # [T+1]
    probe = torch.zeros(steps, 1)  # the std depends on (σ, σ', η) only
    unit = kern(probe, probe, sig[:-1], sig[1:], torch.ones(steps), **kernel_kwargs).std  # [T] or [T, 1]
    dead = torch.as_tensor(unit).reshape(-1).expand(steps) == 0  # [T] a structural zero (each kernel's std is 0 at one η > 0 iff at all)
    if not bool(dead.any()):
        return eta
    return torch.where(dead.to(eta.device), torch.zeros_like(eta), eta)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, iteration, group, member, ...), FNV-1a style: the same parts give the same
    seed on every machine and for any world size, so one generator per (group, member, state, ...) draws noise that
    does not depend on how rows are batched."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


Generators = Optional[torch.Generator | Sequence[torch.Generator]]
"""What draws the step noise: None (the global RNG), one generator, or one generator per group (``_noise_like``)."""


def draw_rows(draw: Callable[..., Tensor], shape: Sequence[int], generator: Generators, *,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              active: Optional[Tensor] = None) -> Tensor:
    """``draw`` (torch.randn or torch.rand) of ``shape`` [N, ...] on ``device``. With a sequence of P generators (one
    per group), the N rows are P equal contiguous blocks and each block is drawn from its own generator, so a
    group's draws do not depend on which groups share the batch or the process.

    ``active`` [N] bool (only with a sequence of generators): a block none of whose rows is active draws nothing
    and gets zeros, so its generator advances only on the draws that block itself uses (per-row SDE windows: a
    group's noise does not depend on the other groups' windows)."""
    if generator is None:
        return draw(tuple(shape), dtype=dtype, device=device)
    if isinstance(generator, torch.Generator):
        return draw(tuple(shape), dtype=dtype, device=generator.device, generator=generator).to(device)
    gens = list(generator)
    if not gens or shape[0] % len(gens):
        raise ValueError(f"{len(gens)} per-group generators for {shape[0]} rows: the rows must split into equal "
                         "contiguous blocks, one per generator")
    k = shape[0] // len(gens)
    used = [True] * len(gens) if active is None else active.reshape(len(gens), k).any(1).tolist()  # [P]
    parts = [draw((k, *shape[1:]), dtype=dtype, generator=g, device=g.device).to(device) if on
             else torch.zeros((k, *shape[1:]), dtype=dtype, device=device) for g, on in zip(gens, used)]
    return torch.cat(parts)  # [P·k, ...]


def _noise_like(x: Tensor, generator: Generators, active: Optional[Tensor] = None) -> Tensor:
    """Standard normal noise like ``x`` [N, *latent] (``draw_rows``; ``active`` [N]: rows that use it)."""
    return draw_rows(torch.randn, x.shape, generator, dtype=x.dtype, device=x.device, active=active)


def _step(kernel, velocity: VelocityFn, x: Tensor, sig: Tensor, sig_next: Tensor, eta_t: Tensor, cond_b: Cond,
          **kernel_kwargs) -> tuple[Tensor, Transition]:
    b = x.shape[0]
    v = velocity(x, sig.expand(b), cond_b)  # [B, *latent]
    return v, kernel(x, v, sig, sig_next, eta_t, **kernel_kwargs)


def _stack_steps(items: list, x: Tensor) -> Tensor:
    # T = 0 (a zero-step sub-grid, e.g. ``branch`` at step 0 or T−1) stacks nothing: [B, 0, *latent], not an error
    return torch.stack(items, dim=1) if items else x.new_zeros((x.shape[0], 0, *x.shape[1:]), dtype=torch.float32)


def sample(velocity: VelocityFn, x: Tensor, sigmas: Tensor, cond: Cond, *, eta: float | Tensor = 0.0,
           kernel="flow_sde", generator: Generators = None, cond_index: Optional[Tensor] = None,
           group: Optional[Tensor] = None, prompts: Sequence[str] = (), keep_velocities: bool = False,
           keep_means: bool = False, reduce: str = "mean", logp_form: str = "exact",
           mean_shift: Optional[Callable[..., Optional[Tensor]]] = None, logprob_under: str = "unguided",
           **kernel_kwargs) -> Trajectory:
    """Sample a batch of chains x_0 → x_T and record per-step log-probabilities.

    Args:
        velocity: ``v(x [B,*latent], σ [B], cond_b) -> [B,*latent]`` (CFG inside).
        x: initial noise [B, *latent].
        sigmas: the grid [T+1], 1 → 0.
        cond: per-prompt conditioning (dim 0 = prompts); ``cond_index`` [B] maps samples to rows
            (default: one row per sample).
        eta: a float for every step, a per-step tensor [T], or a per-row tensor [B, T] (rows with different
            SDE windows, Flow-GRPO-Fast's per-group window, METHODS.md §2.6; 0 ⇒ an exact Euler step for that
            row, no log-prob). With [B, T] rows that differ, ``traj.eta`` [T] holds the largest η of each step
            and ``extras["eta_rows"]`` [B, T] the rows' own (``flowalign.values.row_eta``); identical rows are
            sampled exactly as their shared [T] row.
        kernel: a registry name or a kernel function.
        generator: draws the step noise ξ (reproducible given its state); a sequence of P generators draws each
            of P equal contiguous row blocks (groups) from its own.
        reduce / logp_form: how the stored log-prob is reduced and which form (``gaussian_log_prob``).
        mean_shift: optional guidance hook ``mean_shift(x_t, v_t, σ_t, σ_{t+1}, t, cond_b) -> shift | None``;
            the sample is drawn from N(μ_t + shift, s_t²) (Euphonium's guided SDE, METHODS.md §4.5) while the
            stored log-prob (and ``means``) use the unguided μ_t unless ``logprob_under="guided"``.
            None (default) leaves sampling untouched. Steps it shifted are listed in ``extras["shifted"]`` [T]
            (a shifted η = 0 step is not an ODE step: value probes must not skip it).
    """
    if logprob_under not in ("unguided", "guided"):
        raise ValueError(f"logprob_under must be 'unguided' or 'guided', got {logprob_under!r}")
    kern = get_kernel(kernel)
    steps = int(sigmas.shape[0]) - 1
    b = x.shape[0]
    dev = x.device
    eta_rows = None  # [B, T] when rows have their own η (per-group windows)
    if isinstance(eta, Tensor) and eta.dim() == 2:
        if tuple(eta.shape) != (b, steps):
            raise ValueError(f"per-row eta has shape {tuple(eta.shape)}, expected (rows, steps) = ({b}, {steps})")
        eta_rows = eta.detach().to(device=dev, dtype=torch.float32)  # [B, T]
        if bool((eta_rows == eta_rows[:1]).all()):
            eta, eta_rows = eta_rows[0], None  # one shared row: the [T] path, bit for bit
        else:
            eta = eta_rows.amax(0)  # [T] the largest η of each step
    eta_t = eta if isinstance(eta, Tensor) and eta.dim() == 1 else torch.full((steps,), float(eta))
    if eta_t.shape[0] != steps:
        raise ValueError(f"eta has {eta_t.shape[0]} entries, expected one per step ({steps})")
    eta_t = eta_t.to(torch.float32)  # [T]
    eta_host = eta_t.tolist()  # one host read for the whole loop, not one per step
    if cond_index is None:
        cond_index = torch.arange(b, device=dev)
    if group is None:
        group = cond_index.clone()
    cond_b = gather_cond(cond, cond_index)
    sig = sigmas.to(device=dev, dtype=torch.float32)  # [T+1]
    x = x.to(torch.float32)  # latents stay fp32 for the whole loop
    latents = [x]
    logps = torch.zeros(b, steps, dtype=torch.float32, device=dev)  # [B, T]
    vels, means = [], []
    shifted = torch.zeros(steps, dtype=torch.bool)  # [T] steps whose mean the hook moved
    with torch.no_grad():
        for t in range(steps):
            eta_step = eta_t[t].to(dev) if eta_rows is None else eta_rows[:, t]  # [] or [B]
            v, tr = _step(kern, velocity, x, sig[t], sig[t + 1], eta_step, cond_b, **kernel_kwargs)
            center = tr.mean  # [B, *latent]
            if mean_shift is not None:
                shift = mean_shift(x, v, sig[t], sig[t + 1], t, cond_b)
                if shift is not None:
                    center = tr.mean + shift.to(tr.mean.dtype)  # guided mean μ^g
                    shifted[t] = True
            if eta_host[t] > 0:  # rows with η = 0 here have s = 0: x_next = their Euler mean, log-prob 0
                # with per-row η, a group's generator draws only at its own stochastic steps (alone = batched)
                active = None if eta_rows is None else (eta_rows[:, t] > 0).cpu()  # [B]
                x_next = center + tr.std * _noise_like(center, generator, active)  # [B, *latent]
                logps[:, t] = gaussian_log_prob(x_next, center if logprob_under == "guided" else tr.mean, tr.std,
                                                reduce=reduce, form=logp_form)
            else:
                x_next = center
            if keep_velocities:
                vels.append(v.to(torch.float32))
            if keep_means:
                means.append(tr.mean)
            latents.append(x_next)
            x = x_next
    return Trajectory(
        latents=torch.stack(latents, dim=1),  # [B, T+1, *latent]
        sigmas=sig,
        eta=eta_t.to(dev),
        log_probs=logps,
        cond=cond,
        cond_index=cond_index,
        group=group,
        prompts=tuple(prompts),
        velocities=_stack_steps(vels, x) if keep_velocities else None,  # [B, T, *latent]
        means=_stack_steps(means, x) if keep_means else None,  # [B, T, *latent]
        extras={**({"shifted": shifted} if bool(shifted.any()) else {}),
                **({"eta_rows": eta_rows} if eta_rows is not None else {})},
    )


def branch(velocity: VelocityFn, x: Tensor, sigmas: Tensor, cond: Cond, *, step: int, children: int, eta: float,
           kernel="flow_sde", generator: Generators = None, cond_index: Optional[Tensor] = None,
           group: Optional[Tensor] = None, prompts: Sequence[str] = (), keep_velocities: bool = False,
           reduce: str = "mean", logp_form: str = "exact", **kernel_kwargs) -> Trajectory:
    """ODE prefix, K stochastic children at ``step``, ODE completion (TempFlow-GRPO; METHODS.md §2.7).

    Each of the B trunks is integrated with Euler up to ``x_step`` (computed once per trunk), then K
    children share μ_step and s_step and get independent noise; each child is ODE-completed on the
    remaining grid. Returns B·K chains ordered trunk-major (children of trunk i are rows i·K … i·K+K−1);
    only ``step`` carries a log-probability. ``extras["parent"]`` [B·K] holds each child's trunk index.
    """
    steps = int(sigmas.shape[0]) - 1
    if not 0 <= step < steps:
        raise ValueError(f"branch step {step} outside 0..{steps - 1}")
    kern = get_kernel(kernel)
    b = x.shape[0]
    dev = x.device
    if cond_index is None:
        cond_index = torch.arange(b, device=dev)
    if group is None:
        group = cond_index.clone()
    eta_vec = torch.zeros(steps, dtype=torch.float32)
    eta_vec[step] = float(eta)
    prefix = sample(velocity, x, sigmas[: step + 1], cond, eta=0.0, kernel="euler", cond_index=cond_index,
                    keep_velocities=keep_velocities)
    x_k = prefix.latents[:, -1]  # [B, *latent]
    sig = sigmas.to(device=dev, dtype=torch.float32)
    with torch.no_grad():
        v_k, tr = _step(kern, velocity, x_k, sig[step], sig[step + 1], torch.tensor(float(eta), device=dev),
                        gather_cond(cond, cond_index), **kernel_kwargs)
    rep = torch.arange(b, device=dev).repeat_interleave(children)  # [B·K]
    mean = tr.mean.index_select(0, rep)
    std = tr.std.index_select(0, rep) if tr.std.dim() > 0 else tr.std
    x_next = mean + std * _noise_like(mean, generator)  # [B·K, *latent]
    lp = gaussian_log_prob(x_next, mean, std, reduce=reduce, form=logp_form)  # [B·K]
    suffix = sample(velocity, x_next, sigmas[step + 1:], cond, eta=0.0, kernel="euler",
                    cond_index=cond_index.index_select(0, rep), keep_velocities=keep_velocities)
    latents = torch.cat([prefix.latents.index_select(0, rep), suffix.latents], dim=1)  # [B·K, T+1, *latent]
    logps = torch.zeros(b * children, steps, dtype=torch.float32, device=dev)
    logps[:, step] = lp
    vels = None
    if keep_velocities:
        vels = torch.cat([prefix.velocities.index_select(0, rep), v_k.to(torch.float32).index_select(0, rep)[:, None],
                          suffix.velocities], dim=1)  # [B·K, T, *latent]
    return Trajectory(latents=latents, sigmas=sig, eta=eta_vec.to(dev), log_probs=logps, cond=cond,
                      cond_index=cond_index.index_select(0, rep), group=group.index_select(0, rep),
                      prompts=tuple(prompts), velocities=vels, extras={"parent": rep})


def step_log_prob(velocity: VelocityFn, x: Tensor, x_next: Tensor, sigma: Tensor, sigma_next: Tensor, eta: Tensor,
                  cond: Cond, *, kernel="flow_sde", reduce: str = "mean", logp_form: str = "exact",
                  **kernel_kwargs) -> tuple[Tensor, Transition]:
    """Re-score stored transitions with gradients through the same kernel (METHODS.md §2, §3.6).

    ``x``, ``x_next`` [B, *latent]; ``sigma``, ``sigma_next``, ``eta`` [B] (a flat batch may mix steps);
    ``cond`` batch-aligned. Returns the log-density [B] and the Transition (for the KL term).
    """
    kern = get_kernel(kernel)
    v = velocity(x, sigma, cond)  # [B, *latent]
    tr = kern(x, v, sigma, sigma_next, eta, **kernel_kwargs)
    return gaussian_log_prob(x_next, tr.mean, tr.std, reduce=reduce, form=logp_form), tr
