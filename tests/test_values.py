"""The process-reward core: value probes, their compute savings and the guidance hook (DESIGN.md §4, METHODS.md §4–5)."""

import itertools

import pytest
import torch

from flowalign.samplers import eta_schedule, sample, schedules, sd3_diffusers, step_log_prob
from flowalign.samplers.plans import branch as plan_branch
from flowalign.values import (NFECounter, RewardGuidance, make_probe, ode_canonical, parse_mode, probe_nfe,
                              probe_values, probe_values_naive)

from test_samplers import T as T6, _cond, elementwise_velocity  # noqa: E402  (a batch-invariant velocity, 6 steps)

from gaussian_world import M, SD, Counting, gaussian_world_velocity  # noqa: E402  (exact; elementwise, batch-invariant)

T = 8


class TinyNet(torch.nn.Module):
    """A tiny model with weights: v = MLP([x, σ]) + c (batch composition may change the last bits)."""

    def __init__(self, d=4):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d + 1, 16), torch.nn.Tanh(), torch.nn.Linear(16, d))

    def forward(self, x, sigma, cond):
        return self.net(torch.cat([x, sigma[:, None]], 1)) + cond["c"]


def score(z, rows):
    return {"r": -(z - 2.0).pow(2).mean(1), "s": torch.sin(3 * z).mean(1)}


def _traj(eta, *, b=6, shared_noise=False, vel=gaussian_world_velocity, kernel="flow_sde", keep=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = {"c": torch.tensor([[-0.3] * 4, [0.4] * 4])}
    ci = torch.arange(b) // (b // 2)
    x = torch.randn(b, 4, generator=g)
    if shared_noise:
        x = x[ci * (b // 2)]
    return sample(vel, x, schedules.sd3_diffusers(T), cond, eta=eta, kernel=kernel, generator=g, cond_index=ci,
                  group=ci, keep_velocities=keep)


def test_parse_mode_and_cost_table():
    assert parse_mode("x0") == ("euler", 1, 1) and parse_mode("ode:full") == ("euler", None, 1)
    assert parse_mode("ode:3") == ("euler", 3, 1) and parse_mode("ode2:2") == ("midpoint", 2, 1)
    assert parse_mode("ode/2") == ("euler", None, 2) and parse_mode("ode2/3") == ("midpoint", None, 3)
    assert parse_mode("ode/1").grid(4, 10) == parse_mode("ode:full").grid(4, 10) == list(range(4, 11))
    assert parse_mode("ode/3").grid(2, 10) == [2, 5, 8, 10] and parse_mode("ode/3").grid(8, 10) == [8, 10]
    for bad in ("ode", "ode:0", "full", "ode3:2", "ode/0", "ode/", "ode/x", "ode:2/2", "x0/2"):
        with pytest.raises(ValueError):
            parse_mode(bad)
    # METHODS §4.1 cost: full probes at T = 10 from states 0..9 = Σ(10 − t) = 55; 45 with reuse
    assert sum(probe_nfe("ode:full", t, 10, reuse=False) for t in range(10)) == 55
    assert sum(probe_nfe("ode:full", t, 10) for t in range(10)) == 45
    assert sum(probe_nfe("ode:2", t, 10) for t in range(10)) == 9 and probe_nfe("x0", 3, 10) == 0
    # G²RPO's coarsened grids: ⌈(T − t)/λ⌉ Euler steps, one of them reused
    assert [probe_nfe("ode/2", t, 10) for t in (0, 1, 8, 9)] == [4, 4, 0, 0]
    assert [probe_nfe("ode/3", t, 10, reuse=False) for t in (0, 1, 2)] == [4, 3, 3]


@pytest.mark.parametrize("mode", ["ode:full", "ode:2", "ode:3", "x0", "ode2:2", "ode2:full", "ode/2", "ode/3",
                                  "ode2/2"])
def test_batched_engine_equals_naive_reference(mode):
    """All savings on (staggering, reuse, ODE-skip, dedupe) and the one-at-a-time reference agree bit for bit."""
    eta = eta_schedule(T, 0.7, window=(2, 3))  # ODE prefix and tail: the skip rule applies
    traj = _traj(eta, shared_noise=True)
    mask = torch.rand(6, T + 1, generator=torch.Generator().manual_seed(1)) < 0.7
    mask[:, 0] = True
    fast = probe_values(gaussian_world_velocity, traj, mask, mode, score, max_batch=5)
    ref = probe_values_naive(gaussian_world_velocity, traj, mask, mode, score)
    for k in ("r", "s"):
        assert torch.equal(torch.isnan(fast[k]), ~mask)
        assert torch.equal(fast[k][mask], ref[k][mask]), (mode, k)


def test_full_ode_probes_of_all_ode_trajectory_equal_final_reward():
    traj = _traj(0.0)
    final = score(traj.final, None)
    mask = torch.ones(6, T + 1, dtype=torch.bool)
    vel = Counting(gaussian_world_velocity)
    v = probe_values(vel, traj, mask, "ode:full", score)
    assert vel.nfe == 0  # every state maps to x_T through η = 0 steps: nothing is integrated
    for k in final:
        assert torch.equal(v[k], final[k][:, None].expand(-1, T + 1))
    # really integrating (skip off, no reuse) still reproduces the final reward bit-exactly
    v2 = probe_values(vel, traj, mask, "ode:full", score, skip_ode=False, reuse_velocity=False)
    assert vel.nfe == 6 * sum(T - t for t in range(T))
    for k in final:
        assert torch.equal(v2[k], final[k][:, None].expand(-1, T + 1))
    # a model with weights: exact through reuse, equal to float tolerance when re-integrated
    net = TinyNet()
    tn = _traj(0.0, vel=net)
    want = score(tn.final, None)["r"][:, None].expand(-1, T + 1)
    assert torch.equal(probe_values(net, tn, mask, "ode:full", score)["r"], want)
    assert torch.allclose(probe_values(net, tn, mask, "ode:full", score, skip_ode=False)["r"], want, atol=1e-5)


def test_reuse_skip_and_dedupe_save_exactly_the_predicted_forwards():
    eta = eta_schedule(T, 0.7)  # all SDE, last step ODE
    traj = _traj(eta)
    mask = torch.ones(6, T + 1, dtype=torch.bool)
    counts = {}
    for name, kw in {"none": dict(reuse_velocity=False, skip_ode=False, dedupe=False), "all": {}}.items():
        vel = Counting(gaussian_world_velocity)
        probe_values(vel, traj, mask, "ode:full", score, terminal=score(traj.final, None), **kw)
        counts[name] = (vel.nfe, vel.calls)
    assert counts["none"][0] == 6 * sum(T - t for t in range(T))  # every state, native remaining grid
    assert counts["all"][0] == 6 * sum(T - t - 1 for t in range(T - 1))  # x_{T−1} → x_T is ODE; reuse saves 1
    assert counts["all"][1] <= T  # staggered: at most one launch per grid index
    # x0 probes are free with cached velocities, cost one forward each without
    vel = Counting(gaussian_world_velocity)
    probe_values(vel, traj, mask, "x0", score)
    assert vel.nfe == 0
    probe_values(vel, _traj(eta, keep=False), mask, "x0", score)
    assert vel.nfe == 6 * (T - 1)  # x̂0(x_{T−1}) through the ODE last step is x_T itself: no forward
    # a group with shared initial noise probes V(x_0) once per group
    shared = _traj(eta, shared_noise=True)
    m0 = torch.zeros(6, T + 1, dtype=torch.bool)
    m0[:, 0] = True
    vel = Counting(gaussian_world_velocity)
    v = probe_values(vel, shared, m0, "ode:full", score)
    assert vel.nfe == 2 * (T - 1)
    assert torch.equal(v["r"][:3, 0], v["r"][0, 0].expand(3)) and v["r"][0, 0] != v["r"][3, 0]


def test_ode_canonical_maps_states_through_ode_runs():
    eta = torch.tensor([[0.0, 0.7, 0.0, 0.0, 0.7, 0.0]])
    assert ode_canonical(eta).tolist() == [[1, 1, 4, 4, 4, 6, 6]]


def test_guided_deterministic_steps_are_not_skipped_as_ode():
    """A guidance shift at an η = 0 step makes it a non-ODE step: skipping it would give V(x_{T−1}) = R (wrong)."""
    steps = 8
    cond = {"c": torch.tensor([[-0.3] * 4, [0.4] * 4])}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, generator=g)
    guide = RewardGuidance(lambda z, s, c: -(z - 3.0).pow(2).mean(1), lam=5.0, steps=None)  # every step, η=0 too
    tr = sample(gaussian_world_velocity, x, schedules.sd3_diffusers(steps), cond, eta=eta_schedule(steps, 0.7),
                cond_index=torch.tensor([0, 0, 1, 1]), generator=g, keep_velocities=True, mean_shift=guide)
    assert tr.extras["shifted"].all()
    mask = torch.zeros(4, steps + 1, dtype=torch.bool)
    mask[:, steps - 1] = True
    term = score(tr.final, None)
    fast = probe_values(gaussian_world_velocity, tr, mask, "ode:full", score, terminal=term)["r"][:, steps - 1]
    ref = probe_values(gaussian_world_velocity, tr, mask, "ode:full", score, terminal=term,
                       skip_ode=False)["r"][:, steps - 1]
    assert torch.allclose(fast, ref) and not torch.allclose(fast, term["r"])
    assert ode_canonical(torch.zeros(1, 3), torch.tensor([False, True, False])).tolist() == [[1, 1, 3, 3]]


def test_nfe_counter_phase_and_make_probe_cache():
    class Model:
        def velocity(self, x, sigma, cond):
            return gaussian_world_velocity(x, sigma, cond)

    model = Model()
    nfe = NFECounter(model)
    with nfe.phase("sampling"):
        traj = _traj(eta_schedule(T, 0.7), vel=model.velocity)
    probe = make_probe(model.velocity, traj, score, terminal=score(traj.final, None), counter=nfe)
    mask = torch.zeros(6, T + 1, dtype=torch.bool)
    mask[:, 2] = True
    a = probe("ode:full", mask)
    used = nfe.totals()["probing"]
    assert nfe.totals()["sampling"] == 6 * T and used == 6 * (T - 3)
    b = probe("ode:full", mask)  # cached: no new forwards
    assert nfe.totals()["probing"] == used and torch.allclose(a["r"], b["r"], equal_nan=True)
    mask[:, 3] = True
    c = probe("ode:full", mask)
    assert nfe.totals()["probing"] == used + 6 * (T - 4)
    assert torch.equal(c["r"][:, 2], a["r"][:, 2]) and torch.isfinite(c["r"][:, 3]).all()


def prm(x, sigma, cond):
    return -((x - 1.0) ** 2).mean(1) * (1 - sigma)


def test_guidance_hook_lambda_zero_is_the_dance_kernel_and_ratio_is_one():
    sig = schedules.shifted_linear(T, 3.0)
    cond = {"c": torch.zeros(1, 4)}
    x = torch.randn(4, 4)
    ci = torch.zeros(4, dtype=torch.long)
    eta = eta_schedule(T, 0.3)
    kw = dict(eta=eta, kernel="dance_sde", cond_index=ci, keep_means=True)
    plain = sample(gaussian_world_velocity, x, sig, cond, generator=torch.Generator().manual_seed(2), **kw)
    g0 = RewardGuidance(prm, 0.0, steps=[4, 5, 6])
    zero = sample(gaussian_world_velocity, x, sig, cond, generator=torch.Generator().manual_seed(2), mean_shift=g0, **kw)
    assert torch.equal(plain.latents, zero.latents) and torch.equal(plain.log_probs, zero.log_probs)
    guide = RewardGuidance(prm, 5.0, steps=[4, 5, 6])
    tr = sample(gaussian_world_velocity, x, sig, cond, generator=torch.Generator().manual_seed(2), mean_shift=guide,
                **kw)
    assert torch.equal(tr.latents[:, :5], plain.latents[:, :5]) and not torch.equal(tr.latents[:, 5], plain.latents[:, 5])
    # guidance moves the samples up the PRM
    assert prm(tr.latents[:, 5], sig[5].expand(4), None).mean() > prm(plain.latents[:, 5], sig[5].expand(4), None).mean()
    # stored log p_old is the unguided density: re-scoring with the same kernel gives ratio 1
    for t in range(T - 1):
        lp, _ = step_log_prob(gaussian_world_velocity, tr.latents[:, t], tr.latents[:, t + 1], sig[t].expand(4),
                              sig[t + 1].expand(4), eta[t].expand(4), {"c": cond["c"][ci]}, kernel="dance_sde")
        assert (lp - tr.log_probs[:, t]).abs().max() < 1e-5
    ex = guide.credit_extras(tr)
    assert ex["prm_steps"].tolist() == [False] * 4 + [True] * 3 + [False]
    pv = ex["prm"]
    assert pv.shape == (4, T + 1) and torch.isfinite(pv[:, 4:8]).all() and torch.isnan(pv[:, :4]).all()
    assert torch.isnan(pv[:, 8]).all()
    assert torch.allclose(pv[:, 7], prm(tr.latents[:, 7], sig[7].expand(4), None))


def test_probe_engine_equals_naive_on_shared_noise_chains_and_branch_trees():
    """The batched engine (staggered, reuse, ODE-skip, dedupe, chunking) equals the one-probe-at-a-time reference
    bit for bit on a batch-invariant velocity, for chains with shared initial noise and windowed SDE, and on a
    branched rollout whose children share the trunk prefix."""
    sig = sd3_diffusers(T6)
    cond = _cond()

    def score(lat, rows):
        return {"r": lat.flatten(1).sum(1), "q": (lat ** 2).flatten(1).mean(1)}

    noise = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(0)).repeat_interleave(3, 0)
    ci = torch.tensor([0, 0, 0, 1, 1, 1])
    cases = [("flow_sde", eta_schedule(T6, 0.7)), ("cps", eta_schedule(T6, 0.5, window=(1, 3)))]
    for kernel, eta in cases:
        tr = sample(elementwise_velocity, noise, sig, cond, eta=eta, kernel=kernel, cond_index=ci, keep_velocities=True,
                    generator=torch.Generator().manual_seed(3))
        mask = torch.ones(6, T6 + 1, dtype=torch.bool)
        for mode in ("x0", "ode:2", "ode:full", "ode2:2"):
            ref = probe_values_naive(elementwise_velocity, tr, mask, mode, score)
            for reuse, skip, dedupe, mb in itertools.product([True, False], [True, False], [True, False], [None, 2]):
                got = probe_values(elementwise_velocity, tr, mask, mode, score, reuse_velocity=reuse, skip_ode=skip,
                                   dedupe=dedupe, max_batch=mb)
                for k in ref:
                    assert torch.equal(got[k], ref[k]), (kernel, mode, reuse, skip, dedupe, mb, k)
    trb = plan_branch(elementwise_velocity, torch.randn(2, 3, 2), sig, cond, eta=eta_schedule(T6, 0.7), children=3,
                      generator=torch.Generator().manual_seed(4), keep_velocities=True, branch_steps=[1, 3])
    mask = torch.ones(trb.batch_size, T6 + 1, dtype=torch.bool)
    for mode in ("x0", "ode:2", "ode:full", "ode2:full"):
        ref = probe_values_naive(elementwise_velocity, trb, mask, mode, score)
        got = probe_values(elementwise_velocity, trb, mask, mode, score)
        for k in ref:
            assert torch.equal(got[k], ref[k]), (mode, k)


# ------------------------------------------------------------------------------ reference values (bench credit)


def _gaussian_flow_endpoint(x, sigma, c):
    """The exact probability-flow ODE map x_σ → x_0 of the Gaussian world (data N(m, s_d²) per dimension): affine,
    matching the marginal N((1 − σ)m, (1 − σ)²s_d² + σ²) to N(m, s_d²)."""
    m = M + c
    std = ((1 - sigma) ** 2 * SD**2 + sigma**2) ** 0.5
    return m + SD * (x - (1 - sigma) * m) / std


def test_refine_grid_nests_the_native_grid():
    from flowalign.values import refine_grid

    sig = schedules.sd3_diffusers(T)  # not nested under sd3_diffusers(4T) (double shift): refine by splitting steps
    fine = refine_grid(sig, 4)
    assert fine.shape == (4 * T + 1,) and torch.equal(fine[::4], sig.float())
    assert bool((fine[1:] < fine[:-1]).all())  # strictly decreasing
    assert torch.equal(refine_grid(sig, 1), sig.float())
    with pytest.raises(ValueError):
        refine_grid(sig, 0)


def test_refined_ode_values_equal_ode_full_at_factor_one_and_converge_to_the_exact_flow():
    from flowalign.values import refined_ode_values

    traj = _traj(eta_schedule(T, 0.7))
    mask = torch.ones(6, T + 1, dtype=torch.bool)
    mask[:, T] = False
    ref = probe_values_naive(gaussian_world_velocity, traj, mask, "ode:full", score)
    one = refined_ode_values(gaussian_world_velocity, traj, mask, score, 1, max_batch=7)
    for k in ("r", "s"):
        assert torch.equal(one[k][mask], ref[k][mask]) and bool(one[k][~mask].isnan().all())  # the same Euler steps on the same grid, bit for bit
    # the first coordinate of the endpoint: Euler error shrinks with the refinement towards the exact flow map
    first = lambda z, rows: {"z": z[:, 0]}  # noqa: E731
    c = torch.tensor([-0.3, 0.4])[traj.cond_index]  # [B]
    sig = traj.sigmas.to(torch.float64)
    err = []
    for factor in (1, 4, 16):
        v = refined_ode_values(gaussian_world_velocity, traj, mask, first, factor)["z"]  # [B, T+1]
        exact = torch.stack([_gaussian_flow_endpoint(traj.latents[:, t, 0].double(), sig[t], c.double())
                             for t in range(T)], 1)  # [B, T]
        err.append(float((v[:, :T].double() - exact).abs().max()))
    assert err[0] > 3 * err[1] and err[1] > 3 * err[2], err  # first order: ≈ 4× less per 4× finer (0.239, 0.064, 0.017)
    assert err[2] < 0.03


def test_sde_mc_values_are_the_ode_value_on_ode_rows_and_reproducible():
    from flowalign.values import sde_mc_values

    mask = torch.ones(6, T + 1, dtype=torch.bool)
    # all-ODE trajectory: every completion of every state is the trajectory's own final state
    traj = _traj(0.0)
    v = sde_mc_values(gaussian_world_velocity, traj, mask, score, k=3, kernel="flow_sde", seed=0)
    final = score(traj.final, None)
    for key in final:
        assert v[key].shape == (3, 6, T + 1)
        assert torch.equal(v[key], final[key][None, :, None].expand(3, -1, T + 1))
    # SDE trajectory: the last step is ODE, so x_{T-1} and x_T complete deterministically; earlier states spread
    traj = _traj(eta_schedule(T, 0.7))
    a = sde_mc_values(gaussian_world_velocity, traj, mask, score, k=4, kernel="flow_sde", seed=5, max_batch=10)
    b = sde_mc_values(gaussian_world_velocity, traj, mask, score, k=4, kernel="flow_sde", seed=5, max_batch=10)
    assert torch.equal(a["r"], b["r"])  # the seed draws every completion's noise
    final = score(traj.final, None)["r"]
    assert torch.equal(a["r"][:, :, T], final[None].expand(4, -1))
    ode_last = probe_values_naive(gaussian_world_velocity, traj, mask, "ode:full", score)["r"][:, T - 1]
    assert torch.allclose(a["r"][:, :, T - 1], ode_last[None].expand(4, -1), atol=1e-6)
    assert bool((a["r"][:, :, 0].std(0) > 1e-3).all())  # different noise per completion
    c = sde_mc_values(gaussian_world_velocity, traj, mask, score, k=4, kernel="flow_sde", seed=6)
    assert not torch.equal(a["r"][:, :, 0], c["r"][:, :, 0])
    with pytest.raises(ValueError):
        sde_mc_values(gaussian_world_velocity, traj, mask, score, k=0, kernel="flow_sde", seed=0)


def test_reference_values_state_by_state_equal_one_call():
    """bench credit computes the references one state at a time (so its progress bar moves): each SDE completion
    draws from its own (seed, state, row, completion) stream, so the completions are the same draws, and the
    refined ODE the same steps."""
    from flowalign.values import refined_ode_values, sde_mc_values

    traj = _traj(eta_schedule(T, 0.7))
    mask = torch.ones(6, T + 1, dtype=torch.bool)
    mask[:, T] = False
    whole = sde_mc_values(gaussian_world_velocity, traj, mask, score, k=2, kernel="flow_sde", seed=3)["r"]
    fine = refined_ode_values(gaussian_world_velocity, traj, mask, score, 3)["r"]
    for t in reversed(range(T)):  # in any order
        m_t = torch.zeros_like(mask)
        m_t[:, t] = mask[:, t]
        part = sde_mc_values(gaussian_world_velocity, traj, m_t, score, k=2, kernel="flow_sde", seed=3)["r"]
        assert torch.equal(part[:, :, t], whole[:, :, t])
        assert torch.equal(refined_ode_values(gaussian_world_velocity, traj, m_t, score, 3)["r"][:, t], fine[:, t])


def test_sde_mc_values_do_not_depend_on_the_batching_or_the_selected_rows():
    """A completion is drawn from its own (seed, state, row, completion) stream: the rows per forward (max_batch)
    and which other rows are completed in the same call change nothing (they changed every draw before)."""
    from flowalign.values import sde_mc_values

    traj = _traj(eta_schedule(T, 0.7))
    mask = torch.ones(6, T + 1, dtype=torch.bool)
    mask[:, T] = False
    ref = sde_mc_values(gaussian_world_velocity, traj, mask, score, k=3, kernel="flow_sde", seed=9)["r"]
    for max_batch in (1, 4, 7):
        got = sde_mc_values(gaussian_world_velocity, traj, mask, score, k=3, kernel="flow_sde", seed=9,
                            max_batch=max_batch)["r"]
        assert torch.equal(got[..., :T], ref[..., :T]) and bool(got[..., T].isnan().all()), max_batch
    odd = mask.clone()
    odd[::2] = False  # rows 1, 3, 5 only
    got = sde_mc_values(gaussian_world_velocity, traj, odd, score, k=3, kernel="flow_sde", seed=9)["r"]
    assert torch.equal(got[:, 1::2, :T], ref[:, 1::2, :T])
    assert bool(got[:, ::2].isnan().all())
    assert bool((ref[0, :, :T - 1] != ref[1, :, :T - 1]).any())  # completions differ from each other


def test_first_equal_partitions_rows_like_a_sort_of_their_key_and_bits():
    """The hashed exact-duplicate finder (probe dedupe and the update's shared states) gives the partition that
    ``torch.unique`` over (key, bits) gives, across several hashing slabs, with each class led by its first row."""
    from flowalign.values import first_equal

    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 3, 5, generator=g)  # [7, *row]
    pick = torch.randint(0, 7, (40,), generator=g)  # [40] rows drawn with repeats
    rows = base[pick].clone()  # [40, 3, 5]
    keys = torch.randint(0, 2, (40,), generator=g)  # [40] e.g. prompt rows: same bits, other key = other class
    got = first_equal(lambda idx: rows[idx], keys.tolist())  # [40]
    packed = torch.cat([keys[:, None].to(torch.int32), rows.reshape(40, -1).view(torch.int32)], dim=1)  # [40, 1 + D]
    _, inv = torch.unique(packed, dim=0, return_inverse=True)  # [40]
    for i in range(40):
        same = (inv == inv[i]).nonzero().flatten()
        assert int(got[i]) == int(same.min())  # the first row of its class
    big = torch.randn(3, 2**21, generator=g)  # [3, 2M]: two rows per hashing slab, so two slabs
    big[2] = big[0]
    assert first_equal(lambda idx: big[idx], [0, 0, 0]).tolist() == [0, 1, 0]


def test_make_probe_bounds_the_rows_per_forward_and_per_score_call():
    """The trainer's probe: ``make_probe(..., max_batch=M, score_batch=S)`` reaches the engine, so no forward sees
    more than M rows and no ``score`` (decode + rewards) call more than S latents; the values do not change
    (the Gaussian world's velocity is elementwise, so batch composition cannot change a bit)."""
    traj = _traj(eta_schedule(T, 0.7), b=6)
    term = score(traj.final, None)
    mask = torch.ones(6, T + 1, dtype=torch.bool)
    sizes, scored = [], []

    def vel(x, s, c):
        sizes.append(x.shape[0])
        return gaussian_world_velocity(x, s, c)

    def sc(z, rows):
        scored.append(z.shape[0])
        return score(z, rows)

    free = make_probe(vel, traj, sc, terminal=term)("ode:full", mask)
    assert max(sizes) > 4 and max(scored) > 3  # unbounded: one batch of every probe
    sizes.clear()
    scored.clear()
    bounded = make_probe(vel, traj, sc, terminal=term, max_batch=4, score_batch=3)("ode:full", mask)
    assert sizes and max(sizes) <= 4 and scored and max(scored) <= 3
    for k in ("r", "s"):
        assert torch.equal(bounded[k], free[k])


# ------------------------------------------------------------------------------ pinned by mutation testing


def test_nfe_counter_state_round_trips_and_nested_phases_restore_the_outer_one():
    """A resumed run restores both per-sample forwards (``counts``) and launches (``calls``), each from its own key;
    leaving a nested phase attributes forwards to the enclosing phase again, not to "other"."""

    class Model:
        def velocity(self, x, sigma, cond):
            return gaussian_world_velocity(x, sigma, cond)

    model = Model()
    nfe = NFECounter(model)
    x, s, c = torch.zeros(3, 4), torch.full((3,), 0.5), {"c": torch.zeros(3, 4)}  # [3, 4], [3], cond [3, 4]
    with nfe.phase("sampling"):
        model.velocity(x, s, c)
        with nfe.phase("probing"):
            model.velocity(x[:2], s[:2], {"c": c["c"][:2]})
        model.velocity(x, s, c)  # back in "sampling"
    assert nfe.state_dict() == {"counts": {"sampling": 6, "probing": 2}, "calls": {"sampling": 2, "probing": 1}}
    other = NFECounter(Model())
    other.load_state_dict(nfe.state_dict())
    assert other.state_dict() == nfe.state_dict()


def test_probe_costs_are_zero_at_x_T_and_two_forwards_per_midpoint_sub_step():
    """METHODS.md §4.0 cost table: x_T is never integrated (0 NFE in every mode, reuse or not); an explicit-midpoint
    sub-step costs 2 forwards, one of them the reused cached velocity. The engine spends exactly Σ probe_nfe."""
    for mode in ("x0", "ode:2", "ode:full", "ode/2", "ode2:2", "ode2:full", "ode2/3"):
        assert probe_nfe(mode, 10, 10) == 0 and probe_nfe(mode, 10, 10, reuse=False) == 0, mode
    assert [probe_nfe("ode2:2", t, 10) for t in (0, 8, 9)] == [3, 3, 1]  # 2 sub-steps (1 from t = 9): 2·n − 1
    assert probe_nfe("ode2:full", 4, 10, reuse=False) == 12 and probe_nfe("ode2:full", 4, 10) == 11
    assert probe_nfe("ode2/3", 2, 10) == 2 * 3 - 1  # grid [2, 5, 8, 10]
    traj = _traj(eta_schedule(T, 0.7))
    mask = torch.ones(6, T + 1, dtype=torch.bool)
    mask[:, T] = False
    for mode in ("ode2:2", "ode2:full", "ode2/3"):
        vel = Counting(gaussian_world_velocity)
        probe_values(vel, traj, mask, mode, score, skip_ode=False, dedupe=False)
        assert vel.nfe == 6 * sum(probe_nfe(mode, t, T) for t in range(T)), mode


def test_first_equal_never_matches_a_row_holding_nan():
    """``first_equal``: "NaN never equals itself, so a row holding a NaN is its own kind" (bit-identical NaN rows
    included); finite duplicates still match."""
    from flowalign.values import first_equal

    rows = torch.tensor([[float("nan"), 1.0], [float("nan"), 1.0], [0.0, 1.0], [0.0, 1.0]])  # [4, 2]
    assert first_equal(lambda idx: rows[idx], [0, 0, 0, 0]).tolist() == [0, 1, 2, 2]


def test_dedupe_merges_equal_states_of_one_prompt_only():
    """Group-shared work (DESIGN.md §4) dedupes identical (state, prompt) pairs: the same x_0 under two prompts is
    two probes with two values (the velocity depends on the prompt), each equal to the one-at-a-time reference."""
    g = torch.Generator().manual_seed(0)
    cond = {"c": torch.tensor([[-0.3] * 4, [0.4] * 4])}
    ci = torch.tensor([0, 0, 0, 1, 1, 1])
    x = torch.randn(1, 4, generator=g).expand(6, 4).clone()  # [6, 4] one x_0 for every row and prompt
    traj = sample(gaussian_world_velocity, x, schedules.sd3_diffusers(T), cond, eta=eta_schedule(T, 0.7),
                  kernel="flow_sde", generator=g, cond_index=ci, group=ci, keep_velocities=True)
    m0 = torch.zeros(6, T + 1, dtype=torch.bool)
    m0[:, 0] = True
    vel = Counting(gaussian_world_velocity)
    got = probe_values(vel, traj, m0, "ode:full", score)["r"][:, 0]  # [6]
    assert vel.nfe == 2 * (T - 1)  # one probe per prompt, its first velocity reused
    ref = probe_values_naive(gaussian_world_velocity, traj, m0, "ode:full", score)["r"][:, 0]  # [6]
    assert torch.equal(got, ref) and got[0] != got[3]


def test_a_probe_without_a_cached_velocity_computes_its_first_step():
    """Velocity reuse applies only where the sampler's cache is finite (NaN = not cached, e.g. a plan's unvisited
    states): those probes spend one forward more and still equal the reference bit for bit."""
    import dataclasses

    traj = _traj(eta_schedule(T, 0.7))
    vels = traj.velocities.clone()  # [6, T, 4]
    vels[1, 2] = float("nan")
    vels[4, 0] = float("nan")
    holey = dataclasses.replace(traj, velocities=vels)
    mask = torch.ones(6, T + 1, dtype=torch.bool)
    vel = Counting(gaussian_world_velocity)
    got = probe_values(vel, holey, mask, "ode:full", score)
    assert vel.nfe == 6 * sum(T - t - 1 for t in range(T - 1)) + 2  # two probes without a cached first velocity
    ref = probe_values_naive(gaussian_world_velocity, holey, mask, "ode:full", score)
    for k in ("r", "s"):
        assert torch.equal(got[k], ref[k]), k


def test_caller_terminal_rewards_are_v_of_x_T_and_of_states_whose_ode_run_ends_there():
    """``terminal``: the caller's rewards of x_T are reused for V(x_T) and for every state the ODE-skip rule maps to
    x_T (here x_{T−1}: the last step is ODE); x_T is then never scored again."""
    traj = _traj(eta_schedule(T, 0.7))  # last step η = 0
    term = {k: v + 100.0 for k, v in score(traj.final, None).items()}  # [6] each, distinguishable from score(x_T)
    seen = []

    def spy(z, rows):
        seen.append(z.clone())
        return score(z, rows)

    mask = torch.ones(6, T + 1, dtype=torch.bool)
    got = probe_values(gaussian_world_velocity, traj, mask, "ode:full", spy, terminal=term)
    for k in ("r", "s"):
        assert torch.equal(got[k][:, T], term[k]) and torch.equal(got[k][:, T - 1], term[k]), k
        assert bool((got[k][:, :T - 1] < 50).all())  # earlier states are real probes
    assert sum(z.shape[0] for z in seen) == 6 * (T - 1)  # states 0 … T−2 only


def test_make_probe_returns_nan_outside_the_requested_mask_even_when_cached():
    traj = _traj(eta_schedule(T, 0.7))
    probe = make_probe(gaussian_world_velocity, traj, score, terminal=score(traj.final, None))
    both = torch.zeros(6, T + 1, dtype=torch.bool)
    both[:, 2:4] = True
    full = probe("ode:full", both)
    one = torch.zeros_like(both)
    one[:, 2] = True
    got = probe("ode:full", one)  # cached: state 3 was probed but is not asked for now
    assert torch.equal(got["r"][:, 2], full["r"][:, 2]) and bool(got["r"][:, 3].isnan().all())
    assert torch.equal(got["r"].isnan(), ~one)


def test_sde_mc_completions_follow_their_seed_stream_and_the_rows_own_eta():
    """``sde_mc_values``: completion j of row i from x_t is ``sample`` from x_t with the generator seeded by
    ``mix_seed(seed, t, i, j)`` and the row's own η (``extras["eta_rows"]``); a row whose remaining η is 0 gets
    the ``ode:full`` value k times."""
    import dataclasses

    from flowalign.samplers.loop import mix_seed
    from flowalign.values import sde_mc_values

    traj = _traj(eta_schedule(T, 0.7))
    er = traj.eta[None].expand(6, -1).clone()  # [6, T]
    er[:3] = 0.0  # rows 0-2: a pure-ODE remainder
    traj = dataclasses.replace(traj, extras={**traj.extras, "eta_rows": er})
    mask = torch.zeros(6, T + 1, dtype=torch.bool)
    mask[:, [0, 3]] = True
    got = sde_mc_values(gaussian_world_velocity, traj, mask, score, k=2, kernel="flow_sde", seed=7)["r"]  # [2, 6, T+1]
    for t in (0, 3):
        for i in range(6):
            for j in range(2):
                gen = [torch.Generator().manual_seed(mix_seed(7, t, i, j))]
                rest = sample(gaussian_world_velocity, traj.latents[[i], t], traj.sigmas[t:], traj.cond,
                              eta=er[[i], t:], kernel="flow_sde", generator=gen, cond_index=traj.cond_index[[i]])
                assert torch.allclose(got[j, i, t], score(rest.final, None)["r"][0], atol=1e-6), (t, i, j)
    ode = probe_values_naive(gaussian_world_velocity, traj, mask, "ode:full", score)["r"]  # [6, T+1]
    assert torch.allclose(got[:, :3, 0], ode[None, :3, 0].expand(2, -1), atol=1e-6)
    assert bool(((got[0, 3:, 0] - got[1, 3:, 0]).abs() > 1e-4).all())  # SDE rows: two different completions
