"""Review 2 of the shapes world: verifier properties over many rendered scenes, and the bugs this review fixed
(a prompt naming one class twice, a flat canvas scored as a scene, the metrics window across a resume)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from flowalign.shapes.grammar import COLORS, SHAPES, TASKS, enumerate_specs, parse, to_prompt
from flowalign.shapes.render import draw, render_scene
from flowalign.shapes.verify import verify, verify_soft

SHARP = {"area": 1e-6, "skew": 1e-6, "kurt": 1e-6, "relation": 1e-6}  # the soft score with vanishing widths


def _obj(color, shape, x, y, size=8.0):
    return {"color": color, "shape": shape, "center": (x, y), "size": size}


# ------------------------------------------------------------------------------------ verifier properties


@pytest.mark.parametrize("size,stride", [(32, 1), (64, 5)])
def test_every_rendered_scene_of_every_task_verifies_strict(size, stride):
    """Every specification of every task (every 5th at 64×64), rendered with its own seed: strict = partial = 1."""
    bad = []
    for t, task in enumerate(TASKS):
        for i, spec in enumerate(enumerate_specs(task)[::stride]):
            img, _ = render_scene(spec, size, np.random.default_rng((size, t, i)))
            r = verify(img, spec)
            if r.strict != 1.0 or r.partial != 1.0:
                bad.append((to_prompt(spec), r.clauses))
    assert not bad, bad[:5]


def _mutations(placements, spec, rng):
    """One object removed, recoloured or reshaped; for position scenes also subject and reference swapped."""
    k = int(rng.integers(len(placements)))
    removed = placements[:k] + placements[k + 1:]
    recolored = copy.deepcopy(placements)
    recolored[k]["color"] = [c for c in COLORS if c != placements[k]["color"]][int(rng.integers(len(COLORS) - 1))]
    reshaped = copy.deepcopy(placements)
    reshaped[k]["shape"] = [s for s in SHAPES if s != placements[k]["shape"]][int(rng.integers(len(SHAPES) - 1))]
    out = {"remove": removed, "recolor": recolored, "reshape": reshaped}
    if spec.relation is not None:
        swapped = copy.deepcopy(placements)
        swapped[0]["center"], swapped[1]["center"] = placements[1]["center"], placements[0]["center"]
        out["swap"] = swapped
    return out


def test_a_scene_with_one_object_removed_recoloured_reshaped_or_swapped_fails_the_right_clause():
    failures = []
    for t, task in enumerate(TASKS):
        for i, spec in enumerate(enumerate_specs(task)[::3]):
            rng = np.random.default_rng((t, i, 7))
            _, pl = render_scene(spec, 32, rng)
            for kind, p in _mutations(pl, spec, rng).items():
                r = verify(draw(p, 32), spec)
                broken = {c for c, v in r.clauses.items() if v < 1}
                if kind == "swap":
                    ok = broken == {"relation"}  # counts and colors still right, only the relation is wrong
                elif kind == "reshape":
                    ok = any(c.startswith("count[") for c in broken)
                else:  # a removed or recoloured object breaks a count or a color clause
                    ok = bool(broken) and r.strict == 0.0
                if not ok or r.partial >= 1.0:
                    failures.append((kind, to_prompt(spec), r.clauses))
    assert not failures, failures[:5]


# ------------------------------------------------------------------------------ bugs fixed by this review


def test_a_prompt_naming_one_class_twice_wants_two_objects_of_it():
    """parse accepts "a red circle and a red circle" (two red circles); each phrase used to be checked alone, so a red
    and a blue circle passed it, while "two red circles" failed the same image."""
    red_blue = draw([_obj("red", "circle", 8, 16), _obj("blue", "circle", 24, 16)])
    red_red = draw([_obj("red", "circle", 8, 16), _obj("red", "circle", 24, 16)])
    twice = parse("a red circle and a red circle")
    r = verify(red_blue, twice)
    assert r.strict == 0.0 and r.clauses == verify(red_blue, "two red circles").clauses
    assert verify_soft(red_blue, twice, SHARP)[1]["color[red circle]"] == pytest.approx(0.5)
    assert verify(red_red, twice).strict == 1.0
    assert verify_soft(red_red, twice, SHARP)[0] == pytest.approx(1.0)
    # the grammar's own prompts never repeat a class, so nothing changes for them
    assert verify(red_blue, "a red circle and a blue circle").strict == 1.0


@pytest.mark.parametrize("color", list(COLORS))
def test_a_flat_canvas_of_one_color_is_not_a_square(color):
    """A canvas filled with one palette color (no background at all) was one canvas-sized "square" of that color, so
    it scored strict = 1 for "a {color} square" (and maximises JPEG compressibility too: a reward hack)."""
    flat = np.zeros((32, 32, 3), np.float32) + np.asarray(COLORS[color], np.float32)
    r = verify(flat, f"a {color} square")
    assert r.strict == 0.0 and r.objects == []
    assert verify_soft(flat, f"a {color} square")[0] < 0.5
    # large objects well inside the canvas are still objects (the base model's largest blob covers 42% of it)
    big = draw([_obj(color, "circle", 16, 16, size=22.0)])
    assert [o["shape"] for o in verify(big, f"a {color} circle").objects] == ["circle"]


def test_resume_logs_the_same_loss_when_a_checkpoint_falls_inside_a_log_window(tmp_path):
    """checkpoint_every = 3, log_every = 2: the row of step 4 averages steps 3 and 4; the resumed run used to average
    only step 4 (its window restarted at the checkpoint)."""
    from test_pretrain import tiny_cfg, toy_data

    from flowalign.pretrain import pretrain

    cfg = tiny_cfg()
    assert (cfg.checkpoint_every, cfg.log_every, cfg.steps) == (3, 2, 6)
    pretrain(cfg, tmp_path / "full", data=toy_data, progress=False)
    pretrain(cfg, tmp_path / "cut", data=toy_data, progress=False, stop_after=3)
    pretrain(cfg, tmp_path / "cut", data=toy_data, progress=False, resume=True)

    def rows(d):
        return [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]

    assert rows(tmp_path / "cut") == rows(tmp_path / "full")
    assert [s for s, _ in rows(tmp_path / "full")] == [2, 4, 6]
