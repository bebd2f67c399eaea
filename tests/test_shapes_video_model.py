"""The shapes video model family (SHAPES_WORLD.md §6): a pixel-space WanTransformer3DModel with the shapes text
encoder over the motion grammar, pretrained on rendered motion videos, trained by the one GRPO trainer with the
``shapes_motion_*`` verifier rewards. Tiny configs (random or 2-step weights) for shapes, layouts, round trips and
on-policy ratios; the shipped model's tests check that it loads offline and draws the prompted objects."""

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
PRESENT_MIN = 0.6  # measured 0.81: the shipped model's mean share of frames holding the prompted object, 8 prompts below
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
    with pytest.raises(UserError, match="no shapes_video model at"):  # the family's own name
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


def _durations(gif):
    """Every frame's delay in ms."""
    from PIL import ImageSequence

    return [fr.info["duration"] for fr in ImageSequence.Iterator(gif)]


def test_pretraining_on_rendered_motion_and_one_grpo_iteration_with_the_motion_reward(tmp_path):
    """Two pretraining steps on shapes_motion data write a loadable model; the one trainer then runs a GRPO
    iteration on it with shapes_motion_partial and evaluates shapes_motion_strict (a 32×32, 5-frame tiny config: the
    fewest the motion verifier can judge)."""
    from flowalign import config as C
    from flowalign.pretrain import PretrainConfig, pretrain, shapes_motion_data
    from flowalign.train import train

    caps, vids = shapes_motion_data(image_size=32, frames=5, seed=1)(0, 3)
    assert len(caps) == 3 and vids.shape == (3, 5, 3, 32, 32) and 0 <= float(vids.min()) <= float(vids.max()) <= 1
    assert torch.equal(shapes_motion_data(image_size=32, frames=5, seed=1)(0, 3)[1], vids)  # a function of the step
    with pytest.raises(UserError, match="data_config.frames must be an integer >= 5"):
        shapes_motion_data(frames=4)
    cfg = PretrainConfig.from_dict({"model": "shapes_video", "model_config": {**TINY, "image_size": 32, "frames": 5},
                                    "data": "shapes_motion", "data_config": {"image_size": 32, "frames": 5},
                                    "steps": 2, "batch_size": 2, "warmup": 1, "checkpoint_every": 0, "log_every": 1})
    pretrain(cfg, tmp_path / "pre", progress=False)
    model_dir = tmp_path / "pre" / "final"
    assert ShapesVideoModel.from_pretrained(str(model_dir)).latent_shape == (3, 5, 32, 32)

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
    assert (run / "grids" / "final.gif").is_file()  # the grid plays in the report, above its film strip
    html = (run / "report.html").read_text()
    assert html.index('alt="final.gif"') < html.index('alt="final.png"') and "data:image/gif;base64," in html

    # `flowalign sample` and `flowalign steer` on the video model: a film-strip PNG and the same grid animated
    from flowalign.cli import main

    out = tmp_path / "s.png"
    assert main(["sample", PROMPTS[0], "--model", "shapes_video", "--path", str(model_dir), "--steps", "2",
                 "--seeds", "2", "--out", str(out)]) == 0
    from PIL import Image

    with Image.open(out.with_suffix(".gif")) as gif:
        assert gif.n_frames == 5 and gif.size[0] * 5 < Image.open(out).size[0] + 50  # one frame vs a 5-frame strip
        # it plays at the model's frame rate (ShapesVideoModel.fps = 8: 120/130 ms, 125 ms on average)
        assert _durations(gif) == [120, 130, 130, 120, 120]
    st = tmp_path / "steer"
    assert main(["steer", PROMPTS[0], "--model", "shapes_video", "--path", str(model_dir), "--reward",
                 "shapes_motion_partial", "--eval-rewards", "shapes_motion_strict", "--method", "best_of_n", "-k", "2",
                 "--kernel", "flow_sde", "--eta", "0.7",
                 "--steps", "2", "--seeds", "1", "--out", str(st)]) == 0
    with Image.open(st / "grids" / "steered.gif") as gif:
        assert gif.n_frames == 5


def test_an_animated_video_grid_holds_every_frame_exactly(tmp_path):
    """save_video_grid: one GIF frame per video frame, each the image grid of that frame (one shared palette, so a
    few flat colours come back exactly), looping; a tensor that is not [N, F, 3, H, W] is refused."""
    from PIL import Image

    from flowalign.report import grid_image, save_video_grid

    torch.manual_seed(0)
    colours = torch.rand(2, 5, 3, 1, 1)  # 2 videos x 5 frames, each frame one flat colour ...
    v = colours.expand(2, 5, 3, 4, 4).clone()
    v[:, :, :, 1, 1] = 1.0  # ... with one white pixel
    path = save_video_grid(v, tmp_path / "g.gif", nrow=2, upscale=2, fps=10)
    with Image.open(path) as gif:
        assert gif.n_frames == 5 and gif.info.get("loop") == 0 and gif.info.get("duration") == 100
        for f in range(5):
            gif.seek(f)
            want = grid_image(v[:, f], nrow=2, upscale=2)
            assert gif.convert("RGB").tobytes() == want.tobytes(), f
    with pytest.raises(ValueError, match="N, F, 3, H, W"):
        save_video_grid(v[:, 0], tmp_path / "bad.gif", nrow=2)
    assert not (tmp_path / "bad.gif").exists()


def test_sample_grids_play_at_the_models_frame_rate(tiny, tmp_path, monkeypatch):
    """The GIF beside a sample grid played at 8 fps whatever the model: sample_grid now passes the video model's
    ``fps`` (Wan 16, as it generates; shapes_video 8) to the GIF writer."""
    from PIL import Image

    from flowalign.models.wan import WanModel
    from flowalign.sample import sample_grid

    assert WanModel.fps == 16.0 and ShapesVideoModel.fps == 8.0 and tiny.fps == 8.0
    with Image.open(sample_grid(tiny, PROMPTS[:1], tmp_path / "a.png", steps=1, seeds_per_prompt=1)
                    .with_suffix(".gif")) as gif:
        assert sum(_durations(gif)) == 4 * 1000 / 8  # 4 frames at 8 fps
    monkeypatch.setattr(tiny, "fps", 16.0, raising=False)  # a Wan-rate video model
    with Image.open(sample_grid(tiny, PROMPTS[:1], tmp_path / "b.png", steps=1, seeds_per_prompt=1)
                    .with_suffix(".gif")) as gif:
        assert _durations(gif) == [60, 60, 70, 60] and sum(_durations(gif)) == 4 * 1000 / 16


def test_video_grids_show_a_film_strip_of_each_sample():
    """Sample grids of video models tile up to 8 evenly spaced frames side by side (first and last included)."""
    from flowalign.sample import film_strip

    v = torch.arange(12.0).view(1, 12, 1, 1, 1).expand(2, 12, 3, 2, 2)  # frame f filled with f
    strip = film_strip(v)  # [2, 3, 2, 8·2]
    assert strip.shape == (2, 3, 2, 16)
    assert strip[0, 0, 0, ::2].tolist() == [0, 2, 3, 5, 6, 8, 9, 11]
    assert film_strip(v[:, :4]).shape == (2, 3, 2, 8)  # fewer frames than 8: all of them


def test_a_family_without_a_shipped_checkpoint_names_its_recipe(monkeypatch, tmp_path):
    """A shapes family whose asset directory holds no weights fails in one line naming the config that makes one."""
    import flowalign.models.shapes as S

    monkeypatch.setattr(S, "_asset_dir", lambda name="shapes": tmp_path / name)
    with pytest.raises(UserError, match=r"no shapes_video model ships .* configs/shapes_video_pretrain.yaml"):
        ShapesVideoModel.from_pretrained("")


@pytest.fixture(scope="module")
def shipped():
    return ShapesVideoModel.from_pretrained("")


def test_the_shipped_video_model_loads_offline(shipped):
    from importlib import resources

    asset = resources.files("flowalign") / "assets" / "shapes_video"
    size = (asset / "model.safetensors").stat().st_size + (asset / "config.json").stat().st_size
    assert size < 20 * 2**20 and 1e6 < sum(shipped.num_parameters().values()) < 10e6
    assert shipped.latent_shape == (3, 8, 32, 32) and shipped.output_kind == "video"
    assert shipped.output_size() == {"height": 32, "width": 32, "num_frames": 8}  # what eval records as resolution
    assert not any(p.requires_grad for c in shipped.components.values() for p in c.parameters())


def _shipped_videos(model, prompts, seed):
    with torch.no_grad():
        x = model.init_noise(len(prompts), torch.Generator().manual_seed(seed))
        traj = sample(model.velocity, x, model.schedule(model.config.sample_steps), model.encode(prompts), eta=0.0,
                      kernel="euler")
        return model.decode(traj.final)  # [B, F, 3, H, W]


def test_the_shipped_video_model_draws_the_prompted_objects(shipped):
    """A property of the *trained* weights (docs/shapes.md): single-object motion prompts mostly show that object,
    in colour and shape, in most frames; deterministic given the seed."""
    from flowalign.shapes.motion import verify_motion

    prompts = ["a red circle moving to the right", "a blue square moving up", "a yellow triangle moving down",
               "a green circle moving to the left"] * 2
    videos = _shipped_videos(shipped, prompts, seed=0)
    assert torch.equal(videos, _shipped_videos(shipped, prompts, seed=0))
    present = [verify_motion(v.permute(0, 2, 3, 1).numpy(), p).clauses for v, p in zip(videos, prompts)]
    present = [sum(v for k, v in c.items() if k.startswith("present")) for c in present]
    assert sum(present) / len(present) >= PRESENT_MIN, present


RICH = {**TINY, "patch_embed_kernel": 8, "refiner_channels": 4, "pooled_conditioning": True}


def test_overlapping_patches_refiner_and_pooled_conditioning(tmp_path):
    """The shipped recipe's additions (docs/shapes.md): an overlapping patch embedding keeps Wan's token grid but lets
    a token see its neighbours' border pixels; the zero-initialised per-frame refiner starts as the identity and
    never mixes frames; the pooled text vector reaches the adaLN (the output depends on it with the hidden states
    fixed) and is cleared after every forward; all of it saves and loads, and LoRA targets stay Wan's."""
    torch.manual_seed(0)
    m = ShapesVideoModel.from_config(dict(RICH))
    assert m.lora_targets == ("to_q", "to_k", "to_v", "to_out.0") and "refiner" in m.components
    pe = m.transformer.patch_embedding
    assert pe.kernel_size == (1, 8, 8) and pe.stride == (1, 4, 4) and pe.padding == (0, 2, 2)
    x = torch.randn(1, 3, 4, 16, 16)
    tokens = pe(x)  # [1, D, F, 4, 4]: the same grid as a 4×4, stride-4 embedding
    assert tokens.shape[2:] == (4, 4, 4)
    y = x.clone()
    y[0, :, 0, 0, 4] += 1.0  # the first column of the second patch of frame 0
    d = (pe(y) - tokens).abs().sum(1)[0]  # [F, 4, 4]
    assert d[0, 0, 0] > 0 and d[0, 0, 1] > 0 and d[1:].sum() == 0  # the neighbouring token sees it, no other frame
    with torch.no_grad():
        r = m.refiner(x)  # [1, 3, F, H, W]
    assert r.abs().max() == 0  # zero-initialised: the identity at the start of pretraining
    with torch.no_grad():
        torch.nn.init.normal_(m.refiner.conv2.weight)
        z = x.clone()
        z[:, :, 2] += 1.0
        assert torch.equal(m.refiner(z)[:, :, :2], m.refiner(x)[:, :, :2])  # frame 2 only changes frame 2
    cond = m.encode(PROMPTS)
    xs = m.init_noise(2, torch.Generator().manual_seed(1))
    m.guidance_scale = 1.0
    with torch.no_grad():
        v = m.velocity(xs, torch.tensor(0.6), cond)
        v_swapped = m.velocity(xs, torch.tensor(0.6), {**cond, "pooled": cond["pooled"].flip(0)})
    assert m.pooled_embedder.pooled is None
    assert (v - v_swapped).abs().max() > 1e-4  # same hidden states, other pooled vectors → another velocity
    m.save_pretrained(tmp_path / "m")
    back = ShapesVideoModel.from_pretrained(str(tmp_path / "m"), guidance_scale=1.0)
    with torch.no_grad():
        assert torch.allclose(back.velocity(xs, torch.tensor(0.6), back.encode(PROMPTS)), v, atol=1e-5)
    with pytest.raises(UserError, match="patch_embed_kernel must be patch_size \\+ an even number, got 7"):
        ShapesVideoConfig.from_dict({**RICH, "patch_embed_kernel": 7})


def test_the_video_recipe_configs_chain_and_build_the_shipped_model():
    """`make shapes-video-base` runs two configs: stage 2 starts from stage 1's final/ with the same architecture and
    fresh data; the shipped model's config is what stage 2 builds."""
    from pathlib import Path

    from flowalign.pretrain import load_config

    root = Path(__file__).resolve().parents[1]
    s1, s2 = (load_config(str(root / f"configs/shapes_video_pretrain{s}.yaml"), {}) for s in ("", "_stage2"))
    assert s2.init_from == "runs/shapes_video_pretrain/final" and s1.model_config == s2.model_config
    assert s1.seed != s2.seed  # stage 2 draws fresh data
    shipped = json.loads((root / "flowalign/assets/shapes_video/config.json").read_text())
    for k, v in s2.model_config.items():
        assert shipped[k] == v, k


def test_prompt_note_names_the_grammar_each_shapes_family_was_trained_on(tiny):
    """``flowalign sample`` warns with ``prompt_note``: the motion grammar for the video model, the image grammar for
    the image model; None for a prompt inside it."""
    from flowalign.models.shapes import ShapesModel

    assert tiny.prompt_note("a red circle moving to the right") is None
    assert "outside the shapes motion grammar" in tiny.prompt_note("a red circle moving right")
    assert "outside the shapes motion grammar" in tiny.prompt_note("a red circle")  # an image prompt: not a video one
    image = ShapesModel.from_config({"num_layers": 1, "num_heads": 2, "head_dim": 8, "text_dim": 16, "pooled_dim": 16,
                                     "text_layers": 1, "text_heads": 2})
    assert image.prompt_note("a red circle") is None
    assert "outside the shapes grammar" in image.prompt_note("a red circles")


def test_the_wan_denoiser_gets_timestep_1000_sigma(tiny):
    """Timestep 1000·σ in fp32, as WanPipeline passes σ·N (N = 1000), one entry per row of the CFG batch (mutation
    audit: only the image shapes model's timestep was pinned)."""
    seen = []
    h = tiny.transformer.register_forward_hook(lambda m, a, kw, out: seen.append(kw["timestep"].clone()),
                                               with_kwargs=True)
    cond = tiny.encode(PROMPTS)
    x = torch.randn(2, 3, 4, 16, 16)  # [B, C, F, H, W]
    try:
        with torch.no_grad():
            tiny.velocity(x, torch.tensor([0.25, 1.0]), cond)
    finally:
        h.remove()
    [t] = seen  # [2B]: [uncond, cond]
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, torch.tensor([250.0, 1000.0, 250.0, 1000.0]))
