"""Inference-time steering toward a reward without training (DESIGN.md job 2, METHODS.md §6).

Steering is the trainer's pieces without the update: the sampler's kernels, the probe modes of the
process-reward core (``flowalign.values``) and the rewards, plus resampling or a tilted velocity.

- ``fk_steer``: Feynman–Kac particle steering (Singhal et al. 2025, "A General Framework for Inference-time
  Scaling and Steering of Diffusion Models", arXiv:2501.06848), with log-space potentials (``POTENTIALS``), the
  final-step correction that makes the product of potentials exp(λ·r(x_T)) (METHODS.md §6.2), ESS-triggered
  resampling (``RESAMPLERS``) and log-weights that carry over when the ESS test declines (quirk Q17).
- ``best_of_n``: N independent samples, keep the best (METHODS.md §6.1). It is ``fk_steer`` without resampling
  steps and with λ = 0: the same loop, so both count forwards the same way and compare at equal NFE.
- ``TiltGuidance``: reward-gradient guidance of a flow sampler by the Doob h-transform (METHODS.md §6.3), a
  ``mean_shift`` hook for ``flowalign.samplers.loop.sample``; ∇log h from the rewards of x̂0 (``"dps"``, through the
  generator, Chung et al. 2023 "Diffusion Posterior Sampling", arXiv:2209.14687; ``"x0"``, the skip-Jacobian
  variant) or from a caller's function.

Index convention (DESIGN.md §3): step t maps x_t (σ_t) to x_{t+1}; FK scores r at x_t *before* taking step t and
resamples x_t itself (the reference code scores the pre-step state but resamples the post-step latent).
Particles are laid out group-major: rows p·k … p·k + k − 1 are the k particles of group p (one prompt and one
output), and resampling never mixes groups.

``cli_main`` is ``flowalign steer``: a prompt set × a steering method → one output image per (prompt, seed),
scored with evaluation rewards, written as ``results.jsonl``, ``summary.json`` (the evaluation's format plus the
steering settings and cost), ``grids/steered.png`` and ``report.html``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from flowalign.samplers.kernels import NOT_EULER_MARUYAMA, get_kernel
from flowalign.samplers.loop import _noise_like, gather_cond
from flowalign.types import Cond, VelocityFn

logger = logging.getLogger(__name__)

RewardFn = Callable[[Tensor, Tensor], Tensor]
"""reward(latents [n, *latent], rows [n]) -> [n] float32: decode + the (weighted) steering reward of each row."""


# ------------------------------------------------------------------------------------------ weights and resampling


def normalized_weights(logw: Tensor) -> Tensor:
    """Per-group normalised weights softmax(ℓw) [P, k] of log-weights ℓw [P, k].

    A group whose log-weights are all −∞ (every particle scored a non-finite reward) gets uniform weights.
    """
    logw = logw.to(torch.float64)
    dead = torch.isneginf(logw).all(dim=1, keepdim=True)  # [P, 1]
    safe = torch.where(dead, torch.zeros_like(logw), logw)  # [P, k]
    return torch.softmax(safe, dim=1)  # [P, k]


def effective_sample_size(logw: Tensor) -> Tensor:
    """ESS = 1 / Σ w̄² per group [P] (k for uniform weights, 1 when one particle holds all the weight)."""
    w = normalized_weights(logw)  # [P, k]
    return 1.0 / (w * w).sum(dim=1)  # [P]


def systematic_resample(weights: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Ancestor indices [P, k] (within each group) by systematic resampling of ``weights`` [P, k] (rows sum to 1).

    One u ~ U[0, 1/k) per group, positions u + i/k, ancestors = searchsorted(cumsum(w̄), positions) (METHODS.md
    §6.2). Each particle gets ⌊k·w̄_i⌋ or ⌈k·w̄_i⌉ copies.
    """
    p, k = weights.shape
    u = torch.rand(p, 1, generator=generator, dtype=torch.float64) / k  # [P, 1]
    pos = u + torch.arange(k, dtype=torch.float64)[None] / k  # [P, k]
    cdf = torch.cumsum(weights.to(torch.float64).cpu(), dim=1)  # [P, k]
    cdf[:, -1] = 1.0  # guard against rounding: every position lands on a particle
    return torch.searchsorted(cdf, pos, right=True).clamp_max(k - 1)  # [P, k]


def multinomial_resample(weights: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Ancestor indices [P, k]: k independent draws with replacement from each group's ``weights`` [P, k]."""
    k = weights.shape[1]
    return torch.multinomial(weights.to(torch.float64).cpu(), k, replacement=True, generator=generator)  # [P, k]


RESAMPLERS: dict[str, Callable[[Tensor, Optional[torch.Generator]], Tensor]] = {
    "systematic": systematic_resample,
    "multinomial": multinomial_resample,
}
"""Resampling schemes: ``(weights [P, k], generator) -> ancestors [P, k]``."""


# ------------------------------------------------------------------------------------------ potentials


class PotentialState(NamedTuple):
    """Per-particle potential state [n] each (METHODS.md §6.2)."""

    r_prev: Tensor  # the last intermediate twist λ·r (``diff``; r_init = 0)
    m_prev: Tensor  # the running maximum (``max``; starts at −∞)
    a_prev: Tensor  # the running sum (``sum``)
    log_g: Tensor  # L: Σ log G applied along the particle's ancestry (never reset)


def initial_state(n: int, device=None) -> PotentialState:
    """The state before the first resampling step: r_prev = 0, m_prev = −∞, a_prev = 0, L = 0."""
    z = torch.zeros(n, dtype=torch.float64, device=device)
    return PotentialState(z, torch.full_like(z, -math.inf), z.clone(), z.clone())


def _apply(state: PotentialState, log_g: Tensor, **changes: Tensor) -> tuple[Tensor, PotentialState]:
    return log_g, state._replace(log_g=state.log_g + log_g, **changes)


def potential_diff(r: Tensor, state: PotentialState, lam: float) -> tuple[Tensor, PotentialState]:
    """log G = λ_t·r_t − λ_prev·r_prev; r_prev ← r_t (stored as the applied twist λ_t·r_t).

    With a constant λ this is λ·(r_t − r_prev) and the increments telescope to λ·(r_last − r_init); storing the
    product keeps them telescoping under a tempered λ_t too (``fk_steer(temper=…)``), where log G is the ratio of
    the DAS twists log ψ_t − log ψ_prev (METHODS.md §6.4).
    """
    twist = lam * r
    return _apply(state, twist - state.r_prev, r_prev=twist)


def potential_max(r: Tensor, state: PotentialState, lam: float) -> tuple[Tensor, PotentialState]:
    """log G = λ·max(r_t, m_prev); m_prev ← max(r_t, m_prev) (m_prev starts at −∞, so negative r is not clipped)."""
    m = torch.maximum(r, state.m_prev)
    return _apply(state, lam * m, m_prev=m)


def potential_sum(r: Tensor, state: PotentialState, lam: float) -> tuple[Tensor, PotentialState]:
    """log G = λ·(r_t + a_prev); a_prev ← a_prev + r_t."""
    a = state.a_prev + r
    return _apply(state, lam * a, a_prev=a)


def potential_rt(r: Tensor, state: PotentialState, lam: float) -> tuple[Tensor, PotentialState]:
    """log G = λ·r_t."""
    return _apply(state, lam * r)


POTENTIALS: dict[str, Callable[[Tensor, PotentialState, float], tuple[Tensor, PotentialState]]] = {
    "diff": potential_diff,
    "max": potential_max,
    "sum": potential_sum,
    "rt": potential_rt,
}
"""FK potentials in log space: ``(r [n], state, λ) -> (log G [n], state')`` (METHODS.md §6.2 table)."""


def final_log_potential(r_final: Tensor, state: PotentialState, lam: float) -> Tensor:
    """log G_final = λ·r(x_T) − L: with it the potentials of every ancestral line multiply to exp(λ·r(x_T))."""
    return lam * r_final.to(torch.float64) - state.log_g


def gather_state(state: PotentialState, index: Tensor) -> PotentialState:
    return PotentialState(*(s.index_select(0, index.to(s.device)) for s in state))


def resample_steps(steps: int, every: Optional[int] = None, start: Optional[int] = None,
                   end: Optional[int] = None) -> list[int]:
    """Resampling steps S = arange(start, end + 1, every) ∪ {T − 1} (METHODS.md §6.2).

    Defaults [flowalign]: every max(1, ⌊T/10⌋) steps from round(0.2·T) to round(0.8·T) (or to ``start`` when that is
    later, so S always holds ``start``), plus the final step; at high noise x̂0 is a blurred average, so resampling
    starts after about 20 % of the steps. An ``end`` before ``start`` is refused (it would leave only the final step).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    every = max(1, steps // 10) if every is None else int(every)
    start_given = start is not None
    start = round(0.2 * steps) if start is None else int(start)
    if every < 1:
        raise ValueError(f"resampling interval must be >= 1 step, got {every}")
    if not 0 <= start < steps:
        raise ValueError(f"first resampling step {start} must be a step index 0 … {steps - 1}")
    if end is None:
        end = max(round(0.8 * steps), start)
    elif int(end) < start:
        first = f"{start}" if start_given else f"{start} (the default round(0.2·T))"
        raise ValueError(f"last regular resampling step {int(end)} is before the first, {first}: the end must be >= the "
                         f"start")
    end = int(end)
    return sorted(set(range(start, min(end, steps - 1) + 1, every)) | {steps - 1})


def temper_factors(steps: int, start: int, gamma: Optional[float]) -> Tensor:
    """Tempering f_t of λ per step [T] (DAS, Kim et al. 2025, "Test-time Alignment of Diffusion Models without
    Reward Over-optimization", arXiv:2501.05803; METHODS.md §6.4): λ_t = λ·f_t with f_t = min((1+γ)^(t−start+1) − 1, 1)
    from the first resampling step on and 0 before it; ``gamma=None`` gives f = 1 everywhere.

    DAS writes (1+γ)^(i−start) − 1, which is 0 at i = start; flowalign counts one step later so the first
    resampling step is not a no-op [flowalign]. DAS's γ = 0.008 is for 100 steps; for T steps a ramp that reaches 1
    at the end needs γ ≈ 2^(1/(T − start)) − 1 (0.072 for T = 12 from step 2; 0.09 reaches 1 at step 10).
    """
    if gamma is None:
        return torch.ones(steps, dtype=torch.float64)
    if not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"temper={gamma} must be finite and > 0 (DAS's γ, e.g. 0.008 for 100 steps)")
    t = torch.arange(steps, dtype=torch.float64)
    f = ((1.0 + gamma) ** (t - start + 1) - 1.0).clamp(max=1.0)  # [T]
    return torch.where(t >= start, f, torch.zeros_like(f))


def proposal_log_ratio(shift: Tensor, std: Tensor, noise: Tensor) -> Tensor:
    """log p(x'|x) − log q(x'|x) per row [n] for x' = μ + δ + s·ξ drawn from the shifted proposal q = N(μ + δ, s²)
    instead of the kernel p = N(μ, s²) (the importance correction of a guided proposal, DAS / TDS; METHODS.md §6.4).

    −‖δ + sξ‖²/(2s²) + ‖sξ‖²/(2s²) = −Σ (δ²/(2s²) + δ·ξ/s), summed over the latent; ``shift`` δ and ``noise`` ξ
    [n, *latent], ``std`` s broadcastable to them (> 0). Computed in float64.
    """
    d = shift.to(torch.float64)  # [n, *latent]
    s = std.to(torch.float64).expand_as(d)  # [n, *latent]
    return -(d * d / (2.0 * s * s) + d * noise.to(torch.float64) / s).flatten(1).sum(dim=1)  # [n]


# ------------------------------------------------------------------------------------------ the FK loop


class SteerResult(NamedTuple):
    """What ``fk_steer`` returns; rows are group-major particles [P·k]."""

    final: Tensor  # [P·k, *latent] every particle at σ = 0
    reward: Tensor  # [P·k] r(x_T) of every particle
    log_weight: Tensor  # [P·k] ℓw after the final correction (weights within a group ∝ exp ℓw)
    best: Tensor  # [P] long: row of each group's highest-reward particle (argmax output)
    drawn: Tensor  # [P] long: row drawn from each group's final weights (a sample of the tilted target)
    origin: Tensor  # [P·k] long: the initial particle (row) each final particle descends from
    ess: Tensor  # [len(S), P] ESS at each resampling step, before resampling
    resampled: Tensor  # [len(S), P] bool: groups resampled at each step
    steps: tuple[int, ...]  # S
    nfe: int  # per-sample model forwards: sampling + probes (a CFG pair counts once)
    reward_calls: int  # rows scored: intermediate + final


def _probe_states(velocity: VelocityFn, x: Tensor, v: Tensor, sig: Tensor, t: int, cond_b: Cond,
                  mode: str) -> tuple[Tensor, int]:
    """The clean-image estimate r is taken on: ``x0`` (x̂0 = x − σ_t·v, free) or ``ode:m`` / ``ode:full``
    (Euler on ``subgrid``, its first step reusing v). Returns (latents [n, *latent], forwards per row)."""
    from flowalign.values import parse_mode

    pm = parse_mode(mode)
    if pm.method != "euler":
        raise ValueError(f"steering probes are Euler completions ('x0', 'ode:m', 'ode:full'), got {mode!r}")
    steps = sig.shape[0] - 1
    path = pm.grid(t, steps)
    z, nfe = x, 0
    for j, (a, c) in enumerate(zip(path[:-1], path[1:])):
        if j == 0:
            va = v
        else:
            va = velocity(z, sig[a].expand(z.shape[0]), cond_b).to(torch.float32)  # [n, *latent]
            nfe += 1
        z = z + (sig[c] - sig[a]) * va  # [n, *latent]
    return z, nfe


def _resample(scheme, weights: Tensor, groups: Tensor, group_gens, generator) -> Tensor:
    """Ancestors [n, k] for ``weights`` [n, k] of ``groups`` [n]: each group with its own generator when there is one
    per group (so a group's draws do not depend on its batch-mates), else one ``generator`` for all."""
    if group_gens is None:
        return scheme(weights, generator)
    return torch.cat([scheme(weights[i:i + 1], group_gens[int(g)]) for i, g in enumerate(groups.tolist())])


@torch.no_grad()
def fk_steer(velocity: VelocityFn, x: Tensor, sigmas: Tensor, cond: Cond, reward: RewardFn, *, k: int,
             lam: float, cond_index: Optional[Tensor] = None, steps_s: Optional[Sequence[int]] = None,
             potential: str = "max", eta: float | Tensor = 0.7, kernel: str = "flow_sde", probe: str = "x0",
             resampler: str = "systematic", ess_threshold: float = 0.5, generator=None,
             resample_generator: Optional[torch.Generator] = None,
             proposal: Optional[Callable[..., Optional[Tensor]]] = None,
             temper: Optional[float] = None) -> SteerResult:
    """Feynman–Kac steering of k particles per group (Singhal et al. 2025, arXiv:2501.06848; METHODS.md §6.2).

    Target per group: p_tar(x_T) ∝ p(x_T | c)·exp(λ·r(x_T)), p the sampler's own distribution (kernel and CFG
    included). At each step t ∈ S every particle is scored on its probe state (``probe``: ``x0`` = r(x̂0_t) with the
    step's own velocity, or an ``ode:m`` completion), its log-weight ℓw grows by the potential's log G, and a group is
    resampled when its ESS < ``ess_threshold``·k — and always at the last step of S unless its weights are exactly
    uniform (then resampling is the identity). Resampling gathers the latents, the cached velocity and the potential
    state by ancestor and resets ℓw to 0; a declined test carries ℓw over (quirk Q17). After the last step the final
    correction λ·r(x_T) − L is added, so the product of the potentials along every ancestral line is exp(λ·r(x_T)) and
    the weighted particles target p_tar for every potential as k → ∞ (METHODS §6.2). At practical k only ``diff``
    gives usable final weights: its intermediate targets telescope to the final one, while ``max``, ``sum`` and ``rt``
    apply (about) the whole tilt again at every resampling step, so the particles end up tilted ~|S| times too strongly
    and the final correction leaves a handful of them with weight. In the Gaussian world (r = x, λ = 3, T = 20) ``max``
    ends with a final ESS of about 11 of 64,000 particles and a weighted mean 0.5 above the target's, ``diff`` on
    target with all 64,000 (tests/test_steer.py). For a target sample (``output="drawn"``) use ``diff``; ``max``
    (the reference's SDXL setting) is a search heuristic whose best particle is what it returns by default.

    Args:
        velocity: ``v(x, σ [n], cond_b)`` with CFG inside.
        x: initial noise [P·k, *latent], group-major (rows p·k … p·k + k − 1 are group p).
        sigmas: the grid [T+1], 1 → 0; ``eta``: a float or per-step [T] noise scale of ``kernel`` (a stochastic
            kernel after the first resampling step is mandatory; an ODE only duplicates particles, warned).
        reward: ``reward(latents, rows) -> [n]`` (decode + rewards); rows index the particles.
        k, lam: particles per group and λ (per raw reward unit; λ = 0 gives uniform weights and no resampling).
        steps_s: S (default ``resample_steps(T)``); ``potential``: a ``POTENTIALS`` name.
        generator: the step noise: one ``torch.Generator``, or a list of P, one per group, which then also draws
            that group's resampling, so a group's result does not depend on the other groups in the batch;
        resample_generator: with a single (or no) ``generator``, draws the resampling and ``drawn`` (None: torch's
            global generator).
        proposal: a guided proposal (DAS, METHODS.md §6.4): a ``mean_shift`` hook ``(x, v, σ_t, σ_{t+1}, t, cond_b)
            -> δ | None`` such as ``TiltGuidance``; at every stochastic step the particles are drawn from
            N(μ_t + f_t·δ, s_t²) instead of the kernel's N(μ_t, s_t²), and ℓw gains the importance correction
            log p − log q (``proposal_log_ratio``), so the weighted particles still target p·exp(λ·r). Not called at
            deterministic (η = 0) steps, where q would be a point mass off p.
        temper: DAS's γ: λ_t = λ·f_t (``temper_factors``) in the intermediate potentials and f_t scales the
            proposal's shift; the final correction uses the full λ, so the target is unchanged. Use ``potential="diff"``
            for DAS's twist ratios ψ_t/ψ_prev.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 particle per group, got {k}")
    b = x.shape[0]
    if b % k:
        raise ValueError(f"{b} rows are not a whole number of groups of k = {k} particles")
    if potential not in POTENTIALS:
        raise ValueError(f"unknown potential {potential!r}; choose one of {', '.join(POTENTIALS)}")
    if resampler not in RESAMPLERS:
        raise ValueError(f"unknown resampler {resampler!r}; choose one of {', '.join(RESAMPLERS)}")
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam={lam} must be finite and >= 0")
    if not 0.0 < ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold={ess_threshold} must lie in (0, 1]")
    p = b // k
    group_gens = list(generator) if isinstance(generator, (list, tuple)) else None
    if group_gens is not None and len(group_gens) != p:
        raise ValueError(f"{len(group_gens)} generators for {p} groups: pass one per group or a single generator")
    kern = get_kernel(kernel)
    steps = int(sigmas.shape[0]) - 1
    eta_t = (eta.detach().to(torch.float32).cpu() if isinstance(eta, Tensor) and eta.dim() == 1
             else torch.full((steps,), float(eta)))  # [T]
    if eta_t.shape[0] != steps:
        raise ValueError(f"eta has {eta_t.shape[0]} entries, expected one per step ({steps})")
    s_list = resample_steps(steps) if steps_s is None else sorted(set(int(s) for s in steps_s))
    if any(not 0 <= s < steps for s in s_list):
        raise ValueError(f"resampling steps must be step indices 0 … {steps - 1}, got {s_list}")
    fac = temper_factors(steps, s_list[0] if s_list else 0, temper)  # [T] f_t
    if s_list and lam > 0 and k > 1 and not bool((eta_t[s_list[0]:] > 0).any()):
        if bool((eta_t > 0).any()) or steps == 1:
            # a stochastic kernel whose noise ends before the first resampling: e.g. only the deterministic last step
            # (eta_schedule's η = 0 there) follows a resampling at step T − 1 (a late start, or T = 1)
            logger.warning("FK steering: no stochastic step follows the first resampling step (%d of steps 0 … %d: η is "
                           "0 from there on, as at the kernel's deterministic last step), so resampled duplicates stay "
                           "identical and FK only selects, like best-of-N with extra reward rows; resample earlier (a "
                           "smaller start) or use more steps", s_list[0], steps - 1)
        else:
            logger.warning("FK steering with a deterministic kernel after the first resampling step (%d): duplicated "
                           "particles stay identical and FK reduces to best-of-N with wasted forwards; use a "
                           "stochastic kernel (e.g. kernel flow_sde, eta 0.7)", s_list[0])
    dev = x.device
    if cond_index is None:
        cond_index = torch.arange(b, device=dev)
    cond_b = gather_cond(cond, cond_index)
    sig = sigmas.to(device=dev, dtype=torch.float32)  # [T+1]
    x = x.to(torch.float32)
    state = initial_state(b)
    logw = torch.zeros(p, k, dtype=torch.float64)  # [P, k]
    origin = torch.arange(b)
    base = (torch.arange(p) * k)[:, None]  # [P, 1] first row of each group
    ess_hist, res_hist = [], []
    nfe, calls = 0, 0
    last_s = s_list[-1] if s_list else -1
    for t in range(steps):
        v = velocity(x, sig[t].expand(b), cond_b).to(torch.float32)  # [P·k, *latent]
        nfe += 1
        if t in s_list:
            z, extra = _probe_states(velocity, x, v, sig, t, cond_b, probe)
            nfe += extra
            r = reward(z, torch.arange(b, device=dev)).detach().to(torch.float64).cpu().reshape(b)  # [P·k]
            calls += b
            r = torch.where(torch.isfinite(r), r, torch.full_like(r, -math.inf))
            log_g, state = POTENTIALS[potential](r, state, lam * float(fac[t]))
            # a dead particle stays dead: −∞ − (−∞) and −∞ + ∞ are NaN → −∞; ±∞ must stay ±∞ (nan_to_num's default
            # makes them ±1.8e308, and a `diff` particle killed at one step came back with ℓw = 0 at the next)
            logw = torch.nan_to_num(logw + log_g.view(p, k), nan=-math.inf, posinf=math.inf, neginf=-math.inf)
            ess = effective_sample_size(logw)  # [P]
            uniform = (logw == logw[:, :1]).all(dim=1)  # [P] (a group whose particles all died included)
            # exactly uniform weights (ESS = k, e.g. 5 − 1e-15 by rounding) have nothing to resample toward: resampling
            # a dead group would reset its ℓw to 0 and revive it (then `diff`'s +∞ made its weights NaN)
            go = ((ess < ess_threshold * k) | (t == last_s)) & ~uniform  # [P]
            ess_hist.append(ess.to(torch.float32))
            res_hist.append(go)
            if bool(go.any()):
                anc = _resample(RESAMPLERS[resampler], normalized_weights(logw[go]), go.nonzero().flatten(),
                                group_gens, resample_generator)  # [n_go, k]
                idx = base.expand(p, k).clone() + torch.arange(k)[None]  # [P, k] identity
                idx[go] = base[go] + anc
                flat = idx.reshape(-1)  # [P·k]
                x, v = x[flat.to(dev)], v[flat.to(dev)]
                state = gather_state(state, flat)
                origin = origin[flat]
                logw[go] = 0.0
        tr = kern(x, v, sig[t], sig[t + 1], eta_t[t].to(dev))
        if float(eta_t[t]) > 0:
            shift = None
            if proposal is not None and float(fac[t]) > 0:
                shift = proposal(x, v, sig[t], sig[t + 1], t, cond_b)  # [P·k, *latent] or None
            xi = _noise_like(tr.mean, generator)  # [P·k, *latent], one generator per group or one for all
            if shift is None:
                x = tr.mean + tr.std * xi  # [P·k, *latent]
            else:
                shift = float(fac[t]) * shift.to(torch.float32)  # [P·k, *latent]
                x = tr.mean + shift + tr.std * xi  # [P·k, *latent]
                corr = proposal_log_ratio(shift, tr.std, xi).cpu().view(p, k)  # [P, k]
                logw = torch.nan_to_num(logw + corr, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        else:
            x = tr.mean
    r_final = reward(x, torch.arange(b, device=dev)).detach().to(torch.float64).cpu().reshape(b)  # [P·k]
    calls += b
    finite = torch.where(torch.isfinite(r_final), r_final, torch.full_like(r_final, -math.inf))
    # ±∞ stay ±∞ (nan_to_num's default would make a particle whose final reward is NaN −1.8e308, alive), and a dead
    # particle's −∞ + ∞ is NaN → −∞: dead
    final = final_log_potential(finite, state, lam).view(p, k)  # [P, k]
    logw = torch.nan_to_num(logw + final, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    best = base[:, 0] + finite.view(p, k).argmax(dim=1)  # [P]
    drawn = base[:, 0] + _resample(multinomial_resample, normalized_weights(logw), torch.arange(p), group_gens,
                                   resample_generator)[:, 0]  # [P]
    return SteerResult(
        final=x, reward=r_final.to(torch.float32), log_weight=logw.reshape(-1), best=best, drawn=drawn,
        origin=origin,
        ess=torch.stack(ess_hist) if ess_hist else torch.zeros(0, p),
        resampled=torch.stack(res_hist) if res_hist else torch.zeros(0, p, dtype=torch.bool),
        steps=tuple(s_list), nfe=nfe * b, reward_calls=calls)


def best_of_n(velocity: VelocityFn, x: Tensor, sigmas: Tensor, cond: Cond, reward: RewardFn, *, n: int,
              cond_index: Optional[Tensor] = None, eta: float | Tensor = 0.0, kernel: str = "euler",
              generator=None) -> SteerResult:
    """Best-of-N (METHODS.md §6.1): n independent samples per group, ``best`` = the argmax of r(x_T).

    Ties (frequent with a discrete verifier such as ``shapes_partial``) go to the lowest particle index, so the
    choice depends on the seeds alone; a particle with a non-finite reward never wins.

    ``fk_steer`` with no resampling step and λ = 0, so it runs the same loop and counts forwards the same way:
    the baseline every steering result is compared with at equal NFE. ODE by default (``kernel="euler"``).
    """
    return fk_steer(velocity, x, sigmas, cond, reward, k=n, lam=0.0, cond_index=cond_index, steps_s=(),
                    eta=eta, kernel=kernel, generator=generator)


# ------------------------------------------------------------------------------------------ reward-gradient guidance


GradFn = Callable[[Tensor, Tensor, Tensor, Cond], Tensor]
"""grad(x [n, *latent], σ [n], v [n, *latent], cond_b) -> [n, *latent]."""


def tilt_shift(u: Tensor, sigma: Tensor, sigma_next: Tensor, g2: Tensor) -> Tensor:
    """The h-transform's shift of a step's mean (METHODS.md §6.3), from u = (σ/(1−σ))·∇log h_σ(x).

    ODE: v* = v − u. SDE (drift v − (g²/2)·∇log p): the drift gains −(σ/(1−σ) + g²/2)·∇log h, so the step mean moves
    by Δ_t·(σ/(1−σ) + g²/2)·∇log h = Δ_t·(1 + g²·(1−σ)/(2σ))·u, with Δ_t = σ_t − σ_{t+1} > 0 (dt < 0, so the mean
    moves toward higher reward). u is finite at σ = 1 even where σ/(1−σ) is not, which is why it is the argument.
    """
    delta = (sigma - sigma_next).to(torch.float32)
    return delta * (1.0 + g2 * (1.0 - sigma) / (2.0 * sigma)) * u  # [n, *latent]


class TiltGuidance:
    """Reward-gradient guidance by the Doob h-transform, a ``mean_shift`` hook for ``samplers.loop.sample``
    (METHODS.md §6.3).

    Target p(x_data | c)·exp(r/β); h_σ(x) = E[exp(r(x_data)/β) | x_σ = x]. ∇log h is estimated by Tweedie/DPS,
    log h ≈ r(D(x̂0(x)))/β:

    - ``mode="dps"``: ∇_x r(decode(x − σ·v_θ(x))) through the generator (1 forward + 1 backward per guided step;
      Chung et al. 2023, arXiv:2209.14687);
    - ``mode="x0"``: the skip-Jacobian variant J ≈ I, ∇_{x̂0} r(decode(x̂0)) at x̂0 = x − σ·v with the step's own
      (detached) velocity: no extra forward, good late in sampling where x̂0 is sharp;
    - ``grad_fn``: a caller's u(x, σ, v, cond_b) = (σ/(1−σ))·∇log h directly (exact in the Gaussian world).

    The per-sample gradient is then normalised (g ← c·g/‖g‖, ``normalize=c``) or norm-clipped (g ← g·min(1, c/‖g‖),
    ``clip=c``), and applied only inside ``band`` = (σ_min, σ_max) (default [0.05, 0.8]: σ/(1−σ) is singular at
    σ = 1, so the ``x0`` and ``dps`` modes never guide at σ = 1, the first step, even with σ_max = 1; only a
    ``grad_fn``, which returns u itself, can). The shift is ``tilt_shift``, with g_t² = s_t²/Δ_t from the kernel's own
    step std (exact for ``flow_sde``, ``dance_sde`` and Euler, g = 0; the CPS kernel is not an Euler–Maruyama step and
    is refused).
    """

    def __init__(self, *, kernel: str = "euler", eta: float | Tensor = 0.0, beta: float = 1.0,
                 mode: str = "x0", reward: Optional[Callable[[Tensor, Sequence[str]], Tensor]] = None,
                 decode: Optional[Callable[[Tensor], Tensor]] = None, velocity: Optional[VelocityFn] = None,
                 grad_fn: Optional[GradFn] = None, band: tuple[float, float] = (0.05, 0.8),
                 normalize: Optional[float] = None, clip: Optional[float] = None, counter=None):
        if kernel in NOT_EULER_MARUYAMA:
            raise ValueError(f"reward-gradient guidance needs an Euler–Maruyama step (euler, flow_sde, dance_sde); "
                             f"the {kernel} kernel is not one")
        if not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"beta={beta} must be finite and > 0 (the tilt is exp(r/beta))")
        if grad_fn is None and mode not in ("dps", "x0"):
            raise ValueError(f"guidance mode must be 'dps' or 'x0', got {mode!r}")
        if grad_fn is None and (reward is None or decode is None or (mode == "dps" and velocity is None)):
            raise ValueError("guidance needs reward and decode (and velocity for mode 'dps'), or a grad_fn")
        if normalize is not None and clip is not None:
            raise ValueError("pass normalize or clip, not both")
        for name, c in (("normalize", normalize), ("clip", clip)):
            if c is not None and not (math.isfinite(c) and c > 0):
                raise ValueError(f"{name}={c} must be finite and > 0 (a per-sample gradient norm)")
        lo, hi = float(band[0]), float(band[1])
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance band {band} must satisfy 0 <= sigma_min <= sigma_max <= 1")
        self.kernel, self.eta, self.beta, self.mode = get_kernel(kernel), eta, float(beta), mode
        self.reward, self.decode, self.velocity, self.grad_fn = reward, decode, velocity, grad_fn
        self.band, self.normalize, self.clip, self.counter = (lo, hi), normalize, clip, counter
        self.prompts: Sequence[str] = ()  # one per row, set before each rollout (the rewards need them)
        self.guided: list[int] = []  # the step of every guided call, in order (across rollouts: clear it to reuse)

    def _eta(self, t: int) -> Tensor:
        e = self.eta
        return e[t].to(torch.float32) if isinstance(e, Tensor) and e.dim() == 1 else torch.tensor(float(e))

    def _score(self, z: Tensor) -> Tensor:
        if len(self.prompts) != z.shape[0]:
            raise ValueError(f"TiltGuidance.prompts has {len(self.prompts)} entries for {z.shape[0]} rows; set it per "
                             f"rollout")
        return self.reward(self.decode(z), list(self.prompts)).to(torch.float32)  # [n]

    def __call__(self, x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, t: int, cond_b: Cond) -> Optional[Tensor]:
        s = float(sigma)
        if not self.band[0] <= s <= self.band[1]:
            return None
        n = x.shape[0]
        lat = (1,) * (x.dim() - 1)
        if self.grad_fn is None and s >= 1.0:
            return None  # σ/(1−σ) is infinite at σ = 1: only a grad_fn that returns u itself can guide there
        if self.grad_fn is not None:
            u = self.grad_fn(x, sigma.reshape(-1).expand(n), v, cond_b).to(torch.float32)  # [n, *latent]
        else:
            with torch.enable_grad():
                if self.mode == "dps":
                    xg = x.detach().to(torch.float32).requires_grad_(True)
                    ctx = self.counter.phase("guidance") if self.counter is not None else contextlib.nullcontext()
                    with ctx:
                        vg = self.velocity(xg, sigma.reshape(-1).expand(n), cond_b).to(torch.float32)
                    r = self._score(xg - s * vg)  # [n]
                    grad = torch.autograd.grad(r.sum(), xg)[0]  # [n, *latent]
                else:
                    z = (x - s * v).detach().to(torch.float32).requires_grad_(True)  # x̂0 [n, *latent]
                    grad = torch.autograd.grad(self._score(z).sum(), z)[0]  # [n, *latent]
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *lat)  # [n, 1…]
            if self.normalize is not None:
                grad = self.normalize * grad / norm
            elif self.clip is not None:
                grad = grad * (self.clip / norm).clamp(max=1.0)
            u = (s / (1.0 - s)) * grad / self.beta  # [n, *latent]
        tr = self.kernel(x, v, sigma, sigma_next, self._eta(t).to(x.device))
        delta = (sigma - sigma_next).to(torch.float32)
        g2 = (tr.std.to(torch.float32) ** 2) / delta  # g_t² = s_t² / Δ_t
        self.guided.append(int(t))
        return tilt_shift(u, sigma.to(torch.float32), sigma_next.to(torch.float32), g2)


# ------------------------------------------------------------------------------------------ prompts × a method


METHODS = ("none", "best_of_n", "fk", "guided")
"""``flowalign steer --method``: plain sampling, best-of-N, FK particles, h-transform reward guidance."""

GRID_PROMPTS = 8
"""``flowalign steer`` shows the outputs of the first 8 prompts in ``grids/steered.png``."""

PROPOSALS = ("kernel", "guided")
"""FK proposals: the sampler's own kernel, or the kernel shifted by ``TiltGuidance`` with importance weights (DAS)."""


def steer_prompts(model, records: Sequence[Mapping], steer_rewards: Mapping[str, tuple[Callable, float]],
                  eval_rewards: Mapping[str, Callable], *, method: str, steps: int, k: int = 4, lam: float = 10.0,
                  kernel: str = "euler", eta: float = 0.0, seeds_per_prompt: int = 1, seed: int = 0,
                  batch_size: int = 32, potential: str = "max", resampler: str = "systematic", probe: str = "x0",
                  ess_threshold: float = 0.5, schedule: Optional[Sequence[int]] = None, output: str = "best",
                  beta: float = 1.0, guide_mode: str = "x0", band: tuple[float, float] = (0.05, 0.8),
                  normalize: Optional[float] = None, clip: Optional[float] = None, grid_prompts: int = 0,
                  proposal: str = "kernel", temper: Optional[float] = None,
                  progress: bool = False, journal=None) -> tuple[list[dict], Optional[Tensor], dict]:
    """Steer every (prompt, sample) of ``records`` and score the outputs with ``eval_rewards``.

    One output image per (prompt i, sample s). Its k particles (best-of-N and FK; 1 otherwise) start from the noise of
    ``evaluate.image_seed(seed, i, s·k + j)`` and draw their step noise (and FK's resampling) from a generator seeded
    by that output alone, so an output does not depend on the batch it is drawn in; with k = 1 and ``method="none"``
    the images are ``flowalign eval``'s. ``steer_rewards`` maps names to (reward, weight): the steering reward is
    Σ w·R(decode(x)). Returns (one record per output: the prompt's fields, ``prompt_index``, ``sample``, ``seed`` (its
    first particle's), ``particle`` (the chosen one), ``particle_seed`` (the initial-noise seed of the chosen particle's
    ancestor: with best-of-N, ``flowalign eval``/``sample`` with that seed redraws the image), ``steer_reward`` and one
    float per evaluation reward; the first ``grid_prompts`` prompts' images
    [n, 3, H, W]; cost: forwards and steering-reward rows per output).

    ``journal`` (an ``io.BatchJournal``) makes the run resumable: each finished batch (``outputs_per_batch`` outputs)
    is added with its records and cost, and the batches it already holds are not steered again (except those with
    grid images, for their pixels), so a resumed run returns what an uninterrupted one does.

    FK's ``proposal="guided"`` is DAS (METHODS.md §6.4): the particles move by ``TiltGuidance`` (``guide_mode``,
    ``band``, ``normalize``, ``clip``) toward the same tilt exp(λ·r), β = 1/λ, with the importance correction in
    the weights; ``temper`` is DAS's γ (``temper_factors``).
    """
    from flowalign.evaluate import image_seed, step_noise_seed
    from flowalign.samplers.loop import eta_schedule, sample

    if method not in METHODS:
        raise ValueError(f"unknown steering method {method!r}; choose one of {', '.join(METHODS)}")
    if proposal not in PROPOSALS:
        raise ValueError(f"unknown FK proposal {proposal!r}; choose one of {', '.join(PROPOSALS)}")
    if proposal == "guided" and (method != "fk" or not lam > 0):
        raise ValueError("a guided proposal is FK's (DAS): it needs method='fk' and lam > 0")
    if proposal == "guided" and not eta > 0:
        raise ValueError("a guided proposal shifts stochastic steps only: with eta = 0 it would be plain FK; pass a "
                         "stochastic kernel and eta > 0")
    kk = k if method in ("best_of_n", "fk") else 1  # "none" is best-of-1: the same batched loop
    if batch_size < kk:  # a group's particles are resampled together, so they run as one model batch
        raise ValueError(f"batch_size={batch_size} is below k={kk}: a group's k particles run in one model batch")
    sigmas = model.schedule(steps)  # [T+1]
    etas = eta_schedule(steps, eta)  # [T]
    forwards = [0]
    inner = model.velocity

    def velocity(x, sigma, cond):  # counts per-sample forwards of every phase (sampling, probes, DPS guidance)
        forwards[0] += int(x.shape[0])
        return inner(x, sigma, cond)

    units = [(i, s) for i in range(len(records)) for s in range(seeds_per_prompt)]
    per_batch = outputs_per_batch(method, k, batch_size)
    redo = grid_batches(len(records), seeds_per_prompt, grid_prompts, per_batch)
    done = {b: v for b, v in (journal.done if journal is not None else {}).items() if b not in redo}
    out: list[dict] = []
    grid: list[Tensor] = []
    calls = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(units), initial=sum(len(v[0]) for v in done.values()), desc=f"steer ({method})",
                   unit="img", dynamic_ncols=True)
    try:
        for start in range(0, len(units), per_batch):
            if start // per_batch in done:  # finished by an interrupted run: its records and cost as they were
                recs, meta = done[start // per_batch]
                out += recs
                forwards[0] += int(meta["forwards"])
                calls += int(meta["calls"])
                continue
            forwards_before, calls_before = forwards[0], calls
            chunk = units[start:start + per_batch]
            prompt_ids = sorted({i for i, _ in chunk})
            row_of = {i: r for r, i in enumerate(prompt_ids)}
            cond = model.encode([records[i]["prompt"] for i in prompt_ids])
            unit_rows = [u for u in chunk for _ in range(kk)]  # particle rows, group-major
            seeds = [image_seed(seed, i, s * kk + j) for i, s in chunk for j in range(kk)]
            x = torch.cat([model.init_noise(1, torch.Generator().manual_seed(sd)) for sd in seeds])  # [B, *latent]
            cond_index = torch.tensor([row_of[i] for i, _ in unit_rows], device=x.device)  # [B]
            prompts = [records[i]["prompt"] for i, _ in unit_rows]
            meta = [dict(records[i]) for i, _ in unit_rows]
            gens = [torch.Generator().manual_seed(step_noise_seed(image_seed(seed, i, s))) for i, s in chunk]

            def reward(z: Tensor, rows: Tensor) -> Tensor:
                images = model.decode(z)  # [n, 3, H, W] in [0, 1]
                ps = [prompts[int(r)] for r in rows]
                ms = [meta[int(r)] for r in rows]
                total = torch.zeros(z.shape[0], dtype=torch.float32)
                for fn, w in steer_rewards.values():
                    total = total + w * fn(images, ps, ms).detach().float().cpu()
                return total  # [n]

            guide_rows = [0]  # rows the guidance scores (one per row and guided step): part of the cost
            if method != "guided":
                das = None
                if proposal == "guided":
                    def batch_reward(images, ps):  # rows are the batch's particles, in order (resampling keeps groups)
                        guide_rows[0] += len(ps)
                        total = 0.0
                        for fn, w in steer_rewards.values():
                            total = total + w * fn(images, ps, meta).float()
                        return total

                    das = TiltGuidance(kernel=kernel, eta=etas, beta=1.0 / lam, mode=guide_mode, reward=batch_reward,
                                       decode=model.decode, velocity=velocity, band=band, normalize=normalize,
                                       clip=clip)
                    das.prompts = prompts
                res = fk_steer(velocity, x, sigmas, cond, reward, k=kk, lam=lam if method == "fk" else 0.0,
                               cond_index=cond_index, steps_s=schedule if method == "fk" else (),
                               potential=potential, eta=etas, kernel=kernel, probe=probe, resampler=resampler,
                               ess_threshold=ess_threshold, generator=gens, proposal=das,
                               temper=temper if method == "fk" else None)  # (guidance enables grad inside)
                pick = res.best if output == "best" or method == "best_of_n" else res.drawn  # [P]
                final, steer_r = res.final[pick.to(res.final.device)], res.reward[pick]
                calls += res.reward_calls + guide_rows[0]
                particle = (pick - torch.arange(len(chunk)) * kk).tolist()
                start_seed = [seeds[int(o)] for o in res.origin[pick]]  # the chosen particle's ancestor's noise
            else:
                row = [0]  # the output whose chain is being guided (one chain per output, below)

                def diff_reward(images, ps):
                    guide_rows[0] += len(ps)
                    total = 0.0
                    for fn, w in steer_rewards.values():  # the row's own metadata, not the first with its prompt
                        total = total + w * fn(images, ps, [meta[row[0]]] * len(ps)).float()
                    return total

                guide = TiltGuidance(kernel=kernel, eta=etas, beta=beta, mode=guide_mode, reward=diff_reward,
                                     decode=model.decode, velocity=velocity, band=band, normalize=normalize, clip=clip)
                guide.prompts = prompts
                finals = []
                for j in range(len(chunk)):  # one chain per output: batch-independent noise
                    row[0] = j
                    finals.append(sample(velocity, x[j:j + 1], sigmas, cond, eta=etas, kernel=kernel,
                                         cond_index=cond_index[j:j + 1], mean_shift=_row_hook(guide, j),
                                         generator=gens[j] if float(etas.max()) > 0 else None).final)
                final = torch.cat(finals)  # [P, *latent]
                with torch.no_grad():
                    steer_r = reward(final, torch.arange(len(chunk)))
                calls += len(chunk) + guide_rows[0]
                particle = [0] * len(chunk)
                start_seed = list(seeds)
            with torch.no_grad():
                images = model.decode(final).float().cpu()  # [P, 3, H, W]
            ps = [records[i]["prompt"] for i, _ in chunk]
            ms = [dict(records[i]) for i, _ in chunk]
            scores = {n: fn(images, ps, ms).detach().float().cpu().tolist() for n, fn in eval_rewards.items()}
            batch_records = []
            for j, (i, s) in enumerate(chunk):
                rec = dict(records[i])
                rec.update(prompt_index=i, sample=s, seed=image_seed(seed, i, s * kk), particle=int(particle[j]),
                           particle_seed=int(start_seed[j]), steer_reward=float(steer_r[j]))
                rec.update({n: float(v[j]) for n, v in scores.items()})
                batch_records.append(rec)
                if i < grid_prompts:
                    grid.append(images[j])
            out += batch_records
            if journal is not None:
                journal.add(start // per_batch, batch_records, forwards=forwards[0] - forwards_before,
                            calls=calls - calls_before)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    n_out = max(1, len(units))
    cost = {"forwards_per_image": forwards[0] / n_out, "steer_reward_rows_per_image": calls / n_out,
            "particles": kk}
    return out, (torch.stack(grid) if grid else None), cost


def outputs_per_batch(method: str, k: int, batch_size: int) -> int:
    """Outputs ``steer_prompts`` steers per model batch: ``batch_size`` particle rows hold batch_size // k outputs of
    k particles (best-of-N, FK; one row per output otherwise), at least one (``steer_prompts`` refuses a
    ``batch_size`` below k)."""
    return max(1, batch_size // (k if method in ("best_of_n", "fk") else 1))


def grid_batches(n_prompts: int, seeds_per_prompt: int, grid_prompts: int, per_batch: int) -> set[int]:
    """The batches (of ``per_batch`` outputs, prompt-major) holding the first ``grid_prompts`` prompts' outputs."""
    n = min(n_prompts, grid_prompts) * seeds_per_prompt
    return {u // per_batch for u in range(n)}


def _row_hook(guide: TiltGuidance, row: int):
    """The guidance hook for a one-row chain (its prompt is row ``row`` of the batch's prompts)."""
    def hook(x, v, sigma, sigma_next, t, cond_b):
        prompts = guide.prompts
        guide.prompts = [prompts[row]]
        try:
            return guide(x, v, sigma, sigma_next, t, cond_b)
        finally:
            guide.prompts = prompts

    return hook


def _parse_weights(text: str) -> dict[str, float]:
    """``"a,b:0.5"`` → {"a": 1.0, "b": 0.5} (one-line ``UserError`` on a bad weight or a name given twice);
    ``b=0.5`` means the same, as ``flowalign calibrate --reward`` writes it."""
    from flowalign.errors import UserError

    out: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, w = item.replace("=", ":", 1).partition(":")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise UserError(f"--reward {item!r}: the weight after ':' must be a number, e.g. shapes_partial:1.0") from None
        if not math.isfinite(weight):
            raise UserError(f"--reward {item!r}: the weight must be finite")
        if name.strip() in out:
            raise UserError(f"--reward names {name.strip()!r} twice; give each reward once, with its total weight "
                            f"(NAME:WEIGHT)")
        out[name.strip()] = weight
    return out


FK_DEFAULTS = {"lam": 10.0, "potential": "max", "resampler": "systematic", "probe": "x0", "ess": 0.5,
               "proposal": "kernel"}
"""``flowalign steer``'s FK-only settings as used when not given (the flags default to None so that passing one to
another method is refused rather than ignored)."""

DEFAULT_BATCH_ROWS = 32
"""``flowalign steer --batch-size`` when not given: 32 particle rows per model batch, or k if that is more."""


def build_parser():
    """The ``flowalign steer`` argument parser."""
    from flowalign.errors import CommandParser, Once
    from flowalign.evaluate import add_component_args
    from flowalign.samplers import KERNELS

    p = CommandParser(prog="flowalign steer", description=(
        "Steer a model toward a reward at inference (no training): best-of-N, Feynman-Kac particles or "
        "reward-gradient guidance; score the outputs with evaluation rewards."))
    p.add_argument("prompts", nargs="*", help="prompts (or use --prompt-file; neither: the model's own benchmark "
                   "prompts, shapes-bench for shapes and shapes-motion-bench for shapes_video, as eval)")
    p.add_argument("--prompt-file", "--prompts", dest="prompt_file",
                   help="a built-in prompt set name or a .txt/.jsonl file (--prompts: the same, as eval names it)")
    p.add_argument("--max-prompts", type=int, default=0, help="an evenly spaced subset of N prompts, of --prompt-file's "
                   "or of the arguments (0 = all)")
    p.add_argument("--method", default="best_of_n",
                   help=f"{' | '.join(METHODS)} (default best_of_n: the strongest on shapes-bench, docs/steering.md)")
    p.add_argument("--particles", "-k", type=int, default=None,
                   help="best_of_n: N; fk: particles per output (default 4; not with none or guided, one sample each)")
    p.add_argument("--reward", default=None,
                   help="the steering reward(s): NAME or NAME:WEIGHT (or NAME=WEIGHT), comma-separated, each name once (guided: "
                        "differentiable ones; default: the shapes models' partial credit, shapes_partial or "
                        "shapes_motion_partial; required for sd3, flux and wan)")
    p.add_argument("--eval-rewards", default=None,
                   help="comma-separated rewards that score the outputs (summary.json; default: the shapes models' "
                        "verifier, shapes_strict,shapes_partial or shapes_motion_strict,shapes_motion_partial; "
                        "else the steering rewards)")
    d = FK_DEFAULTS
    p.add_argument("--lam", type=float, default=None,
                   help=f"FK: λ of the tilt exp(λ·r), per raw reward unit (per reward std with --reward-std; default "
                        f"{d['lam']:g})")
    p.add_argument("--potential", default=None, help=f"FK potential: {' | '.join(POTENTIALS)} (default {d['potential']})")
    p.add_argument("--resampler", default=None,
                   help=f"FK resampling: {' | '.join(RESAMPLERS)} (default {d['resampler']})")
    p.add_argument("--probe", default=None, help="FK: what r_t scores: x0 (free; default) or ode:M (M Euler steps)")
    p.add_argument("--ess", type=float, default=None,
                   help=f"FK: resample a group when ESS < this fraction of k (default {d['ess']:g})")
    p.add_argument("--every", type=int, default=None, help="FK: resample every N steps (default max(1, T//10))")
    p.add_argument("--start", type=int, default=None, help="FK: first resampling step (default round(0.2 T))")
    p.add_argument("--end", type=int, default=None,
                   help="FK: last regular resampling step, >= --start (default round(0.8 T), or --start if later); the "
                        "last step T-1 always resamples")
    p.add_argument("--output", default=None, choices=("best", "drawn"),
                   help="FK: the highest-reward particle (default), or one drawn from the final weights (a sample of "
                        "p*exp(lam*r) with --potential diff; the other potentials' final weights degenerate)")
    p.add_argument("--proposal", default=None, choices=PROPOSALS,
                   help="FK: move particles with the sampler's kernel (default), or 'guided': DAS, the kernel shifted by "
                        "reward-gradient guidance toward exp(lam*r) with importance weights (--guide-mode/--band/"
                        "--normalize/--clip; differentiable steering rewards)")
    p.add_argument("--temper", type=float, default=None,
                   help="FK: DAS tempering gamma: lam_t = lam*min((1+gamma)^(t-start+1)-1, 1) before the final step")
    p.add_argument("--reward-std", default=None, metavar="STD_OR_DIR",
                   help="express --lam (fk) and --beta (guided) per reward standard deviation: a number, or an earlier "
                        "`flowalign steer`/`eval` output directory whose results.jsonl scored the steering rewards "
                        "(their weighted sum's std over its images is used)")
    p.add_argument("--beta", type=float, default=None, help="guided: the tilt is exp(r/beta) (default 1)")
    p.add_argument("--guide-mode", default=None, help="guided: x0 (skip-Jacobian, free; default) or dps (through the model)")
    p.add_argument("--band", default=None,
                   help="guided: guide only where sigma lies in MIN,MAX (default 0.05,0.8); sigma = 1, the first step, "
                        "is never guided (sigma/(1-sigma) is infinite there), even when MAX is 1")
    p.add_argument("--normalize", type=float, default=None, help="guided: per-sample gradient norm set to this")
    p.add_argument("--clip", type=float, default=None, help="guided: per-sample gradient norm clipped at this")
    p.add_argument("--model", default="shapes", help="model family (shapes, shapes_video, sd3, flux, wan)")
    p.add_argument("--path", default="", help="weights directory or hub id ('' = the family default)")
    p.add_argument("--lora", action=Once, once_hint="one LoRA is applied; merge them first or pass one", help="a LoRA directory, e.g. a run's checkpoints/step-N or one written by diffusers' "
                   "save_lora_weights")
    add_component_args(p)  # --reward-arg (steering and evaluation rewards), --per-frame, --model-arg
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own: 28 for sd3 "
                   "and flux, 50 for wan, the config's sample_steps for shapes, 12)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--kernel", default=None,
                   help=f"step kernel: {' | '.join(KERNELS)} (default flow_sde for fk, euler otherwise)")
    p.add_argument("--eta", type=float, default=None,
                   help="noise level of the kernel (default 0.7 for every kernel but euler, 0 for euler)")
    p.add_argument("--seeds", type=int, default=1,
                   help="outputs per prompt: output s of prompt i starts from the noise of image_seed(seed, i, s*k) (its "
                        "k particles from s*k ... s*k+k-1; k = 1 for none and guided)")
    p.add_argument("--seed", type=int, default=0, help="run seed: output s of prompt i starts from the noise of "
                   "image_seed(seed, i, s*k) (see --seeds)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"the most particle rows per model batch (default {DEFAULT_BATCH_ROWS}, or k if more); "
                        f"best_of_n and fk run a group's k particles in one batch, so it must be >= k")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--out", required=True, help="output directory (must be new or empty, unless --resume); with --plot, "
                                                "a .png file (a re-render: an existing file is replaced)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (results.partial.jsonl) with the same arguments: batches "
                        "it finished are not steered again, and the outputs equal an uninterrupted run's")
    p.add_argument("--plot", nargs="+", metavar="STEER_DIR", default=None,
                   help="sample nothing: plot --plot-reward of earlier `flowalign steer` outputs against the forwards "
                        "per image (one line per method, kernel and non-default settings) into --out, and print one "
                        "line per directory")
    p.add_argument("--plot-reward", default=None, help="the evaluation reward --plot shows (default: the first "
                                                       "reward the first STEER_DIR was evaluated with, e.g. "
                                                       "shapes_strict or shapes_motion_strict)")
    return p


def cli_main(argv: Sequence[str]) -> int:
    """``flowalign steer``: a prompt set × a steering method → results.jsonl, summary.json, grids/steered.png (the
    first 8 prompts) and report.html."""
    import json

    from flowalign import data as D
    from flowalign.errors import UserError
    from flowalign.evaluate import (PARTIAL, as_records, find_protocol, model_args_jsonable, parse_component_args,
                                    protocol_status, summarize, summarize_pass_at_k)
    from flowalign.io import prompts_digest
    from flowalign.report import benchmark_line
    from flowalign.io import BatchJournal, atomic_write_text
    from flowalign.models import load_model
    from flowalign.rewards.catalog import build_reward_checked
    from flowalign.rewards import resolve as resolve_reward
    from flowalign.rewards.video import for_outputs
    from flowalign.samplers import KERNELS
    from flowalign.sample import (check_device, check_guidance, check_lora_dir, check_max_prompts, check_out_dir,
                                  check_positive, check_prompt_args, check_seed, load_lora_checked,
                                  resolve_steps)
    from flowalign.values import parse_mode

    p = build_parser()
    args = p.parse_args(list(argv))
    if args.plot:
        return _plot_runs(args.plot, args.out, args.plot_reward)

    # every argument is checked before the model loads and before anything is written
    if args.method not in METHODS:
        raise UserError(f"--method {args.method!r}: choose one of {', '.join(METHODS)}")
    check_positive(particles=args.particles, seeds=args.seeds, steps=args.steps, batch_size=args.batch_size,
                   every=args.every)
    check_max_prompts(args.max_prompts)
    check_seed(args.seed)
    device = check_device(args.device)
    kernel = args.kernel or ("flow_sde" if args.method == "fk" else "euler")
    eta = args.eta if args.eta is not None else (0.7 if kernel != "euler" else 0.0)
    if kernel not in KERNELS:
        raise UserError(f"--kernel {kernel!r} is not a kernel (choose one of {', '.join(KERNELS)})")
    if not math.isfinite(eta) or eta < 0:
        raise UserError(f"--eta must be a finite number >= 0, got {eta}")
    if eta > 0 and kernel == "euler":
        raise UserError("--eta > 0 needs a stochastic kernel: --kernel flow_sde, dance_sde, cps or ddim_sde")
    if args.potential is not None and args.potential not in POTENTIALS:
        raise UserError(f"--potential {args.potential!r}: choose one of {', '.join(POTENTIALS)}")
    if args.resampler is not None and args.resampler not in RESAMPLERS:
        raise UserError(f"--resampler {args.resampler!r}: choose one of {', '.join(RESAMPLERS)}")
    if args.probe is not None:
        try:
            probe_ok = args.probe == "x0" or (args.probe.startswith("ode:") and parse_mode(args.probe).method == "euler")
        except ValueError:  # e.g. ode:0, ode:00 (what fk_steer would refuse only after the model loaded)
            probe_ok = False
        if not probe_ok:
            raise UserError(f"--probe {args.probe!r}: use x0, ode:M (M >= 1) or ode:full")
    if args.lam is not None and (not math.isfinite(args.lam) or args.lam < 0):
        raise UserError(f"--lam must be a finite number >= 0, got {args.lam}")
    if args.ess is not None and not 0 < args.ess <= 1:
        raise UserError(f"--ess must lie in (0, 1], got {args.ess}")
    if args.start is not None and args.end is not None and args.end < args.start:
        raise UserError(f"--end {args.end} is before --start {args.start}: the last regular resampling step must be >= "
                        f"the first")
    if args.beta is not None and args.method != "guided":
        raise UserError("--beta is --method guided's; FK's tilt is exp(lam*r) (its guided proposal uses beta = 1/lam)")
    beta = 1.0 if args.beta is None else args.beta
    if not math.isfinite(beta) or beta <= 0:
        raise UserError(f"--beta must be a finite number > 0, got {beta}")
    if args.output is not None and args.method != "fk":
        raise UserError("--output is FK's (best-of-N returns its best particle); drop it or use --method fk")
    if args.particles is not None and args.method not in ("best_of_n", "fk"):
        raise UserError(f"--particles/-k: only with --method best_of_n or fk (--method {args.method} draws one sample "
                        f"per output); drop it")
    fk_only = [f for f, v in (("--lam", args.lam), ("--potential", args.potential), ("--resampler", args.resampler),
                              ("--probe", args.probe), ("--ess", args.ess), ("--every", args.every),
                              ("--start", args.start), ("--end", args.end), ("--proposal", args.proposal),
                              ("--temper", args.temper)) if v is not None]
    if fk_only and args.method != "fk":
        raise UserError(f"{', '.join(fk_only)}: only with --method fk (--method {args.method} would ignore "
                        f"{'it' if len(fk_only) == 1 else 'them'}); drop {'it' if len(fk_only) == 1 else 'them'}")
    for name, default in FK_DEFAULTS.items():  # as used (the journal and summary.json record the resolved values)
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.output == "drawn" and args.potential != "diff":
        logger.warning("--output drawn with --potential %s: its final weights fall on a handful of particles (it tilts "
                       "about |S| times too strongly before the final correction), so the drawn output is a poor "
                       "sample of p*exp(lam*r); use --potential diff for a target sample", args.potential)
    args.particles = 4 if args.particles is None else args.particles
    from flowalign.config import MAX_SEEDS

    per_prompt = args.seeds * (args.particles if args.method in ("best_of_n", "fk") else 1)
    if per_prompt > MAX_SEEDS:  # each particle is an image with its own initial noise (image_seed(seed, i, s·k + j))
        raise UserError(f"--seeds {args.seeds} x -k {args.particles} = {per_prompt} particles per prompt is above the "
                        f"limit of {MAX_SEEDS}; pass fewer --seeds or particles")
    if args.batch_size is None:
        args.batch_size = max(DEFAULT_BATCH_ROWS, args.particles) if args.method in ("best_of_n", "fk") \
            else DEFAULT_BATCH_ROWS
    elif args.method in ("best_of_n", "fk") and args.batch_size < args.particles:
        raise UserError(f"--batch-size {args.batch_size} is below -k {args.particles}: a group's particles run in one "
                        f"model batch; pass --batch-size {args.particles} or more (or fewer particles)")
    guide_flags = [f for f, v in (("--guide-mode", args.guide_mode), ("--band", args.band), ("--normalize", args.normalize),
                                  ("--clip", args.clip)) if v is not None]
    if guide_flags and not (args.method == "guided" or args.proposal == "guided"):
        raise UserError(f"{', '.join(guide_flags)}: only with --method guided or --method fk --proposal guided")
    args.guide_mode = "x0" if args.guide_mode is None else args.guide_mode
    args.band = "0.05,0.8" if args.band is None else args.band
    if args.temper is not None and not args.lam > 0:
        raise UserError("--temper ramps lam; with --lam 0 there is nothing to temper")
    if args.temper is not None and not (math.isfinite(args.temper) and args.temper > 0):
        raise UserError(f"--temper must be a finite number > 0 (DAS's gamma, e.g. 0.09 for 12 steps), got {args.temper}")
    if args.proposal == "guided" and not args.lam > 0:
        raise UserError("--proposal guided tilts toward exp(lam*r): it needs --lam > 0")
    if args.guidance is not None:
        check_guidance(args.guidance)
    if args.reward_std is not None and args.method not in ("fk", "guided"):
        raise UserError("--reward-std scales --lam (fk) or --beta (guided); --method "
                        f"{args.method} has neither")
    if args.guide_mode not in ("x0", "dps"):
        raise UserError(f"--guide-mode {args.guide_mode!r}: use x0 or dps")
    if args.normalize is not None and args.clip is not None:
        raise UserError("pass --normalize or --clip, not both")
    for flag, c in (("--normalize", args.normalize), ("--clip", args.clip)):
        if c is not None and not (math.isfinite(c) and c > 0):
            raise UserError(f"{flag} must be a finite number > 0 (a per-sample gradient norm), got {c}")
    try:
        band = tuple(float(b) for b in args.band.split(","))
    except ValueError:
        band = ()
    if len(band) != 2 or not 0 <= band[0] <= band[1] <= 1:
        raise UserError(f"--band {args.band!r}: expected MIN,MAX with 0 <= MIN <= MAX <= 1, e.g. 0.05,0.8")
    guides = args.method == "guided" or args.proposal == "guided"
    if guides and kernel in NOT_EULER_MARUYAMA:
        raise UserError(f"{'--method guided' if args.method == 'guided' else '--proposal guided'} needs an "
                        f"Euler-Maruyama kernel (euler, flow_sde or dance_sde), not {kernel}")
    if args.proposal == "guided" and not eta > 0:
        raise UserError("--proposal guided shifts stochastic steps only: pass --kernel flow_sde --eta 0.7 (or similar)")

    def fk_schedule(steps: int) -> Optional[list[int]]:
        if args.method != "fk":
            return None
        try:
            return resample_steps(steps, args.every, args.start, args.end)
        except ValueError as err:
            raise UserError(f"FK resampling schedule: {err} (--every/--start/--end)") from None

    if args.steps is not None:
        fk_schedule(args.steps)  # known before the model loads
    if args.method == "fk" and not (eta > 0) and args.particles > 1:
        logger.warning("--method fk with an ODE kernel: duplicated particles stay identical (FK reduces to "
                       "best-of-N); pass --kernel flow_sde --eta 0.7")
    from flowalign.models import resolve as resolve_model

    family = resolve_model(args.model)  # an unknown name: one line with the closest one
    default = getattr(family, "default_rewards", None)  # (verdict, partial credit) of a family's own verifier
    if args.reward is None:
        if default is None:
            raise UserError(f"--reward is required for --model {args.model} (it has no built-in verifier): e.g. "
                            f"--reward pickscore --reward-arg pickscore.path=/weights/PickScore_v1")
        args.reward = default[-1]
    if args.eval_rewards is None:
        args.eval_rewards = ",".join(default) if default is not None else \
            ",".join(n.split(":")[0].strip() for n in args.reward.split(","))
    out = check_out_dir(args.out, args.resume, PARTIAL)
    weights = _parse_weights(args.reward)
    if not weights:
        raise UserError("--reward is empty; pass e.g. --reward shapes_partial")
    eval_names = [n.strip() for n in args.eval_rewards.split(",") if n.strip()]
    if not eval_names:
        raise UserError("--eval-rewards is empty; pass e.g. --eval-rewards shapes_strict")
    for n in [*weights, *eval_names]:
        resolve_reward(n)  # unknown names: one line with the closest one
    reward_kwargs, per_frame, model_kwargs = parse_component_args(args, [*weights, *eval_names])
    from flowalign.evaluate import guidance_with_model_args

    args.guidance = guidance_with_model_args(args.guidance, model_kwargs)  # one scale, or a one-line refusal
    if args.prompt_file and args.prompts:
        raise UserError(f"pass prompts as arguments or --prompt-file {args.prompt_file!r}, not both")
    if not args.prompt_file and not args.prompts:  # as eval: the family's own benchmark prompts, when it has them
        from flowalign.sample import default_prompt_set

        args.prompt_file = default_prompt_set(family, args.model)
    if args.prompt_file:
        records = D.load_prompts(args.prompt_file)
    else:
        records = [D.PromptRecord(pr) for pr in check_prompt_args(args.prompts)]
    records = D.spaced_subset(records, args.max_prompts)  # of the file's prompts or of the arguments
    if not records:
        raise UserError("no prompts given; pass prompts as arguments or --prompt-file NAME_OR_PATH")
    if args.lora:
        check_lora_dir(args.lora)
    steer_fns = {n: build_reward_checked(n, reward_kwargs[n], f"--reward-arg: reward {n!r}") for n in weights}
    if guides:
        flat = [n for n, fn in steer_fns.items() if not getattr(fn, "differentiable", False)]
        if flat:
            what = "--method guided" if args.method == "guided" else "--proposal guided"
            raise UserError(f"{what} needs differentiable steering rewards; {flat} are not (see "
                            f"`flowalign rewards`); steer them with --method fk or best_of_n")
    reward_std = _reward_std(args.reward_std, weights) if args.reward_std is not None else None
    lam = args.lam / reward_std if reward_std is not None else args.lam  # λ per reward std → per reward unit
    beta_eff = beta * reward_std if reward_std is not None else beta
    scaled = f" / --reward-std {reward_std:g}" if reward_std is not None else ""
    if args.method == "fk" and (not math.isfinite(lam) or (args.lam > 0) != (lam > 0)):
        raise UserError(f"--lam {args.lam:g}{scaled} is λ = {lam:g} per raw reward unit: out of range")
    if args.proposal == "guided" and not math.isfinite(1.0 / lam):
        raise UserError(f"--lam {args.lam:g}{scaled} = {lam:g} is too small for --proposal guided (its guidance uses "
                        f"beta = 1/lam)")
    if args.method == "guided" and not (math.isfinite(beta_eff) and beta_eff > 0):
        raise UserError(f"--beta {beta:g} * --reward-std {reward_std:g} is beta = {beta_eff:g} per reward unit: out of "
                        f"range")
    model = load_model(args.model, args.path, device=device, **model_kwargs)
    if args.lora:
        load_lora_checked(model, args.lora)
    rows = [{"prompt": r.prompt, **r.metadata} for r in records]
    validate = getattr(model, "validate_prompts", None)  # a closed vocabulary (shapes): the file and line of a bad word
    if validate is not None:
        D.check_prompts(records, validate)
    for pr in dict.fromkeys(r["prompt"] for r in rows):
        model.encode([pr])  # out-of-grammar / unreadable prompts fail before any sampling
    from flowalign.evaluate import warn_outside_grammar

    warn_outside_grammar(model, [r["prompt"] for r in rows], args.model, "steering")
    outputs = getattr(model, "output_kind", "image")
    steer_fns = {n: for_outputs(fn, outputs, per_frame) for n, fn in steer_fns.items()}
    eval_fns = {n: steer_fns[n] if n in steer_fns else for_outputs(build_reward_checked(n, reward_kwargs[n], f"--reward-arg: reward {n!r}"), outputs, per_frame)
                for n in eval_names}  # a reward both steers and scores: built (and its weights loaded) once
    for fn in [*steer_fns.values(), *eval_fns.values()]:
        check = getattr(fn, "validate_prompts", None)
        if check is not None:
            check([r["prompt"] for r in rows])
    steps = resolve_steps(model, args.steps)
    schedule = fk_schedule(steps)
    guidance = args.guidance
    if guidance is not None:
        model.guidance_scale = float(guidance)
    # every setting that shapes the outputs, as resolved: a resumed run must use the same ones (io.BatchJournal)
    resolved = {"steps": steps, "kernel": kernel, "eta": eta, "lam_per_unit": lam, "beta_per_unit": beta_eff,
                "resample_steps": schedule, "guidance_used": getattr(model, "guidance_scale", None)}
    redo = grid_batches(len(rows), args.seeds, GRID_PROMPTS, outputs_per_batch(args.method, args.particles,
                                                                               args.batch_size))  # for their pixels
    journal = BatchJournal(out / PARTIAL, {**{k: v for k, v in vars(args).items() if k not in ("out", "resume")},
                                           **resolved}, resume=args.resume, redo=redo, prompts=rows)
    if args.resume:
        logger.info("resuming %s: %d of %d outputs already steered%s", out, len(journal.records()),
                    len(rows) * args.seeds, f"; {journal.redone} more finished ones are steered again, in the batches "
                    "that hold the grid's outputs (for their pixels)" if journal.redone else "")
    with torch.no_grad() if args.method != "guided" else contextlib.nullcontext():
        records_out, grid, cost = steer_prompts(
            model, rows, {n: (steer_fns[n], w) for n, w in weights.items()}, eval_fns, method=args.method,
            steps=steps, k=args.particles, lam=lam, kernel=kernel, eta=eta, seeds_per_prompt=args.seeds,
            seed=args.seed, batch_size=args.batch_size, potential=args.potential, resampler=args.resampler,
            probe=args.probe, ess_threshold=args.ess, schedule=schedule, output=args.output or "best", beta=beta_eff,
            guide_mode=args.guide_mode, band=band, normalize=args.normalize, clip=args.clip, grid_prompts=GRID_PROMPTS,
            proposal=args.proposal, temper=args.temper, progress=True, journal=journal)
    # as `flowalign eval` averages and labels its numbers: a built-in set's protocol gives the overall convention,
    # and a steered result is never a benchmark one (the protocols sample one ODE image per seed)
    protocol = find_protocol(args.prompt_file)
    overall = protocol.overall if protocol is not None else "groups"
    summ = summarize(records_out, eval_names, overall=overall)
    passk = summarize_pass_at_k(records_out, eval_names, overall=overall)
    if passk:
        summ["pass_at_k"] = passk
    size = getattr(model, "output_size", None)
    summ["settings"] = {
        "method": args.method, "particles": cost["particles"], "steer_rewards": weights, "steps": steps,
        "guidance": float(getattr(model, "guidance_scale", float("nan"))), "kernel": kernel, "eta": eta,
        "seeds_per_prompt": args.seeds, "seed": args.seed, "prompts": len(rows), "model": args.model,
        "path": args.path or None, "lora": args.lora, "prompt_set": args.prompt_file, "max_prompts": args.max_prompts,
        "rewards": eval_names, "prompts_sha256": prompts_digest(as_records(records)), "overall": overall,
        **({"resolution": size()} if callable(size) else {}),
        **({"model_args": model_args_jsonable(model_kwargs)} if model_kwargs else {}),
        **({"reward_args": reward_kwargs} if any(reward_kwargs.values()) else {}),
        **({"per_frame": per_frame} if per_frame and outputs == "video" else {}),
        **({"lam": args.lam, "potential": args.potential, "resampler": args.resampler, "probe": args.probe,
            "ess": args.ess, "resample_steps": schedule, "output": args.output or "best", "proposal": args.proposal,
            "temper": args.temper} if args.method == "fk" else {}),
        **({"beta": beta} if args.method == "guided" else {}),
        **({"guide_mode": args.guide_mode, "band": list(band), "normalize": args.normalize, "clip": args.clip}
           if guides else {}),
        **({"reward_std": reward_std, "reward_std_from": args.reward_std,
            **({"lam_per_reward_unit": lam} if args.method == "fk" else {}),
            **({"beta_per_reward_unit": beta_eff} if args.method == "guided" else {})}
           if reward_std is not None else {}),
    }
    if protocol is not None:
        status = protocol_status(protocol, summ["settings"])
        if args.method != "none" or eta > 0:  # the protocol's sampler is the ODE, one image per seed
            status["overrides"]["sampler"] = {"protocol": "ODE (euler), one image per seed",
                                              "used": f"steer --method {args.method} (k = {cost['particles']}, "
                                                      f"{kernel}, eta {eta:g})"}
            status["benchmark"] = False
        summ["settings"]["benchmark"] = status
    summ["cost"] = cost
    summ["steer_reward_mean"] = sum(r["steer_reward"] for r in records_out) / len(records_out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records_out))
    atomic_write_text(out / "summary.json", json.dumps(summ, indent=2, default=str))
    if grid is not None:
        from flowalign.sample import save_grid

        n_prompts = min(GRID_PROMPTS, len(rows))
        # captioned as eval's grid is: the prompt and its outputs' scores under the first evaluation reward
        score = {(r["prompt_index"], r["sample"]): r.get(eval_names[0]) for r in records_out}
        labels = []
        for i, r in enumerate(rows[:n_prompts]):
            vals = " ".join(format(float(score[(i, k)]), ".3g") for k in range(args.seeds)
                            if score.get((i, k)) is not None)
            labels += [r["prompt"] + (f"  [{eval_names[0]}: {vals}]" if vals else "")] + [""] * (args.seeds - 1)
        save_grid(grid, out / "grids" / "steered.png", nrow=args.seeds, labels=labels,
                  fps=getattr(model, "fps", None))  # video: + steered.gif at the model's frame rate
    from flowalign.report import write_report

    write_report(out)
    journal.close()
    for task, vals in summ["per_task"].items():
        logger.info("%-14s %s", task, "  ".join(f"{k}={v:.3f}" for k, v in vals.items()))
    logger.info("overall        %s", "  ".join(f"{k}={v:.3f}" for k, v in summ["overall"].items()))
    logger.info("cost: %.0f forwards and %.1f steering-reward rows per image (%s, k = %d); wrote %s",
                cost["forwards_per_image"], cost["steer_reward_rows_per_image"], args.method, cost["particles"], out)
    if "benchmark" in summ["settings"]:
        status = summ["settings"]["benchmark"]
        (logger.info if status["benchmark"] else logger.warning)("%s", benchmark_line(status))
    return 0


def _reward_std(spec: str, weights: Mapping[str, float]) -> float:
    """``--reward-std``: a number, or the std of Σ w·R over an earlier output's ``results.jsonl`` (the reference std
    that expresses λ per reward unit, METHODS.md §6.2 [flowalign]). One-line ``UserError`` on anything unusable."""
    import json
    from pathlib import Path

    from flowalign.errors import UserError

    try:
        value = float(spec)
    except ValueError:
        value = None
    if value is None:
        path = Path(spec) / "results.jsonl"
        if not path.is_file():
            raise UserError(f"--reward-std {spec!r}: neither a number nor a directory with a results.jsonl (an earlier "
                            f"`flowalign steer --method none` or `flowalign eval` output)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--reward-std: cannot read {path} ({e})") from None
        totals = []
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                totals.append(sum(w * float(row[name]) for name, w in weights.items()))
            except (ValueError, TypeError, AttributeError):
                raise UserError(f"--reward-std: {path}:{n} is not a results line with numbers") from None
            except KeyError as e:
                raise UserError(f"--reward-std: {path}:{n} has no {e.args[0]!r} score; use a run that scored "
                                f"the steering rewards (--eval-rewards {','.join(weights)})") from None
        finite = [t for t in totals if math.isfinite(t)]
        if len(finite) < 2:
            raise UserError(f"--reward-std: {path} has {len(finite)} finite scores; a std needs at least 2")
        mean = sum(finite) / len(finite)
        value = math.sqrt(sum((t - mean) ** 2 for t in finite) / (len(finite) - 1))
        logger.info("reward std %.4g over %d images of %s", value, len(finite), path)
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"--reward-std must be a finite number > 0 (or a run whose scores vary), got {value}")
    return value


PLOT_SAME = ("prompts_sha256", "prompts", "seeds_per_prompt", "seed")  # what makes two steered outputs comparable


def check_same_images(sums: Mapping[str, Mapping]) -> None:
    """A one-line ``UserError`` unless every summary steered the same prompts with the same seeds (``PLOT_SAME``): a
    plot's lines compare methods output for output, and runs on other prompts were drawn into one line unnoticed."""
    from flowalign.errors import UserError

    (first, ref), *rest = sums.items()
    for d, s in rest:
        diff = [f"{k} {_short(ref['settings'].get(k))} vs {_short(s['settings'].get(k))}" for k in PLOT_SAME
                if ref["settings"].get(k) != s["settings"].get(k)]
        if diff:
            raise UserError(f"--plot {d!r} steered other images than {first!r} ({', '.join(diff)}); plot runs "
                            f"made on the same prompts and seeds together")


def _short(value: Any) -> str:
    return f"{value[:12]}…" if isinstance(value, str) and len(value) > 16 else str(value)


def _plot_runs(dirs: Sequence[str], out: str, reward: Optional[str]) -> int:
    """``flowalign steer --plot DIR… --out F.png``: earlier outputs' ``reward`` against forwards per image (None: the
    first directory's first evaluation reward)."""
    from pathlib import Path

    from flowalign.errors import UserError
    from flowalign.report import plot_steering, read_summary
    from flowalign.sample import check_out_parent

    if Path(out).suffix.lower() != ".png" or Path(out).is_dir():
        raise UserError(f"--out {out!r}: with --plot, --out is the plot's .png file")
    check_out_parent(out)
    sums = {}
    for d in dirs:
        path = Path(d) / "summary.json"
        if not path.is_file():
            raise UserError(f"--plot {d!r}: no summary.json there; pass directories written by `flowalign steer`")
        s = read_summary(path)
        if "cost" not in s:
            raise UserError(f"--plot {d!r}: its summary.json has no steering cost; pass directories written by "
                            f"`flowalign steer` (not `flowalign eval`)")
        if reward is None:
            from flowalign.compare import default_reward_note, first_reward

            reward = first_reward(s) or "shapes_strict"
            logger.info("plotting %s", default_reward_note(reward, f"{d}'s evaluation", list(s["overall"]),
                                                           "--plot-reward"))
        if reward not in s["overall"]:
            raise UserError(f"--plot {d!r} has no {reward!r} (it has {', '.join(s['overall'])}); pass --plot-reward")
        sums[str(d)] = s
    check_same_images(sums)
    for d, s in sums.items():
        logger.info("%-40s %s=%.3f  forwards/image=%.0f  (%s, k = %s)", d, reward, s["overall"][reward],
                    s["cost"]["forwards_per_image"], s["settings"].get("method"), s["cost"].get("particles"))
    written = plot_steering(sums, out, reward)
    logger.info("wrote %s", written)
    return 0
