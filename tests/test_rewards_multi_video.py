"""Combined (multi-reward), PerFrame (video wrapper), Scaled, and the `flowalign rewards` catalogue."""

from __future__ import annotations

import json

import pytest
import torch

from flowalign.errors import UserError
from flowalign.rewards import REWARDS, build_reward
from flowalign.rewards.base import Scaled
from flowalign.rewards.multi import Combined
from flowalign.rewards.video import PerFrame
from tiny_rewards import tiny_clip_dir  # noqa: F401  (session fixture)


class Brightness:
    """Mean pixel value (differentiable), NaN for images whose prompt is 'nan'; counts calls."""

    name = "brightness"
    differentiable = True
    kind = "image"

    def __init__(self):
        self.calls = 0
        self.batch_sizes = []

    def __call__(self, images, prompts, metadata=None):
        self.calls += 1
        self.batch_sizes.append(images.shape[0])
        s = images.float().mean(dim=(1, 2, 3))
        bad = torch.tensor([p == "nan" for p in prompts], device=images.device)
        return torch.where(bad, torch.full_like(s, float("nan")), s)


class RedMinusBlue:
    name = "red_minus_blue"
    differentiable = False
    kind = "image"

    def __call__(self, images, prompts, metadata=None):
        return (images[:, 0] - images[:, 2]).mean(dim=(1, 2)).float()


def test_combined_components_and_weighted_sum():
    imgs = torch.rand(5, 3, 8, 8)
    prompts = ["p"] * 5
    c = Combined([(Brightness(), 2.0), (RedMinusBlue(), -0.5)])
    comps = c.components(imgs, prompts)
    assert list(comps) == ["brightness", "red_minus_blue"]
    b, r = Brightness()(imgs, prompts), RedMinusBlue()(imgs, prompts)
    assert torch.allclose(comps["brightness"], b) and torch.allclose(comps["red_minus_blue"], r)
    total = c(imgs, prompts)
    assert total.dtype == torch.float32 and total.shape == (5,)
    assert torch.allclose(total, 2.0 * b - 0.5 * r)
    assert torch.allclose(c.aggregate(comps), total)
    assert c.differentiable is False  # one component is not
    assert c.weights == {"brightness": 2.0, "red_minus_blue": -0.5}


def test_combined_by_name_duplicates_and_errors():
    imgs = torch.rand(3, 3, 16, 16)
    c = Combined({"saturation": 1.0, "edge_crispness": 0.25})
    comps = c.components(imgs, ["x"] * 3)
    assert set(comps) == {"saturation", "edge_crispness"}
    ref = build_reward("saturation")(imgs, ["x"] * 3) + 0.25 * build_reward("edge_crispness")(imgs, ["x"] * 3)
    assert torch.allclose(c(imgs, ["x"] * 3), ref)
    assert c.differentiable  # both components are
    dup = Combined([(Brightness(), 1.0), (Brightness(), 1.0)])
    assert list(dup.weights) == ["brightness", "brightness_2"]
    # NaN (not applicable) in a component → NaN aggregate for that sample only
    out = Combined([(Brightness(), 1.0), (RedMinusBlue(), 1.0)])(imgs, ["ok", "nan", "ok"])
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    with pytest.raises(UserError, match="not combined"):
        Combined({"saturation": 1.0}, kwargs={"pickscore": {"path": "x"}})
    with pytest.raises(UserError, match="unknown reward"):
        Combined({"saturaton": 1.0})
    with pytest.raises(UserError, match="mix"):
        Combined([(Brightness(), 1.0), (PerFrame(Brightness()), 1.0)])


def test_scaled():
    imgs = torch.rand(4, 3, 8, 8)
    s = Scaled(Brightness(), scale=1 / 26, offset=-1.0)
    assert torch.allclose(s(imgs, ["p"] * 4), Brightness()(imgs, ["p"] * 4) / 26 - 1.0)
    assert s.name == "brightness" and s.differentiable


def test_per_frame_one_batched_call_and_reductions():
    torch.manual_seed(0)
    vid = torch.rand(3, 9, 3, 8, 8)
    prompts = ["a", "b", "c"]
    inner = Brightness()
    pf = PerFrame(inner, stride=4, reduce="mean")
    fs = pf.frame_scores(vid, prompts)
    assert fs.shape == (3, 3)  # frames 0, 4, 8
    assert inner.calls == 1 and inner.batch_sizes == [9]  # one batched call of B·F′ images
    ref = torch.stack([vid[:, f].mean(dim=(1, 2, 3)) for f in (0, 4, 8)], 1)
    assert torch.allclose(fs, ref)
    assert torch.allclose(pf(vid, prompts), ref.mean(1))
    assert torch.allclose(PerFrame(Brightness(), stride=4, reduce="min")(vid, prompts), ref.min(1).values)
    first = Brightness()
    assert torch.allclose(PerFrame(first, reduce="first")(vid, prompts), vid[:, 0].mean(dim=(1, 2, 3)))
    assert first.batch_sizes == [3]  # only frame 0 is scored
    assert pf.kind == "video" and pf.differentiable


def test_per_frame_mean_positive_and_nan():
    class Fixed:
        name, differentiable, kind = "fixed", False, "image"

        def __init__(self, values):
            self.values = torch.tensor(values)

        def __call__(self, images, prompts, metadata=None):
            return self.values.clone()

    # 2 videos × 3 frames, flattened video-major
    vals = [0.0, 0.5, 0.3, -1.0, 0.0, float("nan")]
    vid = torch.zeros(2, 3, 3, 4, 4)
    mp = PerFrame(Fixed(vals), stride=1, reduce="mean_positive")(vid, ["a", "b"])
    assert torch.allclose(mp, torch.tensor([0.4, 0.0]))  # mean of positives; none positive → 0
    mean = PerFrame(Fixed(vals), stride=1, reduce="mean")(vid, ["a", "b"])
    assert torch.allclose(mean, torch.tensor([0.8 / 3, -0.5]))  # NaN frames ignored
    mn = PerFrame(Fixed([float("nan")] * 3 + [1.0, 2.0, 3.0]), stride=1, reduce="min")(vid, ["a", "b"])
    assert torch.isnan(mn[0]) and mn[1] == 1.0  # all-NaN → NaN


def test_per_frame_temporal_terms(tiny_clip_dir):
    still = torch.rand(1, 1, 3, 16, 16).expand(2, 5, 3, 16, 16).clone()
    flicker = still.clone()
    flicker[1, 1::2] = 1.0 - flicker[1, 1::2]
    prompts = ["a cat", "a cat"]
    pix = PerFrame(Brightness(), stride=1, temporal_weight=1.0)
    assert pix.temporal == "pixel"
    c = pix.temporal_consistency(flicker)
    assert torch.allclose(c[0], torch.tensor(1.0)) and c[1] < 0.9
    base = PerFrame(Brightness(), stride=1)(flicker, prompts)
    assert torch.allclose(pix(flicker, prompts), base + c)
    with pytest.raises(UserError, match="embed_images"):
        PerFrame(Brightness(), temporal="embedding")
    # embedding term from a CLIP-family reward; differentiable end to end
    ps = build_reward("pickscore", path=str(tiny_clip_dir))
    emb = PerFrame(ps, stride=2, temporal_weight=0.5)
    assert emb.temporal == "embedding"
    ce = emb.temporal_consistency(flicker)
    assert torch.allclose(ce[0], torch.tensor(1.0), atol=1e-5) and ce[1] < ce[0] - 1e-4
    v = flicker.clone().requires_grad_()
    emb(v, prompts).sum().backward()
    assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def test_per_frame_rejects_images_and_bad_args():
    pf = PerFrame(Brightness())
    with pytest.raises(ValueError, match=r"\[B,F,3,H,W\]"):
        pf(torch.rand(2, 3, 8, 8), ["a", "b"])
    with pytest.raises(UserError, match="reduce"):
        PerFrame(Brightness(), reduce="median")
    with pytest.raises(UserError, match="stride"):
        PerFrame(Brightness(), stride=0)


def test_catalog_lists_every_registered_reward(capsys):
    from flowalign.rewards.catalog import catalog, cli_main

    assert cli_main([]) == 0
    text = capsys.readouterr().out
    for name in REWARDS:
        assert f"\n{name}  [" in "\n" + text, name
    assert cli_main(["--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert set(entries) == set(REWARDS)
    ps = entries["pickscore"]
    assert ps["differentiable"] is True and ps["checkpoints"][0]["default"] == "yuvalkirstain/PickScore_v1"
    assert entries["jpeg_compressibility"]["differentiable"] is False
    assert all(e["measures"] and e["typical_range"] for e in catalog()), [e["name"] for e in catalog() if not e["measures"]]


def test_wrappers_forward_the_prompt_check_of_the_rewards_they_wrap():
    """The trainer and `flowalign eval` call ``validate_prompts`` before sampling; a wrapper must not hide the
    shapes verifier's (PerFrame on a video model was scored only after sampling, and crashed there)."""
    strict = build_reward("shapes_strict")
    good, bad = ["a red circle", "two blue squares"], ["a red circle", "a red circle moving up"]
    wrapped = [PerFrame(strict, stride=1), Scaled(strict, 2.0), Combined([(strict, 1.0), (Brightness(), 0.5)]),
               PerFrame(Scaled(strict, 0.5)), Combined([(PerFrame(strict), 1.0)])]
    for w in wrapped:
        w.validate_prompts(good)
        with pytest.raises(UserError, match="'a red circle moving up' is a motion prompt"):
            w.validate_prompts(bad)
    for w in (PerFrame(Brightness()), Combined([(Brightness(), 1.0)])):  # nothing to check: no error, no attribute error
        w.validate_prompts(bad)


def test_a_video_with_a_non_finite_pixel_in_a_skipped_frame_scores_nan():
    """With stride 4 frame 1 is never scored: a NaN there left the video a finite score locally while the remote
    path (which checks the whole video) gave NaN; a diverged video is NaN on every path."""
    vid = torch.rand(2, 9, 3, 8, 8)
    vid[1, 1, 0, 0, 0] = float("nan")
    out = PerFrame(Brightness(), stride=4)(vid, ["a", "b"])
    assert torch.isfinite(out[0]) and torch.isnan(out[1])


def test_devices_this_torch_cannot_use_are_refused_before_building():
    from flowalign.rewards.catalog import check_device

    for ok in ("cpu", "cpu:0", "meta", torch.device("cpu")):
        check_device(ok, "r")
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        with pytest.raises(UserError, match="has no xpu device here"):
            check_device("xpu", "r")
    with pytest.raises(UserError, match=r"device=0 is a bare index; pass device=cuda:0"):
        check_device(0, "r")


# --------------------------------------------------------------------------------------------------------------------
# mutation audit: weights, reductions and temporal terms pinned exactly


def test_combined_mapping_of_reward_weight_pairs_and_per_name_kwargs():
    """``{key: (reward, weight)}`` keeps each weight (R = Σ w_k·R_k, METHODS.md §3.4), and the ``{name: weight}`` form
    builds each reward with its own ``kwargs[name]`` (here JPEG quality 50, not the default 95)."""
    imgs = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # [4, 3, 16, 16]
    prompts = ["p"] * 4
    c = Combined({"b": (Brightness(), 3.0), "rb": (RedMinusBlue(), -2.0)})
    assert c.weights == {"b": 3.0, "rb": -2.0} and list(c.rewards) == ["b", "rb"]
    ref = 3.0 * Brightness()(imgs, prompts) - 2.0 * RedMinusBlue()(imgs, prompts)  # [4]
    torch.testing.assert_close(c(imgs, prompts), ref)
    named = Combined({"jpeg_incompressibility": 1.0}, kwargs={"jpeg_incompressibility": {"quality": 50}})
    assert named.rewards["jpeg_incompressibility"].quality == 50
    torch.testing.assert_close(named(imgs, prompts), build_reward("jpeg_incompressibility", quality=50)(imgs, prompts))


def test_per_frame_mean_positive_of_an_all_nan_video_is_nan():
    """REWARDS_AND_EVAL.md §2.10: NaN frames are ignored and an all-NaN video gives NaN for every reduction
    (``mean_positive`` must not turn a failed video into the 0 of "no positive frame")."""

    class Fixed:
        name, differentiable, kind = "fixed", False, "image"

        def __call__(self, images, prompts, metadata=None):
            return torch.tensor([float("nan")] * 3 + [-1.0, float("nan"), 2.0])  # [B·F′] video-major

    vid = torch.zeros(2, 3, 3, 4, 4)  # [B=2, F=3, 3, 4, 4]
    for reduce in ("mean", "min", "mean_positive"):
        out = PerFrame(Fixed(), stride=1, reduce=reduce)(vid, ["a", "b"])  # [2]
        assert torch.isnan(out[0]) and torch.isfinite(out[1]), (reduce, out)
    assert PerFrame(Fixed(), stride=1, reduce="mean_positive")(vid, ["a", "b"])[1] == 2.0


def test_temporal_terms_are_exact():
    """Pixel term C = 1 − mean_{f,c,h,w} |x_{f+1} − x_f| over consecutive frames; embedding term = mean cosine of
    consecutive frames, independent of the embeddings' norms (REWARDS_AND_EVAL.md §2.10)."""
    from flowalign.rewards.video import embedding_consistency, pixel_consistency

    vid = torch.zeros(1, 3, 3, 2, 2)  # [B=1, F=3, 3, 2, 2]
    vid[0, 1] = 0.5  # |Δ| = 0.5 everywhere from frame 0 to 1
    vid[0, 2] = 0.75  # |Δ| = 0.25 from frame 1 to 2 (0.75 from frame 0: not the term)
    torch.testing.assert_close(pixel_consistency(vid), torch.tensor([1.0 - (0.5 + 0.25) / 2]))
    emb = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]]])  # [B=1, F=3, D=2], norms 1, 3, 2√2
    want = (0.0 + 2 ** -0.5) / 2  # cos(e0, e1) = 0, cos(e1, e2) = 1/√2
    torch.testing.assert_close(embedding_consistency(emb), torch.tensor([want]))


def test_temporal_weight_scales_the_temporal_term():
    """score = reduce(frame scores) + temporal_weight · C, for a weight other than 1."""
    g = torch.Generator().manual_seed(1)
    vid = torch.rand(2, 4, 3, 8, 8, generator=g)  # [B, F, 3, H, W]
    prompts = ["a", "b"]
    pf = PerFrame(Brightness(), stride=1, temporal_weight=0.25)
    base = PerFrame(Brightness(), stride=1)(vid, prompts)  # [B]
    torch.testing.assert_close(pf(vid, prompts), base + 0.25 * pf.temporal_consistency(vid))


def test_per_frame_passes_each_frame_its_own_videos_prompt_and_metadata():
    """The B·F′ batch is video-major (frames of video 0, then video 1, …): each frame is scored with its own video's
    prompt and metadata, and the scores come back as [B, F′] in that order."""

    class Echo:
        name, differentiable, kind = "echo", False, "image"

        def __call__(self, images, prompts, metadata=None):
            # frame value (pixels hold 10·video + frame) + prompt id + metadata bonus
            return (images[:, 0, 0, 0] + torch.tensor([100.0 * int(p) for p in prompts])
                    + torch.tensor([1000.0 * m["k"] for m in metadata]))

    b, f = 3, 5
    vid = torch.zeros(b, f, 3, 2, 2)  # [B, F, 3, 2, 2]
    for i in range(b):
        for j in range(f):
            vid[i, j] = 10.0 * i + j
    fs = PerFrame(Echo(), stride=2).frame_scores(vid, ["1", "2", "3"], [{"k": 1}, {"k": 2}, {"k": 3}])  # [B, 3]
    want = torch.tensor([[1100.0 * (i + 1) + 10.0 * i + j for j in (0, 2, 4)] for i in range(b)])
    torch.testing.assert_close(fs, want)


def test_a_shapes_verifier_given_the_other_worlds_prompt_names_the_reward_to_use(tmp_path, capsys):
    """`eval --model shapes_video --rewards shapes_strict` blamed the prompt ("outside the shapes grammar: unknown word
    'moving'"), though docs/rewards.md promised a line pointing at shapes_motion_strict: the still verifier, wrapped
    per frame, parsed motion prompts. Both directions now name the reward to use; a prompt in neither grammar keeps
    the grammar's own error. Still prompts on the video model (shapes-bench) are evaluated with a warning."""
    import logging

    from cli_checks import fails

    still, motion = build_reward("shapes_strict"), build_reward("shapes_motion_partial")
    with pytest.raises(UserError, match=r"reward 'shapes_strict' scores still scenes .* 'a red circle moving up' is a "
                                        r"motion prompt; for videos use shapes_motion_strict or shapes_motion_partial"):
        still.validate_prompts(["a red circle", "a red circle moving up"])
    with pytest.raises(UserError, match=r"reward 'shapes_motion_partial' scores videos of motion prompts and 'a red "
                                        r"circle' is a still scene; add a motion"):
        motion.validate_prompts(["a red circle"])
    with pytest.raises(UserError, match="outside the shapes grammar") as e:
        still.validate_prompts(["a red elephant"])
    assert "motion" not in str(e.value).split(":")[0]
    fails(capsys, ["eval", "--model", "shapes_video", "--max-prompts", "1", "--rewards", "shapes_strict",
                   "--out", str(tmp_path / "e")], "for videos use shapes_motion_strict")
    assert not (tmp_path / "e").exists()

    from flowalign.cli import main

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("flowalign").addHandler(handler)
    try:
        assert main(["eval", "--model", "shapes_video", "--prompts", "shapes-bench", "--max-prompts", "1", "--seeds",
                     "1", "--steps", "2", "--rewards", "shapes_partial", "--grid", "0", "--out", str(tmp_path / "s")]) == 0
    finally:
        logging.getLogger("flowalign").removeHandler(handler)
    assert any("1 of 1 prompts are outside the grammar --model shapes_video was trained on" in r.getMessage()
               and r.getMessage().endswith("evaluating them anyway") for r in records)
    records.clear()  # steer warns alike (it said nothing)
    logging.getLogger("flowalign").addHandler(handler)
    try:
        assert main(["steer", "--model", "shapes_video", "a red circle", "--method", "none", "--steps", "2",
                     "--reward", "saturation", "--eval-rewards", "saturation", "--out", str(tmp_path / "st")]) == 0
    finally:
        logging.getLogger("flowalign").removeHandler(handler)
    assert any("1 of 1 prompts are outside the grammar --model shapes_video was trained on" in r.getMessage()
               and r.getMessage().endswith("steering them anyway") for r in records)
