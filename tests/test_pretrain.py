"""Flow-matching pretraining: exact resume, EMA, loss, schedules, the shapes data stream, the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_checks import fails as _cli_fails

from flowalign.cli import main
from flowalign.errors import UserError
from flowalign.pretrain import (PretrainConfig, cli_main, ema_decay_at, ema_model_from_checkpoint, ema_update,
                                flow_matching_loss, logit_normal_sigmas, lr_at, pretrain, shapes_data, step_generator)

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = dict(vocab=["a", "red", "blue", "circle", "square"], image_size=8, patch_size=4, num_layers=1,
                  num_heads=2, head_dim=8, text_dim=16, text_layers=1, text_heads=2, max_len=4, pooled_dim=16,
                  patch_embed_kernel=6, refiner_channels=4)


def toy_data(step: int, batch_size: int):
    """Captions + flat-colored images that depend only on the step (like every real data source)."""
    g = torch.Generator().manual_seed(step)
    which = torch.randint(0, 2, (batch_size,), generator=g)
    caps = ["a red circle" if w == 0 else "a blue square" for w in which.tolist()]
    col = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.2, 0.9]])[which]  # [B, 3]
    imgs = col[:, :, None, None].expand(batch_size, 3, 8, 8) * (0.8 + 0.2 * torch.rand(batch_size, 1, 1, 1, generator=g))
    return caps, imgs.contiguous()


def tiny_cfg(**kw) -> PretrainConfig:
    base = dict(model="shapes", model_config=TINY_MODEL, steps=6, batch_size=4, lr=1e-3, warmup=2,
                checkpoint_every=3, keep_checkpoints=5, log_every=2, ema_decay=0.9, seed=3)
    base.update(kw)
    return PretrainConfig.from_dict(base)


def _load(path):
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    cfg = tiny_cfg()
    full = pretrain(cfg, tmp_path / "a", data=toy_data, progress=False)
    pretrain(cfg, tmp_path / "b", data=toy_data, progress=False, stop_after=3)  # "killed" after step 3
    assert not (tmp_path / "b" / "final").exists()
    resumed = pretrain(cfg, tmp_path / "b", data=toy_data, progress=False, resume=True)
    a, b = _load(tmp_path / "a" / "checkpoints" / "step-6"), _load(tmp_path / "b" / "checkpoints" / "step-6")
    for comp in a["model"]:
        for k, v in a["model"][comp].items():
            assert torch.equal(v, b["model"][comp][k]), (comp, k)
    assert all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"]))
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    # training moved the weights, and the returned model carries the EMA (not the raw weights)
    init = _load(tmp_path / "b" / "checkpoints" / "step-3")
    assert not all(torch.equal(x, y) for x, y in zip(init["ema"], a["ema"]))
    ema_first = a["ema"][0]
    assert torch.equal(next(iter(full.transformer.parameters())), ema_first)
    # the exported final model loads back as a ShapesModel, the checkpoint exports the same EMA weights
    from flowalign.models.shapes import ShapesModel

    back = ShapesModel.from_pretrained(str(tmp_path / "a" / "final"))
    exported = ema_model_from_checkpoint(tmp_path / "a" / "checkpoints" / "step-6")
    for k, v in full.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]) and torch.equal(v, exported.state_dict()[k]), k
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_training_reduces_the_loss(tmp_path):
    cfg = tiny_cfg(steps=40, checkpoint_every=0, log_every=10, lr=3e-3, warmup=5, batch_size=8)
    pretrain(cfg, tmp_path, data=toy_data, progress=False)
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0], losses


def test_ema_update_matches_the_formula():
    torch.manual_seed(0)
    params = [torch.randn(3, 4), torch.randn(5)]
    ema = [torch.randn(3, 4), torch.randn(5)]
    expect = [0.9 * e + 0.1 * p for e, p in zip(ema, params)]
    ema_update(ema, params, 0.9)
    for e, x in zip(ema, expect):
        torch.testing.assert_close(e, x, rtol=0, atol=1e-6)
    # decay warm-up: (1+k)/(10+k) early, the configured decay later
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(10**6, 0.999) == 0.999
    assert all(ema_decay_at(k, 0.999) <= ema_decay_at(k + 1, 0.999) for k in range(0, 3000, 7))
    # a constant parameter is a fixed point
    c = [torch.ones(2)]
    e = [torch.ones(2)]
    ema_update(e, c, 0.5)
    assert torch.equal(e[0], c[0])


def test_loss_sigmas_and_schedules():
    x, eps = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    assert flow_matching_loss(eps - x, x, eps) == 0
    assert flow_matching_loss(torch.zeros_like(x), x, eps) == pytest.approx(((eps - x) ** 2).mean().item())
    s = logit_normal_sigmas(20000, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert 0 < s.min() and s.max() < 1 and abs(s.median().item() - 0.5) < 0.02
    assert torch.equal(torch.randn(3, generator=step_generator(1, 5)), torch.randn(3, generator=step_generator(1, 5)))
    assert step_generator(1, 5).initial_seed() != step_generator(1, 6).initial_seed()
    cfg = PretrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert math.isclose(lr_at(55, cfg), 0.1 + 0.9 * 0.5, rel_tol=1e-9)


def test_config_validation():
    with pytest.raises(UserError, match="did you mean 'batch_size'"):
        PretrainConfig.from_dict({"batchsize": 4})
    assert PretrainConfig.from_dict({"lr": "5e-4"}).lr == 5e-4  # PyYAML reads 5e-4 as a string


def test_shapes_data_stream_is_a_function_of_the_step():
    from flowalign.shapes.grammar import parse

    data = shapes_data({"single_object": 1.0, "counting": 1.0}, image_size=32, seed=7)
    caps, imgs = data(11, 6)
    caps2, imgs2 = data(11, 6)
    caps3, _ = data(12, 6)
    assert caps == caps2 and torch.equal(imgs, imgs2) and caps != caps3
    assert imgs.shape == (6, 3, 32, 32) and imgs.dtype == torch.float32
    assert 0 <= imgs.min() and imgs.max() <= 1
    assert {parse(c).task for c in caps} <= {"single_object", "counting"}
    with pytest.raises(UserError, match="unknown shapes task"):
        shapes_data({"juggling": 1.0})


def test_cli_refuses_to_overwrite_checkpoints(tmp_path):
    (tmp_path / "checkpoints" / "step-3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-3" / "state.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="--resume"):
        cli_main(["--out", str(tmp_path), "--steps", "1"])


def test_init_from_starts_a_stage_from_a_saved_model(tmp_path):
    from flowalign.pretrain import init_weights_from

    stage1 = pretrain(tiny_cfg(checkpoint_every=0), tmp_path / "s1", data=toy_data, progress=False)
    fresh = pretrain(tiny_cfg(steps=1, checkpoint_every=0, lr=0.0, warmup=0), tmp_path / "f", data=toy_data,
                     progress=False)
    # lr 0 and one step: a stage-2 run that starts from stage 1 returns stage 1's weights unchanged
    stage2 = pretrain(tiny_cfg(steps=1, checkpoint_every=0, lr=0.0, warmup=0, init_from=str(tmp_path / "s1" / "final")),
                      tmp_path / "s2", data=toy_data, progress=False)
    for k, v in stage1.state_dict().items():
        assert torch.equal(v, stage2.state_dict()[k]), k
    assert not all(torch.equal(v, fresh.state_dict()[k]) for k, v in stage1.state_dict().items())
    with pytest.raises(UserError, match="not a model directory"):
        init_weights_from(fresh, tmp_path / "nowhere")
    other = pretrain(tiny_cfg(steps=1, checkpoint_every=0, model_config=dict(TINY_MODEL, num_layers=2)),
                     tmp_path / "o", data=toy_data, progress=False)
    with pytest.raises(UserError, match="does not match"):
        init_weights_from(other, tmp_path / "s1" / "final")


def test_shipped_recipe_configs_validate_and_match_the_shipped_model():
    """`make shapes-base` runs these two configs; the shipped model's config is what stage 2 builds."""
    import json
    from pathlib import Path

    from flowalign.pretrain import load_config

    root = Path(__file__).resolve().parents[1]
    s1 = load_config(str(root / "configs/shapes_pretrain.yaml"), {})
    s2 = load_config(str(root / "configs/shapes_pretrain_stage2.yaml"), {})
    assert s2.init_from == "runs/shapes_pretrain/final"
    assert s1.model_config == s2.model_config  # stage 2 continues the same architecture
    shipped = json.loads((root / "flowalign/assets/shapes/config.json").read_text())
    for k, v in s2.model_config.items():
        assert shipped[k] == v, k


def test_resume_with_changed_settings_is_refused_before_anything_is_written(tmp_path):
    """--resume continues the checkpoint's own run: another lr (or seed, steps, data…) would silently mix two runs,
    so it is one line and the run directory stays as it was; output-only fields (log_every, …) may change."""
    cfg = tiny_cfg()
    pretrain(cfg, tmp_path / "b", data=toy_data, progress=False, stop_after=3)
    before = {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"cannot resume .*step-3 with changed settings: lr \(0\.001 → 0\.002\)"):
        pretrain(tiny_cfg(lr=2e-3), tmp_path / "b", data=toy_data, progress=False, resume=True)
    assert {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()} == before
    pretrain(tiny_cfg(log_every=3, keep_checkpoints=4), tmp_path / "b", data=toy_data, progress=False, resume=True)
    assert (tmp_path / "b" / "final").is_dir()


# ----------------------- bad input is one line (exit 2) before any heavy work, and never overwrites an earlier run


def _fails(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err)
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def _tiny_yaml(path):
    """A shapes run that takes about a second (the grammar's vocabulary, 8×8 images)."""
    mc = {k: v for k, v in TINY_MODEL.items() if k not in ("vocab", "max_len")}
    path.write_text(yaml.safe_dump(dict(model="shapes", model_config=mc, data_config={"image_size": 8}, steps=2,
                                        batch_size=2, warmup=1, checkpoint_every=0, log_every=1)))
    return path


@pytest.mark.parametrize("key, value", [("logit_std", "nan"), ("logit_mean", "-inf"), ("lr", "inf"),
                                        ("weight_decay", "nan"), ("min_lr_ratio", "inf")])
def test_non_finite_float_settings_are_refused_at_load(key, value):
    """NaN σ parameters, an infinite lr or a NaN weight decay used to run the whole pretraining and write a NaN
    (or σ = 0 only) model to final/."""
    with pytest.raises(UserError, match=f"pretrain {key} must be") as info:
        PretrainConfig.from_dict({key: value})
    assert "\n" not in str(info.value)


def test_non_finite_lr_flag_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    conf = _tiny_yaml(tmp_path / "tiny.yaml")
    _fails(capsys, ["pretrain", "--config", str(conf), "--out", str(out), "--lr", "inf", "--no-progress"], "lr", "finite")
    assert not out.exists()


def test_seed_beyond_64_bits_is_one_line_exit_2(tmp_path, capsys):
    """torch.manual_seed overflowed with a ValueError traceback (exit 1)."""
    out = tmp_path / "run"
    conf = _tiny_yaml(tmp_path / "tiny.yaml")
    _fails(capsys, ["pretrain", "--config", str(conf), "--out", str(out), "--seed", str(2**64), "--no-progress"],
           "--seed", str(2**64))
    assert not out.exists()
    assert PretrainConfig.from_dict({"seed": 2**64 - 1}).seed == 2**64 - 1  # the whole 64-bit range is fine


def test_out_below_a_file_is_one_line_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    """--out a_file/run crashed with NotADirectoryError at mkdir, after building the model and rendering data."""
    import flowalign.pretrain as pre

    def no_build(cfg):
        raise AssertionError("the model was built before --out was checked")

    monkeypatch.setattr(pre, "build_model", no_build)
    (tmp_path / "a_file").write_text("keep me")
    _fails(capsys, ["pretrain", "--out", str(tmp_path / "a_file" / "run"), "--no-progress"], "a_file", "is a file")
    assert (tmp_path / "a_file").read_text() == "keep me"


def _no_build(monkeypatch):
    import flowalign.pretrain as pre

    def no_build(cfg):
        raise AssertionError("the model was built before --out was checked")

    monkeypatch.setattr(pre, "build_model", no_build)


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("config, needles", [
    ("prompts: [a red circle]\n", ["not empty", "no pretraining run"]),
    ("model: {name: shapes}\nsampler: {steps: 4}\n", ["holds a training run", "choose a new --out"]),  # a train run's
])
def test_another_commands_directory_is_not_written_into(tmp_path, capsys, monkeypatch, resume, config, needles):
    """--out DIR holding e.g. a sample grid and an eval summary got config.yaml, metrics.jsonl, checkpoints/ and final/
    written among them (only checkpoints or final/ were refused)."""
    _no_build(monkeypatch)
    d = tmp_path / "evals"
    d.mkdir()
    (d / "summary.json").write_text("{}")
    (d / "config.yaml").write_text(config)
    argv = ["pretrain", "--out", str(d), "--no-progress"] + (["--resume"] if resume else [])
    _cli_fails(capsys, argv, str(d), *needles)
    assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "summary.json"]


def test_a_run_stopped_before_its_first_checkpoint_needs_resume(tmp_path, capsys, monkeypatch):
    """Without --resume a fresh run is refused there (as train refuses a non-empty run_dir); --resume starts it over."""
    _no_build(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "shapes", "steps": 4, "lr": 1e-3}))
    (run / "metrics.jsonl").write_text("")
    _cli_fails(capsys, ["pretrain", "--out", str(run), "--no-progress"], str(run), "--resume")
    with pytest.raises(AssertionError, match="model was built"):  # --resume passes every check on --out
        main(["pretrain", "--out", str(run), "--no-progress", "--resume"])
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new"):  # and so do an empty and a new directory
        with pytest.raises(AssertionError, match="model was built"):
            main(["pretrain", "--out", str(out), "--no-progress"])


def test_an_out_that_cannot_be_written_is_one_line_before_the_model_is_built(capsys, monkeypatch):
    """--out /sys/pt (root may not create files there, though os.access says it may) or under a directory that cannot
    be made failed at mkdir with a traceback, after building the model and rendering data."""
    _no_build(monkeypatch)
    for out in ("/sys/pt", "/proc/sub/pt"):
        _cli_fails(capsys, ["pretrain", "--out", out, "--no-progress"], f"--out {out!r}", "cannot be written")


@pytest.mark.parametrize("resume", [False, True])
def test_a_finished_run_without_checkpoints_is_not_overwritten(tmp_path, capsys, resume):
    """A finished run whose checkpoints were deleted (they are most of its disk) had its metrics.jsonl emptied at
    once and its final/ model replaced by a new run's; --resume 'started fresh' and did the same."""
    conf = _tiny_yaml(tmp_path / "tiny.yaml")
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(conf), "--out", str(run), "--no-progress"]) == 0
    shutil.rmtree(run / "checkpoints")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    argv = ["pretrain", "--config", str(conf), "--out", str(run), "--seed", "5", "--no-progress"]
    _fails(capsys, argv + (["--resume"] if resume else []), "final/", "choose a new --out")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def _cfg(**kw):
    from flowalign.pretrain import PretrainConfig

    base = dict(model="shapes", model_config=TINY_MODEL, steps=4, batch_size=2, lr=1e-3, warmup=1, checkpoint_every=2,
                keep_checkpoints=5, log_every=1, ema_decay=0.9, seed=3)
    base.update(kw)
    return PretrainConfig.from_dict(base)


@pytest.mark.parametrize("bad, needle", [
    ({"seed": -1}, "seed"),
    ({"data_config": None}, "data_config"),
    ({"model_config": "patch_size: 4"}, "model_config"),
    ({"betas": [0.9]}, "betas"),
])
def test_pretrain_config_rejects_values_that_crash_later(bad, needle):
    from flowalign.pretrain import PretrainConfig

    with pytest.raises(UserError, match=needle) as info:
        PretrainConfig.from_dict(bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("data_config, needle", [
    ({"task_weights": {"single_object": 0.0}}, "task_weights"),
    ({"task_weights": {"single_object": -1.0, "counting": 2.0}}, "task_weights"),
    ({"task_weights": ["single_object"]}, "task_weights"),
    ({"image_sise": 8}, "image_sise"),
    ({"seed": 4}, "seed"),
    ({"image_size": 16}, "image_size"),  # the model is 8x8
])
def test_pretrain_bad_data_config_is_one_line_before_anything_is_written(tmp_path, data_config, needle):
    from flowalign.pretrain import pretrain

    out = tmp_path / "run"
    with pytest.raises(UserError, match=needle) as info:
        model_config = {k: v for k, v in TINY_MODEL.items() if k not in ("vocab", "max_len")}  # the grammar's words
        pretrain(_cfg(model_config=model_config, data_config=dict({"image_size": 8}, **data_config)), out, progress=False)
    assert "\n" not in str(info.value)
    assert not out.exists()


VIDEO_MODEL = {"image_size": 32, "patch_size": 4, "num_layers": 1, "num_heads": 2, "head_dim": 8, "ffn_dim": 16,
               "freq_dim": 8, "text_dim": 16, "text_layers": 1, "text_heads": 2, "pooled_dim": 8}


@pytest.mark.parametrize("frames", [2, 3, 4])
def test_motion_data_too_short_for_the_verifier_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch,
                                                                                     frames):
    """data_config.frames 2-4 pretrained on clips that their own motion reward fails (the slowest object travels
    under MIN_TRAVEL): now one line naming the minimum and why, before the model is built or anything written."""
    _no_build(monkeypatch)
    cfg = tmp_path / "pt.yaml"
    cfg.write_text(yaml.safe_dump({"model": "shapes_video", "model_config": {**VIDEO_MODEL, "frames": frames},
                                   "data": "shapes_motion", "data_config": {"image_size": 32, "frames": frames},
                                   "steps": 1, "batch_size": 2, "threads": 1}))
    out = tmp_path / "run"
    _fails(capsys, ["pretrain", "--config", str(cfg), "--out", str(out), "--no-progress"],
           f"data_config.frames must be an integer >= 5, got {frames}", "motion verifier", "slowest speed")
    assert not out.exists()


def test_a_frame_count_mismatch_names_the_frames(tmp_path, monkeypatch):
    """data_config.frames 16 against model_config.frames 8 said 'make data_config.image_size match
    model_config.image_size'. Both given: refused before the model is built; the model's default (8) against the
    data's: refused after it is built, before anything is written, naming both values."""
    cfg = _cfg(model="shapes_video", model_config={**VIDEO_MODEL, "frames": 8}, data="shapes_motion",
               data_config={"image_size": 32, "frames": 16})
    with monkeypatch.context() as m:
        _no_build(m)
        with pytest.raises(UserError, match=r"make data_config.frames \(16\) match model_config.frames \(8\)$") as e:
            pretrain(cfg, tmp_path / "a", progress=False)
    assert "image_size" not in str(e.value) and "\n" not in str(e.value)
    cfg = _cfg(model="shapes_video", model_config=VIDEO_MODEL, data="shapes_motion",
               data_config={"image_size": 32, "frames": 16})
    with pytest.raises(UserError, match=r"encode to \[3, 16, 32, 32\] but model 'shapes_video' works on "
                       r"\[3, 8, 32, 32\]; make data_config.frames \(16\) match model_config.frames \(8\)$"):
        pretrain(cfg, tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------------- --threads


@pytest.mark.parametrize("value", [str(2**31), str(2**70), "-1", "100000"])
def test_pretrain_refuses_impossible_thread_counts_in_one_line(tmp_path, capsys, value):
    """2**31 overflowed torch.set_num_threads (a ValueError traceback, exit 1); 100000 threads was accepted."""

    out = tmp_path / "run"
    conf = _tiny_yaml(tmp_path / "tiny.yaml")
    before = torch.get_num_threads()
    _cli_fails(capsys, ["pretrain", "--config", str(conf), "--out", str(out), "--threads", value, "--no-progress"],
           "--threads", value)
    assert not out.exists()
    assert torch.get_num_threads() == before


def test_pretrain_restores_the_callers_thread_count(tmp_path, monkeypatch):
    """An in-process run (tests, notebooks) left torch at the run's thread count for the rest of the process."""
    import flowalign.pretrain as P

    before = torch.get_num_threads()
    want = before + 1
    seen = []
    real = P.train_step
    monkeypatch.setattr(P, "train_step", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    P.pretrain(tiny_cfg(steps=1, checkpoint_every=0, threads=want), tmp_path / "a", data=toy_data, progress=False)
    assert seen == [want]  # the run used its threads...
    assert torch.get_num_threads() == before  # ...and gave the caller's back
    # also when the run fails (here: images of another size than the model's)
    with pytest.raises(UserError):
        P.pretrain(tiny_cfg(steps=1, threads=want), tmp_path / "b",
                   data=lambda step, bs: (["a red circle"] * bs, torch.rand(bs, 3, 16, 16)), progress=False)
    assert torch.get_num_threads() == before


def test_pretrain_cli_in_process_keeps_the_thread_count(tmp_path, capsys):
    before = torch.get_num_threads()
    conf = _tiny_yaml(tmp_path / "tiny.yaml")
    assert main(["pretrain", "--config", str(conf), "--out", str(tmp_path / "run"), "--threads", str(before + 1),
                 "--no-progress"]) == 0
    assert (tmp_path / "run" / "final").is_dir()
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------------------------- resume


def test_a_copied_checkpoint_directory_does_not_break_resume(tmp_path, capsys):
    """`cp -r step-3 step-3.bak` (a backup before an experiment) made every later run in that directory die with
    ValueError: invalid literal for int() ... '3.bak'."""
    cfg = tiny_cfg()
    full = pretrain(cfg, tmp_path / "full", data=toy_data, progress=False)
    run = tmp_path / "cut"
    pretrain(cfg, run, data=toy_data, progress=False, stop_after=3)
    shutil.copytree(run / "checkpoints" / "step-3", run / "checkpoints" / "step-3.bak")
    (run / "checkpoints" / "step-").mkdir()
    (run / "checkpoints" / "step-" / "state.pt").write_bytes(b"x")
    resumed = pretrain(cfg, run, data=toy_data, progress=False, resume=True)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    # the CLI still sees the real checkpoints and refuses a fresh run over them
    _fails(capsys, ["pretrain", "--out", str(run), "--steps", "1", "--no-progress"], "already holds checkpoints")


def test_resume_without_a_checkpoint_still_starts_from_init_from(tmp_path):
    from flowalign.pretrain import pretrain

    stage1 = pretrain(_cfg(checkpoint_every=0), tmp_path / "s1", data=toy_data, progress=False)
    cfg2 = _cfg(steps=1, checkpoint_every=0, lr=0.0, warmup=0, init_from=str(tmp_path / "s1" / "final"))
    # e.g. stage 2 was interrupted before its first checkpoint and restarted with --resume, as the CLI suggests
    stage2 = pretrain(cfg2, tmp_path / "s2", data=toy_data, progress=False, resume=True)
    for k, v in stage1.state_dict().items():
        assert torch.equal(v, stage2.state_dict()[k]), k


def test_resume_rewrites_the_metrics_logged_after_the_last_checkpoint(tmp_path):
    from flowalign.pretrain import pretrain

    cfg = _cfg(steps=6, checkpoint_every=3, log_every=1)
    full = tmp_path / "full"
    pretrain(cfg, full, data=toy_data, progress=False)

    def dies_at_step_5(step, bs):
        if step == 5:
            raise KeyboardInterrupt
        return toy_data(step, bs)

    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, killed, data=dies_at_step_5, progress=False)  # logged steps 1..5, last checkpoint at 3
    pretrain(cfg, killed, data=toy_data, progress=False, resume=True)

    def rows(d):
        return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in rows(killed)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows(killed)] == [r["loss"] for r in rows(full)]


def test_resume_logs_the_same_loss_when_a_checkpoint_falls_inside_a_log_window(tmp_path):
    """checkpoint_every = 3, log_every = 2: the row of step 4 averages steps 3 and 4; the resumed run used to average
    only step 4 (its window restarted at the checkpoint)."""
    from flowalign.pretrain import pretrain

    cfg = tiny_cfg()
    assert (cfg.checkpoint_every, cfg.log_every, cfg.steps) == (3, 2, 6)
    pretrain(cfg, tmp_path / "full", data=toy_data, progress=False)
    pretrain(cfg, tmp_path / "cut", data=toy_data, progress=False, stop_after=3)
    pretrain(cfg, tmp_path / "cut", data=toy_data, progress=False, resume=True)

    def rows(d):
        return [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]

    assert rows(tmp_path / "cut") == rows(tmp_path / "full")
    assert [s for s, _ in rows(tmp_path / "full")] == [2, 4, 6]


def _tiny_run_cut(tmp_path, steps=2):
    """The tiny CLI config (registered shapes data) run as `flowalign pretrain --config C --out run` that was
    interrupted after its step-1 checkpoint."""
    from flowalign.pretrain import load_config

    conf = _tiny_yaml(tmp_path / "tiny.yaml")
    run = tmp_path / "run"
    pretrain(load_config(str(conf), {"steps": steps}), run, progress=False, stop_after=1)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-1"] and not (run / "final").exists()
    return conf, run


def test_resume_without_the_config_continues_with_the_runs_own(tmp_path, capsys):
    """The interrupt hint said "--resume (same --out)", but `pretrain --out D --resume` without the original --config
    compared the checkpoint with the defaults and failed with 'changed settings'; now the run's config.yaml is used."""
    _conf, run = _tiny_run_cut(tmp_path)
    assert main(["pretrain", "--out", str(run), "--resume", "--no-progress"]) == 0, capsys.readouterr().err
    assert (run / "final" / "model.safetensors").is_file() and (run / "checkpoints" / "step-2").is_dir()
    assert yaml.safe_load((run / "config.yaml").read_text())["steps"] == 2
    # a flag that changes the run is still refused against the saved config
    shutil.rmtree(run / "final")
    _fails(capsys, ["pretrain", "--out", str(run), "--resume", "--lr", "0.5", "--no-progress"], "changed settings",
           "lr")
    from flowalign.cli import INTERRUPT_HINTS

    assert "--config and flags as before, or none" in INTERRUPT_HINTS["pretrain"]


def test_resume_of_a_finished_run_rewrites_only_its_final_model(tmp_path, capsys):
    """`make shapes-base` passes --resume so that running it again continues an interrupted stage: on a new --out it
    starts fresh, on a finished run it leaves the checkpoints and metrics as they were and writes the same final/."""
    conf = _tiny_yaml(tmp_path / "tiny.yaml")
    run = tmp_path / "new"
    argv = ["pretrain", "--config", str(conf), "--out", str(run), "--resume", "--no-progress"]
    assert main(argv) == 0 and (run / "final").is_dir()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(argv) == 0
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_the_make_targets_that_pretrain_can_continue_after_an_interruption():
    from pathlib import Path

    lines = [ln for ln in (Path(__file__).parents[1] / "Makefile").read_text().splitlines() if "flowalign pretrain" in ln]
    assert len(lines) == 4 and all("--resume" in ln.split() for ln in lines), lines


def test_a_report_on_a_pretraining_run_does_not_stop_it_from_resuming(tmp_path, capsys):
    """`flowalign report RUN` writes report.html and plots/ into the run; --resume then refused the directory as one
    that 'holds no pretraining run', and the report said the config 'does not load with this version'."""
    from flowalign.report import write_report

    conf, run = _tiny_run_cut(tmp_path)
    page = write_report(run).read_text()
    assert (run / "plots").is_dir()
    assert "does not load" not in page and "Pretraining run" in page and "--resume" in page
    assert "no <code>nfe/*</code> counters" not in page
    assert main(["pretrain", "--config", str(conf), "--out", str(run), "--resume", "--no-progress"]) == 0
    page = write_report(run, make_plots=False).read_text()
    assert "finished; final/ holds its EMA model" in page


@pytest.mark.parametrize("model, data, needle", [
    ("shapes_video", None, "model shapes_video takes videos but data 'shapes' gives images; set data: shapes_motion"),
    ("shapes", "shapes_motion", "model shapes takes images but data 'shapes_motion' gives videos; set data: shapes"),
])
def test_a_model_of_another_kind_than_the_data_is_one_line_before_it_is_built(tmp_path, capsys, monkeypatch, model,
                                                                              data, needle):
    """A video model on the default (image) data crashed with a ValueError traceback in encode_images."""
    _no_build(monkeypatch)
    conf = tmp_path / "pt.yaml"
    conf.write_text(yaml.safe_dump({"model": model, **({"data": data} if data else {}), "steps": 1, "batch_size": 2}))
    out = tmp_path / "run"
    _fails(capsys, ["pretrain", "--config", str(conf), "--out", str(out), "--no-progress"], needle)
    assert not out.exists()
    from flowalign.pretrain import DATA_KINDS, DATA_SOURCES

    assert set(DATA_KINDS) == set(DATA_SOURCES)


def test_data_passed_in_of_another_kind_is_one_line(tmp_path):
    cfg = _cfg(model="shapes_video", model_config=VIDEO_MODEL, data="shapes_motion",
               data_config={"image_size": 32, "frames": 8})
    with pytest.raises(UserError, match=r"model 'shapes_video' cannot encode the data \(shape \[3, 8, 8\]") as e:
        pretrain(cfg, tmp_path / "a", data=toy_data, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "a").exists()


# ------------------------------------------------------------------- the objective and its draws, pinned exactly


class _RecordingModel:
    """A pretrainable stand-in: identity encoder, v = w·x_σ, and a record of what the training forward was given."""

    def __init__(self):
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen = {}

    def encode_images(self, images):
        return images.clone()

    def encode(self, captions):
        self.seen["captions"] = list(captions)
        return captions

    def velocity(self, x_sigma, sigma, cond):
        self.seen["x_sigma"], self.seen["sigma"] = x_sigma.detach().clone(), sigma.detach().clone()
        return self.w * x_sigma


def test_train_step_regresses_onto_eps_minus_x_at_the_sd3_interpolation_of_its_own_draws():
    """SD3 Eq. 1–3: x_σ = (1 − σ)·x + σ·ε, the model sees (x_σ, σ) and the caption or "" (dropout), loss =
    mean ‖v − (ε − x)‖². Every draw comes from step_generator(seed, step) in the order dropout, σ, ε."""
    from flowalign.pretrain import train_step

    cfg = PretrainConfig(seed=5, batch_size=6, caption_dropout=0.5, logit_mean=0.3, logit_std=0.8,
                         uniform_fraction=0.25, lr=0.0, warmup=0, grad_clip=0.0)
    caps = [f"c{k}" for k in range(6)]
    images = torch.rand(6, 3, 2, 2, generator=torch.Generator().manual_seed(1))  # [B, 3, H, W]
    model = _RecordingModel()
    opt = torch.optim.SGD([model.w], lr=0.0)
    loss = train_step(model, opt, lambda step, b: (caps, images), 4, cfg)
    g = step_generator(5, 4)
    drop = torch.rand(6, generator=g) < 0.5  # [B]
    sigma = logit_normal_sigmas(6, 0.3, 0.8, g, 0.25)  # [B]
    eps = torch.randn(images.shape, generator=g)  # [B, 3, H, W]
    assert 0 < int(drop.sum()) < 6  # both kinds of caption occur, so a flipped test shows
    assert model.seen["captions"] == ["" if d else c for c, d in zip(caps, drop.tolist())]
    assert torch.equal(model.seen["sigma"], sigma)  # σ itself, not 1 − σ (σ = 1 is pure noise)
    s = sigma.view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    torch.testing.assert_close(model.seen["x_sigma"], (1 - s) * images + s * eps, rtol=0, atol=1e-6)
    want = ((1 - s) * images + s * eps - (eps - images)).pow(2).mean()  # v = x_σ (w = 1), target ε − x
    assert loss == pytest.approx(want.item(), rel=1e-6)


def test_logit_normal_sigmas_are_sigmoid_of_mean_plus_std_normal_with_the_uniform_share_mixed_in():
    """SD3 §3.1 lognorm(m, s): σ = sigmoid(m + s·n); each draw is replaced by U(0, 1) with probability
    ``uniform_fraction`` (0: pure logit-normal, 1: pure uniform), drawn as n, then u, then the pick."""
    g = torch.Generator().manual_seed(0)
    n, u, pick = torch.randn(4000, generator=g), torch.rand(4000, generator=g), torch.rand(4000, generator=g)
    ln = torch.sigmoid(0.7 + 1.3 * n)  # [4000]
    for frac, want in ((0.0, ln), (1.0, u), (0.3, torch.where(pick < 0.3, u, ln))):
        got = logit_normal_sigmas(4000, 0.7, 1.3, torch.Generator().manual_seed(0), frac)  # [4000]
        assert torch.equal(got, want), frac
    # the location moves the median to sigmoid(m) (the default tests use m = 0, where sigmoid(m) = 0.5)
    s = logit_normal_sigmas(20000, 1.0, 1.0, torch.Generator().manual_seed(1))
    assert abs(s.median().item() - 1 / (1 + math.exp(-1.0))) < 0.01


def test_step_draws_depend_on_the_seed_and_the_lr_decays_on_a_cosine():
    """step_generator is a function of (seed, step): another seed draws other σ, ε and dropout at the same step.
    lr_at after warm-up is lr·(r + (1 − r)·½(1 + cos(π·frac))), not a linear ramp (which agrees at frac 0, ½, 1)."""
    assert step_generator(1, 5).initial_seed() != step_generator(2, 5).initial_seed()
    assert not torch.equal(torch.randn(4, generator=step_generator(1, 5)), torch.randn(4, generator=step_generator(2, 5)))
    cfg = PretrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    for step in (10, 32, 55, 77, 99):
        frac = (step - 10) / 90
        assert lr_at(step, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)), rel=1e-12)


def test_shapes_data_draws_image_k_of_step_t_from_seed_t_k():
    """Image k of step t uses numpy.random.default_rng((seed, t, k)) (shapes_data's docstring): each image of a batch
    is its own draw, reproducible one by one."""
    import numpy as np

    from flowalign.shapes.grammar import sample_spec, to_prompt

    caps, imgs = shapes_data({"counting": 1.0}, image_size=16, seed=7)(11, 5)
    for k in range(5):
        rng = np.random.default_rng((7, 11, k))
        rng.choice(1, p=[1.0])  # the task draw (one task here)
        assert caps[k] == to_prompt(sample_spec(rng, "counting")), k
    assert len(set(caps)) > 1 and not torch.equal(imgs[0], imgs[1])



# ------------------------------------------------------------------------- a training run's directory, the defaults


def _training_run(d, *, config=True, checkpoints=True):
    """A `flowalign train` run as it lies on disk (its resolved config.yaml; checkpoints/step-N/ with the LoRA, raw/,
    state.pt, meta.json and COMPLETE, as train._save_checkpoint writes them), built without training."""
    from flowalign import config as C

    d.mkdir()
    if config:
        C.dump_yaml(C.load_config(str(ROOT / "configs" / "shapes_grpo.yaml"), []), d / "config.yaml")
    (d / "metrics.jsonl").write_text('{"iteration": 1, "time/elapsed_s": 1.5}\n{"iteration": 2, "time/elapsed_s": 3.0}\n')
    (d / "report.html").write_text("<html></html>\n")
    for step in (1, 2) if checkpoints else ():
        ck = d / "checkpoints" / f"step-{step}"
        (ck / "raw").mkdir(parents=True)
        (ck / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
        (ck / "raw" / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
        torch.save({"iteration": step, "optimizer": {}, "ema": None, "sampler": {}, "nfe": {},
                    "torch_rng": torch.get_rng_state()}, ck / "state.pt")
        (ck / "meta.json").write_text(json.dumps({"iteration": step, "world_size": 1}) + "\n")
        (ck / "COMPLETE").write_text(str(step))
    return d


def _tree(d):
    return {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}


@pytest.mark.parametrize("evidence", ["both", "config", "checkpoints"])
@pytest.mark.parametrize("flags", [["--config", "TINY"], ["--config", "TINY", "--resume"], ["--resume"], []])
def test_a_training_run_is_refused_in_one_line_before_any_other_message(tmp_path, capsys, monkeypatch, evidence, flags):
    """--out RUN of `flowalign train` said 'already holds checkpoints; pass --resume', then with --resume 'cannot read
    checkpoint .../step-2/state.pt ...; delete .../step-2' (advice that deletes a training run's checkpoints one by one);
    --resume alone said "unknown pretrain config key 'sampler'". Now one line names it, and nothing there changes."""
    _no_build(monkeypatch)
    run = _training_run(tmp_path / "RUN", config=evidence != "checkpoints", checkpoints=evidence != "config")
    before = _tree(run)
    conf = str(_tiny_yaml(tmp_path / "tiny.yaml"))
    argv = ["pretrain", *[conf if a == "TINY" else a for a in flags], "--out", str(run), "--no-progress"]
    line = _cli_fails(capsys, argv, f"{str(run)!r} holds a training run (flowalign train), not a pretraining run; "
                                    "choose a new --out")
    assert "delete" not in line and "--resume" not in line
    assert _tree(run) == before


def test_resuming_into_a_training_run_never_advises_deleting_its_checkpoints(tmp_path):
    """The library path (no CLI checks): the training run is named, the directory left as it was; the 'delete
    step-N' advice stays for a pretraining run's own unreadable checkpoint."""
    run = _training_run(tmp_path / "RUN")
    before = _tree(run)
    with pytest.raises(UserError, match="holds a training run") as info:
        pretrain(tiny_cfg(), run, data=toy_data, progress=False, resume=True)
    assert "delete" not in str(info.value) and _tree(run) == before
    # a directory with another config.yaml and a checkpoint: no pretraining run either, nothing to delete there
    other = tmp_path / "other"
    (other / "checkpoints" / "step-1").mkdir(parents=True)
    (other / "checkpoints" / "step-1" / "state.pt").write_bytes(b"x")
    (other / "config.yaml").write_text("prompts: [a red circle]\n")
    with pytest.raises(UserError, match="holds no pretraining run") as info:
        pretrain(tiny_cfg(), other, data=toy_data, progress=False, resume=True)
    assert "delete" not in str(info.value)
    # a pretraining run whose newest checkpoint was cut short: deleting it resumes from the one before
    cut = tmp_path / "cut"
    pretrain(tiny_cfg(), cut, data=toy_data, progress=False, stop_after=6)
    (cut / "checkpoints" / "step-6" / "state.pt").write_bytes(b"truncated")
    with pytest.raises(UserError, match=r"cannot read checkpoint .*step-6.*; delete .*step-6 to resume"):
        pretrain(tiny_cfg(), cut, data=toy_data, progress=False, resume=True)


def test_help_states_the_default_recipe_and_a_run_without_config_logs_it(tmp_path, capsys, monkeypatch, caplog):
    """Without --config a 3000-step, batch-64 run started silently on a recipe that is neither shipped stage."""
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    d = PretrainConfig()
    for needle in (f"{d.steps} steps", f"batch {d.batch_size}", f"lr {d.lr:g}", "neither shipped stage",
                   "make shapes-base", "configs/shapes_pretrain.yaml", "configs/shapes_pretrain_stage2.yaml"):
        assert needle in text, (needle, text)
    assert (d.steps, d.batch_size) == (3000, 64)
    make = (ROOT / "Makefile").read_text().split("\nshapes-base:")[1].split("\n\n")[0]
    assert "--config configs/shapes_pretrain.yaml " in make and "--config configs/shapes_pretrain_stage2.yaml " in make
    _no_build(monkeypatch)

    def logged(*flags):
        caplog.clear()
        with caplog.at_level("INFO", logger="flowalign.pretrain"), pytest.raises(AssertionError, match="model was built"):
            main(["pretrain", *flags, "--out", str(tmp_path / f"run{len(flags)}"), "--no-progress"])
        return [r.getMessage() for r in caplog.records if "no --config" in r.getMessage()]

    [line] = logged()
    assert "default recipe (steps 3000, batch 64, lr 0.0005), neither shipped stage" in line, line
    assert "configs/shapes_pretrain.yaml" in line and "make shapes-base" in line
    assert logged("--config", str(_tiny_yaml(tmp_path / "tiny.yaml"))) == []


def _rows(d):
    return {r["step"]: r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}


def test_metrics_seconds_go_on_across_a_resume(tmp_path):
    """`seconds` restarted at 0 after a resume (step 4: 0.32 s uninterrupted, 0.04 s resumed); it now counts from the
    checkpoint's wall time, and the resumed weights stay bitwise those of the uninterrupted run."""
    cfg = tiny_cfg(log_every=1)
    full = pretrain(cfg, tmp_path / "full", data=toy_data, progress=False)
    run = tmp_path / "cut"
    pretrain(cfg, run, data=toy_data, progress=False, stop_after=3)
    state = _load(run / "checkpoints" / "step-3")
    assert state["seconds"] >= _rows(run)[3]["seconds"] > 0
    state["seconds"] = 1000.0  # as if the first session had run for 1000 s
    torch.save(state, run / "checkpoints" / "step-3" / "state.pt")
    resumed = pretrain(cfg, run, data=toy_data, progress=False, resume=True)
    rows = _rows(run)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6] and rows[3]["seconds"] < 1000
    assert 1000 <= rows[4]["seconds"] <= rows[5]["seconds"] <= rows[6]["seconds"]
    assert _load(run / "checkpoints" / "step-6")["seconds"] >= rows[6]["seconds"]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_a_checkpoint_without_seconds_resumes_from_the_logged_seconds(tmp_path):
    """A checkpoint written before `seconds` was stored: the last logged row up to it gives the run's time so far."""
    cfg = tiny_cfg(log_every=1)
    run = tmp_path / "cut"
    pretrain(cfg, run, data=toy_data, progress=False, stop_after=3)
    state = _load(run / "checkpoints" / "step-3")
    del state["seconds"]
    torch.save(state, run / "checkpoints" / "step-3" / "state.pt")
    rows = [dict(r, seconds=100.0 * r["step"]) for r in _rows(run).values()]  # step 3 logged at 300 s
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pretrain(cfg, run, data=toy_data, progress=False, resume=True)
    assert 300 <= _rows(run)[4]["seconds"] < 400
    # and without any metrics row either: from 0, as before
    pretrain(cfg, tmp_path / "bare", data=toy_data, progress=False, stop_after=3)
    state = _load(tmp_path / "bare" / "checkpoints" / "step-3")
    del state["seconds"]
    torch.save(state, tmp_path / "bare" / "checkpoints" / "step-3" / "state.pt")
    (tmp_path / "bare" / "metrics.jsonl").unlink()
    pretrain(cfg, tmp_path / "bare", data=toy_data, progress=False, resume=True)
    assert 0 <= _rows(tmp_path / "bare")[4]["seconds"] < 300
