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


def test_steer_command_writes_results_summary_grid_and_report(tmp_path, monkeypatch):
    import flowalign.sample as S

    captions = []
    real = S.save_grid
    monkeypatch.setattr(S, "save_grid", lambda *a, **k: captions.append(k["labels"]) or real(*a, **k))
    out = tmp_path / "fk"
    code = main(["steer", "two red circles", "a green triangle", "--method", "fk", "-k", "2", "--steps", "4",
                 "--seeds", "2", "--out", str(out)])
    assert code == 0
    # captioned as eval's grid: each prompt with its outputs' first evaluation reward (the grid had prompts only)
    recs = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    first = json.loads((out / "summary.json").read_text())["settings"]["rewards"][0]
    want = [f"{p}  [{first}: " + " ".join(format(r[first], ".3g") for r in recs if r["prompt_index"] == i) + "]"
            for i, p in enumerate(["two red circles", "a green triangle"])]
    assert captions == [[want[0], "", want[1], ""]]
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


def test_steer_refuses_an_out_it_cannot_write_before_any_work(tmp_path, capsys, no_model):
    """`--out /sys/st` (root may not create files there, though os.access says it may) or under a directory that
    cannot be made: a traceback after the steering ran; with --plot, after the plot was drawn."""
    for out in ("/sys/st", "/proc/sub/st"):
        fails(capsys, ["steer", "a red circle", "--out", out], f"--out {out!r}", "cannot be written")
        fails(capsys, ["steer", "--plot", str(tmp_path), "--out", f"{out}.png"], f"--out {out + '.png'!r}",
              "cannot be written")


def test_steer_resume_refuses_an_out_that_is_no_longer_writable(tmp_path, capsys, no_model, monkeypatch):
    """--resume skipped the writability check: the first finished batch failed to append to the journal."""
    import tempfile

    from flowalign.evaluate import PARTIAL

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / PARTIAL).write_text("")

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    fails(capsys, ["steer", "a red circle", "--out", str(tmp_path / "o"), "--resume"], str(tmp_path / "o"),
          "cannot be written")


def test_steer_refuses_a_non_empty_out_and_an_out_of_grammar_prompt(tmp_path, capsys, no_model):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    fails(capsys, ["steer", "a red circle", "--out", str(tmp_path / "o")], "not empty")
    assert (tmp_path / "o" / "keep.txt").read_text() == "x"
    # no prompts: the family's benchmark (as eval); sd3 has none, so that is one line before the model loads
    fails(capsys, ["steer", "--model", "sd3", "--reward", "pickscore", "--out", str(tmp_path / "p")],
          "no prompts given, and --model sd3 has no built-in prompt set")


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


def test_plot_mode_defaults_to_the_runs_first_evaluation_reward(tmp_path, capsys, caplog):
    """`steer --plot` of video-model runs was refused without --plot-reward: the default was shapes_strict, which they
    do not score. It is now the first reward the runs were evaluated with; an explicit --plot-reward still wins."""
    a, b = tmp_path / "none", tmp_path / "bon"
    for out, extra in ((a, ["--method", "none"]), (b, ["--method", "best_of_n", "-k", "2"])):
        assert main(["steer", "a red circle moving up", "--model", "shapes_video", "--steps", "2", *extra,
                     "--out", str(out)]) == 0
    with caplog.at_level("INFO", logger="flowalign.steer"):
        assert main(["steer", "--plot", str(a), str(b), "--out", str(tmp_path / "p.png")]) == 0
    assert (f"plotting shapes_motion_strict, the first reward of {str(a)}'s evaluation (pass --plot-reward to pick "
            f"another: shapes_motion_partial)") in caplog.text
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    caplog.clear()
    with caplog.at_level("INFO", logger="flowalign.steer"):
        assert main(["steer", "--plot", str(a), str(b), "--plot-reward", "shapes_motion_partial",
                     "--out", str(tmp_path / "q.png")]) == 0
    assert "shapes_motion_partial=" in caplog.text and "plotting" not in caplog.text
    capsys.readouterr()
    fails(capsys, ["steer", "--plot", str(a), "--plot-reward", "shapes_strict", "--out", str(tmp_path / "r.png")],
          "has no 'shapes_strict'", "pass --plot-reward")
    assert not (tmp_path / "r.png").exists()


def test_plot_mode_refuses_runs_steered_on_other_prompts_or_seeds(tmp_path, capsys):
    """`steer --plot` of a run on other prompts drew it into the same method's line (a vertical segment at one
    cost) with no warning; runs on other prompts or seeds are now refused in one line, and nothing is drawn."""
    import json

    from flowalign.errors import UserError
    from flowalign.steer import check_same_images

    a, b = tmp_path / "a", tmp_path / "b"
    for out, prompt in ((a, "a red circle"), (b, "a blue square")):
        assert main(["steer", prompt, "--steps", "2", "--method", "none", "--out", str(out)]) == 0
    capsys.readouterr()
    fails(capsys, ["steer", "--plot", str(a), str(b), "--out", str(tmp_path / "p.png")],
          f"--plot {str(b)!r} steered other images than {str(a)!r} (prompts_sha256")
    assert not (tmp_path / "p.png").exists()
    same = json.loads((a / "summary.json").read_text())
    check_same_images({"a": same, "a2": same})
    for key, value in (("seed", 1), ("seeds_per_prompt", 2), ("prompts", 3)):
        other = {**same, "settings": {**same["settings"], key: value}}
        with pytest.raises(UserError, match=f"{key} "):
            check_same_images({"a": same, "x": other})


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


def test_steer_resume_refuses_an_edited_prompt_file(tmp_path, capsys, monkeypatch):
    """The journal records the prompts' digest: the same path with other text is not the interrupted run's work."""
    import flowalign.io as IO

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "st"
    args = ["steer", "--prompt-file", str(prompts), "--method", "best_of_n", "-k", "1", "--batch-size", "1",
            "--steps", "2", "--out", str(out)]
    real = IO.append_jsonl_records

    def interrupt(path, records):
        real(path, records)
        raise KeyboardInterrupt

    monkeypatch.setattr(IO, "append_jsonl_records", interrupt)
    assert main(args) == 130
    monkeypatch.setattr(IO, "append_jsonl_records", real)
    capsys.readouterr()
    prompts.write_text("a red circle\na green square\n")
    fails(capsys, [*args, "--resume"], "prompts differ")


# ------------------------------------------------------------- flags a method does not use; batch size; labels; help


class _Stop(Exception):
    """Raised by a stand-in ``steer_prompts`` once it has recorded what the command passed it."""


def _steer_kwargs(monkeypatch, tmp_path, argv):
    """The keyword arguments ``flowalign steer argv`` gives ``steer_prompts`` (the model loads; nothing is sampled)."""
    seen = {}

    def record(model, rows, steer, evals, **kw):
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(S, "steer_prompts", record)
    out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
    with pytest.raises(_Stop):
        main(["steer", "a red circle", "--steps", "2", *argv, "--out", str(out)])
    return seen


@pytest.mark.parametrize("extra, needles", [
    (["--lam", "3"], ["--lam", "only with --method fk", "best_of_n"]),  # the default method, best_of_n
    (["--potential", "diff"], ["--potential", "only with --method fk"]),
    (["--resampler", "multinomial"], ["--resampler", "only with --method fk"]),
    (["--probe", "ode:2"], ["--probe", "only with --method fk"]),
    (["--ess", "0.9"], ["--ess", "only with --method fk"]),
    (["--every", "2", "--start", "3", "--end", "8"], ["--every, --start, --end: only with --method fk"]),
    (["--proposal", "kernel"], ["--proposal", "only with --method fk"]),
    (["--method", "none", "--lam", "3"], ["--lam", "only with --method fk", "none"]),
    (["--method", "guided", "--reward", "saturation", "--potential", "diff"], ["--potential", "guided"]),
    (["--method", "none", "-k", "4"], ["--particles/-k", "best_of_n or fk", "none"]),
    (["--method", "guided", "--reward", "saturation", "--particles", "2"], ["--particles/-k", "guided"]),
])
def test_flags_the_method_does_not_use_are_refused_not_ignored(tmp_path, capsys, no_model, extra, needles):
    """FK's flags under best-of-N (the default method) and -k under none/guided were silently ignored."""
    fails(capsys, ["steer", "a red circle", *extra, "--out", str(tmp_path / "o")], *needles)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, needles", [
    (["--method", "fk", "-k", "8", "--batch-size", "2"], ["--batch-size 2", "-k 8", "--batch-size 8"]),
    (["-k", "8", "--batch-size", "7"], ["--batch-size 7", "-k 8"]),  # best_of_n
    (["--method", "fk", "--start", "6", "--end", "3"], ["--end 3", "--start 6"]),
    (["--method", "fk", "--steps", "12", "--end", "1"], ["resampling", "1", "before the first, 2"]),
    (["--reward", "saturation:1,saturation:-1", "--eval-rewards", "saturation"], ["'saturation' twice"]),
])
def test_batch_size_below_k_end_before_start_and_a_repeated_reward_are_refused(tmp_path, capsys, no_model, extra,
                                                                              needles):
    fails(capsys, ["steer", "a red circle", *extra, "--out", str(tmp_path / "o")], *needles)
    assert list(tmp_path.iterdir()) == []


def test_steer_prompts_refuses_a_batch_size_below_k(model):
    """A group of k particles ran as one batch whatever batch_size said (8 rows for batch_size=2)."""
    steer_r, eval_r = _rewards()
    with pytest.raises(ValueError, match="batch_size=2 is below k=8"):
        steer_prompts(model, PROMPTS, steer_r, eval_r, method="fk", steps=2, k=8, lam=1.0, kernel="flow_sde",
                      eta=0.7, batch_size=2)
    recs, _, _ = steer_prompts(model, PROMPTS[:1], steer_r, eval_r, method="none", steps=2, k=8, batch_size=2)
    assert len(recs) == 1  # one row per output: -k does not bound the batch


def test_defaults_reach_steer_prompts_resolved(monkeypatch, tmp_path):
    """The FK flags default to None only to detect them: fk gets the documented values, the default batch holds a
    whole group, and any kernel but euler defaults to eta 0.7."""
    kw = _steer_kwargs(monkeypatch, tmp_path, ["--method", "fk"])
    assert (kw["lam"], kw["potential"], kw["resampler"], kw["probe"], kw["ess_threshold"], kw["proposal"], kw["k"],
            kw["batch_size"], kw["kernel"], kw["eta"]) == (10.0, "max", "systematic", "x0", 0.5, "kernel", 4, 32,
                                                           "flow_sde", 0.7)
    kw = _steer_kwargs(monkeypatch, tmp_path, ["-k", "40"])
    assert (kw["method"], kw["k"], kw["batch_size"]) == ("best_of_n", 40, 40)
    kw = _steer_kwargs(monkeypatch, tmp_path, ["--method", "none", "--kernel", "dance_sde"])
    assert (kw["batch_size"], kw["eta"]) == (32, 0.7)


def _documented_steer_commands():
    """Every `flowalign steer ...` command line of README.md, docs/steering.md and docs/results.md (continuations
    joined, comments dropped), with each `[a | b]` alternative expanded: one command without it and one per option."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmds = []
    for doc in ("README.md", "docs/steering.md", "docs/results.md"):
        text = (root / doc).read_text(encoding="utf-8").replace("\\\n", " ")
        for m in re.finditer(r"flowalign steer ([^`\n]*)", text):
            line = re.sub(r"\s#.*", "", m.group(1)).strip()
            if "--plot" in line or len(line.split()) < 2:  # the plot command; `--method` in a table's header
                continue
            variants = [line]
            while any("[" in v for v in variants):
                nxt = []
                for v in variants:
                    g = re.search(r"\[([^\[\]]*)\]", v)
                    if g is None:
                        nxt.append(v)
                        continue
                    for alt in ["", *(a.strip() for a in g.group(1).split("|"))]:
                        nxt.append(v[:g.start()] + alt + v[g.end():])
                variants = nxt
            cmds += [(doc, v) for v in variants]
    return cmds


def test_every_documented_steer_command_is_accepted(tmp_path, monkeypatch, no_model):
    """The documented commands must pass every argument check (they reach the model load, which `no_model` stops)."""
    import shlex

    cmds = _documented_steer_commands()
    assert len(cmds) >= 10 and any("--method fk" in c and "--lam" in c for _, c in cmds)
    monkeypatch.chdir(tmp_path)
    ref = tmp_path / "runs" / "steer_sat_none"  # the reference run `--reward-std runs/steer_sat_none` reads
    ref.mkdir(parents=True)
    (ref / "results.jsonl").write_text('{"saturation": 0.1}\n{"saturation": 0.2}\n')
    for n, (doc, line) in enumerate(cmds):
        argv = shlex.split(line)
        if "--prompt-file" not in argv and argv[0].startswith("-"):  # an inline fragment: the method's flags only
            argv = ["a red circle", *argv]
        if "--out" in argv:
            argv[argv.index("--out") + 1] = f"out{n}"
        else:
            argv += ["--out", f"out{n}"]
        with pytest.raises(AssertionError, match="model was loaded"):
            main(["steer", *argv])
            pytest.fail(f"{doc}: `flowalign steer {line}` was refused")


def _drawn_labels(R, monkeypatch) -> list:
    """The labels of the lines ``R.plot_steering`` draws, as it draws them (its axes' ``plot`` wrapped)."""
    drawn = []
    real = R._new_axes

    def spy(*a, **k):
        fig, ax = real(*a, **k)
        plot = ax.plot
        ax.plot = lambda xs, ys, **kw: (drawn.append(kw["label"]), plot(xs, ys, **kw))[1]
        return fig, ax

    monkeypatch.setattr(R, "_new_axes", spy)
    return drawn


def test_plot_labels_separate_fk_das_tempered_das_and_lambda_per_std(tmp_path, monkeypatch):
    """FK, DAS and tempered DAS at equal cost were one line (the label named neither proposal nor temper), and so
    were λ = 30 raw and λ = 30 per reward std."""
    import flowalign.report as R

    base = {"method": "fk", "kernel": "flow_sde", "eta": 0.7, "potential": "diff", "lam": 30.0, "probe": "x0",
            "output": "best", "resample_steps": list(range(2, 12))}
    settings = {
        "fk": {**base, "proposal": "kernel", "temper": None},
        "das": {**base, "proposal": "guided", "temper": None},
        "das_t": {**base, "proposal": "guided", "temper": 0.09},
        "fk_std": {**base, "proposal": "kernel", "temper": None, "reward_std": 0.068},
        "das_dps": {**base, "proposal": "guided", "temper": None, "guide_mode": "dps", "band": [0.05, 0.8]},
        "fk_every2": {**base, "resample_steps": [2, 4, 6, 8, 11]},
    }
    labels = {n: R.steer_line_label(st) for n, st in settings.items()}
    assert len(set(labels.values())) == len(labels), labels
    assert "proposal=guided" in labels["das"] and "temper=0.09" in labels["das_t"]
    assert "per std 0.068" in labels["fk_std"] and "dps" in labels["das_dps"]
    # the defaults add nothing: the shapes-bench rows of docs/steering.md keep their labels
    assert R.steer_line_label({"method": "fk", "kernel": "flow_sde", "eta": 0.7, "potential": "max", "lam": 10.0,
                               "probe": "x0", "output": "best", "proposal": "kernel", "temper": None, "ess": 0.5,
                               "resampler": "systematic", "resample_steps": list(range(2, 12))}) \
        == "fk from step 2, flow_sde 0.7"
    assert R.steer_line_label({"method": "guided", "kernel": "euler", "eta": 0.0, "beta": 1e-3, "guide_mode": "x0",
                               "band": [0.05, 0.8], "normalize": None, "clip": None}) == "guided beta=0.001, euler"
    drawn = _drawn_labels(R, monkeypatch)
    sums = {n: {"overall": {"saturation": 0.1}, "cost": {"forwards_per_image": 48, "particles": 4}, "settings": st}
            for n, st in settings.items()}
    R.plot_steering(sums, tmp_path / "p.png", "saturation")
    assert len(drawn) == len(settings)


def test_help_texts_say_what_the_code_does():
    """--eta's default is 0.7 for every kernel but euler (not only fk); output s starts from image_seed(seed, i, s*k)
    (not seed + s); λ is per raw reward unit unless --reward-std; σ = 1 is never guided; --batch-size bounds rows."""
    helps = {a.dest: a.help for a in S.build_parser()._actions}
    assert "every kernel but euler" in helps["eta"] and "0.7 for fk" not in helps["eta"]
    assert "image_seed(seed, i, s*k)" in helps["seeds"] and "seed+n-1" not in helps["seeds"]
    assert "image_seed(seed, i, s*k)" in helps["seed"]
    assert "per raw reward unit" in helps["lam"] and "--reward-std" in helps["lam"]
    assert "sigma = 1" in helps["band"] and "never guided" in helps["band"]
    assert ">= k" in helps["batch_size"]
    assert "an existing file is replaced" in helps["out"]  # --plot's .png: a re-render
    for dest in ("lam", "potential", "resampler", "probe", "ess", "every", "start", "end", "proposal", "particles",
                 "batch_size"):
        assert S.build_parser().get_default(dest) is None, dest  # None = not given: refusable under other methods


# -------------------------------------------------------------------- seeds, chosen particle, DAS wiring


@pytest.mark.parametrize("method", ["best_of_n", "fk"])
def test_particle_seed_regenerates_the_chosen_output(model, method):
    """Output s of prompt i has particles seeded image_seed(seed, i, s·k + j) (``seed`` the first one's), and
    ``particle_seed`` is the initial noise of the chosen particle's ancestor: under an ODE kernel (FK's resampled
    copies stay identical to their ancestor) ``flowalign sample`` with that seed redraws the image and its steering
    reward. With 2 outputs per prompt, output 1's particles are 3 … 5, not 1 … 3."""
    from flowalign.sample import generate

    steer_r, eval_r = _rewards()
    k, seed = 3, 4
    recs, grid, _ = steer_prompts(model, PROMPTS, steer_r, eval_r, method=method, steps=4, k=k, lam=30.0,
                                  kernel="euler", eta=0.0, seeds_per_prompt=2, seed=seed, grid_prompts=2,
                                  schedule=[1, 2, 3] if method == "fk" else None)
    for rec in recs:
        i, s = rec["prompt_index"], rec["sample"]
        group = [image_seed(seed, i, s * k + j) for j in range(k)]
        assert rec["seed"] == group[0] and rec["particle_seed"] in group
        if method == "best_of_n":
            assert rec["particle_seed"] == group[rec["particle"]]
    ref = generate(model, [r["prompt"] for r in recs], [r["particle_seed"] for r in recs], steps=4)  # [4, 3, H, W]
    assert torch.allclose(grid, ref, atol=1e-5)
    r = steer_r["shapes_partial"][0](ref, [rec["prompt"] for rec in recs])
    assert [rec["steer_reward"] for rec in recs] == pytest.approx(r.tolist(), abs=1e-6)


def test_method_none_with_an_sde_gives_flowalign_eval_images(model):
    """One output per (prompt, seed) with k = 1 is ``flowalign eval``'s image under a stochastic kernel too: its step
    noise comes from step_noise_seed(image_seed(seed, i, s)), as ``generate`` draws it."""
    from flowalign.sample import generate

    steer_r, eval_r = _rewards()
    _, grid, _ = steer_prompts(model, PROMPTS, steer_r, eval_r, method="none", steps=4, kernel="flow_sde", eta=0.7,
                               seeds_per_prompt=2, seed=3, grid_prompts=2)
    seeds = [image_seed(3, i, s) for i in range(2) for s in range(2)]
    ref = generate(model, [p["prompt"] for p in PROMPTS for _ in range(2)], seeds, steps=4, kernel="flow_sde",
                   eta=0.7)  # [4, 3, H, W]
    assert torch.allclose(grid, ref, atol=1e-5)


def test_fk_output_is_the_best_or_the_drawn_particle_and_das_tilts_toward_exp_lam_r(model, monkeypatch):
    """``output="best"`` returns each group's argmax particle, ``"drawn"`` the one ``fk_steer`` drew from the final
    weights; a guided proposal (DAS) is ``TiltGuidance`` toward the same tilt exp(λ·r), i.e. β = 1/λ (METHODS.md §6.4),
    on the run's kernel and η, and fk_steer gets it with the run's γ."""
    steer = {"saturation": (build_reward("saturation"), 1.0)}
    seen, guides = [], []
    real_fk, real_tg = S.fk_steer, S.TiltGuidance

    def fk_spy(*a, **kw):
        res = real_fk(*a, **kw)
        seen.append((res, kw))
        return res

    def tg_spy(**kw):
        guides.append(kw)
        return real_tg(**kw)

    monkeypatch.setattr(S, "fk_steer", fk_spy)
    monkeypatch.setattr(S, "TiltGuidance", tg_spy)
    kw = dict(method="fk", steps=3, k=4, lam=0.5, kernel="flow_sde", eta=0.7, seeds_per_prompt=2, seed=0)
    for output in ("best", "drawn"):
        recs, _, _ = steer_prompts(model, PROMPTS, steer, {}, output=output, **kw)
        res = seen[-1][0]
        pick = res.best if output == "best" else res.drawn  # [P]
        assert [r["particle"] for r in recs] == (pick - torch.arange(len(recs)) * 4).tolist()
        assert [r["steer_reward"] for r in recs] == pytest.approx(res.reward[pick].tolist())
    assert not torch.equal(seen[0][0].best, seen[1][0].drawn)  # the two outputs differ somewhere
    assert not guides
    steer_prompts(model, PROMPTS[:1], steer, {}, proposal="guided", temper=0.3, **{**kw, "seeds_per_prompt": 1})
    (g,) = guides
    assert g["beta"] == pytest.approx(1 / 0.5) and g["kernel"] == "flow_sde"
    assert float(g["eta"][0]) == pytest.approx(0.7)
    res, fkw = seen[-1]
    assert isinstance(fkw["proposal"], real_tg) and fkw["temper"] == 0.3 and fkw["lam"] == 0.5


def test_guided_reward_sees_each_chains_own_prompt(model):
    """Guided steering runs one chain per output and scores each with its own prompt (``_row_hook``): two outputs of
    two prompts, guided at the same steps, give every prompt as many guidance rows."""
    seen = []

    def reward(images, prompts, meta):
        seen.extend(prompts)
        return images.flatten(1).mean(1)

    reward.differentiable = True
    steer_prompts(model, PROMPTS, {"m": (reward, 1.0)}, {}, method="guided", steps=6, beta=0.05)
    guided = [p for p in seen[:-2]]  # the last call scores the two final images together
    assert guided.count(PROMPTS[0]["prompt"]) == guided.count(PROMPTS[1]["prompt"]) > 0


def test_the_steering_reward_is_the_weighted_sum_of_its_rewards(model):
    """``steer_rewards`` maps names to (reward, weight) and the steering reward is Σ w·R(decode(x)): with shapes_partial
    at weight −2 every output's ``steer_reward`` is −2 × its evaluation score, and best-of-N keeps its lowest-scoring
    particle."""
    from flowalign.sample import generate

    partial = build_reward("shapes_partial")
    k, seed = 3, 1
    recs, _, _ = steer_prompts(model, PROMPTS, {"shapes_partial": (partial, -2.0)}, {"shapes_partial": partial},
                               method="best_of_n", steps=3, k=k, seed=seed)
    for rec in recs:
        assert rec["steer_reward"] == pytest.approx(-2.0 * rec["shapes_partial"], abs=1e-6)
        i = rec["prompt_index"]
        imgs = generate(model, [rec["prompt"]] * k, [image_seed(seed, i, j) for j in range(k)], steps=3)
        assert rec["shapes_partial"] == pytest.approx(float(partial(imgs, [rec["prompt"]] * k).min()), abs=1e-6)


def test_grid_batches_hold_every_seed_of_the_grid_prompts():
    """The grid shows all ``seeds_per_prompt`` outputs of the first ``grid_prompts`` prompts, so a resumed run redoes
    every batch holding one of them (prompt-major outputs, ``per_batch`` per batch); ``outputs_per_batch`` counts
    k-particle groups for best-of-N and FK, single rows otherwise."""
    assert S.grid_batches(10, 2, 8, 4) == {0, 1, 2, 3}  # outputs 0 … 15
    assert S.grid_batches(3, 2, 8, 4) == {0, 1}  # only 3 prompts: outputs 0 … 5
    assert S.grid_batches(10, 3, 0, 4) == set()
    assert (S.outputs_per_batch("fk", 4, 32), S.outputs_per_batch("best_of_n", 5, 32),
            S.outputs_per_batch("guided", 4, 32), S.outputs_per_batch("fk", 40, 32)) == (8, 6, 32, 1)


def test_plot_labels_a_line_of_unsteered_runs_as_no_steering(tmp_path, monkeypatch):
    """`--method none` runs were drawn as "best-of-N, euler": alone they are now "no steering (1 sample)", and on the
    best-of-N line of their kernel (best-of-1) the line says so."""
    import flowalign.report as R

    drawn = _drawn_labels(R, monkeypatch)

    def run(method, kernel, k):
        return {"overall": {"s": 0.1 * k}, "cost": {"forwards_per_image": 12 * k, "particles": k},
                "settings": {"method": method, "kernel": kernel, "eta": 0.0 if kernel == "euler" else 0.7}}

    R.plot_steering({"none": run("none", "euler", 1), "bon_sde": run("best_of_n", "flow_sde", 4),
                     "none_sde": run("none", "flow_sde", 1)}, tmp_path / "p.png", "s")
    assert sorted(drawn) == ["best-of-N (k=1: no steering), flow_sde 0.7", "no steering (1 sample), euler"]
