"""The shapes world: grammar, renderer, verifier, verifier rewards and the shipped prompt sets."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from flowalign.errors import UserError
from flowalign.shapes.grammar import (
    BACKGROUND,
    COLORS,
    SHAPES,
    TASKS,
    ObjectSpec,
    Spec,
    enumerate_specs,
    generate_prompts,
    parse,
    sample_spec,
    to_prompt,
    vocabulary,
)
from flowalign.shapes.render import BORDER, GAP, draw, layout, render, render_batch, render_scene
from flowalign.shapes.verify import mismatch, relations_between, verify, verify_batch, verify_soft

# ------------------------------------------------------------------------------------------- grammar


def test_palette_and_constants():
    assert len(COLORS) == 6 and SHAPES == ("circle", "square", "triangle")
    vals = np.array(list(COLORS.values()))
    assert ((vals >= 0) & (vals <= 1)).all()
    d = np.linalg.norm(vals[:, None] - vals[None], axis=-1) + np.eye(6)
    assert d.min() > 0.3  # well separated


def test_parse_round_trip_every_spec():
    n = 0
    for task in TASKS:
        for spec in enumerate_specs(task):
            got = parse(to_prompt(spec))
            want = replace(spec, task="single_object") if task == "colors" else spec
            assert got == want, (to_prompt(spec), got)
            n += 1
    assert n == 18 + 18 + 54 + 216 + 1224 + 90


def test_parse_examples_and_leniency():
    assert parse("a red circle above a blue square") == Spec(
        (ObjectSpec("red", "circle"), ObjectSpec("blue", "square")), "above", "position"
    )
    assert parse("  Three BLUE triangles. ") == Spec((ObjectSpec("blue", "triangle", 3),), None, "counting")
    assert parse("a orange square") == parse("an orange square")
    assert parse("a red triangle and a blue triangle").task == "color_attr"
    # one class named twice is two of it (the verifier counts it so), not color_attr, which needs two colours
    assert parse("a red circle and a red circle").task == "counting"
    assert parse("a green square and a yellow circle").task == "two_object"
    assert parse("a red circle to the right of a red square").relation == "right of"


@pytest.mark.parametrize(
    "prompt, word",
    [
        ("a pink circle", "pink"),
        ("a red hexagon", "hexagon"),
        ("a photo of a red circle", "photo"),
        ("five red circles", "five"),
        ("a red circle near a blue square", "near"),
    ],
)
def test_unknown_word_is_named(prompt, word):
    with pytest.raises(UserError) as e:
        parse(prompt)
    msg = str(e.value)
    assert f"'{word}'" in msg and "outside the shapes grammar" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "prompt",
    ["red circle", "two red circle", "a red circles", "a red circle and", "a red circle and two blue squares",
     "a red circle to the left a blue square", "", "circle a red"],
)
def test_known_words_bad_structure_raise(prompt):
    with pytest.raises(UserError):
        parse(prompt)


def test_vocabulary_covers_every_prompt():
    vocab = vocabulary()
    assert vocab == sorted(set(vocab)) and vocabulary() == vocab
    words = {w for t in TASKS for s in enumerate_specs(t) for w in to_prompt(s).split()}
    assert words == set(vocab)


def test_sample_spec_valid_and_uniform_over_tasks():
    rng = np.random.default_rng(0)
    counts = {t: 0 for t in TASKS}
    for _ in range(1200):
        s = sample_spec(rng)
        counts[s.task] += 1
        assert s in enumerate_specs(s.task)
    assert min(counts.values()) > 150  # ~200 each
    # per-task sampling hits the whole small spaces
    seen = {sample_spec(rng, "counting") for _ in range(600)}
    assert len(seen) == 54
    with pytest.raises(UserError):
        sample_spec(rng, "video")


def test_generate_prompts_deterministic_and_excludes():
    a = generate_prompts(30, seed=3)
    assert a == generate_prompts(30, seed=3) and a != generate_prompts(30, seed=4)
    assert [r["task"] for r in a] == [t for t in TASKS for _ in range(30)]
    excl = {r["prompt"] for r in a if r["task"] == "position"}
    b = generate_prompts(30, seed=5, exclude=excl)
    assert not excl & {r["prompt"] for r in b if r["task"] == "position"}
    single = [r["prompt"] for r in generate_prompts(40, seed=1, tasks=["single_object"])]
    cnt = np.bincount(np.unique(single, return_inverse=True)[1])
    assert len(cnt) == 18 and cnt.min() == 2 and cnt.max() == 3  # whole passes, balanced


# ------------------------------------------------------------------------------------------- render


def test_render_deterministic_shapes_and_range():
    spec = parse("four green triangles")
    a = render(spec, 32, np.random.default_rng(7))
    b = render(spec, 32, np.random.default_rng(7))
    c = render(spec, 32, np.random.default_rng(8))
    assert a.dtype == np.float32 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    big = render(spec, 64, np.random.default_rng(7))
    assert big.shape == (64, 64, 3)
    specs = [parse("a red circle"), parse("three blue squares"), parse("a red circle above a blue square")]
    batch = render_batch(specs, 32, seed=1)
    assert batch.shape == (3, 32, 32, 3) and np.array_equal(batch, render_batch(specs, 32, seed=1))
    # image i depends only on (seed, i, spec i), not on the other specs
    assert np.array_equal(render_batch([specs[0], specs[2], specs[2]], 32, seed=1)[2], batch[2])


def test_render_is_antialiased():
    img = render(parse("a red circle"), 32, np.random.default_rng(0))
    gray = np.abs(img - np.array([0.8, 0.8, 0.8])).sum(-1)
    red = np.abs(img - np.array(COLORS["red"])).sum(-1)
    mixed = (gray > 0.05) & (red > 0.05)
    assert 4 <= mixed.sum() <= 60  # an edge ring of partially covered pixels


def test_layout_constraints():
    rng = np.random.default_rng(0)
    for task in TASKS:
        for _ in range(60):
            spec = sample_spec(rng, task)
            pl = layout(spec, rng)
            assert len(pl) == sum(o.count for o in spec.objects)
            for p in pl:
                (x, y), s = p["center"], p["size"]
                assert BORDER - 1e-9 <= x - s / 2 and x + s / 2 <= 32 - BORDER + 1e-9
                assert BORDER - 1e-9 <= y - s / 2 and y + s / 2 <= 32 - BORDER + 1e-9
            for i in range(len(pl)):
                for j in range(i + 1, len(pl)):
                    d = np.abs(np.subtract(pl[i]["center"], pl[j]["center"])).max()
                    assert d >= (pl[i]["size"] + pl[j]["size"]) / 2 + GAP - 1e-9
            if spec.relation:
                (xs, ys), (xr, yr) = pl[0]["center"], pl[1]["center"]
                along = {"left of": xr - xs, "right of": xs - xr, "above": yr - ys, "below": ys - yr}[spec.relation]
                assert along > max(pl[0]["size"], pl[1]["size"])  # more than an object size


# ------------------------------------------------------------------------------------------- verifier


@pytest.mark.parametrize("task", TASKS)
def test_verifier_accepts_fresh_scenes(task):
    rng = np.random.default_rng(TASKS.index(task))
    specs = [sample_spec(rng, task) for _ in range(200)]
    recs = verify_batch(render_batch(specs, 32, seed=11), specs)
    acc = np.mean([r.strict for r in recs])
    assert acc >= 0.99, (task, acc)
    assert all(r.partial == 1.0 for r in recs if r.strict == 1.0)


def test_verifier_accepts_fresh_scenes_64():
    rng = np.random.default_rng(64)
    specs = [sample_spec(rng, t) for t in TASKS for _ in range(25)]
    recs = verify_batch(render_batch(specs, 64, seed=3), specs)
    assert np.mean([r.strict for r in recs]) >= 0.99


@pytest.mark.parametrize("kind", ["color", "shape", "count", "relation"])
def test_verifier_catches_mismatched_scenes(kind):
    rng = np.random.default_rng(1)
    tasks = ["position"] if kind == "relation" else TASKS
    specs = [sample_spec(rng, t) for t in tasks for _ in range(150 // len(tasks) + 1)]
    wrong = [mismatch(s, rng, kind) for s in specs]
    assert all(w != s for w, s in zip(wrong, specs))
    recs = verify_batch(render_batch(wrong, 32, seed=5), specs)
    caught = np.mean([r.strict == 0.0 for r in recs])
    assert caught >= 0.97, (kind, caught)
    assert np.mean([r.partial for r in recs]) < 0.8


def test_verifier_robust_to_mild_noise_blur_and_tint():
    from scipy import ndimage

    rng = np.random.default_rng(2)
    specs = [sample_spec(rng, t) for t in TASKS for _ in range(20)]
    imgs = ndimage.gaussian_filter(render_batch(specs, 32, seed=9), (0, 0.6, 0.6, 0))
    imgs = imgs + rng.normal(0, 0.05, (len(specs), 1, 1, 3)) + rng.normal(0, 0.04, imgs.shape)
    recs = verify_batch(np.clip(imgs, 0, 1).astype(np.float32), specs)
    assert np.mean([r.strict for r in recs]) >= 0.95


def _scene(*objs, size=32):
    """Hand-placed scene: objs are (color, shape, x, y) in 32-px units, size 8."""
    return draw([{"color": c, "shape": s, "center": (x, y), "size": 8.0} for c, s, x, y in objs], size)


def test_partial_credit_and_exact_count_semantics():
    spec = parse("three blue triangles")
    two = _scene(("blue", "triangle", 8, 8), ("blue", "triangle", 22, 8))
    r = verify(two, spec)
    assert r.strict == 0 and r.clauses == {"count[triangle]": pytest.approx(2 / 3), "color[blue triangle]": 1.0}
    three = _scene(("blue", "triangle", 8, 8), ("blue", "triangle", 22, 8), ("blue", "triangle", 8, 22))
    assert verify(three, spec).strict == 1
    # an unrelated extra object (another shape) is allowed
    plus_circle = _scene(("blue", "triangle", 8, 8), ("blue", "triangle", 22, 8), ("blue", "triangle", 8, 22),
                         ("red", "circle", 22, 22))
    assert verify(plus_circle, spec).strict == 1
    # an extra object of the required shape breaks the exact count, even in another color
    plus_tri = _scene(("blue", "triangle", 8, 8), ("blue", "triangle", 22, 8), ("blue", "triangle", 8, 22),
                      ("red", "triangle", 22, 22))
    r = verify(plus_tri, spec)
    assert r.strict == 0 and r.clauses["count[triangle]"] == pytest.approx(2 / 3)
    # wrong color: count met, color clause 0
    r = verify(_scene(("red", "triangle", 8, 8), ("red", "triangle", 22, 8), ("red", "triangle", 8, 22)), spec)
    assert r.clauses == {"count[triangle]": 1.0, "color[blue triangle]": 0.0} and r.partial == 0.5
    # empty canvas: nothing
    r = verify(_scene(), spec)
    assert r.strict == 0 and r.partial == 0 and r.objects == []


def test_color_binding_and_relation_clauses():
    spec = parse("a red triangle and a blue triangle")
    r = verify(_scene(("red", "triangle", 8, 16), ("red", "triangle", 24, 16)), spec)
    assert r.clauses == {"count[triangle]": 1.0, "color[red triangle]": 1.0, "color[blue triangle]": 0.0}
    assert verify(_scene(("red", "triangle", 8, 16), ("blue", "triangle", 24, 16)), spec).strict == 1
    pos = parse("a red circle to the left of a blue square")
    left = _scene(("red", "circle", 8, 16), ("blue", "square", 24, 18))
    right = _scene(("red", "circle", 24, 16), ("blue", "square", 8, 18))
    assert verify(left, pos).strict == 1
    r = verify(right, pos)
    assert r.strict == 0 and r.clauses["relation"] == 0.0 and r.partial == pytest.approx(4 / 5)
    # GenEval's rule: at 45° both relations hold; a mostly horizontal offset gives only the horizontal one
    a, b = {"bbox": (0, 0, 8, 8)}, {"bbox": (16, 16, 24, 24)}
    assert relations_between(a, b) == {"left of", "above"}
    assert relations_between({"bbox": (0, 10, 8, 18)}, b) == {"left of"}


def test_detected_objects_record():
    img = _scene(("yellow", "square", 10, 10), ("purple", "circle", 22, 22))
    objs = {o["color"]: o for o in verify(img, parse("a yellow square and a purple circle")).objects}
    assert objs["yellow"]["shape"] == "square" and objs["purple"]["shape"] == "circle"
    cx, cy = objs["yellow"]["centroid"]
    assert abs(cx - 10) < 0.3 and abs(cy - 10) < 0.3
    assert 40 < objs["purple"]["area"] < 60  # π·4² ≈ 50
    x0, y0, x1, y1 = objs["purple"]["bbox"]
    assert x0 < 22 < x1 and y0 < 22 < y1


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(4)
    specs = [sample_spec(rng) for _ in range(12)]
    arr = render_batch(specs, 32, seed=2)
    t = torch.from_numpy(arr).permute(0, 3, 1, 2)
    a = [r.partial for r in verify_batch(arr, specs)]
    b = [r.partial for r in verify_batch(t, [to_prompt(s) for s in specs])]
    assert a == b
    assert verify(t[0], specs[0]).clauses == verify(arr[0], specs[0]).clauses


def test_verifier_speed():
    rng = np.random.default_rng(5)
    specs = [sample_spec(rng) for _ in range(300)]
    imgs = render_batch(specs, 32, seed=0)
    verify_batch(imgs[:20], specs[:20])  # warm up (scipy import)
    t0 = time.perf_counter()
    verify_batch(imgs, specs)
    ms = (time.perf_counter() - t0) / len(specs) * 1e3
    assert ms < 3.0, ms  # ≈ 0.5 ms on an idle core; generous for a shared CPU


# ------------------------------------------------------------------------------------------- rewards


def test_shapes_rewards_interface_and_batch_independence():
    from flowalign.rewards import build_reward

    strict, partial = build_reward("shapes_strict"), build_reward("shapes_partial")
    assert strict.differentiable is False and strict.kind == "image" and strict.name == "shapes_strict"
    rng = np.random.default_rng(6)
    specs = [sample_spec(rng) for _ in range(8)]
    prompts = [to_prompt(s) for s in specs]
    good = torch.from_numpy(render_batch(specs, 32, seed=0)).permute(0, 3, 1, 2)  # [8, 3, 32, 32]
    wrong = torch.from_numpy(render_batch([mismatch(s, rng) for s in specs], 32, seed=0)).permute(0, 3, 1, 2)
    x = torch.cat([good[:4], wrong[4:]])
    s, p = strict(x, prompts), partial(x, prompts)
    assert s.dtype == torch.float32 and s.shape == (8,) and p.shape == (8,)
    assert s.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert (p[:4] == 1).all() and (p[4:] < 1).all() and (p >= 0).all()
    alone = torch.stack([partial(x[i : i + 1], prompts[i : i + 1])[0] for i in range(8)])
    assert torch.equal(alone, p)
    x2 = x.clone()
    x2[3] = float("nan")
    out = partial(x2, prompts)
    assert torch.isnan(out[3]) and torch.equal(out[:3], p[:3])
    with pytest.raises(UserError, match="'pink'"):
        strict(x[:1], ["a pink circle"])
    recs = strict.records(x[:2], prompts[:2])
    assert recs[0].strict == 1 and recs[0].objects


# --------------------------------------------------------------------------------------- prompt sets


def _load(name):
    from flowalign.shapes.make_prompt_sets import prompt_set_path

    with open(prompt_set_path(name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_shipped_prompt_sets():
    from flowalign.shapes.make_prompt_sets import N_BENCH, N_TRAIN, PROMPTS_DIR, SEED, build_prompt_sets

    train, bench = _load("shapes-train"), _load("shapes-bench")
    assert len(train) == N_TRAIN * len(TASKS) and len(bench) == N_BENCH * len(TASKS)
    for rows in (train, bench):
        assert {r["task"]: sum(q["task"] == r["task"] for q in rows) for r in rows} == {
            t: len(rows) // len(TASKS) for t in TASKS
        }
        for r in rows:
            spec = parse(r["prompt"])
            assert spec.task == ("single_object" if r["task"] == "colors" else r["task"])
    for t in ("two_object", "position", "color_attr"):
        b = {r["prompt"] for r in bench if r["task"] == t}
        assert len(b) == N_BENCH and not b & {r["prompt"] for r in train if r["task"] == t}
    # the files are exactly what the generator writes for the recorded seed
    assert build_prompt_sets(SEED) == {"shapes-train": train, "shapes-bench": bench}
    assert f"--seed {SEED}" in (PROMPTS_DIR / "PROVENANCE.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------- soft training score

TINY = {"area": 1e-6, "skew": 1e-6, "kurt": 1e-6, "relation": 1e-6}


def _scenes(n_per_task, seed):
    """Correct, mismatched and noisy rendered scenes with their prompts' specs."""
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng, t) for t in TASKS for _ in range(n_per_task)]
    good = render_batch(specs, 32, seed=seed)
    wrong = render_batch([mismatch(s, rng) for s in specs], 32, seed=seed + 1)
    noisy = np.clip(good + rng.normal(0, 0.08, good.shape).astype(np.float32), 0, 1)
    return specs * 3, np.concatenate([good, wrong, noisy])


def test_soft_score_becomes_the_hard_clauses_as_widths_vanish():
    from flowalign.shapes.verify import MIN_AREA, detect, score, soft_score

    specs, imgs = _scenes(12, 21)
    n_color_frac = 0
    for spec, img in zip(specs, imgs):
        hard = score(detect(img), spec)
        soft = soft_score(detect(img, min_area=2.0), spec, temps=TINY)
        assert hard.keys() == soft.keys()
        for k, h in hard.items():
            if k.startswith("color") and h == 0.0:
                assert 0.0 <= soft[k] < 1.0  # the one relaxation: a fraction of the requested colors
                n_color_frac += soft[k] > 0
            else:
                assert soft[k] == pytest.approx(h, abs=1e-9), (spec, k, h, soft[k])
    assert MIN_AREA > 2.0 and n_color_frac > 0


def test_soft_clauses_move_continuously_across_each_hard_threshold():
    from flowalign.shapes.verify import MIN_AREA, SQUARE_KURT, TRIANGLE_SKEW, score, soft_score

    def obj(shape="circle", area=20.0, skew=0.0, kurt=0.0, x=10.0, color="red"):
        return {"color": color, "shape": shape, "area": area, "skew": skew, "kurt_diff": kurt,
                "bbox": (x - 3, 13, x + 3, 19), "centroid": (x, 16.0)}

    def sweep(make, values, spec, clause):
        soft = [soft_score(make(v), spec)[clause] for v in values]
        assert all(b >= a - 1e-12 for a, b in zip(soft, soft[1:])), soft  # monotone
        inner = [round(v, 6) for v in soft if 1e-3 < v < 1 - 1e-3]
        assert len(set(inner)) == len(inner) >= len(values) // 2  # strictly moving between the two plateaus
        assert soft[0] < 0.2 and soft[-1] > 0.8
        return soft

    one = parse("a red circle")
    areas = np.linspace(MIN_AREA - 3, MIN_AREA + 3, 13)
    sweep(lambda a: [obj(area=a)], areas, one, "count[circle]")
    hard = [score([obj(area=a)] if a >= MIN_AREA else [], one)["count[circle]"] for a in areas]
    assert set(hard) == {0.0, 1.0}  # the hard clause jumps at MIN_AREA
    tri = parse("a red triangle")
    sweep(lambda k: [obj(skew=k)], np.linspace(TRIANGLE_SKEW + 0.3, TRIANGLE_SKEW - 0.3, 13), tri, "count[triangle]")
    sq = parse("a red square")
    sweep(lambda k: [obj(kurt=k)], np.linspace(SQUARE_KURT - 0.3, SQUARE_KURT + 0.3, 13), sq, "count[square]")
    rel = parse("a red circle to the left of a blue circle")
    # subject at x, reference at 20: the subject moves from right of the reference to well left of it
    sweep(lambda x: [obj(x=x), obj(x=20.0, color="blue")], np.linspace(18.6, 8.0, 12), rel, "relation")


def test_shapes_soft_reward_interface():
    from flowalign.rewards import build_reward

    soft, partial = build_reward("shapes_soft"), build_reward("shapes_partial")
    assert soft.name == "shapes_soft" and soft.differentiable is False
    specs, imgs = _scenes(8, 4)
    prompts = [to_prompt(s) for s in specs]
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)  # [3·48, 3, 32, 32]: good, wrong, noisy
    r, p = soft(x, prompts), partial(x, prompts)
    assert r.shape == (len(prompts),) and ((r >= 0) & (r <= 1)).all()
    n = len(prompts) // 3
    assert r[:n].mean() > 0.93 and r[2 * n:].mean() > 0.88 and r[n:2 * n].mean() < p[:n].mean() - 0.25
    assert np.corrcoef(r.numpy(), p.numpy())[0, 1] > 0.8
    x2 = x[:3].clone()
    x2[1] = float("nan")
    out = soft(x2, prompts[:3])
    assert torch.isnan(out[1]) and torch.equal(out[[0, 2]], r[[0, 2]])
    with pytest.raises(UserError, match="unknown temps"):
        build_reward("shapes_soft", temps={"size": 1.0})


@pytest.mark.parametrize("temps, match", [
    ({"size": 1.0}, "unknown temps key 'size' \\(known: area, skew, kurt, relation\\)"),
    ({"area": 0}, r"temps\.area must be a finite number > 0 \(default 1\.5\), got 0"),  # was ZeroDivisionError
    ({"skew": -0.08}, r"temps\.skew must be a finite number > 0"),  # was a silently reversed threshold
    ({"kurt": "wide"}, r"temps\.kurt must be a finite number > 0"),  # was TypeError mid-scoring
    ({"relation": float("inf")}, r"temps\.relation must be a finite number > 0"),
    ({"area": True}, r"temps\.area must be a finite number > 0"),
    ([1.0, 2.0], "temps must be a mapping"),
])
def test_shapes_soft_refuses_bad_temps_in_one_line(temps, match):
    from flowalign.rewards import build_reward

    with pytest.raises(UserError, match=match) as err:
        build_reward("shapes_soft", temps=temps)
    assert "\n" not in str(err.value)


def test_shapes_soft_temps_take_effect():
    from flowalign.rewards import build_reward

    specs, imgs = _scenes(4, 4)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)  # [3·16, 3, 32, 32]
    prompts = [to_prompt(s) for s in specs]
    soft = build_reward("shapes_soft", temps={"area": 3, "skew": 0.2})
    assert soft.temps == {"area": 3.0, "skew": 0.2}
    assert not torch.equal(soft(x, prompts), build_reward("shapes_soft")(x, prompts))


# ---------------------------------------------------------------------------------------- grammar: trailing period


def test_parse_accepts_a_space_before_the_trailing_period():
    from flowalign.shapes.grammar import parse

    assert parse("a red circle .") == parse("a red circle")
    assert parse("two blue squares .  ") == parse("two blue squares")


# ------------------------------------------------------------------- verifier properties over many rendered scenes

SHARP = {"area": 1e-6, "skew": 1e-6, "kurt": 1e-6, "relation": 1e-6}  # the soft score with vanishing widths


def _obj(color, shape, x, y, size=8.0):
    return {"color": color, "shape": shape, "center": (x, y), "size": size}


@pytest.mark.parametrize("size,stride", [(32, 1), (64, 5)])
def test_every_rendered_scene_of_every_task_verifies_strict(size, stride):
    """Every specification of every task (every 5th at 64×64), rendered with its own seed: strict = partial = 1."""
    bad = []
    for t, task in enumerate(TASKS):
        for i, spec in enumerate(enumerate_specs(task)[::stride]):
            img, _ = render_scene(spec, size, np.random.default_rng((size, t, i)))
            r = verify(img, spec)
            if r.strict != 1.0 or r.partial != 1.0 or r.strict_intact != 1.0:  # no rendered object fails the gate
                bad.append((to_prompt(spec), r.clauses, r.intact))
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


# ------------------------------------------------------------------------------------------------ make_prompt_sets


@pytest.mark.parametrize("args", [["--n-train", "-1"], ["--n-bench", "0"], ["--seed", "-1"]])
def test_make_prompt_sets_bad_counts_exit_2_with_one_line(tmp_path, capsys, args):
    from flowalign.shapes.make_prompt_sets import main

    out = tmp_path / "sets"
    with pytest.raises(SystemExit) as info:
        main([*args, "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and args[0] in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ integrity gate


def test_elongation_is_the_axis_ratio_of_the_coverage():
    """A uniform 4 × 16 bar of pixels has variances (16² − 1)/12 and (4² − 1)/12 along its axes: elongation √17 on the
    grid, ≈ 4 (the continuous bar's) when tilted; a disc's is 1."""
    from flowalign.shapes.verify import _elongation

    ys, xs = np.mgrid[0:40, 0:40].astype(np.float64) + 0.5
    bar = ((np.abs(xs - 20) < 8) & (np.abs(ys - 20) < 2)).astype(np.float64)  # [40, 40]
    for patch in (bar, bar.T):  # lying or standing
        assert _elongation(patch, xs - 20, ys - 20, patch.sum()) == pytest.approx(17 ** 0.5, rel=1e-9)
    big_y, big_x = np.mgrid[0:120, 0:120].astype(np.float64) + 0.5
    for angle in (0.3, np.pi / 4, 2.0):  # a finer bar (12 × 48 px), tilted: ≈ the continuous ratio 4
        u = (big_x - 60) * np.cos(angle) + (big_y - 60) * np.sin(angle)
        v = -(big_x - 60) * np.sin(angle) + (big_y - 60) * np.cos(angle)
        tilted = ((np.abs(u) < 24) & (np.abs(v) < 6)).astype(np.float64)
        cx, cy = (tilted * big_x).sum() / tilted.sum(), (tilted * big_y).sum() / tilted.sum()
        assert _elongation(tilted, big_x - cx, big_y - cy, tilted.sum()) == pytest.approx(4.0, rel=0.05), angle
    disc = (((xs - 20) ** 2 + (ys - 20) ** 2) < 100).astype(np.float64)
    assert _elongation(disc, xs - 20, ys - 20, disc.sum()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("size", [32, 64])
def test_merged_objects_and_strokes_pass_strict_but_not_the_integrity_gate(size):
    """Two touching circles of one colour are one component (one "circle": strict passes "a red circle"), a long bar
    is one "square"; both fail ``intact`` at any resolution, while separate objects of rendered sizes pass it."""
    from flowalign.shapes.verify import INTACT_MAX_AREA, INTACT_MAX_ELONGATION, detect, intact

    merged = draw([_obj("red", "circle", 12, 16), _obj("red", "circle", 19, 16)], size)  # overlap by 1 px
    r = verify(merged, "a red circle")
    assert (r.strict, r.intact, r.strict_intact) == (1.0, 0.0, 0.0)
    assert len(r.objects) == 1 and r.objects[0]["elongation"] > INTACT_MAX_ELONGATION
    apart = draw([_obj("red", "circle", 8, 16), _obj("red", "circle", 24, 16)], size)
    r = verify(apart, "two red circles")
    assert (r.strict, r.intact, r.strict_intact) == (1.0, 1.0, 1.0)
    bar = np.zeros((size, size, 3), np.float32) + np.asarray(BACKGROUND, np.float32)
    k = size // 32
    bar[15 * k:18 * k, 4 * k:28 * k] = np.asarray(COLORS["blue"], np.float32)  # 3 × 24 px: elongation ≈ 8
    r = verify(bar, f"a blue {verify(bar, 'a blue square').objects[0]['shape']}")
    assert r.strict == 1.0 and r.intact == 0.0 and r.as_dict()["intact"] == 0.0
    # a compact object larger than any rendered one (the shipped base sometimes draws them) is not intact either
    blob = draw([_obj("green", "square", 16, 16, size=13.0)], size)  # 121 px at 32×32
    (o,) = detect(blob)
    scale2 = (size / 32) ** 2
    assert o["area"] > INTACT_MAX_AREA * scale2 and o["elongation"] < 1.1 and not intact(o, scale2)
    assert verify(blob, "a green square").strict_intact == 0.0


def test_shapes_strict_intact_reward_is_strict_times_intact():
    from flowalign.rewards import build_reward

    merged = draw([_obj("red", "circle", 12, 16), _obj("red", "circle", 19, 16)])
    apart = draw([_obj("red", "circle", 8, 16), _obj("red", "circle", 24, 16)])
    images = torch.from_numpy(np.stack([apart, merged, apart])).permute(0, 3, 1, 2)  # [3, 3, 32, 32]
    prompts = ["two red circles", "a red circle", "a blue circle"]
    assert build_reward("shapes_strict")(images, prompts).tolist() == [1.0, 1.0, 0.0]
    assert build_reward("shapes_strict_intact")(images, prompts).tolist() == [1.0, 0.0, 0.0]
    nan = images.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert torch.isnan(build_reward("shapes_strict_intact")(nan, prompts)[0])


# ------------------------------------------------------------------------- pinned decision rules and geometry


def test_background_estimate_follows_a_tint_but_is_clamped_to_the_tolerance():
    """The background is the per-channel median, kept within ``BG_TOLERANCE`` of the nominal gray (module docstring,
    step 1): a mild tint passes through exactly, a non-scene canvas cannot redefine it beyond the clamp."""
    from flowalign.shapes.verify import BG_TOLERANCE, estimate_background

    gray = np.asarray(BACKGROUND, np.float32)  # [3]
    tint = np.asarray([0.05, -0.1, 0.12], np.float32)  # [3], each within the tolerance
    img = np.zeros((32, 32, 3), np.float32) + gray + tint  # [32, 32, 3]
    img[4:10, 4:10] = np.asarray(COLORS["red"], np.float32)  # an object: not the median
    np.testing.assert_allclose(estimate_background(img), gray + tint, atol=1e-6)
    for fill in ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), COLORS["blue"]):
        flat = np.zeros((32, 32, 3), np.float32) + np.asarray(fill, np.float32)  # [32, 32, 3]
        want = gray + np.clip(np.asarray(fill, np.float32) - gray, -BG_TOLERANCE, BG_TOLERANCE)
        np.testing.assert_allclose(estimate_background(flat), want, atol=1e-6)
        assert np.abs(estimate_background(flat) - gray).max() <= BG_TOLERANCE + 1e-6


def test_object_area_is_the_soft_coverage_clipped_to_one_per_pixel():
    """Area = Σ α over the component's core pixels and its anti-aliased edge pixels (step 2), with α clipped to 1: a
    rendered disc's area is πr² (edges included), and a darker-than-palette object (α = 1.1) is no bigger."""
    from flowalign.shapes.verify import detect

    for size in (32, 64):
        (o,) = detect(draw([_obj("red", "circle", 16.3, 15.8)], size))
        assert o["area"] == pytest.approx(np.pi * 16 * (size / 32) ** 2, rel=0.02)  # core pixels alone fall short
    gray = np.asarray(BACKGROUND, np.float32)
    img = np.zeros((32, 32, 3), np.float32) + gray  # [32, 32, 3]
    img[10:17, 12:19] = gray + 1.1 * (np.asarray(COLORS["purple"], np.float32) - gray)  # 7 × 7 px, α = 1.1
    (o,) = detect(img)
    assert o["color"] == "purple" and o["area"] == pytest.approx(49.0, abs=1e-3)


@pytest.mark.parametrize("size", [32, 64])
def test_speck_and_canvas_share_thresholds_scale_with_the_canvas(size):
    """MIN_AREA and MAX_AREA_FRACTION are fractions of the canvas: a near-speck (≈ 3.8 px at 32×32) is dropped and a
    ≈ 9.6 px disc kept at every resolution; a large disc (37% of the canvas) is still an object at 64×64."""
    from flowalign.shapes.verify import detect

    assert detect(draw([_obj("red", "circle", 16, 16, size=2.2)], size)) == []
    assert [o["shape"] for o in detect(draw([_obj("red", "circle", 16, 16, size=3.5)], size))] == ["circle"]
    big = draw([_obj("green", "circle", 16, 16, size=22.0)], size)
    assert [o["color"] for o in verify(big, "a green circle").objects] == ["green"]
    assert verify(big, "a green circle").strict == 1.0


def test_count_clause_is_clipped_at_zero_for_far_too_many_objects():
    """count = clip(1 − |found − want| / want, 0, 1) (step 4): three circles for "a red circle" score 0, not −1, so
    partial stays in [0, 1]."""
    r = verify(_scene(("red", "circle", 6, 6), ("red", "circle", 26, 6), ("red", "circle", 16, 26)), "a red circle")
    assert r.clauses == {"count[circle]": 0.0, "color[red circle]": 1.0}
    assert r.partial == 0.5 and r.strict == 0.0


def test_fill_ratio_is_area_over_widest_row_times_tallest_column():
    """fill = A / (widest row × tallest column) (step 3): a full 3 × 12 bar has fill 1 lying or standing; a rendered
    disc ≈ π/4, a square ≈ 1, a triangle ≈ 0.6."""
    from flowalign.shapes.verify import detect

    for sl in ((slice(14, 17), slice(10, 22)), (slice(10, 22), slice(14, 17))):
        img = np.zeros((32, 32, 3), np.float32) + np.asarray(BACKGROUND, np.float32)  # [32, 32, 3]
        img[sl] = np.asarray(COLORS["orange"], np.float32)
        (o,) = detect(img)
        assert o["fill"] == pytest.approx(1.0, abs=1e-4) and o["area"] == pytest.approx(36.0, abs=1e-3)
    fills = {s: detect(draw([_obj("blue", s, 15.6, 16.2)]))[0]["fill"] for s in SHAPES}
    assert fills["circle"] == pytest.approx(np.pi / 4, abs=0.02)
    assert fills["square"] == pytest.approx(1.0, abs=0.02)
    assert fills["triangle"] == pytest.approx(0.6, abs=0.03)


def test_soft_existence_weight_is_resolution_invariant():
    """soft_weights: e = σ((area − MIN_AREA·scale²)/(τ_area·scale²)), so an object's weight depends on its area in
    32×32 pixels only: the same object at 64×64 (4× the pixels, scale² = 4) gets the same e."""
    from flowalign.shapes.verify import MIN_AREA, soft_weights

    for area in (MIN_AREA - 2.0, MIN_AREA - 0.5, MIN_AREA + 1.0):
        base = {"area": area, "skew": 0.0, "kurt_diff": 0.0}
        e1, p1 = soft_weights(base, 1.0)
        e4, p4 = soft_weights({**base, "area": 4 * area}, 4.0)
        assert e4 == pytest.approx(e1, rel=1e-12) and p4 == p1
        assert 0.05 < e1 < 0.95  # inside the ramp, where a wrong width shows


def test_verify_soft_sees_near_specks():
    """verify_soft detects down to SOFT_MIN_AREA (2 px), below the hard MIN_AREA (6 px): a ≈ 5.5 px near-speck beside
    one red circle adds its existence weight to "two red circles" (the hard verifier ignores it)."""
    lone = draw([_obj("red", "circle", 8, 16)])
    speck = draw([_obj("red", "circle", 8, 16), _obj("red", "circle", 24, 16, size=2.6)])
    assert verify(speck, "two red circles").clauses == verify(lone, "two red circles").clauses
    c_lone = verify_soft(lone, "two red circles")[1]["count[circle]"]
    c_speck = verify_soft(speck, "two red circles")[1]["count[circle]"]
    assert c_speck > c_lone + 0.1  # ≈ 0.66 vs ≈ 0.46: e ≈ σ((5.5 − 6)/1.5) ≈ 0.42


def test_soft_relation_is_centred_on_geneval_margin():
    """The soft relation is e_a p_a · e_b p_b · σ((margin − 0.5)/τ): at margin 0.5 (GenEval's hard threshold) it is
    half the pair weight; with vanishing τ it is the hard rule on either side of 0.5."""
    from flowalign.shapes.verify import _relation_margin, soft_score, soft_weights

    def obj(x0, color):  # an 8 × 8 box at height 10; area far above MIN_AREA; a confident circle
        return {"color": color, "shape": "circle", "area": 50.0, "skew": 0.0, "kurt_diff": 0.0,
                "bbox": (x0, 10, x0 + 8, 18), "centroid": (x0 + 4, 14.0)}

    spec = parse("a red circle to the left of a blue circle")
    ref = obj(16.0, "blue")
    # box centres |dx| apart horizontally; GenEval shrinks by 0.1·(8 + 8): margin = (|dx| − 1.6) / |dx|
    for dx, want in ((3.4, 1.0), (3.0, 0.0)):  # margins ≈ 0.53 and ≈ 0.47
        subj = obj(16.0 - dx, "red")
        assert _relation_margin(subj, ref, "left of") == pytest.approx((dx - 1.6) / dx, abs=1e-9)
        assert soft_score([subj, ref], spec, temps=SHARP)["relation"] == pytest.approx(want, abs=1e-9)
    subj = obj(12.8, "red")  # |dx| = 3.2: margin exactly 0.5
    assert _relation_margin(subj, ref, "left of") == pytest.approx(0.5, abs=1e-9)
    e, p = soft_weights(subj)
    w = e * p["circle"]  # the pair weight of either object
    assert soft_score([subj, ref], spec)["relation"] == pytest.approx(0.5 * w * w, rel=1e-6)


@pytest.mark.parametrize("prompt", [
    "a red circle to the left and a blue square",  # 'to the left' without 'of'
    "a red circle and a blue square and a green circle",  # a third phrase
    "two red circles and a blue square",  # a counted phrase must stand alone
    "a red circle above a blue square above",
])
def test_more_known_words_in_bad_structures_raise(prompt):
    with pytest.raises(UserError) as e:
        parse(prompt)
    assert "outside the shapes grammar" in str(e.value) and "\n" not in str(e.value)


def test_generate_prompts_excludes_in_every_task():
    """``exclude`` removes prompts from every task's pool (the bench/train disjointness relies on it)."""
    keep = {t: [to_prompt(s) for s in enumerate_specs(t)][:3] for t in TASKS}  # three prompts left per task
    excl = {to_prompt(s) for t in TASKS for s in enumerate_specs(t)} - {p for ps in keep.values() for p in ps}
    got = generate_prompts(3, seed=8, exclude=excl)
    for task in TASKS:
        assert sorted(r["prompt"] for r in got if r["task"] == task) == sorted(keep[task]), task


def test_rendered_shape_areas_follow_the_geometry():
    """Renderer geometry (render.py docstring): a circle of diameter s (πs²/4), a square of side 0.85·s (area close to
    the circle's), an upright triangle with base and height s (s²/2) — coverage sums, at 32×32 and 64×64."""
    for size in (32, 64):
        k2 = (size / 32) ** 2
        for s, (x, y) in ((8.0, (16.0, 16.0)), (7.3, (11.4, 18.6)), (9.0, (20.2, 13.7))):
            area = {}
            for shape in SHAPES:
                img = draw([_obj("red", shape, x, y, size=s)], size)  # [size, size, 3]
                cov = (0.8 - img[..., 1]) / (0.8 - COLORS["red"][1])  # [size, size] coverage from the green channel
                area[shape] = float(cov.sum()) / k2
            assert area["circle"] == pytest.approx(np.pi * s * s / 4, rel=0.02)
            assert area["square"] == pytest.approx((0.85 * s) ** 2, rel=0.08)
            assert area["square"] == pytest.approx(area["circle"], rel=0.12)
            assert area["triangle"] == pytest.approx(s * s / 2, rel=0.04)


@pytest.mark.parametrize("shape", SHAPES)
def test_draw_is_mirror_equivariant(shape):
    """Anti-aliasing samples the k×k sub-pixel centres and touches every pixel the shape reaches: an object drawn at
    x is the left-right mirror of the one drawn at 32 − x (circles and squares also top-bottom)."""
    for x, y in ((16.0, 16.0), (13.3, 17.6), (9.45, 20.15)):
        for size in (32, 64):
            a = draw([_obj("green", shape, x, y, size=8.3)], size)  # [size, size, 3]
            np.testing.assert_allclose(draw([_obj("green", shape, 32 - x, y, size=8.3)], size), a[:, ::-1], atol=1e-6)
            if shape != "triangle":
                np.testing.assert_allclose(draw([_obj("green", shape, x, 32 - y, size=8.3)], size), a[::-1], atol=1e-6)


def test_layout_sizes_are_jittered_within_the_size_range():
    """Object sizes are drawn per object from SIZE_RANGE (7–9 base px): within it, and spread over it."""
    from flowalign.shapes.render import SIZE_RANGE

    rng = np.random.default_rng(3)
    sizes = [p["size"] for _ in range(100) for p in layout(parse("a red circle and a blue square"), rng)]
    assert SIZE_RANGE[0] <= min(sizes) and max(sizes) <= SIZE_RANGE[1]
    assert min(sizes) < SIZE_RANGE[0] + 0.3 and max(sizes) > SIZE_RANGE[1] - 0.3 and np.std(sizes) > 0.4


def test_render_batch_seeds_each_image_with_the_pair_seed_index():
    """render_batch: image i uses ``default_rng((seed, i))``, so batches of neighbouring seeds share no image (a
    ``seed + i`` derivation would make image 1 of seed 0 equal image 0 of seed 1)."""
    spec = parse("two yellow triangles")
    b0, b1 = render_batch([spec] * 3, 32, seed=0), render_batch([spec] * 3, 32, seed=1)  # [3, 32, 32, 3] each
    for i in range(3):
        assert np.array_equal(b0[i], render(spec, 32, np.random.default_rng((0, i))))
    assert not any(np.array_equal(b0[i], b1[j]) for i in range(3) for j in range(3))
