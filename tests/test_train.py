"""The GRPO recipe end to end on the shipped shapes model (small settings), exact resume, NaN guard, bad input."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowalign import config as C
from flowalign.errors import UserError
from flowalign.models.lora import WEIGHT_NAME

ROOT = Path(__file__).resolve().parents[1]

SMALL = [
    "train.iterations=3", "train.groups_per_iter=2", "train.group_size=4", "train.micro_batch=8",
    "train.checkpoint_every=1", "train.keep_checkpoints=0", "sampler.steps=4", "eval.steps=4", "eval.max_prompts=2",
    "eval.seeds_per_prompt=1", "eval.grid_prompts=2", "output.tensorboard=false", "train.lr=1e-3",
    "train.ema_every=1", "eval.before=false", "eval.after=false", "train.optimizer_steps_per_iter=2",
]


def _cfg(tmp, *extra):
    return C.load_config(str(ROOT / "configs" / "shapes_grpo.yaml"), [*SMALL, f"output.run_dir={tmp}", *extra])


def _lora(run: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step-{step}" / "raw" / WEIGHT_NAME))


def test_train_end_to_end_writes_everything(tmp_path):
    from flowalign.train import train

    run = train(_cfg(tmp_path / "run", "train.iterations=2", "eval.before=true", "eval.after=true",
                     "output.tensorboard=true"))
    for f in ("config.yaml", "metrics.jsonl", "report.html", "eval/base/summary.json", "eval/final/summary.json",
              "grids/base.png", "grids/final.png", f"checkpoints/step-2/{WEIGHT_NAME}", "checkpoints/step-2/state.pt"):
        assert (run / f).exists(), f
    for tag in ("base", "final"):  # the before/after grids are the evaluations' own scored images
        assert (run / "grids" / f"{tag}.png").read_bytes() == (run / "eval" / tag / "grids" / "eval.png").read_bytes()
    assert list((run / "tb").glob("events.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()  # the base and final evaluations reach TensorBoard too (they were only in metrics.jsonl)
    assert [e.step for e in ea.Scalars("eval/overall/shapes_strict")] == [0, 2]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["iteration"] == 0 and "eval/overall/shapes_strict" in lines[0]
    assert lines[1]["iteration"] == 1 and "reward/shapes_partial" in lines[1] and lines[1]["nfe/sampling"] > 0
    assert "eval/overall/shapes_strict" in lines[-1]
    # every evaluation's forwards in its own record: the base's from the first, the final's in the last
    assert lines[1]["nfe/other"] == 2 * 4  # the base evaluation: 2 prompts x 1 seed x 4 steps
    assert lines[-1]["nfe/other"] == 2 * lines[1]["nfe/other"] and lines[-1]["nfe/sampling"] == lines[-2]["nfe/sampling"]
    assert "train/kl" not in lines[1]  # beta_kl = 0: no KL is computed, so none is logged (was a flat 0.0)
    # the resolved config round-trips
    assert C.load_config(str(run / "config.yaml")) == C.load_config(str(run / "config.yaml"))
    # LoRA actually moved
    sd = _lora(run, 2)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in sd.items())
    # each evaluation records which weights it scored: the base without a LoRA, the final one with this run's
    base, final = (json.loads((run / "eval" / t / "summary.json").read_text())["settings"] for t in ("base", "final"))
    assert "lora" not in base and "lora_ema" not in base
    assert final["trained_iterations"] == 2 and final["lora_ema"] is False and final["lora"] == "run after 2 iterations"
    assert base["benchmark"]["name"] == final["benchmark"]["name"] == "shapes-bench"  # a 2-prompt subset: an override
    assert not final["benchmark"]["benchmark"] and "prompts" in final["benchmark"]["overrides"]


def test_an_ema_that_would_never_update_is_warned_about(tmp_path, caplog):
    """train.ema_every=8 with 2 optimizer steps: the EMA (evaluated, saved) would stay the initial, zero adapter
    without a word; it is now one warning naming the settings (none when the EMA updates)."""
    import logging

    from flowalign.train import train

    with caplog.at_level(logging.WARNING, logger="flowalign.train"):
        train(_cfg(tmp_path / "a", "train.iterations=1", "train.ema=true", "train.ema_every=8"))
    assert "train.ema_every=8 optimizer steps, and this run takes 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flowalign.train"):
        train(_cfg(tmp_path / "b", "train.iterations=1", "train.ema=true", "train.ema_every=2"))
    assert "ema_every" not in caplog.text


@pytest.mark.parametrize("sampler", [[], ["sampler.kernel=cps", "sampler.logp_form=cps_mse", "train.clip_range=1e-5"]],
                         ids=["flow_sde", "cps_mse"])
def test_first_update_is_on_policy(tmp_path, monkeypatch, sampler):
    """ρ ≡ 1 on the first micro-batches: same kernel, η, sigmas, CFG and log-prob form as the rollout (METHODS.md §3.8)."""
    from flowalign.samplers import loop
    from flowalign.train import train

    forms = []
    real = loop.gaussian_log_prob

    def spy(*args, **kwargs):
        forms.append(kwargs.get("form", "exact"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "gaussian_log_prob", spy)  # the rollout and the re-scoring both go through loop
    run = train(_cfg(tmp_path / "run", "train.iterations=1", "train.micro_batch=1000",
                     "train.filter_zero_std=false", "train.shuffle_transitions=false",
                     "train.optimizer_steps_per_iter=1", *sampler))
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(m["train/ratio_mean"] - 1) < 1e-5 and m["train/clipfrac_high"] == 0 and m["train/clipfrac_low"] == 0
    assert m["train/approx_kl"] < 1e-10
    assert len(forms) > 1 and set(forms) == {"cps_mse" if sampler else "exact"}


def test_inf_reward_never_reaches_the_weights(tmp_path, monkeypatch):
    """A ±inf reward is a broken reward: the whole update is skipped, warned and counted."""
    from flowalign import rewards as R
    from flowalign.train import train

    monkeypatch.setitem(R.REWARDS, "inf_test", "tests.reward_fixtures:InfEverySecondCall")
    sys.path.insert(0, str(ROOT))
    run = train(_cfg(tmp_path / "run", "train.iterations=2", "reward.weights={inf_test: 1.0}"))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["train/skipped_updates"] == 2 and lines[1]["train/skipped_updates"] == 0
    assert lines[0]["train/nonfinite_inputs"] == 1 and lines[1]["train/nonfinite_inputs"] == 0
    sd1, sd2 = _lora(run, 1), _lora(run, 2)
    assert all(v.abs().sum() == 0 for k, v in sd1.items() if "lora_B" in k)  # step 1 skipped: B still 0
    assert any(v.abs().sum() > 0 for k, v in sd2.items() if "lora_B" in k)


def test_a_nan_reward_is_masked_not_a_reason_to_skip_the_update(tmp_path, monkeypatch):
    """NaN = "not applicable" (REWARDS_AND_EVAL §1): that rollout gets A = 0 and leaves the loss, the others train."""
    from flowalign import rewards as R
    from flowalign.train import train

    monkeypatch.setitem(R.REWARDS, "nan_first", "tests.reward_fixtures:NaNForFirstSample")
    sys.path.insert(0, str(ROOT))
    run = train(_cfg(tmp_path / "run", "train.iterations=1", "reward.weights={nan_first: 1.0}"))
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert m["train/skipped_updates"] == 0 and m["train/nonfinite_inputs"] == 0 and m["reward/nan_rows"] == 1
    assert m["train/kept_fraction"] <= 7 / 8  # 2 groups x 4: the NaN rollout is filtered out of the update
    assert any(v.abs().sum() > 0 for k, v in _lora(run, 1).items() if "lora_B" in k)


def test_probe_batches_are_bounded_by_the_credit_config(tmp_path, monkeypatch):
    """credit.probe_max_batch / probe_score_batch reach the probe engine: dense credit's probes run in forwards of at
    most that many rows and decode + score at most that many endpoints per call (before, all at once)."""
    import flowalign.train as T

    rows, scored, real = [], [], T.make_probe

    def spy(velocity, traj, score, **kw):
        def v(x, sigma, cond):
            rows.append(x.shape[0])
            return velocity(x, sigma, cond)

        def s(latents, idx):
            scored.append(latents.shape[0])
            return score(latents, idx)
        return real(v, traj, s, **kw)

    monkeypatch.setattr(T, "make_probe", spy)
    T.train(_cfg(tmp_path / "run", "train.iterations=1", "credit.name=dense_gain",
                 "credit.probe_max_batch=5", "credit.probe_score_batch=3"))
    assert rows and max(rows) <= 5 and scored and max(scored) <= 3
    assert sum(rows) > 5  # the probes needed more than one forward's worth of rows


def _run_cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flowalign.cli", *args], capture_output=True, text=True, env=env,
                          cwd=kw.get("cwd", ROOT), timeout=kw.get("timeout", 300))


def test_exact_resume_after_sigkill(tmp_path):
    """Kill a run with SIGKILL after a checkpoint, resume it: LoRA bitwise equal to an uninterrupted run."""
    base = [str(ROOT / "configs" / "shapes_grpo.yaml"), *SMALL, "train.iterations=3"]
    full = _run_cli([*(["train"] + base), f"output.run_dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flowalign.cli", "train", *base, f"output.run_dir={tmp_path / 'cut'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    marker = tmp_path / "cut" / "checkpoints" / "step-1" / "COMPLETE"
    t0 = time.time()
    while not marker.exists() and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    resumed = _run_cli(["train", *base, f"output.run_dir={tmp_path / 'cut'}", "output.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _lora(tmp_path / "full", 3), _lora(tmp_path / "cut", 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)


BAD = {
    "malformed_yaml": ("model: [unclosed\n", [], "yaml"),
    "unknown_key": ("train:\n  lrr: 0.1\n", [], "lr"),
    "wrong_type": ("train:\n  iterations: many\n", [], "iterations"),
    "missing_model": ("model:\n  path: /nonexistent/model\n", [], "/nonexistent/model"),
    "empty_prompts": ("data:\n  train_prompts: {empty}\n", [], "empty"),
    "bad_prompt": ("data:\n  train_prompts: {badp}\n", [], "pink"),
    "bad_lora_target": ("model:\n  lora_targets: [to_q, ff.net.9]\n", [], "ff.net.9"),
    "guide_flat_reward": ("sampler:\n  guide: reward_grad\n", [], "differentiable"),  # shapes_partial has no gradient
    "nft_dense_credit": ("train:\n  objective: nft\ncredit:\n  name: dense_gain\n", [], "credit.name=outcome"),
    "duplicate_key": ("train:\n  lr: 1.0e-4\n  lr: 2.0e-4\n", [], "duplicate key 'lr'"),
    "grpo_without_noise": ("", ["sampler.kernel=euler"], "GRPO would train no step"),  # was a warning, then 0 updates
    # registry names and options the schema cannot check: refused before anything is written
    "unknown_credit": ("", ["credit.name=outcom"], "did you mean 'outcome'"),
    "credit_option": ("", ["credit.options.foo=1"], "unknown option(s) ['foo']"),
    "probe_mode": ("", ["credit.name=dense_gain", "credit.options.probe=bogus"], "unknown probe mode 'bogus'"),
    "plan_option": ("", ["sampler.plan_options.foo=1"], "sampler.plan_options"),
    "model_kwargs": ("", ["model.kwargs.foo=1"], "model.kwargs"),
    "bad_device": ("", ["model.device=cpux"], "model.device"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    text, extra, needle = BAD[case]
    (tmp_path / "empty.txt").write_text("\n# nothing here\n")
    (tmp_path / "badp.txt").write_text("a red circle\na pink circle\n")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"base: {ROOT / 'configs' / 'shapes_grpo.yaml'}\n" +
                   text.format(empty=tmp_path / "empty.txt", badp=tmp_path / "badp.txt"))
    run = tmp_path / "run"
    r = _run_cli(["train", str(cfg), *SMALL, f"output.run_dir={run}", *extra])
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    err = [ln for ln in r.stderr.strip().splitlines() if "error" in ln.lower()]
    assert len(err) == 1 and err[0].startswith("flowalign train: error:"), r.stderr
    assert needle.lower() in err[0].lower() and r.stderr.strip().splitlines()[-1] == err[0], r.stderr
    assert not run.exists() or not any(run.iterdir())


def test_overwrite_with_a_bad_setting_keeps_the_earlier_run(tmp_path):
    """output.overwrite=true deletes the old run only once every setting is known to be valid."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    (run / "keep.txt").write_text("precious")
    r = _run_cli(["train", str(ROOT / "configs" / "shapes_grpo.yaml"), *SMALL, f"output.run_dir={run}",
                  "output.overwrite=true", "credit.name=outcom"])
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("flowalign train: error: credit.name")
    assert (run / "keep.txt").read_text() == "precious" and (run / "checkpoints" / "step-1").is_dir()


@pytest.mark.parametrize("case", ["foreign_file", "no_config", "working_dir"])
def test_overwrite_deletes_only_an_earlier_training_run(tmp_path, monkeypatch, case):
    """output.overwrite=true used to rmtree any directory: a project folder with its data, or `.` itself."""
    from flowalign.errors import UserError
    from flowalign.train import _check_run_dir

    run = tmp_path / "proj"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    if case != "no_config":
        (run / "config.yaml").write_text("{}\n")
    if case == "foreign_file":
        (run / "notes.txt").write_text("precious")
    if case == "working_dir":
        monkeypatch.chdir(run / "checkpoints")  # the run directory is above the working directory
    with pytest.raises(UserError) as e:
        _check_run_dir(_cfg(run, "output.overwrite=true"))
    assert "\n" not in str(e.value) and "output.overwrite" in str(e.value)
    assert (run / "metrics.jsonl").exists() and (case != "foreign_file" or (run / "notes.txt").exists())


def test_overwrite_replaces_an_earlier_run(tmp_path):
    from flowalign.train import _check_run_dir

    run = tmp_path / "run"
    for name in ("checkpoints", "eval", "grids", "plots", "tb"):
        (run / name).mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "report.html"):
        (run / name).write_text("x")
    assert _check_run_dir(_cfg(run, "output.overwrite=true")) == (run, None)


def test_describe_shows_a_configs_values_and_validates_its_overrides(capsys):
    from flowalign.cli import main

    assert main(["train", "--describe", str(ROOT / "configs" / "shapes_grpo.yaml"), "train.iterations=7"]) == 0
    out = capsys.readouterr().out
    assert "  iterations: 7  # (int)" in out and "  lr: 0.001  # (float)" in out  # the config's lr, not 3e-4
    assert main(["train", "--describe", "train.iterations=7"]) == 0  # overrides alone: on the defaults
    assert "  iterations: 7  # (int)" in capsys.readouterr().out
    assert main(["train", "--describe", "train.itrations=7"]) == 2
    assert "did you mean 'train.iterations'" in capsys.readouterr().err


def test_resume_refuses_changed_settings_and_tolerates_a_cut_metrics_line(tmp_path):
    from flowalign.errors import UserError
    from flowalign.train import train

    run = tmp_path / "run"
    train(_cfg(run, "train.iterations=1"))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for bad, needle in (("train.group_size=8", "train.group_size (4 → 8)"), ("model.lora_rank=4", "model.lora_rank"),
                        ("sampler.steps=5", "sampler.steps")):
        with pytest.raises(UserError, match="changed settings") as e:
            train(_cfg(run, "train.iterations=2", "output.resume=true", bad))
        assert needle in str(e.value)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 2, "cut')  # a line cut short by a kill
    train(_cfg(run, "train.iterations=2", "output.resume=true", "eval.max_prompts=1"))  # allowed changes
    its = [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert its == [1, 2]


def test_resume_without_a_checkpoint_starts_fresh_logs(tmp_path):
    from flowalign.train import train

    run = tmp_path / "run"
    run.mkdir()
    C.dump_yaml(_cfg(run), run / "config.yaml")  # a run killed before its first checkpoint: config and some metrics
    (run / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "stale": 1}) + "\n" for i in (1, 2, 3)))
    (run / "train.log").write_text("the user's own log of the run (| tee)\n")  # kept, and no reason to refuse
    train(_cfg(run, "train.iterations=1", "output.resume=true"))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1] and "stale" not in lines[0]
    assert (run / "train.log").read_text().startswith("the user's own log")


@pytest.mark.parametrize("held", [["notes.txt"], ["metrics.jsonl", "report.html"]], ids=["foreign", "no-config"])
def test_resume_without_a_checkpoint_touches_only_a_training_run(tmp_path, held):
    """A fresh start under output.resume=true replaces metrics.jsonl, tb/ and report.html: in a directory that is not
    a training run (another command's output, the user's files) it deleted them; now it is refused in one line."""
    run = tmp_path / "d"
    run.mkdir()
    for name in held:
        (run / name).write_text("mine\n")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    res = _run_cli(["train", str(ROOT / "configs" / "shapes_grpo.yaml"), *SMALL, f"output.run_dir={run}",
                    "output.resume=true"])
    assert res.returncode == 2 and "holds no checkpoint and is not a training run" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize("flag", ["output.resume=true", "output.overwrite=true"])
def test_a_pretraining_run_as_run_dir_is_named_for_what_it_is(tmp_path, flag):
    """`output.run_dir=<a flowalign pretrain run> output.resume=true` failed with "its config.yaml is unreadable
    ('model' is a section and needs a mapping, got 'shapes')"; now the line says what the directory holds and how to
    fine-tune its model instead, and nothing in it changes."""
    import dataclasses

    import yaml

    from flowalign.errors import UserError
    from flowalign.pretrain import PretrainConfig
    from flowalign.train import train

    run = tmp_path / "pre"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(PretrainConfig())))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5, "lr": 0.001, "seconds": 1.0}\n')
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError) as e:
        train(_cfg(run, flag))
    assert str(e.value) == (f"output.run_dir={str(run)!r} holds a pretraining run (flowalign pretrain), not a training "
                            f"run; choose another output.run_dir; to fine-tune its model, set "
                            f"model.path={str(run / 'final')!r}")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_home_relative_run_dir_is_the_users_home(tmp_path, monkeypatch):
    """`output.run_dir=~/x` reaches the program unexpanded (the shell expands ~ only at a word's start): it made a
    directory named '~' in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = _cfg("~/runs/x", "model.path=~/weights")
    assert cfg.output.run_dir == str(tmp_path / "runs" / "x") and cfg.model.path == str(tmp_path / "weights")


def test_existing_run_is_not_overwritten_and_corrupted_checkpoint_fails(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    (run / "keep.txt").write_text("precious")
    r = _run_cli(["train", str(ROOT / "configs" / "shapes_grpo.yaml"), *SMALL, f"output.run_dir={run}"])
    assert r.returncode == 2 and "already exists" in r.stderr and (run / "keep.txt").read_text() == "precious"
    (run / "checkpoints" / "step-1" / "state.pt").write_bytes(b"garbage")
    (run / "checkpoints" / "step-1" / "COMPLETE").write_text("1")
    r = _run_cli(["train", str(ROOT / "configs" / "shapes_grpo.yaml"), *SMALL, f"output.run_dir={run}",
                  "output.resume=true"])
    assert r.returncode == 2 and "corrupted checkpoint" in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("flowalign train: error: cannot resume")
    assert (run / "keep.txt").read_text() == "precious"


def test_initial_noise_per_member_or_shared_per_group():
    from flowalign.models import load_model
    from flowalign.train import initial_noise

    model = load_model("shapes", "")
    per_member = initial_noise(model, 42, 3, [0, 1], 4, "member")  # [8, 3, 32, 32]
    shared = initial_noise(model, 42, 3, [0, 1], 4, "group")
    assert per_member.shape == shared.shape == (8, *model.latent_shape)
    assert all(not torch.equal(per_member[0], per_member[i]) for i in range(1, 8))
    for g in range(2):  # one draw per group, equal to that group's member-0 draw; groups differ
        assert all(torch.equal(shared[4 * g], shared[4 * g + m]) for m in range(4))
        assert torch.equal(shared[4 * g], per_member[4 * g])
    assert not torch.equal(shared[0], shared[4])
    assert torch.equal(initial_noise(model, 42, 3, [1], 4, "group"), shared[4:])  # rank sharding keeps the rows
    with pytest.raises(C.UserError, match="init_noise=group with sampler.plan=branch .* every seed of a group identical"):
        C.load_config(str(ROOT / "configs" / "shapes_grpo.yaml"), ["sampler.init_noise=group", "sampler.plan=branch"])


def test_lora_targets_from_config_train_save_and_load_back(tmp_path):
    from flowalign.models import load_model
    from flowalign.train import train

    targets = "model.lora_targets=[to_q, to_v, ff.net.0.proj, proj_out]"
    run = train(_cfg(tmp_path / "run", "train.iterations=1", targets))
    sd = _lora(run, 1)
    assert any(".ff.net.0.proj.lora_B" in k for k in sd) and any(k.startswith("proj_out.lora_") or ".proj_out.lora_" in k for k in sd)
    assert not any(".to_k.lora_" in k for k in sd)
    fresh = load_model("shapes", "")
    fresh.load_lora(run / "checkpoints" / "step-1" / "raw")  # the stored config re-creates the same targets
    assert {f"transformer.{k}" for k in fresh.lora_state_dict()} == {k if k.startswith("transformer.") else f"transformer.{k}" for k in sd}


@pytest.mark.parametrize("rank_alpha, want", [(("model.lora_rank=4", "model.lora_alpha=0"), 8.0),
                                              (("model.lora_rank=4", "model.lora_alpha=0.5"), 0.5)])
def test_lora_alpha_zero_means_twice_the_rank_and_fractions_are_kept(tmp_path, rank_alpha, want):
    from flowalign.models.lora import read_lora
    from flowalign.train import train

    run = train(_cfg(tmp_path / "run", "train.iterations=1", *rank_alpha))
    _, meta = read_lora(run / "checkpoints" / "step-1")
    assert int(meta["r"]) == 4 and float(meta["lora_alpha"]) == want


# -------------------- periodic and final evaluation, TensorBoard on resume, SDE windows, settings, run directories


def _one_step_cfg(run, *extra):
    """test_train_update's small shapes run, with one optimizer step per iteration."""
    from test_train_update import _cfg as small

    return small(run, "train.optimizer_steps_per_iter=1", *extra)


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_periodic_eval_runs_at_the_last_iteration_when_the_final_eval_is_off(tmp_path):
    """eval.every=1 with eval.after=false: the last iteration was skipped (it is left to the final eval, which is
    off), so the run's last weights were never evaluated."""
    from flowalign.train import train

    run = train(_one_step_cfg(tmp_path / "run", "eval.every=1"))
    lines = _lines(run)
    assert [m["iteration"] for m in lines] == [1, 2]
    assert all("eval/overall/shapes_strict" in m for m in lines)
    assert (run / "eval" / "step-2" / "summary.json").exists()


def test_tensorboard_drops_the_events_a_killed_run_logged_after_its_checkpoint(tmp_path):
    """metrics.jsonl is cut back to the checkpoint on resume; TensorBoard showed the re-run iteration twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flowalign.train import train

    args = ("train.iterations=3", "train.checkpoint_every=2", "output.tensorboard=true")
    run = train(_one_step_cfg(tmp_path / "run", *args))
    shutil.rmtree(run / "checkpoints" / "step-3")  # as if killed after logging iteration 3, before its checkpoint
    train(_one_step_cfg(tmp_path / "run", *args, "output.resume=true"))
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("reward/shapes_partial")] == [1, 2, 3]
    assert [m["iteration"] for m in _lines(run)] == [1, 2, 3]


def test_elapsed_time_goes_on_across_a_resume(tmp_path):
    """time/elapsed_s restarted at 0 in a resumed session, so plots/time.png ran backwards; it now adds the time
    the run had spent up to its checkpoint (the sessions' time as compare.run_wall_s sums it), and the run's wall
    time read by `flowalign compare` is the last line's."""
    from flowalign.compare import run_wall_s
    from flowalign.train import train

    args = ("train.iterations=2", "train.checkpoint_every=1")
    run = train(_one_step_cfg(tmp_path / "run", *args))
    shutil.rmtree(run / "checkpoints" / "step-2")  # as if killed after logging iteration 2, before its checkpoint
    lines = _lines(run)
    lines[0]["time/elapsed_s"] = 1000.0  # the first session had spent 1000 s up to the checkpoint
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    train(_one_step_cfg(tmp_path / "run", *args, "output.resume=true"))
    lines = _lines(run)
    assert [m["iteration"] for m in lines] == [1, 2]
    assert lines[0]["time/elapsed_s"] == 1000.0
    assert 1000.0 < lines[1]["time/elapsed_s"] < 1000.0 + 600  # goes on from the checkpoint's time
    assert run_wall_s(lines) == lines[1]["time/elapsed_s"]


def test_run_wall_s_sums_the_sessions_of_runs_that_restarted_their_clock():
    """Runs of earlier versions restarted time/elapsed_s at 0 in each session: a drop starts a new session whose time
    is added; a cumulative clock is read as is; lines without an integer iteration or a number are ignored."""
    from flowalign.compare import run_wall_s

    restarted = [{"iteration": 1, "time/elapsed_s": 50.0}, {"iteration": 2, "time/elapsed_s": 100.0},
                 {"iteration": 3, "time/elapsed_s": 30.0}, {"iteration": 4, "time/elapsed_s": 60.0}]
    assert run_wall_s(restarted) == 160.0
    cumulative = [{"iteration": 1, "time/elapsed_s": 50.0}, {"iteration": 2, "time/elapsed_s": 100.0},
                  {"iteration": 3, "time/elapsed_s": 130.0}]
    assert run_wall_s(cumulative) == 130.0
    assert run_wall_s([{"time/elapsed_s": 5.0}, {"iteration": 1, "time/elapsed_s": True}, {"iteration": 1}]) == 0.0


def test_an_sde_window_trains_its_steps_whatever_train_fraction_says(tmp_path):
    """shapes_grpo.yaml has train_fraction 0.6: with sampler.steps=4 only steps 0, 1 passed the 'first' mask, so a
    window at step 2 trained nothing although the summary (and derived) promised window_size steps per rollout."""
    from flowalign.train import train

    cfg = _one_step_cfg(tmp_path / "run", "train.iterations=1", "train.filter_zero_std=false", "sampler.window_size=1",
               "sampler.window_range=[2, 3]")
    assert C.derived(cfg)["transitions_per_iter"] == 8
    run = train(cfg)
    assert _lines(run)[0]["train/transitions"] == 8


@pytest.mark.parametrize("override,needle", [
    ("train.lr=inf", "train.lr=inf must be a finite number"),
    ("train.weight_decay=.inf", "train.weight_decay"),
    ("train.betas=[0.9, .nan]", "train.betas"),
    ("model.guidance=.inf", "model.guidance"),
    ("eval.guidance=-1", "eval.guidance"),
    ("train.max_grad_norm=.nan", "train.max_grad_norm"),
    ("sampler.window_range=[0, 5]", "sampler.window_size"),
])
def test_config_refuses_settings_that_break_the_weights_or_do_nothing(override, needle):
    with pytest.raises(UserError) as e:
        C.load_config(None, [override])
    assert needle in str(e.value)


def test_inf_still_means_no_limit_for_the_clips():
    cfg = C.load_config(None, ["train.max_grad_norm=.inf", "credit.adv_clip=.inf", "train.clip_range=.inf"])
    assert cfg.train.max_grad_norm == float("inf")


def test_grid_prompts_zero_means_no_grid(tmp_path):
    """eval.grid_prompts=0 passed validation, then the base eval crashed with a torch.cat traceback (after writing)."""
    from flowalign.train import train

    run = train(_one_step_cfg(tmp_path / "run", "train.iterations=1", "eval.before=true", "eval.grid_prompts=0"))
    assert (run / "eval" / "base" / "summary.json").exists() and not list((run / "grids").glob("*.png"))


def test_zero_iterations_evaluates_the_base_once(tmp_path):
    """train.iterations=0 (evaluate the base only) evaluated the base twice, as eval/base and eval/final, and the
    report showed 'base vs aligned' with a change of 0; now eval/base is the run's only evaluation."""
    from flowalign.train import train

    run = train(_one_step_cfg(tmp_path / "run", "train.iterations=0", "eval.before=true", "eval.after=true",
                              "eval.grid_prompts=0"))
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["base"]
    assert (run / "report.html").is_file()


def test_resume_with_fewer_iterations_than_the_checkpoint_is_refused_before_writing(tmp_path):
    """It ran nothing and logged the checkpoint's weights as the final eval of an earlier iteration."""
    from flowalign.train import train

    run = train(_one_step_cfg(tmp_path / "run", "train.iterations=1"))
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match="train.iterations >= 1"):
        train(_one_step_cfg(tmp_path / "run", "train.iterations=0", "eval.after=true", "output.resume=true"))
    assert (run / "metrics.jsonl").read_text() == before  # refused before anything was written


def test_resuming_a_finished_run_does_not_duplicate_its_final_eval(tmp_path):
    """A run killed in (or after) its final eval repeats it on resume: the earlier final-eval line was kept too."""
    from flowalign.train import train

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = ("output.tensorboard=true",)
    run = train(_one_step_cfg(tmp_path / "run", "train.iterations=1", "eval.after=true", *tb))
    train(_one_step_cfg(tmp_path / "run", "train.iterations=1", "eval.after=true", "output.resume=true", *tb))
    assert [m["iteration"] for m in _lines(run) if "eval/overall/shapes_strict" in m] == [1]
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()  # TensorBoard too: the repeated final eval replaces the earlier one, the iteration's scalars stay
    assert [e.step for e in ea.Scalars("eval/overall/shapes_strict")] == [1]
    assert [e.step for e in ea.Scalars("reward/shapes_partial")] == [1]

    train(_one_step_cfg(tmp_path / "run", "train.iterations=2", "eval.after=true", "output.resume=true"))  # a longer run
    lines = _lines(run)
    assert [m["iteration"] for m in lines if "eval/overall/shapes_strict" in m] == [1, 2]  # the eval at 1 stays
    assert [m["iteration"] for m in lines if "train/lr" in m] == [1, 2]


def test_each_rank_takes_its_own_gpu_under_a_multi_process_launch(monkeypatch):
    from flowalign.dist import process_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # what accelerate set for local rank 3
    assert process_device("cuda:1", 4) == torch.device("cuda", 3)
    assert process_device("cuda", 4) == torch.device("cuda", 3)
    assert process_device("cuda:1", 1) == torch.device("cuda", 1)
    assert process_device("cpu", 4) == torch.device("cpu")


@pytest.mark.parametrize("where", ["file", "under_file"])
@pytest.mark.parametrize("extra", [[], ["output.overwrite=true"], ["output.resume=true"]])
def test_a_run_dir_that_is_or_is_under_a_file_is_one_line_exit_2(tmp_path, capsys, where, extra):
    """It was a NotADirectoryError traceback (iterdir, rmtree or mkdir), after the model had loaded."""
    from flowalign.cli import main

    f = tmp_path / "afile"
    f.write_text("keep me")
    run = f if where == "file" else f / "run"
    code = main(["train", str(ROOT / "configs" / "shapes_grpo.yaml"), f"output.run_dir={run}", *extra])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("flowalign train: error: output.run_dir"), err
    assert f.read_text() == "keep me"


def test_a_reward_that_trains_and_evaluates_is_built_once(tmp_path, monkeypatch):
    """eval_rewards built every training reward a second time: two PickScore/HPS towers in memory, twice the load."""
    import collections

    import flowalign.train as T
    from flowalign.train import train

    built = collections.Counter()
    real = T.build_reward_checked

    def counting(name, *a, **k):
        built[name] += 1
        return real(name, *a, **k)

    monkeypatch.setattr(T, "build_reward_checked", counting)
    train(_cfg(tmp_path / "run", "train.iterations=1", "reward.weights={saturation: 1.0}",
               "eval.rewards=[saturation, shapes_strict]"))
    assert dict(built) == {"saturation": 1, "shapes_strict": 1}


def test_a_rank_whose_rows_are_all_not_applicable_does_not_make_the_logged_reward_nan():
    """The logged reward is the mean over every rank's applicable rows: averaging per-rank nanmeans made it NaN when
    one rank held only NaN rows (and weighed ranks with fewer applicable rows as much as the others)."""
    from flowalign.train import _mean_over_ranks

    ranks = [torch.tensor([float("nan"), float("nan")]), torch.tensor([0.2, 0.4]), torch.tensor([1.0, float("nan")])]

    def fake_reduce(mine):  # all_reduce(SUM) / world over the three ranks' (sum, count) tallies
        tallies = [torch.tensor([float(v[v.isfinite()].sum()), float(v.isfinite().sum())], dtype=torch.float64)
                   for v in ranks]
        mine.copy_(sum(tallies) / len(tallies))
        return mine

    got = _mean_over_ranks(ranks[0], fake_reduce)  # rank 0 holds no applicable row
    assert got == pytest.approx((0.2 + 0.4 + 1.0) / 3)
    assert _mean_over_ranks(torch.tensor([0.5, float("nan")]), lambda t: t) == 0.5  # one process: the nanmean
    assert math.isnan(_mean_over_ranks(torch.tensor([float("nan")]), lambda t: t))
    # an inf reward is broken (its update is skipped), not "not applicable": it must show in the log
    assert _mean_over_ranks(torch.tensor([0.5, float("inf"), float("nan")]), lambda t: t) == float("inf")


def test_resume_drops_the_end_of_run_lines_of_its_checkpoint_iteration(tmp_path):
    """A resume that raises train.iterations kept the earlier session's weight-check line at the old last iteration,
    a stale mid-run line an uninterrupted run does not have; its final evaluation stays (a measurement of the weights
    at that iteration) unless the resume repeats it. Lines after the checkpoint go too."""
    from flowalign.train import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [{"iteration": 0, "eval/overall/shapes_strict": 0.4},
             {"iteration": 1, "train/loss": 0.1}, {"iteration": 2, "train/loss": 0.2, "eval/overall/x": 0.5},
             {"iteration": 2, "dist/world_size": 2, "dist/max_weight_diff": 0.0},
             {"iteration": 2, "eval/overall/shapes_strict": 0.5}, {"iteration": 3, "train/loss": 0.3}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    _truncate_metrics(path, 2)
    assert [json.loads(x) for x in path.read_text().splitlines()] == [*lines[:3], lines[4]]
    _truncate_metrics(path, 2, rerun_end=True)
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:3]


def test_resume_with_another_process_count_is_refused_under_per_rank_noise(tmp_path):
    """Every process draws its own SDE noise with sampler.step_noise=rank: a run resumed on another number of
    processes would silently differ from the uninterrupted one. step_noise=group does not depend on the count."""
    from flowalign.config import load_config
    from flowalign.errors import UserError
    from flowalign.train import CHECKPOINT_META, _check_resume_world

    ckpt = tmp_path / "step-4"
    ckpt.mkdir()
    (ckpt / CHECKPOINT_META).write_text(json.dumps({"iteration": 4, "world_size": 2}))
    rank_cfg = load_config(None, ["sampler.step_noise=rank"])
    with pytest.raises(UserError, match=r"2 process\(es\) wrote it and 1 run now"):
        _check_resume_world(rank_cfg, ckpt, 1)
    _check_resume_world(rank_cfg, ckpt, 2)  # the same count: fine
    _check_resume_world(load_config(None, ["sampler.step_noise=group"]), ckpt, 1)
    (ckpt / CHECKPOINT_META).unlink()
    _check_resume_world(rank_cfg, ckpt, 1)  # a checkpoint from before meta.json: not checked


# -------------------- unit properties of the recipe's pieces: EMA


def test_ema_updates_at_every_nth_optimizer_step_with_the_warmup_decay():
    """METHODS §3.7 (Q4): the EMA moves at optimizer steps n with (n + 1) % every == 0, i.e. after the every-th step,
    not at step 0, with d_n = min((1 + n)/(10 + n), d_max): shadow ← d_n·shadow + (1 − d_n)·θ_n."""
    from flowalign.train import EMA

    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))  # [2]
    ema = EMA([p], decay_max=0.45, every=3)
    expect, seen = torch.zeros(2, dtype=torch.float64), []
    for n in range(9):
        with torch.no_grad():
            p.copy_(torch.tensor([n + 1.0, -2.0 * (n + 1)], dtype=torch.float64))  # θ_n
        ema.update(n)
        if (n + 1) % 3 == 0:  # n = 2, 5, 8
            d = min((1 + n) / (10 + n), 0.45)
            expect = d * expect + (1 - d) * p.detach()
        seen.append(ema.shadow[0].clone())
        torch.testing.assert_close(ema.shadow[0], expect)
    assert torch.equal(seen[0], torch.zeros(2, dtype=torch.float64)) and torch.equal(seen[1], seen[0])
    # d_2 = 3/12, d_5 = 6/15 (warm-up), d_8 = min(9/18, 0.45) = 0.45 (the cap)
    assert seen[2][0].item() == pytest.approx(0.75 * 3.0)


def test_ema_applied_swaps_the_shadow_in_and_restores_the_live_weights():
    """``EMA.applied``: inside, the parameters hold the EMA weights (evaluation, the checkpoint's user LoRA); after it,
    and after an exception in it, the live weights are back bit for bit (training goes on from them)."""
    from flowalign.train import EMA

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))  # [2]
    ema = EMA([p], decay_max=0.9, every=1)
    ema.shadow[0].copy_(torch.tensor([5.0, 6.0]))
    live = p.detach().clone()
    with ema.applied():
        assert torch.equal(p.detach(), torch.tensor([5.0, 6.0]))
    assert torch.equal(p.detach(), live)
    with pytest.raises(RuntimeError):
        with ema.applied():
            raise RuntimeError("eval failed")
    assert torch.equal(p.detach(), live) and torch.equal(ema.shadow[0], torch.tensor([5.0, 6.0]))


# -------------------- unit properties of the recipe's pieces: trained steps


def test_first_trained_steps_are_the_first_floor_f_t_stochastic_steps_and_never_the_last():
    """sampler.train_steps=first (Flow-GRPO, METHODS §3.5): steps t < ⌊f·T⌋ with η_t > 0, capped at T − 1 so that the
    last step is never trained even at f = 1; per-row η [B, T] gives per-row masks."""
    from flowalign.train import TRAINED_STEPS

    first = TRAINED_STEPS["first"]
    eta = torch.full((6,), 0.5)  # [T] every step stochastic
    m = first(eta, 1.0, 2)  # [2, 6]
    assert m.shape == (2, 6) and torch.equal(m[0], torch.tensor([True] * 5 + [False])) and torch.equal(m[1], m[0])
    eta[1] = 0.0  # an ODE step inside the fraction is not trained
    assert torch.equal(first(eta, 0.5, 1)[0], torch.tensor([True, False, True, False, False, False]))  # ⌊0.5·6⌋ = 3
    rows = torch.tensor([[0.0, 0.3, 0.3, 0.3], [0.3, 0.3, 0.0, 0.0]])  # [2, 4] per-row windows
    torch.testing.assert_close(first(rows, 1.0, 2), torch.tensor([[False, True, True, False], [True, True, False, False]]))



def test_loss_scale_doubles_after_exactly_growth_interval_clean_steps_and_an_overflow_restarts_the_count():
    """``LossScale`` (float16): after ``growth_interval`` clean steps in a row the scale doubles (capped at 2^24); an
    overflow halves it (floored at 1) and restarts the count of clean steps."""
    from flowalign.train import LossScale

    ls = LossScale(enabled=True, init=4.0, growth_interval=3)
    scales = []
    for overflow in (False, False, False, False, False, True, False, False, False):
        ls.update(overflow)
        scales.append(ls.scale)
    # 3 clean → 8; 2 clean then the overflow → 4 (count restarts); 3 clean → 8
    assert scales == [4.0, 4.0, 8.0, 8.0, 8.0, 4.0, 4.0, 4.0, 8.0] and ls.good == 0
    low = LossScale(enabled=True, init=1.0)
    low.update(overflow=True)
    assert low.scale == 1.0
    top = LossScale(enabled=True, init=2.0 ** 24, growth_interval=1)
    top.update(overflow=False)
    assert top.scale == 2.0 ** 24

# -------------------- unit properties of the recipe's pieces: checkpoints


class _FileLora:
    """A model stand-in with one LoRA tensor: ``save_lora`` / ``load_lora`` write and read it in a directory."""

    def __init__(self, p: torch.nn.Parameter):
        self.p = p

    def velocity(self, x, sigma, cond):
        return x

    def save_lora(self, d):
        torch.save(self.p.detach().clone(), Path(d) / "w.pt")

    def load_lora(self, d):
        with torch.no_grad():
            self.p.copy_(torch.load(Path(d) / "w.pt"))


def _training_state(init: float):
    from flowalign import data as D
    from flowalign.train import EMA, LossScale
    from flowalign.values import NFECounter

    p = torch.nn.Parameter(torch.full((3,), init))  # [3]
    model = _FileLora(p)
    opt = torch.optim.AdamW([p], lr=0.1)
    return model, p, opt, EMA([p], 0.9, 1), D.PromptSampler(7, 2, seed=3), NFECounter(model), LossScale(True)


def test_a_checkpoint_restores_weights_optimizer_ema_data_position_counters_and_rng(tmp_path):
    """Exact resume (DESIGN §1 step 4): ``_load_checkpoint`` of what ``_save_checkpoint`` wrote restores the live LoRA
    (raw/), AdamW's moments, the EMA shadow, the prompt stream's position, the NFE tally, the fp16 loss scale, the
    torch RNG and the optimizer-step count; the user-facing LoRA at the top is the EMA's, the live weights unchanged."""
    from flowalign.train import _load_checkpoint, _save_checkpoint

    model, p, opt, ema, sampler, nfe, scale = _training_state(1.0)
    for k in range(2):  # AdamW state (step, exp_avg, exp_avg_sq) and EMA updates
        opt.zero_grad()
        (p * torch.tensor([1.0, -2.0, 3.0])).sum().backward()
        opt.step()
        ema.update(k)
    sampler.next_groups(), sampler.next_groups(), sampler.next_groups()  # 6 of 7 prompts: mid-epoch
    with nfe.phase("training"):
        model.velocity(torch.zeros(5, 1), None, None)  # 5 forwards
    scale.update(overflow=True), scale.update(overflow=False)  # scale 2^15, one clean step
    torch.manual_seed(11)
    live, shadow = p.detach().clone(), ema.shadow[0].clone()
    rng = torch.get_rng_state()
    ckpt = _save_checkpoint(tmp_path / "run", 4, model, opt, ema, sampler, nfe, 0, 7, scale)
    assert torch.equal(p.detach(), live)  # saving under the EMA leaves the live weights in place
    assert torch.equal(torch.load(ckpt / "w.pt"), shadow) and torch.equal(torch.load(ckpt / "raw" / "w.pt"), live)
    torch.set_rng_state(rng)
    want_draw, want_groups = torch.rand(4), sampler.next_groups()  # [4], what the uninterrupted run draws next

    model2, p2, opt2, ema2, sampler2, nfe2, scale2 = _training_state(0.0)
    torch.manual_seed(999)
    assert _load_checkpoint(ckpt, model2, opt2, ema2, sampler2, nfe2, scale2) == (4, 7)
    assert torch.equal(torch.rand(4), want_draw)
    assert torch.equal(p2.detach(), live) and torch.equal(ema2.shadow[0], shadow)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert float(s1["step"]) == float(s2["step"]) == 2
    assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
    assert sampler2.next_groups() == want_groups and nfe2.totals() == {"training": 5}
    assert scale2.state_dict() == {"scale": 2.0 ** 15, "good": 1}


def test_checkpoints_keep_the_newest_by_step_number(tmp_path):
    """``train.keep_checkpoints=k`` keeps the k newest checkpoints (0: all), and resume picks the highest step
    number, numerically (step-10 after step-9, not before it as in name order)."""
    from flowalign.train import _latest_checkpoint, _save_checkpoint

    model, p, opt, ema, sampler, nfe, scale = _training_state(1.0)
    run = tmp_path / "run"
    for step in (8, 9, 10):
        _save_checkpoint(run, step, model, opt, ema, sampler, nfe, 0)
    assert _latest_checkpoint(run) == run / "checkpoints" / "step-10"
    _save_checkpoint(run, 11, model, opt, ema, sampler, nfe, 2)
    assert sorted(q.name for q in (run / "checkpoints").iterdir()) == ["step-10", "step-11"]
    assert _latest_checkpoint(run) == run / "checkpoints" / "step-11"


def test_each_iteration_shuffles_its_transitions_anew_and_a_resumed_run_draws_the_same_order():
    """``transition_order``: with ``train.shuffle_transitions`` a permutation of the iteration's pairs that changes
    with the iteration (not one order reused every iteration) and depends on (seed, iteration) alone, so a resumed
    run replays it; without, 0 … total−1."""
    from flowalign.train import transition_order

    orders = [transition_order(42, it, 64, True) for it in range(4)]  # [64] each
    for o in orders:
        assert torch.equal(o.sort().values, torch.arange(64))
    assert all(not torch.equal(orders[i], orders[j]) for i in range(4) for j in range(i + 1, 4))
    torch.manual_seed(0)  # the global RNG plays no part
    assert torch.equal(transition_order(42, 2, 64, True), orders[2])
    assert not torch.equal(transition_order(43, 2, 64, True), orders[2])
    assert torch.equal(transition_order(42, 2, 64, False), torch.arange(64))


def test_a_single_inf_reward_row_skips_the_update_and_a_nan_row_does_not():
    """``nonfinite_inputs``: one ±inf reward in one row is a broken reward and skips the update, although outcome
    credit gives that row a finite advantage of 0 (so the advantages alone would not show it); a NaN reward is "not
    applicable" and does not; a non-finite advantage in any head does."""
    from flowalign.credit import group_normalize
    from flowalign.train import nonfinite_inputs

    group = torch.tensor([0, 0, 0, 1, 1, 1])
    good = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.4, 0.6])  # [B]
    for bad in (float("inf"), float("-inf")):
        r = good.clone()
        r[4] = bad
        adv = group_normalize(r, group)  # [B]
        assert torch.isfinite(adv).all() and float(adv[4]) == 0.0  # credit hides the broken row
        assert nonfinite_inputs({"main": adv[:, None]}, {"shapes_partial": r, "other": good})
    r = good.clone()
    r[4] = float("nan")
    assert not nonfinite_inputs({"main": group_normalize(r, group)[:, None]}, {"shapes_partial": r})
    assert not nonfinite_inputs({"main": torch.zeros(6, 3)}, {"shapes_partial": good})
    adv2 = torch.zeros(6, 3)
    adv2[2, 1] = float("nan")
    assert nonfinite_inputs({"main": torch.zeros(6, 3), "process": adv2}, {"shapes_partial": good})


def test_evaluation_scores_the_ema_weights(tmp_path, monkeypatch):
    """With ``train.ema`` the evaluations run on the EMA weights: the LoRA in the model while the final evaluation
    samples is the checkpoint's top-level (EMA) LoRA, not its raw (live) one, and the live weights come back after."""
    from safetensors.torch import load_file

    from flowalign import train as T

    real, seen = T.run_eval, {}

    def spy(model, *args, **kw):
        seen[Path(args[2]).name] = model.save_lora(tmp_path / "at_eval")
        return real(model, *args, **kw)

    monkeypatch.setattr(T, "run_eval", spy)
    run = T.train(_cfg(tmp_path / "run", "train.iterations=1", "train.ema=true", "eval.after=true"))
    at_eval = load_file(str(seen["final"]))
    ema = load_file(str(run / "checkpoints" / "step-1" / WEIGHT_NAME))
    raw = load_file(str(run / "checkpoints" / "step-1" / "raw" / WEIGHT_NAME))
    assert at_eval.keys() == ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the EMA lags the live weights
    assert all(torch.equal(at_eval[k], ema[k]) for k in ema)


@pytest.mark.parametrize("case", ["foreign_dir", "run_with_notes", "plain_run"])
def test_a_non_empty_run_dir_is_refused_with_advice_that_works(tmp_path, case):
    """A directory holding only notes.txt got 'pass output.resume=true ... output.overwrite=true ...', and both were
    then refused; the advice now fits what the directory holds."""
    from flowalign.errors import UserError
    from flowalign.train import _check_run_dir

    run = tmp_path / "r"
    run.mkdir()
    if case != "plain_run":
        (run / "notes.txt").write_text("mine")
    if case != "foreign_dir":
        (run / "config.yaml").write_text("{}\n")
        (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError) as e:
        _check_run_dir(_cfg(run))
    line = str(e.value)
    if case == "foreign_dir":
        assert "holds no training run (it holds notes.txt)" in line and "output.resume" not in line
    elif case == "run_with_notes":
        assert "output.resume=true" in line and "output.overwrite" not in line and "notes.txt" in line
    else:
        assert "output.resume=true" in line and "output.overwrite=true" in line


def test_describe_is_taken_between_the_config_and_its_overrides(capsys):
    """`flowalign train CONFIG --describe OVERRIDES` failed ('unrecognized arguments: OVERRIDES'): argparse takes an
    option only before or after all the positionals."""
    from flowalign.cli import main

    assert main(["train", str(ROOT / "configs" / "shapes_grpo.yaml"), "--describe", "train.lr=3e-4"]) == 0
    assert "lr: 0.0003" in capsys.readouterr().out


def test_a_resume_takes_moved_weights_that_hold_the_same_files_and_refuses_other_ones(tmp_path, caplog):
    """Weights copied to node-local disk (or a reward checkpoint moved) changed model.path, and the resume was
    refused as a changed setting. The run now keeps a fingerprint of each local weights path (paths.json: names,
    sizes, first and last MiB): the same files at another path resume, with an INFO line, and end as an
    uninterrupted run; other weights at the new path (one byte changed) are still refused."""
    import logging

    from flowalign.models.shapes import ShapesModel, _asset_dir
    from flowalign.train import PATHS_FILE, train

    first = tmp_path / "w1"
    shutil.copytree(_asset_dir(ShapesModel.ASSET), first)
    ref = train(_cfg(tmp_path / "ref", f"model.path={first}", "train.iterations=2"))
    run = tmp_path / "run"
    train(_cfg(run, f"model.path={first}", "train.iterations=1"))
    assert json.loads((run / PATHS_FILE).read_text())["model.path"]["value"] == str(first)
    other = tmp_path / "w3"
    shutil.copytree(first, other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # another checkpoint of the same shape
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.path"):
        train(_cfg(run, f"model.path={other}", "train.iterations=2", "output.resume=true"))
    moved = tmp_path / "w2"
    first.rename(moved)
    with caplog.at_level(logging.INFO, logger="flowalign.train"):
        train(_cfg(run, f"model.path={moved}", "train.iterations=2", "output.resume=true"))
    assert "model.path moved" in caplog.text and "the same files" in caplog.text
    assert _lora(run, 2).keys() == _lora(ref, 2).keys()
    assert all(torch.equal(_lora(run, 2)[k], _lora(ref, 2)[k]) for k in _lora(ref, 2))  # exact, as uninterrupted
    assert json.loads((run / PATHS_FILE).read_text())["model.path"]["value"] == str(moved)
