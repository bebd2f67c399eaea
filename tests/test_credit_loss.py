"""Group normalisation, outcome credit and the GRPO loss (METHODS.md §3.2–3.6)."""

import math

import pytest
import torch

from flowalign.credit import (CREDIT, CreditInput, assign_credit, group_normalize, outcome, step_normalize,
                              zero_std_ratio)
from flowalign.loss import clipped_surrogate, gaussian_kl, ratio_stats
from flowalign.samplers import eta_schedule, sd3_diffusers
from flowalign.samplers.kernels import flow_sde
from flowalign.types import Trajectory


def _traj(group, steps=4):
    b = group.shape[0]
    return Trajectory(latents=torch.zeros(b, steps + 1, 2), sigmas=torch.linspace(1, 0, steps + 1),
                      eta=torch.tensor([0.7] * (steps - 1) + [0.0]), log_probs=torch.zeros(b, steps), cond={},
                      cond_index=group.clone(), group=group, prompts=())


def test_group_normalize_matches_formula_and_is_invariant():
    g = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    r = torch.tensor([1.0, 2.0, 4.0, 0.5, 0.5, 3.0, -1.0])
    a = group_normalize(r, g)
    for k in (0, 1):
        rr = r[g == k].double()
        want = (rr - rr.mean()) / (rr.std(unbiased=False) + 1e-4)
        assert torch.allclose(a[g == k].double(), want, atol=1e-6)
    # shift / positive scale invariance (eps scaled with the rewards) and permutation equivariance
    assert torch.allclose(group_normalize(3 * r + 7, g, eps=3e-4), a, atol=1e-6)
    p = torch.randperm(7)
    assert torch.allclose(group_normalize(r[p], g[p]), a[p])
    assert a.dtype == torch.float32


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("rdev", DEVICES)
@pytest.mark.parametrize("gdev", DEVICES)
@pytest.mark.parametrize("scope", ["group", "global"])
def test_group_normalize_on_every_device_pair_equals_cpu(rdev, gdev, scope):
    # the trainer passes CPU rewards with group ids from the rollouts' device (a CUDA run once failed here);
    # on a CUDA machine this covers every pair, on a CPU-only one the CPU case
    g = torch.tensor([3, 3, 3, 9, 9, 9, 9, 5])
    r = torch.tensor([1.0, 2.0, float("nan"), 0.5, 0.5, 3.0, -1.0, 2.0])
    # written out by hand: NaN left out of the statistics and given 0; group 5 has one member and gets 0
    finite = [1.0, 2.0, 0.5, 0.5, 3.0, -1.0, 2.0]
    mean3, mean9 = 1.5, 0.75
    if scope == "group":
        s3 = math.sqrt(((1.0 - mean3) ** 2 + (2.0 - mean3) ** 2) / 2)
        s9 = math.sqrt(sum((x - mean9) ** 2 for x in (0.5, 0.5, 3.0, -1.0)) / 4)
    else:
        gm = sum(finite) / len(finite)
        s3 = s9 = math.sqrt(sum((x - gm) ** 2 for x in finite) / len(finite))
    want = torch.tensor([(1.0 - mean3) / (s3 + 1e-4), (2.0 - mean3) / (s3 + 1e-4), 0.0,
                         *[(x - mean9) / (s9 + 1e-4) for x in (0.5, 0.5, 3.0, -1.0)], 0.0])
    got = group_normalize(r.to(rdev), g.to(gdev), scope=scope)
    assert got.device.type == rdev
    assert torch.allclose(got.cpu(), want, atol=1e-6)


def test_zero_std_group_and_nan_rewards_give_zero_not_nan():
    g = torch.tensor([0, 0, 1, 1, 2])
    r = torch.tensor([1.0, 1.0, float("nan"), 2.0, 5.0])
    a = group_normalize(r, g)
    assert torch.isfinite(a).all() and (a == 0).all()
    assert zero_std_ratio(torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.tensor([0, 0, 1, 1])) == 0.5


def test_global_std_scope_and_ddof():
    g = torch.tensor([0, 0, 1, 1])
    r = torch.tensor([0.0, 2.0, 10.0, 14.0])
    a = group_normalize(r, g, scope="global")
    assert torch.allclose(a, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (r.std(unbiased=False) + 1e-4), atol=1e-6)
    a1 = group_normalize(r, g, ddof=1, eps=0.0)
    assert torch.allclose(a1, torch.tensor([-1, 1, -1, 1.0]) / math.sqrt(2), atol=1e-6)


def test_outcome_credit_broadcasts_over_trained_steps_and_aggregates():
    g = torch.tensor([0, 0, 1, 1])
    traj = _traj(g)
    trained = torch.tensor([[True, True, True, False]]).expand(4, 4)
    r1 = torch.tensor([0.0, 1.0, 2.0, 4.0])
    r2 = torch.tensor([5.0, 1.0, 0.0, 0.0])
    inp = CreditInput(traj=traj, rewards={"a": r1, "b": r2}, reward_weights={"a": 1.0, "b": 0.5}, trained=trained)
    c = assign_credit("outcome", inp)
    want = group_normalize(r1, g) + 0.5 * group_normalize(r2, g)
    assert torch.allclose(c.advantages[:, 0], want) and (c.advantages[:, 3] == 0).all()
    assert torch.equal(c.advantages[:, 0], c.advantages[:, 2])
    inp2 = CreditInput(traj=traj, rewards={"a": r1, "b": r2}, reward_weights={"a": 1.0, "b": 0.5}, trained=trained,
                       aggregate="reward_sum")
    assert torch.allclose(assign_credit("outcome", inp2).advantages[:, 0], group_normalize(r1 + 0.5 * r2, g))
    assert "outcome" in CREDIT
    with pytest.raises(ValueError, match="did you mean 'outcome'"):
        assign_credit("outcom", inp)


def test_clipped_surrogate_values_and_gradient():
    old = torch.zeros(4)
    logp = torch.tensor([0.0, 0.5, -0.5, 0.5], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0])
    loss, ratio = clipped_surrogate(logp, old, adv, 0.2)
    e = math.exp(0.5)
    want = torch.tensor([-1.0, -1.2, -math.exp(-0.5), e])
    assert torch.allclose(loss, want, atol=1e-6)
    loss.sum().backward()
    # clipped above for a positive advantage ⇒ no gradient; unclipped terms have d/dlogp = -A·ρ
    assert logp.grad[1] == 0 and torch.isclose(logp.grad[0], torch.tensor(-1.0))
    assert torch.isclose(logp.grad[3], torch.tensor(e))
    s = ratio_stats(ratio, logp, old, 0.2)
    assert s["clipfrac_high"] == 0.5 and s["clipfrac_low"] == 0.25


def test_on_policy_first_step_has_gradient_minus_advantage():
    logp = torch.randn(5, requires_grad=True)
    adv = torch.randn(5)
    loss, ratio = clipped_surrogate(logp, logp.detach(), adv, 1e-4)
    assert torch.allclose(ratio, torch.ones(5))
    loss.sum().backward()
    assert torch.allclose(logp.grad, -adv)


def test_gaussian_kl_exact_and_flow_grpo_forms():
    mu = torch.randn(3, 2, 4)
    ref = mu + 0.1
    std = torch.tensor([0.5, 0.2, 0.1]).view(3, 1, 1)
    dt = torch.tensor([-0.1, -0.2, -0.3])
    kl = gaussian_kl(mu, ref, std, dt)
    want = torch.full((3,), 0.01) / (2 * std.flatten() ** 2)
    assert torch.allclose(kl, want, atol=1e-6)
    # equals the KL of the two Gaussians, element-mean reduced
    p = torch.distributions.Normal(mu, std.expand_as(mu))
    q = torch.distributions.Normal(ref, std.expand_as(mu))
    assert torch.allclose(kl, torch.distributions.kl_divergence(p, q).flatten(1).mean(1), atol=1e-6)
    assert torch.allclose(gaussian_kl(mu, ref, std, dt, form="flow_grpo"), want * 0.1 * torch.tensor([1, 2, 3.0]))
    # a 0-d std (what the kernels return for 0-d sigmas) is shared by every row
    assert torch.allclose(gaussian_kl(mu, ref, torch.tensor(0.2), dt), torch.full((3,), 0.01 / 0.08), atol=1e-6)


def test_kl_is_zero_when_policy_equals_reference():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    tr = flow_sde(x, v, torch.tensor(0.8), torch.tensor(0.6), torch.tensor(0.7))
    assert gaussian_kl(tr.mean, tr.mean, tr.std.expand(2, 1), torch.tensor([-0.2, -0.2])).abs().max() == 0


def test_clipped_heads_clip_before_weights_and_zero_untrained_steps():
    from flowalign.credit import clipped_heads
    from flowalign.types import Credit

    adv = torch.tensor([[9.0, -9.0, 1.0], [0.5, 2.0, -3.0]])
    w = torch.tensor([[2.0, 2.0, 2.0], [1.0, 3.0, 1.0]])
    trained = torch.tensor([[True, True, False], [True, True, True]])
    out = clipped_heads(Credit(advantages=adv, weights=w, heads={"process": -adv}), trained, adv_clip=5.0)
    assert set(out) == {"main", "process"}
    # clip to ±5 first, then weight: 9 → 5 → 10 (weighting first then clipping would give 5)
    assert torch.equal(out["main"], torch.tensor([[10.0, -10.0, 0.0], [0.5, 6.0, -3.0]]))
    assert torch.equal(out["process"], torch.tensor([[-10.0, 10.0, 0.0], [-0.5, -6.0, 3.0]]))
    plain = clipped_heads(Credit(advantages=adv), trained, adv_clip=1.0)
    assert torch.equal(plain["main"], torch.tensor([[1.0, -1.0, 0.0], [0.5, 1.0, -1.0]]))


def test_global_std_is_the_std_of_every_ranks_rewards():
    """Under two processes each rank holds half the groups; with ``reduce_sum`` (an all-reduce) the global-scope
    advantages equal those of one process holding all rewards. Ranks are emulated by two threads."""
    import threading

    torch.manual_seed(0)
    r = torch.rand(16)  # [B]: 4 groups of 4, rank 0 holds groups 0-1, rank 1 groups 2-3
    r[:8] *= 3.0  # ranks with different spreads, so a per-rank std is visibly wrong
    g = torch.arange(4).repeat_interleave(4)
    r[5] = float("nan")  # a NaN reward is left out of the global statistics too
    one = group_normalize(r, g, scope="global", ddof=1)
    barrier, box = threading.Barrier(2), [None, None]

    def reduce_sum(rank):
        def f(t):
            box[rank] = t.clone()
            barrier.wait()
            total = box[0] + box[1]
            barrier.wait()
            return total
        return f

    out = [None, None]

    def rank_main(rank):
        sl = slice(8 * rank, 8 * rank + 8)
        out[rank] = group_normalize(r[sl], g[sl], scope="global", ddof=1, reduce_sum=reduce_sum(rank))

    threads = [threading.Thread(target=rank_main, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose(torch.cat(out), one, atol=1e-6)
    per_rank = torch.cat([group_normalize(r[:8], g[:8], scope="global", ddof=1),
                          group_normalize(r[8:], g[8:], scope="global", ddof=1)])
    assert not torch.allclose(per_rank, one, atol=1e-3)  # what each rank computed alone before


T = 6  # sampling steps of the trajectory below


def test_global_scope_all_equal_group_gets_exactly_zero():
    """METHODS §3.2: a group whose rewards are all equal gets A = 0 — also with std_scope="global" (Flow-GRPO's
    default), where float64 rewards (e.g. reward_sum with weight 1/26) left r − mean ≈ 1e-16 ≠ 0, so zero-std
    filtering (A != 0) kept those rollouts."""
    flat = [0.7] * 24
    r = torch.tensor(flat + [0.0, 1.0, 2.0], dtype=torch.float64)
    g = torch.tensor([0] * 24 + [1, 1, 1])
    for scope in ("global", "group"):
        a = group_normalize(r, g, scope=scope)
        assert bool((a[:24] == 0).all()), (scope, a[:3].tolist())
        assert bool((a[24:] != 0).any())
    # per-step columns (dense credit under the global scope)
    x = torch.stack([r, r / 3.0], dim=1)  # [B, 2]
    a = step_normalize(x, g, scope="global")
    assert bool((a[:24] == 0).all())
    # the outcome assigner with reward_sum aggregation and weight 1/26 (PickScore/26)
    traj = Trajectory(latents=torch.zeros(27, T + 1, 2), sigmas=sd3_diffusers(T), eta=eta_schedule(T, 0.7),
                      log_probs=torch.zeros(27, T), cond={"c": torch.zeros(1, 2)},
                      cond_index=torch.zeros(27, dtype=torch.long), group=g, prompts=("p",))
    rw = torch.tensor([22.37] * 24 + [21.0, 22.0, 23.0], dtype=torch.float32)
    inp = CreditInput(traj=traj, rewards={"pick": rw}, reward_weights={"pick": 1 / 26}, aggregate="reward_sum",
                      std_scope="global", trained=torch.ones(27, T, dtype=torch.bool))
    adv = outcome(inp).advantages
    assert bool((adv[:24] == 0).all())
    assert bool((adv[24:] != 0).any())


# ------------------------------------------------------------------------------------------ pinned by mutation testing


def test_global_scope_std_uses_ddof_over_every_reward():
    """``scope="global"`` with ``ddof``: A_i = (R_i − mean_group R)/std_ddof(all R) (Flow-GRPO's global_std with
    Bessel's correction): ss = 131 around the global mean 6.5, std = √(131/3)."""
    g = torch.tensor([0, 0, 1, 1])
    r = torch.tensor([0.0, 2.0, 10.0, 14.0])
    a = group_normalize(r, g, scope="global", ddof=1, eps=0.0)
    assert torch.allclose(a, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / math.sqrt(131 / 3), atol=1e-6)


def test_rewards_equal_up_to_rounding_or_beside_a_nan_get_exactly_zero():
    """METHODS §3.2 "all equal → A = 0" holds exactly (zero-std filtering tests A != 0): in the group scope for
    rewards one ulp apart (0.1 + 0.2 vs 0.3, std ≈ 3e-17), and in the global scope for a tied group that also
    holds a NaN reward (the NaN sits out the group's max/min as well as its mean)."""
    g = torch.tensor([0, 0, 1, 1])
    r = torch.tensor([0.1 + 0.2, 0.3, 1.0, 2.0], dtype=torch.float64)  # [4]
    a = group_normalize(r, g)
    assert bool((a[:2] == 0).all()) and bool((a[2:] != 0).all())
    assert bool((step_normalize(r[:, None], g)[:2] == 0).all())
    g2 = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    r2 = torch.tensor([0.1, 0.1, 0.1, float("nan"), 0.0, 1.0, 3.0], dtype=torch.float64)  # mean of 3×0.1 ≠ 0.1
    a2 = group_normalize(r2, g2, scope="global")
    assert bool((a2[:4] == 0).all()) and bool((a2[4:] != 0).all())


def test_state_values_never_asks_the_probe_for_x_T():
    """``state_values``: column T is the terminal reward (V(x_T) = R(x_T), METHODS.md §4.0), so x_T is never probed
    even when the mask selects it."""
    from flowalign.credit import state_values
    from flowalign.samplers import eta_schedule as sched
    from test_credit_methods import T as T6, _engine_inp, _gw_rollout

    inp = _engine_inp(_gw_rollout(sched(T6, 0.7)))
    seen = []
    inner = inp.probe

    def spy(mode, mask):
        seen.append(mask.clone())
        return inner(mode, mask)

    import dataclasses

    vals = state_values(dataclasses.replace(inp, probe=spy), "ode:full", torch.ones(8, T6 + 1, dtype=torch.bool))
    (mask,) = seen
    assert mask[:, :T6].all() and not mask[:, T6].any()
    assert torch.equal(vals["r"][:, T6], inp.rewards["r"].double())


def test_floored_z_is_zero_where_the_std_is_below_the_floor():
    """VGPO's ``floored_z`` (METHODS.md §4.4): z = (x − mean_g)/std where std ≥ floor, else 0 — a column whose group
    spread is below the floor (but not exactly flat) gets 0, not (x − mean)/floor."""
    from flowalign.credit import floored_z

    x = torch.tensor([[1.0], [1.0 + 1e-8], [1.0 + 2e-8], [5.0], [6.0], [7.0]], dtype=torch.float64)  # [6, 1]
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    z = floored_z(x, group, torch.ones(6, dtype=torch.bool), floor=1e-6)  # [6, 1]
    assert bool((z[:3] == 0).all())
    assert torch.allclose(z[3:, 0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / math.sqrt(2 / 3))


def test_win_rate_reward_sum_ranks_the_weighted_sum():
    """Pref-GRPO credit (METHODS.md §4.8) with ``reward_sum``: the z-score of the win rates of Σ_k w_k·R_k (one
    ranking), not Σ_k w_k·z(win rate of R_k) (``advantage_sum``)."""
    from flowalign.credit import group_win_rates
    from test_credit_methods import _inp

    group = torch.zeros(4, dtype=torch.long)
    a = torch.tensor([0.0, 1.0, 2.0, 3.0])
    b = torch.tensor([3.0, 2.0, 1.0, 10.0])
    vals = {"a": a[:, None].expand(4, 3).clone(), "b": b[:, None].expand(4, 3).clone()}  # [4, T+1] each
    eta = torch.full((2,), 0.7)
    got = assign_credit("win_rate", _inp(vals, group, eta, aggregate="reward_sum")).advantages[:, 0]
    want = group_normalize(group_win_rates(a + b, group), group, eps=1e-9)  # a + b = [3, 3, 3, 13]
    assert torch.allclose(got, want, atol=1e-6)
    per = assign_credit("win_rate", _inp(vals, group, eta)).advantages[:, 0]  # advantage_sum
    assert not torch.allclose(per, want, atol=1e-3)


def _one_split_tree(n):
    """A tree of one root edge (node 0, depth 0) and ``n`` leaves split at step 1 (nodes 1 … n, depth 1)."""
    node = torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(1, n + 1)], 1)  # [n, 2]
    depth = torch.tensor([[0, 1]]).expand(n, 2)  # [n, 2]
    return node, depth, torch.zeros(n, dtype=torch.long)


def test_tree_width_mask_keeps_ceil_half_ratio_at_each_end_and_breaks_ties_by_node_id():
    """BranchGRPO width pruning (METHODS.md §2.8): of the deepest nodes keep the ⌈ratio·n/2⌉ best and as many worst
    advantages (ties: lower node id first); shallower edges are always kept."""
    from flowalign.credit import tree_width_mask

    node, depth, tree_id = _one_split_tree(6)
    adv = torch.tensor([3.0, 1.0, 0.0, -0.5, 2.0, -2.0])[:, None].expand(6, 2)  # [6, 2]: the leaves' advantages
    keep = tree_width_mask(adv, node, depth, tree_id, 0.5)  # ⌈1.5⌉ = 2 at each end
    assert keep[:, 0].all() and keep[:, 1].tolist() == [True, False, False, True, True, True]
    tie = torch.tensor([1.0, 1.0, 0.0, -1.0, 0.5, 0.2])[:, None].expand(6, 2)  # nodes 1 and 2 tie for best
    keep = tree_width_mask(tie, node, depth, tree_id, 1 / 3)  # ⌈1⌉ = 1 at each end
    assert keep[:, 1].tolist() == [True, False, False, True, False, False]


def test_turning_point_needs_a_strict_sign_change_and_ties_keep_the_earlier_step():
    """TP-GRPO (METHODS.md §4.2): I_j needs c_{j−1} < 0 (a flat step, d = 0, is no reversal); balancing keeps the
    m largest |Δ| per side with ties broken by the lower step index, then the lower row."""
    from flowalign.credit import balance_turning_points, turning_point_rewards

    for constraint in (False, True):
        _, turn, d, *_ = turning_point_rewards(torch.tensor([[0.2, 0.2, 0.5, 0.9]]), constraint=constraint)
        assert d[0, 0] == 0 and not turn.any()
    turn = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.bool)  # P = (0, 2), (1, 0); N = (2, 1)
    out = balance_turning_points(turn, torch.tensor([0.5, 0.5, -0.3]), torch.zeros(3, dtype=torch.long))
    assert out.long().tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0]]  # equal |Δ|: step 0 beats step 2


def test_turning_points_balance_scope_none_keeps_every_turning_point():
    """``balance_scope="none"``: r_j = I_j·g_j + (1 − I_j)·d_j with every turning point, per-step z-scored; the
    default "group" balancing keeps one of the group's three positive turning points here (one negative)."""
    from flowalign.credit import turning_point_rewards
    from test_credit_methods import _inp

    v = torch.tensor([[0.5, 0.4, 0.6, 0.55, 0.7], [0.3, 0.2, 0.5, 0.45, 0.6],  # Δ > 0, a turning point at j = 2
                      [0.5, 0.6, 0.4, 0.45, 0.3], [0.1, 0.2, 0.3, 0.4, 0.5]], dtype=torch.float64)  # Δ < 0; first step
    group = torch.zeros(4, dtype=torch.long)
    eta = torch.full((4,), 0.7)
    r, turn, *_ = turning_point_rewards(v)  # [4, 4]
    assert turn[:3, 1].all() and turn[3, 0] and turn.sum() == 4
    none = assign_credit("turning_points", _inp({"r": v}, group, eta), {"balance_scope": "none"}).advantages
    assert torch.allclose(none, step_normalize(r, group, eps=1e-9), atol=1e-6)
    grouped = assign_credit("turning_points", _inp({"r": v}, group, eta)).advantages
    assert not torch.allclose(grouped, none, atol=1e-3)


def test_vgpo_default_anchor_is_ceil_half_and_batch_omega_pools_every_row():
    """VGPO (METHODS.md §4.4 [recon]): t_anchor = ⌈T/2⌉ (3 of T = 5), so with ω ≡ 1 the κ·Q term is on t < 3 only;
    ``omega="batch"`` is one ω_t = mean_i Q_it / mean_{i, t′} Q_it′ for every row, whatever its group."""
    from flowalign.credit import process_q
    from test_credit_methods import _inp

    steps = 5
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    eta = torch.full((steps,), 0.7)
    v = torch.rand(6, steps + 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    q = process_q(v[:, 1:])  # [6, T]
    a1 = assign_credit("value_anchor", _inp({"r": v}, group, eta), {"kappa": 1.0, "omega": "none"}).advantages
    a0 = assign_credit("value_anchor", _inp({"r": v}, group, eta), {"kappa": 0.0, "omega": "none"}).advantages
    assert torch.allclose((a1 - a0)[:, :3], q[:, :3].float(), atol=1e-5) and bool(((a1 - a0)[:, 3:] == 0).all())
    flat = v.clone()
    flat[:3] = flat[0]
    flat[3:] = 3 * flat[3]  # z = 0 in each group; the groups' Q differ in scale
    qf = process_q(flat[:, 1:])  # [6, T]
    a = assign_credit("value_anchor", _inp({"r": flat}, group, eta),
                      {"kappa": 1.0, "t_anchor": steps, "omega": "batch"}).advantages  # Â = ω·Q
    per_t = qf.mean(0)  # [T]
    assert torch.allclose(a, (qf * (per_t / per_t.mean())[None]).float(), atol=1e-5)
