"""Evaluation: the pass@k estimator and its per-task summary, the settings a summary records, image seeds."""

import itertools
import json
import logging
import math

import pytest
import torch

from cli_checks import no_model  # noqa: F401  (the fixture is used by name)
from flowalign.cli import main
from flowalign.evaluate import pass_at_k, summarize, summarize_pass_at_k


@pytest.mark.parametrize("n, c", [(4, 0), (4, 1), (5, 2), (6, 3), (6, 6)])
def test_pass_at_k_equals_the_fraction_of_k_subsets_with_a_pass(n, c):
    """Unbiased: the mean over all C(n, k) subsets of k images of 'some image in the subset passes'."""
    passes = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(passes, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert pass_at_k(n, c, 1) == pytest.approx(c / n) and pass_at_k(n, c, n) == float(c > 0)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def _records():
    # task a: prompt 0 passes 1 of 4, prompt 1 passes 4 of 4; task b: prompt 2 passes 0 of 4
    out = []
    for idx, task, passes in [(0, "a", [1, 0, 0, 0]), (1, "a", [1, 1, 1, 1]), (2, "b", [0, 0, 0, 0])]:
        for k, p in enumerate(passes):
            out.append({"prompt": f"p{idx}", "task": task, "prompt_index": idx, "sample": k, "strict": float(p),
                        "partial": 0.5 + 0.1 * p + 0.01 * k})
    return out


def test_pass_at_k_summary_groups_by_prompt_and_task_and_skips_graded_rewards():
    recs = _records()
    pk = summarize_pass_at_k(recs, ["strict", "partial"])
    assert set(pk) == {"strict"}  # 'partial' is not a pass/fail reward
    s = pk["strict"]
    assert s["k"] == [1, 2, 4]
    assert s["per_task"]["a"][1] == pytest.approx((0.25 + 1.0) / 2)
    assert s["per_task"]["a"][2] == pytest.approx((pass_at_k(4, 1, 2) + 1.0) / 2)
    assert s["per_task"]["a"][4] == pytest.approx(1.0) and s["per_task"]["b"][4] == 0.0
    assert s["overall"][4] == pytest.approx(0.5)  # mean over tasks, as summarize's overall
    assert s["overall"][1] == pytest.approx(summarize(recs, ["strict"])["overall"]["strict"])
    assert all(s["overall"][a] <= s["overall"][b] for a, b in zip(s["k"], s["k"][1:]))


def test_pass_at_k_summary_needs_two_images_per_prompt_and_skips_nan():
    recs = [r for r in _records() if r["sample"] == 0]
    assert summarize_pass_at_k(recs, ["strict"]) == {}
    recs = _records()
    recs[0]["strict"] = math.nan  # prompt 0 now has 3 scored images: k stops at 2
    assert summarize_pass_at_k(recs, ["strict"])["strict"]["k"] == [1, 2]


@pytest.mark.parametrize("key", ["task", "tag", "category"])
def test_geneval_tags_and_parti_categories_are_the_groups(key):
    """GenEval records carry ``tag``, Parti ``category``: per-task tables and a task-averaged overall for all three."""
    recs = [{**{k: v for k, v in r.items() if k != "task"}, key: r["task"]} for r in _records()]
    s = summarize(recs, ["strict"])
    assert set(s["per_task"]) == {"a", "b"}
    assert s["overall"]["strict"] == pytest.approx(((0.25 + 1.0) / 2 + 0.0) / 2)  # mean of tasks, not of images
    assert set(summarize_pass_at_k(recs, ["strict"])["strict"]["per_task"]) == {"a", "b"}


# ------------------------------------------------------------------------------------------ the summary's settings


def test_eval_summary_records_which_model_lora_and_prompt_set_were_evaluated(tmp_path, capsys):
    """REWARDS_AND_EVAL §3.2: the results record the LoRA state; two eval dirs (base, LoRA) must be told apart."""
    out = tmp_path / "ev"
    code = main(["eval", "--max-prompts", "1", "--seeds", "1", "--steps", "1", "--rewards", "shapes_partial",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["model"] == "shapes" and settings["lora"] is None and settings["prompt_set"] == "shapes-bench"
    assert settings["resolution"] == {"height": 32, "width": 32}  # the size the scores belong to (§3.2)
    assert "model=shapes" in (out / "report.html").read_text()


# ----------------------------------------------------------------------------------------------------- image seeds


def test_image_seed_is_unchanged_below_1009():
    from flowalign.evaluate import image_seed

    assert image_seed(0, 0, 0) == 0
    assert image_seed(0, 1, 0) == 1009
    assert image_seed(3, 2, 5) == 3 * 1_000_003 + 2 * 1_009 + 5 == 3_002_032
    assert image_seed(1, 0, 1008) == 1_001_011
    assert image_seed(7, 500, 17) == 7_000_021 + 504_500 + 17


def test_image_seeds_are_distinct_past_1009_and_usable():
    """seed·1_000_003 + i·1_009 + k repeats from k = 1009 on: image_seed(0, 0, 1009) == image_seed(0, 1, 0), so
    best-of-N / steering with 1009+ images per prompt started two images from the same noise."""
    from flowalign.evaluate import image_seed

    vals = {(s, i, k): image_seed(s, i, k) for s in (0, 1) for i in range(3) for k in range(3000)}
    assert len(set(vals.values())) == len(vals)
    # the CPU generator keeps only the low 32 bits of a seed, so those must differ within a run too
    g = torch.Generator()
    assert torch.equal(torch.randn(3, generator=g.manual_seed(2**40 + 7)), torch.randn(3, generator=g.manual_seed(7)))
    for s in (0, 1):
        low = [v % 2**32 for (s2, _, _), v in vals.items() if s2 == s]
        assert len(set(low)) == len(low)
    for v in vals.values():
        assert 0 <= v < 2**64
    for v in (max(vals.values()), image_seed(2**40, 10**4, 10**5)):
        torch.Generator().manual_seed(v)  # does not overflow


# ----------------------------------------------------------------------------------------------------- eval grid


def test_on_batch_sees_every_scored_image_once_with_its_record():
    from flowalign.data import load_prompts
    from flowalign.evaluate import as_records, sample_and_score
    from flowalign.models import load_model
    from flowalign.rewards import build_reward

    model = load_model("shapes", "")
    records = as_records(load_prompts("shapes-bench")[:3])
    reward = build_reward("shapes_partial")
    seen = {}

    def grab(chunk, images, batch_records):
        assert [(r["prompt_index"], r["sample"]) for r in batch_records] == list(chunk)
        for j, ik in enumerate(chunk):
            assert ik not in seen
            seen[ik] = images[j].clone()

    rows = sample_and_score(model, records, {"shapes_partial": reward}, steps=2, seeds_per_prompt=2, batch_size=4,
                            on_batch=grab)
    assert sorted(seen) == [(i, k) for i in range(3) for k in range(2)]
    again = reward(torch.stack([seen[(r["prompt_index"], r["sample"])] for r in rows]), [r["prompt"] for r in rows],
                   rows)
    assert again.tolist() == [r["shapes_partial"] for r in rows]


def test_eval_writes_a_grid_of_spaced_prompts_and_grid_0_writes_none(tmp_path, capsys):
    from PIL import Image

    from flowalign.report import grid_image

    out = tmp_path / "ev"
    assert main(["eval", "--max-prompts", "6", "--seeds", "2", "--steps", "2", "--rewards", "shapes_strict",
                 "--grid", "3", "--out", str(out)]) == 0, capsys.readouterr().err
    png = Image.open(out / "grids" / "eval.png")
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    labels = []
    for i in (0, 2, 4):  # every second of the 6 prompts
        vals = " ".join(format(r["shapes_strict"], ".3g") for r in rows if r["prompt_index"] == i)
        labels += [f"{rows[2 * i]['prompt']}  [shapes_strict: {vals}]", ""]
    want = grid_image(torch.zeros(6, 3, 32, 32), nrow=2, labels=labels)  # the same layout: 3 rows of 2, captions
    assert png.size == want.size
    assert 'alt="eval.png"' in (out / "report.html").read_text()
    out0 = tmp_path / "ev0"
    assert main(["eval", "--max-prompts", "2", "--seeds", "1", "--steps", "1", "--rewards", "shapes_strict",
                 "--grid", "0", "--out", str(out0)]) == 0
    assert not (out0 / "grids").exists()


# ----------------------------------------------------------------------------------------------------- resume


def test_an_interrupted_eval_resumes_to_the_uninterrupted_results(tmp_path, capsys, monkeypatch):
    """Ctrl-C after two of five batches leaves results.partial.jsonl; --resume samples only what is missing (and the
    grid's batches, for their pixels) and writes results, summary and grid byte for byte as one uninterrupted run."""
    import flowalign.evaluate as E
    import flowalign.io as IO

    args = ["eval", "--max-prompts", "5", "--seeds", "2", "--steps", "2", "--batch-size", "2", "--grid", "1",
            "--rewards", "shapes_strict,shapes_partial"]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0
    assert not (ref / E.PARTIAL).exists()

    out = tmp_path / "ev"
    real, calls = IO.append_jsonl_records, []

    def interrupt_after_two(path, records):
        real(path, records)
        calls.append(len(records))
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(IO, "append_jsonl_records", interrupt_after_two)
    assert main([*args, "--out", str(out)]) == 130
    assert "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [E.PARTIAL]  # nothing else written
    assert len((out / E.PARTIAL).read_text().splitlines()) == 1 + 2 * 3  # header + two batches: 2 records + an end line

    with open(out / E.PARTIAL, "a") as fh:  # a crash mid-append: a truncated last line (dropped, its batch redone)
        fh.write('{"prompt": "x", "prompt_index": 2, "sam')
    monkeypatch.setattr(IO, "append_jsonl_records", real)
    sampled = []
    real_sas = E.sample_and_score
    monkeypatch.setattr(E, "sample_and_score", lambda *a, **k: sampled.append(sorted(k["done_jobs"]))
                        or real_sas(*a, **k))
    assert main([*args, "--resume", "--out", str(out)]) == 0
    assert sampled == [[(1, 0), (1, 1)]]  # batch 0 holds the grid's images (prompt 0), so only batch 1 is skipped
    for name in ("results.jsonl", "summary.json", "grids/eval.png"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert not (out / E.PARTIAL).exists()


def test_a_resume_may_change_the_batch_size_and_samples_only_the_missing_images(tmp_path, capsys, monkeypatch,
                                                                               caplog):
    """After running out of memory a user resumes with a smaller --batch-size: the images already scored are kept
    (an image's noise and record do not depend on its batch), only the missing ones are sampled, in batches of the
    new size (a batch partly done samples the rest), and the results are an uninterrupted run's. A second
    interruption and resume at yet another size still ends there; other changed settings are still refused."""
    import flowalign.evaluate as E
    import flowalign.io as IO
    from cli_checks import fails

    args = ["eval", "--max-prompts", "5", "--seeds", "2", "--steps", "2", "--grid", "0",
            "--rewards", "shapes_strict,shapes_partial"]
    ref = tmp_path / "ref"
    assert main([*args, "--batch-size", "2", "--out", str(ref)]) == 0
    out = tmp_path / "ev"
    real, calls = IO.append_jsonl_records, []

    def interrupt_after(n):
        def append(path, records):
            real(path, records)
            calls.append(len(records))
            if len(calls) == n:
                raise KeyboardInterrupt
        return append

    monkeypatch.setattr(IO, "append_jsonl_records", interrupt_after(2))
    assert main([*args, "--batch-size", "4", "--out", str(out)]) == 130  # jobs 0-7 scored (prompts 0-3)
    sampled = []
    real_sas = E.sample_and_score

    def spy(*a, **k):
        real_chunks = []
        on = k["on_batch"]
        k["on_batch"] = lambda chunk, images, recs: real_chunks.append(list(chunk)) or on(chunk, images, recs)
        try:
            return real_sas(*a, **k)
        finally:
            sampled.append(real_chunks)

    monkeypatch.setattr(E, "sample_and_score", spy)
    capsys.readouterr()
    line = fails(capsys, [*args, "--batch-size", "3", "--steps", "3", "--resume", "--out", str(out)],
                 "other settings", "; steps 2 -> 3", "benchmark.overrides.steps.used 2 -> 3")
    assert "{" not in line  # the nested settings that differ, not both dicts whole
    calls.clear()
    monkeypatch.setattr(IO, "append_jsonl_records", interrupt_after(1))
    with caplog.at_level(logging.INFO, logger="flowalign.evaluate"):
        assert main([*args, "--batch-size", "3", "--resume", "--out", str(out)]) == 130
    assert "8 of 10 images already scored (they ran in batches of 4, the rest in batches of 3)" in caplog.text
    # batches of 3 over the 10 jobs: [0-2], [3-5], [6-8], [9]; jobs 0-7 done, so batch 2 samples just job 8
    assert sampled[-1] == [[(4, 0)]]
    monkeypatch.setattr(IO, "append_jsonl_records", real)
    assert main([*args, "--batch-size", "1", "--resume", "--out", str(out)]) == 0
    assert sampled[-1] == [[(4, 1)]]  # only the last image was missing
    got = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (ref / "results.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["sample"], r["seed"]) for r in got] == \
        [(r["prompt_index"], r["sample"], r["seed"]) for r in want]
    for a, b in zip(got, want):
        for name in ("shapes_strict", "shapes_partial"):
            assert a[name] == pytest.approx(b[name], abs=1e-6)
    assert not (out / E.PARTIAL).exists()


def test_resume_refuses_other_settings_a_finished_run_and_a_fresh_dir(tmp_path, capsys, monkeypatch):
    import flowalign.evaluate as E
    from cli_checks import fails

    out = tmp_path / "ev"
    out.mkdir()
    fails(capsys, ["eval", "--resume", "--out", str(out)], "no interrupted run", "without --resume")
    args = ["eval", "--max-prompts", "2", "--seeds", "1", "--steps", "1", "--rewards", "shapes_strict"]
    (out / E.PARTIAL).write_text(json.dumps({"journal": {"steps": 1}}) + "\n")
    fails(capsys, [*args, "--out", str(out)], "interrupted run", "--resume")
    line = fails(capsys, [*args, "--steps", "3", "--resume", "--out", str(out)], "other settings", "steps 1 -> 3")
    assert "--out" in line
    assert sorted(p.name for p in out.iterdir()) == [E.PARTIAL]  # untouched
    (out / E.PARTIAL).write_text(json.dumps({"journal": {"steps": 1}}) + "\n{broken\n" + json.dumps({"a": 1}) + "\n")
    fails(capsys, [*args, "--resume", "--out", str(out)], "cannot read", E.PARTIAL)
    done = tmp_path / "done"
    assert main([*args, "--out", str(done)]) == 0
    capsys.readouterr()
    fails(capsys, [*args, "--resume", "--out", str(done)], "finished already")


# ------------------------------------------------------------------------------- bad rewards: refused before sampling


def test_an_image_verifier_on_a_video_model_refuses_the_prompts_before_sampling(tmp_path, capsys, monkeypatch):
    """shapes_strict on shapes_video is wrapped in PerFrame, which forwards the verifier's prompt check: the motion
    prompts are refused in one line before anything is sampled or written (was: a crash mid-run, a partial file)."""
    from cli_checks import fails

    import flowalign.evaluate as E

    def no_sampling(*a, **k):
        raise AssertionError("sampled before the prompts were checked")

    monkeypatch.setattr(E, "run_eval", no_sampling)
    out = tmp_path / "x"
    fails(capsys, ["eval", "--model", "shapes_video", "--prompts", "shapes-motion-bench", "--rewards", "shapes_strict",
                   "--max-prompts", "2", "--seeds", "1", "--steps", "2", "--grid", "0", "--out", str(out)],
          "'shapes_strict' scores still scenes", "is a motion prompt; for videos use shapes_motion_strict")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("arg, needles", [
    ("jpeg_compressibility.quality=high", ("reward 'jpeg_compressibility'", "quality='high': expected an integer")),
    ("jpeg_compressibility.quality=[95]", ("quality=[95]: expected an integer",)),
    ("shapes_soft.temps={area: 0}", ("shapes_soft: temps.area must be a finite number > 0",)),
])
def test_a_reward_argument_of_the_wrong_type_is_one_line(tmp_path, capsys, arg, needles):
    from cli_checks import fails

    name = arg.split(".", 1)[0]
    out = tmp_path / "o"
    fails(capsys, ["eval", "--rewards", name, "--reward-arg", arg, "--max-prompts", "1", "--seeds", "1", "--steps", "1",
                   "--grid", "0", "--out", str(out)], *needles)
    assert not out.exists() or not any(out.iterdir())


def test_a_value_error_while_building_a_reward_names_the_reward_and_argument(monkeypatch):
    """What only the constructor sees (no annotation or default to check against) is one line too, naming the
    argument whose value the error quotes."""
    from flowalign.errors import UserError
    from flowalign.rewards.catalog import build_reward_checked
    from flowalign.rewards.quality import JpegCompressibility

    def init(self, quality=95):  # no annotation: the check before building cannot tell
        self.quality = int(quality)

    monkeypatch.setattr(JpegCompressibility, "__init__", init)
    with pytest.raises(UserError, match=r"^--reward-arg: reward 'jpeg_compressibility': cannot be built with "
                                        r"quality='high' \(invalid literal for int"):
        build_reward_checked("jpeg_compressibility", {"quality": "high"}, "--reward-arg: reward 'jpeg_compressibility'")


# ------------------------------------------------------------------------------ --out, --model-arg, resumed prompts

@pytest.mark.parametrize("out", ["/sys/flowalign-test-evalx", "/proc/flowalign-test/x"])
def test_an_unwritable_out_is_one_line_before_the_model_loads(capsys, no_model, out):
    """--out under /sys (read-only even for root) or /proc (nothing can be created) failed with a traceback at the
    journal's mkdir: the directory's nearest existing ancestor is probed for a write first."""
    from cli_checks import fails

    fails(capsys, ["eval", "--max-prompts", "1", "--seeds", "1", "--out", out], f"--out {out!r} cannot be written")


@pytest.mark.parametrize("arg, needles", [
    ("dtype=half", ("--model-arg dtype must be one of float32, bfloat16, float16, got 'half'",)),
    ("dtype=16", ("--model-arg dtype must be one of", "got 16")),
    ("guidance_scale=abc", ("--model-arg guidance_scale must be a finite number >= 0", "'abc'")),
    ("guidance_scale=-3", ("--model-arg guidance_scale must be a finite number >= 0", "got -3")),
    ("guidance_scale=true", ("guidance_scale=True: expected a finite number",)),
])
def test_model_args_are_checked_like_the_flags_before_the_model_loads(tmp_path, capsys, no_model, arg, needles):
    """dtype=float16 reached torch's .to() as a string (TypeError), guidance_scale=abc a ValueError traceback, and
    guidance_scale=-3 ran negative CFG although --guidance -3 is refused."""
    from cli_checks import fails

    out = tmp_path / "o"
    fails(capsys, ["eval", "--model-arg", arg, "--max-prompts", "1", "--seeds", "1", "--out", str(out)], *needles)
    assert not out.exists()


def test_a_model_dtype_is_passed_as_a_torch_dtype_and_recorded_by_name(tmp_path, capsys, monkeypatch):
    import flowalign.models
    from flowalign.models.shapes import ShapesModel

    loaded = []
    real = ShapesModel.from_pretrained.__func__

    def spy(cls, path="", **kw):
        loaded.append(kw)
        return real(cls, path, **kw)

    monkeypatch.setattr(ShapesModel, "from_pretrained", classmethod(spy))
    assert flowalign.models.resolve("shapes") is ShapesModel
    out = tmp_path / "ev"
    assert main(["eval", "--model-arg", "dtype=bfloat16", "--model-arg", "guidance_scale=2", "--max-prompts", "1",
                 "--seeds", "1", "--steps", "1", "--grid", "0", "--rewards", "shapes_partial", "--out", str(out)]) == 0
    assert loaded[0]["dtype"] is torch.bfloat16 and loaded[0]["guidance_scale"] == 2
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["model_args"] == {"dtype": "bfloat16", "guidance_scale": 2} and settings["guidance"] == 2.0


def test_resume_refuses_an_edited_prompt_file(tmp_path, capsys, monkeypatch):
    """The journal held the prompt file's path and count only: an interrupted eval resumed after line 1 was edited
    exited 0 with the old prompt's scores in results.jsonl. Now the prompts' digest differs: refused in one line."""
    import flowalign.evaluate as E
    import flowalign.io as IO
    from cli_checks import fails

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na yellow square\n")
    args = ["eval", "--prompts", str(prompts), "--seeds", "1", "--steps", "1", "--batch-size", "1", "--grid", "0",
            "--rewards", "shapes_strict"]
    out = tmp_path / "ev"
    real = IO.append_jsonl_records

    def interrupt(path, records):
        real(path, records)
        raise KeyboardInterrupt

    monkeypatch.setattr(IO, "append_jsonl_records", interrupt)
    assert main([*args, "--out", str(out)]) == 130
    monkeypatch.setattr(IO, "append_jsonl_records", real)
    capsys.readouterr()
    prompts.write_text("a green circle\na blue square\na yellow square\n")
    fails(capsys, [*args, "--resume", "--out", str(out)], "other settings", "the prompts differ")
    assert sorted(p.name for p in out.iterdir()) == [E.PARTIAL]  # untouched
    prompts.write_text("a red circle\na blue square\na yellow square\n")
    assert main([*args, "--resume", "--out", str(out)]) == 0
    assert [json.loads(line)["prompt"] for line in (out / "results.jsonl").read_text().splitlines()] == [
        "a red circle", "a blue square", "a yellow square"]


# --------------------------------------------------------------------------- paired bootstrap between two evaluations


def _paired(n_prompts=30, shift=None, seed=0, nan_at=None):
    import random

    rng = random.Random(seed)
    base, other = [], []
    for i in range(n_prompts):
        task = "a" if i < 10 else ("b" if i < 25 else "c")  # groups of unequal size
        for k in range(4):
            x = rng.random()
            y = x + shift if shift is not None else (x + 0.1 if rng.random() < 0.7 else x - 0.05)
            base.append({"prompt_index": i, "sample": k, "seed": 10 * i + k, "task": task, "r": x})
            other.append({"prompt_index": i, "sample": k, "seed": 10 * i + k, "task": task, "r": y})
    if nan_at is not None:
        other[nan_at]["r"] = math.nan
    return base, other


@pytest.mark.parametrize("overall", ["groups", "images"])
def test_paired_bootstrap_point_estimate_is_the_difference_of_the_summaries(overall):
    from flowalign.evaluate import paired_bootstrap

    base, other = _paired(nan_at=3)  # a NaN score is skipped as summarize skips it
    res = paired_bootstrap(base, other, "r", overall=overall, n_boot=500)
    sa, sb = summarize(base, ["r"], overall=overall), summarize(other, ["r"], overall=overall)
    assert res["delta"] == pytest.approx(sb["overall"]["r"] - sa["overall"]["r"], abs=1e-12)
    for g, v in res["per_task"].items():
        assert v["delta"] == pytest.approx(sb["per_task"][g]["r"] - sa["per_task"][g]["r"], abs=1e-12)
        assert v["lo"] <= v["delta"] <= v["hi"]
    assert res["lo"] < res["delta"] < res["hi"]


def test_paired_bootstrap_cancels_what_the_pairs_share():
    """Identical evaluations differ by exactly 0; a constant change of every image is known exactly (interval of
    width 0), however noisy the images themselves are: the pairs share prompt and noise."""
    from flowalign.evaluate import paired_bootstrap

    base, _ = _paired()
    same = paired_bootstrap(base, base, "r", n_boot=200)
    assert same["delta"] == same["lo"] == same["hi"] == 0.0
    base, shifted = _paired(shift=0.1)
    res = paired_bootstrap(base, shifted, "r", n_boot=200)
    assert res["lo"] == pytest.approx(0.1, abs=1e-12) and res["hi"] == pytest.approx(0.1, abs=1e-12)


def test_paired_bootstrap_interval_covers_the_true_change_about_95_times_in_100():
    """Coverage on simulated pairs whose true mean change is known (0.1·0.7 − 0.05·0.3 = 0.055 per image)."""
    from flowalign.evaluate import paired_bootstrap

    hits = 0
    for s in range(100):
        base, other = _paired(n_prompts=40, seed=s)
        res = paired_bootstrap(base, other, "r", overall="images", n_boot=400, seed=s)
        hits += res["lo"] <= 0.055 <= res["hi"]
    assert 88 <= hits <= 99, hits


def test_paired_bootstrap_refuses_unpaired_evaluations():
    from flowalign.evaluate import paired_bootstrap

    base, other = _paired()
    with pytest.raises(ValueError, match="different images"):
        paired_bootstrap(base, other[:-1], "r")
    other = [dict(r, seed=r["seed"] + 1) for r in other]
    with pytest.raises(ValueError, match="different noise seeds"):
        paired_bootstrap(base, other, "r")


def test_paired_bootstrap_has_no_interval_for_a_task_of_one_prompt():
    """One prompt cannot be resampled: its interval, and the overall one that holds it fixed, are NaN (not a
    zero-width, falsely certain interval); the point estimates stay."""
    from flowalign.evaluate import paired_bootstrap

    base, other = _paired(n_prompts=26)  # task c: prompt 25 alone
    res = paired_bootstrap(base, other, "r", n_boot=200)
    assert math.isnan(res["per_task"]["c"]["lo"]) and math.isnan(res["lo"]) and math.isnan(res["hi"])
    assert not math.isnan(res["per_task"]["a"]["lo"]) and not math.isnan(res["delta"])


def test_paired_bootstrap_refuses_evaluations_of_other_prompts():
    from flowalign.evaluate import paired_bootstrap

    base, other = _paired()
    other = [dict(r, prompt="another prompt") if r["prompt_index"] == 3 else r for r in other]
    with pytest.raises(ValueError, match="different prompts"):
        paired_bootstrap(base, other, "r")


# ------------------------------------------------------------ exact contracts: seeds, N/A scores, groups, intervals


def test_image_seed_past_1009_is_the_documented_layout():
    """image_seed's docstring, k >= 1009 (j = k − 1009): bit 63 set, seed mod 2**31 in bits 32-62, and in the low 32
    bits (seed·1_000_003 + 2**31 + splitmix64(seed) mod 2**30 + (i + j)(i + j + 1)/2 + j) mod 2**32, the Cantor pairing
    of (prompt i, j). Distinctness alone does not fix these values; the noise of every image past 1009 does."""
    from flowalign.evaluate import _splitmix64, image_seed

    for seed, i, k in [(0, 0, 1009), (3, 2, 1010), (42, 7, 2000), (2**31 + 5, 1, 1500), (1, 40_000, 7_000)]:
        v, j = image_seed(seed, i, k), k - 1009
        assert v >> 63 == 1 and v < 2**64
        assert (v >> 32) & (2**31 - 1) == seed % 2**31
        pair = (i + j) * (i + j + 1) // 2 + j
        assert v % 2**32 == (seed * 1_000_003 + 2**31 + _splitmix64(seed) % 2**30 + pair) % 2**32
    # the pairing's order: (i, j) = (1, 0) is 1 and (0, 1) is 2
    assert image_seed(0, 1, 1009) - image_seed(0, 0, 1009) == 1
    assert image_seed(0, 0, 1010) - image_seed(0, 0, 1009) == 2


def test_splitmix64_is_the_reference_mix():
    """_splitmix64(x) is the first output of SplitMix64 (Steele et al. 2014) seeded with x: the published test
    vectors (seed 0: 0xE220A8397B1DCDAF; seed 1234567: 6457827717110365317, 3203168211198807973, ...)."""
    from flowalign.evaluate import _splitmix64

    gamma = 0x9E3779B97F4A7C15  # the generator's state step
    assert _splitmix64(0) == 0xE220A8397B1DCDAF
    assert [_splitmix64((1234567 + n * gamma) % 2**64) for n in range(5)] == [
        6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431, 16408922859458223821]


def test_summarize_detects_rewards_and_leaves_the_jobs_own_fields_out():
    """Without reward names every numeric field is a reward but the job's own (prompt_index, sample, seed) and
    booleans: a summary must not average the noise seeds."""
    recs = [{"prompt": "p", "task": "a", "prompt_index": 0, "sample": k, "seed": 1009 * k, "ok": True, "r": 0.5 * k}
            for k in range(2)]
    s = summarize(recs)
    assert set(s["overall"]) == {"r"} and s["overall"]["r"] == 0.25


def test_summarize_skips_a_group_where_the_reward_does_not_apply():
    """N/A (NaN) scores are skipped: a group where a reward is NaN for every image has a NaN mean for it and is
    left out of the mean over groups (a GenEval-style reward scored on some tasks only)."""
    recs = [{"task": "a", "prompt_index": 0, "sample": 0, "r": 1.0, "q": 0.2},
            {"task": "a", "prompt_index": 0, "sample": 1, "r": 0.0, "q": 0.4},
            {"task": "b", "prompt_index": 1, "sample": 0, "r": math.nan, "q": 0.9}]
    s = summarize(recs, ["r", "q"])
    assert math.isnan(s["per_task"]["b"]["r"]) and s["per_task"]["a"]["r"] == 0.5
    assert s["overall"]["r"] == 0.5 and s["overall"]["q"] == pytest.approx((0.3 + 0.9) / 2)
    assert summarize(recs, ["r"], overall="images")["overall"]["r"] == 0.5
    assert math.isnan(summarize([dict(recs[2])], ["r"])["overall"]["r"])  # nothing applies: NaN, not 0


def test_a_records_group_is_task_then_tag_then_category():
    """_group_of follows data.task_of's order (task, tag, category), an empty label is no label, and a record
    without any is in group "all"."""
    from flowalign.data import PromptRecord, task_of

    metas = [{"task": "t", "tag": "g", "category": "c"}, {"tag": "g", "category": "c"}, {"task": "", "tag": "g"},
             {"category": "c"}, {"task": ""}, {}]
    recs = [{"prompt": "p", "prompt_index": i, "sample": 0, "r": float(i), **m} for i, m in enumerate(metas)]
    s = summarize(recs, ["r"])
    assert s["counts"] == {"t": 1, "g": 2, "c": 1, "all": 2}
    assert s["per_task"]["g"]["r"] == 1.5 and s["per_task"]["all"]["r"] == 4.5
    assert [task_of(PromptRecord("p", m)) or "all" for m in metas] == ["t", "g", "g", "c", "all", "all"]
    # another group key is used alone
    assert summarize(recs, ["r"], group_key="category")["counts"] == {"c": 3, "all": 3}


def test_pass_at_k_of_a_prompt_uses_its_own_image_count():
    """Each prompt's pass@k is pass_at_k(its scored images, its passes, k) (Chen et al. 2021, eq. 1), k up to the
    smallest count: a prompt with 4 scored images and one with 2 (two N/A) are not both treated as 2."""
    recs = [{"task": "a", "prompt_index": 0, "sample": k, "s": float(k == 0)} for k in range(4)]
    recs += [{"task": "a", "prompt_index": 1, "sample": k, "s": [1.0, 0.0, math.nan, math.nan][k]} for k in range(4)]
    pk = summarize_pass_at_k(recs, ["s"])["s"]
    assert pk["k"] == [1, 2]
    assert pk["per_task"]["a"][1] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert pk["per_task"]["a"][2] == pytest.approx((pass_at_k(4, 1, 2) + pass_at_k(2, 1, 2)) / 2) == 0.75


def _two_prompt_group(level, n_boot=4000):
    """Task a: two prompts of one image; the model change is 0 on prompt 0 and 1 on prompt 1, so a resample's mean
    change is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4."""
    from flowalign.evaluate import paired_bootstrap

    base = [{"prompt_index": i, "sample": 0, "seed": i, "task": "a", "r": 0.0} for i in range(2)]
    other = [dict(r, r=float(r["prompt_index"])) for r in base]
    return paired_bootstrap(base, other, "r", n_boot=n_boot, level=level)


def test_paired_bootstrap_interval_is_the_central_percentile_interval():
    """Percentile interval (Efron & Tibshirani 1993, ch. 13): lo/hi are the (1 − level)/2 and (1 + level)/2
    quantiles of the resampled changes. level 0.6: the 0.2 and 0.8 quantiles of {0: 1/4, 1/2: 1/2, 1: 1/4} are 0 and
    1 (the 0.4 and 0.6 quantiles would both be 1/2); level 0.4: the 0.3 and 0.7 quantiles, both 1/2."""
    wide, narrow = _two_prompt_group(0.6), _two_prompt_group(0.4)
    assert wide["delta"] == narrow["delta"] == 0.5
    assert (wide["lo"], wide["hi"]) == (0.0, 1.0) and wide["level"] == 0.6
    assert (narrow["lo"], narrow["hi"]) == (0.5, 0.5)
    assert (wide["per_task"]["a"]["lo"], wide["per_task"]["a"]["hi"]) == (0.0, 1.0)


def test_paired_bootstrap_interval_comes_from_the_resamples_only():
    """The unresampled data (row 0, the point estimate) is not one of the quantiles' samples: with one resample the
    interval is that resample, of width 0, whatever the point estimate."""
    from flowalign.evaluate import paired_bootstrap

    base, other = _paired()
    for s in range(5):
        res = paired_bootstrap(base, other, "r", n_boot=1, seed=s)
        assert res["lo"] == res["hi"] != res["delta"]
        for g in ("a", "b", "c"):
            assert res["per_task"][g]["lo"] == res["per_task"][g]["hi"]


def test_paired_bootstrap_skips_not_applicable_scores_like_summarize():
    """N/A (NaN) scores: a task where the reward never applies is left out of the mean over tasks (as summarize), and
    resamples that draw only N/A prompts of a task are left out of its interval instead of making it NaN."""
    from flowalign.evaluate import paired_bootstrap

    base, other = _paired()
    for recs in (base, other):
        for r in recs:
            if r["task"] == "c" or r["prompt_index"] == 0:  # task c: N/A; task a: prompt 0 N/A
                r["r"] = math.nan
    res = paired_bootstrap(base, other, "r", n_boot=300)
    sa, sb = summarize(base, ["r"]), summarize(other, ["r"])
    assert res["delta"] == pytest.approx(sb["overall"]["r"] - sa["overall"]["r"], abs=1e-12)
    assert math.isfinite(res["lo"]) and res["lo"] < res["delta"] < res["hi"]
    assert math.isnan(res["per_task"]["c"]["delta"])
    # a two-prompt task with one N/A prompt: a quarter of its resamples hold only that prompt (NaN mean)
    for recs in (base, other):
        for r in recs:
            r["task"] = "t" if r["prompt_index"] < 2 else "u"
    small = paired_bootstrap(base, other, "r", n_boot=200)["per_task"]["t"]
    assert small["lo"] == small["hi"] == pytest.approx(small["delta"], abs=1e-12)  # only prompt 1 counts


def test_paired_bootstrap_of_steered_outputs_pairs_by_prompt_whatever_the_seeds():
    """same_noise=False (steered outputs against plain samples): other seeds are allowed, other prompts still not."""
    from flowalign.evaluate import paired_bootstrap

    base, other = _paired()
    reseeded = [dict(r, seed=r["seed"] + 5) for r in other]
    res = paired_bootstrap(base, reseeded, "r", n_boot=100, same_noise=False)
    assert res == paired_bootstrap(base, other, "r", n_boot=100)
    with pytest.raises(ValueError, match="different prompts"):
        paired_bootstrap(base, [dict(r, prompt="x") for r in reseeded], "r", same_noise=False)


def test_hpsv2_chunks_follow_the_prompt_order_not_the_record_order():
    """summarize_chunks splits each group's images in (prompt, sample) order (HPSv2's evaluate_benchmark): records
    given out of order (gathered from ranks, read back) give the same chunks."""
    from flowalign.evaluate import summarize_chunks

    recs = [{"task": "photo", "prompt_index": i, "sample": 0, "hps": float(i >= 2)} for i in range(4)]
    want = {"hps": {"photo": {"mean": 0.5, "std": 0.5, "chunks": 2}}}  # chunks (0, 0) and (1, 1)
    assert summarize_chunks(recs, ["hps"], size=2) == want
    assert summarize_chunks([recs[i] for i in (3, 0, 2, 1)], ["hps"], size=2) == want


def test_each_image_starts_from_the_noise_of_its_own_image_seed():
    """sample_and_score: image k of prompt i starts from the noise of image_seed(seed, i, k) (recorded as ``seed``), so
    it can be regenerated alone: init_noise(1, Generator().manual_seed(seed)) and the ODE give its pixels."""
    from flowalign.data import load_prompts
    from flowalign.evaluate import as_records, image_seed, sample_and_score
    from flowalign.models import load_model
    from flowalign.samplers.loop import sample

    model = load_model("shapes", "")
    records = as_records(load_prompts("shapes-bench")[:3])
    seen = {}
    rows = sample_and_score(model, records, {"n": lambda images, prompts, meta: images.mean((1, 2, 3))}, steps=2,
                            seeds_per_prompt=2, batch_size=4, seed=5,
                            on_batch=lambda chunk, images, recs: seen.update(zip(chunk, images)))
    assert [r["seed"] for r in rows] == [image_seed(5, i, k) for i in range(3) for k in range(2)]
    i, k = 2, 1  # image 1 of prompt 2, sampled beside image 0 of prompt 2 in the second batch
    x = model.init_noise(1, torch.Generator().manual_seed(image_seed(5, i, k)))  # [1, *latent]
    alone = model.decode(sample(model.velocity, x, model.schedule(2), model.encode([records[i]["prompt"]]), eta=0.0,
                                kernel="euler", cond_index=torch.tensor([0])).final)  # [1, 3, H, W]
    assert torch.allclose(alone[0], seen[(i, k)], atol=1e-5)


def test_the_progress_bar_counts_this_processs_share(monkeypatch):
    """Under a 2-process launch rank 0's bar started at 50 %: the other rank's batches counted as done. It now
    counts this process's images only (and a resume's finished ones among them)."""
    import tqdm.auto

    from flowalign.evaluate import sample_and_score
    from flowalign.models import load_model

    bars = []

    class Bar:
        def __init__(self, **kw):
            bars.append(kw)
            self.n = kw["initial"]

        def update(self, k):
            self.n += k

        def close(self):
            bars[-1]["end"] = self.n

    model = load_model("shapes", "")  # before the patch: the hub client's imports subclass tqdm
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    recs = [{"prompt": "a red circle"}, {"prompt": "a blue square"}]
    sample_and_score(model, recs, {}, steps=1, seeds_per_prompt=2, batch_size=1, progress=True,
                     skip_batches={1, 3}, done_jobs={(0, 0)})
    assert bars[-1]["total"] == 2 and bars[-1]["initial"] == 1 and bars[-1]["end"] == 2  # jobs (0,0) and (1,0)
    assert "of 4" in bars[-1]["desc"]
