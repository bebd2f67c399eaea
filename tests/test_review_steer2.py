"""Second review of flowalign.steer (DAS as ``fk_steer(proposal=…, temper=…)``, ``--proposal/--temper/--reward-std``):
a group whose particles all died stays dead whatever the ESS threshold, and the CLI refuses λ/β that only become
unusable after ``--reward-std`` scaling (or 1/λ for the guided proposal) before the model loads, with one line."""

from __future__ import annotations

import pytest
import torch
from cli_checks import fails, no_model  # noqa: F401  (the fixture is used by name)

from flowalign import steer as S
from flowalign.samplers import eta_schedule, schedules

from test_samplers import gaussian_world_velocity  # noqa: E402


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


@pytest.mark.parametrize("extra, needles", [
    (["--method", "fk", "--reward-std", "1e-320"], ["--lam", "--reward-std"]),  # λ/std = inf
    (["--method", "fk", "--reward", "saturation", "--proposal", "guided", "--lam", "1e-320"], ["--lam", "1/"]),
    (["--method", "fk", "--reward", "saturation", "--proposal", "guided", "--lam", "1e-300", "--reward-std", "1e30"],
     ["--lam"]),  # λ/std underflows to 0
    (["--method", "guided", "--reward", "saturation", "--beta", "1e-200", "--reward-std", "1e-200"], ["--beta"]),
])
def test_lam_and_beta_out_of_range_after_scaling_are_refused_before_loading_the_model(tmp_path, capsys, no_model,
                                                                                      extra, needles):
    fails(capsys, ["steer", "a red circle", *extra, "--out", str(tmp_path / "o")], *needles)
    assert list(tmp_path.iterdir()) == []


def test_guided_method_ignores_a_lam_that_reward_std_would_overflow(tmp_path):
    """--method guided does not use --lam: a tiny --reward-std that overflows λ/std must not refuse it."""
    from flowalign.cli import main

    assert main(["steer", "a red circle", "--method", "guided", "--reward", "saturation", "--eval-rewards",
                 "saturation", "--steps", "2", "--reward-std", "1e-320", "--beta", "1e300",
                 "--out", str(tmp_path / "o")]) == 0


def test_reward_std_from_an_unreadable_results_file_is_one_line(tmp_path, capsys, no_model):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.jsonl").write_bytes(b"\xff\xfe\x00not utf-8\n")
    fails(capsys, ["steer", "a red circle", "--method", "fk", "--reward-std", str(tmp_path / "r"),
                   "--out", str(tmp_path / "o")], "--reward-std")
    assert not (tmp_path / "o").exists()
