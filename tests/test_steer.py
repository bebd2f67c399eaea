"""Inference-time steering (flowalign.steer; METHODS.md §6): FK potentials, resampling, best-of-N, h-transform guidance.

Exactness checks run in the Gaussian world (data ~ N(m, s_d²) per dimension, exact velocity), where the tilted
target of r(x) = b·x is N(m + s_d²·b/β, s_d²) and Tweedie is exact.
"""

import logging
import math

import pytest
import torch

from flowalign import steer as S
from flowalign.samplers import eta_schedule, sample, schedules

from gaussian_world import M, SD, gaussian_world_velocity  # noqa: E402  (the exact velocity; differentiable in x)


def linear_reward(b=1.0):
    return lambda z, rows: b * z.flatten(1).mean(1)  # r(x) = b·x per 1-D particle


def exact_u(b_over_beta=1.0):
    """u = (σ/(1−σ))·∇log h = σ·s_d²·(b/β)/((1−σ)²s_d² + σ²), finite at σ = 1 (METHODS.md §6.3 exactness test)."""
    def fn(x, sigma, v, cond):
        s = sigma.to(torch.float64).view(-1, *([1] * (x.dim() - 1)))
        u = s * SD**2 * b_over_beta / ((1 - s) ** 2 * SD**2 + s**2)
        return u.expand_as(x).to(torch.float32)
    return fn


# ---------------------------------------------------------------- weights, resampling, potentials


def test_ess_is_k_for_uniform_weights_and_one_for_a_point_mass():
    logw = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -math.inf, -math.inf, -math.inf], [-math.inf] * 4])
    ess = S.effective_sample_size(logw)
    assert ess.tolist() == pytest.approx([4.0, 1.0, 4.0])  # an all-dead group falls back to uniform


@pytest.mark.parametrize("seed", range(5))
def test_systematic_resampling_gives_floor_or_ceil_copies(seed):
    g = torch.Generator().manual_seed(seed)
    k = 16
    w = torch.softmax(3 * torch.randn(6, k, generator=g, dtype=torch.float64), dim=1)
    anc = S.systematic_resample(w, g)  # [6, k]
    counts = torch.stack([torch.bincount(a, minlength=k) for a in anc]).to(torch.float64)
    assert (counts >= torch.floor(k * w) - 1e-9).all() and (counts <= torch.ceil(k * w) + 1e-9).all()
    assert (anc.diff(dim=1) >= 0).all()  # ancestors come out sorted


def test_systematic_resampling_of_uniform_weights_is_the_identity():
    for seed in range(20):
        anc = S.systematic_resample(torch.full((3, 7), 1 / 7, dtype=torch.float64), torch.Generator().manual_seed(seed))
        assert (anc == torch.arange(7)).all()


@pytest.mark.parametrize("name", list(S.POTENTIALS))
def test_potentials_times_final_correction_equal_exp_lambda_final_reward(name):
    g = torch.Generator().manual_seed(3)
    lam, n = 2.5, 5
    state = S.initial_state(n)
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(4):
        r = torch.randn(n, generator=g, dtype=torch.float64) - 1.0  # negative rewards too (m_prev starts at −∞)
        log_g, state = S.POTENTIALS[name](r, state, lam)
        total += log_g
    assert torch.allclose(state.log_g, total)
    r_final = torch.randn(n, generator=g, dtype=torch.float64)
    assert torch.allclose(total + S.final_log_potential(r_final, state, lam), lam * r_final)


def test_diff_potentials_telescope_to_the_last_reward():
    lam = 0.7
    rs = [torch.tensor([0.3, -1.0]), torch.tensor([0.5, 2.0]), torch.tensor([-0.2, 1.5])]
    state = S.initial_state(2)
    logs = []
    for r in rs:
        lg, state = S.potential_diff(r.double(), state, lam)
        logs.append(lg)
    assert torch.allclose(sum(logs), lam * rs[-1].double())  # r_init = 0


def test_max_potential_does_not_clip_negative_rewards():
    state = S.initial_state(1)
    lg, state = S.potential_max(torch.tensor([-3.0], dtype=torch.float64), state, 1.0)
    assert lg.item() == -3.0  # the reference starts m_prev at 0 and would give 0


def test_resample_steps_default_schedule():
    assert S.resample_steps(10) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert S.resample_steps(100) == list(range(20, 81, 10)) + [99]
    assert S.resample_steps(12, every=4, start=2, end=10) == [2, 6, 10, 11]
    with pytest.raises(ValueError):
        S.resample_steps(10, start=10)


def test_resample_steps_refuse_an_end_before_the_start_and_keep_a_late_start():
    """end < start left only the final step, silently; a start after the default end was dropped the same way."""
    with pytest.raises(ValueError, match="3 is before the first, 6"):
        S.resample_steps(12, start=6, end=3)
    with pytest.raises(ValueError, match="default"):
        S.resample_steps(12, end=1)  # the default start is round(0.2·12) = 2
    assert S.resample_steps(12, start=6, end=6) == [6, 11]
    assert S.resample_steps(20, start=18) == [18, 19]  # the default end round(0.8·20) = 16 would give [19]


# ---------------------------------------------------------------- the FK loop in the Gaussian world


def _noise(n, seed=0):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed))


def _fk_groups(T, k, p, lam):
    """FK on p groups of k Gaussian-world particles, flow SDE at a = 0.7, seeded noise and resampling."""
    return S.fk_steer(gaussian_world_velocity, _noise(p * k), schedules.shifted_linear(T, 1.0), {}, linear_reward(),
                      k=k, lam=lam, cond_index=torch.zeros(p * k, dtype=torch.long), eta=eta_schedule(T, 0.7),
                      generator=torch.Generator().manual_seed(1), resample_generator=torch.Generator().manual_seed(2))


def test_lambda_zero_gives_uniform_weights_ess_k_and_no_resampling():
    T, k, p = 10, 8, 3
    sig = schedules.shifted_linear(T, 1.0)
    res = _fk_groups(T, k, p, lam=0.0)
    assert res.steps == tuple(S.resample_steps(T))
    assert torch.allclose(res.ess, torch.full_like(res.ess, float(k)))
    assert not res.resampled.any()
    assert (res.origin == torch.arange(p * k)).all() and (res.log_weight == 0).all()
    # and the particles are plain samples of the kernel: the same noise stream through `sample` gives them bit for bit
    ref = sample(gaussian_world_velocity, _noise(p * k), sig, {}, eta=eta_schedule(T, 0.7), kernel="flow_sde",
                 generator=torch.Generator().manual_seed(1), cond_index=torch.zeros(p * k, dtype=torch.long))
    assert torch.equal(res.final, ref.final)
    assert res.nfe == p * k * T and res.reward_calls == p * k * (len(res.steps) + 1)


def test_fk_weighted_particles_reach_the_tilted_mean():
    """r = b·x, λ = 3: the target is the sampler's own final law tilted by exp(3x), N(m_s + 3·v_s, v_s) for the
    sampler's N(m_s, v_s); with many particles the self-normalised FK estimate of its mean gets there (resampling
    several times; not resetting ℓw after a resampling lands 0.08 off)."""
    T, k = 40, 6000
    sig = schedules.shifted_linear(T, 1.0)
    eta = eta_schedule(T, 0.7)
    plain = sample(gaussian_world_velocity, _noise(40_000, 7), sig, {}, eta=eta, kernel="flow_sde",
                   generator=torch.Generator().manual_seed(8), cond_index=torch.zeros(40_000, dtype=torch.long)).final
    m_s, v_s = plain.double().mean().item(), plain.double().var().item()
    res = S.fk_steer(gaussian_world_velocity, _noise(k, 1), sig, {}, linear_reward(), k=k, lam=3.0,
                     cond_index=torch.zeros(k, dtype=torch.long), eta=eta, potential="diff",
                     generator=torch.Generator().manual_seed(2), resample_generator=torch.Generator().manual_seed(3))
    assert res.resampled.sum() >= 2
    w = torch.softmax(res.log_weight, 0)
    mean = (w * res.final[:, 0].double()).sum().item()
    assert abs(mean - (m_s + 3 * v_s)) < 0.02, (mean, m_s + 3 * v_s)
    assert abs(mean - (M + 3 * SD**2)) < 0.03  # m + s_d²·λ·b = 2.75 up to the sampler's discretisation
    assert abs(res.final[:, 0].double().mean().item() - M) > 0.1  # the particles themselves moved off the base law


@pytest.mark.parametrize("potential", ["max", "sum", "rt"])
def test_only_diff_keeps_usable_final_weights(potential):
    """Every potential's final correction makes the product of log G along a line λ·r(x_T) (METHODS §6.2), so all
    target p·exp(λr) as k → ∞; but max / sum / rt apply about the whole tilt again at each resampling step, and at
    k = 6000 their final weights fall on a few particles (ESS 2–16) with a weighted mean far off the target, where
    diff keeps all 6000 and lands on it. Hence `--output drawn` warns unless the potential is diff (docs/steering.md)."""
    T, k = 40, 6000
    sig = schedules.shifted_linear(T, 1.0)
    eta = eta_schedule(T, 0.7)
    out = {}
    for pot in ("diff", potential):
        res = S.fk_steer(gaussian_world_velocity, _noise(k, 1), sig, {}, linear_reward(), k=k, lam=3.0,
                         cond_index=torch.zeros(k, dtype=torch.long), eta=eta, potential=pot,
                         generator=torch.Generator().manual_seed(2), resample_generator=torch.Generator().manual_seed(3))
        w = torch.softmax(res.log_weight.double(), 0)
        out[pot] = ((w * res.final[:, 0].double()).sum().item(), 1 / (w * w).sum().item())
    target = M + 3 * SD**2
    assert abs(out["diff"][0] - target) < 0.03 and out["diff"][1] > 0.9 * k
    assert out[potential][1] < 0.01 * k and abs(out[potential][0] - target) > 0.2, out


def test_ode_kernel_warns_and_duplicates_stay_identical(caplog):
    T, k = 10, 8
    sig = schedules.shifted_linear(T, 1.0)
    with caplog.at_level(logging.WARNING, logger="flowalign.steer"):
        res = S.fk_steer(gaussian_world_velocity, _noise(k), sig, {}, linear_reward(), k=k, lam=20.0,
                         cond_index=torch.zeros(k, dtype=torch.long), eta=0.0, kernel="euler",
                         resample_generator=torch.Generator().manual_seed(0))
    assert "deterministic kernel" in caplog.text
    assert res.resampled.any()
    for o in res.origin.unique():
        rows = res.final[res.origin == o]
        assert (rows == rows[0]).all()  # copies of one particle never separate under an ODE
    assert res.origin.unique().numel() < k


@pytest.mark.parametrize("steps, steps_s", [(12, [11]), (1, [0])])
def test_a_stochastic_kernel_with_only_its_deterministic_last_step_left_is_not_called_deterministic(caplog, steps,
                                                                                                   steps_s):
    """flow_sde at a = 0.7 with the first resampling at T − 1 (a late start, or T = 1): only eta_schedule's
    deterministic last step follows, so FK only selects; the warning said the kernel was deterministic."""
    k = 4
    with caplog.at_level(logging.WARNING, logger="flowalign.steer"):
        S.fk_steer(gaussian_world_velocity, _noise(k), schedules.shifted_linear(steps, 1.0), {}, linear_reward(), k=k,
                   lam=5.0, cond_index=torch.zeros(k, dtype=torch.long), eta=eta_schedule(steps, 0.7),
                   kernel="flow_sde", steps_s=steps_s, generator=torch.Generator().manual_seed(0),
                   resample_generator=torch.Generator().manual_seed(1))
    assert "no stochastic step follows the first resampling step" in caplog.text
    assert "deterministic kernel" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flowalign.steer"):  # resampling before a stochastic step: silent
        S.fk_steer(gaussian_world_velocity, _noise(k), schedules.shifted_linear(12, 1.0), {}, linear_reward(), k=k,
                   lam=5.0, cond_index=torch.zeros(k, dtype=torch.long), eta=eta_schedule(12, 0.7),
                   kernel="flow_sde", steps_s=[10], generator=torch.Generator().manual_seed(0),
                   resample_generator=torch.Generator().manual_seed(1))
    assert caplog.text == ""


def test_resampling_never_mixes_groups():
    T, k, p = 10, 4, 3
    res = _fk_groups(T, k, p, lam=30.0)
    assert res.resampled.all(dim=1).any()
    assert (res.origin // k == torch.arange(p * k) // k).all()
    assert (res.best // k == torch.arange(p)).all() and (res.drawn // k == torch.arange(p)).all()


def test_per_group_generators_make_a_group_independent_of_its_batch_mates():
    T, k = 10, 4
    sig = schedules.shifted_linear(T, 1.0)
    kw = dict(k=k, lam=10.0, eta=eta_schedule(T, 0.7))
    x = _noise(3 * k, 5)
    both = S.fk_steer(gaussian_world_velocity, x, sig, {}, linear_reward(), cond_index=torch.zeros(3 * k, dtype=torch.long),
                      generator=[torch.Generator().manual_seed(s) for s in (10, 11, 12)], **kw)
    alone = S.fk_steer(gaussian_world_velocity, x[k:2 * k], sig, {}, linear_reward(),
                       cond_index=torch.zeros(k, dtype=torch.long), generator=[torch.Generator().manual_seed(11)], **kw)
    assert torch.equal(both.final[k:2 * k], alone.final)
    assert both.best[1].item() - k == alone.best[0].item()


def test_nonfinite_rewards_kill_a_particle_not_the_group():
    T, k = 6, 4
    sig = schedules.shifted_linear(T, 1.0)

    def reward(z, rows):
        r = z.flatten(1).mean(1).clone()
        r[rows == 0] = float("nan")  # particle 0 is never applicable
        return r

    res = S.fk_steer(gaussian_world_velocity, _noise(k), sig, {}, reward, k=k, lam=1.0,
                     cond_index=torch.zeros(k, dtype=torch.long), eta=eta_schedule(T, 0.7),
                     generator=torch.Generator().manual_seed(0), resample_generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(res.ess).all()
    assert not torch.isfinite(res.reward[0]) and torch.isfinite(res.reward[1:]).all()
    assert res.best.item() != 0  # the NaN particle is never the output (torch.argmax would pick a NaN)


def test_best_of_n_is_the_argmax_of_n_plain_samples():
    T, n, p = 8, 5, 2
    sig = schedules.shifted_linear(T, 1.0)
    x = _noise(p * n, 4)
    res = S.best_of_n(gaussian_world_velocity, x, sig, {}, linear_reward(-1.0), n=n,
                      cond_index=torch.zeros(p * n, dtype=torch.long))
    plain = sample(gaussian_world_velocity, x, sig, {}, eta=0.0, kernel="euler",
                   cond_index=torch.zeros(p * n, dtype=torch.long)).final
    assert torch.equal(res.final, plain)
    r = -plain[:, 0].view(p, n)
    assert res.best.tolist() == (torch.arange(p) * n + r.argmax(1)).tolist()
    assert res.nfe == p * n * T and res.reward_calls == p * n and res.ess.numel() == 0


def test_best_of_n_ties_go_to_the_lowest_particle_index():
    """A discrete verifier (shapes_partial) ties often: the output is the first tied particle, so a group's choice
    depends on its seeds alone, never on the order the rewards came back in; a NaN particle never wins a tie."""
    T, n, p = 4, 4, 3
    sig = schedules.shifted_linear(T, 1.0)
    levels = torch.tensor([[0.5, 1.0, 1.0, 0.0],  # tie between particles 1 and 2 -> 1
                           [1.0, 1.0, 1.0, 1.0],  # all tied -> 0
                           [float("nan"), 0.25, 0.0, 0.25]])  # NaN first, tie between 1 and 3 -> 1

    def reward(z, rows):
        return levels.reshape(-1)[rows]  # [n] the fixed level of each particle

    res = S.best_of_n(gaussian_world_velocity, _noise(p * n, 4), sig, {}, reward, n=n,
                      cond_index=torch.zeros(p * n, dtype=torch.long))
    assert res.best.tolist() == [0 * n + 1, 1 * n + 0, 2 * n + 1]


def test_fk_argument_errors():
    sig = schedules.shifted_linear(4, 1.0)
    x = _noise(6)
    with pytest.raises(ValueError, match="whole number of groups"):
        S.fk_steer(gaussian_world_velocity, x, sig, {}, linear_reward(), k=4, lam=1.0)
    with pytest.raises(ValueError, match="unknown potential"):
        S.fk_steer(gaussian_world_velocity, x, sig, {}, linear_reward(), k=3, lam=1.0, potential="mx")
    with pytest.raises(ValueError, match="lam"):
        S.fk_steer(gaussian_world_velocity, x, sig, {}, linear_reward(), k=3, lam=-1.0)
    with pytest.raises(ValueError, match="step indices"):
        S.fk_steer(gaussian_world_velocity, x, sig, {}, linear_reward(), k=3, lam=1.0, steps_s=[4])


def test_ode_probe_costs_its_forwards_and_scores_the_completion():
    T, k = 10, 2
    sig = schedules.shifted_linear(T, 1.0)
    seen = []

    def reward(z, rows):
        seen.append(z.clone())
        return z.flatten(1).mean(1)

    res = S.fk_steer(gaussian_world_velocity, _noise(k), sig, {}, reward, k=k, lam=0.0,
                     cond_index=torch.zeros(k, dtype=torch.long), eta=0.0, kernel="euler", steps_s=[3], probe="ode:full")
    # an ODE trajectory's full-ODE probe is its own final state, and costs T − t − 1 extra forwards per row
    assert torch.allclose(seen[0], res.final, atol=1e-6)
    assert res.nfe == k * (T + (T - 3 - 1))


# ---------------------------------------------------------------- h-transform guidance (METHODS.md §6.3)


@pytest.mark.parametrize("kernel,eta,steps", [("euler", 0.0, 10), ("euler", 0.0, 40), ("euler", 0.0, 200),
                                              ("flow_sde", 0.7, 10), ("flow_sde", 0.7, 40)])
def test_exact_tilt_reaches_the_tilted_mean(kernel, eta, steps):
    """Guiding every step with the exact u: mean 2.250 (METHODS.md §6.3: Euler 2.250 at T = 10/40/200)."""
    n = 20_000 if kernel == "euler" else 40_000
    sig = schedules.shifted_linear(steps, 1.0)
    etas = eta_schedule(steps, eta)
    guide = S.TiltGuidance(kernel=kernel, eta=etas, grad_fn=exact_u(1.0), band=(0.0, 1.0))
    x = _noise(n, 0)
    out = sample(gaussian_world_velocity, x, sig, {}, eta=etas, kernel=kernel, mean_shift=guide,
                 generator=torch.Generator().manual_seed(1), cond_index=torch.zeros(n, dtype=torch.long)).final
    assert abs(out.double().mean().item() - (M + SD**2)) < 0.01
    assert sorted(set(guide.guided)) == list(range(steps))


def test_dps_guidance_is_exact_in_the_gaussian_world_away_from_sigma_one():
    """Tweedie is exact here, so the DPS gradient through the velocity is ∇log h itself; only the σ = 1 step (where
    σ/(1−σ) is infinite and the hook does not guide) is missing, negligible at T = 200."""
    steps, n = 200, 4000
    sig = schedules.shifted_linear(steps, 1.0)
    guide = S.TiltGuidance(kernel="euler", mode="dps", reward=lambda img, prompts: img.flatten(1).mean(1),
                           decode=lambda z: z, velocity=gaussian_world_velocity, band=(0.0, 1.0))
    guide.prompts = [""] * n
    out = sample(gaussian_world_velocity, _noise(n, 0), sig, {}, eta=0.0, kernel="euler", mean_shift=guide,
                 cond_index=torch.zeros(n, dtype=torch.long)).final
    plain = sample(gaussian_world_velocity, _noise(n, 0), sig, {}, eta=0.0, kernel="euler",
                   cond_index=torch.zeros(n, dtype=torch.long)).final
    shift = (out - plain).double().mean().item()
    assert abs(shift - SD**2) < 0.01  # the tilt moves the mean by s_d²·b/β = 0.25
    assert 0 not in guide.guided and len(guide.guided) == steps - 1


def test_x0_guidance_raises_the_reward_and_normalize_fixes_the_gradient_norm():
    steps, n = 12, 64
    sig = schedules.shifted_linear(steps, 1.0)

    def reward(img, prompts):
        return img.flatten(1).mean(1)

    guide = S.TiltGuidance(kernel="euler", mode="x0", reward=reward, decode=lambda z: z, normalize=0.1)
    guide.prompts = [""] * n

    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    out = sample(gaussian_world_velocity, x, sig, {}, eta=0.0, kernel="euler", mean_shift=guide,
                 cond_index=torch.zeros(n, dtype=torch.long)).final
    plain = sample(gaussian_world_velocity, x, sig, {}, eta=0.0, kernel="euler",
                   cond_index=torch.zeros(n, dtype=torch.long)).final
    assert (out.mean(1) > plain.mean(1)).all()
    # inside the band only: σ ∈ [0.05, 0.8] on the 12-step grid
    assert guide.guided == [t for t in range(steps) if 0.05 <= float(sig[t]) <= 0.8]
    # normalize=c: the shift at a step is Δ·(1 + 0)·(σ/(1−σ))·c·g/‖g‖ for Euler, so its norm is known exactly
    t = guide.guided[0]
    s, sn = sig[t], sig[t + 1]
    xt = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    v = gaussian_world_velocity(xt, s.expand(4), {})
    guide.prompts = [""] * 4
    shift = guide(xt, v, s, sn, t, {})
    expect = float(s - sn) * float(s / (1 - s)) * 0.1
    assert torch.allclose(shift.norm(dim=1), torch.full((4,), expect), rtol=1e-5)


def test_guidance_argument_errors():
    with pytest.raises(ValueError, match="Euler–Maruyama"):
        S.TiltGuidance(kernel="cps", grad_fn=exact_u())
    with pytest.raises(ValueError, match="beta"):
        S.TiltGuidance(grad_fn=exact_u(), beta=0.0)
    with pytest.raises(ValueError, match="reward and decode"):
        S.TiltGuidance(mode="dps", reward=lambda i, p: i.mean(), decode=lambda z: z)
    with pytest.raises(ValueError, match="band"):
        S.TiltGuidance(grad_fn=exact_u(), band=(0.9, 0.1))


# -------------------------------------------------------------------- dead particles stay dead; guidance arguments


@pytest.mark.parametrize("potential", list(S.POTENTIALS))
def test_a_particle_killed_by_a_nonfinite_reward_stays_dead(potential):
    """Particle 0 scores NaN at the first resampling step only; every other reward is 0. It must keep zero weight:
    ESS 3 of 4 afterwards, and the forced resampling at the last step drops it. (torch.nan_to_num turned its
    ℓw = −∞ into −1.8e308 and `diff`'s next log G = λ·(r − (−∞)) into +1.8e308, so it came back with ℓw = 0.)"""
    T, k = 6, 4
    sig = schedules.shifted_linear(T, 1.0)
    calls = []

    def reward(z, rows):
        r = torch.zeros(z.shape[0])
        if not calls:
            r[0] = float("nan")
        calls.append(1)
        return r

    res = S.fk_steer(gaussian_world_velocity, torch.randn(k, 1, generator=torch.Generator().manual_seed(0)), sig, {},
                     reward, k=k, lam=1.0, cond_index=torch.zeros(k, dtype=torch.long), steps_s=[2, 4, 5],
                     potential=potential, eta=eta_schedule(T, 0.7), generator=torch.Generator().manual_seed(0),
                     resample_generator=torch.Generator().manual_seed(1))
    assert res.ess[:, 0].tolist() == pytest.approx([3.0, 3.0, 3.0])
    assert res.resampled[-1, 0] and 0 not in res.origin.tolist()
    assert torch.isfinite(res.log_weight).all()


@pytest.mark.parametrize("potential", list(S.POTENTIALS))
def test_an_all_dead_group_is_not_revived_by_resampling_at_ess_threshold_one(potential):
    """Group 0's 5 particles all score NaN at the first resampling step; group 1 lives. With ``ess_threshold=1``
    (resample at every step of S) the dead group's ESS is 5 − 1e-15 by rounding, so it was "resampled": ℓw reset to 0,
    every dead particle came back with weight, `diff`'s next log G = λ·r − (−∞) = +∞ made the weights NaN and the run
    crashed in the final draw (the other potentials ended with ℓw = 1.8e308). With k = 4 the same group stays dead."""
    T, k = 6, 5
    sig = schedules.shifted_linear(T, 1.0)
    calls = []

    def reward(z, rows):
        r = z[:, 0].float().clone()
        if not calls:
            r[:k] = float("nan")
        calls.append(1)
        return r

    res = S.fk_steer(gaussian_world_velocity, torch.randn(2 * k, 1, generator=torch.Generator().manual_seed(0)), sig,
                     {}, reward, k=k, lam=1.0, cond_index=torch.zeros(2 * k, dtype=torch.long), steps_s=[2, 4, 5],
                     potential=potential, eta=eta_schedule(T, 0.7), ess_threshold=1.0,
                     generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    assert not res.resampled[:, 0].any()  # nothing to resample toward
    assert torch.isneginf(res.log_weight[:k]).all()  # and it stays dead
    assert res.resampled[:, 1].all() and torch.isfinite(res.log_weight[k:]).all()  # the live group is unaffected


def test_tilt_guidance_refuses_a_nonpositive_gradient_scale():
    with pytest.raises(ValueError, match="normalize"):
        S.TiltGuidance(grad_fn=lambda *a: a[0], normalize=-0.1)
    with pytest.raises(ValueError, match="clip"):
        S.TiltGuidance(grad_fn=lambda *a: a[0], clip=float("nan"))


# -------------------------------------------------------------------- resampler laws, potential state, final draw


@pytest.mark.parametrize("name", list(S.RESAMPLERS))
def test_resamplers_are_unbiased_and_draw_each_group_on_its_own(name):
    """Both schemes give particle i k·w̄_i copies in expectation (METHODS.md §6.2), each group with its own draw:
    systematic takes one u ~ U[0, 1/k) per group (a single u shared by 4000 identical groups gives every group the
    same ancestors, so the mean copies of particle 0 are 0 or 1, not k·w̄_0 = 0.4), multinomial draws with replacement
    (without it every particle gets exactly one copy)."""
    p, w = 4000, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    k = w.numel()
    anc = S.RESAMPLERS[name](w.expand(p, k).clone(), torch.Generator().manual_seed(0))  # [P, k]
    assert anc.shape == (p, k) and ((anc >= 0) & (anc < k)).all()
    counts = torch.stack([torch.bincount(a, minlength=k) for a in anc]).to(torch.float64)  # [P, k]
    assert torch.allclose(counts.mean(0), k * w, atol=0.06), counts.mean(0)
    assert len({tuple(a) for a in anc.tolist()}) > 1  # groups with equal weights still draw independently


def test_max_and_sum_potentials_carry_their_running_state():
    """METHODS.md §6.2 table, three steps r = 1, −2, 0.5 at λ = 2: ``max`` keeps the running maximum (log G = 2, 2, 2,
    not λ·r_t = 2, −4, 1), ``sum`` the running sum (log G = λ·(r_t + a_prev) = 2, −2, −1), ``rt`` is λ·r_t."""
    rs = [1.0, -2.0, 0.5]
    want = {"max": [2.0, 2.0, 2.0], "sum": [2.0, -2.0, -1.0], "rt": [2.0, -4.0, 1.0], "diff": [2.0, -6.0, 5.0]}
    for name, expect in want.items():
        state, got = S.initial_state(1), []
        for r in rs:
            lg, state = S.POTENTIALS[name](torch.tensor([r], dtype=torch.float64), state, 2.0)  # [1]
            got.append(lg.item())
        assert got == pytest.approx(expect), name
        assert state.log_g.item() == pytest.approx(sum(expect))
    state = S.initial_state(1)
    for r in rs:
        _, state = S.potential_max(torch.tensor([r], dtype=torch.float64), state, 2.0)
    assert state.m_prev.item() == 1.0
    state = S.initial_state(1)
    for r in rs:
        _, state = S.potential_sum(torch.tensor([r], dtype=torch.float64), state, 2.0)
    assert state.a_prev.item() == pytest.approx(-0.5)


def test_drawn_is_a_draw_from_the_final_weights():
    """``drawn`` samples each group's final weights ∝ exp(λ·r(x_T)) (no resampling step: ℓw = λ·r exactly). Rewards
    0 and log 3 per pair at λ = 1 give weights 1/4, 3/4: over 2000 groups the second particle is drawn 3/4 of the time
    (a uniform draw, ignoring the weights, gives 1/2), and ``best`` is always it."""
    T, k, p = 2, 2, 2000
    lr3 = math.log(3.0)

    def reward(z, rows):
        return (rows % 2).to(torch.float32) * lr3  # [n] independent of z

    res = S.fk_steer(gaussian_world_velocity, _noise(p * k), schedules.shifted_linear(T, 1.0), {}, reward, k=k,
                     lam=1.0, cond_index=torch.zeros(p * k, dtype=torch.long), steps_s=(), eta=0.0, kernel="euler",
                     resample_generator=torch.Generator().manual_seed(0))
    assert torch.allclose(res.log_weight.view(p, k), torch.tensor([[0.0, lr3]], dtype=torch.float64).expand(p, k))
    second = (res.drawn % k == 1).double().mean().item()
    assert abs(second - 0.75) < 0.04, second
    assert (res.best == torch.arange(p) * k + 1).all()


# -------------------------------------------------------------------- guidance scale: β and clip


def _linear_guide_shift(a, **kw):
    """TiltGuidance's shift (x0 mode, Euler) at step 5 of 12 for r(z) = a·z, whose gradient is a [n, 3]."""
    sig = schedules.shifted_linear(12, 1.0)
    guide = S.TiltGuidance(kernel="euler", mode="x0", reward=lambda img, prompts: (img * a).sum(1),
                           decode=lambda z: z, **kw)
    x = torch.randn(a.shape[0], 3, generator=torch.Generator().manual_seed(0))  # [n, 3]
    guide.prompts = [""] * a.shape[0]
    s, sn = sig[5], sig[6]
    shift = guide(x, gaussian_world_velocity(x, s.expand(a.shape[0]), {}), s, sn, 5, {})  # [n, 3]
    return shift, float(s - sn) * float(s / (1 - s))


def test_guidance_shift_is_the_gradient_over_beta_and_clip_only_shortens_it():
    """Euler (g = 0): the shift is Δ·(σ/(1−σ))·∇r/β (METHODS.md §6.3, target exp(r/β)), so β = 2 halves it; ``clip=c``
    is g·min(1, c/‖g‖): a row whose gradient is shorter than c keeps it, a longer one is cut to norm c."""
    a = torch.tensor([[0.3, 0.0, -0.4], [3.0, 4.0, 0.0]])  # [2, 3] gradient norms 0.5 and 5
    shift, scale = _linear_guide_shift(a, beta=2.0)  # [2, 3]
    assert torch.allclose(shift, scale * a / 2.0, rtol=1e-5)
    shift, scale = _linear_guide_shift(a, clip=1.0)
    assert torch.allclose(shift[0], scale * a[0], rtol=1e-5)  # norm 0.5 < 1: unchanged
    assert torch.allclose(shift[1], scale * a[1] / 5.0, rtol=1e-5)  # norm 5 > 1: cut to norm 1


def test_x0_guidance_takes_the_gradient_at_the_clean_estimate():
    """``mode="x0"``: ∇r at x̂0 = x − σ·v with the step's own velocity (METHODS.md §6.3, skip-Jacobian). For
    r(z) = −½‖z − c‖², ∇r = c − x̂0, so the Euler shift is Δ·(σ/(1−σ))·(c − x + σ·v) (a linear reward's gradient is the
    same everywhere and cannot tell where it was taken)."""
    sig = schedules.shifted_linear(12, 1.0)
    c = torch.tensor([[1.0, -2.0, 0.5]])  # [1, 3]
    guide = S.TiltGuidance(kernel="euler", mode="x0", reward=lambda img, prompts: -0.5 * ((img - c) ** 2).sum(1),
                           decode=lambda z: z)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)  # [4, 3] each (any v: the hook's own)
    guide.prompts = [""] * 4
    s, sn = sig[5], sig[6]
    shift = guide(x, v, s, sn, 5, {})  # [4, 3]
    want = float(s - sn) * float(s / (1 - s)) * (c - (x - s * v))
    assert torch.allclose(shift, want, rtol=1e-5, atol=1e-6)


def test_resampling_does_not_draw_from_the_step_noise_generator():
    """With one step-noise ``generator``, the resampling is ``resample_generator``'s: the step-noise stream is exactly
    the plain sampler's (the same draws, however often FK resamples), so the kernel's noise does not shift with the
    resampling decisions."""
    T, k = 10, 8
    sig, eta = schedules.shifted_linear(T, 1.0), eta_schedule(T, 0.7)
    g_fk, g_plain = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    res = S.fk_steer(gaussian_world_velocity, _noise(k), sig, {}, linear_reward(), k=k, lam=30.0,
                     cond_index=torch.zeros(k, dtype=torch.long), eta=eta, generator=g_fk,
                     resample_generator=torch.Generator().manual_seed(2))
    assert res.resampled.sum() >= 2
    sample(gaussian_world_velocity, _noise(k), sig, {}, eta=eta, kernel="flow_sde", generator=g_plain,
           cond_index=torch.zeros(k, dtype=torch.long))
    assert torch.equal(g_fk.get_state(), g_plain.get_state())


def test_guidance_uses_the_noise_level_of_its_own_step():
    """With a per-step η [T], the shift at step t uses η_t: for ``flow_sde`` g_t² = a_t²·σ/(1−σ), so ``tilt_shift``'s
    factor 1 + g²(1−σ)/(2σ) is 1 + a_t²/2 (METHODS.md §6.3): Δ·u at a step with a_t = 0, Δ·(1 + 0.3²/2)·u at one with
    a_t = 0.3, whatever η is at step 0."""
    steps = 12
    sig = schedules.shifted_linear(steps, 1.0)
    eta = torch.zeros(steps)  # [T]
    eta[0], eta[5] = 0.7, 0.3
    u = torch.tensor([[0.2, -0.1, 0.4]])  # [1, 3]
    guide = S.TiltGuidance(kernel="flow_sde", eta=eta, grad_fn=lambda x, s, v, c: u.expand_as(x), band=(0.0, 1.0))
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))  # [2, 3]
    for t, factor in ((3, 1.0), (5, 1.0 + 0.3**2 / 2)):
        s, sn = sig[t], sig[t + 1]
        shift = guide(x, gaussian_world_velocity(x, s.expand(2), {}), s, sn, t, {})  # [2, 3]
        assert torch.allclose(shift, float(s - sn) * factor * u.expand(2, 3), rtol=1e-5), t
