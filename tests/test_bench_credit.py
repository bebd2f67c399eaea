"""`flowalign bench credit`: measured NFE per credit method on the tiny SD3 pipeline equal the cost model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_checks import fails as _fails, no_model  # noqa: F401  (the fixture is used by name)

from flowalign.bench_credit import RANK_MODES, bench_credit


def test_bench_credit_counts_on_tiny_sd3(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench_credit(["--models", "sd3", "--methods", "flow_grpo,dense_ode2,dense_full,euphonium_x0,euphonium_guided,tempflow_one,g2rpo,dense_stride3",
                       "--rank-groups", "0", "--json", str(out)])
    assert rc == 0
    runs = {r["method"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["flow_grpo"]["nfe_sampling"] == 80 and runs["flow_grpo"]["nfe_probing"] == 0  # T = 10, G = 8
    assert runs["dense_ode2"]["x_flow_grpo"] == 1.9  # one extra forward per probed state (first step reused)
    assert runs["dense_full"]["x_flow_grpo"] == 5.5  # vs 6.5× upstream (METHODS §5.2)
    # every 3rd native step: states 0–8 take 3, 2, 2, 2, 1, 1, 1, 0, 0 extra forwards (first step reused)
    assert runs["dense_stride3"]["x_flow_grpo"] == 2.2 and runs["dense_stride3"]["probe"] == "ode/3"
    assert runs["euphonium_x0"]["x_flow_grpo"] == 1.0 and runs["euphonium_x0"]["probe"] == "x0"
    # guided rollouts: one PRM forward (on x̂0, through the generator) per guided = trained step (9) + the last post-state
    assert runs["euphonium_guided"]["nfe_guidance"] == 80 and runs["euphonium_guided"]["x_flow_grpo"] == 2.0
    assert runs["tempflow_one"]["x_flow_grpo"] < 1.0  # one branching step per seed: fewer forwards than chains
    # G²RPO: 2 seeds × branch steps 0–4 (the high-noise half) × 4 children = 40 children; λ = 2, 3 completions of
    # x_{k+1} cost Σ_k (⌈(9 − k)/λ⌉ − 1) = 14 + 8 forwards per child pair of grids; 3 rewards per child
    g = runs["g2rpo"]
    assert g["rollouts_per_group"] == 40 and g["nfe_probing"] == 8 * 22 and g["reward_calls"] == 120
    assert g["trained_transitions"] == 40 and g["probe"] == "ode/1,2,3"
    # the update re-scores each branch state once: 2 seeds × 5 branch steps, whose 4 children share x_k
    assert g["nfe_training"] == 10
    assert runs["flow_grpo"]["nfe_training"] == runs["flow_grpo"]["trained_transitions"] > 0  # chains share no state
    assert "dense_ode2" in capsys.readouterr().out


def test_bench_credit_runs_on_the_shipped_video_model(tmp_path, capsys):
    """The same methods and probe engine on [C, F, H, W] latents, rewarded by the motion verifier; the ranking block
    measures the video model too."""
    out = tmp_path / "bench.json"
    rc = bench_credit(["--models", "shapes_video", "--methods", "flow_grpo,dense_ode2,euphonium_guided", "--steps", "4",
                       "--group-size", "2", "--rank-groups", "1", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    runs = {r["method"]: r for r in res["runs"]}
    assert runs["flow_grpo"]["nfe_sampling"] == 8 and runs["flow_grpo"]["reward_calls"] == 2  # G·T, G videos scored
    assert runs["dense_ode2"]["x_flow_grpo"] == 1.75  # T = 4: states 0–2 probed, one extra forward each
    assert runs["euphonium_guided"]["nfe_guidance"] == 8  # the guide scores frames: G·(3 guided steps + the last)
    assert set(res["ranking"]["shapes-video"]) == set(RANK_MODES)  # every few-step mode against ode:full
    assert "shapes_motion_partial" in res["notes"]["shapes_video"]
    assert "== shapes-video" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------- NaN rewards


def test_spearman_does_not_rank_a_nan_reward_as_the_largest_value():
    """A NaN value was ranked last by argsort (the largest), giving a finite ρ (−0.4 here) that entered the mean;
    like a constant side, a non-finite one makes the (group, state) pair undefined, so it is skipped."""
    from flowalign.bench_credit import spearman

    nan = float("nan")
    assert math.isnan(spearman(torch.tensor([1.0, nan, 2.0, 0.5]), torch.tensor([1.0, 2.0, 3.0, 4.0])))
    assert math.isnan(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, float("inf"), 1.0])))
    # finite inputs are unchanged (ties get average ranks, as scipy.stats.spearmanr)
    assert abs(spearman(torch.tensor([1.0, 1.0, 2.0, 0.5]), torch.tensor([1.0, 2.0, 3.0, 4.0])) + 0.316227766) < 1e-6


# ------------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, needles", [
    (["--groups", "0"], ["--groups"]),
    (["--group-size", "0"], ["--group-size"]),
    (["--children", "0"], ["--children"]),
    (["--steps", "0"], ["--steps"]),
    (["--max-batch", "0"], ["--max-batch"]),
    (["--rank-groups", "-1"], ["--rank-groups"]),
    (["--models", "shape"], ["'shape'", "shapes"]),  # was skipped silently: exit 0 and an empty table
    (["--rank-reward", "bogus"], ["'bogus'"]),  # was refused only after every cost run
    (["--plot", "ranking.txt"], ["'ranking.txt'", ".png"]),
])
def test_bench_credit_refuses_bad_input_before_loading(capsys, no_model, tmp_path, extra, needles):
    out = tmp_path / "b.json"
    _fails(capsys, ["bench", "credit", "--models", "shapes", "--json", str(out), *extra], *needles)
    assert not out.exists()


def test_bench_credit_does_not_swap_a_wrong_shapes_path_for_a_random_model(capsys, tmp_path):
    """A typo in --shapes-path silently benchmarked a RANDOM-INIT model (exit 0); the fallback is for the
    shipped model only."""
    bad = tmp_path / "nope"
    out = tmp_path / "b.json"
    _fails(capsys, ["bench", "credit", "--models", "shapes", "--methods", "flow_grpo", "--steps", "2", "--group-size",
                    "2", "--rank-groups", "0", "--shapes-path", str(bad), "--json", str(out)], str(bad))
    assert not out.exists()


def test_bench_credit_ranks_against_a_finer_ode_and_the_sde_value(tmp_path, capsys):
    """--rank-references: every mode (ode:full included) against the same ODE on a finer grid and against the mean
    of K SDE completions, with that mean's split-half agreement."""
    out = tmp_path / "bench.json"
    rc = bench_credit(["--models", "shapes", "--methods", "flow_grpo", "--steps", "4", "--group-size", "4",
                       "--rank-groups", "1", "--rank-references", "fine:2,sde:4", "--json", str(out),
                       "--plot", str(tmp_path / "rank.png")])
    assert rc == 0
    assert (tmp_path / "rank.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # one panel per reference
    res = json.loads(out.read_text())
    refs = res["ranking_references"]["shapes"]
    assert set(refs) == {"fine:2", "sde:4"}
    assert set(refs["fine:2"]) == {"ode:full", *RANK_MODES}
    assert set(refs["sde:4"]) == {"ode:full", "fine:2", "split-half (2 vs 2)", *RANK_MODES}
    # measured forwards per rollout, the ranked states 0–2 of T = 4 (state 3's last step is ODE, never ranked):
    # fine:2 = 2·(4 + 3 + 2), sde:4 = 4·(4 + 3 + 2)
    cost = res["reference_cost"]["shapes"]
    assert cost["fine:2"] == {"nfe_per_rollout": 18.0, "x_flow_grpo": 5.5}
    assert cost["sde:4"] == {"nfe_per_rollout": 36.0, "x_flow_grpo": 10.0}
    for table in refs.values():
        for d in table.values():
            assert len(d["by_state"]) == 3 and (math.isnan(d["spearman_mean"]) or -1 <= d["spearman_mean"] <= 1)
    text = capsys.readouterr().out
    assert "ranking agreement with fine:2" in text and "ranking agreement with sde:4" in text



def test_bench_credit_ranks_with_the_reward_it_checked_and_plots_the_named_file(tmp_path, monkeypatch, caplog):
    """--rank-reward was checked by name, then built again after the cost runs; with --models shapes,sd3 (sd3 is
    never ranked) --plot rank.png silently drew rank-shapes.png."""
    import logging

    import flowalign.bench_credit as BC
    import flowalign.rewards.catalog as catalog

    built, ranked_with = [], []
    real_build, real_rank = catalog.build_reward_checked, BC.rank_agreement

    def build(name, kwargs, what=None):
        built.append(real_build(name, kwargs, what))
        return built[-1]

    def rank(setup, **kw):
        ranked_with.append(dict(setup.rewards))
        return real_rank(setup, **kw)

    monkeypatch.setattr(catalog, "build_reward_checked", build)
    monkeypatch.setattr(BC, "rank_agreement", rank)
    out, plot = tmp_path / "b.json", tmp_path / "rank.png"
    with caplog.at_level(logging.INFO, logger="flowalign.bench_credit"):
        assert bench_credit(["--models", "shapes,sd3", "--methods", "flow_grpo", "--steps", "2", "--group-size", "2",
                             "--rank-groups", "1", "--rank-reward", "saturation", "--json", str(out),
                             "--plot", str(plot)]) == 0
    assert len(built) == 1 and ranked_with == [{"saturation": built[0]}]  # the very object built at the checks
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "rank-shapes.png").exists()
    assert json.loads(out.read_text())["plots"] == {"shapes": str(plot)}
    assert f"written to {plot}" in caplog.text

@pytest.mark.parametrize("spec", ["fine:1", "sde:3", "sde", "ode:4", "fine:x"])
def test_bench_credit_refuses_a_bad_rank_reference(capsys, no_model, tmp_path, spec):
    out = tmp_path / "b.json"
    _fails(capsys, ["bench", "credit", "--models", "shapes", "--rank-references", spec, "--json", str(out)], repr(spec))
    assert not out.exists()


def test_bench_credit_runs_the_other_models_when_sd3_is_skipped(tmp_path, monkeypatch, capsys, caplog):
    """Without tests/tiny_models.py (outside a source checkout) `--models shapes,sd3` runs shapes and warns about
    sd3; only when every requested model is skipped is it refused (tests/test_bench_errors.py)."""
    import logging

    import flowalign.bench_credit as BC

    monkeypatch.setattr(BC, "tiny_models_file", lambda: tmp_path / "tests" / "tiny_models.py")
    out = tmp_path / "b.json"
    with caplog.at_level(logging.WARNING, logger="flowalign.bench_credit"):
        assert bench_credit(["--models", "shapes,sd3", "--methods", "flow_grpo", "--steps", "2", "--group-size", "2",
                             "--groups", "1", "--rank-groups", "0", "--json", str(out)]) == 0
    assert "tiny SD3 skipped" in caplog.text and "source checkout" in caplog.text
    result = json.loads(out.read_text())
    assert result["notes"]["sd3"] == "skipped" and [r["method"] for r in result["runs"]] == ["flow_grpo"]
    assert "flow_grpo" in capsys.readouterr().out
