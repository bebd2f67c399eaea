"""The shapes video model family (SHAPES_WORLD.md §6): a pixel-space WanTransformer3DModel with the shapes text
encoder over the motion grammar, pretrained on rendered motion videos, trained by the one GRPO trainer with the
``shapes_motion_*`` verifier rewards. Tiny configs only (random or 2-step weights): shapes, layouts, round trips and
on-policy ratios, not quality."""

from __future__ import annotations

import json

import pytest
import torch

from flowalign.errors import UserError
from flowalign.models.shapes_video import ShapesVideoConfig, ShapesVideoModel
from flowalign.samplers import eta_schedule, gather_cond, sample, step_log_prob

TINY = {"frames": 4, "image_size": 16, "patch_size": 4, "num_layers": 1, "num_heads": 2, "head_dim": 12,
        "ffn_dim": 32, "freq_dim": 16, "text_dim": 24, "text_layers": 1, "text_heads": 2, "pooled_dim": 8,
        "sample_steps": 3}
PROMPTS = ["a red circle moving to the right", "a blue square moving up and a green triangle moving to the left"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ShapesVideoModel.from_config(dict(TINY))


def test_layout_encode_decode_and_guidance(tiny):
    assert tiny.latent_shape == (3, 4, 16, 16) and tiny.output_kind == "video"
    assert tiny.lora_targets == ("to_q", "to_k", "to_v", "to_out.0")
    cond = tiny.encode(PROMPTS)
    x = tiny.init_noise(2, torch.Generator().manual_seed(1))  # [B, C, F, H, W]
    assert x.shape == (2, 3, 4, 16, 16)
    v = tiny.velocity(x, torch.tensor(0.7), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    # CFG: v = v_u + w·(v_c − v_u), from one batch-doubled forward
    w = tiny.guidance_scale
    tiny.guidance_scale = 1.0
    v_c = tiny.velocity(x, torch.tensor(0.7), cond)
    v_u = tiny.velocity(x, torch.tensor(0.7), {**cond, "hidden": cond["hidden_uncond"], "pooled": cond["pooled_uncond"]})
    tiny.guidance_scale = w
    assert torch.allclose(v, v_u + w * (v_c - v_u), atol=1e-5)
    videos = torch.rand(2, 4, 3, 16, 16)  # [B, F, 3, H, W] in [0, 1]
    assert torch.allclose(tiny.decode(tiny.encode_images(videos)), videos, atol=1e-6)
    assert tiny.decode(x).shape == (2, 4, 3, 16, 16)
    with pytest.raises(UserError, match="unknown word 'dog'"):
        tiny.validate_prompts(["a red dog moving up"])


def test_save_load_round_trip_and_config_errors(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    back = ShapesVideoModel.from_pretrained(str(tmp_path / "m"))
    assert back.config == tiny.config
    x = tiny.init_noise(1, torch.Generator().manual_seed(2))
    cond = tiny.encode(PROMPTS[:1])
    with torch.no_grad():
        assert torch.allclose(back.velocity(x, torch.tensor(0.4), back.encode(PROMPTS[:1])),
                              tiny.velocity(x, torch.tensor(0.4), cond), atol=1e-5)
    with pytest.raises(UserError, match="unknown shapes video model config key"):
        ShapesVideoConfig.from_dict({"patches": 2})
    with pytest.raises(UserError, match="frames=5 of temporal_patch=2"):
        ShapesVideoConfig.from_dict({"frames": 5, "temporal_patch": 2})
    with pytest.raises(UserError, match="no shapes model at"):
        ShapesVideoModel.from_pretrained(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("kernel", ["flow_sde", "cps"])
def test_on_policy_ratio_is_one_with_a_lora(tiny, kernel):
    model = ShapesVideoModel.from_config(dict(TINY))
    model.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(0.05 * torch.randn_like(p))
    cond = model.encode(PROMPTS)
    sig = model.schedule(3)
    eta = eta_schedule(3, 0.7)
    traj = sample(model.velocity, model.init_noise(2, torch.Generator().manual_seed(3)), sig, cond, eta=eta,
                  kernel=kernel, generator=torch.Generator().manual_seed(4))
    cb = gather_cond(traj.cond, traj.cond_index)
    for t in (0, 1):
        with torch.no_grad():
            lp, _ = step_log_prob(model.velocity, traj.latents[:, t], traj.latents[:, t + 1], sig[t].expand(2),
                                  sig[t + 1].expand(2), eta[t].expand(2), cb, kernel=kernel)
        assert (torch.exp(lp - traj.log_probs[:, t]) - 1).abs().max() < 1e-5


def test_pretraining_on_rendered_motion_and_one_grpo_iteration_with_the_motion_reward(tmp_path):
    """Two pretraining steps on shapes_motion data write a loadable model; the one trainer then runs a GRPO
    iteration on it with shapes_motion_partial and evaluates shapes_motion_strict (a 32×32, 4-frame tiny config)."""
    from flowalign import config as C
    from flowalign.pretrain import PretrainConfig, pretrain, shapes_motion_data
    from flowalign.train import train

    caps, vids = shapes_motion_data(image_size=32, frames=4, seed=1)(0, 3)
    assert len(caps) == 3 and vids.shape == (3, 4, 3, 32, 32) and 0 <= float(vids.min()) <= float(vids.max()) <= 1
    assert torch.equal(shapes_motion_data(image_size=32, frames=4, seed=1)(0, 3)[1], vids)  # a function of the step
    with pytest.raises(UserError, match="frames must be an integer >= 2"):
        shapes_motion_data(frames=1)
    cfg = PretrainConfig.from_dict({"model": "shapes_video", "model_config": {**TINY, "image_size": 32},
                                    "data": "shapes_motion", "data_config": {"image_size": 32, "frames": 4},
                                    "steps": 2, "batch_size": 2, "warmup": 1, "checkpoint_every": 0, "log_every": 1})
    pretrain(cfg, tmp_path / "pre", progress=False)
    model_dir = tmp_path / "pre" / "final"
    assert ShapesVideoModel.from_pretrained(str(model_dir)).latent_shape == (3, 4, 32, 32)

    prompts = tmp_path / "motion.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    run = train(C.load_config(None, [
        "model.name=shapes_video", f"model.path={model_dir}", "model.guidance=2.0", "model.lora_rank=4",
        "model.lora_alpha=8", "sampler.steps=3", "reward.weights={shapes_motion_partial: 1.0}",
        f"data.train_prompts={prompts}", f"data.eval_prompts={prompts}", "eval.rewards=[shapes_motion_strict]",
        "eval.before=false", "eval.after=true", "eval.steps=2", "eval.seeds_per_prompt=1", "eval.grid_prompts=2",
        "train.iterations=1", "train.groups_per_iter=2", "train.group_size=2", "train.micro_batch=8",
        "train.checkpoint_every=1", "train.filter_zero_std=false", "output.tensorboard=false",
        f"output.run_dir={tmp_path / 'run'}"]))
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= line["reward/shapes_motion_partial"] <= 1.0 and line["train/transitions"] > 0
    assert abs(line["train/ratio_mean"] - 1) < 1e-4
    summ = json.loads((run / "eval" / "final" / "summary.json").read_text())
    assert summ["n"] == 2 and 0.0 <= summ["overall"]["shapes_motion_strict"] <= 1.0
    assert (run / "report.html").is_file()


def test_video_grids_show_a_film_strip_of_each_sample():
    """Sample grids of video models tile up to 8 evenly spaced frames side by side (first and last included)."""
    from flowalign.sample import film_strip

    v = torch.arange(12.0).view(1, 12, 1, 1, 1).expand(2, 12, 3, 2, 2)  # frame f filled with f
    strip = film_strip(v)  # [2, 3, 2, 8·2]
    assert strip.shape == (2, 3, 2, 16)
    assert strip[0, 0, 0, ::2].tolist() == [0, 2, 3, 5, 6, 8, 9, 11]
    assert film_strip(v[:, :4]).shape == (2, 3, 2, 8)  # fewer frames than 8: all of them


def test_the_unshipped_default_checkpoint_is_a_one_line_error_naming_the_recipe():
    with pytest.raises(UserError, match=r"no shapes_video model ships .* configs/shapes_video_pretrain.yaml"):
        ShapesVideoModel.from_pretrained("")
