"""Property tests of schedules, kernels, the log-density and the loop (METHODS.md §1–2, §2.9, §3.8)."""

import json
import math

import pytest
import torch

from flowalign import config as C
from flowalign.errors import UserError
from flowalign.samplers import KERNELS, branch, eta_schedule, gaussian_log_prob, sample, sd3_diffusers, step_log_prob
from flowalign.samplers import schedules
from flowalign.samplers.kernels import cps, flow_sde

from test_train_update import _cfg  # noqa: E402  (conftest puts tests/ on sys.path)

# ---------------------------------------------------------------- schedules


def test_sd3_grid_matches_reference_table():
    s = schedules.sd3_diffusers(10, shift=3.0)
    ref = [1.0, 0.960129, 0.913349, 0.857692, 0.790368, 0.707278, 0.602151, 0.464876, 0.278049, 0.008929, 0.0]
    assert s.dtype == torch.float32 and s.shape == (11,)
    assert torch.allclose(s, torch.tensor(ref), atol=1e-6)
    s40 = schedules.sd3_diffusers(40, shift=3.0)
    assert torch.allclose(s40[:4], torch.tensor([1.0, 0.99133, 0.98236, 0.97306]), atol=1e-5)
    assert torch.allclose(s40[-4:], torch.tensor([0.14651, 0.08105, 0.008929, 0.0]), atol=1e-5)


@pytest.mark.parametrize("steps,shift", [(10, 3.0), (40, 3.0), (28, 3.0), (20, 1.0)])
def test_sd3_grid_equals_diffusers(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(steps)
    ours = schedules.sd3_diffusers(steps, shift=shift)
    assert (ours - sch.sigmas.to(torch.float32)).abs().max().item() < 1e-7
    # the model timestep is exactly 1000σ
    assert torch.allclose(sch.timesteps, ours[:-1] * 1000, atol=1e-3)


def test_flux_grid_reference_values_and_diffusers():
    ref = {1024: [1, 0.9037, 0.7897, 0.6525, 0.4842, 0.2730, 0], 4096: [1, 0.9404, 0.8633, 0.7595, 0.6123, 0.3871, 0]}
    for seq_len, want in ref.items():
        assert torch.allclose(schedules.flux_dynamic(6, seq_len), torch.tensor(want, dtype=torch.float32), atol=1e-4)
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                          base_image_seq_len=256, max_image_seq_len=4096)
    mu = schedules.flux_mu(1024)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
    assert (schedules.flux_dynamic(6, 1024) - sch.sigmas.float()).abs().max() < 1e-6


def test_shifted_linear_endpoints():
    s = schedules.shifted_linear(7, 3.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and bool((s[1:] < s[:-1]).all())
    assert torch.allclose(schedules.shifted_linear(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_flow_sde_std_table():
    """s_t = g_t·√Δ_t of Flow-GRPO's SDE at a = 0.7 and CPS std (METHODS.md §1.2 table)."""
    sig = schedules.sd3_diffusers(10, 3.0)
    x = torch.zeros(1, 4)
    want_s = [0.70000, 0.74296, 0.53615, 0.44590, 0.39179, 0.35280, 0.31907, 0.28201, 0.22536, 0.00628]
    want_cps = [0.8555, 0.8138, 0.7642, 0.7042, 0.6302, 0.5365, 0.4142, 0.2477, 0.0080, 0.0]
    for t in range(10):
        tr = flow_sde(x, x, sig[t], sig[t + 1], torch.tensor(0.7))
        assert abs(float(tr.std) - want_s[t]) < 1e-4, t
        tr = cps(x, x, sig[t], sig[t + 1], torch.tensor(0.7))
        assert abs(float(tr.std) - want_cps[t]) < 1e-4, t
    assert float(flow_sde(x, x, sig[0], sig[1], torch.tensor(0.7)).std) == pytest.approx(0.7, abs=1e-6)


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_is_exact_euler_at_eta_zero(name):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 4, 4, generator=g)
    v = torch.randn(5, 3, 4, 4, generator=g)
    sig = schedules.sd3_diffusers(10)
    for t in range(10):
        tr = KERNELS[name](x, v, sig[t], sig[t + 1], torch.tensor(0.0))
        assert torch.equal(tr.mean, x + (sig[t + 1] - sig[t]) * v)
        assert float(torch.as_tensor(tr.std).abs().max()) == 0.0
    # per-sample sigma tensors [B], mixed steps, η = 0
    idx = torch.tensor([0, 3, 5, 8, 9])
    tr = KERNELS[name](x, v, sig[idx], sig[idx + 1], torch.zeros(5))
    assert torch.equal(tr.mean, x + (sig[idx + 1] - sig[idx]).view(5, 1, 1, 1) * v)


@pytest.mark.parametrize("name", ["flow_sde", "dance_sde", "cps"])
def test_per_sample_sigmas_equal_scalar_calls(name):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, 3, generator=g)
    v = torch.randn(4, 2, 3, generator=g)
    sig = schedules.sd3_diffusers(10)
    idx = torch.tensor([0, 2, 5, 8])
    eta = torch.tensor([0.7, 0.5, 0.7, 0.3])
    batched = KERNELS[name](x, v, sig[idx], sig[idx + 1], eta)
    for i in range(4):
        one = KERNELS[name](x[i:i + 1], v[i:i + 1], sig[idx[i]], sig[idx[i] + 1], eta[i])
        assert torch.allclose(batched.mean[i:i + 1], one.mean, atol=1e-6, rtol=0)
        assert torch.allclose(batched.std.reshape(-1)[i], torch.as_tensor(one.std).reshape(()), atol=1e-7)


def test_flow_sde_finite_at_sigma_one_and_last_step():
    sig = schedules.sd3_diffusers(10)
    x = torch.randn(2, 8)
    for t in (0, 9):
        tr = flow_sde(x, x, sig[t], sig[t + 1], torch.tensor(0.7))
        assert torch.isfinite(tr.mean).all() and torch.isfinite(torch.as_tensor(tr.std)).all()


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_gaussian_log_prob_equals_torch_normal(reduce):
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64)
    std = torch.rand(6, 1, 1, 1, generator=g, dtype=torch.float64) + 0.1
    x = mean + std * torch.randn(mean.shape, generator=g, dtype=torch.float64)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).flatten(1)
    ref = ref.sum(1) if reduce == "sum" else ref.mean(1)
    ours = gaussian_log_prob(x, mean, std, reduce=reduce)
    assert torch.allclose(ours, ref, atol=1e-10, rtol=0)
    # std given per sample as [B] and as a scalar
    assert torch.allclose(gaussian_log_prob(x, mean, std.flatten(), reduce=reduce), ref, atol=1e-10)
    sc = torch.distributions.Normal(mean, 0.3).log_prob(x).flatten(1)
    sc = sc.sum(1) if reduce == "sum" else sc.mean(1)
    assert torch.allclose(gaussian_log_prob(x, mean, torch.tensor(0.3, dtype=torch.float64), reduce=reduce), sc)


def test_log_prob_zero_std_is_zero_without_nan_grad():
    mean = torch.randn(3, 4, requires_grad=True)
    lp = gaussian_log_prob(mean.detach() + 1, mean, torch.tensor([0.0, 0.5, 0.0]))
    assert lp[0] == 0 and lp[2] == 0 and lp[1] != 0
    lp.sum().backward()
    assert torch.isfinite(mean.grad).all() and mean.grad[0].abs().sum() == 0


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_cps_mse_log_ratio_is_the_exact_one_times_2s2(reduce):
    """CPS's −MSE surrogate (METHODS.md §2.5, Q6): log ρ_cps = 2·s²·log ρ_exact for either reduction; 0 where s = 0."""
    g = torch.Generator().manual_seed(5)
    m_old = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    m_new = m_old + 0.05 * torch.randn(m_old.shape, generator=g, dtype=torch.float64)
    std = torch.tensor([0.3, 0.7, 0.0, 1.2, 0.05], dtype=torch.float64)
    x = m_old + std[:, None, None, None] * torch.randn(m_old.shape, generator=g, dtype=torch.float64)
    ex = gaussian_log_prob(x, m_new, std, reduce) - gaussian_log_prob(x, m_old, std, reduce)
    mse = gaussian_log_prob(x, m_new, std, reduce, "cps_mse") - gaussian_log_prob(x, m_old, std, reduce, "cps_mse")
    assert torch.allclose(mse, 2 * std**2 * ex, atol=1e-12, rtol=1e-9)
    sq = ((x - m_new) ** 2).flatten(1)
    want = -(sq.sum(1) if reduce == "sum" else sq.mean(1))
    want[2] = 0.0  # the deterministic row
    assert torch.allclose(gaussian_log_prob(x, m_new, std, reduce, "cps_mse"), want, atol=1e-12)
    with pytest.raises(ValueError, match="form must be one of"):
        gaussian_log_prob(x, m_new, std, reduce, "mse")


def test_sample_and_rescoring_store_the_chosen_logp_form():
    """``logp_form="cps_mse"`` reaches the stored log-probs and the re-scored ones, so the first ratio is 1."""
    torch.manual_seed(0)
    m = LinearVelocity()
    x = torch.randn(3, 6)
    cond = {"c": torch.randn(3, 6)}
    sig = schedules.sd3_diffusers(6)
    eta = eta_schedule(6, 0.8)
    tr = sample(m, x, sig, cond, eta=eta, kernel="cps", generator=torch.Generator().manual_seed(1),
                keep_means=True, logp_form="cps_mse")
    sq = -((tr.latents[:, 1:] - tr.means) ** 2).mean(dim=-1)  # [B, T]
    live = eta > 0
    assert torch.allclose(tr.log_probs[:, live], sq[:, live], atol=1e-7) and (tr.log_probs[:, ~live] == 0).all()
    for t in range(5):
        lp, _ = step_log_prob(m, tr.latents[:, t], tr.latents[:, t + 1], sig[t].expand(3), sig[t + 1].expand(3),
                              eta[t].expand(3), cond, kernel="cps", logp_form="cps_mse")
        assert torch.allclose(lp, tr.log_probs[:, t], atol=1e-7)
    ex = sample(m, x, sig, cond, eta=eta, kernel="cps", generator=torch.Generator().manual_seed(1))
    assert torch.equal(ex.latents, tr.latents) and not torch.allclose(ex.log_probs[:, live], tr.log_probs[:, live])


@pytest.mark.parametrize("name,eta", [("flow_sde", 0.7), ("dance_sde", 0.3), ("cps", 0.7), ("ddim_sde", 0.7)])
def test_draws_match_kernel_gaussian(name, eta):
    """10^5 draws of one transition through the loop match μ and s within Monte-Carlo tolerance."""
    n = 100_000
    x0 = torch.full((n, 1), 0.3)
    sig = torch.tensor([0.8, 0.6, 0.0])

    def vel(x, s, c):
        return 0.5 * x - 1.0

    traj = sample(vel, x0, sig, {}, eta=torch.tensor([eta, 0.0]), kernel=name,
                  generator=torch.Generator().manual_seed(0), cond_index=torch.zeros(n, dtype=torch.long))
    tr = KERNELS[name](x0[:1], vel(x0[:1], None, None), sig[0], sig[1], torch.tensor(eta))
    x1 = traj.latents[:, 1, 0]
    s = float(torch.as_tensor(tr.std).reshape(()))
    assert abs(x1.mean().item() - tr.mean.item()) < 4 * s / math.sqrt(n)
    assert abs(x1.std().item() - s) / s < 0.01


# ---------------------------------------------------------------- the Gaussian world (DESIGN.md §7)

from gaussian_world import M, SD, gaussian_world_velocity  # noqa: E402  (data ~ N(m, s_d²): no cond offset)


def _final_std(kernel, eta, steps, n=40_000):
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(n, 1, generator=g)
    sig = schedules.shifted_linear(steps, 1.0)
    traj = sample(gaussian_world_velocity, x0, sig, {}, eta=eta_schedule(steps, eta), kernel=kernel,
                  generator=g, cond_index=torch.zeros(n, dtype=torch.long))
    xf = traj.final[:, 0].double()
    return xf.mean().item(), xf.std().item()


@pytest.mark.parametrize("kernel,eta,ref", [
    ("euler", 0.0, {10: 0.431, 40: 0.481}),
    ("flow_sde", 0.7, {10: 0.478, 40: 0.498}),
    ("dance_sde", 0.3, {10: 0.442, 40: 0.484}),
])
def test_gaussian_world_marginal_preserved_and_converges(kernel, eta, ref):
    errs = []
    for steps in (10, 40, 200):
        mean, std = _final_std(kernel, eta, steps)
        assert abs(mean - M) < 0.02
        if steps in ref:
            assert abs(std - ref[steps]) < 0.012, (steps, std)
        errs.append(abs(std - SD))
    assert errs[2] < 0.01 * SD * 1.5 + 0.005  # < ~1% at T = 200 (MC error ~0.002)
    assert errs[0] > errs[1] > errs[2] or errs[2] < 0.004


def test_cps_records_underdispersion():
    """CPS is coefficient-preserving but not a consistent SDE discretisation: it under-disperses (§2.4)."""
    _, std10 = _final_std("cps", 0.7, 10)
    _, std40 = _final_std("cps", 0.7, 40)
    assert abs(std10 - 0.371) < 0.012 and abs(std40 - 0.406) < 0.012


# ---------------------------------------------------------------- loop


class LinearVelocity(torch.nn.Module):
    """A tiny model with weights: v = W x + b·σ + c (cond shifts)."""

    def __init__(self, d=6):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)
        self.t = torch.nn.Linear(1, d)

    def forward(self, x, sigma, cond):
        return self.lin(x) + self.t(sigma[:, None]) + cond["c"]


def test_ode_sample_is_deterministic_and_has_zero_logp():
    torch.manual_seed(0)
    m = LinearVelocity()
    x = torch.randn(3, 6)
    cond = {"c": torch.randn(2, 6)}
    ci = torch.tensor([0, 1, 1])
    sig = schedules.sd3_diffusers(6)
    a = sample(m, x, sig, cond, eta=0.0, kernel="flow_sde", cond_index=ci)
    b = sample(m, x, sig, cond, eta=0.0, kernel="euler", cond_index=ci)
    assert torch.equal(a.latents, b.latents) and a.log_probs.abs().sum() == 0
    # Euler by hand
    xx = x.clone()
    with torch.no_grad():
        for t in range(6):
            xx = xx + (sig[t + 1] - sig[t]) * m(xx, sig[t].expand(3), {"c": cond["c"][ci]})
    assert torch.allclose(a.final, xx, atol=1e-6)
    assert a.latents.shape == (3, 7, 6) and a.log_probs.shape == (3, 6)


@pytest.mark.parametrize("name,eta", [("flow_sde", 0.7), ("dance_sde", 0.3), ("cps", 0.8), ("ddim_sde", 0.7)])
def test_on_policy_ratio_is_one(name, eta):
    torch.manual_seed(0)
    m = LinearVelocity()
    x = torch.randn(4, 6)
    cond = {"c": torch.randn(2, 6)}
    ci = torch.tensor([0, 0, 1, 1])
    sig = schedules.sd3_diffusers(8)
    etas = eta_schedule(8, eta)
    traj = sample(m, x, sig, cond, eta=etas, kernel=name, generator=torch.Generator().manual_seed(5), cond_index=ci)
    trained = (etas > 0).nonzero().flatten().tolist()
    assert len(trained) == 7 and etas[-1] == 0
    for t in trained:
        lp, _ = step_log_prob(m, traj.latents[:, t], traj.latents[:, t + 1], sig[t].expand(4), sig[t + 1].expand(4),
                              etas[t].expand(4), {"c": cond["c"][ci]}, kernel=name)
        assert (torch.exp(lp - traj.log_probs[:, t]) - 1).abs().max() < 1e-6
    # a flat batch mixing timesteps re-scores the same values
    b_idx = torch.arange(4).repeat_interleave(len(trained))
    t_idx = torch.tensor(trained).repeat(4)
    lp, _ = step_log_prob(m, traj.latents[b_idx, t_idx], traj.latents[b_idx, t_idx + 1], sig[t_idx], sig[t_idx + 1],
                          etas[t_idx], {"c": cond["c"][ci[b_idx]]}, kernel=name)
    assert (lp - traj.log_probs[b_idx, t_idx]).abs().max() < 1e-5
    # gradients reach the weights
    lp.sum().backward()
    assert m.lin.weight.grad.abs().sum() > 0


def test_eta_of_the_wrong_length_is_refused():
    m = LinearVelocity()
    with pytest.raises(ValueError, match="expected one per step"):
        sample(m, torch.randn(2, 6), schedules.sd3_diffusers(6), {"c": torch.zeros(2, 6)}, eta=torch.full((9,), 0.7))


def test_windowed_sde_only_window_is_stochastic():
    torch.manual_seed(0)
    m = LinearVelocity()
    x = torch.randn(2, 6)
    cond = {"c": torch.zeros(2, 6)}
    sig = schedules.sd3_diffusers(10)
    etas = eta_schedule(10, 0.8, window=(2, 3))
    assert etas.tolist() == [0, 0, 0.8, 0.8, 0.8, 0, 0, 0, 0, 0] or torch.allclose(
        etas, torch.tensor([0, 0, 0.8, 0.8, 0.8, 0, 0, 0, 0, 0.0]))
    tr = sample(m, x, sig, cond, eta=etas, kernel="cps", generator=torch.Generator().manual_seed(0))
    ode = sample(m, x, sig, cond, eta=0.0, kernel="euler")
    assert torch.equal(tr.latents[:, :3], ode.latents[:, :3])  # identical before the window
    assert not torch.allclose(tr.latents[:, 3], ode.latents[:, 3])
    assert (tr.log_probs[:, [0, 1, 5, 6, 7, 8, 9]] == 0).all() and (tr.log_probs[:, 2:5] != 0).all()


def test_branch_children_share_prefix_and_differ_after():
    torch.manual_seed(0)
    m = LinearVelocity()
    x = torch.randn(2, 6)
    cond = {"c": torch.randn(2, 6)}
    sig = schedules.sd3_diffusers(10)
    k = 4
    tr = branch(m, x, sig, cond, step=k, children=3, eta=0.7, kernel="flow_sde", keep_velocities=True,
                generator=torch.Generator().manual_seed(1))
    assert tr.latents.shape == (6, 11, 6) and tr.velocities.shape == (6, 10, 6)
    ode = sample(m, x, sig, cond, eta=0.0, kernel="euler")
    for i in range(2):
        kids = tr.latents[i * 3:(i + 1) * 3]
        assert torch.equal(kids[:, : k + 1], ode.latents[i, : k + 1].expand(3, -1, -1))  # shared prefix, exactly
        d = (kids[:, k + 1:] - kids[0:1, k + 1:]).abs().flatten(1).sum(1)
        assert d[0] == 0 and (d[1:] > 0).all()
    assert (tr.log_probs[:, k] != 0).all() and (tr.log_probs[:, :k] == 0).all() and (tr.log_probs[:, k + 1:] == 0).all()
    # the branch edge re-scores to ratio 1
    ci = tr.cond_index
    lp, _ = step_log_prob(m, tr.latents[:, k], tr.latents[:, k + 1], sig[k].expand(6), sig[k + 1].expand(6),
                          torch.full((6,), 0.7), {"c": cond["c"][ci]}, kernel="flow_sde")
    assert (lp - tr.log_probs[:, k]).abs().max() < 1e-6


def test_sampling_is_reproducible_with_generator():
    torch.manual_seed(0)
    m = LinearVelocity()
    x = torch.randn(3, 6)
    cond = {"c": torch.zeros(3, 6)}
    sig = schedules.sd3_diffusers(5)
    a = sample(m, x, sig, cond, eta=0.7, generator=torch.Generator().manual_seed(3))
    b = sample(m, x, sig, cond, eta=0.7, generator=torch.Generator().manual_seed(3))
    c = sample(m, x, sig, cond, eta=0.7, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)


# ---------------------------------------------------------------- the DDIM-like kernel (Stepwise-Flow-GRPO, §4.6)


def test_ddim_sde_std_mean_and_coefficients():
    """s = a·σ'·sqrt(1 − σ); μ = (1 − σ')x̂0 + sqrt(σ'² − s²)·x̂1: the noise vanishes at σ = 1, and the x̂1 coefficient
    and the noise share σ'² (coefficient-preserving, as CPS); deterministic at the last step."""
    from flowalign.samplers.kernels import ddim_sde

    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    for sig, sn, a in ((1.0, 0.9, 0.7), (0.6, 0.45, 0.7), (0.3, 0.2, 1.0), (0.2, 0.0, 0.7)):
        tr = ddim_sde(x, v, torch.tensor(sig), torch.tensor(sn), torch.tensor(a))
        s = a * sn * math.sqrt(1 - sig)
        assert float(tr.std) == pytest.approx(s, abs=1e-7)
        x0, x1 = x - sig * v, x + (1 - sig) * v
        want = (1 - sn) * x0 + math.sqrt(sn * sn - s * s) * x1
        assert torch.allclose(tr.mean, want, atol=1e-6)
    assert float(ddim_sde(x, v, torch.tensor(1.0), torch.tensor(0.9), torch.tensor(0.7)).std) == 0.0  # σ = 1
    # a > 1/sqrt(1 − σ) would need s > σ': the x̂1 coefficient is clamped at 0, never NaN
    tr = ddim_sde(x, v, torch.tensor(0.1), torch.tensor(0.05), torch.tensor(3.0))
    assert torch.isfinite(tr.mean).all() and float(tr.std) > 0.05


def test_ddim_sde_records_the_gaussian_world_marginal():
    """Coefficient-preserving like CPS, and under-dispersed like it (true std 0.5; Euler 0.431 / 0.482, CPS a = 0.7
    0.372 / 0.407 at T = 10 / 40; ddim_sde 0.463 at T = 200): recorded values, as METHODS §2.9 asks for CPS."""
    mean10, std10 = _final_std("ddim_sde", 0.7, 10)
    mean40, std40 = _final_std("ddim_sde", 0.7, 40)
    assert abs(mean10 - M) < 0.02 and abs(mean40 - M) < 0.02
    assert abs(std10 - DDIM_STD[10]) < 0.012 and abs(std40 - DDIM_STD[40]) < 0.012


DDIM_STD = {10: 0.415, 40: 0.456}  # measured: _final_std("ddim_sde", 0.7, T), 40,000 particles


def test_live_eta_makes_zero_std_steps_euler():
    """ddim_sde has no noise at σ = 1: live_eta turns that step into an Euler (ODE) step, so it is neither trained
    nor given a 0/0 density; other kernels' schedules come back unchanged."""
    from flowalign.samplers import live_eta

    sig = schedules.sd3_diffusers(6)
    eta = eta_schedule(6, 0.7)
    assert sig[0] == 1.0
    out = live_eta("ddim_sde", sig, eta)
    assert out[0] == 0 and torch.equal(out[1:], eta[1:])
    for name in ("flow_sde", "dance_sde", "cps"):  # (cps has no noise at σ' = 0, the last step, whose η is 0 anyway)
        assert torch.equal(live_eta(name, sig, eta), eta)
    rows = torch.stack([eta, eta_schedule(6, 0.7, window=(2, 2))])  # [2, T] per-row η
    assert torch.equal(live_eta("ddim_sde", sig, rows), torch.stack([out, rows[1]]))


def test_the_trainer_trains_ddim_sde_on_policy_without_its_first_step(tmp_path):
    import json

    from flowalign import config as C
    from flowalign.train import train
    from test_train_update import _cfg

    cfg = _cfg(tmp_path / "run", "sampler.kernel=ddim_sde", "train.iterations=1", "train.filter_zero_std=false",
               "train.optimizer_steps_per_iter=1", "train.beta_kl=0.04")
    d = C.derived(cfg)
    assert d["trained_steps"] == 1  # T = 4, train_fraction 0.6: the first 2 steps, of which step 0 is Euler
    run = train(cfg)
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert m["train/transitions"] == d["transitions_per_iter"]
    assert abs(m["train/ratio_mean"] - 1) < 1e-5 and m["train/skipped_updates"] == 0


# -------------------------------------------------- kernels against an independent float64 reference; branch edges

T = 6


def elementwise_velocity(x, sigma, cond):
    """Batch-invariant (elementwise) velocity: bit-exact comparisons across batch compositions are meaningful."""
    s = sigma.to(torch.float32).view(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(x) * (0.5 + s) - cond["e"] * (1 - s) + 0.1 * x * x


def _cond(n=2, shape=(3, 2), seed=0):
    return {"e": torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))}


@pytest.mark.parametrize("step", [0, T - 1])
def test_branch_at_first_and_last_step_keeps_velocities(step):
    """``loop.branch`` at step 0 (empty ODE prefix) or T−1 (empty suffix) with keep_velocities used to fail in
    torch.stack([]); velocities must be [B·K, T, *latent] with v(x_t, σ_t) at every state."""
    cond = _cond()
    x = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(1))
    sig = sd3_diffusers(T)
    tr = branch(elementwise_velocity, x, sig, cond, step=step, children=3, eta=0.7, keep_velocities=True,
                generator=torch.Generator().manual_seed(2))
    assert tuple(tr.velocities.shape) == (6, T, 3, 2)
    ci = tr.cond_index
    for t in range(T):
        v = elementwise_velocity(tr.latents[:, t], sig[t].expand(6), {"e": cond["e"][ci]})
        assert torch.equal(tr.velocities[:, t], v)
    assert bool((tr.log_probs[:, step] != 0).all())
    # a zero-step sample returns empty [B, 0, *latent] velocities / means
    z = sample(elementwise_velocity, x, sig[:1], cond, eta=0.0, kernel="euler", keep_velocities=True, keep_means=True)
    assert tuple(z.velocities.shape) == (2, 0, 3, 2) and tuple(z.means.shape) == (2, 0, 3, 2)


def _two_trunk_branch(step, kids, *, seeds):
    """Two trunks x [2, 3, 2] (seeded) branched at ``step`` into ``kids`` children each, η = 0.7: (cond, x, σ, traj)."""
    cond = _cond()
    x = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(seeds[0]))  # [B, 3, 2]
    sig = sd3_diffusers(T)
    tr = branch(elementwise_velocity, x, sig, cond, step=step, children=kids, eta=0.7,
                generator=torch.Generator().manual_seed(seeds[1]))
    return cond, x, sig, tr


def test_branch_children_get_independent_unit_noise_scaled_by_the_kernel_std():
    """``loop.branch``: the K children of a trunk share μ_step and s_step (recomputed here from the kernel at x_step)
    and each gets its own ξ ~ N(0, I): (x_{step+1} − μ)/s has mean 0 and std 1 at every latent position across the
    children, is uncorrelated between trunks and between positions, and the stored log-prob is the density of it.
    Pins the noise draw against repeating one trunk draw to all children, dropping ``std *`` or a wrong s."""
    k, kids = 3, 2000
    cond, x, sig, tr = _two_trunk_branch(k, kids, seeds=(1, 2))
    assert tuple(tr.latents.shape) == (2 * kids, T + 1, 3, 2)
    assert tr.extras["parent"].tolist() == [0] * kids + [1] * kids
    x_k = tr.latents[::kids, k]  # [B, 3, 2] each trunk's x_step
    assert torch.equal(tr.latents[:, k], x_k.repeat_interleave(kids, 0))  # shared by the trunk's children
    ref = flow_sde(x_k, elementwise_velocity(x_k, sig[k].expand(2), cond), sig[k], sig[k + 1], torch.tensor(0.7))
    assert ref.std.dim() == 0 and 0.4 < float(ref.std) < 0.6  # a scale that dropping `std *` changes ~2x
    mean = ref.mean.repeat_interleave(kids, 0)  # [B·K, 3, 2]
    xi = ((tr.latents[:, k + 1] - mean) / ref.std).reshape(2, kids, 6)  # [B, K, D]
    assert abs(float(xi.mean())) < 0.03 and abs(float(xi.std()) - 1) < 0.03  # 24,000 draws: SE 0.0065 / 0.0046
    per_pos = xi.transpose(0, 1).reshape(kids, 12)  # [K, B·D] one column per (trunk, position)
    # 2,000 draws each: SE 0.022 (mean) / 0.016 (std)
    assert (per_pos.mean(0).abs() < 0.1).all() and ((per_pos.std(0) - 1).abs() < 0.1).all()
    corr = torch.corrcoef(per_pos.T)  # [B·D, B·D]
    assert (corr - torch.eye(12)).abs().max() < 0.1  # independent across trunks and positions
    # no two children of a trunk share a draw
    flat = xi.reshape(2 * kids, 6)  # [B·K, D]
    assert torch.unique(flat, dim=0).shape[0] == 2 * kids
    # the stored log-prob is the (element-mean) Gaussian density of exactly this noise under (μ, s)
    lp = gaussian_log_prob(tr.latents[:, k + 1], mean, ref.std)  # [B·K]
    closed = -0.5 * flat.pow(2).mean(1) - math.log(float(ref.std)) - 0.5 * math.log(2 * math.pi)  # [B·K]
    assert torch.allclose(tr.log_probs[:, k], lp, atol=1e-6) and torch.allclose(tr.log_probs[:, k], closed, atol=1e-5)


def test_branch_steps_other_than_the_branch_step_are_exact_euler():
    """``loop.branch``: every step but ``step`` is an η = 0 Euler step x_{t+1} = x_t + (σ_{t+1} − σ_t)·v(x_t,
    σ_t) bit for bit (the ODE prefix per trunk and the ODE completion per child), with log-prob 0 and η 0 there."""
    k, kids = 2, 4
    cond, x, sig, tr = _two_trunk_branch(k, kids, seeds=(3, 4))
    ce = {"e": cond["e"][tr.cond_index]}  # [B·K, 3, 2]
    assert torch.equal(tr.latents[:, 0], x.repeat_interleave(kids, 0))
    for t in range(T):
        xt = tr.latents[:, t]  # [B·K, 3, 2]
        euler = xt + (sig[t + 1] - sig[t]) * elementwise_velocity(xt, sig[t].expand(2 * kids), ce)  # [B·K, 3, 2]
        if t == k:
            assert (tr.latents[:, t + 1] - euler).flatten(1).norm(dim=1).min() > 1e-3  # the stochastic step: not Euler
        else:
            assert torch.equal(tr.latents[:, t + 1], euler), t
            assert bool((tr.log_probs[:, t] == 0).all())
    assert tr.eta.tolist() == pytest.approx([0.0] * k + [0.7] + [0.0] * (T - k - 1))


def _ref_transition(name, x, v, s, sn, a, s1):
    """METHODS §2.1–2.4 in float64, written independently of samplers.kernels."""
    x, v = x.double(), v.double()
    dt = sn - s
    if name == "euler" or a == 0:
        return x + dt * v, 0.0
    x1 = x + (1 - s) * v
    x0 = x - s * v
    if name == "flow_sde":
        st = s if s < 1 else s1
        g = a * math.sqrt(s / (1 - st))
        return x + dt * (v + g * g / (2 * s) * x1), g * math.sqrt(-dt)
    if name == "dance_sde":
        return x + dt * (v + a * a / (2 * s) * x1), a * math.sqrt(-dt)
    if name == "ddim_sde":  # METHODS §4.6: s = a·σ'·√(1 − σ), DDIM's coefficient-preserving mean
        std = a * sn * math.sqrt(1 - s)
        return (1 - sn) * x0 + math.sqrt(max(sn * sn - std * std, 0.0)) * x1, std
    std = sn * math.sin(a * math.pi / 2)
    return (1 - sn) * x0 + math.sqrt(max(sn * sn - std * std, 0.0)) * x1, std


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_stored_log_probs_equal_an_independent_float64_gaussian(name):
    """The rollout's stored log p (reduce=sum and mean) equals the Gaussian density of METHODS §2.5 with μ, s from
    an independent float64 implementation of §2.1–2.4; η = 0 steps store 0 and are exact Euler."""
    sig = sd3_diffusers(T)
    a = {"flow_sde": 0.7, "dance_sde": 0.3, "cps": 0.8, "ddim_sde": 0.7, "euler": 0.5}[name]
    eta = eta_schedule(T, a, window=(1, 3))
    cond = _cond()
    x0 = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(5))
    ci = torch.tensor([0, 0, 1, 1])
    for reduce in ("sum", "mean"):
        tr = sample(elementwise_velocity, x0, sig, cond, eta=eta, kernel=name, reduce=reduce, cond_index=ci,
                    generator=torch.Generator().manual_seed(6), keep_velocities=True)
        for t in range(T):
            x, xn, v = tr.latents[:, t], tr.latents[:, t + 1], tr.velocities[:, t]
            mu, std = _ref_transition(name, x, v, float(sig[t]), float(sig[t + 1]), float(eta[t]), float(sig[1]))
            if std == 0:
                assert bool((tr.log_probs[:, t] == 0).all())
                assert torch.equal(xn, x + (sig[t + 1] - sig[t]) * v)  # exact Euler (fp32)
                continue
            ref = (-(xn.double() - mu) ** 2 / (2 * std * std) - math.log(std) - 0.5 * math.log(2 * math.pi))
            ref = ref.flatten(1).sum(1) if reduce == "sum" else ref.flatten(1).mean(1)
            torch.testing.assert_close(tr.log_probs[:, t].double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_bf16_inputs_still_do_fp32_kernel_math(name):
    """METHODS §2: x, v (and x_{t+1}) are cast to fp32 before any kernel arithmetic."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 3, generator=g).to(torch.bfloat16)
    v = torch.randn(5, 4, 3, generator=g).to(torch.bfloat16)
    sig = sd3_diffusers(T)
    s, sn = sig[:5], sig[1:6]
    eta = torch.tensor([0.7, 0.0, 0.5, 0.7, 0.0])
    tr = KERNELS[name](x, v, s, sn, eta)
    ref = KERNELS[name](x.float(), v.float(), s, sn, eta)
    assert tr.mean.dtype == torch.float32 and torch.as_tensor(tr.std).dtype == torch.float32
    assert torch.equal(tr.mean, ref.mean) and torch.equal(torch.as_tensor(tr.std), torch.as_tensor(ref.std))
    lp = gaussian_log_prob(x, tr.mean.to(torch.bfloat16), tr.std)
    assert lp.dtype == torch.float32
    # rows with η = 0 are bit-exact Euler even in a mixed batch
    eu = x.float() + (sn - s).view(-1, 1, 1) * v.float()
    zero = eta == 0
    assert torch.equal(tr.mean[zero], eu[zero])
    assert bool((torch.as_tensor(tr.std).reshape(5, -1)[zero] == 0).all())


# ----------------------------------------------------------------------- ddim_sde windows: what the trainer trains


def test_ddim_sde_window_pinned_at_step_zero_counts_what_the_trainer_trains(tmp_path):
    """ddim_sde draws no noise at σ = 1 (live_eta makes step 0 Euler): a window pinned at [0, 2) trains step 1 only,
    and the derived counts (which size the update) must say so."""
    from flowalign.train import train

    cfg = _cfg(tmp_path / "run", "sampler.kernel=ddim_sde", "sampler.window_size=2", "sampler.window_range=[0, 2]",
               "train.iterations=1", "train.filter_zero_std=false", "train.optimizer_steps_per_iter=1")
    d = C.derived(cfg)
    assert d["trained_steps"] == 1
    run = train(cfg)
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert m["train/transitions"] == d["transitions_per_iter"]


def test_ddim_sde_window_holding_only_step_zero_is_refused_in_one_line():
    """A one-step window pinned at step 0 with ddim_sde trains nothing, every iteration: refuse it up front."""
    with pytest.raises(UserError, match="no trained steps.*ddim_sde"):
        _cfg("unused", "sampler.kernel=ddim_sde", "sampler.window_size=1", "sampler.window_range=[0, 1]")


def test_no_trained_steps_error_tells_the_true_cause_for_ddim_sde():
    """floor(0.25 × 4) = 1, but that one step is ddim_sde's noiseless σ = 1 step: the message must not claim the
    floor is 0."""
    with pytest.raises(UserError) as e:
        _cfg("unused", "sampler.kernel=ddim_sde", "sampler.train_fraction=0.25")
    msg = str(e.value)
    assert "= 0;" not in msg and "ddim_sde" in msg and "\n" not in msg


def test_a_window_of_size_zero_is_every_step_but_the_last():
    """METHODS.md §2.6: n = 0 means the window [0, T−1); it gave an all-ODE schedule (nothing to train, no error)."""
    assert eta_schedule(10, 0.7, window=(0, 0)).tolist() == eta_schedule(10, 0.7).tolist()
    assert eta_schedule(10, 0.7, window=(0, 0)).tolist() == pytest.approx([0.7] * 9 + [0.0])


def test_a_float_eta_in_the_chain_plan_means_what_it_does_in_the_others():
    """`chain` gave a float η to every step, the last included; `branch` and `tree` (``_plan_inputs``) read it as
    every step but the deterministic last (eta_schedule, quirk Q1)."""
    from flowalign.samplers.plans import PLANS

    sig = sd3_diffusers(4)
    args = dict(cond_index=torch.zeros(2, dtype=torch.long), group=torch.zeros(2, dtype=torch.long),
                generator=torch.Generator().manual_seed(0))
    chain = PLANS["chain"](gaussian_world_velocity, torch.randn(2, 3), sig, {"c": torch.zeros(1, 3)}, eta=0.7, **args)
    assert chain.eta.tolist() == pytest.approx([0.7, 0.7, 0.7, 0.0])
