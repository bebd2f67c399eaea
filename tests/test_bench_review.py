"""Review of `flowalign bench <name>`, `flowalign compare` and `flowalign calibrate`: bad input is one line and
exit 2 before any model loads or any file is written; figures that were wrong; reproducibility of the seeds."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cli_checks import fails as _fails, no_model  # noqa: F401  (the fixture is used by name)


# ------------------------------------------------------------------------------------------------- bench


@pytest.mark.parametrize("extra, needle", [
    (["--n", "0"], "--n"),
    (["--steps", "0"], "--steps"),  # was silently replaced by the model's default
    (["--steps", "-2"], "--steps"),
    (["--threads", "0"], "--threads"),  # was silently ignored
    (["--repeats", "-1"], "--repeats"),
])
def test_shapes_sample_refuses_bad_counts(capsys, no_model, extra, needle):
    _fails(capsys, ["bench", "shapes-sample", *extra], needle)


@pytest.mark.parametrize("extra, needles", [
    (["--groups", "0"], ["--groups"]),
    (["--group-size", "0"], ["--group-size"]),
    (["--children", "0"], ["--children"]),
    (["--steps", "0"], ["--steps"]),
    (["--max-batch", "0"], ["--max-batch"]),
    (["--rank-groups", "-1"], ["--rank-groups"]),
    (["--models", "shape"], ["'shape'", "shapes"]),  # was skipped silently: exit 0 and an empty table
    (["--rank-reward", "bogus"], ["'bogus'"]),  # was refused only after every cost run
])
def test_bench_credit_refuses_bad_input_before_loading(capsys, no_model, tmp_path, extra, needles):
    out = tmp_path / "b.json"
    _fails(capsys, ["bench", "credit", "--models", "shapes", "--json", str(out), *extra], *needles)
    assert not out.exists()


@pytest.mark.parametrize("bench, extra", [
    ("credit", ["--models", "shapes"]),
    ("grad-snr", []),
    ("noise-variance", []),
    ("sample-gap", []),
])
def test_benches_refuse_a_directory_json_before_running(capsys, no_model, tmp_path, bench, extra):
    """`--json DIR` failed with IsADirectoryError only after the whole benchmark had run."""
    _fails(capsys, ["bench", bench, *extra, "--json", str(tmp_path)], str(tmp_path), "directory")


@pytest.mark.parametrize("extra, needle", [
    (["--splits", "0"], "--splits"),  # was a NaN table
    (["--splits", "-1"], "--splits"),
    (["--lora-rank", "0"], "--lora-rank"),
    (["--eta", "0"], "no stochastic step"),  # was a TypeError after the rollouts and gradients
    (["--steps", "1"], "no stochastic step"),
    (["--steps", "2", "--train-fraction", "0.4"], "no stochastic step"),
])
def test_grad_snr_refuses_runs_without_a_gradient_to_compare(capsys, no_model, extra, needle):
    _fails(capsys, ["bench", "grad-snr", *extra], needle)


def test_sample_gap_refuses_fractional_step_counts(capsys, no_model):
    """`--steps 2.5` was truncated to 2 and reported as 'ode 2 steps'."""
    _fails(capsys, ["bench", "sample-gap", "--steps", "2.5"], "2.5")


# --------------------------------------------------------------------------------------------- calibrate


@pytest.mark.parametrize("extra, needle", [
    (["--init-a", "-1"], "--init-a"),  # negative ψ rolled out, then clamped to an all-zero result
    (["--eps1", "0"], "--eps1"),  # no step can be balanced: ψ only falls
    (["--eps2", "-0.5"], "--eps2"),  # inverts the update
    (["--reward", "shapes_partial=nan"], "shapes_partial=nan"),  # every gain NaN: every step 'balanced'
])
def test_calibrate_refuses_bad_settings(capsys, no_model, tmp_path, extra, needle):
    out = tmp_path / "eta.json"
    _fails(capsys, ["calibrate", "--out", str(out), *extra], needle)
    assert not out.exists()


def test_calibrate_step_noise_is_not_the_initial_noise(monkeypatch, tmp_path):
    """With the default --seed 0 the rollout's SDE generator was seeded like the initial noise, so the first
    step's noise ξ_0 was exactly x_0 (same shape, same stream): the calibrated gains came from correlated noise."""
    import flowalign.calibrate as C

    seen = {}

    class Stop(Exception):
        pass

    def fake_sample(velocity, noise, sigmas, cond, *, generator=None, **kw):
        seen["noise"], seen["xi"] = noise.clone(), torch.randn(noise.shape, generator=generator)
        raise Stop

    monkeypatch.setattr(C, "sample", fake_sample)
    with pytest.raises(Stop):
        C.cli_main(["--steps", "2", "--n", "2", "--group-size", "1", "--iterations", "1", "--probe", "x0",
                    "--out", str(tmp_path / "eta.json")])
    assert not torch.equal(seen["noise"], seen["xi"])


def test_calibrate_shows_progress(monkeypatch, capsys):
    """The calibration loop (minutes at the defaults) shows a progress bar."""
    import flowalign.calibrate as C

    monkeypatch.setattr(C, "reward_gains", lambda *a, **k: torch.tensor([[0.1, -0.1], [0.2, 0.3]]))
    C.calibrate_noise(lambda it: (torch.zeros(2, 1), {}, torch.zeros(2, dtype=torch.long)), None,
                      torch.tensor([1.0, 0.5, 0.0]), None, {"r": 1.0}, iterations=3, progress=True)
    err = capsys.readouterr().err
    assert "calibrat" in err and "3/3" in err


# ----------------------------------------------------------------------------------------------- compare


def _run(d, values, records):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"train": {"groups_per_iter": 2, "group_size": 4},
                                                   "credit": {"name": "outcome"}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for label, v in values.items():
        (d / "eval" / label).mkdir(parents=True)
        (d / "eval" / label / "summary.json").write_text(json.dumps({"overall": {"shapes_strict": v}}))
    return d


def test_compare_wall_time_adds_up_the_sessions_of_a_resumed_run(tmp_path):
    """`time/elapsed_s` restarts at 0 in a resumed session; the table showed only the last session's time."""
    from flowalign.compare import run_curve

    # session 1 logged iterations 1-2 (a resume drops what was logged after its checkpoint), session 2 did 3-4
    recs = [{"iteration": i, "nfe/sampling": 10 * i, "time/elapsed_s": 100.0 * i} for i in (1, 2)]
    recs += [{"iteration": i, "nfe/sampling": 10 * i, "time/elapsed_s": 100.0 * (i - 2)} for i in (3, 4)]
    d = _run(tmp_path / "r", {"base": 0.3, "final": 0.5}, recs)
    assert run_curve(d)["wall_s"] == pytest.approx(200.0 + 200.0)


def test_compare_does_not_call_a_later_evaluation_the_base(tmp_path):
    """Without a base evaluation (eval.before off) the first point is step-N, not the base model."""
    from flowalign.compare import compare

    recs = [{"iteration": i, "nfe/sampling": 10 * i, "time/elapsed_s": 1.0 * i} for i in (1, 2, 3, 4)]
    d = _run(tmp_path / "nb", {"step-2": 0.4, "final": 0.5}, recs)
    _png, md = compare([d], tmp_path / "out")
    row = md.read_text().splitlines()[2].split("|")
    assert row[6].strip() == "–" and row[8].strip() == "–"  # base and Δ unknown
    assert row[7].strip() == "0.500"


def test_compare_refuses_an_eval_output_directory_in_one_line(tmp_path, capsys):
    """A run directory holding only a `flowalign eval` summary (no eval/) crashed with IndexError."""
    d = tmp_path / "r"
    d.mkdir()
    (d / "config.yaml").write_text("train: {}\n")
    (d / "summary.json").write_text(json.dumps({"overall": {"shapes_strict": 0.4}}))
    _fails(capsys, ["compare", str(d), "--out", str(tmp_path / "out")], str(d))
    assert not (tmp_path / "out").exists()


def test_bench_credit_does_not_swap_a_wrong_shapes_path_for_a_random_model(capsys, tmp_path):
    """A typo in --shapes-path silently benchmarked a RANDOM-INIT model (exit 0); the fallback is for the
    shipped model only."""
    bad = tmp_path / "nope"
    out = tmp_path / "b.json"
    _fails(capsys, ["bench", "credit", "--models", "shapes", "--methods", "flow_grpo", "--steps", "2", "--group-size",
                    "2", "--rank-groups", "0", "--shapes-path", str(bad), "--json", str(out)], str(bad))
    assert not out.exists()
