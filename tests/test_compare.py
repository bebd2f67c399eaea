"""`flowalign compare`: eval points placed at the right rollouts and cumulative NFE, table and plot written."""

from __future__ import annotations

import json

import pytest
import yaml
from cli_checks import fails as _fails

from flowalign.cli import main
from flowalign.compare import compare, run_curve
from flowalign.errors import UserError


def _run(d, credit, values, nfe_per_iter):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"train": {"groups_per_iter": 2, "group_size": 4},
                                                   "credit": {"name": credit, "options": {"probe": "ode:2"}}}))
    recs = [{"iteration": i, "nfe/sampling": i * nfe_per_iter[0], "nfe/probing": i * nfe_per_iter[1], "time/elapsed_s": 3.0 * i}
            for i in range(1, 5)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for label, v in values.items():
        (d / "eval" / label).mkdir(parents=True)
        (d / "eval" / label / "summary.json").write_text(json.dumps({"overall": {"shapes_strict": v}, "per_task": {}}))
    return d


def test_points_sit_at_rollouts_and_cumulative_nfe(tmp_path):
    a = _run(tmp_path / "a", "outcome", {"base": 0.3, "step-2": 0.4, "final": 0.5}, (10, 0))
    b = _run(tmp_path / "b", "dense_gain", {"base": 0.3, "step-2": 0.45, "step-4": 0.6, "final": 0.6}, (10, 30))
    ca, cb = run_curve(a), run_curve(b)
    assert ca["rollouts"] == [0, 16, 32] and ca["nfe"] == [0.0, 20.0, 40.0] and ca["value"] == [0.3, 0.4, 0.5]
    assert cb["iterations"] == [0, 2, 4] and cb["nfe"] == [0.0, 80.0, 160.0] and cb["credit"] == "dense_gain (ode:2)"
    png, md = compare([a, b], tmp_path / "out")
    assert png.read_bytes()[:4] == b"\x89PNG"
    rows = md.read_text().splitlines()
    assert len(rows) == 4 and "+0.200" in rows[2] and "+0.300" in rows[3]


def test_tempflow_runs_are_labelled_by_their_branch_steps(tmp_path):
    d = _run(tmp_path / "t", "branch", {"base": 0.3, "final": 0.4}, (10, 0))
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["credit"]["options"] = {}
    cfg["sampler"] = {"plan": "branch", "plan_options": {"children": 4, "branch_steps": "random"}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert run_curve(d)["credit"] == "branch (branch_steps random)"
    cfg["sampler"]["plan_options"] = {"children": 4}  # the plan's default
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert run_curve(d)["credit"] == "branch (branch_steps all)"
    cfg["credit"] = {"name": "granular", "options": {"strides": [1, 2, 3]}}  # G²RPO: its options name the run
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert run_curve(d)["credit"] == "granular (strides 1,2,3, branch_steps all)"


def test_guided_runs_are_labelled_by_their_guide_and_strength(tmp_path):
    d = _run(tmp_path / "g", "euphonium", {"base": 0.3, "final": 0.4}, (10, 0))
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["credit"]["options"] = {}
    cfg["sampler"] = {"plan": "chain", "guide": "reward_grad", "guide_options": {"lam": 300.0}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert run_curve(d)["credit"] == "euphonium (reward_grad λ=300)"


def test_nft_runs_are_labelled_by_their_objective(tmp_path):
    d = _run(tmp_path / "n", "outcome", {"base": 0.3, "final": 0.4}, (10, 0))
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["credit"]["options"] = {}
    cfg.setdefault("train", {})["objective"] = "nft"
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert run_curve(d)["credit"] == "outcome (objective nft)"


def test_not_a_run_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        run_curve(tmp_path)
    (tmp_path / "config.yaml").write_text("train: {}\n")
    with pytest.raises(UserError, match="no evaluations"):
        run_curve(tmp_path)


def test_logged_rollouts_count_what_was_sampled_and_resume_repeats_count_once(tmp_path):
    """A plan that adds rows (TempFlow children) logs ``rollouts/iteration``; compare sums it, not the config."""
    d = _run(tmp_path / "br", "branch", {"base": 0.3, "step-2": 0.4, "final": 0.5}, (10, 0))
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r["rollouts/iteration"] = 32  # 4× the config's groups_per_iter × group_size = 8
    recs.insert(2, dict(recs[1]))  # iteration 2 logged twice (killed after logging, resumed from step 1)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert run_curve(d)["rollouts"] == [0, 64, 128]


def _seeded(d, seed, values, credit="outcome", lr=1e-3):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"train": {"groups_per_iter": 2, "group_size": 4, "seed": seed, "lr": lr},
                                                   "credit": {"name": credit}, "output": {"run_dir": str(d)}}))
    recs = [{"iteration": i, "nfe/sampling": 10 * i, "time/elapsed_s": 2.0 * i} for i in range(1, 5)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for label, v in values.items():
        (d / "eval" / label).mkdir(parents=True)
        (d / "eval" / label / "summary.json").write_text(json.dumps({"overall": {"shapes_strict": v}, "per_task": {}}))
    return d


def test_mean_over_seeds_merges_only_runs_that_differ_in_the_seed(tmp_path):
    from flowalign.compare import cli_main

    a42 = _seeded(tmp_path / "out42", 42, {"base": 0.4, "step-2": 0.5, "final": 0.6})
    a43 = _seeded(tmp_path / "out43", 43, {"base": 0.4, "step-2": 0.3, "final": 0.5})
    b42 = _seeded(tmp_path / "dense42", 42, {"base": 0.4, "step-2": 0.45, "final": 0.45}, credit="dense_gain")
    c42 = _seeded(tmp_path / "lr42", 42, {"base": 0.4, "step-2": 0.5, "final": 0.7}, lr=3e-4)  # another setting
    png, md = compare([a42, b42, a43, c42], tmp_path / "o", seeds_mean=True)
    rows = md.read_text().splitlines()[2:]
    assert len(rows) == 3 and rows[0].startswith("| out42 (+1 seed) | outcome |")
    cells = [x.strip() for x in rows[0].split("|")]
    assert cells[6:11] == ["0.400", "0.550", "+0.150", "0.550", "42: 0.600, 43: 0.500"]  # mean curve 0.4, 0.4, 0.55
    assert rows[1].startswith("| dense42 | dense_gain |") and rows[2].startswith("| lr42 | outcome |")
    assert png.read_bytes()[:4] == b"\x89PNG"
    # without the option every run is its own row, as before
    assert len(compare([a42, a43], tmp_path / "p")[1].read_text().splitlines()) == 4
    # the same seed twice, or seeds evaluated at different points, cannot be averaged: one line, exit 2
    dup = _seeded(tmp_path / "again42", 42, {"base": 0.4, "step-2": 0.5, "final": 0.6})
    with pytest.raises(UserError, match="the same seed"):
        compare([a42, dup], tmp_path / "q", seeds_mean=True)
    short = _seeded(tmp_path / "short44", 44, {"base": 0.4, "final": 0.5})
    with pytest.raises(UserError, match="evaluated at different iterations"):
        compare([a42, short], tmp_path / "r", seeds_mean=True)
    assert not (tmp_path / "q").exists() and not (tmp_path / "r").exists()
    assert cli_main([str(a42), str(a43), "--out", str(tmp_path / "s"), "--mean-over-seeds"]) == 0


# ----------------------------------------------------------------- run directories with a metrics log of their own


def _make_run(d, values, records=None, cfg=None, raw_metrics=None):
    d.mkdir(parents=True)
    cfg = cfg if cfg is not None else {"train": {"groups_per_iter": 2, "group_size": 4}, "credit": {"name": "outcome"}}
    (d / "config.yaml").write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    if records is None:
        records = [{"iteration": i, "nfe/sampling": 10 * i, "time/elapsed_s": 1.0 * i} for i in range(1, 5)]
    text = raw_metrics if raw_metrics is not None else "".join(json.dumps(r) + "\n" for r in records)
    (d / "metrics.jsonl").write_text(text)
    for label, v in values.items():
        (d / "eval" / label).mkdir(parents=True)
        (d / "eval" / label / "summary.json").write_text(json.dumps({"overall": {"shapes_strict": v}}))
    return d


def _fails_in_one_line(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


# ------------------------------------------------------------------------------------------------------- bad input


def test_compare_corrupt_metrics_line_is_one_line_error(tmp_path, capsys):
    """A bad line in the middle of metrics.jsonl raised a ValueError traceback (exit 1), not a one-line error."""
    recs = [{"iteration": i, "nfe/sampling": 10 * i} for i in range(1, 4)]
    raw = json.dumps(recs[0]) + "\n{oops\n" + json.dumps(recs[1]) + "\n" + json.dumps(recs[2]) + "\n"
    d = _make_run(tmp_path / "r", {"base": 0.3, "final": 0.5}, raw_metrics=raw)
    out = tmp_path / "out"
    _fails_in_one_line(capsys, ["compare", str(d), "--out", str(out)], "metrics.jsonl:2")
    assert not out.exists()


@pytest.mark.parametrize("text", ["train: [1\n", "- a\n- b\n", "train: 5\n"])
def test_compare_unreadable_config_is_one_line_error(tmp_path, capsys, text):
    """Invalid YAML, or a config.yaml that is not a mapping, crashed with a yaml/Attribute traceback."""
    d = _make_run(tmp_path / "r", {"base": 0.3, "final": 0.5}, cfg=text)
    out = tmp_path / "out"
    _fails_in_one_line(capsys, ["compare", str(d), "--out", str(out)], "config.yaml")
    assert not out.exists()


def test_compare_non_numeric_summary_value_is_one_line_error(tmp_path, capsys):
    d = _make_run(tmp_path / "r", {"base": 0.3, "final": 0.5})
    (d / "eval" / "final" / "summary.json").write_text(json.dumps({"overall": {"shapes_strict": "n/a"}}))
    out = tmp_path / "out"
    _fails_in_one_line(capsys, ["compare", str(d), "--out", str(out)], "final")
    assert not out.exists()


def test_compare_out_under_a_file_is_one_line_error(tmp_path, capsys):
    """`--out FILE/sub`: mkdir failed with NotADirectoryError after all runs were read and plotted."""
    d = _make_run(tmp_path / "r", {"base": 0.3, "final": 0.5})
    f = tmp_path / "afile"
    f.write_text("x")
    _fails_in_one_line(capsys, ["compare", str(d), "--out", str(f / "sub")], str(f))


def test_compare_refuses_an_out_it_cannot_write_in_one_line(tmp_path, capsys, monkeypatch):
    """`--out /sys/cmp` (root may not create files there, though os.access says it may) or under a directory that
    cannot be made: a PermissionError / FileNotFoundError traceback after every run was read and plotted."""
    import matplotlib.figure

    d = _make_run(tmp_path / "r", {"base": 0.3, "final": 0.5})

    def no_plot(*a, **k):
        raise AssertionError("plotted before --out was checked")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_plot)
    for out in ("/sys/cmp", "/proc/sub/cmp"):
        _fails(capsys, ["compare", str(d), "--out", out], f"--out {out!r}", "cannot be written")


def test_compare_help_says_earlier_outputs_in_out_are_replaced(capsys):
    try:
        main(["compare", "--help"])
    except SystemExit:
        pass
    assert "compare.png or compare.md already there is replaced" in " ".join(capsys.readouterr().out.split())


def test_compare_refuses_an_eval_output_directory_in_one_line(tmp_path, capsys):
    """A run directory holding only a `flowalign eval` summary (no eval/) crashed with IndexError."""
    d = tmp_path / "r"
    d.mkdir()
    (d / "config.yaml").write_text("train: {}\n")
    (d / "summary.json").write_text(json.dumps({"overall": {"shapes_strict": 0.4}}))
    _fails(capsys, ["compare", str(d), "--out", str(tmp_path / "out")], str(d))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- rows and points


def test_mean_over_seeds_merges_seeds_run_on_different_devices(tmp_path):
    """Seeds run side by side on cuda:0 and cuda:1 (or checkpointed at another cadence) are one setting; the
    device made them two 'settings', so --mean-over-seeds silently printed two unmerged rows."""
    def cfg(seed, device, ckpt):
        return {"train": {"groups_per_iter": 2, "group_size": 4, "seed": seed, "checkpoint_every": ckpt},
                "model": {"device": device}, "credit": {"name": "outcome"}}

    a = _make_run(tmp_path / "s42", {"base": 0.4, "final": 0.6}, cfg=cfg(42, "cuda:0", 10))
    b = _make_run(tmp_path / "s43", {"base": 0.4, "final": 0.5}, cfg=cfg(43, "cuda:1", 5))
    rows = compare([a, b], tmp_path / "out", seeds_mean=True)[1].read_text().splitlines()[2:]
    assert len(rows) == 1 and rows[0].startswith("| s42 (+1 seed) |")
    assert "42: 0.600, 43: 0.500" in rows[0]


def test_compare_rows_of_runs_with_the_same_directory_name_can_be_told_apart(tmp_path):
    """runs/<method>/seed42 layouts: every row and legend entry was labelled 'seed42'."""
    a = _make_run(tmp_path / "outcome" / "seed42", {"base": 0.3, "final": 0.5})
    b = _make_run(tmp_path / "lowlr" / "seed42", {"base": 0.3, "final": 0.7})
    c = _make_run(tmp_path / "other", {"base": 0.3, "final": 0.4})
    rows = compare([a, b, c], tmp_path / "out")[1].read_text().splitlines()[2:]
    labels = [r.split("|")[1].strip() for r in rows]
    assert labels == ["outcome/seed42", "lowlr/seed42", "other"]


def test_compare_places_a_stale_final_eval_of_an_extended_run_where_it_was_taken(tmp_path):
    """A run of 8 iterations resumed with train.iterations=12: while session 2 runs, eval/final is still the one
    taken at iteration 8. It was put at the last logged iteration (10), replacing the step-10 evaluation."""
    recs = [{"iteration": 0, "time/elapsed_s": 1.0, "eval/overall/shapes_strict": 0.3}]
    recs += [{"iteration": i, "nfe/sampling": 10 * i, "train/loss": 0.0, "time/elapsed_s": 1.0 + i}
             for i in range(1, 9)]
    recs[4]["eval/overall/shapes_strict"] = 0.4  # step-4
    recs.append({"iteration": 8, "time/elapsed_s": 10.0, "eval/overall/shapes_strict": 0.5})  # final of session 1
    recs += [{"iteration": i, "nfe/sampling": 10 * i, "train/loss": 0.0, "time/elapsed_s": 1.0 * (i - 8)}
             for i in (9, 10)]
    recs[-1]["eval/overall/shapes_strict"] = 0.7  # step-10
    cfg = {"train": {"groups_per_iter": 2, "group_size": 4, "iterations": 12}, "credit": {"name": "outcome"}}
    d = _make_run(tmp_path / "r", {"base": 0.3, "step-4": 0.4, "final": 0.5, "step-10": 0.7}, recs, cfg=cfg)
    c = run_curve(d)
    assert c["iterations"] == [0, 4, 8, 10] and c["value"] == [0.3, 0.4, 0.5, 0.7]
    assert c["nfe"] == [0.0, 40.0, 80.0, 100.0] and c["rollouts"] == [0, 32, 64, 80]


def test_compare_wall_time_adds_up_the_sessions_of_a_resumed_run(tmp_path):
    """`time/elapsed_s` restarts at 0 in a resumed session; the table showed only the last session's time."""
    from flowalign.compare import run_curve

    # session 1 logged iterations 1-2 (a resume drops what was logged after its checkpoint), session 2 did 3-4
    recs = [{"iteration": i, "nfe/sampling": 10 * i, "time/elapsed_s": 100.0 * i} for i in (1, 2)]
    recs += [{"iteration": i, "nfe/sampling": 10 * i, "time/elapsed_s": 100.0 * (i - 2)} for i in (3, 4)]
    d = _make_run(tmp_path / "r", {"base": 0.3, "final": 0.5}, recs)
    assert run_curve(d)["wall_s"] == pytest.approx(200.0 + 200.0)


def test_compare_does_not_call_a_later_evaluation_the_base(tmp_path):
    """Without a base evaluation (eval.before off) the first point is step-N, not the base model."""
    from flowalign.compare import compare

    recs = [{"iteration": i, "nfe/sampling": 10 * i, "time/elapsed_s": 1.0 * i} for i in (1, 2, 3, 4)]
    d = _make_run(tmp_path / "nb", {"step-2": 0.4, "final": 0.5}, recs)
    _png, md = compare([d], tmp_path / "out")
    row = md.read_text().splitlines()[2].split("|")
    assert row[6].strip() == "–" and row[8].strip() == "–"  # base and Δ unknown
    assert row[7].strip() == "0.500"


def test_compare_does_not_put_the_final_evaluation_at_the_base(tmp_path):
    """Without metrics.jsonl the last logged iteration was 0, so eval/final landed on iteration 0 and silently
    replaced the base value: the table showed base = final and Δ = +0.000."""
    from flowalign.compare import compare, run_curve

    d = tmp_path / "r"
    for label, v in (("base", 0.3), ("final", 0.5)):
        (d / "eval" / label).mkdir(parents=True)
        (d / "eval" / label / "summary.json").write_text(json.dumps({"overall": {"shapes_strict": v}}))
    (d / "config.yaml").write_text(yaml.safe_dump({"train": {"groups_per_iter": 2, "group_size": 4, "iterations": 5},
                                                   "credit": {"name": "outcome"}}))
    c = run_curve(d)
    assert c["iterations"] == [0, 5] and c["value"] == [0.3, 0.5] and c["rollouts"] == [0, 40]
    row = compare([d], tmp_path / "out")[1].read_text().splitlines()[2].split("|")
    assert row[6].strip() == "0.300" and row[8].strip() == "+0.200"


def test_the_y_label_names_the_runs_eval_prompt_set(tmp_path, monkeypatch):
    """The plots' y axis names the prompt set the runs were evaluated on (data.eval_prompts), not always shapes-bench."""
    from flowalign.compare import y_label

    a = _run(tmp_path / "a", "outcome", {"base": 0.3, "final": 0.5}, (10, 0))
    assert run_curve(a)["prompt_set"] == "shapes-bench"  # unset: the config's default
    cfg = yaml.safe_load((a / "config.yaml").read_text())
    cfg["data"] = {"eval_prompts": "geneval"}
    (a / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert y_label([run_curve(a)], "shapes_strict") == "geneval shapes_strict"
    b = _run(tmp_path / "b", "outcome", {"base": 0.3, "final": 0.5}, (10, 0))
    cfg["data"] = {"eval_prompts": str(tmp_path / "prompts" / "mine.txt")}
    (b / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert y_label([run_curve(a), run_curve(b), run_curve(a)], "shapes_strict") == "geneval, mine.txt shapes_strict"
    import matplotlib.axes

    seen = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda ax, text, *a, **k: seen.append(text))
    compare([a], tmp_path / "out")
    assert seen == ["geneval shapes_strict"] * 2  # both plots


# ------------------------------------------------------------------------------------ evaluations of several models


def _eval_dir(d, scores, steps=12, seed_offset=0, tasks=("a", "a", "b")):
    """A `flowalign eval` output: one record per (prompt, sample), scores[i][k] of prompt i, its task from ``tasks``."""
    from flowalign.evaluate import summarize

    d.mkdir(parents=True)
    recs = [{"prompt": f"p{i}", "task": tasks[i], "prompt_index": i, "sample": k, "seed": 100 * i + k + seed_offset,
             "shapes_strict": float(v)} for i, row in enumerate(scores) for k, v in enumerate(row)]
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summ = summarize(recs, ["shapes_strict"])
    summ["settings"] = {"steps": steps, "model": "shapes", "overall": "groups", "seed": 0}
    (d / "summary.json").write_text(json.dumps(summ))
    return d


def test_compare_evaluations_tabulates_each_models_change_with_a_paired_interval(tmp_path, capsys):
    base = _eval_dir(tmp_path / "base", [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    lora = _eval_dir(tmp_path / "lora", [[1, 0, 1, 1], [1, 1, 0, 1], [0, 0, 0, 1]], steps=10)
    assert main(["compare", str(base), str(lora), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert "settings that differ: steps: 12 / 10" in md
    # task a: 0.25 -> 0.75 (+0.5); task b: 0 -> 0.25; overall (mean over tasks): 0.125 -> 0.5
    assert "| a | 0.250 | 0.750 (+0.500 [" in md and "| **overall** | 0.125 | 0.500 (+0.375 [" in md
    assert capsys.readouterr().out == md


def test_compare_refuses_evaluations_of_other_images_or_seeds_and_mixed_kinds(tmp_path, capsys):
    base = _eval_dir(tmp_path / "base", [[0, 1], [1, 0], [0, 0]])
    fewer = _eval_dir(tmp_path / "fewer", [[0, 1], [1, 0]], tasks=("a", "a"))
    reseeded = _eval_dir(tmp_path / "reseeded", [[0, 1], [1, 0], [0, 0]], seed_offset=7)
    out = tmp_path / "cmp"
    _fails(capsys, ["compare", str(base), str(fewer), "--out", str(out)], "cannot be compared image for image",
           "different images")
    _fails(capsys, ["compare", str(base), str(reseeded), "--out", str(out)], "different noise seeds")
    _fails(capsys, ["compare", str(base), "--out", str(out)], "at least two evaluation directories")
    _fails(capsys, ["compare", str(base), str(base), "--reward", "shapes_partial", "--out", str(out)],
           "'shapes_partial' is not scored", "shapes_strict")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train: {}\n")
    _fails(capsys, ["compare", str(base), str(run), "--out", str(out)], "is not an evaluation directory")
    other = _eval_dir(tmp_path / "other", [[0, 1], [1, 0], [0, 0]])  # the same jobs and seeds, other prompts
    recs = [json.loads(x) for x in (other / "results.jsonl").read_text().splitlines()]
    (other / "results.jsonl").write_text("".join(json.dumps(dict(r, prompt="q" + r["prompt"])) + "\n" for r in recs))
    _fails(capsys, ["compare", str(base), str(other), "--out", str(out)], "different prompts")
    images = _eval_dir(tmp_path / "images", [[0, 1], [1, 0], [0, 0]])  # summarised over images, not tasks
    summ = json.loads((images / "summary.json").read_text())
    summ["settings"]["overall"] = "images"
    (images / "summary.json").write_text(json.dumps(summ))
    _fails(capsys, ["compare", str(base), str(images), "--out", str(out)], "averages its overall over images")
    assert not out.exists()


def test_compare_evaluations_of_one_prompt_per_task_has_no_interval(tmp_path, capsys):
    base = _eval_dir(tmp_path / "base", [[0, 0], [1, 0]], tasks=("a", "b"))
    lora = _eval_dir(tmp_path / "lora", [[1, 1], [1, 1]], tasks=("a", "b"))
    assert main(["compare", str(base), str(lora), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| a | 0.000 | 1.000 (+1.000 [n/a]) |" in md and "| **overall** | 0.250 | 1.000 (+0.750 [n/a]) |" in md
    assert ")*" not in md  # no interval, no claim


def test_compare_png_draws_no_error_bar_where_the_interval_is_na(tmp_path, monkeypatch):
    """An n/a interval was drawn as a zero-height error bar, which reads as the interval [0, 0]; it now gets no bar
    and the text "n/a" above the model's bar, while known intervals keep theirs."""
    import matplotlib.axes

    bars, texts = [], []
    real_errorbar = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda ax, x, y, **k: (bars.append(list(x)), real_errorbar(ax, x, y, **k))[1])
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda ax, x, y, s, **k: texts.append((x, s)))
    # task a has two prompts (an interval), task b one (n/a), and overall is n/a with it
    base = _eval_dir(tmp_path / "base", [[0, 0], [1, 0], [0, 1]], tasks=("a", "a", "b"))
    lora = _eval_dir(tmp_path / "lora", [[1, 1], [1, 1], [1, 1]], tasks=("a", "a", "b"))
    assert main(["compare", str(base), str(lora), "--out", str(tmp_path / "cmp")]) == 0
    assert len(bars) == 1 and len(bars[0]) == 1  # task a's bar only
    assert [s for _, s in texts] == ["n/a", "n/a"]  # task b and overall
    assert bars[0][0] < texts[0][0] < texts[1][0]  # at a, then b, then overall


def _as_steered(d, method="best_of_n", eta=0.7):
    summ = json.loads((d / "summary.json").read_text())
    summ["settings"].update(steer_rewards={"shapes_partial": 1.0}, method=method, eta=eta)
    (d / "summary.json").write_text(json.dumps(summ))
    return d


def test_steered_outputs_pair_by_prompt_and_other_pairs_keep_the_seed_check(tmp_path, capsys):
    """A steered directory in the list turned the seed check off for every pair: two plain evaluations of other seeds
    were then compared image for image. And `steer --method none` with the ODE draws the evaluation's own images."""
    base = _eval_dir(tmp_path / "base", [[0, 1], [1, 0], [0, 0]])
    reseeded = _eval_dir(tmp_path / "reseeded", [[0, 1], [1, 0], [0, 0]], seed_offset=7)
    steered = _as_steered(_eval_dir(tmp_path / "bon", [[1, 1], [1, 0], [0, 1]], seed_offset=3))
    out = tmp_path / "cmp"
    _fails(capsys, ["compare", str(base), str(reseeded), str(steered), "--out", str(out)], "different noise seeds")
    assert main(["compare", str(base), str(steered), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "Steered outputs (bon)" in md and "on the same prompts (reference" in md
    plain = _as_steered(_eval_dir(tmp_path / "none", [[0, 1], [1, 0], [0, 0]]), method="none", eta=0.0)
    assert main(["compare", str(base), str(plain), "--out", str(tmp_path / "cmp2")]) == 0
    assert "Steered outputs" not in (tmp_path / "cmp2" / "compare.md").read_text()
    _fails(capsys, ["compare", str(reseeded), str(plain), "--out", str(tmp_path / "cmp3")], "different noise seeds")


# -------------------------------------------------------- training runs evaluated differently, runs without a log


def _with_eval_settings(d, **settings):
    for p in (d / "eval").glob("*/summary.json"):
        s = json.loads(p.read_text())
        s["settings"] = {"steps": 12, "seed": 0, "seeds_per_prompt": 2, "overall": "groups", **settings}
        p.write_text(json.dumps(s))
    return d


def test_compare_lists_training_runs_evaluated_with_other_settings(tmp_path, caplog):
    """Eval-dir mode listed the settings that differ; training runs evaluated with other steps or seeds were put in
    one table without a word."""
    a = _with_eval_settings(_make_run(tmp_path / "a", {"base": 0.3, "final": 0.5}))
    b = _with_eval_settings(_make_run(tmp_path / "b", {"base": 0.4, "final": 0.6}), steps=3, seeds_per_prompt=1)
    c = _with_eval_settings(_make_run(tmp_path / "c", {"base": 0.3, "final": 0.4}))
    with caplog.at_level("WARNING", logger="flowalign.compare"):
        md = compare([a, b, c], tmp_path / "out")[1].read_text().splitlines()
    assert md[0] == "- eval settings that differ: b: seeds_per_prompt 2 vs 1, steps 12 vs 3 (each against a, first)"
    assert md[2].startswith("| run |") and len(md) == 7  # the line, a blank line, then the table of three runs
    assert any("run b was evaluated with other settings" in r.getMessage() for r in caplog.records)
    # runs evaluated the same way: the table alone, as before
    assert compare([a, c], tmp_path / "out2")[1].read_text().splitlines()[0].startswith("| run |")


def test_compare_of_a_run_without_metrics_says_its_cost_is_unknown(tmp_path):
    """A run without metrics.jsonl showed NFE 'nan' and wall time '0'."""
    a = _make_run(tmp_path / "a", {"base": 0.3, "final": 0.5})
    b = _make_run(tmp_path / "b", {"base": 0.3, "final": 0.6},
                  cfg={"train": {"groups_per_iter": 2, "group_size": 4, "iterations": 4}, "credit": {"name": "outcome"}})
    (b / "metrics.jsonl").unlink()
    md = compare([a, b], tmp_path / "out")[1].read_text()
    assert "nan" not in md
    row = md.splitlines()[3].split("|")
    assert row[1].strip() == "b" and row[3].strip() == "32" and row[4].strip() == "–" and row[5].strip() == "–"
    assert "NFE and wall time unknown: no metrics.jsonl in b" in md


@pytest.mark.parametrize("field, change", [
    ("per_task", lambda s: s.__setitem__("per_task", [1, 2])),
    ("per_task.a", lambda s: s["per_task"].__setitem__("a", None)),
    ("pass_at_k.shapes_strict", lambda s: s.__setitem__("pass_at_k", {"shapes_strict": [1, 2]})),
    ("settings.benchmark.overrides", lambda s: s["settings"].__setitem__(
        "benchmark", {"name": "p", "version": 1, "benchmark": False, "overrides": ["steps"]})),
])
def test_compare_of_a_summary_with_a_broken_part_is_one_line(tmp_path, capsys, field, change):
    """A right top-level overall but a broken part elsewhere crashed with a traceback."""
    base = _eval_dir(tmp_path / "base", [[0, 1], [1, 0], [0, 0]])
    other = _eval_dir(tmp_path / "other", [[1, 1], [1, 0], [0, 1]])
    s = json.loads((other / "summary.json").read_text())
    change(s)
    (other / "summary.json").write_text(json.dumps(s))
    out = tmp_path / "cmp"
    _fails(capsys, ["compare", str(base), str(other), "--out", str(out)], f"{other / 'summary.json'}: {field} must be a "
           f"mapping", "re-run the evaluation")
    assert not out.exists()


# -------------------------------------------------------------------- exact contracts of the comparison's numbers


def _row(md, name):
    return next(line for line in md.splitlines() if line.startswith(f"| {name} |"))


def test_compare_evaluations_star_a_significant_change_of_either_sign(tmp_path, capsys):
    """* marks an interval that excludes 0, above or below: a model worse on every prompt is starred too (tasks of 10
    prompts: fewer give an unreliable interval, never starred)."""
    tasks = ("a",) * 10 + ("b",) * 10
    good = _eval_dir(tmp_path / "good", [[1, 1, 1, 1]] * 20, tasks=tasks)
    worse = _eval_dir(tmp_path / "worse", [[0, 0, 0, 0], [0, 0, 1, 0]] * 5 + [[0, 1, 0, 0], [0, 0, 0, 0]] * 5,
                      tasks=tasks)
    same = _eval_dir(tmp_path / "same", [[1, 0, 1, 1]] + [[1, 1, 1, 1]] * 18 + [[1, 1, 0, 1]], tasks=tasks)
    assert main(["compare", str(good), str(worse), "--out", str(tmp_path / "down")]) == 0
    down = (tmp_path / "down" / "compare.md").read_text()
    assert _row(down, "a") == "| a | 1.000 | 0.125 (-0.875 [-0.950, -0.800])* |"
    assert _row(down, "**overall**").endswith(")* |") and _row(down, "b").endswith(")* |")
    assert main(["compare", str(worse), str(good), "--out", str(tmp_path / "up")]) == 0
    assert _row((tmp_path / "up" / "compare.md").read_text(), "a") == "| a | 0.125 | 1.000 (+0.875 [+0.800, +0.950])* |"
    assert main(["compare", str(good), str(same), "--out", str(tmp_path / "flat")]) == 0
    assert ")*" not in (tmp_path / "flat" / "compare.md").read_text()  # an interval holding 0: no star
    capsys.readouterr()


def test_compare_evaluations_average_over_images_when_the_reference_does(tmp_path, capsys):
    """The overall convention is the reference's settings["overall"]: evaluations summarised over images (a
    protocol with overall: images) get the change of the image means (2/12 → 7/12), not of the task means."""
    from flowalign.evaluate import summarize

    dirs = []
    for name, scores in (("base", [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]),
                         ("lora", [[1, 0, 1, 1], [1, 1, 0, 1], [0, 0, 0, 1]])):
        d = _eval_dir(tmp_path / name, scores)
        recs = [json.loads(x) for x in (d / "results.jsonl").read_text().splitlines()]
        summ = summarize(recs, ["shapes_strict"], overall="images")
        summ["settings"] = {"steps": 12, "model": "shapes", "overall": "images", "seed": 0}
        (d / "summary.json").write_text(json.dumps(summ))
        dirs.append(str(d))
    assert main(["compare", *dirs, "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert _row(md, "**overall**").startswith("| **overall** | 0.167 | 0.583 (+0.417 [")  # groups: +0.375
    assert "Overall: the mean over images" in md
    capsys.readouterr()


def test_a_stochastic_steer_without_a_method_pairs_by_prompt(tmp_path, capsys):
    """`steer --method none` with η > 0 draws SDE samples, other images than the ODE's from the same seeds: it is
    compared prompt for prompt (no seed check), as any steered output."""
    base = _eval_dir(tmp_path / "base", [[0, 1], [1, 0], [0, 0]])
    sde = _as_steered(_eval_dir(tmp_path / "sde", [[1, 1], [1, 0], [0, 1]], seed_offset=3), method="none", eta=0.7)
    assert main(["compare", str(base), str(sde), "--out", str(tmp_path / "cmp")]) == 0
    assert "Steered outputs (sde)" in (tmp_path / "cmp" / "compare.md").read_text()
    capsys.readouterr()


def test_nfe_counts_every_phase_but_the_evaluations(tmp_path):
    """NFE = the sum of the cumulative nfe/* counters but nfe/other (the evaluations' forwards)."""
    d = _run(tmp_path / "a", "outcome", {"base": 0.3, "step-2": 0.4, "final": 0.5}, (10, 5))
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    (d / "metrics.jsonl").write_text("".join(json.dumps(dict(r, **{"nfe/other": 1000 * r["iteration"]})) + "\n"
                                             for r in recs))
    assert run_curve(d)["nfe"] == [0.0, 30.0, 60.0]


def test_mean_over_seeds_band_is_the_lowest_and_highest_seed_and_costs_are_means():
    """Per evaluation point: value the mean over seeds, lo/hi the smallest and largest seed's value (the band), and
    rollouts, NFE and wall time the means over the seeds."""
    from flowalign.compare import mean_over_seeds

    def curve(seed, values, rollouts, nfe, wall):
        return {"label": f"s{seed}", "setting": "x", "seed": seed, "iterations": [0, 2, 4], "value": values,
                "rollouts": rollouts, "nfe": nfe, "wall_s": wall}

    runs = [curve(1, [0.4, 0.9, 0.5], [0, 16, 32], [0.0, 20.0, 40.0], 10.0),
            curve(2, [0.4, 0.3, 0.8], [0, 16, 40], [0.0, 30.0, 60.0], 20.0),
            curve(3, [0.4, 0.6, 0.2], [0, 16, 24], [0.0, 40.0, 50.0], 60.0)]
    (m,) = mean_over_seeds(runs)
    assert m["value"] == pytest.approx([0.4, 0.6, 0.5])
    assert m["lo"] == [0.4, 0.3, 0.2] and m["hi"] == [0.4, 0.9, 0.8]
    assert m["rollouts"] == [0, 16, 32] and m["nfe"] == [0.0, 30.0, 50.0] and m["wall_s"] == 30.0
    assert m["seeds"] == [1, 2, 3] and m["finals"] == [0.5, 0.8, 0.2] and m["label"] == "s1 (+2 seeds)"


# ------------------------------------------------------------------ the reward compared by default, errors' order


def test_compare_refusal_names_the_evaluations_in_the_order_of_their_counts(tmp_path, capsys):
    """`compare ev_a st_bon` said "st_bon and ev_a ... (8 vs 4 jobs)" while ev_a held the 8: the names were in the
    other order from the counts."""
    big = _eval_dir(tmp_path / "big", [[0, 1], [1, 0], [0, 0]])  # 6 jobs
    small = _eval_dir(tmp_path / "small", [[0, 1], [1, 0]], tasks=("a", "a"))  # 4 jobs
    _fails(capsys, ["compare", str(big), str(small), "--out", str(tmp_path / "c1")],
           "big and small cannot be compared image for image", "(6 vs 4 (prompt, sample) jobs")
    _fails(capsys, ["compare", str(small), str(_as_steered(big)), "--out", str(tmp_path / "c2")],
           "small and big cannot be compared prompt for prompt", "(4 vs 6 (prompt, sample) jobs")
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()


def _video_run(d, strict, partial):
    """A training run of the video model: its evaluations score shapes_motion_strict first, no shapes_strict."""
    _make_run(d, {})
    for label, (s, p) in (("base", (0.0, 0.1)), ("final", (strict, partial))):
        (d / "eval" / label).mkdir(parents=True)
        (d / "eval" / label / "summary.json").write_text(json.dumps({
            "overall": {"shapes_motion_partial": p, "shapes_motion_strict": s},
            "settings": {"rewards": ["shapes_motion_strict", "shapes_motion_partial"]}}))
    return d


def test_compare_of_training_runs_defaults_to_their_first_evaluation_reward(tmp_path, capsys, caplog):
    """Training runs of the video model were refused without --reward: the default was shapes_strict, which their
    evaluations do not score. It is now the first reward they were evaluated with, as for evaluation directories."""
    a, b = _video_run(tmp_path / "tr1", 0.0, 0.2), _video_run(tmp_path / "tr3", 0.5, 0.3)
    with caplog.at_level("INFO", logger="flowalign.compare"):
        assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| base shapes_motion_strict | final shapes_motion_strict |" in md
    assert md.splitlines()[3].startswith("| tr3 | outcome | 32 | 40 | 4 | 0.000 | 0.500 | +0.500 |")
    assert ("comparing shapes_motion_strict, the first reward of run tr1's evaluations (pass --reward to pick "
            "another: shapes_motion_partial)") in caplog.text
    assert main(["compare", str(a), str(b), "--reward", "shapes_motion_partial", "--out", str(tmp_path / "p")]) == 0
    assert "| tr3 | outcome | 32 | 40 | 4 | 0.100 | 0.300 | +0.200 |" in (tmp_path / "p" / "compare.md").read_text()
    _fails(capsys, ["compare", str(a), str(b), "--reward", "shapes_strict", "--out", str(tmp_path / "q")],
           "--reward 'shapes_strict' is not in the evaluations of run tr1")
    assert not (tmp_path / "q").exists()
    capsys.readouterr()


def test_compare_of_evaluations_logs_the_reward_it_chose_and_how_to_pick_another(tmp_path, capsys, caplog):
    """The default reward (the first one scored) is named in the log with the others --reward can pick."""
    dirs = []
    for name, row in (("base", [0, 1]), ("lora", [1, 1])):
        d = _eval_dir(tmp_path / name, [row, row, row])
        summ = json.loads((d / "summary.json").read_text())
        summ["settings"]["rewards"] = ["shapes_strict", "shapes_partial"]
        (d / "summary.json").write_text(json.dumps(summ))
        dirs.append(str(d))
    with caplog.at_level("INFO", logger="flowalign.compare"):
        assert main(["compare", *dirs, "--out", str(tmp_path / "cmp")]) == 0
    assert ("comparing shapes_strict, the first reward of base's evaluation (pass --reward to pick another: "
            "shapes_partial)") in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="flowalign.compare"):
        assert main(["compare", *dirs, "--reward", "shapes_strict", "--out", str(tmp_path / "cmp2")]) == 0
    assert "comparing" not in caplog.text  # chosen by the user: nothing to explain
    capsys.readouterr()
