"""``flowalign steer`` on the shipped shapes model: outputs, cost, equality with plain sampling, batch independence,
and the bad-input rule (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_checks import fails, no_model  # noqa: F401  (the fixture is used by name)

from flowalign import steer as S
from flowalign.cli import main
from flowalign.evaluate import image_seed
from flowalign.models import load_model
from flowalign.rewards import build_reward
from flowalign.steer import steer_prompts

PROMPTS = [{"prompt": "two red circles", "task": "counting"}, {"prompt": "a blue square", "task": "single_object"}]


@pytest.fixture(scope="module")
def model():
    return load_model("shapes", "")


def _rewards():
    return {"shapes_partial": (build_reward("shapes_partial"), 1.0)}, {"shapes_strict": build_reward("shapes_strict")}


def test_method_none_gives_flowalign_eval_images(model):
    from flowalign.sample import generate

    steer_r, eval_r = _rewards()
    recs, grid, cost = steer_prompts(model, PROMPTS, steer_r, eval_r, method="none", steps=4, seeds_per_prompt=2,
                                     seed=3, grid_prompts=2)
    seeds = [image_seed(3, i, s) for i in range(2) for s in range(2)]
    ref = generate(model, [p["prompt"] for p in PROMPTS for _ in range(2)], seeds, steps=4)
    assert torch.allclose(grid, ref, atol=1e-6)
    assert [r["seed"] for r in recs] == seeds
    assert cost["forwards_per_image"] == 4 and cost["particles"] == 1


@pytest.mark.parametrize("method", ["best_of_n", "fk"])
def test_outputs_do_not_depend_on_the_batch_size(model, method):
    steer_r, eval_r = _rewards()
    kw = dict(method=method, steps=5, k=3, lam=10.0, kernel="flow_sde" if method == "fk" else "euler",
              eta=0.7 if method == "fk" else 0.0, seeds_per_prompt=2, seed=1, grid_prompts=2)
    a, ga, ca = steer_prompts(model, PROMPTS, steer_r, eval_r, batch_size=3, **kw)  # one output per batch
    b, gb, cb = steer_prompts(model, PROMPTS, steer_r, eval_r, batch_size=64, **kw)
    assert a == b  # the same seeds, particles, choices and scores
    # the images to float rounding: on some CPUs the matmul kernels differ with the batch size in the last bits
    assert torch.allclose(ga, gb, rtol=0, atol=1e-5)
    assert ca["forwards_per_image"] == 3 * 5


def test_best_of_n_picks_the_best_of_its_particles(model):
    """The output of best-of-4 has the highest steering reward of the 4 plain samples it was drawn from."""
    from flowalign.sample import generate

    steer_r, eval_r = _rewards()
    recs, _, _ = steer_prompts(model, PROMPTS, steer_r, eval_r, method="best_of_n", steps=4, k=4, seed=2)
    for i, rec in enumerate(recs):
        seeds = [image_seed(2, i, j) for j in range(4)]
        imgs = generate(model, [PROMPTS[i]["prompt"]] * 4, seeds, steps=4)
        r = steer_r["shapes_partial"][0](imgs, [PROMPTS[i]["prompt"]] * 4)
        assert rec["steer_reward"] == pytest.approx(float(r.max()), abs=1e-6)
        assert r[rec["particle"]] == r.max()
        assert rec["particle_seed"] == seeds[rec["particle"]]  # regenerates the chosen image alone


def test_steer_command_writes_results_summary_grid_and_report(tmp_path):
    out = tmp_path / "fk"
    code = main(["steer", "two red circles", "a green triangle", "--method", "fk", "-k", "2", "--steps", "4",
                 "--seeds", "2", "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["grids", "report.html", "results.jsonl", "summary.json"]
    assert (out / "grids" / "steered.png").is_file()
    page = (out / "report.html").read_text()
    assert "forwards per image: 8<" in page or "forwards per image: 8," in page
    assert "steered" in page
    summ = json.loads((out / "summary.json").read_text())
    assert summ["settings"]["method"] == "fk" and summ["settings"]["resample_steps"] == [1, 2, 3]
    assert summ["cost"]["forwards_per_image"] == 2 * 4
    assert summ["cost"]["steer_reward_rows_per_image"] == 2 * (3 + 1)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {"shapes_strict", "shapes_partial", "steer_reward", "particle"} <= set(json.loads(lines[0]))


def test_guided_steering_with_a_differentiable_reward_raises_it(tmp_path, model):
    steer = {"saturation": (build_reward("saturation"), 1.0)}
    kw = dict(steps=6, seeds_per_prompt=2, seed=0)
    plain, _, _ = steer_prompts(model, PROMPTS, steer, {}, method="none", **kw)
    guided, _, cost = steer_prompts(model, PROMPTS, steer, {}, method="guided", beta=0.02, **kw)
    gain = [g["steer_reward"] - p["steer_reward"] for g, p in zip(guided, plain)]
    assert all(d > 0 for d in gain), gain
    assert cost["forwards_per_image"] == 6  # x0 mode reuses the step's velocity: no extra forwards


@pytest.mark.parametrize("extra, needles", [
    (["--method", "smc"], ["--method 'smc'", "fk"]),
    (["--particles", "0"], ["--particles", "0"]),
    (["--potential", "mx"], ["--potential 'mx'", "diff"]),
    (["--resampler", "stratified"], ["--resampler", "systematic"]),
    (["--probe", "ode2:1"], ["--probe", "ode:M"]),
    (["--lam", "-1"], ["--lam"]),
    (["--ess", "0"], ["--ess"]),
    (["--method", "guided", "--band", "0.9,0.1"], ["--band", "MIN,MAX"]),
    (["--kernel", "euler", "--eta", "0.5"], ["--eta > 0"]),
    (["--reward", "shapes_parital"], ["shapes_parital", "did you mean 'shapes_partial'"]),
    (["--reward", "shapes_partial:x"], ["weight"]),
    (["--method", "guided"], ["differentiable", "shapes_partial"]),
    (["--method", "fk", "--steps", "12", "--start", "99"], ["resampling", "--start"]),
    (["--reward-arg", "shapes_partial.nope=1"], ["--reward-arg", "'shapes_partial'", "nope"]),
    (["--reward-arg", "pickscore.path=/x"], ["NAME one of"]),
    (["--model-arg", "nope=1"], ["--model-arg", "nope"]),
])
def test_steer_refuses_bad_input_before_loading_the_model(tmp_path, capsys, no_model, extra, needles):
    out = tmp_path / "o"
    fails(capsys, ["steer", "a red circle", *extra, "--out", str(out)], *needles)
    assert list(tmp_path.iterdir()) == []


def test_steer_refuses_a_non_empty_out_and_an_out_of_grammar_prompt(tmp_path, capsys, no_model):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    fails(capsys, ["steer", "a red circle", "--out", str(tmp_path / "o")], "not empty")
    assert (tmp_path / "o" / "keep.txt").read_text() == "x"
    fails(capsys, ["steer", "--out", str(tmp_path / "p")], "no prompts")


def test_model_and_reward_arguments_reach_the_model_and_the_summary(tmp_path):
    out = tmp_path / "o"
    assert main(["steer", "a red circle", "--method", "none", "--steps", "3", "--model-arg", "guidance_scale=2",
                 "--out", str(out)]) == 0
    summ = json.loads((out / "summary.json").read_text())
    assert summ["settings"]["guidance"] == 2.0 and summ["settings"]["model_args"] == {"guidance_scale": 2}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_steering_runs_on_the_real_adapters(family, request):
    """FK and best-of-N on tiny SD3 / FLUX pipelines built from configs and loaded by the real loaders: the same
    loop, its cost, and a saturation reward that the selection raises over plain sampling's first particle."""
    path = request.getfixturevalue(f"tiny_{family}_dir")
    from tiny_models import TINY_SIZES

    model = load_model(family, str(path), max_sequence_length=16, **TINY_SIZES[family])
    steer = {"saturation": (build_reward("saturation"), 1.0)}
    prompts = [{"prompt": "a cat"}, {"prompt": "a dog"}]
    kw = dict(steps=3, k=3, seeds_per_prompt=1, seed=0, grid_prompts=2)
    plain, _, _ = steer_prompts(model, prompts, steer, {}, method="none", **kw)
    bon, grid, cost = steer_prompts(model, prompts, steer, {}, method="best_of_n", **kw)
    fk, _, fk_cost = steer_prompts(model, prompts, steer, {}, method="fk", lam=5.0, kernel="flow_sde", eta=0.7, **kw)
    assert cost["forwards_per_image"] == fk_cost["forwards_per_image"] == 3 * 3
    assert all(b["steer_reward"] >= p["steer_reward"] - 1e-6 for b, p in zip(bon, plain))  # particle 0 is plain's
    assert grid.shape[0] == 2 and torch.isfinite(grid).all()
    assert all(math.isfinite(r["steer_reward"]) for r in fk)


def test_plot_mode_draws_earlier_outputs_and_refuses_other_directories(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for out, extra in ((a, ["--method", "none"]), (b, ["--method", "best_of_n", "-k", "2"])):
        assert main(["steer", "a red circle", "--steps", "3", *extra, "--out", str(out)]) == 0
    png = tmp_path / "plot.png"
    assert main(["steer", "--plot", str(a), str(b), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    fails(capsys, ["steer", "--plot", str(tmp_path), "--out", str(tmp_path / "p.png")], "no summary.json")
    fails(capsys, ["steer", "--plot", str(a), "--out", str(tmp_path / "p.jpg")], ".png")
    fails(capsys, ["steer", "--plot", str(a), "--plot-reward", "hps", "--out", str(tmp_path / "p.png")], "--plot-reward")
    assert not (tmp_path / "p.png").exists()


def test_guided_reward_sees_each_outputs_own_metadata(model):
    """Two records with the same prompt text and different metadata: the guidance must score each chain with its own
    record (it used to look the row up by prompt text, so both got the first record's)."""
    seen = []

    def reward(images, prompts, meta):
        seen.extend(m["tag"] for m in meta)
        return images.flatten(1).mean(1)

    reward.differentiable = True
    recs = [{"prompt": "a red circle", "tag": "first"}, {"prompt": "a red circle", "tag": "second"}]
    steer_prompts(model, recs, {"m": (reward, 1.0)}, {}, method="guided", steps=6, beta=0.05)
    assert "second" in seen and seen.count("first") == seen.count("second")


def test_guided_cost_counts_the_reward_rows_of_every_guided_step():
    """Guidance scores the steering reward (and backpropagates through it) at every guided step; the reported
    steering-reward rows per image must count them, not only the final score."""
    from flowalign.models import load_model
    from flowalign.rewards import build_reward

    model = load_model("shapes", "")
    steer = {"saturation": (build_reward("saturation"), 1.0)}
    steps = 6
    sig = model.schedule(steps)
    guided = sum(1 for t in range(steps) if 0.05 <= float(sig[t]) <= 0.8 and float(sig[t]) < 1.0)
    assert guided > 0
    _, _, cost = S.steer_prompts(model, [{"prompt": "two red circles"}], steer, {}, method="guided", steps=steps,
                                 beta=0.02, seeds_per_prompt=2)
    assert cost["steer_reward_rows_per_image"] == 1 + guided


@pytest.mark.parametrize("extra, needles", [
    (["--method", "fk", "--probe", "ode:00"], ["--probe 'ode:00'"]),
    (["--method", "guided", "--reward", "saturation", "--normalize", "-0.1"], ["--normalize"]),
    (["--method", "guided", "--reward", "saturation", "--normalize", "nan"], ["--normalize"]),
    (["--method", "guided", "--reward", "saturation", "--clip", "0"], ["--clip"]),
])
def test_steer_refuses_bad_probe_and_gradient_scale_before_loading_the_model(tmp_path, capsys, no_model, extra,
                                                                            needles):
    fails(capsys, ["steer", "a red circle", *extra, "--out", str(tmp_path / "o")], *needles)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_steer_resumes_to_the_uninterrupted_outputs(tmp_path, capsys, caplog, monkeypatch):
    """Ctrl-C after the last batch is journalled: --resume steers only the grid's batches again (the first 8 prompts,
    for their pixels) and writes results, summary (cost included) and grid byte for byte as one uninterrupted run."""
    import logging

    import flowalign.io as IO
    from flowalign.evaluate import PARTIAL

    args = ["steer", "--prompt-file", "shapes-bench", "--max-prompts", "10", "--method", "fk", "-k", "2",
            "--batch-size", "4", "--steps", "3", "--seed", "5"]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0
    out = tmp_path / "st"
    real, calls = IO.append_jsonl_records, []

    def interrupt_after_five(path, records):
        real(path, records)
        calls.append(1)
        if len(calls) == 5:  # 10 outputs, 2 per batch: batch 4 (prompts 8-9) is the last
            raise KeyboardInterrupt

    monkeypatch.setattr(IO, "append_jsonl_records", interrupt_after_five)
    assert main([*args, "--out", str(out)]) == 130
    assert sorted(p.name for p in out.iterdir()) == [PARTIAL]
    capsys.readouterr()
    monkeypatch.setattr(IO, "append_jsonl_records", real)
    fails(capsys, [*args, "--out", str(out)], "interrupted run", "--resume")
    fails(capsys, [*args, "--steps", "4", "--resume", "--out", str(out)], "other settings", "steps 3 -> 4")
    with caplog.at_level(logging.INFO, logger="flowalign.steer"):
        assert main([*args, "--resume", "--out", str(out)]) == 0
    assert "2 of 10 outputs already steered" in caplog.text
    for name in ("results.jsonl", "summary.json", "grids/steered.png"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert not (out / PARTIAL).exists()
