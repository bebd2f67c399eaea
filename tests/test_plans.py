"""Rollout plans and the staggered ODE integrator (METHODS.md §2.7, §4.3, §5.3)."""

import pytest
import torch

from flowalign.loss import clipped_surrogate, gaussian_kl
from flowalign.samplers import eta_schedule, sample, schedules, sd3_diffusers, step_log_prob
from flowalign.samplers.plans import PLANS, next_table, staggered_ode, subgrid
from flowalign.samplers.plans import branch as plan_branch

from test_samplers import T, _cond as _e_cond, elementwise_velocity  # noqa: E402  (a batch-invariant velocity)

from gaussian_world import Counting, gaussian_world_velocity  # noqa: E402  (c: a per-prompt offset)


def _cond(n_prompts=2, d=4):
    return {"c": torch.linspace(-0.5, 0.5, n_prompts)[:, None].expand(n_prompts, d).contiguous()}


def test_subgrid_is_rounded_linspace_of_native_grid():
    assert subgrid(0, 10, 2) == [0, 5, 10]
    assert subgrid(0, 10, None) == list(range(11))
    assert subgrid(3, 10, 1) == [3, 10]
    assert subgrid(9, 10, 4) == [9, 10]  # m ≥ T − t: the native grid
    assert subgrid(1, 10, 4) == [1, 3, 6, 8, 10]  # round(linspace(1, 10, 5)) = round([1, 3.25, 5.5, 7.75, 10])
    assert subgrid(10, 10, 3) == [10]
    nt = next_table(torch.tensor([0, 4]), 10, 2)
    assert nt[0, 0] == 5 and nt[0, 5] == 10 and nt[0, 1] == -1
    assert nt[1, 4] == 7 and nt[1, 7] == 10


def test_staggered_ode_equals_per_row_euler_and_launches_T_times():
    g = torch.Generator().manual_seed(0)
    steps = 8
    sig = schedules.sd3_diffusers(steps)
    cond = _cond()
    x = torch.randn(5, 4, generator=g)
    start = torch.tensor([0, 3, 3, 7, 5])
    ci = torch.tensor([0, 1, 0, 1, 1])
    vel = Counting(gaussian_world_velocity)
    comp = staggered_ode(vel, x, start, sig, cond, ci, keep_path=True)
    assert vel.calls == steps  # one launch per grid index, not Σ lengths
    assert vel.nfe == int((steps - start).sum())
    for i in range(5):
        ref = sample(gaussian_world_velocity, x[i:i + 1], sig[start[i]:], cond, eta=0.0, kernel="euler",
                     cond_index=ci[i:i + 1])
        assert torch.equal(comp.final[i], ref.final[0])
        assert torch.equal(comp.states[i, start[i]:], ref.latents[0])
    # chunking and a cached first velocity give the same states
    v0 = gaussian_world_velocity(x, sig[start], {"c": cond["c"][ci]})
    vel2 = Counting(gaussian_world_velocity)
    comp2 = staggered_ode(vel2, x, start, sig, cond, ci, first_velocity=v0, max_batch=2)
    assert torch.equal(comp2.final, comp.final) and vel2.nfe == vel.nfe - 5


def test_chain_plan_is_loop_sample():
    cond = _cond()
    x = torch.randn(4, 4)
    sig = schedules.sd3_diffusers(6)
    ci = torch.tensor([0, 0, 1, 1])
    a = PLANS["chain"](gaussian_world_velocity, x, sig, cond, cond_index=ci, group=ci, eta=eta_schedule(6, 0.7),
                       kernel="flow_sde", generator=torch.Generator().manual_seed(3), keep_velocities=True)
    b = sample(gaussian_world_velocity, x, sig, cond, eta=eta_schedule(6, 0.7), kernel="flow_sde",
               generator=torch.Generator().manual_seed(3), cond_index=ci, keep_velocities=True)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)


def test_branch_plan_every_step():
    steps, kids = 6, 3
    sig = schedules.sd3_diffusers(steps)
    cond = _cond()
    x = torch.randn(2, 4)  # two seeds
    ci = torch.tensor([0, 1])
    eta = eta_schedule(steps, 0.7)  # candidates 0 … T−2
    vel = Counting(gaussian_world_velocity)
    tr = PLANS["branch"](vel, x, sig, cond, cond_index=ci, group=torch.tensor([7, 9]), eta=eta, kernel="flow_sde",
                         generator=torch.Generator().manual_seed(1), keep_velocities=True, children=kids)
    n_k = steps - 1
    assert tr.latents.shape == (2 * n_k * kids, steps + 1, 4) and tr.velocities.shape == (2 * n_k * kids, steps, 4)
    # NFE: trunk to k_max (plus v at x_kmax) once per seed, children completed on the native grid
    assert vel.nfe == 2 * (n_k + kids * sum(steps - k - 1 for k in range(n_k)))
    ex = tr.extras
    ode = sample(gaussian_world_velocity, x, sig, cond, eta=0.0, kernel="euler", cond_index=ci, keep_velocities=True)
    for r in range(tr.batch_size):
        s, k = int(ex["parent"][r]), int(ex["branch_step"][r])
        assert torch.equal(tr.latents[r, : k + 1], ode.latents[s, : k + 1])  # shared prefix, bit-exact
        assert not torch.equal(tr.latents[r, k + 1], ode.latents[s, k + 1])
        assert torch.equal(tr.velocities[r, : k + 1], ode.velocities[s, : k + 1])
        # the child is exactly the ODE completion of its x_{k+1}
        ref = sample(gaussian_world_velocity, tr.latents[r:r + 1, k + 1], sig[k + 1:], cond, eta=0.0, kernel="euler",
                     cond_index=ci[s:s + 1])
        assert torch.equal(tr.latents[r, k + 1:], ref.latents[0])
        # only the branch edge is stochastic for this row
        assert ex["eta_rows"][r].nonzero().flatten().tolist() == [k] and ex["trained"][r].sum() == 1
        assert (tr.log_probs[r] != 0).nonzero().flatten().tolist() == [k]
        assert int(ex["prompt_group"][r]) == [7, 9][s]
    # sibling groups are (seed, k): K members each, siblings share the group, others do not
    for grp in tr.group.unique():
        m = tr.group == grp
        assert int(m.sum()) == kids
        assert ex["parent"][m].unique().numel() == 1 and ex["branch_step"][m].unique().numel() == 1
    # re-scoring the branch edges gives ratio 1
    k = ex["branch_step"]
    rows = torch.arange(tr.batch_size)
    lp, _ = step_log_prob(gaussian_world_velocity, tr.latents[rows, k], tr.latents[rows, k + 1], sig[k], sig[k + 1],
                          ex["eta_rows"][rows, k], {"c": cond["c"][tr.cond_index]}, kernel="flow_sde")
    assert (lp - tr.log_probs[rows, k]).abs().max() < 1e-5


def test_branch_plan_random_steps_reproducible_and_validated():
    steps = 8
    sig = schedules.sd3_diffusers(steps)
    cond = _cond()
    x = torch.randn(3, 4)
    ci = torch.tensor([0, 0, 1])
    eta = eta_schedule(steps, 0.7)

    def run(seed, spec="random"):
        return PLANS["branch"](gaussian_world_velocity, x, sig, cond, cond_index=ci, group=ci, eta=eta,
                               generator=torch.Generator().manual_seed(seed), children=2, branch_steps=spec)

    a, b = run(5), run(5)
    assert torch.equal(a.latents, b.latents) and a.batch_size == 3 * 2
    assert set(a.extras["branch_step"].tolist()) <= set(range(steps - 1))
    assert run(5, [2, 4]).extras["branch_step"].tolist() == [2, 2, 4, 4] * 3
    assert run(5, 3).batch_size == 3 * 3 * 2
    with pytest.raises(ValueError):
        run(5, [steps - 1])  # the last step is ODE: not a branch candidate
    one = run(5, [0])  # branch at step 0: no trunk forwards beyond v(x_0)
    assert torch.equal(one.latents[:, 0], x[[0, 0, 1, 1, 2, 2]])


def test_branch_candidates_exclude_steps_whose_kernel_std_is_zero():
    """ddim_sde's std a·σ'·√(1 − σ) is 0 at σ = 1 although η > 0 there: children branched at step 0 would coincide
    (log-prob 0, yet marked trained), so step 0 is no candidate and asking for it is refused."""
    steps = 6
    sig = schedules.sd3_diffusers(steps)
    x = torch.randn(2, 4)
    ci = torch.tensor([0, 1])

    def run(spec):
        return PLANS["branch"](gaussian_world_velocity, x, sig, _cond(), cond_index=ci, group=ci,
                               eta=eta_schedule(steps, 0.7), kernel="ddim_sde", children=3, branch_steps=spec,
                               generator=torch.Generator().manual_seed(0))

    assert run("all").extras["branch_candidates"].tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        run([0])


def test_branch_candidates_are_restricted_to_trainable_steps():
    """The trainer passes its trained-step mask: a child branched at an untrained step would carry no gradient."""
    steps = 8
    sig = schedules.sd3_diffusers(steps)
    cond = _cond()
    x = torch.randn(4, 4)
    ci = torch.tensor([0, 0, 1, 1])
    eta = eta_schedule(steps, 0.7)
    trainable = torch.arange(steps) < 3  # [T]

    def run(spec, mask):
        return PLANS["branch"](gaussian_world_velocity, x, sig, cond, cond_index=ci, group=ci, eta=eta,
                               generator=torch.Generator().manual_seed(1), children=2, branch_steps=spec,
                               trainable=mask)

    allk = run("all", trainable)
    assert allk.extras["branch_candidates"].tolist() == [0, 1, 2] and allk.batch_size == 4 * 3 * 2
    for seed in range(5):
        r = PLANS["branch"](gaussian_world_velocity, x, sig, cond, cond_index=ci, group=ci, eta=eta,
                            generator=torch.Generator().manual_seed(seed), children=2, branch_steps="random",
                            trainable=trainable)
        assert set(r.extras["branch_step"].tolist()) <= {0, 1, 2}
    assert run("all", None).extras["branch_candidates"].tolist() == list(range(steps - 1))
    # a float η means every step but the deterministic last one, as eta_schedule (CPS has s = 0 there)
    flt = PLANS["branch"](gaussian_world_velocity, x, sig, cond, cond_index=ci, group=ci, eta=0.7, kernel="cps",
                          generator=torch.Generator().manual_seed(1), children=2)
    assert flt.extras["branch_candidates"].tolist() == list(range(steps - 1)) and (flt.log_probs.sum(1) != 0).all()
    with pytest.raises(ValueError):
        run([4], trainable)  # an explicit untrained step is refused, not silently wasted
    chained = PLANS["chain"](gaussian_world_velocity, x, sig, cond, cond_index=ci, eta=eta,
                             generator=torch.Generator().manual_seed(1), trainable=trainable)
    assert chained.batch_size == 4  # a chain ignores the mask (every step keeps its η)


def test_every_plan_declares_its_batch_shape():
    from flowalign.samplers.plans import PLAN_SHAPES, plan_shape

    assert set(PLAN_SHAPES) == set(PLANS)
    assert plan_shape("chain", {}, 9) == (1, None)
    assert plan_shape("branch", {"children": 4, "branch_steps": [1, 3]}, 9) == (8, 1)
    with pytest.raises(ValueError, match="unknown rollout plan"):
        plan_shape("no_such_plan", {}, 9)


@pytest.mark.parametrize("kernel", ["flow_sde", "cps", "dance_sde"])
def test_branch_plan_on_policy_ratio_is_exactly_one_in_shuffled_micro_batches(kernel):
    """§3.8 for the branch plan: re-scoring the branch edges in shuffled flat micro-batches (mixed k) with the
    same kernel gives ρ ≡ 1 bit for bit, and the first update's clipfrac is 0; the exact KL to itself is 0."""
    sig = sd3_diffusers(T)
    cond = _e_cond()
    noise = torch.randn(3, 3, 2, generator=torch.Generator().manual_seed(3))
    ci = torch.tensor([0, 0, 1])
    a = {"flow_sde": 0.7, "cps": 0.8, "dance_sde": 0.3}[kernel]
    tr = plan_branch(elementwise_velocity, noise, sig, cond, eta=eta_schedule(T, a), children=2, kernel=kernel,
                     cond_index=ci, generator=torch.Generator().manual_seed(4))
    b_idx, t_idx = tr.extras["trained"].nonzero(as_tuple=True)
    perm = torch.randperm(b_idx.shape[0], generator=torch.Generator().manual_seed(5))
    b_idx, t_idx = b_idx[perm], t_idx[perm]
    for mb in torch.split(torch.arange(b_idx.shape[0]), 5):
        b, t = b_idx[mb], t_idx[mb]
        logp, trn = step_log_prob(elementwise_velocity, tr.latents[b, t], tr.latents[b, t + 1], tr.sigmas[t],
                                  tr.sigmas[t + 1], tr.eta[t], {"e": cond["e"][tr.cond_index[b]]}, kernel=kernel)
        assert torch.equal(logp, tr.log_probs[b, t])
        _, ratio = clipped_surrogate(logp, tr.log_probs[b, t], torch.ones_like(logp), 1e-5)
        assert bool((ratio == 1).all())
        assert bool((gaussian_kl(trn.mean, trn.mean, trn.std, tr.sigmas[t + 1] - tr.sigmas[t]) == 0).all())
