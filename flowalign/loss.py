"""The clipped GRPO surrogate and the Gaussian KL to the reference policy (METHODS.md §3.6). Pure functions."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LossTerms(NamedTuple):
    policy: Tensor  # [N] per-pair clipped surrogate (to be summed and divided by |S|)
    kl: Tensor  # [N] per-pair KL (0 when β = 0)
    ratio: Tensor  # [N] importance ratio ρ (detached)


def clipped_surrogate(logp: Tensor, old_logp: Tensor, adv: Tensor, clip_range: float) -> tuple[Tensor, Tensor]:
    """PPO/GRPO clipped objective per pair (Flow-GRPO, Liu et al. 2025, Eq. 6; METHODS.md §3.6).

    ρ = exp(ℓ_θ − ℓ_old); loss = max(−Â·ρ, −Â·clip(ρ, 1−ε, 1+ε)). ``adv`` is Â already clipped to ±A_max and
    multiplied by positive per-step weights (max(w·a, w·b) = w·max(a, b) for w > 0). Returns (loss [N], ρ [N]).
    """
    ratio = torch.exp(logp - old_logp.detach())  # [N]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio.detach()


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor, dt: Tensor, form: str = "exact") -> Tensor:
    """KL between two Gaussians that share the std s_t, element-mean reduced (METHODS.md §3.6).

    ``exact``: mean_D((μ_θ − μ_ref)²) / (2 s²). ``flow_grpo``: the same times Δ_t = −dt (Flow-GRPO divides by
    2g² instead of 2g²Δ, quirk Q3; use it to reproduce published β). Returns [N].
    """
    diff = (mean.float() - ref_mean.float().detach()) ** 2
    msd = diff.flatten(1).mean(dim=1)  # [N]
    s2 = torch.as_tensor(std, dtype=msd.dtype, device=msd.device).reshape(msd.shape[0], -1)[:, 0] ** 2  # [N]
    kl = msd / (2.0 * s2.clamp_min(1e-20))
    if form == "exact":
        return kl
    if form == "flow_grpo":
        return kl * (-dt.to(kl.dtype))
    raise ValueError(f"kl_form must be 'exact' or 'flow_grpo', got {form!r}")


def ratio_stats(ratio: Tensor, logp: Tensor, old_logp: Tensor, clip_range: float) -> dict[str, float]:
    """approx_kl = ½·mean((ℓ_θ − ℓ_old)²), clip fractions above/below the trust region (METHODS.md §3.6)."""
    d = (logp.detach() - old_logp.detach()).double()
    return {
        "approx_kl": float(0.5 * (d * d).mean()) if d.numel() else 0.0,
        "clipfrac_high": float((ratio > 1 + clip_range).double().mean()) if d.numel() else 0.0,
        "clipfrac_low": float((ratio < 1 - clip_range).double().mean()) if d.numel() else 0.0,
        "ratio_mean": float(ratio.double().mean()) if d.numel() else 1.0,
    }
