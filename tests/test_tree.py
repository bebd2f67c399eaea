"""BranchGRPO trees: the ``tree`` rollout plan and the ``tree`` credit (METHODS.md §2.8; Li et al. 2025,
arXiv:2509.06040).

Conventions under test: rows are leaves ordered (root, child at split 1, …, child at split D); a node is the segment
between two splits, owned by its first leaf (``extras["trained"]``); the root (depth 0) is a lone node, so its edges
carry advantage 0 and are never trained: sum(trained) = Σ_{nodes of depth ≥ 1} (stochastic steps of the segment).
"""

import dataclasses
import json

import pytest
import torch

from flowalign import config as C
from flowalign.credit import CreditInput, assign_credit, tree_node_advantages
from flowalign.errors import UserError
from flowalign.samplers import eta_schedule, schedules, step_log_prob
from flowalign.samplers.kernels import get_kernel
from flowalign.samplers.plans import PLANS, plan_shape
from flowalign.types import Trajectory

from test_plans import _cond, gaussian_world_velocity  # noqa: E402  (conftest puts tests/ on sys.path)
from test_train_update import _cfg  # noqa: E402

T = 8
SPLITS = [1, 3, 6]


def _tree(kernel="flow_sde", splits=SPLITS, branching=2, roots=2, **kw):
    sig = schedules.sd3_diffusers(T)
    cond = _cond()
    x = torch.randn(roots, 4, generator=torch.Generator().manual_seed(11))
    ci = torch.arange(roots) % 2
    tr = PLANS["tree"](gaussian_world_velocity, x, sig, cond, cond_index=ci, group=torch.tensor([7, 9, 7, 9][:roots]),
                       eta=eta_schedule(T, 0.7), kernel=kernel, generator=torch.Generator().manual_seed(1),
                       keep_velocities=True, split_steps=splits, branching=branching, **kw)
    return tr, x, sig, cond


def _digits(local, branching, depth):
    return [(local // branching ** (depth - 1 - j)) % branching for j in range(depth)]


# ------------------------------------------------------------------------------------------ (a) structure


@pytest.mark.parametrize("branching", [2, 3])
def test_leaves_share_their_prefix_up_to_the_first_differing_split(branching):
    tr, x, sig, cond = _tree(branching=branching)
    d = len(SPLITS)
    per_root = branching ** d
    assert tr.batch_size == 2 * per_root and tr.latents.shape == (2 * per_root, T + 1, 4)
    assert tr.velocities.shape == (2 * per_root, T, 4)
    ex = tr.extras
    assert ex["root"].tolist() == [r for r in range(2) for _ in range(per_root)]
    assert tr.group.tolist() == ex["root"].tolist()  # the tree is the normalisation unit
    assert ex["prompt_group"].tolist() == [[7, 9][r] for r in ex["root"].tolist()]
    assert torch.equal(tr.latents[:, 0], x[ex["root"]])
    for a in range(tr.batch_size):
        for b in range(a + 1, tr.batch_size):
            if ex["root"][a] != ex["root"][b]:
                assert not torch.equal(tr.latents[a, 0], tr.latents[b, 0])
                continue
            da, db = _digits(a % per_root, branching, d), _digits(b % per_root, branching, d)
            k = SPLITS[next(j for j in range(d) if da[j] != db[j])]  # their first differing split
            assert torch.equal(tr.latents[a, : k + 1], tr.latents[b, : k + 1])
            assert torch.equal(tr.velocities[a, : k + 1], tr.velocities[b, : k + 1])
            assert all(not torch.equal(tr.latents[a, t], tr.latents[b, t]) for t in range(k + 1, T + 1))
            # node ids: shared exactly on the common prefix
            assert torch.equal(ex["node"][a, :k], ex["node"][b, :k])
            assert (ex["node"][a, k:] != ex["node"][b, k:]).all()


def test_node_ids_depths_and_trained_edges_count_each_node_once():
    tr, *_ = _tree()
    ex = tr.extras
    node, depth, trained = ex["node"], ex["depth"], ex["trained"]
    bounds = [0, *SPLITS, T]
    assert depth[0].tolist() == [j for j in range(len(SPLITS) + 1) for _ in range(bounds[j + 1] - bounds[j])]
    stochastic = tr.eta > 0  # [T]
    # every node of depth ≥ 1 trains its stochastic edges once, on its first leaf; the root never
    n_expected = 0
    for u in node.unique():
        m = node == u  # [N, T]
        rows, steps = m.nonzero(as_tuple=True)
        assert depth[m].unique().numel() == 1 and tr.group[rows].unique().numel() == 1
        first = int(rows.min())
        want = int(depth[m][0]) > 0
        seg = sorted(set(steps.tolist()))
        assert trained[m].sum() == (sum(bool(stochastic[t]) for t in seg) if want else 0)
        assert (trained[m] == (rows == first) & stochastic[steps] & want).all()
        n_expected += want * sum(bool(stochastic[t]) for t in seg)
    assert int(trained.sum()) == n_expected == 2 * (2 * 2 + 4 * 3 + 8 * 1)  # step 7 is the ODE last step
    # the trainer's derived shape: leaves per root and trained edges per leaf (a Fraction)
    leaves, edges = plan_shape("tree", {"split_steps": SPLITS}, T - 1)
    assert leaves == 8 and leaves * edges == int(trained.sum()) // 2


def test_split_steps_are_validated_and_default_clipped():
    sig, cond = schedules.sd3_diffusers(T), _cond()
    x = torch.randn(2, 4)

    def run(**kw):
        return PLANS["tree"](gaussian_world_velocity, x, sig, cond, eta=eta_schedule(T, 0.7),
                             generator=torch.Generator().manual_seed(0), **kw)

    assert run().extras["split_steps"].tolist() == [0, 3, 6]  # (0, 3, 6, 9) ∩ stochastic steps 0…6
    first5 = torch.arange(T) < 5
    assert run(trainable=first5).extras["split_steps"].tolist() == [0, 3]
    assert run(trainable=first5).batch_size == 2 * 4
    with pytest.raises(ValueError, match="not stochastic"):
        run(split_steps=[2, T - 1])  # the last step is ODE
    with pytest.raises(ValueError, match="not stochastic"):
        run(split_steps=[5], trainable=first5)  # stochastic but not trained
    with pytest.raises(ValueError, match="none of the default split steps"):
        run(trainable=torch.tensor([False, True, True, False, False, False, False, False]))
    with pytest.raises(ValueError, match="distinct"):
        run(split_steps=[2, 2])
    with pytest.raises(ValueError, match="branching"):
        run(branching=1)
    with pytest.raises(ValueError, match="proportional"):  # CPS: s = σ'·sin(aπ/2) is not linear in a
        run(kernel="cps", split_noise_scale=4.0)
    assert run(kernel="cps").batch_size == 2 * 8  # the default scale 1 leaves the kernel's noise alone
    with pytest.raises(ValueError):
        plan_shape("tree", {"split_steps": [5]}, 3)  # the config reports it before any rollout
    assert plan_shape("tree", {}, 6) == (4, 18 / 4)  # splits (0, 3): 2·3 + 4·3 trained node-steps per root


# ------------------------------------------------------------------------------------------ (b) log-probs


@pytest.mark.parametrize("kernel", ["flow_sde", "dance_sde"])
def test_stored_log_probs_are_the_trainer_rescoring(kernel):
    """The trainer re-scores (row, t) with traj.eta[t] and the same kernel: ratio 1 on-policy, split edges included."""
    tr, x, sig, cond = _tree(kernel=kernel, split_noise_scale=4.0)
    base = eta_schedule(T, 0.7)
    split = torch.zeros(T, dtype=torch.bool)
    split[SPLITS] = True
    assert torch.allclose(tr.eta, torch.where(split, 4 * base, base))
    kern = get_kernel(kernel)
    z = torch.zeros(1, 1)
    for k in SPLITS:  # the split noise std is 4 × the kernel's std at η
        s4 = kern(z, z, sig[k], sig[k + 1], tr.eta[k]).std
        s1 = kern(z, z, sig[k], sig[k + 1], base[k]).std
        assert torch.allclose(s4, 4 * s1, rtol=1e-6)
    rows, t = (tr.eta > 0)[None].expand(tr.batch_size, T).nonzero(as_tuple=True)  # every stochastic edge
    lp, _ = step_log_prob(gaussian_world_velocity, tr.latents[rows, t], tr.latents[rows, t + 1], sig[t], sig[t + 1],
                          tr.eta[t], {"c": cond["c"][tr.cond_index[rows]]}, kernel=kernel)
    assert (lp - tr.log_probs[rows, t]).abs().max() < 1e-5
    assert (tr.log_probs[:, tr.eta == 0] == 0).all()
    # a shared edge has one log-prob, duplicated on every leaf below it
    node = tr.extras["node"]
    for u in node.unique():
        for t in (node == u).any(0).nonzero().flatten().tolist():
            assert tr.log_probs[node[:, t] == u, t].unique().numel() == 1


# ------------------------------------------------------------------------------------------ (c) credit


def _hand_tree():
    """One tree, T = 4, binary splits at steps 0 and 2; rows 0…3 are the leaves; step 3 is the ODE last step."""
    node = torch.tensor([[1, 1, 3, 3], [1, 1, 4, 4], [2, 2, 5, 5], [2, 2, 6, 6]])
    depth = torch.tensor([[1, 1, 2, 2]] * 4)
    trained = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 0], [1, 1, 1, 0], [0, 0, 1, 0]], dtype=torch.bool)
    return node, depth, trained


def _inp(rewards, node, depth, trained, group, **kw):
    b, steps = node.shape
    traj = Trajectory(latents=torch.zeros(b, steps + 1, 1), sigmas=schedules.sd3_diffusers(steps),
                      eta=eta_schedule(steps, 0.7), log_probs=torch.zeros(b, steps), cond={},
                      cond_index=torch.zeros(b, dtype=torch.long), group=group, prompts=(),
                      extras={"node": node, "depth": depth, "trained": trained})
    if isinstance(rewards, torch.Tensor):
        rewards = {"r": rewards}
    return CreditInput(traj=traj, rewards=rewards, reward_weights={k: 1.0 for k in rewards},
                       trained=torch.ones(b, steps, dtype=torch.bool), **kw)


def test_the_plan_builds_the_hand_made_tree():
    sig, cond = schedules.sd3_diffusers(4), _cond()
    tr = PLANS["tree"](gaussian_world_velocity, torch.randn(1, 4), sig, cond, eta=eta_schedule(4, 0.7),
                       split_steps=[0, 2])
    node, depth, trained = _hand_tree()
    assert torch.equal(tr.extras["node"], node) and torch.equal(tr.extras["depth"], depth)
    assert torch.equal(tr.extras["trained"], trained)


def test_node_rewards_are_descendant_means_z_scored_per_depth():
    node, depth, trained = _hand_tree()
    r = torch.tensor([1.0, 3.0, 5.0, 11.0])
    one = torch.zeros(4, dtype=torch.long)
    adv = assign_credit("tree", _inp(r, node, depth, trained, one, std_eps=1e-12)).advantages
    s2 = 14 ** 0.5  # leaves: mean 5, population std √14; depth 1: node rewards 2 and 8 → ∓1
    want = torch.tensor([[-1, -1, (1 - 5) / s2, 0], [0, 0, (3 - 5) / s2, 0], [1, 1, 0, 0], [0, 0, (11 - 5) / s2, 0]])
    assert torch.allclose(adv, want.float(), atol=1e-6)
    # unbiased std (credit.std_ddof=1) changes the scale, not the ordering
    adv1 = assign_credit("tree", _inp(r, node, depth, trained, one, std_ddof=1)).advantages
    assert torch.allclose(adv1[0, 0], torch.tensor(-(2 ** -0.5)), atol=1e-4)


def test_root_is_lone_and_gets_zero():
    """A root with edges (first split at 2): its advantage is 0 even unmasked, and the plan does not train it."""
    tr, *_ = _tree(roots=2, splits=[2, 5])
    ex = tr.extras
    r = torch.randn(tr.batch_size, generator=torch.Generator().manual_seed(0))
    a = tree_node_advantages(r, ex["node"], ex["depth"], tr.group)  # [N, T] unmasked
    root_edges = ex["depth"] == 0
    assert root_edges[:, :2].all() and (a[root_edges] == 0).all() and not ex["trained"][root_edges].any()
    assert (a[~root_edges] != 0).any()


def _random_tree_credit(rewards=None, perm=None, splits=(0, 3, 6), std_eps=1e-12, **kw):
    tr, *_ = _tree(roots=3, splits=list(splits))
    ex = dict(tr.extras)
    r = rewards if rewards is not None else torch.randn(tr.batch_size, generator=torch.Generator().manual_seed(5))
    node, depth, trained, group = ex["node"], ex["depth"], ex["trained"], tr.group
    if perm is not None:
        node, depth, trained, group, r = node[perm], depth[perm], trained[perm], group[perm], r[perm]
    return assign_credit("tree", _inp(r, node, depth, trained, group, std_eps=std_eps, **kw)).advantages, tr, r


def test_node_advantages_have_mean_zero_within_tree_and_depth():
    adv, tr, _ = _random_tree_credit()
    ex = tr.extras
    assert torch.isfinite(adv).all() and (adv[~ex["trained"]] == 0).all()
    for g in tr.group.unique():
        for d in range(1, 4):
            m = ex["trained"] & (ex["depth"] == d) & (tr.group == g)[:, None]  # [N, T]
            per_node = {}
            for row, t in m.nonzero().tolist():
                per_node.setdefault(int(ex["node"][row, t]), set()).add(float(adv[row, t]))
            assert all(len(v) == 1 for v in per_node.values())  # one advantage per node, on all its edges
            vals = torch.tensor([next(iter(v)) for v in per_node.values()], dtype=torch.float64)
            assert len(vals) == 2 ** d
            assert abs(float(vals.mean())) < 1e-5 and abs(float(vals.std(unbiased=False)) - 1) < 1e-3


def test_tree_credit_invariances():
    base, tr, r = _random_tree_credit()
    assert base.abs().sum() > 0
    # permuting the rows within (and across) trees permutes the credit rows
    n = tr.batch_size
    perm = torch.cat([torch.randperm(8, generator=torch.Generator().manual_seed(s)) + 8 * s for s in range(3)])
    perm = perm[torch.tensor([*range(8, 16), *range(0, 8), *range(16, 24)])]
    assert sorted(perm.tolist()) == list(range(n))
    assert torch.allclose(_random_tree_credit(rewards=r, perm=perm)[0], base[perm], atol=1e-6)
    # shift and scale of the rewards
    assert torch.allclose(_random_tree_credit(rewards=r * 2.5 + 3.7)[0], base, atol=1e-5)
    # trees do not leak: new rewards in tree 1 leave trees 0 and 2 unchanged
    other = r.clone()
    in1 = tr.group == 1
    other[in1] = torch.randn(int(in1.sum()))
    changed = _random_tree_credit(rewards=other)[0]
    assert torch.allclose(changed[~in1], base[~in1], atol=1e-6) and not torch.allclose(changed[in1], base[in1])


def test_tree_credit_aggregates_several_rewards_and_skips_nan():
    node, depth, trained = _hand_tree()
    grp = torch.zeros(4, dtype=torch.long)
    r, q = torch.tensor([1.0, 3.0, 5.0, 11.0]), torch.tensor([0.0, 2.0, 1.0, 1.0])

    def a(rew, **kw):
        inp = _inp(rew, node, depth, trained, grp, **kw)
        inp = dataclasses.replace(inp, reward_weights={"r": 1.0, "q": 0.5} if len(rew) == 2 else {"r": 1.0})
        return assign_credit("tree", inp).advantages

    both = {"r": r, "q": q}
    assert torch.allclose(a(both), a({"r": r}) + 0.5 * a({"r": q}), atol=1e-6)  # advantage_sum (default)
    assert torch.allclose(a(both, aggregate="reward_sum"), a({"r": r + 0.5 * q}), atol=1e-6)
    nan = a({"r": torch.tensor([1.0, float("nan"), 5.0, 11.0])})
    assert torch.isfinite(nan).all() and nan[1].abs().sum() == 0  # a leaf without a reward: A = 0 on its edges
    assert nan[0, 0] < 0 < nan[2, 0]  # its parent's reward is the mean of the remaining leaf (1)


def test_tree_credit_needs_a_tree_rollout():
    inp = _inp(torch.randn(4), *_hand_tree(), torch.zeros(4, dtype=torch.long))
    inp = dataclasses.replace(inp, traj=dataclasses.replace(inp.traj, extras={}))
    with pytest.raises(ValueError, match="sampler.plan=tree"):
        assign_credit("tree", inp)


# ------------------------------------------------------------------------------------------ (d) trainer


def test_trainer_on_trees_is_on_policy_and_checkpoints(tmp_path):
    from flowalign.models.lora import WEIGHT_NAME
    from flowalign.train import train
    from test_train_update import _cfg

    cfg = _cfg(tmp_path / "run", "sampler.plan=tree", "credit.name=tree", "sampler.train_fraction=0.75",
               "sampler.plan_options.split_steps=[0, 1]", "train.iterations=1", "train.micro_batch=1000",
               "train.filter_zero_std=false", "train.shuffle_transitions=false", "train.optimizer_steps_per_iter=1")
    d = C.derived(cfg)
    # 2 prompts × 4 roots (group_size = seeds per prompt) × 2² leaves; per root 2·1 + 4·2 trained node-steps
    assert d["samples_per_seed"] == 4 and d["rollouts_per_iter"] == 32 and d["transitions_per_iter"] == 80
    run = train(cfg)
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert m["rollouts/iteration"] == 32 and m["train/transitions"] == 80
    # the edges of a split share their parent's state: per root 1 + 2 + 4 states for the 2 + 4 + 4 edges of
    # steps 0, 1, 2, so the update runs 8 · 7 training forwards, not 80 (flowalign.train.state_classes)
    assert m["nfe/training"] == 56
    assert abs(m["train/ratio_mean"] - 1) < 1e-5 and m["train/clipfrac_high"] == 0 and m["train/clipfrac_low"] == 0
    assert (run / "checkpoints" / "step-1" / WEIGHT_NAME).exists()


def test_config_refuses_a_window_with_trees():
    from test_train_update import _cfg

    with pytest.raises(C.UserError, match="plan=tree"):
        _cfg("unused", "sampler.plan=tree", "sampler.window_size=2")


# ------------------------------------------------------------------------------------------ (e) the reference's options


def test_softmax_backup_weights_children_by_their_split_edge_probability():
    """backup=softmax: node reward = Σ_c softmax(α·log p_c)·R_c over the children's split edges (the reference's
    probability-weighted option); equal log-probs (or α = 0) give the leaves' mean."""
    from flowalign.credit import tree_node_rewards

    node, depth, _ = _hand_tree()
    r = torch.tensor([1.0, 3.0, 5.0, 11.0])
    one = torch.zeros(4, dtype=torch.long)
    lp = torch.zeros(4, 4)
    lp[1, 2] = float(torch.tensor(3.0).log())  # node 4 (row 1) is 3× as likely as its sibling node 3 (row 0)
    soft = tree_node_rewards(r, node, depth, one, backup="softmax", log_probs=lp)
    assert soft[0, 0] == pytest.approx(0.25 * 1 + 0.75 * 3) and soft[2, 0] == pytest.approx(8.0)  # depth 1
    assert soft[:, 2].tolist() == r.tolist()  # the leaves keep their own rewards
    mean = tree_node_rewards(r, node, depth, one)
    assert torch.equal(tree_node_rewards(r, node, depth, one, backup="softmax", log_probs=lp, temperature=0.0), mean)
    # a large α backs up the most likely child alone; a child without a reward is left out of the softmax
    assert tree_node_rewards(r, node, depth, one, backup="softmax", log_probs=lp, temperature=50.0)[0, 0] == \
        pytest.approx(3.0, abs=1e-6)
    nan = tree_node_rewards(torch.tensor([1.0, float("nan"), 5.0, 11.0]), node, depth, one, backup="softmax",
                            log_probs=lp)
    assert nan[0, 0] == pytest.approx(1.0)
    # on a sampled tree with equal stored log-probs the two backups agree everywhere
    tr, *_ = _tree(roots=3, splits=[0, 3, 6])
    ex, rr = tr.extras, torch.randn(tr.batch_size, generator=torch.Generator().manual_seed(2))
    flat = tree_node_rewards(rr, ex["node"], ex["depth"], tr.group, backup="softmax",
                             log_probs=torch.full_like(tr.log_probs, -1.3))
    assert torch.allclose(flat, tree_node_rewards(rr, ex["node"], ex["depth"], tr.group), atol=1e-12)
    with pytest.raises(ValueError, match="backup"):
        tree_node_rewards(r, node, depth, one, backup="max")


def test_mean_backup_averages_only_the_finite_leaves():
    """backup=mean (BranchGRPO, arXiv:2509.06040; METHODS.md §2.8): a node's reward is the mean of its descendant
    leaves' finite rewards, exactly: NaN ("not applicable") leaves count neither in the sum nor in the count, and a
    node whose leaves are all NaN gets NaN. Checked by hand on a three-split tree and against a brute-force mean on a
    sampled one."""
    from flowalign.credit import tree_node_rewards

    # one tree, T = 3, binary splits at steps 0, 1, 2: depth-1 nodes 1, 2; depth-2 nodes 3…6; leaves 7…14
    node = torch.tensor([[1 + i // 4, 3 + i // 2, 7 + i] for i in range(8)])
    depth = torch.tensor([[1, 2, 3]] * 8)
    nan = float("nan")
    r = torch.tensor([1.0, 2.0, nan, nan, 4.0, nan, 8.0, 16.0])
    got = tree_node_rewards(r, node, depth, torch.zeros(8, dtype=torch.long))
    n1, n2 = 1.5, 28 / 3  # (1 + 2)/2 (two NaN leaves left out), (4 + 8 + 16)/3 (one left out)
    want = torch.tensor([[n1, 1.5, 1.0], [n1, 1.5, 2.0], [n1, nan, nan], [n1, nan, nan],
                         [n2, 4.0, 4.0], [n2, 4.0, nan], [n2, 12.0, 8.0], [n2, 12.0, 16.0]], dtype=torch.float64)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, atol=1e-12, rtol=0, equal_nan=True)
    # a sampled forest (3 trees × 8 leaves) with a NaN pattern that empties some subtrees
    tr, *_ = _tree(roots=3, splits=[0, 3, 6])
    ex = tr.extras
    rr = torch.randn(tr.batch_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rr[[2, 3, 9, 16, 17, 18, 19, 20, 21, 22, 23]] = nan  # tree 2 has no reward at all
    got = tree_node_rewards(rr, ex["node"], ex["depth"], tr.group)
    want = torch.full_like(got, nan)
    for i in range(tr.batch_size):
        for t in range(T):
            below = (ex["node"] == ex["node"][i, t]).any(1)  # the leaves under the node owning edge (i, t)
            fin = rr[below & torch.isfinite(rr)]
            if fin.numel():
                want[i, t] = fin.mean()
    assert torch.isnan(got[16:]).all() and torch.isfinite(got[:16, 0]).all()
    assert torch.allclose(got, want, atol=1e-12, rtol=0, equal_nan=True)


def test_depth_and_width_pruning_drop_edges_and_keep_the_other_advantages():
    base, tr, r = _random_tree_credit()
    ex = tr.extras

    def run(**opts):
        inp = _inp(r, ex["node"], ex["depth"], ex["trained"], tr.group, std_eps=1e-12)
        return assign_credit("tree", inp, opts)

    pruned = run(prune_steps=[4, 7])
    assert pruned.mask is not None and not pruned.mask[:, [4, 7]].any() and pruned.mask[:, [0, 3, 5]].all()
    assert torch.equal(pruned.advantages, torch.where(pruned.mask, base, torch.zeros_like(base)))
    assert run().mask is None
    # width=extremes: of each tree's 8 deepest nodes (depth 3) the 2 best and 2 worst keep their edges
    wide = run(width="extremes", width_ratio=0.5)
    deep = ex["trained"] & (ex["depth"] == 3)  # [N, T] one row per deepest node
    for g in tr.group.unique().tolist():
        rows = deep & (tr.group == g)[:, None]
        per_node = {int(ex["node"][i, t]): (float(base[i, t]), bool(wide.mask[i, t])) for i, t in rows.nonzero().tolist()}
        assert len(per_node) == 8
        ranked = sorted(per_node.values(), key=lambda av: -av[0])
        assert [kept for _, kept in ranked] == [True, True, False, False, False, False, True, True]
    shallow = ex["depth"] < 3
    assert wide.mask[shallow].all() and torch.equal(wide.advantages, torch.where(wide.mask, base, torch.zeros_like(base)))
    with pytest.raises(ValueError, match="prune_steps"):
        run(prune_steps=[T])
    with pytest.raises(ValueError, match="width"):
        run(width="best")


def test_the_trainer_does_not_rescore_pruned_edges(tmp_path):
    from flowalign.train import train
    from test_train_update import _cfg

    cfg = _cfg(tmp_path / "run", "sampler.plan=tree", "credit.name=tree", "sampler.train_fraction=0.75",
               "sampler.plan_options.split_steps=[0, 1]", "train.iterations=1", "train.micro_batch=1000",
               "train.filter_zero_std=false", "train.optimizer_steps_per_iter=1",
               "credit.options={prune_steps: [2], backup: softmax}")
    run = train(cfg)
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    # 8 roots × (2 depth-1 nodes × step 0 + 4 depth-2 nodes × step 1; step 2 pruned) = 48 of the 80 edges
    assert m["train/transitions"] == 48
    assert abs(m["train/ratio_mean"] - 1) < 1e-5 and m["train/clipfrac_high"] == 0


# --------------------------------------------------------------------------------------------------- config checks
# Combinations that used to pass ``validate`` and then fail in the first rollout (after the model load and the base
# evaluation) or train silently wrong.


def test_tree_credit_needs_the_tree_plan():
    """credit.name=tree reads extras['node'] of a tree rollout: with the chain plan it raised ValueError mid-run."""
    with pytest.raises(C.UserError, match="sampler.plan=tree"):
        _cfg("unused", "credit.name=tree")


def test_tree_plan_needs_the_tree_credit():
    """A tree trains each shared edge once, on its first leaf (extras['trained']): a per-row credit such as outcome
    would credit a shared edge with that one leaf's terminal advantage, silently ignoring its siblings."""
    with pytest.raises(C.UserError, match="credit.name=tree"):
        _cfg("unused", "sampler.plan=tree")
    _cfg("unused", "sampler.plan=tree", "credit.name=tree")  # the documented pair is accepted


def test_tree_split_noise_scale_is_checked_before_anything_loads():
    """CPS's std is not proportional to η, so the plan refuses split_noise_scale != 1 with it, and a
    scale <= 0 is refused too; both used to pass the config and fail in the first rollout."""
    tree = ("sampler.plan=tree", "credit.name=tree")
    with pytest.raises(C.UserError, match="split_noise_scale"):
        _cfg("unused", *tree, "sampler.kernel=cps", "sampler.plan_options.split_noise_scale=4.0")
    _cfg("unused", *tree, "sampler.kernel=cps")  # the default scale 1 leaves the kernel's noise alone
    for bad in ("0", "-2.0", "nan"):
        with pytest.raises(C.UserError, match="split_noise_scale"):
            _cfg("unused", *tree, f"sampler.plan_options.split_noise_scale={bad}")
    _cfg("unused", *tree, "sampler.kernel=dance_sde", "sampler.plan_options.split_noise_scale=4.0")


def test_trees_refuse_a_kernel_without_noise_at_step_zero():
    """The tree's derived shape assumes candidate steps 0 … n−1 (BranchGRPO splits at 0); ddim_sde has none at σ = 1:
    at T = 10 derived said 8 leaves while the sampler grew 4, at T = 4 training failed after the base evaluation."""
    from flowalign import config as C
    from flowalign.errors import UserError

    with pytest.raises(UserError, match="draws no noise"):
        C.load_config(None, ["sampler.plan=tree", "credit.name=tree", "sampler.kernel=ddim_sde"])


def test_tree_prune_steps_outside_the_rollout_are_refused_when_the_config_loads():
    """A prune step ≥ sampler.steps used to fail only inside the first iteration's credit, after the base evaluation;
    the config now refuses it in one line, and steps inside the rollout still load."""
    tree = ["sampler.plan=tree", "credit.name=tree", "sampler.kernel=flow_sde", "train.group_size=2",
            "sampler.plan_options={split_steps: [0, 1]}"]
    with pytest.raises(UserError, match=r"prune_steps=\[1, 4\]: \[4\] are not steps 0 … 3 of sampler.steps=4") as e:
        _cfg("unused", *tree, "credit.options={prune_steps: [1, 4]}")
    assert "\n" not in str(e.value)
    _cfg("unused", *tree, "credit.options={prune_steps: [1, 3]}")


@pytest.mark.parametrize("bad", [3, "12"])
def test_tree_prune_steps_that_are_not_a_list_of_steps_are_refused_in_one_line(bad):
    """credit.options.prune_steps=3 raised "'int' object is not iterable", and "12" silently pruned steps 1 and 2."""
    from flowalign.credit import assign_credit

    tr, *_ = _tree(roots=2, splits=[0, 3, 6])
    ex = tr.extras
    inp = _inp(torch.randn(tr.batch_size, generator=torch.Generator().manual_seed(0)), ex["node"], ex["depth"],
               ex["trained"], tr.group)
    with pytest.raises(ValueError, match="prune_steps must be a list of steps"):
        assign_credit("tree", inp, {"prune_steps": bad})
    assign_credit("tree", inp, {"prune_steps": (4,)})  # a tuple (or list) of steps is fine


def test_tree_credit_refuses_a_negative_temperature_when_called_directly():
    """A negative softmax-backup temperature ran and favoured the less likely children; the trainer refuses it from
    the annotation (test_plan_options.py), a direct call from the function's own check."""
    from flowalign.credit import assign_credit

    tr, *_ = _tree(roots=2, splits=[0, 3, 6])
    ex = tr.extras
    inp = _inp(torch.randn(tr.batch_size, generator=torch.Generator().manual_seed(0)), ex["node"], ex["depth"],
               ex["trained"], tr.group)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        assign_credit("tree", inp, {"backup": "softmax", "temperature": -1.0})
    assign_credit("tree", inp, {"backup": "softmax", "temperature": 0.0})  # 0 weighs the children equally
