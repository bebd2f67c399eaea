"""Sigma grids for flow-matching samplers (METHODS.md §1).

Every grid is a float32 tensor ``[T+1]`` that starts at 1 (noise) and ends at 0 (data). Grids are
computed in float64 and rounded once to float32, which is how diffusers' scheduler ends up too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def shift(u: Tensor, s: float) -> Tensor:
    """shift_s(u) = s·u / (1 + (s−1)·u) (METHODS.md §1.1); s = 1 is the identity.

    ``s`` must be finite and > 0: at s = 0 the grid is 0/0 at u = 1, and for s < 0 the denominator crosses 0 inside
    (0, 1], so the grid is neither finite nor monotone (ValueError)."""
    _check_shift(s)
    return s * u / (1.0 + (s - 1.0) * u)


def shifted_linear(steps: int, shift_value: float = 1.0) -> Tensor:
    """σ_t = shift_s(1 − t/T), t = 0…T, exact endpoints 1 and 0 (METHODS.md §1.2, DanceGRPO; Wan default)."""
    _check_steps(steps)
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)  # [T+1]
    return shift(u, float(shift_value)).to(torch.float32)


def sd3_diffusers(steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> Tensor:
    """The grid of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(T)`` (METHODS.md §1.2).

    The training table is already shifted, so σ_min = shift_s(1/N); ``set_timesteps`` then builds
    ``u = linspace(1, σ_min, T)`` and shifts it again (the double-shift quirk: the last non-zero sigma at
    s = 3 is 0.008929), then appends 0.
    """
    _check_steps(steps)
    _check_shift(shift)
    s = float(shift)
    n = num_train_timesteps
    # diffusers: timesteps = linspace(1, N, N)[::-1]; sigmas = timesteps / N; sigmas = shift(sigmas)
    sigma_min = s * (1.0 / n) / (1.0 + (s - 1.0) * (1.0 / n))
    sigma_max = 1.0
    # set_timesteps: linspace over timesteps (σ·N), divide by N, shift again.
    ts = torch.linspace(sigma_max * n, sigma_min * n, steps, dtype=torch.float64)  # [T]
    u = ts / n
    sig = s * u / (1.0 + (s - 1.0) * u)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)  # [T+1]


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """μ of FLUX's resolution-dependent shift, linear in the packed token count L (METHODS.md §1.3)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux_dynamic(steps: int, image_seq_len: int, **mu_kwargs: float) -> Tensor:
    """FLUX.1 grid: u = linspace(1, 1/T, T), σ = e^μ·u / (e^μ·u + 1 − u), σ_T = 0 (METHODS.md §1.3)."""
    _check_steps(steps)
    mu = flux_mu(image_seq_len, **mu_kwargs)
    u = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)  # [T]
    em = math.exp(mu)
    sig = em / (em + (1.0 / u - 1.0))
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)  # [T+1]


def _check_steps(steps: int) -> None:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def _check_shift(s: float) -> None:
    try:
        ok = math.isfinite(float(s)) and float(s) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"the shift must be a finite number > 0 (1 = no shift), got {s!r}")


SCHEDULES = {
    "sd3_diffusers": sd3_diffusers,
    "shifted_linear": shifted_linear,
    "flux_dynamic": flux_dynamic,
}
