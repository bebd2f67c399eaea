"""Bad input to the `flowalign` commands: one line naming the bad value, exit code 2, nothing written.

Runs ``flowalign.cli.main`` in-process (no model sampling): every argument is checked before the model loads,
which the ``no_model`` fixture enforces by making any model load fail the test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from cli_checks import fails as _fails, no_model  # noqa: F401  (the fixture is used by name)

from flowalign.cli import main
from flowalign.errors import UserError


def _garbage_lora(tmp_path):
    d = tmp_path / "lora"
    d.mkdir()
    (d / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file at all")
    return d


def _listing(path):
    return sorted(p.name for p in path.iterdir())


# ---------------------------------------------------------------------------------------------- sample


@pytest.mark.parametrize("extra, needles", [
    (["--seeds", "0"], ["--seeds", "0"]),
    (["--steps", "0"], ["--steps", "0"]),
    (["--batch-size", "0"], ["--batch-size", "0"]),
    (["--kernel", "foo"], ["'foo'", "dance_sde"]),
    (["--kernel", "flow-sde"], ["'flow-sde'", "did you mean 'flow_sde'"]),
])
def test_sample_refuses_bad_numbers_and_kernels(tmp_path, capsys, no_model, extra, needles):
    out = tmp_path / "grid.png"
    _fails(capsys, ["sample", "a red circle", *extra, "--out", str(out)], *needles)
    assert _listing(tmp_path) == []


def test_sample_and_eval_refuse_a_garbage_lora_before_loading_the_model(tmp_path, capsys, no_model):
    lora = _garbage_lora(tmp_path)
    line = _fails(capsys, ["sample", "a red circle", "--lora", str(lora), "--out", str(tmp_path / "g.png")],
                  str(lora), "cannot read")
    assert "header" in line  # the library's reason, on the same line
    _fails(capsys, ["eval", "--lora", str(lora), "--out", str(tmp_path / "ev")], str(lora), "cannot read")
    assert _listing(tmp_path) == ["lora"]


def test_a_lora_of_another_model_is_one_line(tmp_path, capsys):
    """A readable LoRA file whose tensors do not fit the model is refused after loading it, still in one line."""
    from safetensors.torch import save_file

    d = tmp_path / "other"
    d.mkdir()
    save_file({"transformer.nope.lora_A.weight": __import__("torch").zeros(2, 2)},
              str(d / "pytorch_lora_weights.safetensors"))
    out = tmp_path / "g.png"
    _fails(capsys, ["sample", "a red circle", "--lora", str(d), "--steps", "1", "--out", str(out)], str(d),
           "does not fit this model")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- eval


@pytest.mark.parametrize("extra, needles", [
    (["--steps", "0"], ["--steps", "0"]),
    (["--batch-size", "0"], ["--batch-size", "0"]),
    (["--seeds", "0"], ["--seeds", "0"]),
    (["--reward-arg", "shapes_strict.foo=1"], ["'foo'", "shapes_strict", "takes none"]),
    (["--model-arg", "foo=1"], ["'foo'", "guidance_scale"]),
    (["--model-arg", "guidance=3"], ["'guidance'", "did you mean 'guidance_scale'"]),
    (["--model-arg", "device=cuda"], ["--device"]),
    (["--model-arg", "guidance_scale=.nan"], ["--model-arg", "finite"]),
    (["--model-arg", "guidance_scale=nan"], ["--model-arg", "finite"]),
    (["--model-arg", "guidance_scale=-inf"], ["--model-arg", "finite"]),
    (["--per-frame", "stride=.inf"], ["--per-frame", "finite"]),
    (["--grid", "-1"], ["--grid", "-1"]),
])
def test_eval_refuses_bad_arguments_before_the_model_loads(tmp_path, capsys, no_model, extra, needles):
    out = tmp_path / "ev"
    _fails(capsys, ["eval", "--max-prompts", "2", *extra, "--out", str(out)], *needles)
    assert not out.exists()


def test_eval_refuses_an_out_that_is_a_file(tmp_path, capsys, no_model):
    f = tmp_path / "taken"
    f.write_text("keep me")
    _fails(capsys, ["eval", "--max-prompts", "2", "--out", str(f)], str(f), "is a file")
    assert f.read_text() == "keep me" and _listing(tmp_path) == ["taken"]


def test_eval_help_example_works_and_summary_records_the_guidance_used(tmp_path, capsys):
    """The --model-arg example of `eval --help` runs on the default model; summary.json holds the effective scale."""
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = capsys.readouterr().out
    assert "guidance_scale=3" in help_text and "height=64" not in help_text
    out = tmp_path / "ev"
    code = main(["eval", "--max-prompts", "1", "--seeds", "1", "--steps", "2", "--model-arg", "guidance_scale=3",
                 "--rewards", "shapes_partial", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["guidance"] == 3.0  # not null: the model's scale, set by --model-arg, is what sampled


# ---------------------------------------------------------------------------------------------- rewards


def test_rewards_serve_refuses_an_unknown_constructor_argument(capsys):
    _fails(capsys, ["rewards", "serve", "shapes_partial", "foo=1"], "'foo'", "shapes_partial")


def test_rewards_serve_refuses_a_port_in_use_and_a_foreign_host_before_loading(capsys, monkeypatch):
    import socket

    import flowalign.rewards as R

    monkeypatch.setattr(R, "build_reward", lambda *a, **k: pytest.fail("the reward was built before the bind check"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        _fails(capsys, ["rewards", "serve", "saturation", "--port", port], f"127.0.0.1:{port}", "in use", "--port")
    _fails(capsys, ["rewards", "serve", "saturation", "--host", "256.1.1.1"], "'256.1.1.1'", "127.0.0.1")


def test_rewards_help_shows_serve(capsys):
    with pytest.raises(SystemExit) as e:
        main(["rewards", "--help"])
    assert e.value.code == 0
    assert "{list,serve}" in capsys.readouterr().out


def test_offline_pickscore_error_names_the_config_and_the_cli_form(monkeypatch):
    from flowalign.errors import UserError
    from flowalign.rewards import build_reward

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        build_reward("pickscore")
    msg = str(e.value)
    assert "\n" not in msg
    assert "reward.kwargs.pickscore.path=DIR" in msg and "--reward-arg pickscore.path=DIR" in msg


# ---------------------------------------------------------------------------------------------- compare


def _run(d, values):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"train": {"groups_per_iter": 2, "group_size": 4},
                                                   "credit": {"name": "outcome"}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "nfe/sampling": 10 * i}) + "\n"
                                             for i in range(1, 3)))
    for label, v in values.items():
        (d / "eval" / label).mkdir(parents=True)
        (d / "eval" / label / "summary.json").write_text(json.dumps({"overall": v, "per_task": {}}))
    return d


def test_compare_refuses_a_reward_the_runs_do_not_hold_before_writing(tmp_path, capsys):
    run = _run(tmp_path / "run", {"base": {"shapes_strict": 0.3, "shapes_partial": 0.5},
                                  "final": {"shapes_strict": 0.4, "shapes_partial": 0.6}})
    out = tmp_path / "cmp5"
    _fails(capsys, ["compare", str(run), "--out", str(out), "--reward", "shapes_strct"], "'shapes_strct'",
           "did you mean 'shapes_strict'")
    assert not out.exists()  # no half-written compare.png


def test_compare_refuses_an_out_that_is_a_file(tmp_path, capsys):
    run = _run(tmp_path / "run", {"base": {"shapes_strict": 0.3}, "final": {"shapes_strict": 0.4}})
    f = tmp_path / "taken"
    f.write_text("keep me")
    _fails(capsys, ["compare", str(run), "--out", str(f)], str(f), "is a file")
    assert f.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------- calibrate


def test_calibrate_refuses_a_bad_probe_and_a_directory_out(tmp_path, capsys, no_model):
    out = tmp_path / "eta.json"
    _fails(capsys, ["calibrate", "--probe", "bogus", "--out", str(out)], "'bogus'", "ode:full")
    assert not out.exists()
    d = tmp_path / "adir"
    d.mkdir()
    _fails(capsys, ["calibrate", "--out", str(d)], str(d), "is a directory")
    assert _listing(tmp_path) == ["adir"] and _listing(d) == []


# ---------------------------------------------------------------------------------------------- pretrain


def test_pretrain_malformed_yaml_is_file_line_col(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 10\nlr: [1, 2\nfoo: : bar\n")
    out = tmp_path / "p"
    _fails(capsys, ["pretrain", "--config", str(bad), "--out", str(out)], f"{bad}:3:", "malformed YAML")
    assert not out.exists()


@pytest.mark.parametrize("argv, needles", [
    (["--steps", "0"], ["steps", "0", "--steps"]),
    (["--batch-size", "0"], ["batch_size", "--batch-size"]),
])
def test_pretrain_refuses_runs_that_cannot_train(tmp_path, capsys, argv, needles):
    out = tmp_path / "p"
    _fails(capsys, ["pretrain", "--out", str(out), *argv], *needles)
    assert not out.exists()  # in particular no untrained final/


def test_pretrain_config_with_a_wrongly_typed_value_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: lots\n")
    _fails(capsys, ["pretrain", "--config", str(cfg), "--out", str(tmp_path / "p")], "'steps'", "'lots'")
    assert _listing(tmp_path) == ["c.yaml"]


# ---------------------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("cmd, module, tail", [
    ("train", "flowalign.train", "; continue with output.resume=true"),
    ("compare", "flowalign.compare", ""),
])
def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch, cmd, module, tail):
    import importlib

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), "cli_main", interrupted)
    assert main([cmd, "whatever"]) == 130
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [f"flowalign {cmd}: interrupted{tail}"]


@pytest.mark.parametrize("step", [None, 20])
def test_ctrl_c_of_train_says_what_a_resume_would_continue_from(tmp_path, capsys, monkeypatch, step):
    """"continue with output.resume=true" was printed also before the first checkpoint, where a resume starts the
    run afresh (and removes its metrics); the line now names the checkpoint, or says there is none yet."""
    import flowalign.train as T

    run = tmp_path / "run"
    if step is not None:
        (run / "checkpoints" / "step-10").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step}").mkdir()

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train", interrupted)
    config = Path(__file__).resolve().parents[1] / "configs" / "shapes_grpo.yaml"
    assert main(["train", str(config), f"output.run_dir={run}"]) == 130
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and " INFO " not in ln]
    if step is None:
        assert lines == ["flowalign train: interrupted; no checkpoint yet (train.checkpoint_every=10), so "
                         "output.resume=true would start afresh"]
    else:
        assert lines == [f"flowalign train: interrupted; continue from {run / 'checkpoints' / 'step-20'} with "
                         "output.resume=true"]
        # started with output.overwrite=true: a resume must drop it (the two together are refused)
        assert main(["train", str(config), f"output.run_dir={run}", "output.overwrite=true"]) == 130
        assert "with output.resume=true output.overwrite=false" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_ctrl_c_of_a_real_command_exits_130(tmp_path):
    """A real SIGINT while a command runs (a pretraining run that would take minutes)."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from flowalign.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", code, "pretrain", "--out", str(tmp_path / "p"), "--no-progress"],
                         stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (tmp_path / "p" / "config.yaml").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # training has started
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip() and " INFO " not in ln]
    assert lines == ["flowalign pretrain: interrupted; continue from the last checkpoint with --resume (same --out; "
                     "--config and flags as before, or none)"], err[-2000:]


def test_check_kwargs_names_the_bad_key_and_lets_var_keyword_functions_decide():
    from flowalign.errors import UserError
    from flowalign.rewards.catalog import check_kwargs

    def f(path, *, device="cpu", batch_size=1):
        return path

    check_kwargs(f, {"device": "cuda", "batch_size": 2}, "f")
    with pytest.raises(UserError, match=r"f has no argument 'batchsize' \(valid: device, batch_size\); "
                                        r"did you mean 'batch_size'\?"):
        check_kwargs(f, {"batchsize": 2}, "f", reserved=("path",))
    check_kwargs(lambda **kw: kw, {"anything": 1}, "g")  # e.g. sd3's extra kwargs go to diffusers


@pytest.mark.parametrize("argv", [
    ["eval", "--device", "nonsense", "--out", "ev"],
    ["eval", "--device", "cuda:7", "--out", "ev"],
    ["calibrate", "--device", "nonsense", "--out", "eta.json"],
])
def test_eval_and_calibrate_refuse_a_device_that_is_not_here(capsys, no_model, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    _fails(capsys, argv, "--device")
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------- eval / sample


def test_eval_refuses_an_empty_jsonl_prompt_in_one_line_before_the_model_loads(tmp_path, capsys, no_model):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a red circle"}\n{"prompt": ""}\n')
    out = tmp_path / "ev"
    _fails(capsys, ["eval", "--prompts", str(p), "--out", str(out)], f"{p}:2", "empty prompt")
    assert not out.exists()
    _fails(capsys, ["sample", "--prompt-file", str(p), "--out", str(tmp_path / "g.png")], f"{p}:2", "empty prompt")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["p.jsonl"]


def test_eval_and_sample_refuse_an_out_under_a_file_before_the_model_loads(tmp_path, capsys, no_model):
    """Else the whole evaluation ran and the final mkdir / write failed with a traceback."""
    f = tmp_path / "file"
    f.write_text("keep")
    _fails(capsys, ["eval", "--max-prompts", "1", "--out", str(f / "ev")], str(f), "not a directory")
    _fails(capsys, ["sample", "a red circle", "--out", str(f / "sub" / "g.png")], str(f), "not a directory")
    assert f.read_text() == "keep" and sorted(x.name for x in tmp_path.iterdir()) == ["file"]


def test_sample_refuses_prompts_and_a_prompt_file_together(tmp_path, capsys, no_model):
    """One of the two was silently ignored (the positional prompts)."""
    _fails(capsys, ["sample", "a red circle", "--prompt-file", "shapes-bench", "--out", str(tmp_path / "g.png")],
           "--prompt-file", "not both")
    assert list(tmp_path.iterdir()) == []


def test_sample_refuses_an_out_name_that_is_not_png(tmp_path, capsys, no_model):
    """The grid is PNG bytes: samples.jpg would hold a PNG under a JPEG name."""
    _fails(capsys, ["sample", "a red circle", "--out", str(tmp_path / "samples.jpg")], "give the file a .png name")
    assert not (tmp_path / "samples.jpg").exists()


def test_sample_of_a_video_model_refuses_a_gif_path_that_is_a_directory(tmp_path, capsys, no_model):
    """A video model also writes OUT.gif: with vd.gif a directory it sampled the whole grid, then crashed with
    IsADirectoryError. An image model writes no GIF, so the directory does not concern it."""
    (tmp_path / "vd.gif").mkdir()
    _fails(capsys, ["sample", "a red circle", "--model", "shapes_video", "--out", str(tmp_path / "vd.png")],
           "vd.gif", "is a directory")
    assert _listing(tmp_path) == ["vd.gif"] and _listing(tmp_path / "vd.gif") == []
    with pytest.raises(AssertionError, match="model was loaded"):  # every check passed: it went on to load the model
        main(["sample", "a red circle", "--out", str(tmp_path / "vd.png")])


@pytest.mark.parametrize("device", ["nonsense", "cuda:0"])
def test_sample_bad_device_is_one_line_and_writes_nothing(tmp_path, device):
    from flowalign.sample import cli_main

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "g.png"
    with pytest.raises(UserError) as info:
        cli_main(["a red circle", "--device", device, "--steps", "1", "--seeds", "1", "--out", str(out)])
    assert "--device" in str(info.value) and device in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_ungrammatical_prompts_of_known_words_fail_before_sampling(tmp_path, capsys, monkeypatch):
    """'circle red a' uses only the model's words, so the model's vocabulary check passes; the shapes verifier
    refused it only when scoring, after sampling. Train and eval now parse every prompt of a shapes reward first."""
    from pathlib import Path

    import flowalign.evaluate as E
    import flowalign.train as T
    from flowalign import config as C

    bad = tmp_path / "bad.txt"
    bad.write_text("a red circle\ncircle red a\n")

    def no_sampling(*a, **k):
        raise AssertionError("sampling started before the prompt was refused")

    monkeypatch.setattr(E, "run_eval", no_sampling)
    _fails(capsys, ["eval", "--prompts", str(bad), "--out", str(tmp_path / "ev"), "--rewards", "shapes_strict"],
          "'circle red a' is outside the shapes grammar")
    assert not (tmp_path / "ev").exists()
    monkeypatch.setattr(T, "run_eval", no_sampling)
    cfg = C.load_config(str(Path(__file__).resolve().parents[1] / "configs" / "shapes_grpo.yaml"),
                        [f"data.train_prompts={bad}", f"output.run_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="'circle red a' is outside the shapes grammar"):
        T.train(cfg)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------ --guidance

BAD_GUIDANCE = ["nan", "inf", "-inf", "-0.5"]


@pytest.mark.parametrize("value", BAD_GUIDANCE)
def test_sample_refuses_a_bad_guidance_before_the_model_loads(tmp_path, capsys, no_model, value):
    out = tmp_path / "grid.png"
    _fails(capsys, ["sample", "a red circle", "--out", str(out), f"--guidance={value}"], "--guidance", value)
    assert not out.exists()


@pytest.mark.parametrize("value", BAD_GUIDANCE)
def test_eval_refuses_a_bad_guidance_before_the_model_loads(tmp_path, capsys, no_model, value):
    out = tmp_path / "ev"
    _fails(capsys, ["eval", "--out", str(out), f"--guidance={value}"], "--guidance", value)
    assert not out.exists()


@pytest.mark.parametrize("value", BAD_GUIDANCE)
def test_calibrate_refuses_a_bad_guidance_before_the_model_loads(tmp_path, capsys, no_model, value):
    out = tmp_path / "eta.json"
    _fails(capsys, ["calibrate", "--out", str(out), f"--guidance={value}"], "--guidance", value)
    assert not out.exists()


def test_check_guidance_is_shared():
    from flowalign.sample import check_guidance

    assert check_guidance(None) is None
    assert check_guidance(0) == 0.0 and check_guidance(4.5) == 4.5
    for bad in (float("nan"), float("inf"), -1.0, "x"):
        with pytest.raises(UserError) as info:
            check_guidance(bad)
        assert str(info.value).startswith("--guidance") and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------------- bench


@pytest.mark.parametrize("extra, needle", [
    (["--n", "0"], "--n"),
    (["--steps", "0"], "--steps"),  # was silently replaced by the model's default
    (["--steps", "-2"], "--steps"),
    (["--threads", "0"], "--threads"),  # was silently ignored
    (["--repeats", "-1"], "--repeats"),
])
def test_shapes_sample_refuses_bad_counts(capsys, no_model, extra, needle):
    _fails(capsys, ["bench", "shapes-sample", *extra], needle)


@pytest.mark.parametrize("bench, extra", [
    ("credit", ["--models", "shapes"]),
    ("grad-snr", []),
    ("noise-variance", []),
    ("sample-gap", []),
])
def test_benches_refuse_a_directory_json_before_running(capsys, no_model, tmp_path, bench, extra):
    """`--json DIR` failed with IsADirectoryError only after the whole benchmark had run."""
    _fails(capsys, ["bench", bench, *extra, "--json", str(tmp_path)], str(tmp_path), "directory")


# ------------------------------------------------------------------------------- audit: sample / eval / steer inputs


@pytest.mark.parametrize("eta", ["nan", "inf"])
def test_sample_refuses_a_non_finite_eta(tmp_path, capsys, no_model, eta):
    """NaN/inf passed the `--eta < 0` check and sampled a black (NaN) grid with exit code 0."""
    out = tmp_path / "g.png"
    _fails(capsys, ["sample", "a red circle", "--kernel", "flow_sde", f"--eta={eta}", "--out", str(out)],
           "--eta", eta)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("argv", [
    ["sample", "--prompt-file", "shapes-bench", "--out", "g.png"],
    ["eval", "--out", "ev"],
    ["steer", "--prompt-file", "shapes-bench", "--out", "st"],
])
def test_a_negative_max_prompts_is_refused_not_read_as_all(tmp_path, capsys, monkeypatch, no_model, argv):
    """`--max-prompts -1` silently sampled every prompt of the set (240 for shapes-bench)."""
    monkeypatch.chdir(tmp_path)
    _fails(capsys, [*argv, "--max-prompts", "-1"], "--max-prompts", "-1", "0 = every prompt")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("argv", [
    ["sample", "a red circle", "--out", "g.png"],
    ["eval", "--max-prompts", "1", "--out", "ev"],
    ["steer", "a red circle", "--out", "st"],
])
@pytest.mark.parametrize("seed", [str(2**64), str(-2**40)])
def test_a_seed_too_large_for_the_generator_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model,
                                                                               argv, seed):
    """Was `ValueError: Overflow when unpacking long long` from manual_seed, after the model loaded."""
    monkeypatch.chdir(tmp_path)
    _fails(capsys, [*argv, "--seed", seed], "--seed", seed)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("argv", [
    ["sample", "a red circle", "", "--out", "g.png"],
    ["steer", "  ", "--reward", "saturation", "--eval-rewards", "saturation", "--out", "st"],
])
def test_an_empty_prompt_argument_is_refused_like_an_empty_line_of_a_prompt_file(tmp_path, capsys, monkeypatch,
                                                                                 no_model, argv):
    """An empty positional prompt was sampled unconditionally (steer refused it only through the shapes rewards,
    after the model loaded)."""
    monkeypatch.chdir(tmp_path)
    _fails(capsys, argv, "prompt argument", "is empty")
    assert _listing(tmp_path) == []


def test_a_lora_of_another_shape_names_the_mismatched_tensor(tmp_path, capsys):
    """The message was cut at torch's `Error(s) in loading state_dict for SD3Transformer2DModel:`, saying nothing."""
    import dataclasses

    from flowalign.models.shapes import ShapesModel

    cfg = dataclasses.asdict(ShapesModel.from_pretrained("").config)
    other = ShapesModel.from_config({**cfg, "head_dim": cfg["head_dim"] // 2})
    other.add_lora()
    other.save_lora(tmp_path / "lora")
    out = tmp_path / "g.png"
    _fails(capsys, ["sample", "a red circle", "--lora", str(tmp_path / "lora"), "--steps", "1", "--seeds", "1",
                    "--out", str(out)], "does not fit this model", "size mismatch for")
    assert not out.exists()


def test_calibrate_refuses_rewards_that_are_all_weighted_zero(tmp_path, capsys, no_model):
    out = tmp_path / "eta.json"
    _fails(capsys, ["calibrate", "--reward", "shapes_partial=0", "--out", str(out)], "shapes_partial=0", "non-zero")
    assert not out.exists()


# --------------------------------------------------------------------------------------------- audit: report


def test_report_refuses_a_directory_that_is_not_a_run_and_a_file(tmp_path, capsys):
    """A report.html (of nothing) was written into any directory, e.g. a typo'd parent of the run."""
    d = tmp_path / "runs"
    d.mkdir()
    _fails(capsys, ["report", str(d)], "not a run directory", "config.yaml")
    assert _listing(d) == []
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    _fails(capsys, ["report", str(f)], "is a file")
    assert f.read_text() == "keep"


def test_report_of_a_run_whose_config_is_not_utf8_still_builds(tmp_path, capsys):
    """Was a UnicodeDecodeError traceback; now the page says the config does not load and shows it as is."""
    run = _run(tmp_path / "run", {"base": {"shapes_strict": 0.3}, "final": {"shapes_strict": 0.4}})
    (run / "config.yaml").write_bytes(b"train:\n  seed: \xff\xfe\n")
    assert main(["report", str(run), "--no-plots"]) == 0, capsys.readouterr().err
    assert "does not load" in (run / "report.html").read_text()


# -------------------------------------------------------------------------------------------- audit: compare


@pytest.mark.parametrize("config, needles", [
    (b"train:\n  groups_per_iter: \xff\n", ["config.yaml", "not UTF-8"]),
    (b"train:\n  groups_per_iter: abc\n  group_size: 4\n", ["train.groups_per_iter", "'abc'"]),
    (b"train:\n  groups_per_iter: 2\n  group_size: 4\ncredit: outcome\n", ["credit:", "'outcome'"]),
    (b"train:\n  groups_per_iter: 2\n  group_size: 4\nsampler: fast\n", ["sampler:", "'fast'"]),
    (b"train:\n  groups_per_iter: 2\n  group_size: 4\ncredit:\n  options: [1]\n", ["credit.options"]),
    (b"train:\n  groups_per_iter: !!float abc\n", ["config.yaml", "invalid YAML"]),
])
def test_compare_of_a_hand_edited_config_is_one_line(tmp_path, capsys, config, needles):
    """Each was a traceback (UnicodeDecodeError, ValueError from int(), AttributeError from .get on a string)."""
    run = _run(tmp_path / "run", {"base": {"shapes_strict": 0.3}, "final": {"shapes_strict": 0.4}})
    (run / "config.yaml").write_bytes(config)
    out = tmp_path / "cmp"
    _fails(capsys, ["compare", str(run), "--out", str(out)], *needles)
    assert not out.exists()


@pytest.mark.parametrize("metrics, needle", [(b"[1, 2]\n", "record 1 is a JSON list"), (b"\xff\n{}\n", "not UTF-8")])
def test_compare_of_a_bad_metrics_file_names_it(tmp_path, capsys, metrics, needle):
    run = _run(tmp_path / "run", {"base": {"shapes_strict": 0.3}, "final": {"shapes_strict": 0.4}})
    (run / "metrics.jsonl").write_bytes(metrics)
    out = tmp_path / "cmp"
    _fails(capsys, ["compare", str(run), "--out", str(out)], "metrics.jsonl", needle)
    assert not out.exists()


# ------------------------------------------------------------------------------------------- audit: pretrain


@pytest.mark.parametrize("model_config, needles", [
    ({"head_dim": -3}, ["model_config", "negative dimension"]),
    ({"patch_size": 5}, ["model_config", "[3, 30, 30]", "patch_size"]),  # 32 px is no multiple of 5
])
def test_pretrain_refuses_a_model_config_that_cannot_train_before_writing(tmp_path, capsys, model_config, needles):
    """A traceback; for patch_size 5 in the first training step, after config.yaml and metrics.jsonl were written."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model_config": model_config}))
    out = tmp_path / "p"
    _fails(capsys, ["pretrain", "--config", str(cfg), "--steps", "1", "--batch-size", "2", "--out", str(out),
                    "--no-progress"], *needles)
    assert not out.exists()


def test_pretrain_resume_of_a_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    """Was an UnpicklingError traceback."""
    state = tmp_path / "p" / "checkpoints" / "step-1" / "state.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"\xda garbage, not a torch file")
    _fails(capsys, ["pretrain", "--resume", "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "p"),
                    "--no-progress"], str(state), "cannot read checkpoint", "delete")
    assert _listing(tmp_path / "p") == ["checkpoints"] and state.read_bytes().startswith(b"\xda")


# ------------------------------------------------------------------------------------------- argparse's errors

_REQUIRED = {"train": ["configs/shapes_grpo.yaml"], "report": ["runs/x"], "compare": ["runs/x", "--out", "o"],
             "pretrain": ["--out", "o"], "steer": ["--out", "o"], "calibrate": ["--out", "o"], "eval": ["--out", "o"],
             "rewards serve": ["saturation"]}


def _argparse_error(capsys, argv, prog):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert info.value.code == 2, err
    assert len(lines) == 1, err  # no usage block before the error
    assert lines[0].startswith(f"{prog}: error: ") and lines[0].endswith(f"see `{prog} --help`)"), lines[0]
    return lines[0]


@pytest.mark.parametrize("cmd", ["train", "sample", "eval", "report", "compare", "pretrain", "steer", "calibrate",
                                 "rewards", "rewards serve", "bench shapes-sample", "bench credit", "bench grad-snr",
                                 "bench noise-variance", "bench sample-gap", "bench motion-prior",
                                 "bench train-memory"])
def test_an_unknown_option_is_one_line_in_every_command(tmp_path, capsys, monkeypatch, no_model, cmd):
    """argparse's own errors (unknown option, bad type) follow the one-line rule too, naming `--help`."""
    monkeypatch.chdir(tmp_path)
    argv = [*cmd.split(), *_REQUIRED.get(cmd, []), "--no-such-option"]
    line = _argparse_error(capsys, argv, f"flowalign {cmd}")
    assert "unrecognized arguments: --no-such-option" in line
    assert _listing(tmp_path) == []


def test_a_misspelt_option_names_the_closest_one_and_a_bad_type_is_one_line(capsys, no_model):
    line = _argparse_error(capsys, ["bench", "credit", "--modles", "shapes"], "flowalign bench credit")
    assert "did you mean '--models'?" in line
    line = _argparse_error(capsys, ["sample", "a red circle", "--steps", "abc"], "flowalign sample")
    assert "--steps" in line and "'abc'" in line
    line = _argparse_error(capsys, ["rewards", "serve"], "flowalign rewards serve")
    assert line.startswith("flowalign rewards serve: error: the following arguments are required: name (")


@pytest.mark.parametrize("cmd", ["train", "sample", "eval", "report", "compare", "pretrain", "steer", "calibrate",
                                 "rewards", "rewards serve", "bench shapes-sample", "bench credit", "bench grad-snr",
                                 "bench noise-variance", "bench sample-gap", "bench motion-prior",
                                 "bench train-memory"])
def test_every_option_of_every_command_says_what_it_does(capsys, monkeypatch, no_model, cmd):
    """`--help` documents every option: none is listed with an empty description."""
    from flowalign.errors import CommandParser

    seen = []
    original = CommandParser.parse_known_args

    def recording(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CommandParser, "parse_known_args", recording)
    with pytest.raises(SystemExit) as info:
        main([*cmd.split(), "--help"])
    assert info.value.code == 0
    parser = seen[-1]
    assert parser.prog == f"flowalign {cmd}"
    bare = [a.option_strings[-1] for a in parser._actions if a.option_strings and not a.help]
    assert bare == [], f"{cmd}: options without a help line: {bare}"


def test_sample_refuses_a_model_arg_the_loader_does_not_take_before_loading(tmp_path, capsys, no_model):
    _fails(capsys, ["sample", "a red circle", "--model-arg", "heigth=64", "--out", str(tmp_path / "g.png")],
           "--model-arg", "'heigth'")
    _fails(capsys, ["sample", "a red circle", "--model-arg", "dtype=float8", "--out", str(tmp_path / "g.png")],
           "--model-arg dtype must be one of float32, bfloat16, float16")
    assert list(tmp_path.iterdir()) == []


def test_sample_model_args_reach_the_loader(tmp_path, tiny_sd3_dir):
    """`sample --model-arg` sets the adapter's resolution (SD3 at another size than its 512x512 default)."""
    from PIL import Image

    sizes = {}
    for w in (32, 64):
        out = tmp_path / f"w{w}.png"
        assert main(["sample", "a cat", "--model", "sd3", "--path", str(tiny_sd3_dir), "--model-arg", "height=32",
                     "--model-arg", f"width={w}", "--steps", "1", "--seeds", "2", "--out", str(out)]) == 0
        sizes[w] = Image.open(out).size
    wider = sizes[64][0] - sizes[32][0]  # two tiles, each 32 px wider (times the grid's upscaling of small images)
    assert wider > 0 and wider % (2 * 32) == 0 and sizes[64][1] == sizes[32][1], sizes


@pytest.mark.parametrize("cmd", [["sample", "a red circle"], ["steer", "a red circle"], ["calibrate"], ["bench", "shapes-sample"]])
def test_single_process_commands_refuse_a_multi_process_launch(tmp_path, capsys, monkeypatch, no_model, cmd):
    """Under `accelerate launch` every process would run the whole command and write the same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    _fails(capsys, [*cmd, "--out", str(tmp_path / "o")], "runs in one process, but this is one of 2", "train and eval",
           cmd=cmd[0])  # refused by the dispatcher, before the benchmark's code
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- diffusers checkpoints


def test_a_lora_in_another_layout_is_refused_before_loading(tmp_path, capsys, no_model):
    """A file without flowalign's LoRA config must be in the diffusers/peft layout (diffusers' save_lora_weights); a
    kohya-style one (lora_down / lora_up / alpha) is refused in one line saying what flowalign loads."""
    from safetensors.torch import save_file

    d = tmp_path / "kohya"
    d.mkdir()
    save_file({"transformer.blocks.0.to_q.lora_down.weight": torch.zeros(4, 8),
               "transformer.blocks.0.to_q.lora_up.weight": torch.zeros(8, 4),
               "transformer.blocks.0.to_q.alpha": torch.tensor(4.0)}, str(d / "pytorch_lora_weights.safetensors"))
    _fails(capsys, ["sample", "a red circle", "--lora", str(d), "--out", str(tmp_path / "g.png")], str(d),
           "is not a LoRA A or B matrix", "diffusers/peft-format", "lora_A.weight")
    assert _listing(tmp_path) == ["kohya"]


def test_an_sd3_size_beyond_pos_embed_max_size_is_one_line_before_loading(tmp_path, capsys, monkeypatch,
                                                                           tiny_sd3_dir):  # noqa: F811
    """It was a ValueError traceback from diffusers' cropped_pos_embed (exit 1) after the whole pipeline had loaded."""
    import diffusers

    def boom(*a, **k):
        raise AssertionError("the pipeline was loaded before the size was refused")

    monkeypatch.setattr(diffusers.StableDiffusion3Pipeline, "from_pretrained", classmethod(boom))
    _fails(capsys, ["sample", "a red cat", "--model", "sd3", "--path", str(tiny_sd3_dir), "--model-arg", "height=160",
                    "--model-arg", "width=32", "--steps", "1", "--out", str(tmp_path / "g.png")],
           "160x32", "pos_embed_max_size=32", "at most 128")
    assert _listing(tmp_path) == []


def test_sample_eval_and_steer_default_to_the_models_own_steps(tmp_path, capsys, monkeypatch):
    """Without --steps the commands used the shapes config's sample_steps, else a hard-coded 10 (SD3 / FLUX / Wan:
    their pipelines default to 28, 28 and 50); they now all ask the model (``default_steps``)."""
    import flowalign.sample as S
    from flowalign.models.shapes import ShapesModel

    monkeypatch.setattr(ShapesModel, "default_steps", property(lambda self: 3))
    seen = []
    real = S.sample_grid
    monkeypatch.setattr(S, "sample_grid", lambda *a, **k: seen.append(k["steps"]) or real(*a, **k))
    assert main(["sample", "a red circle", "--seeds", "1", "--out", str(tmp_path / "g.png")]) == 0
    assert seen == [3]
    assert main(["eval", "--max-prompts", "1", "--seeds", "1", "--rewards", "shapes_partial", "--grid", "0",
                 "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["settings"]["steps"] == 3
    assert main(["steer", "a red circle", "--method", "best_of_n", "-k", "2", "--seeds", "1",
                 "--out", str(tmp_path / "st")]) == 0
    assert json.loads((tmp_path / "st" / "summary.json").read_text())["settings"]["steps"] == 3
    capsys.readouterr()
    for cmd in (["sample"], ["eval"], ["steer"]):
        with pytest.raises(SystemExit):
            main([*cmd, "--help"])
        assert "28 for sd3 and flux, 50 for wan" in " ".join(capsys.readouterr().out.split()), cmd


def test_per_frame_temporal_embedding_without_embeddings_is_refused_before_the_video_model_loads(tmp_path, capsys,
                                                                                                   no_model):
    """PerFrame refused it only once built, after the (video) model had loaded; an image model ignores --per-frame."""
    fails = _fails
    fails(capsys, ["eval", "--model", "shapes_video", "--prompts", "shapes-motion-bench", "--rewards",
                   "shapes_motion_partial,saturation", "--per-frame", "temporal=embedding", "--out", str(tmp_path / "o")],
          "--per-frame: temporal=embedding needs image embeddings, which 'saturation' has not", "use temporal=pixel")
    fails(capsys, ["train", "configs/shapes_video_grpo.yaml", "reward.per_frame={temporal: embedding}",
                   "reward.weights={saturation: 1.0}", f"output.run_dir={tmp_path / 'r'}"],
          "reward.per_frame: temporal=embedding needs image embeddings", "'saturation'")
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


def test_eval_and_steer_need_rewards_and_prompts_for_a_model_without_a_verifier(tmp_path, capsys, no_model):
    """sd3/flux/wan have no built-in verifier: the shapes defaults used to reach them and failed as 'outside the
    shapes grammar'; now the missing option is named."""
    fails = _fails
    fails(capsys, ["eval", "--model", "sd3", "--prompts", "parti", "--out", str(tmp_path / "a")],
          "--rewards is required for --model sd3", "--rewards pickscore --reward-arg pickscore.path=")
    fails(capsys, ["eval", "--model", "flux", "--rewards", "pickscore", "--out", str(tmp_path / "b")],
          "--prompts is required for --model flux", "--benchmark NAME")
    fails(capsys, ["steer", "--model", "wan", "a cat", "--out", str(tmp_path / "c")],
          "--reward is required for --model wan")
    fails(capsys, ["eval", "--benchmark", "shapes-bench", "--model", "shapes_video", "--out", str(tmp_path / "d")],
          "fixes sampling for shapes, not --model shapes_video", "pass --model shapes, or --steps and --guidance")
    # an image model on a video benchmark: --steps and --guidance would not help (its prompts, its rewards)
    line = fails(capsys, ["eval", "--benchmark", "shapes-motion-bench", "--model", "shapes", "--out",
                          str(tmp_path / "e")], "scores videos (of shapes_video)", "pass --model shapes_video")
    assert "--steps" not in line
    fails(capsys, ["eval", "--benchmark", "vbench", "--model", "sd3", "--out", str(tmp_path / "f")],
          "--model sd3 draws images; pass --model wan")
    assert not any((tmp_path / x).exists() for x in "abcdef")


def test_every_device_a_command_takes_goes_through_one_check(monkeypatch):
    """--device, model.device and a reward's device= had three checks that disagreed: model.device took cuda:3 on a
    one-GPU machine and --device took mps where MPS is missing (both failed later in .to()). One check now."""
    from flowalign import config as C
    from flowalign.dist import device_unavailable
    from flowalign.rewards.catalog import check_device as reward_device
    from flowalign.sample import check_device
    from flowalign.train import _check_components as check_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert device_unavailable(torch.device("cuda:0")) == "" and device_unavailable(torch.device("cpu")) == ""
    assert device_unavailable(torch.device("cuda:3")).startswith("1 CUDA device(s) are visible here")
    for check in (lambda d: check_device(d), lambda d: reward_device(d, "reward 'x'"),
                  lambda d: check_config(C.load_config("configs/shapes_grpo.yaml", [f"model.device={d}"]))):
        for bad, why in (("cuda:3", r"1 CUDA device\(s\) are visible here"), ("mps", "MPS is not available here")):
            with pytest.raises(UserError, match=why) as e:
                check(bad)
            assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", ["", " ", "abc", "0", "-1"])
@pytest.mark.parametrize("cmd", [["sample", "a red circle"], ["eval", "--prompts", "shapes-bench"]])
def test_a_world_size_that_is_not_a_process_count_is_one_line(tmp_path, capsys, monkeypatch, no_model, value, cmd):
    """`WORLD_SIZE=$SLURM_NTASKS` with the variable unset gave a ValueError traceback (int(''))."""
    monkeypatch.setenv("WORLD_SIZE", value)
    out = str(tmp_path / ("o.png" if cmd[0] == "sample" else "o"))
    if value.strip() == "":  # empty means unset: the command goes on to load its model (refused by no_model here)
        with pytest.raises(AssertionError, match="the model was loaded"):
            main([*cmd, "--out", out])
        return
    _fails(capsys, [*cmd, "--out", out], f"WORLD_SIZE={value!r} is not a process count")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- audit: a user's bad-input sweep


@pytest.mark.parametrize("argv", [
    ["sample", "a red circle", "--out", "g.png"],
    ["eval", "--out", "ev"],
    ["steer", "a red circle", "--out", "st"],
    ["calibrate", "--out", "eta.json"],
    ["bench", "shapes-sample"],
    ["bench", "credit", "--models", "shapes"],
    ["bench", "grad-snr"],
])
def test_a_step_count_above_the_limit_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model, argv):
    """`--steps 1000000000` was accepted; the 8 GB sigma grid then got the process killed for memory (exit 137, no
    message) after the model had loaded."""
    from flowalign.config import MAX_STEPS

    monkeypatch.chdir(tmp_path)
    _fails(capsys, [*argv, "--steps", "1000000000"], "--steps 1000000000", f"limit of {MAX_STEPS}")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("argv, needle", [
    (["sample", "a red circle", "--out", "g.png", "--seeds", "100000000"], "--seeds 100000000 is above the limit"),
    (["eval", "--out", "ev", "--seeds", "100000000"], "--seeds 100000000 is above the limit"),
    (["steer", "a red circle", "--out", "st", "--seeds", "100000000"], "--seeds 100000000 is above the limit"),
    (["steer", "a red circle", "--out", "st", "--method", "fk", "--seeds", "101", "-k", "100"],
     "--seeds 101 x -k 100 = 10100 particles per prompt"),
])
def test_an_image_count_above_the_limit_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model,
                                                                          argv, needle):
    """`eval --seeds 100000000` was accepted and then built a job list of 2.4e10 (prompt, seed) pairs before the
    first image (killed for memory, or silent for minutes); images per prompt now stop at config.MAX_SEEDS, below
    which every image keeps its own noise seed (evaluate.image_seed)."""
    from flowalign.config import MAX_SEEDS

    monkeypatch.chdir(tmp_path)
    _fails(capsys, argv, needle, f"limit of {MAX_SEEDS}")
    assert _listing(tmp_path) == []


def test_the_image_limit_admits_its_own_value():
    """MAX_SEEDS itself is allowed (the check is `>`), for --seeds and for eval.seeds_per_prompt."""
    from flowalign.config import MAX_SEEDS, check_max_seeds, load_config
    from flowalign.sample import check_positive

    check_max_seeds(MAX_SEEDS)
    check_positive(seeds=MAX_SEEDS)
    assert load_config(None, [f"eval.seeds_per_prompt={MAX_SEEDS}"]).eval.seeds_per_prompt == MAX_SEEDS
    with pytest.raises(UserError, match="eval.seeds_per_prompt=10001 is above the limit of 10000"):
        load_config(None, [f"eval.seeds_per_prompt={MAX_SEEDS + 1}"])


@pytest.mark.parametrize("override, needle", [
    ("sampler.steps=1000000000", "sampler.steps=1000000000 is above the limit"),
    ("eval.steps=1000000000", "eval.steps=1000000000 must be between 1 and"),
    ("output.resume=true", "output.resume=true and output.overwrite=true contradict each other"),
    ("train.group_size=100000000", "= 800000000 rollouts per iteration is above the limit of 100000"),
])
def test_train_refuses_a_huge_step_count_and_resume_with_overwrite(tmp_path, capsys, no_model, override, needle):
    """resume=true with overwrite=true resumed silently (overwrite ignored) and rewrote the earlier run's
    config.yaml and report; now both together are refused, and nothing of the run is touched."""
    from pathlib import Path

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("keep: me\n")
    config = Path(__file__).resolve().parents[1] / "configs" / "shapes_grpo.yaml"
    _fails(capsys, ["train", str(config), f"output.run_dir={run}", "output.overwrite=true", override], needle)
    assert _listing(run) == ["config.yaml"] and (run / "config.yaml").read_text() == "keep: me\n"


def test_a_saved_config_with_resume_and_overwrite_still_loads():
    """The pair is refused as a command (train's run-directory check), not as a config: a run's config.yaml written
    with both (by an earlier version) still loads for a resume's comparison and for the report."""
    from flowalign.config import load_config

    cfg = load_config(None, ["output.resume=true", "output.overwrite=true"])
    assert cfg.output.resume and cfg.output.overwrite


def test_an_error_from_a_benchmarks_code_names_the_benchmark(capsys, no_model, tmp_path):
    """Errors raised by a benchmark's own checks were prefixed `flowalign bench:` while its argument errors say
    `flowalign bench NAME:`; both name it now (and `rewards serve` likewise)."""
    _fails(capsys, ["bench", "noise-variance", "--steps", "20000"], "--steps=20000 must be between 2 and",
           cmd="bench noise-variance")
    _fails(capsys, ["bench", "sample-gap", "--steps", "0,20000"], "between 1 and", cmd="bench sample-gap")
    _fails(capsys, ["bench", "nope"], "unknown benchmark 'nope'", cmd="bench")
    _fails(capsys, ["rewards", "serve", "nope"], "nope", cmd="rewards serve")


def test_eval_names_a_benchmark_directory_and_a_protocol_syntax_error_by_line(tmp_path, capsys, no_model):
    _fails(capsys, ["eval", "--benchmark", str(tmp_path), "--out", str(tmp_path / "o")], "is a directory")
    bad = tmp_path / "p.yaml"
    bad.write_text("name: mine\nversion: [1\n")
    _fails(capsys, ["eval", "--benchmark", str(bad), "--out", str(tmp_path / "o")], f"{bad}:", "malformed YAML")
    assert _listing(tmp_path) == ["p.yaml"]


def test_a_bad_prompt_is_named_by_its_file_and_line_in_eval_sample_and_train(tmp_path, capsys):
    """`eval --prompts typo.txt` said only "unknown word 'sqare'" (a .jsonl's syntax errors named FILE:LINE, its
    prompts' words did not): eval, sample and train now name the line, train also the setting, before sampling."""
    bad = tmp_path / "typo.txt"
    bad.write_text("a red circle\na red sqare\n")
    _fails(capsys, ["eval", "--model", "shapes", "--prompts", str(bad), "--out", str(tmp_path / "e")],
           f"{bad}:2: prompt 'a red sqare': unknown word 'sqare'")
    _fails(capsys, ["sample", "--prompt-file", str(bad), "--out", str(tmp_path / "s.png")], f"{bad}:2: prompt")
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "shapes_grpo.yaml"
    _fails(capsys, ["train", str(config), f"data.eval_prompts={bad}",
                    f"output.run_dir={tmp_path / 'r'}"], f"data.eval_prompts ({bad}:2): prompt 'a red sqare'")
    assert not any((tmp_path / n).exists() for n in ("e", "s.png", "r"))


def test_eval_builds_its_rewards_before_loading_the_model(tmp_path, capsys, no_model):
    """A wrong reward weights path cost a whole model load (minutes for FLUX or Wan) before its one-line error: eval
    now builds the rewards first (as steer and calibrate do); `no_model` fails the test if the model loads."""
    line = _fails(capsys, ["eval", "--model", "sd3", "--prompts", "parti", "--rewards", "pickscore", "--reward-arg",
                           f"pickscore.path={tmp_path / 'nope'}", "--out", str(tmp_path / "e")], "pickscore")
    assert "nope" in line
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("cmd", ["sample", "eval", "steer"])
def test_a_second_lora_or_a_repeated_model_arg_is_refused_not_silently_dropped(tmp_path, capsys, no_model, cmd):
    """`--lora A --lora B` applied only B and `--model-arg height=32 --model-arg height=64` kept 64, without a word;
    `--model-arg resolution=32` on sd3 suggested 'revision'."""
    out = ["--out", str(tmp_path / ("o.png" if cmd == "sample" else "o"))]
    prompt = ["a red circle"] if cmd != "eval" else []
    with pytest.raises(SystemExit) as info:  # an argument error, as argparse's own
        main([cmd, *prompt, "--lora", "a", "--lora", "b", *out])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1 and "--lora is given twice ('a', 'b')" in lines[0], lines
    _fails(capsys, [cmd, *prompt, "--model-arg", "guidance_scale=2", "--model-arg", "guidance_scale=3", *out],
           "--model-arg guidance_scale is given 2 times with different values (2, 3)")
    _fails(capsys, [cmd, *prompt, "--model", "sd3", "--model-arg", "resolution=32", *out,
                    *(["--reward", "pickscore"] if cmd == "steer" else []),
                    *(["--rewards", "pickscore", "--prompts", "parti"] if cmd == "eval" else [])],
           "takes --model-arg height=N --model-arg width=N")
    assert list(tmp_path.iterdir()) == []


def test_under_a_launcher_only_rank_0_prints_the_error_line(capsys, monkeypatch):
    """Every rank printed the same one-line error (and Ctrl-C hint) under accelerate launch: the line came N times.
    Rank 0 speaks for all (the ranks share one verdict); every rank still exits 2. report and compare, which would
    each write the same files N times at once, are refused under a launcher as sample and steer are."""
    import logging

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    flowalign_logger = logging.getLogger("flowalign")
    before = flowalign_logger.level
    try:
        assert main(["report", "/nonexistent"]) == 2
        assert capsys.readouterr().err == "" and flowalign_logger.level == logging.WARNING  # its INFO lines quiet
    finally:
        flowalign_logger.setLevel(before)  # setLevel: also clears the loggers' cached levels
    monkeypatch.setenv("RANK", "0")
    for cmd in (["report", "/nonexistent"], ["compare", "a", "b", "--out", "c"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{cmd[0]} runs in one process, but this is one of 2" in err[0], err
