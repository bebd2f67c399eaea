"""Video models end to end: image rewards score Wan's [B,F,3,H,W] outputs frame by frame, in training and eval.

The trainer and ``flowalign eval`` used to hand the Wan adapter's 5-D videos straight to image rewards, which
refuse them, so ``configs/wan21_hps.yaml`` could not run. ``rewards.video.for_outputs`` now wraps them in
``PerFrame`` with the ``reward.per_frame`` options.
"""

from __future__ import annotations

import json

import pytest
import torch

from flowalign import config as C
from flowalign.errors import UserError
from flowalign.rewards import build_reward
from flowalign.rewards.video import PerFrame, check_per_frame, for_outputs
from tiny_models import TINY_SIZES

PROMPTS = ["a cat", "a red dog"]


def test_for_outputs_wraps_image_rewards_on_video_models_only():
    sat = build_reward("saturation")
    assert for_outputs(sat, "image") is sat
    wrapped = for_outputs(sat, "video", {"stride": 2, "reduce": "min"})
    assert isinstance(wrapped, PerFrame) and wrapped.stride == 2 and wrapped.reduce == "min"
    videos = torch.rand(3, 5, 3, 8, 8)  # [B, F, 3, H, W]
    frames = torch.stack([sat(videos[:, f], ["p"] * 3) for f in (0, 2, 4)], 1)  # [B, 3]
    assert torch.allclose(wrapped(videos, ["p"] * 3), frames.min(1).values)
    assert for_outputs(wrapped, "video") is wrapped  # already a video reward
    with pytest.raises(UserError, match="scores videos but the model makes images"):
        for_outputs(wrapped, "image")


@pytest.mark.parametrize("options, needle", [
    ({"strid": 2}, "has no argument 'strid'"), ({"reduce": "max"}, "unknown reduce 'max'"),
    ({"stride": 0}, "stride must be an integer >= 1"), ({"temporal": "flow"}, "unknown temporal 'flow'"),
])
def test_bad_per_frame_options_are_one_line_errors(options, needle):
    with pytest.raises(UserError, match=needle):
        check_per_frame(options)


def _wan_cfg(wan_dir, prompt_file, run_dir, *extra):
    size = TINY_SIZES["wan"]
    kw = ", ".join(f"{k}: {v}" for k, v in size.items())
    return C.load_config(None, [
        "model.name=wan", f"model.path={wan_dir}", f"model.kwargs={{{kw}}}", "model.guidance=2.0",
        "model.lora_rank=4", "model.lora_alpha=8", "sampler.kernel=dance_sde", "sampler.eta=0.3", "sampler.steps=3",
        "reward.weights={saturation: 1.0}", f"data.train_prompts={prompt_file}", f"data.eval_prompts={prompt_file}",
        "eval.rewards=[saturation]", "eval.before=false", "eval.after=true", "eval.steps=2", "eval.seeds_per_prompt=1",
        "eval.grid_prompts=2", "train.iterations=1", "train.groups_per_iter=2", "train.group_size=2",
        "train.micro_batch=4", "train.lr=1e-2", "train.clip_range=0.2", "train.checkpoint_every=1", "train.ema=false",
        "train.filter_zero_std=false", "output.tensorboard=false", f"output.run_dir={run_dir}", *extra])


@pytest.fixture()
def prompt_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def test_tiny_wan_trains_and_evaluates_with_an_image_reward_per_frame(tiny_wan_dir, prompt_file, tmp_path):
    from flowalign.train import train

    run = train(_wan_cfg(tiny_wan_dir, prompt_file, tmp_path / "run", "reward.per_frame={stride: 2}"))
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= line["reward/saturation"] <= 1.0 and line["train/transitions"] > 0
    summ = json.loads((run / "eval" / "final" / "summary.json").read_text())
    assert summ["n"] == len(PROMPTS) and 0.0 <= summ["overall"]["saturation"] <= 1.0
    assert (run / "checkpoints" / "step-1" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "report.html").is_file()


def test_trainer_refuses_bad_per_frame_options_before_writing(tiny_wan_dir, prompt_file, tmp_path):
    from flowalign.train import train

    with pytest.raises(UserError, match=r"reward.per_frame: unknown reduce 'max'"):
        train(_wan_cfg(tiny_wan_dir, prompt_file, tmp_path / "run", "reward.per_frame={reduce: max}"))
    assert not (tmp_path / "run").exists()


def test_flowalign_eval_scores_wan_videos_frame_by_frame(tiny_wan_dir, prompt_file, tmp_path):
    from flowalign.evaluate import cli_main

    args = ["--model", "wan", "--path", str(tiny_wan_dir), "--prompts", str(prompt_file), "--rewards", "saturation",
            "--steps", "2", "--seeds", "1", "--guidance", "2.0",
            *[a for k, v in TINY_SIZES["wan"].items() for a in ("--model-arg", f"{k}={v}")]]
    assert cli_main([*args, "--per-frame", "reduce=first", "--out", str(tmp_path / "ev")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(PROMPTS) and all(0.0 <= r["saturation"] <= 1.0 for r in rows)
    with pytest.raises(UserError, match=r"--per-frame: unknown reduce 'max'"):
        cli_main([*args, "--per-frame", "reduce=max", "--out", str(tmp_path / "ev2")])
    assert not (tmp_path / "ev2").exists()
