"""The real SD3 path end to end on a tiny pipeline: GRPO training, diffusers LoRA loading, `flowalign eval`."""

import json

import pytest
import torch

from flowalign import config as C
from tiny_models import TINY_SIZES
from tiny_rewards import (tiny_aesthetic_files, tiny_clip_dir, tiny_hps_files,  # noqa: F401
                          tiny_imagereward_files, tiny_reward_kwargs)

PROMPTS = ["a cat", "a red dog", "a tree", "a blue car"]


@pytest.fixture()
def prompt_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def test_tiny_sd3_trains_and_lora_loads_into_diffusers(tiny_sd3_dir, prompt_file, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from flowalign.train import train

    size = TINY_SIZES["sd3"]
    cfg = C.load_config(None, [
        "model.name=sd3", f"model.path={tiny_sd3_dir}", f"model.kwargs={{height: {size['height']}, width: {size['width']}}}",
        "model.guidance=2.0", "model.lora_rank=4", "model.lora_alpha=8",
        "sampler.steps=4", "reward.weights={saturation: 1.0}", f"data.train_prompts={prompt_file}",
        f"data.eval_prompts={prompt_file}", "eval.rewards=[saturation]", "eval.before=false", "eval.after=false",
        "train.iterations=2", "train.groups_per_iter=2", "train.group_size=2", "train.micro_batch=4",
        "train.lr=1e-2", "train.clip_range=0.2", "train.checkpoint_every=2", "train.ema=false",
        "train.filter_zero_std=false", "output.tensorboard=false", f"output.run_dir={tmp_path / 'run'}",
    ])
    run = train(cfg)
    ckpt = run / "checkpoints" / "step-2"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["nfe/sampling"] == 2 * 2 * 4 and lines[0]["train/transitions"] > 0

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir))
    pipe.set_progress_bar_config(disable=True)

    def run_pipe():
        return pipe("a cat", num_inference_steps=2, guidance_scale=2.0, output_type="pt", **size,
                    generator=torch.Generator().manual_seed(0)).images

    before = run_pipe()
    pipe.load_lora_weights(str(ckpt))
    after = run_pipe()
    assert (after - before).abs().max() > 1e-6  # the trained LoRA changes the diffusers pipeline's output


def test_tiny_sd3_trains_in_float16_with_a_loss_scale_that_the_checkpoint_keeps(tiny_sd3_dir, prompt_file, tmp_path):
    """model.dtype=float16: the update scales its loss (train/loss_scale), steps, and the checkpoint holds the scale
    for exact resume (the underflow it prevents: tests/test_train_update.py::test_float16_gradients_need_…)."""
    from flowalign.train import train

    size = TINY_SIZES["sd3"]
    run = train(C.load_config(None, [
        "model.name=sd3", f"model.path={tiny_sd3_dir}", f"model.kwargs={{height: {size['height']}, width: {size['width']}}}",
        "model.dtype=float16", "model.guidance=2.0", "model.lora_rank=4", "model.lora_alpha=8",
        "sampler.steps=4", "reward.weights={saturation: 1.0}", f"data.train_prompts={prompt_file}",
        f"data.eval_prompts={prompt_file}", "eval.rewards=[saturation]", "eval.before=false", "eval.after=false",
        "train.iterations=1", "train.groups_per_iter=2", "train.group_size=2", "train.micro_batch=4",
        "train.lr=1e-2", "train.clip_range=0.2", "train.ema=false", "train.filter_zero_std=false",
        "output.tensorboard=false", f"output.run_dir={tmp_path / 'run'}",
    ]))
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert m["train/loss_scale"] == 2.0 ** 16 and m["train/skipped_updates"] == 0 and m["train/grad_norm"] > 0
    assert abs(m["train/ratio_mean"] - 1) < 1e-3  # on-policy in float16 too
    state = torch.load(run / "checkpoints" / "step-1" / "state.pt", weights_only=False)
    assert state["loss_scale"] == {"scale": 2.0 ** 16, "good": 1}


def test_flowalign_eval_with_pickscore_and_hps_on_tiny_sd3(tiny_sd3_dir, prompt_file, tiny_reward_kwargs, tmp_path):
    from flowalign.evaluate import cli_main

    size = TINY_SIZES["sd3"]
    args = ["--model", "sd3", "--path", str(tiny_sd3_dir), "--prompts", str(prompt_file), "--rewards", "pickscore,hps",
            "--steps", "2", "--seeds", "2", "--guidance", "2.0", "--out", str(tmp_path / "ev"),
            "--model-arg", f"height={size['height']}", "--model-arg", f"width={size['width']}"]
    for name in ("pickscore", "hps"):
        for k, v in tiny_reward_kwargs[name].items():
            args += ["--reward-arg", f"{name}.{k}={v}"]
    assert cli_main(args) == 0
    out = tmp_path / "ev"
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(PROMPTS) * 2
    assert all(isinstance(r["pickscore"], float) and isinstance(r["hps"], float) for r in rows)
    summ = json.loads((out / "summary.json").read_text())
    assert set(summ["overall"]) == {"pickscore", "hps"} and summ["n"] == 8
    assert summ["settings"]["resolution"] == {"height": size["height"], "width": size["width"]}
    assert (out / "report.html").exists()
