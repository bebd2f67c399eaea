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
    with pytest.raises(UserError, match="scores videos of motion prompts and 'a red circle' is a still scene"):
        strict.validate_prompts(["a red circle"])
    with pytest.raises(UserError, match="motion grammar"):  # in neither grammar: the grammar's own line
        strict.validate_prompts(["a red elephant moving up"])
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


# --------------------------------------------------------------------------------------------------------------------
# mutation audit: the renderer's geometry and the verifier's thresholds pinned exactly


def _track(xs, ys=None, px=32, color="red", shape="circle", size=8.0):
    """[F, px, px, 3]: one object per frame at base-px centre (xs[f], ys[f]); xs[f] = None leaves frame f empty.
    (A circle's detected centroid is within 0.03 base px of its centre, so thresholds can be probed closely.)"""
    from flowalign.shapes.render import draw

    ys = [12.0] * len(xs) if ys is None else ys
    return np.stack([draw([] if x is None else [{"color": color, "shape": shape, "size": size, "center": (x, y)}], px)
                     for x, y in zip(xs, ys)])  # [F, px, px, 3]


def test_rendered_paths_keep_speed_drift_border_and_gap():
    """The renderer's contract (module doc): straight constant-velocity paths whose along-axis speed lies in
    SPEED_RANGE and whose cross-axis drift is at most DRIFT_MAX of it (and present: not always 0), every frame's box
    ≥ BORDER from the canvas edge, and two objects' boxes ≥ GAP apart (Chebyshev) in every frame."""
    from flowalign.shapes.render import BASE, BORDER, GAP

    rng = np.random.default_rng(0)
    ratios = []
    for s in M.enumerate_specs("motion") * 3 + M.enumerate_specs("two_motion")[::5]:
        paths = M._paths(s, M.FRAMES, rng)
        for o, p in zip(s.objects, paths):
            c, half = p["centers"], p["size"] / 2  # [F, 2], scalar
            vel = np.diff(c, axis=0)  # [F-1, 2] per-frame displacement
            np.testing.assert_allclose(vel, np.broadcast_to(vel[0], vel.shape), atol=1e-9)  # constant velocity
            ax = np.asarray(M.DIRECTIONS[o.direction])
            along, cross = float(vel[0] @ ax), float(abs(vel[0] @ ax[::-1]))
            assert M.SPEED_RANGE[0] <= along <= M.SPEED_RANGE[1], (s, along)
            assert cross <= M.DRIFT_MAX * along + 1e-12, (s, cross / along)
            ratios.append(cross / along)
            assert (c - half >= BORDER - 1e-9).all() and (c + half <= BASE - BORDER + 1e-9).all(), s
        if len(paths) == 2:
            a, b = paths
            gap = np.abs(a["centers"] - b["centers"]).max(-1) - (a["size"] + b["size"]) / 2  # [F]
            assert (gap >= GAP - 1e-9).all(), (s, gap.min())
    assert max(ratios) > 0.8 * M.DRIFT_MAX  # the drift is really drawn, up to its bound


def test_batch_video_i_uses_the_generator_seeded_seed_i():
    """render_motion_batch's documented seeding: video i is render_motion(spec_i, rng=default_rng((seed, i))), so
    (seed, i) pairs never collide as seed + i would (seed 0 video 1 = seed 1 video 0)."""
    specs = _sample_specs(3, seed=4)
    vids = M.render_motion_batch(specs, seed=9)  # [3, F, H, W, 3]
    for i, s in enumerate(specs):
        assert np.array_equal(vids[i], M.render_motion(s, rng=np.random.default_rng((9, i))))
    a, b = M.render_motion_batch([specs[0]] * 2, seed=0), M.render_motion_batch([specs[0]], seed=1)
    assert not np.array_equal(a[1], b[0])


def test_direction_clause_needs_half_the_frames_held_spanning_half_the_clip():
    """Module doc: direction is judged over the frames that hold the object, which must be at least half of them
    (exactly half is enough) with the first and last ≥ F/2 frames apart (exactly F/2 is enough)."""
    s = M.parse("a red circle moving to the right")
    x = [8.0 + 1.5 * f for f in range(8)]  # 1.5 base px per frame, well above MIN_TRAVEL over any 3 frames
    cases = [
        ([x[0], x[1], None, None, None, None, x[6], x[7]], 0.5, 1.0),  # 4 of 8 frames held (exactly half), 7 apart
        ([x[0], x[1], x[2], x[3], x[4], None, None, None], 5 / 8, 1.0),  # held 0–4: first → last exactly F/2 = 4 apart
        ([x[0], x[1], x[2], x[3], None, None, None, None], 0.5, 0.0),  # held 0–3: 3 < F/2 apart though 4.5 px travelled
        ([x[0], None, None, None, None, None, None, x[7]], 0.25, 0.0),  # 2 of 8 held: fewer than half
    ]
    for xs, present, direction in cases:
        r = M.verify_motion(_track(xs), s)
        assert r.clauses["present[red circle]"] == pytest.approx(present), xs
        assert r.clauses["direction[red circle]"] == direction, (xs, r.clauses)
        assert r.clauses["steady[red circle]"] == direction, (xs, r.clauses)


def test_direction_clause_thresholds_are_in_base_pixels_and_bound_the_cross_axis_both_ways():
    """along ≥ MIN_TRAVEL base px (so a 64×64 clip's 2× pixel travel is halved before the check) and
    |cross| ≤ CROSS_MAX·along whichever way the object drifts across the axis."""
    right, up = M.parse("a red circle moving to the right"), M.parse("a red circle moving up")
    for px in (32, 64):
        slow = _track([8.0 + 2.5 * f / 7 for f in range(8)], px=px)  # 2.5 base px in all: < MIN_TRAVEL = 3
        fast = _track([8.0 + 3.5 * f / 7 for f in range(8)], px=px)  # 3.5 base px: ≥ MIN_TRAVEL
        assert M.verify_motion(slow, right).clauses["direction[red circle]"] == 0.0, px
        assert M.verify_motion(fast, right).clauses["direction[red circle]"] == 1.0, px
    for ratio, ok in ((0.4, 1.0), (-0.4, 1.0), (0.6, 0.0), (-0.6, 0.0)):  # cross / along, CROSS_MAX = 0.5
        xs, ys = [8.0 + f for f in range(8)], [16.0 + ratio * f for f in range(8)]  # 7 px right, 7·ratio px across
        assert M.verify_motion(_track(xs, ys), right).clauses["direction[red circle]"] == ok, ratio
        vertical = _track(ys, [24.0 - f for f in range(8)])  # the same path turned: 7 px up, 7·ratio px across
        assert M.verify_motion(vertical, up).clauses["direction[red circle]"] == ok, ratio


def test_steady_clause_allows_backsteps_up_to_backstep_px_per_frame_across_gaps():
    """steady fails only for a step back of more than BACKSTEP = 0.75 base px *per frame*: a pause or a 0.5 px step
    back passes, a 1 px one fails, and a 1.5 px step back across a 3-frame gap of unheld frames is 0.5 px/frame."""
    s = M.parse("a red circle moving to the right")
    cases = [
        ([8.0, 9.0, 10.0, 10.0, 11.0, 12.0, 13.0, 14.0], 1.0),  # a pause
        ([8.0, 9.0, 10.0, 9.5, 11.0, 12.0, 13.0, 14.0], 1.0),  # 0.5 px back
        ([8.0, 9.0, 10.0, 9.0, 11.0, 12.0, 13.0, 14.0], 0.0),  # 1.0 px back
        ([8.0, 9.0, 10.0, None, None, 8.5, 13.0, 14.0], 1.0),  # 1.5 px back over 3 frames: 0.5 px/frame
        ([8.0, 9.0, 10.0, None, None, 7.0, 13.0, 14.0], 0.0),  # 3 px back over 3 frames: 1 px/frame
    ]
    for xs, steady in cases:
        r = M.verify_motion(_track(xs), s)
        assert r.clauses["direction[red circle]"] == 1.0, xs
        assert r.clauses["steady[red circle]"] == steady, (xs, r.clauses)


def test_channel_first_videos_score_as_channel_last():
    """verify_motion takes [F, H, W, 3] or [F, 3, H, W] (its docstring): the same record either way."""
    specs = _sample_specs(4, seed=5)
    for i, s in enumerate(specs):
        v = M.render_motion(s, rng=np.random.default_rng(i))  # [F, H, W, 3]
        bad = v[::-1] if i % 2 else v  # half of them reversed: direction fails, the same way in both layouts
        a, b = M.verify_motion(bad, s), M.verify_motion(np.ascontiguousarray(bad.transpose(0, 3, 1, 2)), s)
        assert (a.strict, a.partial, a.clauses, a.tracks) == (b.strict, b.partial, b.clauses, b.tracks)
        assert a.strict == float(i % 2 == 0)


def test_per_frame_wrapper_keeps_a_verifier_rewards_non_differentiability():
    """PerFrame is differentiable iff the image reward it wraps is: the shapes verifier (numpy) is not, so a video
    model trained with it per frame must not be given gradient-based credit (REWARDS_AND_EVAL.md §2.10)."""
    from flowalign.rewards import build_reward
    from flowalign.rewards.video import PerFrame, for_outputs

    strict = build_reward("shapes_strict")
    assert not strict.differentiable
    assert PerFrame(strict).differentiable is False and for_outputs(strict, "video").differentiable is False
