"""`flowalign compare`: eval points placed at the right rollouts and cumulative NFE, table and plot written."""

from __future__ import annotations

import json

import pytest
import yaml

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
