"""Review of the trainer (train.py, config.py): periodic eval at the last iteration, TensorBoard on resume, SDE
windows against train.fraction, non-finite settings, grid_prompts=0, resume bounds and duplicated end-of-run lines,
the rank's GPU under a multi-process launch."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from flowalign import config as C
from flowalign.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

def _cfg(run, *extra):
    """test_train_update's small shapes run, with one optimizer step per iteration."""
    from test_train_update import _cfg as small

    return small(run, "train.optimizer_steps_per_iter=1", *extra)


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_periodic_eval_runs_at_the_last_iteration_when_the_final_eval_is_off(tmp_path):
    """eval.every=1 with eval.after=false: the last iteration was skipped (it is left to the final eval, which is
    off), so the run's last weights were never evaluated."""
    from flowalign.train import train

    run = train(_cfg(tmp_path / "run", "eval.every=1"))
    lines = _lines(run)
    assert [m["iteration"] for m in lines] == [1, 2]
    assert all("eval/overall/shapes_strict" in m for m in lines)
    assert (run / "eval" / "step-2" / "summary.json").exists()


def test_tensorboard_drops_the_events_a_killed_run_logged_after_its_checkpoint(tmp_path):
    """metrics.jsonl is cut back to the checkpoint on resume; TensorBoard showed the re-run iteration twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flowalign.train import train

    args = ("train.iterations=3", "train.checkpoint_every=2", "output.tensorboard=true")
    run = train(_cfg(tmp_path / "run", *args))
    shutil.rmtree(run / "checkpoints" / "step-3")  # as if killed after logging iteration 3, before its checkpoint
    train(_cfg(tmp_path / "run", *args, "output.resume=true"))
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("reward/shapes_partial")] == [1, 2, 3]
    assert [m["iteration"] for m in _lines(run)] == [1, 2, 3]


def test_an_sde_window_trains_its_steps_whatever_train_fraction_says(tmp_path):
    """shapes_grpo.yaml has train_fraction 0.6: with sampler.steps=4 only steps 0, 1 passed the 'first' mask, so a
    window at step 2 trained nothing although the summary (and derived) promised window_size steps per rollout."""
    from flowalign.train import train

    cfg = _cfg(tmp_path / "run", "train.iterations=1", "train.filter_zero_std=false", "sampler.window_size=1",
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

    run = train(_cfg(tmp_path / "run", "train.iterations=1", "eval.before=true", "eval.grid_prompts=0"))
    assert (run / "eval" / "base" / "summary.json").exists() and not list((run / "grids").glob("*.png"))


def test_resume_with_fewer_iterations_than_the_checkpoint_is_refused_before_writing(tmp_path):
    """It ran nothing and logged the checkpoint's weights as the final eval of an earlier iteration."""
    from flowalign.train import train

    run = train(_cfg(tmp_path / "run", "train.iterations=1"))
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match="train.iterations >= 1"):
        train(_cfg(tmp_path / "run", "train.iterations=0", "eval.after=true", "output.resume=true"))
    assert (run / "metrics.jsonl").read_text() == before  # refused before anything was written


def test_resuming_a_finished_run_does_not_duplicate_its_final_eval(tmp_path):
    """A run killed in (or after) its final eval repeats it on resume: the earlier final-eval line was kept too."""
    from flowalign.train import train

    run = train(_cfg(tmp_path / "run", "train.iterations=1", "eval.after=true"))
    train(_cfg(tmp_path / "run", "train.iterations=1", "eval.after=true", "output.resume=true"))
    assert [m["iteration"] for m in _lines(run) if "eval/overall/shapes_strict" in m] == [1]

    train(_cfg(tmp_path / "run", "train.iterations=2", "eval.after=true", "output.resume=true"))  # a longer run
    lines = _lines(run)
    assert [m["iteration"] for m in lines if "eval/overall/shapes_strict" in m] == [1, 2]  # the eval at 1 stays
    assert [m["iteration"] for m in lines if "train/lr" in m] == [1, 2]


def test_each_rank_takes_its_own_gpu_under_a_multi_process_launch(monkeypatch):
    from flowalign import train as T

    assert hasattr(T, "_process_device")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # what accelerate set for local rank 3
    assert T._process_device("cuda:1", 4) == torch.device("cuda", 3)
    assert T._process_device("cuda", 4) == torch.device("cuda", 3)
    assert T._process_device("cuda:1", 1) == torch.device("cuda", 1)
    assert T._process_device("cpu", 4) == torch.device("cpu")


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
