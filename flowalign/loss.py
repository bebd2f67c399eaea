"""The clipped GRPO surrogate, the Gaussian KL to the reference policy (METHODS.md §3.6), the DiffusionNFT loss and the learning-rate schedules. Pure functions."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from flowalign.types import Trajectory


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


def guard_surrogate(logp: Tensor, old_logp: Tensor, adv: Tensor, clip_range: float, *, mean: Tensor,
                    old_mean: Tensor, std: Tensor, delta: Tensor, reduce: str = "mean") -> tuple[Tensor, Tensor]:
    """GRPO-Guard's regulated clipping (Wang et al. 2025, "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow
    Matching via Regulated Clipping", arXiv:2510.22319; METHODS.md §3.9).

    For x' = μ_old + s·ξ the Gaussian log-ratio is ℓ_θ − ℓ_old = red(ξ·d)/s − red(d²)/(2s²) with d = μ_θ − μ_old and
    red the log-prob's reduction over the latent (mean or sum): its mean over ξ is below 0 and its spread scales with
    1/s, so the ratio sits left of 1 and its width depends on the step. RatioNorm adds the bias b = red(d²)/(2s²)
    and multiplies by s: ρ = exp((ℓ_θ − ℓ_old + b)·s) = exp(red(ξ·d)), centred on 1 at every step. The clipped loss
    max(−Â·ρ, −Â·clip(ρ, 1−ε, 1+ε)) is divided by Δ_t = σ_t − σ_{t+1}, which evens the gradient across steps.
    ``mean``: μ_θ [N, *latent] (with grad), ``old_mean``: μ_old (detached), ``std``: the step std s [N] or a scalar,
    ``delta``: Δ_t [N]. Needs the exact Gaussian log-prob (not CPS's surrogate). Returns (loss [N], ρ [N]).
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if old_mean is None:
        raise ValueError("GRPO-Guard needs the rollout's step means μ_old (the trajectory kept no velocities)")
    d2 = (mean.float() - old_mean.float().detach()).pow(2).flatten(1)  # [N, D]
    d2 = d2.mean(1) if reduce == "mean" else d2.sum(1)  # [N]
    s = torch.as_tensor(std, dtype=d2.dtype, device=d2.device)
    s = s.expand(d2.shape[0]) if s.dim() == 0 else s.reshape(d2.shape[0], -1)[:, 0]  # [N]
    live = s > 0  # [N] a step without noise has no density (gaussian_log_prob stores 0): ratio 1, no loss
    bias = d2 / (2.0 * s.clamp_min(1e-20) ** 2)  # [N]
    ratio = torch.where(live, torch.exp(torch.where(live, (logp - old_logp.detach() + bias) * s, 0.0)),
                        torch.ones_like(s))  # [N]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped) / delta.to(ratio.dtype).clamp_min(1e-20)  # [N]
    return torch.where(live, loss, torch.zeros_like(loss)), ratio.detach()


def _clipped(logp: Tensor, old_logp: Tensor, adv: Tensor, clip_range: float, **_: Tensor) -> tuple[Tensor, Tensor]:
    return clipped_surrogate(logp, old_logp, adv, clip_range)


# train.surrogate → the per-pair policy loss ``(logp, old_logp, adv, clip_range, *, mean, old_mean, std, delta,
# reduce) -> (loss [N], ρ [N])``: the step's re-scored and rollout means ride along for the variants that need them
SURROGATES = {"clipped": _clipped, "guard": guard_surrogate}


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor, dt: Tensor, form: str = "exact") -> Tensor:
    """KL between two Gaussians that share the std s_t, element-mean reduced (METHODS.md §3.6).

    ``exact``: mean_D((μ_θ − μ_ref)²) / (2 s²). ``flow_grpo``: the same times Δ_t = −dt (Flow-GRPO divides by
    2g² instead of 2g²Δ, quirk Q3; use it to reproduce published β). Returns [N].
    """
    diff = (mean.float() - ref_mean.float().detach()) ** 2
    msd = diff.flatten(1).mean(dim=1)  # [N]
    std = torch.as_tensor(std, dtype=msd.dtype, device=msd.device)
    s2 = (std.expand(msd.shape[0]) if std.dim() == 0 else std.reshape(msd.shape[0], -1)[:, 0]) ** 2  # [N]
    # a step without noise (s = 0) has no density: KL 0, as gaussian_log_prob stores log p = 0 there (§2.5)
    kl = torch.where(s2 > 0, msd / (2.0 * s2.clamp_min(1e-20)), torch.zeros_like(msd))  # [N]
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


def velocity_kl(v_theta: Tensor, v_ref: Tensor) -> Tensor:
    """The KL-to-reference term of ``objective=nft``: ‖v_θ − v_ref‖² per row, element-mean over the latent.

    For two Gaussian transition kernels with the same std s and means x + dt·v, the KL is
    dt²·‖v_θ − v_ref‖²/(2s²) (Flow-GRPO's closed-form KL, Liu et al. 2025, arXiv:2505.05470): proportional to
    this at every step. NFT has no sampler steps, so it penalises the velocity gap itself at its noise points.
    ``v_ref`` is detached. Shapes: [N, *latent] → [N] float32.
    """
    return (v_theta.float() - v_ref.detach().float()).pow(2).flatten(1).mean(1)  # [N]


def nft_optimality(adv: Tensor) -> Tensor:
    """DiffusionNFT's optimality probability r = ½ + ½·clip(A, −1, 1) ∈ [0, 1] from a normalised advantage A.

    Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process" (arXiv:2509.16117): the
    raw reward minus its per-prompt mean, divided by a normaliser and clipped, is mapped to the probability that
    a sample is "positive". Here A is the trainer's group-normalised advantage; A = 0 (an average sample, or a
    group whose rewards are all equal) gives r = ½, which contributes no improvement direction. Returns [B].
    """
    return 0.5 + 0.5 * adv.to(torch.float32).clamp(-1.0, 1.0)


def nft_positive_only(adv: Tensor) -> Tensor:
    """Positives only: r = 1 where A > 0, else ½. A rejection-sampling fine-tuning (RAFT, Dong et al. 2023,
    arXiv:2304.06767) variant of DiffusionNFT's r: better-than-average samples are fitted by flow matching, the others
    add no direction, only the proximal term β²‖v_θ − v_old‖² that r = ½ leaves in ``nft_loss``. Returns [B]."""
    return torch.where(adv.to(torch.float32) > 0, 1.0, 0.5)


def nft_self_distill(adv: Tensor) -> Tensor:
    """The reward-free control: r = 1 for every row, whatever its advantage. With β = 1 the update is plain flow
    matching on the policy's own samples (self-distillation), the self-consuming loop of Alemohammad et al. 2023
    ("Self-Consuming Generative Models Go MAD", arXiv:2307.01850). A diagnostic, not a method: it shows which part of
    a run's change comes from fitting its own samples rather than from the reward (docs/results.md). Pair it with
    ``train.filter_zero_std=false`` so that no rollout is dropped for its group's rewards. Returns [B]."""
    return torch.ones_like(adv, dtype=torch.float32)


# train.nft_optimality → the map from normalised advantages A [B] to DiffusionNFT's r [B]
NFT_OPTIMALITY = {"clip": nft_optimality, "positive": nft_positive_only, "self": nft_self_distill}


def nft_fresh_noise(traj: Trajectory, rows: Tensor, t: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """DiffusionNFT's forward process (Zheng et al. 2025, arXiv:2509.16117): an independent ε ~ N(0, I) per row,
    x_t = (1 − t)·x_0 + t·ε. rows [N] (sample index per row), t [N] → (t, ε [N, *latent]) on the CPU."""
    return t, torch.randn((rows.shape[0], *traj.final.shape[1:]), generator=generator)


def nft_initial_noise(traj: Trajectory, rows: Tensor, t: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The rollout's own initial noise x_1 as ε, so each row lies on the straight line from the noise that produced
    its sample to the sample. That is the coupling of rectified flow's reflow (Liu et al. 2023, "Flow Straight and
    Fast", arXiv:2209.03003, §2.3: fit v on the pairs (X_0, X_1) = (noise, its own ODE sample)), here weighted by
    DiffusionNFT's r: positives are fitted along their own noise→sample line, negatives pushed off it, so the update
    acts on the noise-to-image map that an ODE evaluation from fixed seeds reads. → (t, ε [N, *latent]) (CPU)."""
    return t, traj.latents[rows.to(traj.latents.device), 0].detach().float().cpu()


def nft_path_noise(traj: Trajectory, rows: Tensor, t: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The rollout's own states: each row takes a step k ~ U{0 … T−1} of its trajectory, t = σ_k and
    ε = (x_k − (1 − σ_k)·x_0)/σ_k, so that x_t = (1 − t)·x_0 + t·ε is the state x_k the sampler visited and the target
    v = ε − x_0 = (x_k − x_0)/σ_k points from it straight at the sample it reached. Positives then sharpen x̂_0 along
    the path that produced them, negatives are pushed off theirs: the update acts where the sampler (and an
    evaluation with the same grid) actually passes. Replaces the drawn t. → (t [N], ε [N, *latent]) (CPU)."""
    lat = traj.latents.detach().float().cpu()  # [B, T+1, *latent]
    k = torch.randint(0, traj.steps, (rows.shape[0],), generator=generator)  # [N]
    s = traj.sigmas.detach().float().cpu()[k]  # [N]
    view = (-1,) + (1,) * (lat.dim() - 2)
    x0, xk = lat[rows, -1], lat[rows, k]  # [N, *latent] each
    return s, (xk - (1 - s.view(view)) * x0) / s.view(view)


# train.nft_noise → (t [N], ε [N, *latent]) of each DiffusionNFT row's x_t = (1 − t)·x_0 + t·ε
NFT_NOISE = {"fresh": nft_fresh_noise, "initial": nft_initial_noise, "path": nft_path_noise}


def _uniform_branch(err: Tensor, t: Optional[Tensor]) -> Tensor:
    """‖v± − v‖²/D: the velocity MSE of one implicit policy. err [N, D] → [N]."""
    return err.pow(2).mean(1)


def _adaptive_branch(err: Tensor, t: Optional[Tensor]) -> Tensor:
    """DiffusionNFT's adaptive weighting (Zheng et al. 2025, arXiv:2509.16117): the x_0-space error
    x̂_0 − x_0 = t·(v − v±) squared and divided by its own detached mean magnitude, t·‖v± − v‖²/sg(mean|v± − v|).
    It balances rows whose errors differ by orders of magnitude across t. err [N, D], t [N] → [N]."""
    if t is None:
        raise ValueError("the adaptive NFT weighting needs the rows' noise levels t")
    return t.to(err.dtype) * err.pow(2).mean(1) / err.detach().abs().mean(1).clamp_min(1e-5)


NFT_WEIGHTINGS = {"uniform": _uniform_branch, "adaptive": _adaptive_branch}  # train.nft_weighting → branch loss


def nft_loss(v_theta: Tensor, v_old: Tensor, v_target: Tensor, r: Tensor, beta: float,
             t: Optional[Tensor] = None, weighting: str = "uniform") -> Tensor:
    """DiffusionNFT negative-aware flow-matching loss per row (Zheng et al. 2025, arXiv:2509.16117).

    Paper symbols → ours: v_θ^+ = (1 − β)·v^old + β·v_θ (implicit positive policy), v_θ^- = (1 + β)·v^old − β·v_θ
    (implicit negative policy), v = ε − x_0 the flow-matching target at x_t = (1 − t)·x_0 + t·ε, r the
    optimality probability (``nft_optimality``):

        L = r·‖v_θ^+ − v‖² + (1 − r)·‖v_θ^- − v‖²   (element-mean over the sample's dimensions).

    Its gradient at v_θ = v^old is −2β·(2r − 1)·(v − v^old)/D: positives pull the velocity towards their own
    targets, negatives push it away, and r = ½ adds nothing; its minimiser is v_θ = v^old + (2r − 1)(v − v^old)/β,
    so β sets how far one update may move the policy. With r = 1 and β = 1 it is plain flow matching.
    ``v_old`` is detached. Shapes: velocities [N, *latent], r [N] → [N] float32.

    ``weighting`` names the per-branch loss in ``NFT_WEIGHTINGS``: ``uniform`` (the formula above) or ``adaptive``
    (the paper's x_0-error self-normalisation, which needs the rows' noise levels ``t`` [N]).
    """
    v_old = v_old.detach().float()
    v_theta = v_theta.float()
    diff = v_theta - v_old  # [N, *latent]
    res = v_target.float() - v_old  # [N, *latent]
    branch = NFT_WEIGHTINGS[weighting]
    pos = branch((beta * diff - res).flatten(1), t)  # v⁺ − v → [N]
    neg = branch((beta * diff + res).flatten(1), t)  # v⁻ − v → [N]
    r = r.to(pos.dtype)
    return r * pos + (1.0 - r) * neg  # [N]


def _lr_constant(it: int, total: int) -> float:
    """1 at every iteration: the learning rate as configured."""
    return 1.0


def _lr_cosine(it: int, total: int) -> float:
    """Cosine decay from 1 at iteration 0 towards 0 at ``total`` (Loshchilov & Hutter 2017, SGDR, eq. 5 without
    restarts): ½·(1 + cos(π·it/total)). Iteration ``it`` is 0-based; the last one gets ½·(1 − cos(π/total)) > 0."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(it, 0), total) / max(total, 1)))


# train.lr_schedule → the factor on train.lr at 0-based iteration `it` of `total`. A function of the iteration
# alone, so a resumed run sets exactly the learning rate an uninterrupted one would (no scheduler state to save).
LR_SCHEDULES = {"constant": _lr_constant, "cosine": _lr_cosine}
