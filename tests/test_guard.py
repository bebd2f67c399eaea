"""GRPO-Guard's regulated clipping (flowalign.loss.guard_surrogate, ``train.surrogate=guard``; METHODS.md §3.9).

Properties: ρ = 1 on-policy; the normalised log-ratio is exactly red(ξ·d) for x' = μ_old + s·ξ and d = μ_θ − μ_old,
so it is centred on 0 and its spread no longer depends on the step's std, where Flow-GRPO's ratio is left-shifted and
1/s wide; the loss is divided by Δ_t; the trainer's first update is on-policy with it.
"""

import json

import pytest
import torch

from flowalign.errors import UserError
from flowalign.loss import SURROGATES, clipped_surrogate, guard_surrogate
from flowalign.samplers.kernels import gaussian_log_prob

from test_train_update import _cfg, _tr, _update_inputs  # noqa: E402


def _pair(s, n=4096, d_scale=0.05, reduce="mean", seed=0):
    g = torch.Generator().manual_seed(seed)
    mu_old = torch.randn(n, 3, 4, 4, generator=g)
    d = d_scale * torch.randn(1, 3, 4, 4, generator=g).expand(n, -1, -1, -1)  # one policy change, many noises
    xi = torch.randn(n, 3, 4, 4, generator=g)
    x_next = mu_old + s * xi
    std = torch.tensor(s)
    lp_new = gaussian_log_prob(x_next, mu_old + d, std, reduce=reduce)
    lp_old = gaussian_log_prob(x_next, mu_old, std, reduce=reduce)
    return mu_old, d, xi, std, lp_new, lp_old


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_guard_log_ratio_is_the_noise_projection_of_the_mean_shift(reduce):
    mu_old, d, xi, std, lp_new, lp_old = _pair(0.3, n=64, reduce=reduce)
    adv = torch.zeros(64)
    _, ratio = guard_surrogate(lp_new, lp_old, adv, 0.1, mean=mu_old + d, old_mean=mu_old, std=std,
                               delta=torch.full((64,), 0.1), reduce=reduce)
    proj = (xi * d).flatten(1)
    want = proj.mean(1) if reduce == "mean" else proj.sum(1)
    assert torch.allclose(ratio.log(), want, atol=1e-4)


def test_guard_ratio_is_centred_and_step_consistent_where_flow_grpos_is_not():
    """Two steps with stds 0.7 and 0.1 and the same mean change: Flow-GRPO's log-ratio has mean −mean(d²)/(2s²) < 0
    and a spread ∝ 1/s (7× wider at the low-noise step); GRPO-Guard's is centred on 0 with the same spread at both."""
    stats = {}
    for s in (0.7, 0.1):
        mu_old, d, xi, std, lp_new, lp_old = _pair(s)
        n = lp_new.shape[0]
        _, r_std = clipped_surrogate(lp_new, lp_old, torch.zeros(n), 0.1)
        _, r_guard = guard_surrogate(lp_new, lp_old, torch.zeros(n), 0.1, mean=mu_old + d, old_mean=mu_old, std=std,
                                     delta=torch.full((n,), 0.1))
        bias = (d[0] ** 2).mean().item() / (2 * s * s)
        stats[s] = (r_std.log(), r_guard.log(), bias)
    for s, (lstd, lguard, bias) in stats.items():
        assert lstd.mean().item() == pytest.approx(-bias, rel=0.1)  # left-shifted: ρ's mean below 1
        assert abs(lguard.mean().item()) < 3 * lguard.std().item() / lguard.numel() ** 0.5 + 1e-9  # centred on 0
    assert stats[0.1][0].std() / stats[0.7][0].std() == pytest.approx(7.0, rel=0.02)
    assert stats[0.1][1].std() / stats[0.7][1].std() == pytest.approx(1.0, rel=0.02)


def test_guard_is_one_on_policy_and_divides_the_loss_by_the_step_size():
    n = 5
    mean = torch.randn(n, 3, requires_grad=True)
    logp = torch.randn(n)
    adv = torch.tensor([1.0, -1.0, 2.0, 0.5, 0.0])
    delta = torch.tensor([0.1, 0.2, 0.05, 0.5, 1.0])
    loss, ratio = guard_surrogate(logp, logp.detach(), adv, 1e-6, mean=mean, old_mean=mean.detach(),
                                  std=torch.tensor(0.4), delta=delta)
    assert torch.equal(ratio, torch.ones(n))
    assert torch.allclose(loss, -adv / delta)
    assert set(SURROGATES) == {"clipped", "guard"}
    with pytest.raises(ValueError, match="μ_old"):
        guard_surrogate(logp, logp, adv, 1e-6, mean=mean, old_mean=None, std=torch.tensor(0.4), delta=delta)


def test_guard_update_takes_a_step_from_the_stored_velocities():
    """The update rebuilds μ_old from the rollout's cached velocities (no forward); on-policy ρ = 1 and the weights move."""
    from flowalign.train import _update

    model, nfe, opt, traj, advs, pairs = _update_inputs()
    traj.velocities = torch.stack([model.velocity(traj.latents[:, j], None, None).detach() for j in range(2)], 1)
    w0 = model.w.item()
    out = _update(_tr(surrogate="guard", clip_range=1e-6), model, opt, traj, advs, pairs, lambda t: t, nfe, skip=False)
    assert out["train/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and out["_steps_taken"] == 1
    assert model.w.item() != w0


def test_trainer_runs_guard_on_policy(tmp_path):
    from flowalign.train import train

    run = train(_cfg(tmp_path / "run", "train.iterations=1", "train.surrogate=guard", "train.clip_range=2e-6",
                     "train.filter_zero_std=false", "train.optimizer_steps_per_iter=1", "train.micro_batch=1000"))
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(m["train/ratio_mean"] - 1) < 1e-6 and m["train/clipfrac_high"] == 0
    assert "guard" in (run / "config.yaml").read_text()


def test_guard_needs_the_exact_log_prob(tmp_path):
    with pytest.raises(UserError, match="sampler.logp_form=exact"):
        _cfg(tmp_path / "r", "train.surrogate=guard", "sampler.logp_form=cps_mse", "sampler.kernel=cps")
    with pytest.raises(UserError, match="surrogate"):
        _cfg(tmp_path / "r", "train.surrogate=gaurd")


def test_a_step_without_noise_gives_no_loss_and_no_kl():
    """s = 0 (CPS's last step, ddim_sde at σ = 1, an η = 0 row) has no density: gaussian_log_prob stores 0 there,
    while Guard's bias overflowed to inf (loss and ratio NaN) and the KL was msd / 2e-20 ≈ 5e17."""
    from flowalign.loss import gaussian_kl

    mean, old = torch.randn(2, 8), torch.randn(2, 8)
    std = torch.tensor([0.0, 0.3])
    loss, ratio = guard_surrogate(torch.zeros(2), torch.zeros(2), torch.ones(2), 2e-6, mean=mean, old_mean=old,
                                  std=std, delta=torch.full((2,), 0.1))
    assert torch.isfinite(loss).all() and torch.isfinite(ratio).all()
    assert loss[0] == 0 and ratio[0] == 1 and loss[1] != 0
    kl = gaussian_kl(mean, old, std, torch.full((2,), -0.1))
    assert kl[0] == 0 and kl[1] == pytest.approx(float((mean[1] - old[1]).pow(2).mean() / (2 * 0.09)))


def test_guard_clips_off_policy_ratios_like_ppo_and_scales_the_gradient_by_s_over_delta():
    """Off policy the regulated ratio is clipped as in PPO (GRPO-Guard, arXiv:2510.22319; METHODS.md §3.9):
    loss = max(−Â·ρ, −Â·clip(ρ, 1−ε, 1+ε))/Δ_t. A clipped row (ρ past the side its advantage favours) gives its
    clipped value and no gradient; an unclipped one gives −Â·ρ/Δ_t and d/dℓ_θ = −Â·ρ·s/Δ_t (ρ = exp((ℓ_θ − ℓ_old)·s))."""
    s, eps = 0.5, 0.2
    rho = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.05], dtype=torch.float64)  # [5] target ratios
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0], dtype=torch.float64)  # [5]
    delta = torch.tensor([0.1, 0.2, 0.4, 0.5, 0.25], dtype=torch.float64)  # [5]
    g = torch.Generator().manual_seed(0)
    old = torch.randn(5, dtype=torch.float64, generator=g)  # [5]
    logp = (old + rho.log() / s).requires_grad_(True)  # [5] so that exp((ℓ_θ − ℓ_old)·s) = ρ
    mean = torch.randn(5, 3, dtype=torch.float64, generator=g)  # [5, 3] μ_θ = μ_old: bias 0
    loss, ratio = guard_surrogate(logp, old, adv, eps, mean=mean, old_mean=mean, std=torch.tensor(s),
                                  delta=delta)
    torch.testing.assert_close(ratio, rho)
    want = torch.tensor([-1.2, -0.5, 1.5, 0.8, -2.1], dtype=torch.float64) / delta  # rows 0, 3 clipped
    torch.testing.assert_close(loss, want)
    loss.sum().backward()
    grad = -adv * rho * s / delta  # [5]
    grad[[0, 3]] = 0.0
    torch.testing.assert_close(logp.grad, grad)
