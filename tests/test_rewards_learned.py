"""Learned rewards on tiny random towers through their real loading code (REWARDS_AND_EVAL.md §1–2)."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flowalign.errors import UserError
from flowalign.rewards import build_reward
from flowalign.rewards.clip_common import clip_preprocess, features, pil_pixels
from tiny_rewards import (  # noqa: F401  (session fixtures)
    OPEN_CLIP_FIXTURE,
    build_tiny_hps_file,
    tiny_aesthetic_files,
    tiny_clip_dir,
    tiny_hps_files,
    tiny_imagereward_files,
    tiny_reward_kwargs,
)

LEARNED = ["pickscore", "clipscore", "aesthetic", "hps", "hpsv21", "imagereward"]
PROMPTS = ["a red circle", "two blue squares on the left", "a photo of a cat", "a green star",
           "a big dog", "painting of a triangle", "three small stars", "a cat and a dog"]


@pytest.fixture(scope="module")
def rewards(tiny_reward_kwargs):
    """Each learned reward built once per module: tensor path and parity (PIL) path."""
    built = {}
    for name in LEARNED:
        built[name] = build_reward(name, **tiny_reward_kwargs[name])
        built[name + ":parity"] = build_reward(name, parity=True, **tiny_reward_kwargs[name])
    return built


def synthetic_images(n: int, h: int = 44, w: int = 52, seed: int = 0) -> torch.Tensor:
    """Varied smooth images in [0,1]: low-frequency noise + colour gradients + a bright square (non-square, odd crop)."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(n, 3, 6, 7, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    tint = torch.rand(n, 3, 1, 1, generator=g)
    img = 0.5 * low + 0.3 * tint * (xx + yy) / 2 + 0.2 * torch.rand(n, 3, 1, 1, generator=g)
    for i in range(n):
        y0, x0 = int(torch.randint(0, h - 12, (1,), generator=g)), int(torch.randint(0, w - 12, (1,), generator=g))
        img[i, :, y0 : y0 + 12, x0 : x0 + 12] = torch.rand(3, 1, 1, generator=g)
    return img.clamp(0, 1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.mark.parametrize("name", LEARNED)
def test_scores_float32_batch_independent(rewards, name):
    r = rewards[name]
    imgs = synthetic_images(8)
    s = r(imgs, PROMPTS)
    assert s.dtype == torch.float32 and s.shape == (8,) and s.device == imgs.device
    assert torch.isfinite(s).all()
    assert s.std() > 0  # the score depends on the image/prompt
    # score alone vs inside a batch of 8 (different neighbours, different position)
    for i in (0, 5):
        alone = r(imgs[i : i + 1], PROMPTS[i : i + 1])
        assert torch.allclose(alone, s[i : i + 1], atol=1e-5, rtol=0), (name, alone, s[i])
    perm = torch.tensor([3, 1, 7, 0, 6, 2, 5, 4])
    s_perm = r(imgs[perm], [PROMPTS[i] for i in perm])
    assert torch.allclose(s_perm, s[perm], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", LEARNED)
def test_gradients_reach_pixels(rewards, name):
    r = rewards[name]
    assert r.differentiable and not rewards[name + ":parity"].differentiable
    imgs = synthetic_images(3, seed=1).requires_grad_()
    r(imgs, PROMPTS[:3]).sum().backward()
    g = imgs.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # every image gets its own gradient (no cross-talk, no dead branch)
    assert (g.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("name", LEARNED)
def test_tensor_path_matches_pil_processor(rewards, name):
    """Spec §1 parity test: 32 images, Spearman ρ > 0.99 and max |Δ| < 2 % of the score spread."""
    imgs = synthetic_images(32, seed=2)
    prompts = [PROMPTS[i % 8] for i in range(32)]
    a = rewards[name](imgs, prompts)
    b = rewards[name + ":parity"](imgs, prompts)
    spread = float(b.max() - b.min())
    assert spread > 0
    rho, dmax = spearman(a, b), float((a - b).abs().max())
    assert rho > 0.99, (name, rho)
    assert dmax < 0.02 * spread, (name, dmax, spread)


def test_clip_preprocess_matches_pil_pixels(tiny_clip_dir):
    """Pixel-level: the tensor path vs transformers' PIL CLIP image processor on the same quantised images."""
    from transformers import CLIPImageProcessorPil

    from flowalign.rewards.clip_common import quantize, to_pil

    imgs = quantize(synthetic_images(6, h=47, w=61, seed=3)).float() / 255  # same input to both paths
    ref = CLIPImageProcessorPil.from_pretrained(tiny_clip_dir)(images=to_pil(imgs), return_tensors="pt")["pixel_values"]
    ours = clip_preprocess(imgs, 32, 32)
    assert ours.shape == ref.shape == (6, 3, 32, 32)
    # PIL resizes uint8 (rounding ≤ 0.5/255 ≈ 0.007 in normalised units) with its own antialias filter support
    assert (ours - ref).abs().mean() < 0.02
    assert (ours - ref).abs().max() < 0.15


def test_clip_rewards_load_the_processor_settings_without_a_torchvision_warning(tiny_clip_dir):
    """The rewards read only the processor's settings and tokenizer: the same as transformers' CLIPProcessor gives,
    without its default image processor, which warns on every load that torchvision is missing (not installed here)."""
    import subprocess
    import sys

    from transformers import AutoProcessor

    r = build_reward("pickscore", path=str(tiny_clip_dir))
    ref = AutoProcessor.from_pretrained(tiny_clip_dir)
    texts = PROMPTS[:3]
    assert r.clip.tokenizer(texts, padding="max_length", max_length=77)["input_ids"] == \
        ref.tokenizer(texts, padding="max_length", max_length=77)["input_ids"]
    for key in ("size", "crop_size", "image_mean", "image_std", "do_center_crop"):
        assert getattr(r.clip.image_processor, key) == getattr(ref.image_processor, key), key
    code = (f"from flowalign.rewards import build_reward\n"
            f"for n in ('pickscore', 'clipscore'): build_reward(n, path={str(tiny_clip_dir)!r})\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "torchvision" not in run.stderr, run.stderr


def test_pickscore_is_logit_scale_times_cosine(rewards, tiny_clip_dir):
    """PickScore = exp(logit_scale)·cos, checked against transformers' own CLIPModel forward (logits_per_image)."""
    r = rewards["pickscore"]
    imgs = synthetic_images(4, seed=4)
    prompts = PROMPTS[:4]
    tok = r.clip.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    out = r.clip.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=r.clip.pixels(imgs))
    assert torch.allclose(r(imgs, prompts), out.logits_per_image.diagonal(), atol=1e-4)
    c = rewards["clipscore"]
    assert torch.allclose(c(imgs, prompts), out.logits_per_image.diagonal(), atol=1e-4)
    cos = build_reward("clipscore", path=str(tiny_clip_dir), form="cos")(imgs, prompts)
    hessel = build_reward("clipscore", path=str(tiny_clip_dir), form="clipscore", w=2.5)(imgs, prompts)
    scale = r.clip.model.logit_scale.exp()
    assert torch.allclose(cos * scale, out.logits_per_image.diagonal(), atol=1e-4)
    assert torch.allclose(hessel, 2.5 * cos.clamp_min(0), atol=1e-6)
    assert cos.abs().max() <= 1.0


@pytest.fixture(scope="module")
def open_clip_reference() -> dict:
    """Inputs and outputs that open_clip 3.3.0 itself computed (tests/fixtures/make_open_clip_tiny.py)."""
    return torch.load(OPEN_CLIP_FIXTURE / "reference.pt", map_location="cpu", weights_only=True)


def test_hps_matches_open_clip_features(rewards, open_clip_reference):
    """The open_clip → transformers conversion computes open_clip's own features (the fixture's HPS checkpoint, with
    DDP ``module.`` prefixes, is what open_clip saved): image and text towers, 0-padded ids, and the validation
    transform of the parity path, bit for bit on pixels."""
    ref = open_clip_reference
    r = rewards["hps"]
    img = features(r.model.get_image_features(pixel_values=ref["pixels"]))  # [4, 16]
    txt = features(r.model.get_text_features(input_ids=ref["ids"]))  # [4, 16]
    assert torch.allclose(img, ref["image_features"], atol=1e-5, rtol=1e-4)
    assert torch.allclose(txt, ref["text_features"], atol=1e-5, rtol=1e-4)
    for im, px in zip(ref["images"], ref["pixels"]):  # odd sizes: wide, exact, tall, smaller than the crop
        assert torch.allclose(pil_pixels(im.float().unsqueeze(0) / 255.0, 32)[0], px, atol=1e-6)
    # our tokenizer path: same ids up to <end> (open_clip pads with 0, the CLIP tokenizer with <end>) → same features
    ids = r.tokenize(ref["prompts"])
    for row, want in zip(ids, ref["ids"]):
        n = int(want.argmax()) + 1
        assert torch.equal(row[:n], want[:n])
    assert torch.allclose(r.embed_text(ref["prompts"]), F.normalize(ref["text_features"], dim=-1), atol=1e-5)
    # the parity reward on the fixture's uint8 images is open_clip's cosine
    for i, im in enumerate(ref["images"]):
        score = rewards["hps:parity"](im.float().unsqueeze(0) / 255.0, [ref["prompts"][i]])
        assert abs(float(score) - float(ref["cosine"][i])) < 1e-5


def test_hps_is_cosine_of_normalised_features(rewards):
    """HPS = cos of the normalised features (no logit scale); v2.0 and v2.1 weights give different scores."""
    r = rewards["hps"]
    imgs = synthetic_images(4, seed=5)
    prompts = PROMPTS[:4]
    px = clip_preprocess(imgs, r.size, r.size, r.mean, r.std)
    out = r.model(input_ids=r.tokenize(prompts), pixel_values=px)
    ref = out.logits_per_image.diagonal() / r.model.logit_scale.exp()
    assert torch.allclose(r(imgs, prompts), ref, atol=1e-5)
    assert r(imgs, prompts).abs().max() <= 1.0
    assert not torch.allclose(rewards["hpsv21"](imgs, prompts), r(imgs, prompts))


def test_hps_loading_variants_and_errors(tiny_hps_files, tiny_imagereward_files, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arch, tok = tiny_hps_files["arch"], str(tiny_hps_files["tokenizer"])
    bert_dir = tiny_imagereward_files["tokenizer_path"]
    plain = build_tiny_hps_file(tmp_path, ddp_prefix=False)  # no module. prefix
    imgs, prompts = synthetic_images(2, seed=6), PROMPTS[:2]
    a = build_reward("hps", checkpoint=str(plain), arch=arch, tokenizer=tok)(imgs, prompts)
    b = build_reward("hps", path=str(tiny_hps_files["checkpoint"]), arch=arch, tokenizer=tok)(imgs, prompts)  # alias
    assert torch.allclose(a, b)
    # a directory holding the file works too
    c = build_reward("hps", checkpoint=str(tmp_path), arch=arch, tokenizer=tok)(imgs, prompts)
    assert torch.allclose(a, c)
    with pytest.raises(UserError, match="does not exist"):
        build_reward("hps", checkpoint=str(tmp_path / "nope.pt"), arch=arch, tokenizer=tok)
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="does not fit"):
        build_reward("hps", checkpoint=str(tmp_path / "bad.pt"), arch=arch, tokenizer=tok)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        build_reward("hps", checkpoint=str(tmp_path / "text.pt"), arch=arch, tokenizer=tok)
    with pytest.raises(UserError, match="hps tokenizer.*hf download laion/CLIP-ViT-H-14"):  # offline, not cached
        build_reward("hps", checkpoint=str(plain), arch=arch)
    with pytest.raises(UserError, match=r"has \d+ tokens, the text tower 582"):
        build_reward("hps", checkpoint=str(plain), arch=arch, tokenizer=str(bert_dir))
    with pytest.raises(UserError, match="unknown open_clip architecture 'ViT-Q-99'"):
        build_reward("hps", checkpoint=str(plain), arch="ViT-Q-99", tokenizer=tok)
    with pytest.raises(UserError, match="does not fit open_clip 'ViT-H-14'"):  # real ViT-H-14 shapes vs tiny weights
        build_reward("hps", checkpoint=str(plain), tokenizer=tok)
    cfg = json.loads(Path(arch).read_text())
    pre = dict(cfg, preprocess_cfg={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})  # an open_clip config's own
    (tmp_path / "pre.json").write_text(json.dumps(pre))
    r = build_reward("hps", checkpoint=str(plain), arch=str(tmp_path / "pre.json"), tokenizer=tok)
    assert r.mean == (0.5, 0.5, 0.5) and r.std == (0.25, 0.25, 0.25)
    assert not torch.allclose(r(imgs, prompts), a)
    pre["preprocess_cfg"]["resize_mode"] = "squash"  # not what the reward computes: said, not silently ignored
    (tmp_path / "squash.json").write_text(json.dumps(pre))
    with caplog.at_level(logging.WARNING, logger="flowalign.rewards"):
        build_reward("hps", checkpoint=str(plain), arch=str(tmp_path / "squash.json"), tokenizer=tok)
    assert "differs from the shortest-side bicubic resize" in caplog.text
    cfg["vision_cfg"]["ls_init_value"] = 1e-5  # layer scale: not a plain CLIP ViT
    (tmp_path / "ls.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"vision_cfg\.ls_init_value=1e-05 is not supported"):
        build_reward("hps", checkpoint=str(plain), arch=str(tmp_path / "ls.json"), tokenizer=tok)


def test_open_clip_conversion_splits_qkv_and_transposes_projections():
    from flowalign.rewards.open_clip_convert import open_clip_to_hf

    w = torch.arange(12.0).view(6, 2)  # in_proj_weight of width 2: rows q(0:2) k(2:4) v(4:6)
    out, unknown = open_clip_to_hf({"visual.transformer.resblocks.3.attn.in_proj_weight": w,
                                    "transformer.resblocks.0.mlp.c_fc.bias": torch.ones(8),
                                    "text_projection": torch.arange(6.0).view(2, 3), "attn_mask": torch.zeros(2, 2),
                                    "visual.weird": torch.zeros(1)})
    p = "vision_model.encoder.layers.3.self_attn."
    assert torch.equal(out[p + "q_proj.weight"], w[0:2]) and torch.equal(out[p + "v_proj.weight"], w[4:6])
    assert torch.equal(out["text_projection.weight"], torch.arange(6.0).view(2, 3).t())
    assert "text_model.encoder.layers.0.mlp.fc1.bias" in out
    assert unknown == ["visual.weird"]  # the causal-mask buffer is ignored, an unknown weight is reported


def test_aesthetic_head_layout(rewards, tiny_aesthetic_files, tmp_path):
    r = rewards["aesthetic"]
    imgs = synthetic_images(3, seed=7)
    e = r.clip.encode_pixels(r.clip.pixels(imgs))  # [3, 16] normalised
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    head = torch.load(tiny_aesthetic_files["head"], weights_only=True)
    x = e
    for i in (0, 2, 4, 6, 7):  # the five linears, no activations
        x = x @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]
    assert torch.allclose(r(imgs, ["ignored"] * 3), x.squeeze(-1), atol=1e-5)
    # the prompt is ignored
    assert torch.equal(r(imgs, ["a"] * 3), r(imgs, ["b"] * 3))
    bad = {k.replace("layers.7", "layers.8"): v for k, v in head.items()}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="unexpected head keys"):
        build_reward("aesthetic", path=tiny_aesthetic_files["path"], head=str(tmp_path / "bad.pth"))
    with pytest.raises(UserError, match="head"):
        build_reward("aesthetic", path=tiny_aesthetic_files["path"])


def _blip_vit_reference(vit: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """BLIP's ViT forward written from its original key names (pre-norm blocks, LayerNorm eps 1e-6, exact GELU)."""
    w = vit["patch_embed.proj.weight"]
    t = F.conv2d(x, w, vit["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)  # [B, N, D]
    t = torch.cat([vit["cls_token"].expand(x.shape[0], -1, -1), t], 1) + vit["pos_embed"]
    d = t.shape[-1]
    ln = lambda z, k: F.layer_norm(z, (d,), vit[k + ".weight"], vit[k + ".bias"], eps=1e-6)  # noqa: E731
    i = 0
    while f"blocks.{i}.norm1.weight" in vit:
        b = f"blocks.{i}."
        h = ln(t, b + "norm1")
        qkv = F.linear(h, vit[b + "attn.qkv.weight"], vit[b + "attn.qkv.bias"])
        q, k, v = qkv.view(*h.shape[:2], 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v  # [B, h, N, d/h]
        t = t + F.linear(a.transpose(1, 2).reshape(h.shape), vit[b + "attn.proj.weight"], vit[b + "attn.proj.bias"])
        h = ln(t, b + "norm2")
        h = F.linear(F.gelu(F.linear(h, vit[b + "mlp.fc1.weight"], vit[b + "mlp.fc1.bias"])),
                     vit[b + "mlp.fc2.weight"], vit[b + "mlp.fc2.bias"])
        t = t + h
        i += 1
    return ln(t, "norm")


def test_imagereward_matches_blip_layout(rewards, tiny_imagereward_files):
    from pathlib import Path

    from flowalign.rewards.imagereward import split_checkpoint

    r = rewards["imagereward"]
    state = torch.load(Path(tiny_imagereward_files["path"]) / "ImageReward.pt", weights_only=True)
    vit, _, _ = split_checkpoint(state)
    px = r._pixels(synthetic_images(2, seed=8))
    ours = r.vision(pixel_values=px).last_hidden_state
    ref = _blip_vit_reference(vit, px, heads=2)
    assert torch.allclose(ours, ref, atol=1e-5)
    # prompt matters (cross-attention text encoder); standardisation constants applied
    imgs = synthetic_images(2, seed=9)
    a, b = r(imgs, ["a red cat", "a red cat"]), r(imgs, ["three blue squares", "three blue squares"])
    assert not torch.allclose(a, b)
    # a checkpoint without the BLIP parts is refused with a one-line error
    from flowalign.rewards.imagereward import blip_vit_to_hf

    with pytest.raises(UserError, match="unexpected vision key"):
        blip_vit_to_hf({"blocks.0.attn.qkv_x.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="lacks"):
        split_checkpoint({"mlp.layers.0.weight": torch.zeros(1)})


def test_bf16_tower_returns_float32(tiny_clip_dir):
    r = build_reward("pickscore", path=str(tiny_clip_dir), dtype="bf16")
    s = r(synthetic_images(2, seed=10), PROMPTS[:2])
    assert s.dtype == torch.float32 and torch.isfinite(s).all()


def test_offline_hub_ids_give_one_line_user_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        build_reward("pickscore")
    msg = str(e.value)
    assert "\n" not in msg and "hf download" in msg and "yuvalkirstain/PickScore_v1" in msg
    with pytest.raises(UserError, match=r"HPS_v2\.1_compressed\.pt.*hf download xswu/HPSv2"):
        build_reward("hpsv21")
    with pytest.raises(UserError, match="ImageReward.pt"):
        build_reward("imagereward")
    with pytest.raises(UserError, match="does not exist"):
        build_reward("clipscore", path=str(tmp_path / "missing"))


def test_a_missing_local_path_shaped_like_a_hub_id_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """`path=weights/PickScore_v1` with a `weights/` directory here but no such subdirectory: a missing local path
    (one line at once), not a hub id (which waited on the network, then suggested a download)."""
    from flowalign.errors import UserError
    from flowalign.rewards.base import hub_file, is_hub_id, resolve_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    assert not is_hub_id("weights/PickScore_v1") and is_hub_id("yuvalkirstain/PickScore_v1")
    with pytest.raises(UserError, match="'weights/PickScore_v1' does not exist"):
        resolve_source("weights/PickScore_v1", "pickscore model")
    with pytest.raises(UserError, match="does not exist"):
        hub_file("weights/hps", "xswu/HPSv2", "HPS_v2_compressed.pt", "hps checkpoint", "checkpoint")


@pytest.mark.parametrize("name", ["pickscore", "clipscore"])
def test_bf16_towers_keep_the_logit_scale_in_fp32(tiny_clip_dir, name, monkeypatch):
    """exp(logit_scale) multiplies every score; rounded to bf16 first it read ~1.1% low at PickScore's log 100.
    The bf16 and fp32 instances score a cosine of 1 as exactly the fp32 checkpoint's exp(logit_scale)."""
    from transformers import CLIPModel

    want = CLIPModel.from_pretrained(str(tiny_clip_dir)).logit_scale.detach().float().exp()
    assert want.to(torch.bfloat16).float() != want  # the tiny tower's scale is not exact in bf16: the test can fail
    scores = {}
    for dt in ("fp32", "bf16"):
        r = build_reward(name, path=str(tiny_clip_dir), dtype=dt)
        monkeypatch.setattr(r, "cosine", lambda images, prompts: torch.ones(len(prompts)))  # [B] cos = 1
        scores[dt] = r(synthetic_images(2, seed=11), PROMPTS[:2])  # [B] = exp(logit_scale)
        assert r.clip.model.logit_scale.dtype == (torch.bfloat16 if dt == "bf16" else torch.float32)
    assert torch.equal(scores["bf16"], scores["fp32"]) and torch.equal(scores["fp32"], want.expand(2))


def test_hps_refuses_the_other_versions_checkpoint(tiny_hps_files, tmp_path):
    """The recorded ``version`` must be that of the weights scored: v2.1's canonical file given to `hps` (v2.0), or
    v2.0's to `hpsv21`, is refused in one line naming the reward to use, as is a directory holding only the other."""
    arch, tok = tiny_hps_files["arch"], str(tiny_hps_files["tokenizer"])
    v20 = build_tiny_hps_file(tmp_path / "v20", name="HPS_v2_compressed.pt")
    v21 = build_tiny_hps_file(tmp_path / "v21", seed=1, name="HPS_v2.1_compressed.pt")
    for name, wrong, use in (("hps", v21, "hpsv21"), ("hpsv21", v20, "hps")):
        for given in (wrong, wrong.parent):
            with pytest.raises(UserError, match=f"use reward '{use}' for it") as err:
                build_reward(name, checkpoint=str(given), arch=arch, tokenizer=tok)
            assert "\n" not in str(err.value)
    assert build_reward("hps", checkpoint=str(v20), arch=arch, tokenizer=tok).version == "v2.0"
    assert build_reward("hpsv21", checkpoint=str(v21.parent), arch=arch, tokenizer=tok).version == "v2.1"
    both = tmp_path / "both"
    both.mkdir()
    for f in (v20, v21):
        (both / f.name).write_bytes(f.read_bytes())
    r20, r21 = (build_reward(n, checkpoint=str(both), arch=arch, tokenizer=tok) for n in ("hps", "hpsv21"))
    assert (r20.version, r21.version) == ("v2.0", "v2.1") and r21.checkpoint.endswith("HPS_v2.1_compressed.pt")


def test_a_directory_without_the_checkpoint_file_is_said_to_lack_it(tiny_hps_files, tiny_imagereward_files, tmp_path):
    """An existing directory that lacks the file: 'DIR holds no FILE', not 'DIR does not exist'."""
    from flowalign.rewards.base import hub_file

    empty = tmp_path / "weights"
    empty.mkdir()
    with pytest.raises(UserError, match=re.escape(f"'{empty}' holds no 'HPS_v2_compressed.pt'")) as err:
        build_reward("hps", checkpoint=str(empty), arch=tiny_hps_files["arch"], tokenizer=str(tiny_hps_files["tokenizer"]))
    assert "does not exist" not in str(err.value)
    with pytest.raises(UserError, match=re.escape(f"'{empty}' holds no 'ImageReward.pt'")):
        build_reward("imagereward", path=str(empty), tokenizer_path=str(tiny_imagereward_files["tokenizer_path"]))
    (empty / "ImageReward.pt").write_bytes(b"")  # the checkpoint but not its med_config.json
    with pytest.raises(UserError, match=re.escape(f"'{empty}' holds no 'med_config.json'")):
        build_reward("imagereward", path=str(empty), tokenizer_path=str(tiny_imagereward_files["tokenizer_path"]))
    with pytest.raises(UserError, match="does not exist"):  # a path that is not there at all still says so
        hub_file(str(empty / "nope"), "xswu/HPSv2", "HPS_v2_compressed.pt", "hps", "checkpoint")


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache: the hub's metadata request fails as a DNS failure would, counting
    its calls; the loaders (transformers, hf_hub_download) must not run at all."""
    import huggingface_hub
    import transformers
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    calls = []

    def no_network(url, *a, **k):
        calls.append(url)
        raise OSError("[Errno -2] Name or service not known")

    def no_loader(*a, **k):
        raise AssertionError("a loader ran (and retried the network) for an uncached hub id")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_loader)
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", no_loader)
    return calls


def test_an_uncached_hub_id_without_network_fails_at_once_with_one_line(no_hub):
    """Without network, PickScore's uncached default id went through huggingface_hub's download retries (~45 warning
    lines, ~50 s) before the one-line error: now one metadata request without retries, then the same line."""
    with pytest.raises(UserError) as e:
        build_reward("pickscore")
    msg = str(e.value)
    assert "\n" not in msg and "yuvalkirstain/PickScore_v1 is not in the local Hugging Face cache" in msg
    assert "--reward-arg pickscore.path=DIR" in msg  # the message hub_errors gave after the loader failed
    assert len(no_hub) == 1 and "yuvalkirstain/PickScore_v1" in no_hub[0]
    with pytest.raises(UserError, match=r"file 'HPS_v2\.1_compressed\.pt' of 'xswu/HPSv2' is not in the local"):
        build_reward("hpsv21")  # hub_file: the file itself is asked for, once
    assert len(no_hub) == 2 and no_hub[1].endswith("HPS_v2.1_compressed.pt")


def test_offline_mode_refuses_an_uncached_hub_id_without_any_request(no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="downloads are off"):
        build_reward("pickscore")
    assert no_hub == []


def test_a_cached_or_answering_hub_id_is_left_to_the_loader(no_hub, monkeypatch):
    """A cached id is not probed (the loader reads the cache, with or without network, as before); an uncached one the
    hub answers for, even with an error, goes to the loader too (its download or its own error, as before)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import HfHubHTTPError

    from flowalign.rewards.base import hub_errors, hub_file

    repo_dir = Path(constants.HF_HUB_CACHE) / "models--owner--cached"  # the cache's layout: refs/main -> snapshot
    (repo_dir / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0" * 40)
    snap = repo_dir / "snapshots" / ("0" * 40)
    (snap / "model.pt").write_bytes(b"x")
    with hub_errors("owner/cached", "test model"):
        ran = True
    assert ran and no_hub == []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename: f"{repo_id}:{filename}")
    assert hub_file(None, "owner/cached", "model.pt", "test", "path") == "owner/cached:model.pt"  # the download call
    assert no_hub == []

    import importlib.util

    # the HTTP library huggingface_hub is built on (httpx2 from 2.x, httpx in 1.x)
    http = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")

    def answers(url, *a, **k):
        no_hub.append(url)
        raise HfHubHTTPError("404 Client Error: entry not found",
                             response=http.Response(404, request=http.Request("HEAD", url)))

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", answers)
    assert hub_file(None, "owner/online", "model.pt", "test", "path") == "owner/online:model.pt"
    with hub_errors("owner/online", "test model"):
        ran = "again"
    assert ran == "again" and len(no_hub) == 2


# --------------------------------------------------------------------------------------------------------------------
# review fixes: non-finite images, clamp at the target size, crop offsets per library


def _with_failed_samples(n_clean: int = 2, h: int = 44, w: int = 52) -> torch.Tensor:
    """Two failed samples (a NaN patch, a +inf patch) followed by ``n_clean`` clean images."""
    x = synthetic_images(2 + n_clean, h=h, w=w, seed=12)
    x[0, :, 5:20, 5:20] = float("nan")
    x[1, 1, 3, 7] = float("inf")
    return x


@pytest.mark.parametrize("name", LEARNED)
def test_an_image_with_a_non_finite_pixel_scores_nan_on_every_path(rewards, name):
    """A diverged sample is NaN (spec §1: training masks it). The parity path quantises to uint8, which turned NaN
    into a pixel value and gave a finite score; a +inf pixel was clamped to 1 on the tensor path as well."""
    x = _with_failed_samples()
    prompts = PROMPTS[:4]
    for key in (name, name + ":parity"):
        s = rewards[key](x, prompts)
        assert torch.isnan(s[:2]).all(), (key, s)
        assert torch.isfinite(s[2:]).all(), (key, s)
        assert torch.allclose(s[2:], rewards[key](x[2:], prompts[2:]), atol=1e-5, rtol=0)  # neighbours do not leak
    if name in ("pickscore", "clipscore", "aesthetic", "hps"):  # embed_images feeds the video temporal term
        e = rewards[name + ":parity"].embed_images(x)
        assert torch.isnan(e[0]).all() and torch.isfinite(e[2:]).all()


def test_clip_preprocess_clamps_when_the_image_is_already_at_size():
    """resize_shortest returned early when the shortest side was already ``size``, skipping the clamp of spec §1
    step 1: out-of-range images at exactly 224 px reached the tower unclamped. Gradients flow as on the resize path
    (through the clamp: 0 outside [0, 1])."""
    x = (synthetic_images(2, h=32, w=37, seed=13) * 1.6 - 0.3).requires_grad_()  # values in [-0.3, 1.3]
    out = clip_preprocess(x, 32, 32)
    assert torch.equal(out, clip_preprocess(x.detach().clamp(0, 1), 32, 32))
    out.sum().backward()
    inside = (x.detach() > 0) & (x.detach() < 1)
    assert (x.grad[~inside] == 0).all() and (x.grad[inside] != 0).any()
    big = torch.full((1, 3, 224, 224), 1.3)
    assert torch.allclose(clip_preprocess(big), clip_preprocess(torch.ones(1, 3, 224, 224)))


@pytest.mark.parametrize("name", LEARNED)
def test_out_of_range_images_at_the_tower_size_score_as_clamped(rewards, name):
    x = synthetic_images(2, h=32, w=32, seed=5) * 1.6 - 0.3  # tiny towers take 32 px: no resize
    assert torch.allclose(rewards[name](x, PROMPTS[:2]), rewards[name](x.clamp(0, 1), PROMPTS[:2]), atol=1e-6, rtol=0)


def test_crop_starts_follow_torchvision_and_transformers():
    """torchvision's CenterCrop starts at round((h − c)/2) (half to even) and pads (c − h)//2 before a short axis;
    transformers' image_transforms.center_crop starts at (h − c)//2 and pads ceil((c − h)/2) before it."""
    import numpy as np
    from transformers.image_transforms import center_crop as hf_center_crop

    from flowalign.rewards.clip_common import CROP_STARTS, center_crop, torchvision_start, transformers_start

    assert set(CROP_STARTS) == {"torchvision", "transformers"}
    assert [torchvision_start(e) for e in (0, 1, 2, 3, 5, 7, 199, -1, -3, -4)] == [0, 0, 1, 2, 2, 4, 100, 0, -1, -2]
    assert [transformers_start(e) for e in (0, 1, 2, 3, 5, 7, 199, -1, -3, -4)] == [0, 0, 1, 1, 2, 3, 99, -1, -2, -2]
    g = torch.Generator().manual_seed(0)
    for h, w in [(32, 39), (39, 32), (35, 41), (32, 231), (29, 40), (40, 27), (25, 30), (32, 32)]:
        x = torch.rand(1, 3, h, w, generator=g)
        ref = hf_center_crop(x[0].numpy(), (32, 32), input_data_format="channels_first")
        ours = center_crop(x, 32, transformers_start)[0]
        assert ours.shape == (3, 32, 32) and np.array_equal(ours.numpy(), ref), (h, w)


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "aesthetic"])
def test_transformers_clip_rewards_crop_like_their_processor(rewards, name):
    """PickScore, CLIPScore and aesthetic reproduce transformers' CLIPImageProcessor, which crops at (h − c)//2, not
    torchvision's round((h − c)/2): on odd differences the tensor path was one pixel off the processor. Inputs are
    uint8 values at the tower's size (no resize), so both paths see the same pixels and must agree exactly."""
    from flowalign.rewards.clip_common import quantize

    clip = rewards[name].clip
    for h, w in [(32, 39), (39, 32), (32, 41), (32, 231)]:
        x = quantize(synthetic_images(2, h=h, w=w, seed=14)).float() / 255
        assert torch.allclose(clip.pixels(x), clip.pixels_pil(x), atol=1e-5, rtol=0), (name, h, w)


@pytest.mark.parametrize("name", ["hps", "imagereward"])
def test_open_clip_and_blip_rewards_keep_torchvisions_crop(rewards, name):
    """HPS (open_clip) and ImageReward (BLIP) use torchvision transforms: their tensor and parity paths share
    torchvision's offsets, so at the tower's size they agree exactly on odd differences too."""
    from flowalign.rewards.clip_common import quantize

    for h, w in [(32, 39), (39, 32), (32, 41)]:
        x = quantize(synthetic_images(2, h=h, w=w, seed=14)).float() / 255
        a, b = rewards[name]._pixels(x), rewards[name + ":parity"]._pixels(x)
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (name, h, w)


# --------------------------------------------------------------------------------------------------------------------
# mutation audit: score forms, standardisation and the resize step pinned exactly


def test_clipscore_forms_apply_their_own_weight_and_clamp(tiny_clip_dir, monkeypatch):
    """``form=clipscore`` is w·max(cos, 0) with the given w (Hessel et al. eq. 1; torchmetrics uses w = 100), ``cos``
    the raw cosine, ``logit`` exp(logit_scale)·cos."""
    cos = torch.tensor([-0.3, 0.2, 0.45])  # [B]
    imgs = synthetic_images(3, seed=15)
    out = {}
    for form in ("clipscore", "cos", "logit"):
        r = build_reward("clipscore", path=str(tiny_clip_dir), form=form, w=100.0)
        monkeypatch.setattr(r, "cosine", lambda images, prompts: cos.clone())
        out[form] = r(imgs, PROMPTS[:3])  # [B]
    torch.testing.assert_close(out["clipscore"], torch.tensor([0.0, 20.0, 45.0]))
    torch.testing.assert_close(out["cos"], cos)
    torch.testing.assert_close(out["logit"], r.clip.logit_scale.exp() * cos)


def test_imagereward_standardises_the_head_output(rewards, monkeypatch):
    """REWARDS_AND_EVAL.md §2.3: score = (raw − 0.16717362830052426) / 1.0333394966054072 with raw the MLP head's
    output on the [CLS] state."""
    r = rewards["imagereward"]
    raw = torch.tensor([2.0, -1.0])  # [B]
    monkeypatch.setattr(r, "head", lambda h: raw[: h.shape[0]].unsqueeze(-1))  # [n, 1]
    out = r(synthetic_images(2, seed=16), PROMPTS[:2])  # [B]
    torch.testing.assert_close(out, (raw - 0.16717362830052426) / 1.0333394966054072, atol=1e-6, rtol=0)


def test_resize_shortest_truncates_the_long_side_and_clamps_the_bicubic_overshoot():
    """Spec §1 step 1: bicubic, antialias, align_corners=False; long side int(size·long/short) (torchvision's and
    transformers' truncation, 32·61/47 = 41.5 → 41); the bicubic overshoot at sharp edges clamped into [0, 1]."""
    from flowalign.rewards.clip_common import resize_shortest

    x = torch.zeros(2, 3, 47, 61)  # [2, 3, 47, 61]
    x[:, :, :, 30:] = 1.0  # a step edge: bicubic overshoots on both sides
    raw = F.interpolate(x, size=(32, 41), mode="bicubic", antialias=True, align_corners=False)  # [2, 3, 32, 41]
    assert raw.min() < 0 and raw.max() > 1  # the input does overshoot: the clamp is exercised
    out = resize_shortest(x, 32)
    assert out.shape == (2, 3, 32, 41)
    assert torch.equal(out, raw.clamp(0, 1))
    assert resize_shortest(x.transpose(-1, -2), 32).shape == (2, 3, 41, 32)  # tall: the long side is the height


def test_imagereward_masks_the_prompts_padding(rewards, monkeypatch):
    """The text encoder attends only to the prompt's tokens (BERT attention mask of padding="max_length"): padding the
    same prompts to 50 instead of 35 tokens leaves every score unchanged."""
    r = rewards["imagereward"]
    imgs = synthetic_images(2, seed=17)
    a = r(imgs, PROMPTS[:2])  # [B], max_length 35
    monkeypatch.setattr(r, "text_max_length", 50)
    torch.testing.assert_close(r(imgs, PROMPTS[:2]), a, atol=1e-5, rtol=0)
