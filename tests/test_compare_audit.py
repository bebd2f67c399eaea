"""`flowalign compare` as a reader sees it: unfinished runs, runs evaluated differently, unreliable intervals, the best
value, what the NFE axis counts."""

from __future__ import annotations

import json

import pytest
import yaml

from flowalign.cli import main
from flowalign.compare import compare


def _run(d, values, *, iterations=None, logged=4, settings=None, nfe=None, credit="outcome", seed=None):
    """A training run: config.yaml, metrics.jsonl of iterations 1..``logged`` (``nfe``: phase -> forwards per
    iteration) and ``eval/<label>/summary.json`` of shapes_strict ``values`` with ``settings``."""
    d.mkdir(parents=True)
    train = {"groups_per_iter": 2, "group_size": 4, **({"iterations": iterations} if iterations else {}),
             **({"seed": seed} if seed is not None else {})}
    (d / "config.yaml").write_text(yaml.safe_dump({"train": train, "credit": {"name": credit}}))
    nfe = nfe or {"sampling": 10}
    recs = [{"iteration": i, **{f"nfe/{k}": n * i for k, n in nfe.items()}, "time/elapsed_s": 1.0 * i}
            for i in range(1, logged + 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for label, v in values.items():
        (d / "eval" / label).mkdir(parents=True)
        summ = {"overall": {"shapes_strict": v}, **({"settings": settings} if settings else {})}
        (d / "eval" / label / "summary.json").write_text(json.dumps(summ))
    return d


def _row(md_text, name):
    return [x.strip() for x in next(r for r in md_text.splitlines() if r.startswith(f"| {name} |")).split("|")[1:-1]]


@pytest.fixture
def figures(monkeypatch):
    """The figures compare saves, for their axes' labels and lines."""
    import matplotlib.figure

    saved, real = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (saved.append(fig),
                                                                                   real(fig, *a, **k))[1])
    return saved


def _unwrapped(text):
    return " ".join(text.split())


# ----------------------------------------------------------- 1. a run stopped before its evaluation after training


def test_a_run_without_an_evaluation_after_training_shows_no_final_and_says_where_it_stopped(tmp_path, figures):
    """A run killed in iteration 2 of 6 (eval/base only) showed its base value as final, Δ +0.000 and 0 rollouts."""
    done = _run(tmp_path / "done", {"base": 0.542, "final": 0.417}, iterations=4)
    killed = _run(tmp_path / "killed", {"base": 0.542}, iterations=6, logged=1)
    md = compare([done, killed], tmp_path / "out")[1].read_text()
    row = _row(md, "killed")
    assert row[2:4] == ["–", "–"]  # no rollouts or forwards led to an evaluated model
    assert row[5:9] == ["0.542", "none after training", "–", "–"]  # base, final, Δ, best
    assert "- killed: no evaluation after training; metrics.jsonl ends at iteration 1 of 6" in md
    assert _row(md, "done")[6:8] == ["0.417", "-0.125"]  # a finished run as before, and no note of its own
    assert "- done:" not in md
    labels = [ln.get_label() for ln in figures[0].axes[0].get_lines()]
    assert labels == ["done: outcome", "killed: outcome (no evaluation after training)"]


def test_a_run_whose_last_evaluation_is_before_its_last_iteration_says_so(tmp_path):
    partial = _run(tmp_path / "partial", {"base": 0.3, "step-2": 0.4}, iterations=6, logged=3)
    md = compare([partial], tmp_path / "out")[1].read_text()
    assert _row(md, "partial")[6:8] == ["0.400", "+0.100"]
    assert ("- partial: last evaluation after iteration 2 of 6 (its final column); metrics.jsonl ends at iteration 3"
            in md)


# ------------------------------------------------------------------------- 2. runs evaluated on other settings


def _settings(prompts, steps, subset=True):
    overrides = {"prompts": {"protocol": "shapes-bench", "used": f"shapes-bench, {prompts} prompts"}} if subset else {}
    return {"steps": steps, "seed": 0, "seeds_per_prompt": 1, "prompts": prompts,
            "max_prompts": prompts if subset else 0, "prompts_sha256": f"sha{prompts}", "overall": "groups",
            "prompt_set": "shapes-bench",
            "benchmark": {"name": "shapes-bench", "version": 1, "benchmark": not subset, "overrides": overrides}}


def test_runs_evaluated_differently_are_dashed_and_named_so_and_the_y_label_says_subset(tmp_path, figures):
    """run2 (12 prompts, 8 steps) was drawn like the 24-prompt runs, under a y label of the whole shapes-bench."""
    a = _run(tmp_path / "run1", {"base": 0.54, "final": 0.42}, settings=_settings(24, 12))
    b = _run(tmp_path / "run2", {"base": 0.50, "final": 0.50}, settings=_settings(12, 8))
    compare([a, b], tmp_path / "out")
    ax = figures[0].axes[0]
    (l1, l2) = ax.get_lines()
    assert l1.get_label() == "run1: outcome" and l1.get_linestyle() == "-"
    assert l2.get_label() == "run2: outcome (evaluated differently: 12 prompts, 8 steps)" and l2.get_linestyle() == "--"
    assert _unwrapped(ax.get_ylabel()) == "shapes-bench (24-prompt subset / 12-prompt subset) shapes_strict"
    compare([a], tmp_path / "one")
    assert _unwrapped(figures[1].axes[1].get_ylabel()) == "shapes-bench (24-prompt subset) shapes_strict"
    whole = _run(tmp_path / "whole", {"base": 0.5, "final": 0.6}, settings=_settings(48, 12, subset=False))
    compare([whole], tmp_path / "all")
    assert figures[2].axes[0].get_ylabel() == "shapes-bench shapes_strict"  # the protocol's whole set


def test_mean_over_seeds_marks_a_setting_evaluated_differently(tmp_path, figures):
    s42 = _run(tmp_path / "s42", {"base": 0.5, "final": 0.6}, settings=_settings(24, 12), seed=42)
    s43 = _run(tmp_path / "s43", {"base": 0.5, "final": 0.4}, settings=_settings(24, 12), seed=43)
    nft = _run(tmp_path / "nft", {"base": 0.5, "final": 0.5}, settings=_settings(12, 12), credit="dense_gain")
    compare([s42, s43, nft], tmp_path / "out", seeds_mean=True)
    (mean, other) = figures[0].axes[1].get_lines()
    assert mean.get_label() == "s42 (+1 seed): outcome" and mean.get_linestyle() == "-"
    assert other.get_label() == "nft: dense_gain (evaluated differently: 12 prompts)" and other.get_linestyle() == "--"


# ---------------------------------------------------------------- 3. intervals from few prompts or of zero width


def _eval_dir(d, scores, tasks):
    from flowalign.evaluate import summarize

    d.mkdir(parents=True)
    recs = [{"prompt": f"p{i}", "task": tasks[i], "prompt_index": i, "sample": k, "seed": 100 * i + k,
             "shapes_strict": float(v)} for i, row in enumerate(scores) for k, v in enumerate(row)]
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summ = summarize(recs, ["shapes_strict"])
    summ["settings"] = {"steps": 12, "model": "shapes", "overall": "groups", "seed": 0}
    (d / "summary.json").write_text(json.dumps(summ))
    return d


def test_intervals_of_few_prompts_or_zero_width_are_marked_unreliable_not_significant(tmp_path, capsys, figures):
    """Two prompts per task gave `+0.500 [+0.500, +0.500]*`: a zero-width interval over 2 prompts, starred."""
    tasks = ("a", "a", "b", "b")
    base = _eval_dir(tmp_path / "base", [[0, 1]] * 4, tasks)
    better = _eval_dir(tmp_path / "better", [[1, 1]] * 4, tasks)  # every prompt +0.5
    assert main(["compare", str(base), str(better), "--out", str(tmp_path / "few")]) == 0
    md = (tmp_path / "few" / "compare.md").read_text()
    assert _row(md, "a") == ["a", "0.500", "1.000 (+0.500 [+0.500, +0.500])†"]
    assert _row(md, "**overall**")[2].endswith("†") and ")*" not in md
    assert "† the interval is unreliable and never starred: fewer than 10 prompts" in md
    # 10 prompts a task, but every prompt changed by as much: zero width, no spread measured
    tasks10 = ("a",) * 10 + ("b",) * 10
    base10 = _eval_dir(tmp_path / "base10", [[0, 1]] * 20, tasks10)
    better10 = _eval_dir(tmp_path / "better10", [[1, 1]] * 20, tasks10)
    assert main(["compare", str(base10), str(better10), "--out", str(tmp_path / "flat")]) == 0
    assert _row((tmp_path / "flat" / "compare.md").read_text(), "a")[2] == "1.000 (+0.500 [+0.500, +0.500])†"
    # 10 prompts a task with a spread: a real interval, starred when it excludes 0
    mixed = _eval_dir(tmp_path / "mixed10", [[1, 1], [1, 0]] * 10, tasks10)
    assert main(["compare", str(base10), str(mixed), "--out", str(tmp_path / "ok")]) == 0
    cell = _row((tmp_path / "ok" / "compare.md").read_text(), "a")[2]
    assert cell.startswith("0.750 (+0.250 [") and cell.endswith(")*"), cell
    capsys.readouterr()


def test_the_png_draws_changes_and_their_intervals_apart_from_the_values(tmp_path, capsys, figures):
    """The interval of the change was drawn around the new model's bar: an accuracy's bars reached 1.25."""
    from matplotlib.container import ErrorbarContainer

    tasks = ("a",) * 10
    base = _eval_dir(tmp_path / "base", [[0, 1], [1, 1]] * 5, tasks)  # 0.75
    lora = _eval_dir(tmp_path / "lora", [[1, 1], [1, 1]] * 5, tasks)  # 1.0, change +0.25 [+0.1, +0.4]
    assert main(["compare", str(base), str(lora), "--out", str(tmp_path / "cmp")]) == 0
    values, changes = figures[0].axes
    assert not [c for c in values.containers if isinstance(c, ErrorbarContainer)]
    assert values.get_ylim()[1] <= 1.06  # bars of at most 1.0, nothing above them
    assert [c for c in changes.containers if isinstance(c, ErrorbarContainer)]
    assert changes.get_ylabel() == "change from base" and "95 % paired-bootstrap interval" in changes.get_title()
    capsys.readouterr()


# ------------------------------------------------------------------------------- 4. best after training


def test_best_is_over_the_evaluations_after_training(tmp_path):
    """A run that only got worse showed its base value as its best."""
    worse = _run(tmp_path / "worse", {"base": 0.6, "step-2": 0.4, "final": 0.5})
    md = compare([worse], tmp_path / "out")[1].read_text()
    assert "| best after training |" in md.splitlines()[0]
    assert _row(md, "worse")[8] == "0.500"


# ------------------------------------------------------------------------------- 6. what the NFE axis counts


def test_the_nfe_axis_names_the_phases_it_sums_and_how_cfg_counts(tmp_path, figures):
    """The axis said "all phases" while the evaluations' forwards (nfe/other) are left out."""
    a = _run(tmp_path / "a", {"base": 0.3, "final": 0.5}, nfe={"sampling": 10, "training": 5, "other": 100})
    compare([a], tmp_path / "out")
    assert _unwrapped(figures[0].axes[1].get_xlabel()) == ("transformer forwards, thousands (sampling + training; no "
                                                           "evaluations; a CFG step counts once)")
    b = _run(tmp_path / "b", {"base": 0.3, "final": 0.5}, nfe={"training": 5, "probing": 7, "sampling": 10})
    compare([a, b], tmp_path / "out2")
    assert "(sampling + probing + training;" in _unwrapped(figures[1].axes[1].get_xlabel())
