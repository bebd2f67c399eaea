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


# ------------------------------------------------------------------------------------- ranking and per-group figures


def test_spearman_averages_ties_is_rank_invariant_and_undefined_for_a_constant_side():
    """Spearman ρ = Pearson of average ranks (as scipy.stats.spearmanr): ties on both sides, invariance to any
    strictly monotone map, and NaN (not 0, which would enter the mean as "no agreement") for a constant side."""
    from flowalign.bench_credit import spearman

    # ranks [0, 1.5, 1.5, 3] and [0.5, 0.5, 2.5, 2.5]: centred dot 3, norms √4.5·2 → 1/√2
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 2.0, 2.0])) == pytest.approx(
        2 ** -0.5, abs=1e-9)
    x = torch.tensor([0.3, -1.0, 2.5, 0.7, 1.1])  # [5]
    assert spearman(x, x.exp()) == pytest.approx(1.0, abs=1e-12)
    assert spearman(x, -(x ** 3)) == pytest.approx(-1.0, abs=1e-12)
    assert math.isnan(spearman(x, torch.full((5,), 0.25)))
    assert math.isnan(spearman(torch.ones(3), torch.tensor([1.0, 2.0, 3.0])))


def test_agreement_ranks_members_within_each_group_and_skips_undefined_pairs():
    """``_agreement``: Spearman across the members of one group at one state, for states 0 … T−2 only (state T−1's
    last step is ODE for every mode), pairs with a constant side skipped (not counted as 0), min and count over the
    counted pairs, by-state means over groups."""
    from flowalign.bench_credit import _agreement

    nan = float("nan")
    steps = 4  # T: states 0 … 2 ranked
    cond_index = torch.tensor([0, 0, 0, 1, 1, 1])  # [B] two groups of three
    ref = torch.tensor([[0.0, 0.0, 0.0, 0.0, nan],  # [B, T+1]
                        [1.0, 1.0, 1.0, 1.0, nan],
                        [2.0, 2.0, 2.0, 2.0, nan],
                        [100.0, 5.0, 7.0, 1.0, nan],
                        [200.0, 5.0, 8.0, 2.0, nan],
                        [300.0, 5.0, 9.0, 3.0, nan]])
    vals = torch.tensor([[10.0, 10.0, 10.0, 3.0, nan],  # [B, T+1]
                         [20.0, 20.0, 20.0, 2.0, nan],
                         [30.0, 30.0, 30.0, 1.0, nan],
                         [3.0, 1.0, 1.0, 3.0, nan],  # group 1, state 0: reversed; state 1: ref constant
                         [2.0, 2.0, 2.0, 2.0, nan],
                         [1.0, 3.0, 3.0, 1.0, nan]])
    d = _agreement({"r": vals}, {"r": ref}, cond_index, 2, steps)
    # counted: group 0 at states 0, 1, 2 (ρ = 1), group 1 at state 0 (ρ = −1) and 2 (ρ = 1); state 3 never
    assert d == {"spearman_mean": 0.6, "spearman_min": -1.0, "pairs": 5, "by_state": [0.0, 1.0, 1.0]}
    # a group whose every pair is undefined leaves its states out of the by-state means, not as NaN or 0
    flat = _agreement({"r": vals[:3]}, {"r": torch.ones(3, steps + 1)}, cond_index[:3], 1, steps)  # [3, T+1]
    assert flat["pairs"] == 0 and math.isnan(flat["spearman_mean"]) and all(math.isnan(v) for v in flat["by_state"])


def test_shapes_and_motion_prompts_are_exactly_n_round_robin_over_the_tasks():
    """``_round_robin``: n prompts, the grammar's tasks taken in turn (n = 7 over 6 tasks needs 2 per task; a
    floor there returned 6)."""
    from flowalign.bench_credit import _motion_prompts, _shapes_prompts
    from flowalign.shapes import grammar, motion

    for mod, fn in ((grammar, _shapes_prompts), (motion, _motion_prompts)):
        k = len(mod.TASKS)
        for n in range(1, 2 * k + 2):
            rows = mod.generate_prompts(-(-n // k), seed=3)  # ⌈n/k⌉ prompts per task
            by_task = [[r["prompt"] for r in rows if r["task"] == t] for t in mod.TASKS]
            assert fn(n, seed=3) == [by_task[i % k][i // k] for i in range(n)]  # prompt i: task i mod k


class _HalfConstant:
    """A reward constant for ``prompt`` (zero within-group spread: no GRPO gradient) and image-dependent otherwise."""

    name, differentiable = "half_constant", False

    def __init__(self, prompt: str):
        self.prompt = prompt

    def __call__(self, images, prompts, metadata=None):
        varying = images.float().mean((1, 2, 3))  # [B]
        return torch.where(torch.tensor([p == self.prompt for p in prompts]), torch.full_like(varying, 0.5), varying)


def test_run_method_reports_per_group_costs_and_skips_zero_spread_groups_in_training(monkeypatch):
    """``run_method`` figures are per prompt group (two groups: half the totals); ``nfe_total`` adds sampling,
    probing and guidance; the training forwards count only states of rollouts with a nonzero advantage (the
    trainer's filter_zero_std), so a group with a constant reward costs none; the rollouts' step noise is a stream
    of its own, not the initial noise's generator replayed."""
    import flowalign.samplers.plans as plans
    from flowalign.bench_credit import _Setup, _shapes_prompts, run_method
    from flowalign.models import load_model

    model = load_model("shapes", "")
    prompts = _shapes_prompts(2, seed=3)
    setup = _Setup("shapes", model, {"r": _HalfConstant(prompts[0])}, prompts, "test")
    seen = {}
    real_chain = plans.PLANS["chain"]

    def chain(velocity, noise, sigmas, cond, *, generator, **kw):
        seen.update(noise=noise.clone(), state=generator.get_state().clone())
        return real_chain(velocity, noise, sigmas, cond, generator=generator, **kw)

    monkeypatch.setitem(plans.PLANS, "chain", chain)
    steps, g = 3, 2  # T = 3: steps 0, 1 trained (η = 0 on the last)
    r = run_method(setup, "flow_grpo", steps=steps, group_size=g, children=2, seed=5, max_batch=None)
    assert r["rollouts_per_group"] == g and r["nfe_sampling"] == g * steps and r["reward_calls"] == g
    assert r["x_flow_grpo"] == 1.0 and r["nfe_total"] == g * steps
    # only group 1 has spread: 2 rollouts × 2 trained steps, 4 distinct states, per group (÷ 2)
    assert r["trained_transitions"] == 2.0 and r["nfe_training"] == 2.0
    # initial noise from --seed; the SDE's generator is another stream (the same one would replay x_1 as ξ_0)
    b = len(prompts) * g
    assert torch.equal(seen["noise"], model.init_noise(b, torch.Generator().manual_seed(5)))  # [B, 3, H, W]
    assert not torch.equal(seen["state"], torch.Generator().manual_seed(5).get_state())
    gd = run_method(setup, "euphonium_guided", steps=steps, group_size=g, children=2, seed=5, max_batch=None)
    assert gd["nfe_guidance"] > 0
    assert gd["nfe_total"] == gd["nfe_sampling"] + gd["nfe_probing"] + gd["nfe_guidance"]
    assert gd["x_flow_grpo"] == round(gd["nfe_total"] / (g * steps), 3)


def test_rank_agreement_averages_the_sde_reference_and_splits_it_into_disjoint_halves(monkeypatch):
    """``sde:K``: the reference is the mean of all K completions, its split-half agreement compares completions
    0 … K/2−1 with K/2 … K−1, and each state's values come from that state's own call (merged, not overwritten by
    the other states' NaN). Fake reference values make every figure exact."""
    import flowalign.values as V
    from flowalign.bench_credit import _Setup, _shapes_prompts, rank_agreement
    from flowalign.models import load_model

    steps, g = 3, 3
    member = (torch.arange(2 * g) % g).float()  # [B] index within the group
    nan = float("nan")

    def fine(velocity, traj, mask, score, factor, max_batch=None):
        return {"r": torch.where(mask, member[:, None].expand(-1, steps + 1), nan)}  # [B, T+1] rises with member

    # completions k: −m, 3m | −3m, 2m → first half +m, second half −m/2, all four +m/4, the first alone −m
    coef = torch.tensor([-1.0, 3.0, -3.0, 2.0])

    def sde(velocity, traj, mask, score, *, k, kernel, max_batch=None, seed=0):
        v = coef[:, None, None] * member[None, :, None].expand(k, -1, steps + 1)  # [K, B, T+1]
        return {"r": torch.where(mask[None], v, nan)}

    monkeypatch.setattr(V, "refined_ode_values", fine)
    monkeypatch.setattr(V, "sde_mc_values", sde)
    rew = lambda images, prompts: images.float().mean((1, 2, 3))  # noqa: E731
    setup = _Setup("shapes", load_model("shapes", ""), {"r": rew}, _shapes_prompts(2, seed=11), "test")
    rk = rank_agreement(setup, steps=steps, group_size=g, seed=0, modes=("x0",), max_batch=None,
                        references=[("fine", 2), ("sde", 4)])
    sde_table = rk["references"]["sde:4"]
    halves = sde_table["split-half (2 vs 2)"]
    assert halves == {"spearman_mean": -1.0, "spearman_min": -1.0, "pairs": 4, "by_state": [-1.0, -1.0]}
    assert sde_table["fine:2"] == {"spearman_mean": 1.0, "spearman_min": 1.0, "pairs": 4, "by_state": [1.0, 1.0]}
