"""The shapes world in motion (SHAPES_WORLD.md §6): grammar, renderer and the tracking verifier, and the video rewards
built on them. The verifier must pass every rendered video of its prompt and fail reversed, frozen, jittering,
recoloured or crowded ones."""

import numpy as np
import pytest
import torch

from flowalign.errors import UserError
from flowalign.shapes import motion as M

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _sample_specs(n, seed=0):
    specs = M.enumerate_specs("motion") + M.enumerate_specs("two_motion")
    idx = np.random.default_rng(seed).permutation(len(specs))[:n]
    return [specs[int(i)] for i in idx]


def test_grammar_round_trips_and_refuses_what_it_does_not_know():
    assert len(M.enumerate_specs("motion")) == 6 * 3 * 4
    assert len(M.enumerate_specs("two_motion")) == 3 * (6 * 4) ** 2  # ordered shape pairs s1 < s2
    for s in M.enumerate_specs("motion") + M.enumerate_specs("two_motion")[::37]:
        assert M.parse(M.to_prompt(s)) == s
    assert M.to_prompt(M.parse("  An Orange  CIRCLE moving to the left. ")) == "an orange circle moving to the left"
    for bad, needle in [("a red circle moving sideways", "sideways"), ("a pink circle moving up", "pink"),
                        ("a red circle moving up and a blue circle moving down", "different shapes"),
                        ("a red circle", "not 'a COLOR SHAPE moving DIRECTION'"), ("", "empty"),
                        ("a red circle moving up and a blue square moving up and a green triangle moving up",
                         "at most two")]:
        with pytest.raises(UserError, match=needle) as e:
            M.parse(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown motion task"):
        M.enumerate_specs("dance")


def test_prompt_generation_is_reproducible_distinct_and_excludes():
    a = M.generate_prompts(20, seed=3)
    assert a == M.generate_prompts(20, seed=3) and len(a) == 40
    assert len({p["prompt"] for p in a}) == 40 and {p["task"] for p in a} == set(M.TASKS)
    b = M.generate_prompts(20, seed=3, exclude=[p["prompt"] for p in a])
    assert not {p["prompt"] for p in a} & {p["prompt"] for p in b}
    assert all(M.parse(p["prompt"]).task == p["task"] for p in a + b)


def test_every_rendered_video_passes_and_the_renderer_is_deterministic():
    specs = _sample_specs(150)
    vids = M.render_motion_batch(specs, seed=7)  # [N, F, H, W, 3]
    assert vids.shape == (150, M.FRAMES, 32, 32, 3) and vids.dtype == np.float32
    assert np.array_equal(vids, M.render_motion_batch(specs, seed=7))
    recs = [M.verify_motion(v, s) for v, s in zip(vids, specs)]
    assert all(r.strict == 1.0 and r.partial == 1.0 for r in recs), [r.clauses for r in recs if r.strict < 1][:3]
    # robust to pixel noise as the image verifier is (σ = 0.06)
    noisy = np.clip(vids + np.random.default_rng(0).normal(0, 0.06, vids.shape), 0, 1).astype(np.float32)
    assert np.mean([M.verify_motion(v, s).strict for v, s in zip(noisy, specs)]) >= 0.99
    # a 64×64 canvas scales the geometry
    big = M.render_motion(specs[0], frames=6, size=64, rng=np.random.default_rng(1))
    assert big.shape == (6, 64, 64, 3) and M.verify_motion(big, specs[0]).strict == 1.0


def test_clips_too_short_for_the_verifier_are_refused_and_the_shortest_allowed_all_pass(monkeypatch):
    """With 2-4 frames correctly rendered clips failed the verifier (4 frames: 17 of 72 one-object clips), as an object
    at the slowest speed travels 0.8 px x 3 = 2.4 px < MIN_TRAVEL. The renderer now refuses fewer than MIN_FRAMES,
    derived from MIN_TRAVEL and the slowest speed; at MIN_FRAMES every clip passes, even all at the slowest speed."""
    assert M.MIN_FRAMES == 5
    assert M.SPEED_RANGE[0] * (M.MIN_FRAMES - 1) >= M.MIN_TRAVEL > M.SPEED_RANGE[0] * (M.MIN_FRAMES - 2)
    spec = M.parse("a red circle moving to the right")
    for frames in (1, 2, 3, 4, 5.0, True):
        with pytest.raises(UserError, match=r"frames must be an integer >= 5, got .*slowest speed") as e:
            M.render_motion(spec, frames, rng=np.random.default_rng(0))
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="frames must be an integer >= 5, got 4"):
        M.render_motion_batch([spec], frames=4)
    specs = M.enumerate_specs("motion") + M.enumerate_specs("two_motion")[::8]
    vids = M.render_motion_batch(specs, frames=M.MIN_FRAMES, seed=11)
    assert vids.shape[1] == 5 and all(M.verify_motion(v, s).strict == 1.0 for v, s in zip(vids, specs))
    monkeypatch.setattr(M, "SPEED_RANGE", (M.SPEED_RANGE[0], M.SPEED_RANGE[0]))  # the worst case: every object slowest
    specs = M.enumerate_specs("motion")
    vids = M.render_motion_batch(specs, frames=M.MIN_FRAMES, seed=12)
    assert all(M.verify_motion(v, s).strict == 1.0 for v, s in zip(vids, specs))


def test_reversed_frozen_and_wrong_direction_videos_fail_the_direction_clause():
    for s in _sample_specs(40, seed=1):
        v = M.render_motion(s, rng=np.random.default_rng(2))
        wrong = M.MotionSpec(tuple(M.MovingObject(o.color, o.shape, OPPOSITE[o.direction]) for o in s.objects), s.task)
        for video, spec in ((v[::-1], s), (np.repeat(v[:1], M.FRAMES, 0), s), (v, wrong)):
            r = M.verify_motion(video, spec)
            assert r.strict == 0.0
            assert all(r.clauses[f"direction[{o.color} {o.shape}]"] == 0.0 for o in spec.objects)
            assert all(r.clauses[f"present[{o.color} {o.shape}]"] == 1.0 for o in spec.objects)


def test_a_step_back_breaks_steadiness_but_not_direction():
    s = M.parse("a green square moving down")
    v = M.render_motion(s, rng=np.random.default_rng(4))
    jitter = v[[0, 2, 1, 3, 4, 5, 6, 7]]  # frame 2 before frame 1: one step back by ≥ 0.8 px
    r = M.verify_motion(jitter, s)
    assert r.clauses == {"present[green square]": 1.0, "direction[green square]": 1.0, "steady[green square]": 0.0}
    assert r.strict == 0.0 and r.partial == pytest.approx(2 / 3)


def test_identity_and_exact_counts_are_checked_in_every_frame():
    s = M.parse("a red circle moving to the right")
    v = M.render_motion(s, rng=np.random.default_rng(5))
    # the circle turns blue from frame 6 on: those frames do not hold the red circle
    recolored = v.copy()
    red, blue = np.asarray((0.84, 0.06, 0.10), np.float32), np.asarray((0.10, 0.22, 0.90), np.float32)
    for f in (6, 7):
        px = np.abs(recolored[f] - red).sum(-1) < 0.05
        recolored[f][px] = blue
    r = M.verify_motion(recolored, s)
    assert r.clauses["present[red circle]"] == pytest.approx(6 / 8) and r.strict == 0.0
    assert r.tracks["red circle"][6] is None and r.tracks["red circle"][5] is not None
    # a second circle (any color) in frame 3 breaks that frame, as an extra object breaks an exact count
    other = M.render_motion(M.parse("a yellow circle moving up"), rng=np.random.default_rng(6))
    crowded = v.copy()
    crowded[3] = np.where(np.abs(other[3] - 0.8).sum(-1, keepdims=True) > 0.1, other[3], v[3])
    from flowalign.shapes.verify import detect

    assert sorted(o["color"] for o in detect(crowded[3]) if o["shape"] == "circle") == ["red", "yellow"]
    assert M.verify_motion(crowded, s).clauses["present[red circle]"] == pytest.approx(7 / 8)


def test_video_rewards_score_batches_and_refuse_bad_input():
    from flowalign.rewards import build_reward
    from flowalign.rewards.video import for_outputs

    strict, partial = build_reward("shapes_motion_strict"), build_reward("shapes_motion_partial")
    assert strict.kind == "video" and not strict.differentiable
    specs = _sample_specs(4, seed=2)
    prompts = [M.to_prompt(s) for s in specs]
    vids = torch.from_numpy(M.render_motion_batch(specs, seed=1)).permute(0, 1, 4, 2, 3).contiguous()  # [B,F,3,H,W]
    vids[2] = vids[2].flip(0)  # reversed: fails
    vids[3, 4, 0, 0, 0] = float("nan")  # a failed sample: NaN
    s, p = strict(vids, prompts), partial(vids, prompts)
    assert s[:3].tolist() == [1.0, 1.0, 0.0] and torch.isnan(s[3]) and torch.isnan(p[3])
    assert p[0] == 1.0 and 0 < float(p[2]) < 1
    with pytest.raises(ValueError, match=r"\[B,F,3,H,W\]"):
        strict(vids[:, 0], prompts)
    with pytest.raises(UserError, match="motion grammar"):
        strict.validate_prompts(["a red circle"])
    with pytest.raises(UserError, match="scores videos"):
        for_outputs(strict, "image")


def test_shipped_motion_prompt_sets_are_what_the_generator_writes():
    from flowalign.data import load_prompts
    from flowalign.shapes.make_prompt_sets import PROMPTS_DIR, SEED, build_motion_prompt_sets

    sets = build_motion_prompt_sets(SEED)
    for name, rows in sets.items():
        loaded = load_prompts(name)
        assert [(r.prompt, r.metadata.get("task")) for r in loaded] == [(r["prompt"], r["task"]) for r in rows]
        assert all(M.parse(r["prompt"]).task == r["task"] for r in rows)
    bench, train = sets["shapes-motion-bench"], sets["shapes-motion-train"]
    assert {t: sum(r["task"] == t for r in bench) for t in M.TASKS} == {"motion": 40, "two_motion": 40}
    two = {r["prompt"] for r in bench if r["task"] == "two_motion"}
    assert len(two) == 40 and not two & {r["prompt"] for r in train}
    assert "shapes-motion-bench.jsonl" in (PROMPTS_DIR / "PROVENANCE.md").read_text(encoding="utf-8")
