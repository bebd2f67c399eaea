"""Gaussian step kernels and the one log-density (METHODS.md §2).

A kernel is a pure function ``(x_t, v_t, σ_t, σ_{t+1}, η_t) -> Transition(mean μ_t, std s_t)``. The loop
draws ``x_{t+1} = μ_t + s_t·ξ``; re-scoring during training calls the same kernel. ``sigma``,
``sigma_next`` and ``eta`` are 0-d tensors or per-sample ``[B]`` tensors (a micro-batch may mix
timesteps); they are broadcast against ``x`` without a Python loop over the batch.

All arithmetic is done in float32 (or wider): bf16 overflows in the mean (METHODS.md §2).
Every kernel is **exactly** Euler at η = 0: s = 0 and μ = x + dt·v bit for bit.
"""

from __future__ import annotations

import math
from typing import Annotated, Optional

import torch
from torch import Tensor

from flowalign.types import Interval, Transition

_LOG_2PI = math.log(2.0 * math.pi)


def _bc(a: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a scalar / 0-d / [B] coefficient against x [B, *latent] (no host sync)."""
    a = torch.as_tensor(a, dtype=x.dtype, device=x.device)
    if a.dim() == 0:
        return a
    return a.reshape(a.shape[0], *([1] * (x.dim() - 1)))  # [B, 1, ..., 1]


def _prep(x: Tensor, v: Tensor, sigma, sigma_next, eta):
    # fp32 for all SDE math: bf16/fp16 model outputs overflow or lose the tiny increments.
    dt_type = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dt_type)
    v = v.to(dt_type)
    s = _bc(sigma, x)
    sn = _bc(sigma_next, x)
    e = _bc(eta, x)
    return x, v, s, sn, e


def euler(x: Tensor, v: Tensor, sigma, sigma_next, eta=0.0, **_: object) -> Transition:
    """Euler / ODE step (METHODS.md §2.1): μ = x + dt·v, s = 0."""
    x, v, s, sn, _e = _prep(x, v, sigma, sigma_next, eta)
    mean = x + (sn - s) * v  # [B, *latent]
    return Transition(mean, torch.zeros_like(sn))


def flow_sde(x: Tensor, v: Tensor, sigma, sigma_next, eta, *,
             sigma_1: Optional[Annotated[float, Interval(0.0, 1.0, high_open=True)] | Tensor] = None) -> Transition:
    """Flow-GRPO SDE step (Liu et al. 2025, "Flow-GRPO", Eq. 9; METHODS.md §2.2), η = a ("noise level").

    g_t = a·sqrt(σ_t / (1 − σ̃_t)) with σ̃_t = σ_t if σ_t < 1 else σ_1; μ = x + dt·[v + g²/(2σ)·x̂1];
    s = g·sqrt(Δ_t). ``sigma_1`` defaults to ``sigma_next`` where σ_t = 1 (at t = 0 that *is* σ_1), so a
    flat batch of transitions needs no extra schedule constant.
    """
    x, v, s, sn, a = _prep(x, v, sigma, sigma_next, eta)
    dt = sn - s
    s1 = sn if sigma_1 is None else _bc(sigma_1, x)
    s_tilde = torch.where(s < 1, s, s1)
    g = a * torch.sqrt(s / (1 - s_tilde))
    x1_hat = x + (1 - s) * v  # predicted noise  [B, *latent]
    drift = v + (g * g / (2 * s)) * x1_hat
    mean = torch.where(a == 0, x + dt * v, x + dt * drift)  # [B, *latent]  bit-exact Euler at η = 0
    std = g * torch.sqrt(-dt)
    return Transition(mean, std)


def dance_sde(x: Tensor, v: Tensor, sigma, sigma_next, eta) -> Transition:
    """DanceGRPO SDE step (Xue et al. 2025, "DanceGRPO"; METHODS.md §2.3): g_t ≡ η (per-step η allowed).

    μ = x + dt·[v + η²/(2σ)·x̂1], s = η·sqrt(Δ_t).
    """
    x, v, s, sn, g = _prep(x, v, sigma, sigma_next, eta)
    dt = sn - s
    x1_hat = x + (1 - s) * v
    drift = v + (g * g / (2 * s)) * x1_hat
    mean = torch.where(g == 0, x + dt * v, x + dt * drift)  # [B, *latent]
    std = g * torch.sqrt(-dt)
    return Transition(mean, std)


def cps(x: Tensor, v: Tensor, sigma, sigma_next, eta) -> Transition:
    """Coefficients-Preserving Sampling (Wang & Yu 2025, "CPS"; METHODS.md §2.4), η = a.

    s = σ'·sin(aπ/2); μ = (1 − σ')·x̂0 + σ'·cos(aπ/2)·x̂1. Deterministic at the last step (σ' = 0).
    """
    x, v, s, sn, a = _prep(x, v, sigma, sigma_next, eta)
    x0_hat = x - s * v
    x1_hat = x + (1 - s) * v
    std = sn * torch.sin(a * (math.pi / 2))
    cps_mean = (1 - sn) * x0_hat + sn * torch.cos(a * (math.pi / 2)) * x1_hat
    mean = torch.where(a == 0, x + (sn - s) * v, cps_mean)  # [B, *latent]
    return Transition(mean, std)


def ddim_sde(x: Tensor, v: Tensor, sigma, sigma_next, eta) -> Transition:
    """DDIM-like stochastic step of Stepwise-Flow-GRPO (METHODS.md §4.6), η = a.

    s = a·σ'·sqrt(1 − σ); μ = (1 − σ')·x̂0 + sqrt(σ'² − s²)·x̂1 (DDIM's form, as CPS: the x̂1 coefficient and the
    noise share σ'², so x_{t+1} keeps the flow's coefficients). Unlike ``flow_sde`` the noise vanishes at σ = 1 and
    grows as σ falls, so the first, image-deciding steps are nearly deterministic. σ'² − s² is clamped at 0 (s > σ'
    needs a > 1/sqrt(1 − σ)). Deterministic at the last step (σ' = 0).
    """
    x, v, s, sn, a = _prep(x, v, sigma, sigma_next, eta)
    x0_hat = x - s * v
    x1_hat = x + (1 - s) * v
    std = a * sn * torch.sqrt((1 - s).clamp_min(0))
    ddim_mean = (1 - sn) * x0_hat + torch.sqrt((sn * sn - std * std).clamp_min(0)) * x1_hat
    mean = torch.where(a == 0, x + (sn - s) * v, ddim_mean)  # [B, *latent]  bit-exact Euler at η = 0
    return Transition(mean, std)


KERNELS = {
    "euler": euler,
    "flow_sde": flow_sde,
    "dance_sde": dance_sde,
    "cps": cps,
    "ddim_sde": ddim_sde,
}


# kernels whose step is not an Euler–Maruyama step of the flow SDE (g_t² = s_t²/Δ_t does not hold): reward-gradient
# tilts (flowalign.steer) refuse them
NOT_EULER_MARUYAMA = frozenset({"cps", "ddim_sde"})


def deterministic_at_sigma_one(kernel) -> bool:
    """Whether a stochastic kernel's std is 0 at σ = 1 (η > 0) but not inside the grid: ``ddim_sde``. Every model
    grid starts at σ = 1, so its step 0 is an Euler step (``flowalign.samplers.loop.live_eta``), never trained."""
    kern, z = get_kernel(kernel), torch.zeros(1, 1)
    at_one, inside = (torch.as_tensor(kern(z, z, s, sn, 1.0).std) for s, sn in ((1.0, 0.9), (0.5, 0.4)))
    return bool((at_one == 0).all() and (inside > 0).all())


def get_kernel(kernel):
    """A kernel from its registry name, or the callable itself."""
    if callable(kernel):
        return kernel
    try:
        return KERNELS[kernel]
    except KeyError:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {sorted(KERNELS)}") from None


LOGP_FORMS = ("exact", "cps_mse")


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: Tensor, reduce: str = "mean", form: str = "exact") -> Tensor:
    """Log-density of x_{t+1} under N(mean, std²·I), reduced over the latent (METHODS.md §2.5).

    ``form="exact"`` (default), ``reduce="sum"``: log p = −‖x′ − μ‖²/(2s²) − D·log s − (D/2)·log 2π;
    ``reduce="mean"``: the same divided by D (Flow-GRPO's element-mean; published clip ranges assume it).
    ``form="cps_mse"``: CPS's surrogate −‖x′ − μ‖² (÷ D for ``mean``; Flow-GRPO's ``cps`` code, METHODS.md §2.5
    and Q6): no 1/(2s²) and no constants, so its log-ratios are the exact mean-reduced ones × 2s², and the
    published CPS clip range (1e-5) is calibrated to it. For parity runs only.
    ``x_next`` is detached. Where s = 0 the density is undefined (a deterministic step): 0 is returned and
    no gradient flows (both forms). Returns ``[B]`` in float32 (or wider).
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if form not in LOGP_FORMS:
        raise ValueError(f"form must be one of {LOGP_FORMS}, got {form!r}")
    dtype = torch.promote_types(mean.dtype, torch.float32)
    mean = mean.to(dtype)
    x_next = x_next.detach().to(dtype)
    std = torch.as_tensor(std, dtype=dtype, device=mean.device)
    std = std.expand_as(mean) if std.dim() == mean.dim() else _bc(std, mean).expand_as(mean)
    live = std > 0
    safe = torch.where(live, std, torch.ones_like(std))
    if form == "exact":
        elem = -((x_next - mean) ** 2) / (2 * safe * safe) - torch.log(safe) - 0.5 * _LOG_2PI  # [B, *latent]
    else:  # cps_mse
        elem = -((x_next - mean) ** 2)  # [B, *latent]
    elem = torch.where(live, elem, torch.zeros_like(elem))
    dims = tuple(range(1, elem.dim()))
    out = elem.sum(dim=dims) if dims else elem  # [B]
    if reduce == "mean":
        out = out / max(1, elem[0].numel())
    return out
