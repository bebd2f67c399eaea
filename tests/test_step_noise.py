"""`sampler.step_noise=group`: one generator per prompt group draws that group's SDE step noise (and its random
trained steps), so a group's rollouts are the same whichever groups share its batch or process; the default `rank`
keeps one generator per process (the documented runs)."""

import pytest
import torch

from flowalign import config as C
from flowalign.samplers import eta_schedule, schedules
from flowalign.samplers.loop import draw_rows, sample
from flowalign.samplers.plans import PLANS
from flowalign.train import (STEP_NOISE, _random_trained_mask, group_stream_seed, init_noise_seed, rank_stream_seed,
                             window_seed)

from test_plans import _cond, gaussian_world_velocity  # noqa: E402  (conftest puts tests/ on sys.path)

T = 6


def _gens(groups, stream="step_noise"):
    return STEP_NOISE["group"](42, 3, 0, groups, stream)


def test_per_group_draws_do_not_depend_on_the_batch():
    both = draw_rows(torch.randn, (6, 5), _gens([4, 9]))
    assert torch.equal(both[:3], draw_rows(torch.randn, (3, 5), _gens([4])))
    assert torch.equal(both[3:], draw_rows(torch.randn, (3, 5), _gens([9])))
    assert not torch.equal(both[:3], both[3:])
    with pytest.raises(ValueError, match="equal contiguous blocks"):
        draw_rows(torch.randn, (5, 5), _gens([4, 9]))
    one = torch.Generator().manual_seed(0)
    assert torch.equal(draw_rows(torch.rand, (2, 3), one), torch.rand(2, 3, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("plan,opts", [("chain", {}), ("branch", {"children": 2, "branch_steps": "random"}),
                                       ("tree", {"split_steps": [0, 2], "branching": 2})])
def test_a_groups_rollouts_are_the_same_alone_or_beside_another(plan, opts):
    """What makes a run independent of the number of processes: the rows of groups {0, 1} sampled in one batch equal
    group 0 and group 1 sampled apart (each process holds a contiguous share of whole groups)."""
    sig = schedules.sd3_diffusers(T)
    cond = _cond(2)
    size = 2  # rollouts (chain) / seeds (branch) / roots (tree) per group
    noise = torch.randn(2 * size, 4, generator=torch.Generator().manual_seed(1))
    ci = torch.arange(2).repeat_interleave(size)

    def run(groups):
        rows = torch.cat([torch.arange(g * size, (g + 1) * size) for g in groups])
        return PLANS[plan](gaussian_world_velocity, noise[rows], sig, cond, cond_index=ci[rows], group=ci[rows],
                           eta=eta_schedule(T, 0.7), kernel="flow_sde", generator=_gens(groups), **opts)

    both, a, b = run([0, 1]), run([0]), run([1])
    half = both.batch_size // 2
    assert a.batch_size == b.batch_size == half
    assert torch.allclose(both.latents[:half], a.latents, atol=1e-6)
    assert torch.allclose(both.latents[half:], b.latents, atol=1e-6)
    assert torch.allclose(both.log_probs, torch.cat([a.log_probs, b.log_probs]), atol=1e-5)
    # one generator for the batch (the rank streams) couples the groups: group 1 alone differs from its rows in the pair
    pair = PLANS[plan](gaussian_world_velocity, noise, sig, cond, cond_index=ci, group=ci, eta=eta_schedule(T, 0.7),
                       generator=torch.Generator().manual_seed(5), **opts)
    alone = PLANS[plan](gaussian_world_velocity, noise[size:], sig, cond, cond_index=ci[size:], group=ci[size:],
                        eta=eta_schedule(T, 0.7), generator=torch.Generator().manual_seed(5), **opts)
    assert not torch.allclose(pair.latents[half:], alone.latents, atol=1e-3)


def test_a_groups_window_draws_the_same_noise_beside_a_group_with_another_window():
    """Flow-GRPO-Fast windows per group (per-row η [B, T]): group 0's generator must not advance at group 1's window
    steps, or its own window's noise would depend on which groups share its batch (alone: the [T] path)."""
    sig = schedules.sd3_diffusers(T)
    cond = _cond(2)
    noise = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    ci = torch.tensor([0, 0, 1, 1])
    win = [eta_schedule(T, 0.7, window=(3, 2)), eta_schedule(T, 0.7, window=(0, 2))]  # group 0 late, group 1 early
    both = sample(gaussian_world_velocity, noise, sig, cond, eta=torch.stack([win[0], win[0], win[1], win[1]]),
                  kernel="flow_sde", generator=_gens([0, 1]), cond_index=ci, group=ci)
    for g in (0, 1):
        rows = slice(2 * g, 2 * g + 2)
        alone = sample(gaussian_world_velocity, noise[rows], sig, cond, eta=win[g], kernel="flow_sde",
                       generator=_gens([g]), cond_index=ci[rows], group=ci[rows])
        assert torch.equal(both.latents[rows], alone.latents)
        assert torch.equal(both.log_probs[rows], alone.log_probs)
        assert (alone.log_probs != 0).sum(1).tolist() == [2, 2]  # each group's own window, nothing else


def test_random_trained_steps_are_drawn_per_group_too():
    eta = eta_schedule(T, 0.7)
    both = _random_trained_mask(eta, 0.5, 8, _gens([0, 1], "trained_steps"))
    assert torch.equal(both[4:], _random_trained_mask(eta, 0.5, 4, _gens([1], "trained_steps")))
    assert (both.sum(1) == 2).all()


def test_group_stream_keys_are_distinct_from_every_other_stream():
    seed, it, groups, size, world = 42, 3, 8, 24, 4
    keys = [init_noise_seed(seed, it, g, m) for g in range(groups) for m in range(size)]
    keys += [rank_stream_seed(seed, it, r, s) for r in range(world) for s in ("step_noise", "update", "trained_steps")]
    keys += [window_seed(seed, it, g) for g in range(groups)]
    keys += [group_stream_seed(seed, it, g, s) for g in range(groups) for s in ("step_noise", "trained_steps", "update")]
    assert len(set(keys)) == len(keys)


def test_config_field_and_its_choices():
    assert C.load_config(None, []).sampler.step_noise == "rank"
    assert C.load_config(None, ["sampler.step_noise=group"]).sampler.step_noise == "group"
    from flowalign.errors import UserError

    with pytest.raises(UserError, match="step_noise"):
        C.load_config(None, ["sampler.step_noise=process"])


def test_step_chunks_split_one_global_order_among_the_ranks():
    from flowalign.train import step_chunks

    g = torch.Generator().manual_seed(0)
    pairs = [torch.randint(0, 9, (n, 2), generator=g) for n in (5, 0, 7)]  # three ranks' pairs (one has none)
    counts = [p.shape[0] for p in pairs]
    order = torch.randperm(sum(counts), generator=g)
    glob = torch.cat(pairs)  # the one-process list: ranks' lists in rank order
    one = step_chunks(glob, [sum(counts)], 0, order, 3)
    assert all(torch.equal(a, b) for a, b in zip(one, torch.tensor_split(glob[order], 3)))  # one process: as before
    per_rank = [step_chunks(p, counts, r, order, 3) for r, p in enumerate(pairs)]
    for s in range(3):  # each optimizer step: the ranks' pairs are exactly that step's global pairs
        mine = torch.cat([per_rank[r][s] for r in range(3)])
        want = one[s]
        assert sorted(map(tuple, mine.tolist())) == sorted(map(tuple, want.tolist()))
    with pytest.raises(ValueError, match="holds 5 pairs"):
        step_chunks(pairs[0], [4, 0, 7], 0, order, 3)


@pytest.mark.parametrize("mode", ["fresh", "path"])
def test_nft_draws_per_group_do_not_depend_on_the_batch(mode):
    from flowalign.train import nft_row_draws

    sig = schedules.sd3_diffusers(T)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    ci = torch.arange(2).repeat_interleave(3)
    traj = PLANS["chain"](gaussian_world_velocity, x, sig, _cond(2), cond_index=ci, group=ci, eta=0.0, kernel="euler")
    rows = torch.tensor([0, 2, 3, 4, 5]).repeat(2)  # kept samples (sample 1 dropped) × 2 noise levels
    t, eps = nft_row_draws(traj, rows, mode, _gens([0, 1], "update"))
    second = PLANS["chain"](gaussian_world_velocity, x[3:], sig, _cond(2), cond_index=ci[3:], group=ci[3:], eta=0.0,
                            kernel="euler")
    t1, eps1 = nft_row_draws(second, torch.tensor([0, 1, 2]).repeat(2), mode, _gens([1], "update"))
    g1 = rows >= 3
    assert torch.equal(t[g1], t1) and torch.allclose(eps[g1], eps1, atol=1e-6)
    one = torch.Generator().manual_seed(7)  # one generator: the former draws, all rows in order
    t_r, _ = nft_row_draws(traj, rows, mode, one)
    assert t_r.shape == t.shape and not torch.equal(t_r, t)


def test_nft_draws_refuse_generators_that_do_not_split_the_samples():
    from flowalign.train import nft_row_draws

    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    ci = torch.arange(2).repeat_interleave(3)
    traj = PLANS["chain"](gaussian_world_velocity, x, schedules.sd3_diffusers(T), _cond(2), cond_index=ci, group=ci,
                          eta=0.0, kernel="euler")
    with pytest.raises(ValueError, match="equal contiguous blocks"):
        nft_row_draws(traj, torch.arange(6), "fresh", _gens([0, 1, 2, 3]))


def test_a_block_with_one_active_row_draws_its_whole_block():
    """loop.draw_rows ``active``: only a block with *no* active row skips its generator (zeros); a block with any
    active row draws its full block from its generator, as without ``active`` (else that row's SDE step gets no
    noise)."""
    active = torch.tensor([False, True, False, False, False, False])  # [6]: one row of group 4's block of 3
    got = draw_rows(torch.randn, (6, 5), _gens([4, 9]), active=active)  # [6, 5]
    assert torch.equal(got[:3], draw_rows(torch.randn, (3, 5), _gens([4])))  # the block as drawn without ``active``
    assert torch.equal(got[3:], torch.zeros(3, 5))  # group 9 drew nothing


def test_mix_seed_values_are_pinned_and_read_48_bit_parts():
    """loop.mix_seed: FNV-1a style over the parts, each read modulo 2⁴⁸, the hash kept modulo 2⁶³, so seeds are the
    same on every machine and every documented run keeps its seeds (pinned against an independent transcription, with
    the module's offset 1469598103934665603, not FNV's 14695981039346656037), and parts that differ above bit 32 give
    other seeds."""
    from flowalign.samplers.loop import mix_seed

    def fnv(*parts):
        h = 1469598103934665603
        for p in parts:
            h = ((h ^ (p % 2**48)) * 0x100000001B3) % 2**63
        return h

    for parts in [(42,), (42, 3, 0, 11), (7, 2**40 + 5, 1), (2**47, 0), (-1, 5)]:
        assert mix_seed(*parts) == fnv(*parts), parts
    assert len({mix_seed(42, 3, g) for g in (0, 2**32, 2**33, 2**40)}) == 4
    assert mix_seed(1, 2) != mix_seed(2, 1) and 0 <= mix_seed(2**62, 2**62) < 2**63
