"""Review of Euphonium's guided rollouts, the PRM heads and the probe engine (METHODS.md §4.5, §5.3): regressions."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from flowalign.credit import CreditInput, assign_credit
from flowalign.samplers import eta_schedule, sample, schedules
from flowalign.values import RewardGuidance, make_probe, probe_values_naive, reward_grad_guide

M, SD = 2.0, 0.5
T = 6


def gw_velocity(x, sigma, cond):
    """Exact velocity of data ~ N(m + c, s_d²) per dimension; elementwise, so batch-invariant."""
    s = sigma.to(torch.float64).view(-1, *([1] * (x.dim() - 1)))
    m = M + cond["c"].to(torch.float64)
    x = x.to(torch.float64)
    return ((s - (1 - s) * SD**2) / ((1 - s) ** 2 * SD**2 + s**2) * (x - (1 - s) * m) - m).to(torch.float32)


def score(z, rows):
    return {"r": -(z - 2.0).pow(2).mean(1) + 0.3 * torch.sin(4 * z).mean(1)}


def _rollout(eta, b=8, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    cond = {"c": torch.tensor([[-0.3] * 3, [0.4] * 3])}
    ci = torch.arange(b) // (b // 2)
    return sample(gw_velocity, torch.randn(b, 3, generator=g), schedules.sd3_diffusers(T), cond, eta=eta,
                  kernel="flow_sde", generator=g, cond_index=ci, group=ci, keep_velocities=True, **kw)


@pytest.mark.parametrize("index, reads", [("post", "next"), ("pre", "this"), ("gain", "both")])
def test_euphonium_pra_probe_requests_only_the_states_its_index_reads(index, reads):
    """METHODS §5.3.5 (probe only what is trained): with ``pra_probe`` the process head probed the pre- *and*
    post-state of every trained step whatever ``pra_index`` read, e.g. V_full(x_0) (T − 1 forwards a row) for "post"."""
    tr = _rollout(eta_schedule(T, 0.7))
    term = score(tr.final, None)
    probe = make_probe(gw_velocity, tr, score, terminal=term)
    asked = []

    def spy(mode, mask):
        asked.append(mask.clone())
        return probe(mode, mask)

    trained = torch.zeros(8, T, dtype=torch.bool)
    trained[:, [0, 2, 3]] = True  # not contiguous: pre- and post-states differ
    inp = CreditInput(traj=tr, rewards=term, reward_weights={"r": 1.0}, trained=trained, probe=spy)
    got = assign_credit("euphonium", inp, {"pra_probe": "ode:full", "pra_index": index, "heads": "pra"}).advantages
    want_mask = torch.zeros(8, T + 1, dtype=torch.bool)
    if reads in ("next", "both"):
        want_mask[:, 1:] |= trained
    if reads in ("this", "both"):
        want_mask[:, :-1] |= trained
    want_mask[:, T] = False  # x_T is the terminal reward, never probed
    assert len(asked) == 1 and torch.equal(asked[0], want_mask)
    # the head itself is unchanged: the same as from precomputed reference values of every state
    ref = probe_values_naive(gw_velocity, tr, torch.ones(8, T + 1, dtype=torch.bool), "ode:full", score)
    ref["r"][:, T] = term["r"]
    full = assign_credit("euphonium", dataclasses.replace(inp, probe=None, values=ref),
                         {"pra_probe": "ode:full", "pra_index": index, "heads": "pra"}).advantages
    assert torch.allclose(got, full, atol=1e-6) and bool((got[:, [0, 2, 3]] != 0).any())


def test_negative_guided_steps_are_refused_not_silently_unguided():
    """``steps: [-4, -3, -2, -1]`` ("the last 4", as Euphonium's script guides) matched no loop index t ≥ 0: the
    rollout was silently unguided and the process head all zeros."""
    prm = lambda z, s, c: -(z - 3.0).pow(2).mean(1)  # noqa: E731
    with pytest.raises(ValueError, match="step indices"):
        RewardGuidance(prm, 1.0, steps=[-4, -3, -2, -1])

    class Diff:
        differentiable = True

        def __call__(self, images, prompts, metadata=None):
            return images.flatten(1).mean(1)

    with pytest.raises(ValueError, match="step indices"):
        reward_grad_guide(velocity=gw_velocity, decode=lambda z: z, rewards={"m": Diff()}, weights={"m": 1.0},
                          steps=[-1])
    RewardGuidance(prm, 1.0, steps=[0, 5])  # valid indices are accepted


def test_guided_steps_past_the_last_step_are_reported(caplog):
    prm = lambda z, s, c: -(z - 3.0).pow(2).mean(1)  # noqa: E731
    guide = RewardGuidance(prm, 1.0, steps=[4, 9])  # T = 6: step 9 does not exist
    tr = _rollout(eta_schedule(T, 0.7), mean_shift=guide)
    with caplog.at_level(logging.WARNING, logger="flowalign.values"):
        ex = guide.credit_extras(tr)
    assert "[9]" in caplog.text and ex["prm_steps"].tolist() == [False] * 4 + [True, False]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_incremental_make_probe_on_guided_random_eta_rollouts_equals_naive(seed):
    """make_probe over several partial masks (cache, ODE-skip past random η = 0 steps and a guided step, dedupe,
    chunking, terminal reuse) equals the one-probe-at-a-time reference for every probe mode."""
    g = torch.Generator().manual_seed(100 + seed)
    eta = (torch.rand(T, generator=g) < 0.5).float() * 0.7
    guide = RewardGuidance(lambda z, s, c: -(z - 3.0).pow(2).mean(1), 2.0, steps=[int(torch.randint(T, (1,),
                                                                                                   generator=g))])
    tr = _rollout(eta, seed=seed, mean_shift=guide)
    term = score(tr.final, None)
    for mode in ("x0", "ode:2", "ode:full", "ode2:1"):
        masks = [torch.rand(8, T + 1, generator=g) < 0.4 for _ in range(3)]
        full = masks[0] | masks[1] | masks[2]
        probe = make_probe(gw_velocity, tr, score, terminal=term if seed % 2 else None, max_batch=3, score_batch=5)
        for m in masks:
            probe(mode, m)
        got = probe(mode, full)["r"]
        ref = probe_values_naive(gw_velocity, tr, full, mode, score)["r"]
        assert torch.equal(torch.isnan(got), ~full)
        assert torch.allclose(got[full], ref[full], atol=1e-6), mode
