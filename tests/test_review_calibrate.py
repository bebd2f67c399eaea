"""Review of `flowalign calibrate` (DenseGRPO noise calibration): bad input is one line and exit 2 before the model
loads (or, for prompt text only the model or the reward can read, before any rollout), and the update rule does not
raise ψ on a step it has no evidence about. Each test failed on the code before the review."""

from __future__ import annotations

import pytest
import torch

from cli_checks import fails as _fails, no_model  # noqa: F401  (the fixture is used by name)
from flowalign.cli import main

TINY = ["--steps", "2", "--n", "2", "--group-size", "1", "--iterations", "1", "--probe", "x0"]


def test_calibrate_refuses_an_out_below_a_file_before_loading(capsys, no_model, tmp_path):
    """`--out FILE/eta.json` ran the whole calibration (minutes at the defaults) and then failed on the write."""
    f = tmp_path / "afile"
    f.write_text("x")
    _fails(capsys, ["calibrate", "--out", str(f / "eta.json")], str(f), "not a directory")


def test_calibrate_reads_the_prompt_set_before_the_model(capsys, no_model, tmp_path):
    """A missing --prompts file was reported only after the model had loaded (slow for SD3/FLUX)."""
    _fails(capsys, ["calibrate", "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "e.json")],
           "none.txt")


@pytest.mark.parametrize("extra, needle", [
    (["--steps", "1"], "--steps"),  # the only step is the deterministic last one: I iterations for an eta of [0.0]
    (["--guidance", "nan"], "--guidance"),  # every gain NaN: every step 'balanced', ψ rose by I·ε2, exit 0
    (["--guidance", "-1"], "--guidance"),  # the trainer refuses model.guidance < 0, so the file is unusable
    (["--seed", "99999999999999999999"], "--seed"),  # a ValueError traceback after the model had loaded
])
def test_calibrate_refuses_bad_settings_before_loading(capsys, no_model, tmp_path, extra, needle):
    out = tmp_path / "eta.json"
    _fails(capsys, ["calibrate", "--out", str(out), *extra], needle)
    assert not out.exists()


def test_calibrate_checks_prompt_text_before_any_rollout(capsys, monkeypatch, tmp_path):
    """A prompt outside the reward's grammar failed inside the first probe's scoring, after the rollouts (and with a
    mixed file, only at whichever iteration first drew it)."""
    import flowalign.calibrate as C

    calls = []
    real = C.sample
    monkeypatch.setattr(C, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts = tmp_path / "p.txt"
    prompts.write_text("circle circle\n")  # in the model's vocabulary, not in the verifier's grammar
    out = tmp_path / "eta.json"
    _fails(capsys, ["calibrate", *TINY, "--prompts", str(prompts), "--out", str(out)], "circle circle")
    assert calls == [] and not out.exists()


def test_calibration_update_keeps_psi_on_a_step_without_a_finite_gain():
    """NaN gains are ignored, so a step whose gains were all NaN counted 0 positive and 0 negative: 'balanced', and
    ψ rose by ε2 on no evidence at all (every step, every iteration when the rewards were NaN)."""
    from flowalign.calibrate import calibration_update

    psi = torch.tensor([0.5, 0.5, 0.5])
    nan = float("nan")
    gains = torch.tensor([[nan, 1.0, 0.0], [nan, -1.0, 0.0]])
    new, imb = calibration_update(psi, gains, eps1=2, eps2=0.01)
    assert imb.tolist() == [0, 0, 0]
    assert new[0] == psi[0]  # no evidence: unchanged
    assert torch.allclose(new[1:], torch.tensor([0.51, 0.51]))  # balanced and all-zero gains still rise (spec)
