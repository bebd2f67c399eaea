"""Rollout plans and the staggered ODE integrator (METHODS.md §2.7, §4.3, §5.3)."""

import pytest
import torch

from flowalign.loss import clipped_surrogate, gaussian_kl
from flowalign.samplers import eta_schedule, gaussian_log_prob, sample, schedules, sd3_diffusers, step_log_prob
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


# ------------------------------------------------------------------ kernels and the log-density every plan stores


def test_gaussian_log_prob_detaches_the_sample():
    """kernels.gaussian_log_prob: ``x_next`` is detached (METHODS.md §2.5), so ∂ log p/∂μ is (x′ − μ)/(s²·D) even when
    x′ was built from μ in the same graph; without the detach the two paths cancel and the gradient is 0."""
    mean = torch.randn(3, 4, requires_grad=True)  # [B, D]
    x_next = mean + 0.5  # [B, D] still attached to mean
    std = torch.tensor([0.5, 1.0, 2.0])  # [B]
    lp = gaussian_log_prob(x_next, mean, std)  # [B] element-mean
    lp.sum().backward()
    want = (0.5 / std**2 / 4)[:, None].expand(3, 4)  # [B, D] (x′ − μ)/(s²·D)
    assert torch.allclose(mean.grad, want, atol=1e-6, rtol=0)


def test_only_ddim_sde_is_deterministic_at_sigma_one():
    """kernels.deterministic_at_sigma_one: std 0 at σ = 1 with η > 0 *and* > 0 inside the grid; Euler (0 everywhere)
    and the kernels with noise at σ = 1 are not (the config counts step 0 as untrained only for ddim_sde)."""
    from flowalign.samplers import KERNELS
    from flowalign.samplers.kernels import deterministic_at_sigma_one

    assert {k: deterministic_at_sigma_one(k) for k in KERNELS} == {
        "euler": False, "flow_sde": False, "dance_sde": False, "cps": False, "ddim_sde": True}


def test_a_guided_chain_keeps_the_unguided_means():
    """loop.sample with ``mean_shift`` (Euphonium's guided SDE, METHODS.md §4.5): x_{t+1} is drawn around μ_t + shift,
    but ``means`` (and the default log-prob) hold the kernel's unguided μ_t of the stored (x_t, v_t)."""
    from flowalign.samplers.kernels import flow_sde

    steps = 4
    sig = sd3_diffusers(steps)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))  # [B, D]
    ci = torch.tensor([0, 1, 1])
    hook = lambda x_t, v, s, sn, t, c: torch.full_like(x_t, 0.3) if t in (0, 2) else None  # noqa: E731
    tr = sample(gaussian_world_velocity, x, sig, _cond(), eta=eta_schedule(steps, 0.7), kernel="flow_sde",
                generator=torch.Generator().manual_seed(1), cond_index=ci, keep_velocities=True, keep_means=True,
                mean_shift=hook)
    assert tr.extras["shifted"].tolist() == [True, False, True, False]
    for t in range(steps):
        kern = flow_sde(tr.latents[:, t], tr.velocities[:, t], sig[t], sig[t + 1], tr.eta[t])  # mean [B, D]
        assert torch.allclose(tr.means[:, t], kern.mean, atol=1e-6, rtol=0), t
        if t < steps - 1:  # stochastic steps: the stored log-prob is under the unguided Gaussian
            lp = gaussian_log_prob(tr.latents[:, t + 1], kern.mean, kern.std)  # [B]
            assert torch.allclose(tr.log_probs[:, t], lp, atol=1e-5, rtol=0), t
    # the last (deterministic) step is the guided mean itself: x_T = μ_{T−1} (unshifted there)
    assert torch.allclose(tr.latents[:, steps], tr.means[:, steps - 1], atol=1e-6, rtol=0)


def test_branch_plan_eta_holds_only_the_steps_it_branched_at():
    """plans.branch: ``traj.eta`` [T] is η_k at every branch step some row used and 0 elsewhere (the candidates it
    did not pick are ODE steps of every row); ``branch_eta`` keeps the candidate η."""
    steps = 6
    sig = schedules.sd3_diffusers(steps)
    x = torch.randn(2, 4)  # [S, D]
    eta = eta_schedule(steps, 0.7)  # [T] candidates 0 … T−2
    tr = PLANS["branch"](gaussian_world_velocity, x, sig, _cond(), cond_index=torch.tensor([0, 1]), eta=eta,
                         generator=torch.Generator().manual_seed(0), children=2, branch_steps=[1, 3])
    assert tr.eta.tolist() == pytest.approx([0, 0.7, 0, 0.7, 0, 0])
    assert torch.equal(tr.extras["branch_eta"], eta)


def test_branch_plan_random_steps_are_ordered_seed_k_child():
    """plans.branch with ``branch_steps`` = n: each seed's n distinct random steps are sorted, so the rows are ordered
    (seed, k, child) as documented: seed-major, k ascending within a seed, K consecutive children per (seed, k)."""
    steps, kids = 8, 2
    sig = schedules.sd3_diffusers(steps)
    x = torch.randn(4, 4)  # [S, D]
    for seed in range(4):
        tr = PLANS["branch"](gaussian_world_velocity, x, sig, _cond(), cond_index=torch.tensor([0, 0, 1, 1]),
                             eta=eta_schedule(steps, 0.7), generator=torch.Generator().manual_seed(seed),
                             children=kids, branch_steps=3)
        parent, k = tr.extras["parent"].view(4, 3, kids), tr.extras["branch_step"].view(4, 3, kids)  # [S, n, K]
        assert torch.equal(parent, torch.arange(4)[:, None, None].expand(4, 3, kids))
        assert (k == k[:, :, :1]).all() and (k[:, 1:, 0] > k[:, :-1, 0]).all(), k[:, :, 0]


def test_branch_plan_shape_counts_each_branch_steps_spec():
    """plans._branch_shape: K·n rows per seed with n = every candidate ("all"), 1 ("random"), the int, or the list's
    length; each row trains one edge."""
    from flowalign.samplers.plans import plan_shape

    assert plan_shape("branch", {"children": 3}, 9) == (27, 1)  # default "all"
    assert plan_shape("branch", {"children": 3, "branch_steps": "all"}, 9) == (27, 1)
    assert plan_shape("branch", {"children": 3, "branch_steps": "random"}, 9) == (3, 1)
    assert plan_shape("branch", {"children": 3, "branch_steps": 4}, 9) == (12, 1)
    assert plan_shape("branch", {"branch_steps": [0, 5]}, 9) == (12, 1)  # default K = 6
    with pytest.raises(ValueError, match="branch_steps"):
        plan_shape("branch", {"branch_steps": "some"}, 9)


def test_a_float_eta_leaves_the_last_step_deterministic_in_branch_and_tree():
    """plans._plan_inputs: a float η is ``eta_schedule`` (every step but the deterministic last, quirk Q1) for the
    branch and tree plans too; with flow_sde (std > 0 at the last step for η > 0) the last step would otherwise be a
    branch candidate and a noisy tree step."""
    steps = 5
    sig = schedules.sd3_diffusers(steps)
    x = torch.randn(2, 4)  # [S, D]
    kw = dict(cond_index=torch.tensor([0, 1]), eta=0.7, kernel="flow_sde", generator=torch.Generator().manual_seed(0))
    br = PLANS["branch"](gaussian_world_velocity, x, sig, _cond(), children=2, **kw)
    assert br.extras["branch_candidates"].tolist() == list(range(steps - 1))
    tr = PLANS["tree"](gaussian_world_velocity, x, sig, _cond(), split_steps=[0, 2], **kw)
    assert tr.eta.tolist() == pytest.approx([0.7] * (steps - 1) + [0]) and (tr.log_probs[:, -1] == 0).all()


def test_tree_default_splits_are_all_four_reference_steps():
    """plans.TREE_SPLITS = (0, 3, 6, 9) (BranchGRPO's split points, METHODS.md §2.8), clipped to the allowed steps:
    with 10 candidate steps all four are used, so 2⁴ leaves per root and 2·3 + 4·3 + 8·3 + 16·1 trained node-steps."""
    from fractions import Fraction

    from flowalign.samplers.plans import plan_shape

    assert plan_shape("tree", {}, 10) == (16, Fraction(2 * 3 + 4 * 3 + 8 * 3 + 16 * 1, 16))
    assert plan_shape("tree", {"branching": 3}, 7) == (27, Fraction(3 * 3 + 9 * 3 + 27 * 1, 27))  # 9 clipped


def test_tree_refuses_a_split_step_where_the_kernel_has_no_noise():
    """plans.tree: ddim_sde's std a·σ'·√(1 − σ) is 0 at σ = 1 although η > 0 there, so children split at step 0 would
    coincide (identical leaves, a zero-variance group): the split is refused; a split inside the grid is accepted."""
    steps = 5
    sig = schedules.sd3_diffusers(steps)
    x = torch.randn(2, 4)  # [S, D]
    kw = dict(cond_index=torch.tensor([0, 1]), eta=eta_schedule(steps, 0.7), kernel="ddim_sde",
              generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="kernel std is 0 at a split step"):
        PLANS["tree"](gaussian_world_velocity, x, sig, _cond(), split_steps=[0, 2], **kw)
    ok = PLANS["tree"](gaussian_world_velocity, x, sig, _cond(), split_steps=[1, 2], **kw)
    assert ok.batch_size == 2 * 4 and not torch.equal(ok.final[0], ok.final[1])
