"""Review of `flowalign pretrain`: bad input is one line (exit 2) before any heavy work, and never overwrites an
earlier run; a stray copy of a checkpoint directory does not break resuming (tests fail on the old code)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from flowalign.cli import main
from flowalign.errors import UserError
from flowalign.pretrain import PretrainConfig, pretrain

from test_pretrain import TINY_MODEL, tiny_cfg, toy_data


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
