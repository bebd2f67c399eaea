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
