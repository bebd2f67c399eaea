"""Bad input to the `flowalign bench ...` commands: one line naming the bad value, exit code 2, nothing written.

Every case is refused before the model loads (the ``no_model`` fixture fails the test otherwise); before these
checks each one loaded the model and then either ran to exit code 0 on NaN figures / an empty table / a silently
dropped option, or failed with a traceback after the work was done.
"""

from __future__ import annotations

import pytest
from cli_checks import fails as _fails, no_model  # noqa: F401  (the fixture is used by name)

from flowalign.cli import main

HUGE_SEED = str(2 ** 70)  # past what torch.Generator.manual_seed takes


def _file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep me")
    return f


@pytest.mark.parametrize("extra, needles", [
    (["--guidance", "nan"], ["--guidance", "nan"]),  # sampled NaN images, exit code 0
    (["--guidance", "-1"], ["--guidance", "-1"]),
])
def test_shapes_sample_refuses_a_bad_guidance(capsys, no_model, extra, needles):
    _fails(capsys, ["bench", "shapes-sample", *extra], *needles)


BENCHES_WITH_JSON = [
    ("shapes-sample", []),  # took only a bare --json (printing); `--json PATH` was "unrecognized arguments"
    ("credit", ["--models", "shapes"]),
    ("grad-snr", []),
    ("noise-variance", []),
    ("sample-gap", []),
    ("motion-prior", []),
    ("train-memory", ["--models", "shapes"]),
    ("train-memory", ["--arch", "sd3.5-medium"]),  # the meta-device count writes its own JSON
]


@pytest.mark.parametrize("bench, extra", BENCHES_WITH_JSON[:-1])
def test_benches_refuse_a_json_path_under_a_file(capsys, no_model, tmp_path, bench, extra):
    """The write failed with NotADirectoryError (a traceback) only after the whole benchmark had run."""
    f = _file(tmp_path)
    _fails(capsys, ["bench", bench, *extra, "--json", str(f / "b.json")], str(f), "not a directory")
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("bench, extra", BENCHES_WITH_JSON)
def test_benches_refuse_a_json_path_they_cannot_write(capsys, no_model, bench, extra):
    """`--json /sys/b.json` (root may not create files there, though os.access says it may) or under a directory
    that cannot be made: a traceback after the whole benchmark had run."""
    for out in ("/sys/b.json", "/proc/sub/b.json"):
        _fails(capsys, ["bench", bench, *extra, "--json", out], f"--json {out!r}", "cannot be written")


@pytest.mark.parametrize("bench, extra", BENCHES_WITH_JSON)
def test_benches_keep_an_earlier_json_unless_overwrite(capsys, no_model, tmp_path, bench, extra):
    """An existing --json (the figures of an earlier, possibly long run) was silently replaced."""
    f = tmp_path / "b.json"
    f.write_text('{"earlier": true}')
    _fails(capsys, ["bench", bench, *extra, "--json", str(f)], f"--json {str(f)!r}", "exists", "--overwrite")
    assert f.read_text() == '{"earlier": true}'
    if "--arch" not in extra:  # with --overwrite every check passes (the meta count loads no model: not run here)
        with pytest.raises(AssertionError, match="model was loaded"):
            main(["bench", bench, *extra, "--json", str(f), "--overwrite"])
        assert f.read_text() == '{"earlier": true}'


def test_bench_credit_keeps_an_earlier_plot_unless_overwrite(capsys, no_model, tmp_path):
    """--plot: the ranking behind it took minutes to an hour; with several models, each model's own file counts."""
    one = tmp_path / "rank.png"
    one.write_bytes(b"earlier")
    _fails(capsys, ["bench", "credit", "--models", "shapes", "--plot", str(one)], "--plot", str(one), "--overwrite")
    per_model = tmp_path / "rank-shapes_video.png"  # what `--models shapes,shapes_video --plot rank.png` draws
    per_model.write_bytes(b"earlier")
    one.unlink()
    _fails(capsys, ["bench", "credit", "--models", "shapes,shapes_video", "--plot", str(one)], str(per_model),
           "--overwrite")
    assert per_model.read_bytes() == b"earlier"
    _fails(capsys, ["bench", "credit", "--models", "shapes", "--plot", "/sys/rank.png"], "/sys/rank.png",
           "cannot be written")
    # sd3 is never ranked: `--models shapes,sd3 --plot rank.png` draws rank.png itself, so that file is guarded (the
    # check guarded rank-shapes.png, and the plot went there)
    one.write_bytes(b"earlier")
    _fails(capsys, ["bench", "credit", "--models", "shapes,sd3", "--plot", str(one)], f"--plot {str(one)!r}",
           "--overwrite")
    assert one.read_bytes() == b"earlier" and not (tmp_path / "rank-shapes.png").exists()


@pytest.mark.parametrize("bench, extra", [
    ("noise-variance", ["--reward", "shapes_motion_strict"]),
    ("grad-snr", ["--reward", "shapes_motion_partial"]),
    ("credit", ["--models", "shapes", "--rank-reward", "shapes_motion_strict", "--rank-groups", "1"]),
])
def test_a_video_reward_for_the_image_model_is_one_line_before_loading(capsys, no_model, tmp_path, bench, extra):
    """The shapes image model's samples reached the video reward after all the sampling: a ValueError traceback."""
    reward = extra[extra.index("--reward" if "--reward" in extra else "--rank-reward") + 1]
    _fails(capsys, ["bench", bench, *extra, "--json", str(tmp_path / "b.json")], repr(reward), "videos",
           "image reward")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, needles", [
    (["--methods", ","], ["--methods", "','", "flow_grpo"]),  # loaded the models, printed an empty table, exit 0
    (["--threads", "0"], ["--threads", "0"]),  # was silently 1
    (["--seed", HUGE_SEED], ["--seed", HUGE_SEED]),  # ValueError from manual_seed after the model loaded
    (["--plot", "rank.png", "--rank-groups", "0"], ["--plot", "--rank-groups"]),  # no plot, exit code 0
    (["--rank-references", "fine:2", "--rank-groups", "0"], ["--rank-references", "--rank-groups"]),
    (["--steps", "1"], ["--steps", "--rank-groups 0"]),  # a ranking of no state: every figure NaN, exit 0
    (["--group-size", "1"], ["--group-size", "--rank-groups 0"]),  # Spearman of one member: all NaN, exit 0
    # a branch plan at T = 1 has no step to branch at: a ValueError traceback after the earlier rows printed
    (["--steps", "1", "--rank-groups", "0"], ["--steps 1", "tempflow_all, tempflow_one, g2rpo", "--steps >= 2"]),
    (["--models", "sd3", "--steps", "1", "--methods", "tempflow_one"], ["--steps 1", "tempflow_one"]),
    # the ranking reward was checked by name only: RemoteReward() without its url, a TypeError after the cost table
    (["--rank-reward", "remote"], ["--rank-reward 'remote'", "url"]),
    (["--rank-reward", "remote", "--reward-arg", "remote.url=ftp://host"], ["url must start with http"]),
    (["--rank-reward", "aesthetic"], ["aesthetic", "head=PATH"]),  # was refused only after every cost run
    (["--reward-arg", "saturation.x=1"], ["--reward-arg", "'shapes_partial'"]),  # not the --rank-reward
    (["--rank-reward", "saturation", "--reward-arg", "saturation.bogus=1"], ["bogus"]),
    (["--rank-groups", "0", "--reward-arg", "shapes_partial.x=1"], ["--reward-arg", "--rank-reward"]),  # unused
])
def test_bench_credit_refuses_before_loading(capsys, no_model, tmp_path, extra, needles):
    out = tmp_path / "b.json"
    _fails(capsys, ["bench", "credit", "--models", "shapes", "--json", str(out), *extra], *needles)
    assert not out.exists()


def test_bench_credit_refuses_a_plot_that_nothing_ranks_or_that_lies_under_a_file(capsys, no_model, tmp_path):
    # the tiny SD3 pipeline is never ranked: the plot was silently not drawn (exit code 0)
    _fails(capsys, ["bench", "credit", "--models", "sd3", "--plot", str(tmp_path / "r.png")], "--plot", "shapes")
    f = _file(tmp_path)
    _fails(capsys, ["bench", "credit", "--models", "shapes", "--plot", str(f / "r.png")], "--plot", str(f))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("extra, needles", [
    (["--methods", ","], ["--methods", "','"]),  # rollouts + gradients, then a table without rows, exit 0
    (["--eta", "inf"], ["--eta", "inf"]),  # NaN rollouts and rewards, exit 0
    (["--eta", "nan"], ["--eta", "nan", "finite"]),  # was "raise --eta"
    (["--adv-clip", "nan"], ["--adv-clip", "nan"]),  # every advantage clipped to NaN, exit 0
    (["--prompts", "-1", "--groups-per-prompt", "-4"], ["--prompts", "-1"]),  # passed the product check
    (["--threads", "0"], ["--threads", "0"]),
    (["--seed", HUGE_SEED], ["--seed"]),
    (["--kernel", "ddim_sde", "--window", "0,1"], ["ddim_sde", "σ = 1", "--window"]),  # refused after the model loaded
])
def test_grad_snr_refuses_before_loading(capsys, no_model, tmp_path, extra, needles):
    out = tmp_path / "g.json"
    _fails(capsys, ["bench", "grad-snr", "--json", str(out), *extra], *needles)
    assert not out.exists()


@pytest.mark.parametrize("extra, needles", [
    (["--eta", "nan"], ["--eta", "nan"]),  # a NaN table with exit code 0
    (["--eta", "inf"], ["--eta", "inf"]),
    (["--guidance", "nan"], ["--guidance", "nan"]),  # NaN rewards with exit code 0
    (["--guidance", "-2"], ["--guidance", "-2"]),
    (["--threads", "0"], ["--threads", "0"]),
])
def test_noise_variance_refuses_before_loading(capsys, no_model, tmp_path, extra, needles):
    out = tmp_path / "n.json"
    _fails(capsys, ["bench", "noise-variance", "--json", str(out), *extra], *needles)
    assert not out.exists()


@pytest.mark.parametrize("bench, extra, needles", [
    ("sample-gap", ["--guidance", "nan"], ["--guidance", "nan"]),  # NaN samples and errors, exit code 0
    ("sample-gap", ["--seed", "-1"], ["--seed", "-1"]),  # numpy's ValueError after the model had sampled
    ("sample-gap", ["--threads", "0"], ["--threads", "0"]),
    ("motion-prior", ["--guidance", "nan"], ["--guidance", "nan"]),  # NaN travel, exit code 0
    ("motion-prior", ["--guidance", "-1"], ["--guidance", "-1"]),
    ("motion-prior", ["--seed", "-1"], ["--seed", "-1"]),  # numpy's ValueError after the model loaded
    ("train-memory", ["--device", "gpu"], ["--device", "'gpu'", "cpu"]),  # torch's RuntimeError traceback
])
def test_gap_motion_and_memory_refuse_before_loading(capsys, no_model, tmp_path, bench, extra, needles):
    out = tmp_path / "b.json"
    _fails(capsys, ["bench", bench, "--json", str(out), *extra], *needles)
    assert not out.exists()


def test_sample_gap_refuses_an_unreadable_lora_before_loading(capsys, no_model, tmp_path):
    """A garbage pytorch_lora_weights.safetensors crashed with a SafetensorError traceback (exit code 1) after the
    model had loaded; now `flowalign sample`'s check_lora_dir refuses it first."""
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_text("garbage\n")
    out = tmp_path / "b.json"
    _fails(capsys, ["bench", "sample-gap", "--lora", str(lora), "--json", str(out)], f"--lora {str(lora)!r}",
           "cannot read pytorch_lora_weights.safetensors")
    _fails(capsys, ["bench", "sample-gap", "--lora", str(tmp_path / "none")], "no pytorch_lora_weights.safetensors")
    assert not out.exists()


@pytest.mark.parametrize("extra, needles", [
    # --arch counts published configs on the meta device: --models/--path/--device/--repeat were silently ignored
    (["--arch", "sd3.5-medium", "--models", "shapes"], ["--models does not apply to --arch", "drop --models"]),
    (["--arch", "sd3.5-medium", "--path", "."], ["--path does not apply to --arch"]),
    (["--arch", "sd3.5-medium", "--device", "cpu"], ["--device does not apply to --arch"]),
    (["--arch", "sd3.5-medium", "--repeat", "2"], ["--repeat does not apply to --arch"]),
    # --frames sizes Wan only: the SD3 row showed frames 1
    (["--arch", "sd3.5-medium,flux.1-dev", "--frames", "33"], ["--frames 33 applies to the Wan architectures only"]),
    # the shapes models and the tiny pipelines have fixed sizes: --resolution 64 printed what 32 prints
    (["--models", "shapes_video", "--resolution", "64"], ["--resolution 64 applies only to --arch or a --path"]),
    (["--models", "sd3", "--resolution", "64"], ["--resolution 64 applies only to --arch or a --path"]),
    (["--models", "shapes_video", "--frames", "33"], ["--frames 33 applies only to Wan"]),
    (["--models", "wan", "--frames", "33"], ["--frames 33 applies only to Wan", "with --path"]),
    (["--models", "sd3", "--path", ".", "--frames", "33"], ["--frames 33 applies only to Wan"]),
])
def test_train_memory_refuses_options_it_would_ignore(capsys, no_model, tmp_path, extra, needles):
    out = tmp_path / "m.json"
    _fails(capsys, ["bench", "train-memory", *extra, "--json", str(out)], *needles)
    assert not out.exists()


def test_train_memory_arch_honours_resolution_frames_and_batch(capsys, tmp_path):
    """What --arch does take reaches the count: a Wan architecture gets --frames, the others run on images."""
    import json

    out = tmp_path / "m.json"
    assert main(["bench", "train-memory", "--arch", "sd3.5-medium", "--resolution", "256", "--batch", "1",
                 "--threads", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["architectures"]
    assert (row["height"], row["width"], row["frames"], row["prompts"]) == (256, 256, 1, 1)


@pytest.mark.parametrize("argv", [
    ["credit", "--models", "shapes", "--steps", "1", "--group-size", "1", "--rank-groups", "0", "--threads", "1",
     "--methods", "flow_grpo,dense_full,tp_full,euphonium_guided"],  # chains run at T = 1 (branch plans cannot)
    ["credit", "--models", "shapes", "--steps", "2", "--methods", "tempflow_one,g2rpo", "--rank-reward", "saturation",
     "--threads", "1"],
    ["grad-snr", "--eta", "0.3", "--adv-clip", "inf", "--seed", "-1", "--threads", "1"],
    ["noise-variance", "--guidance", "0", "--seed", "-1", "--threads", "1"],
    ["sample-gap", "--seed", "0", "--threads", "1"],
    ["motion-prior", "--seed", "0", "--guidance", "4", "--threads", "1"],
])
def test_boundary_values_still_reach_the_model(no_model, tmp_path, argv):
    """The new checks refuse only what cannot work: these arguments get as far as loading the model."""
    with pytest.raises(AssertionError, match="model was loaded"):
        main(["bench", *argv, "--json", str(tmp_path / "sub" / "b.json")])
    assert not (tmp_path / "sub").exists()


@pytest.mark.parametrize("bench, models", [
    ("credit", "sd3"),
    ("train-memory", "sd3"),
    ("train-memory", "sd3,flux,wan"),
])
def test_benches_refuse_when_every_model_needs_the_missing_tiny_pipelines(capsys, no_model, tmp_path, monkeypatch,
                                                                         bench, models):
    """Outside a source checkout (a pip-installed wheel has no tests/tiny_models.py) `--models sd3` skipped its only
    model with a warning and exited 0 having printed nothing (credit) or a table header (train-memory)."""
    import flowalign.bench_credit as BC
    import flowalign.bench_memory as BM

    missing = tmp_path / "no-checkout" / "tests" / "tiny_models.py"
    for module in (BC, BM):
        monkeypatch.setattr(module, "tiny_models_file", lambda: missing)
    out = tmp_path / "b.json"
    line = _fails(capsys, ["bench", bench, "--models", models, "--json", str(out)], f"--models {models!r}",
                  "every requested model would be skipped", "tests/tiny_models.py", "source checkout",
                  "pip install -e .", str(missing))
    for name in models.split(","):
        assert name in line
    assert capsys.readouterr().out == "" and not out.exists()


def test_train_memory_with_path_or_a_shapes_model_is_not_refused_without_the_tiny_pipelines(no_model, tmp_path,
                                                                                         monkeypatch, caplog):
    """Only the tiny pipelines need the checkout: --path still runs, and so does a shipped shapes model next to the
    skipped sd3, which keeps its warning."""
    import logging

    import flowalign.bench_memory as BM

    monkeypatch.setattr(BM, "tiny_models_file", lambda: tmp_path / "tiny_models.py")
    for extra in (["--models", "sd3", "--path", str(tmp_path)], ["--models", "sd3,shapes"]):
        with caplog.at_level(logging.WARNING, logger="flowalign.bench_memory"):
            with pytest.raises(AssertionError, match="model was loaded"):
                main(["bench", "train-memory", *extra, "--threads", "1"])
    assert "sd3 skipped" in caplog.text and "source checkout" in caplog.text


def test_train_memory_still_builds_the_tiny_pipeline_in_a_source_checkout(no_model, tmp_path, monkeypatch):
    """In a checkout (tests/tiny_models.py present, found where the bench looks) `--models sd3` is not refused: it
    gets as far as loading the tiny pipeline (a stand-in module here: building the real one takes seconds)."""
    from pathlib import Path

    import flowalign
    import flowalign.bench_credit as BC
    import flowalign.bench_memory as BM

    here = Path(__file__).with_name("tiny_models.py")
    if Path(flowalign.__file__).resolve().parents[1] != here.resolve().parents[1]:
        pytest.skip("flowalign is not imported from this source tree (an installed wheel): no tiny pipelines")
    assert BM.tiny_models_file() == BC.tiny_models_file() == here.resolve()
    fake = tmp_path / "tiny_models.py"
    fake.write_text("TINY_SIZES = {'sd3': {}}\n\ndef build_tiny_sd3(path):\n    return path\n")
    monkeypatch.setattr(BM, "tiny_models_file", lambda: fake)
    with pytest.raises(AssertionError, match="model was loaded"):
        main(["bench", "train-memory", "--models", "sd3", "--threads", "1", "--json", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.json").exists()


def test_bench_shapes_sample_times_the_imports_in_a_fresh_process_and_names_the_model(monkeypatch):
    """`import_torch_s` was always 0.0: the command times `import torch` inside flowalign's own process, which has
    imported it already. The imports are now timed in a fresh Python process (what a first command pays), the total
    adds them to the load and first sample, and the figures name the model they timed."""
    import flowalign.bench as B

    monkeypatch.setattr(B, "_cold_import_times", lambda: (1.5, 4.0))
    fig = B.bench_shapes_sample(["--n", "1", "--steps", "1", "--repeats", "0"])
    assert fig["path"] == "(the shipped model)"
    assert (fig["import_torch_s"], fig["import_diffusers_s"]) == (1.5, 4.0)
    assert fig["process_total_s"] == pytest.approx(5.5 + fig["load_plus_first_sample_s"], abs=2e-3)


def test_cold_import_times_are_measured_in_a_new_process():
    import sys

    import flowalign.bench as B

    torch_s, libs_s = B._cold_import_times()
    assert torch_s > 0 and libs_s > 0
    assert "torch" in sys.modules  # this process had it: timing here would say 0
