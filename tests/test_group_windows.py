"""Flow-GRPO-Fast windows drawn per group (METHODS.md §2.6, quirk Q5): per-row η in the sampling loop, the trained
steps, the update's re-scoring and TP-GRPO's window steps, on the Gaussian world and the shapes trainer."""

import json

import pytest
import torch

from flowalign import config as C
from flowalign.credit import CreditInput, assign_credit
from flowalign.errors import UserError
from flowalign.samplers import eta_schedule, sample, schedules, step_log_prob
from flowalign.train import _trained_mask, group_windows, window_eta
from flowalign.values import make_probe, row_eta

from test_credit_methods import gaussian_world_velocity, score

T = 8


def _rollout(eta, b=8, seed=0, groups=4):
    g = torch.Generator().manual_seed(seed)
    cond = {"c": torch.linspace(-0.4, 0.4, groups)[:, None].expand(groups, 3).contiguous()}
    ci = torch.arange(b) // (b // groups)
    x = torch.randn(b, 3, generator=g)
    return sample(gaussian_world_velocity, x, schedules.sd3_diffusers(T), cond, eta=eta, kernel="flow_sde",
                  generator=g, cond_index=ci, group=ci, keep_velocities=True)


def test_group_windows_are_seeded_per_group_whatever_the_world_size():
    starts = group_windows(42, 3, range(16), 0, 7, 3)
    assert all(0 <= s <= 4 for s in starts)
    assert len(set(starts)) > 1  # the groups of one iteration spread over the range (upstream: one t0 per process)
    # rank 1 of 2 holds groups 8..15 (or any other subset): each group gets the window it gets on one rank
    assert group_windows(42, 3, range(8, 16), 0, 7, 3) == starts[8:]
    assert group_windows(42, 3, [5, 2], 0, 7, 3) == [starts[5], starts[2]]
    assert group_windows(42, 4, range(16), 0, 7, 3) != starts  # a new draw every iteration
    assert group_windows(42, 3, range(16), 2, 5, 3) == [2] * 16  # a pinned range: one window


def test_per_row_eta_steps_are_euler_off_the_window_and_exact_on_it():
    eta = window_eta(T, 0.7, [0, 2, 4, 1], 3, 2)  # [8, T]: 4 groups × 2 members
    assert eta.shape == (8, T)
    traj = _rollout(eta)
    assert torch.equal(row_eta(traj), eta)
    assert torch.equal(traj.eta, eta.amax(0))
    sig = traj.sigmas
    for i in range(8):
        for t in range(T):
            x, xn, v = traj.latents[i, t], traj.latents[i, t + 1], traj.velocities[i, t]
            if eta[i, t] == 0:  # bit-exact Euler, no log-prob
                assert torch.equal(xn, x + (sig[t + 1] - sig[t]) * v), (i, t)
                assert traj.log_probs[i, t] == 0
            else:
                assert traj.log_probs[i, t] != 0
                assert not torch.allclose(xn, x + (sig[t + 1] - sig[t]) * v)
    # on-policy re-scoring with each row's own η gives ratio 1 at every window step (the update's view)
    b, t = eta.nonzero(as_tuple=True)
    cond = {"c": traj.cond["c"][traj.cond_index[b]]}
    lp, _ = step_log_prob(gaussian_world_velocity, traj.latents[b, t], traj.latents[b, t + 1], sig[t], sig[t + 1],
                          row_eta(traj)[b, t], cond, kernel="flow_sde")
    assert torch.allclose(lp, traj.log_probs[b, t], atol=1e-5, rtol=0)
    # the trained steps are each row's window
    assert torch.equal(_trained_mask(eta, 1.0, 8), eta > 0)


def test_identical_rows_sample_exactly_as_the_shared_schedule():
    eta = eta_schedule(T, 0.7, window=(2, 3))  # [T]
    a = _rollout(eta, seed=3)
    b = _rollout(eta[None].expand(8, -1).clone(), seed=3)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert "eta_rows" not in b.extras
    with pytest.raises(ValueError, match="per-row eta has shape"):
        _rollout(torch.zeros(3, T))


def test_turning_points_take_each_groups_own_window():
    """TP-GRPO's R^(0..n) are the values at each row's own window steps: with one window per group, the credit of a
    group equals the credit of that group rolled out alone with its window as the shared [T] schedule."""
    starts = [0, 3, 1, 4]
    eta = window_eta(T, 0.7, starts, 3, 2)  # [8, T]
    traj = _rollout(eta, seed=5)

    def credit(tr):
        term = score(tr.final, None)
        inp = CreditInput(traj=tr, rewards=term, reward_weights={"r": 1.0}, trained=row_eta(tr) > 0,
                          probe=make_probe(gaussian_world_velocity, tr, score, terminal=term))
        return assign_credit("turning_points", inp, {"constraint": False})

    adv = credit(traj).advantages  # [8, T]
    assert torch.equal(adv != 0, eta > 0)
    for gi, t0 in enumerate(starts):
        rows = torch.arange(2 * gi, 2 * gi + 2)
        sub = _subset(traj, rows, eta_schedule(T, 0.7, window=(t0, 3)))
        assert torch.allclose(adv[rows], credit(sub).advantages, atol=1e-6)


def _subset(traj, rows, eta):
    from flowalign.types import Trajectory

    return Trajectory(latents=traj.latents[rows], sigmas=traj.sigmas, eta=eta, log_probs=traj.log_probs[rows],
                      cond=traj.cond, cond_index=traj.cond_index[rows], group=traj.group[rows], prompts=traj.prompts,
                      velocities=traj.velocities[rows], extras={})


def test_the_trainer_draws_one_window_per_group(tmp_path):
    """A 1-iteration shapes run with a window free to move: each group's rollouts train exactly its own window
    (window_size steps per rollout), and the groups' starts differ (the old trainer shared one per iteration)."""
    from test_train import _one_step_cfg as _cfg

    from flowalign.train import train

    args = ("train.iterations=1", "train.filter_zero_std=false", "sampler.window_size=1", "sampler.window_range=[0, 3]")
    groups = _cfg(tmp_path / "probe", *args).train.groups_per_iter
    seed = next(s for s in range(100) if len(set(group_windows(s, 0, range(groups), 0, 3, 1))) > 1)  # starts that differ
    cfg = _cfg(tmp_path / "run", *args, f"train.seed={seed}")
    run = train(cfg)
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    starts = group_windows(cfg.train.seed, 0, range(cfg.train.groups_per_iter), 0, 3, 1)
    assert m["sampler/window_start_mean"] == pytest.approx(sum(starts) / len(starts))
    assert m["train/transitions"] == cfg.train.groups_per_iter * cfg.train.group_size  # one window step each


@pytest.mark.parametrize("setting", [["sampler.plan=branch", "credit.name=branch"],
                                     ["sampler.guide=reward_grad", "credit.name=euphonium"]])
def test_branches_and_guides_need_a_pinned_window(setting):
    """Branch plans take one η row for all seeds, and a guide shifts whole steps: with a window free to move per
    group they are refused in one line, and accepted with the range pinned to one window."""
    with pytest.raises(UserError, match=r"pin it with sampler.window_range=\[0, 2\]"):
        C.load_config(None, [*setting, "sampler.window_size=2", "sampler.window_range=[0, 5]"])
    C.load_config(None, [*setting, "sampler.window_size=2", "sampler.window_range=[1, 3]"])


def test_a_size_zero_window_excludes_the_last_step_even_with_last_step_noise():
    """loop.eta_schedule: window n = 0 is [0, T−1) (METHODS.md §2.6), so the last step stays 0 with
    ``last_step_noise`` too (that flag keeps a noisy last step only where the window covers it)."""
    assert eta_schedule(T, 0.7, window=(0, 0), last_step_noise=True).tolist() == pytest.approx([0.7] * (T - 1) + [0])
    assert eta_schedule(T, 0.7, window=(T - 2, 2), last_step_noise=True).tolist() == pytest.approx([0] * (T - 2)
                                                                                                    + [0.7, 0.7])
    assert eta_schedule(T, 0.7, last_step_noise=True).tolist() == pytest.approx([0.7] * T)


def test_eta_schedule_leaves_the_callers_tensor_untouched():
    """loop.eta_schedule returns a new [T] tensor: zeroing the deterministic last step (quirk Q1) and the window must
    not write into a per-step η the caller passed (a float32 [T] that ``.to(float32)`` would otherwise alias)."""
    eta = torch.full((T,), 0.7)  # [T] float32
    assert eta_schedule(T, eta).tolist() == pytest.approx([0.7] * (T - 1) + [0])
    assert eta_schedule(T, eta, window=(2, 3)).tolist() == pytest.approx([0, 0, 0.7, 0.7, 0.7, 0, 0, 0])
    assert eta.tolist() == pytest.approx([0.7] * T)
