"""Second review of the measuring commands (`bench credit`, `bench grad-snr`, `compare`): figures that could be
silently wrong (NaN rewards ranked as the best value, an undefined cosine reported as 0, unequal split halves
read with the equal-halves formula, a final evaluation placed at iteration 0)."""

from __future__ import annotations

import json
import math

import torch
import yaml


# ------------------------------------------------------------------------------------------- bench credit


def test_spearman_does_not_rank_a_nan_reward_as_the_largest_value():
    """A NaN value was ranked last by argsort (the largest), giving a finite ρ (−0.4 here) that entered the mean;
    like a constant side, a non-finite one makes the (group, state) pair undefined, so it is skipped."""
    from flowalign.bench_credit import spearman

    nan = float("nan")
    assert math.isnan(spearman(torch.tensor([1.0, nan, 2.0, 0.5]), torch.tensor([1.0, 2.0, 3.0, 4.0])))
    assert math.isnan(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, float("inf"), 1.0])))
    # finite inputs are unchanged (ties get average ranks, as scipy.stats.spearmanr)
    assert abs(spearman(torch.tensor([1.0, 1.0, 2.0, 0.5]), torch.tensor([1.0, 2.0, 3.0, 4.0])) + 0.316227766) < 1e-6


# ---------------------------------------------------------------------------------------------- grad-snr


def test_split_half_cosine_is_undefined_not_zero_without_a_gradient():
    """All-zero advantages (e.g. a reward that is constant in every group) give two zero gradients; torch's
    cosine_similarity returns 0 for them, which the bench printed as c = +0.000, 'no signal detected'."""
    from flowalign.bench_snr import group_halves, split_half_cosine

    w = group_halves(4, 2, splits=3, seed=0)  # [3, 2, 8]
    grads = torch.randn(1, 8, 5, generator=torch.Generator().manual_seed(0))  # [S, B, D]
    assert torch.isnan(split_half_cosine(grads, torch.zeros(8, 2), [0], w)).all()
    # one half without gradient: undefined as well; a split with both halves non-zero stays finite
    adv = torch.zeros(8, 2)
    adv[:2, 0] = 1.0  # only group 0 has credit
    c = split_half_cosine(grads, adv, [0], w)
    assert torch.isnan(c).all()
    assert torch.isfinite(split_half_cosine(grads, torch.ones(8, 2), [0], w)).all()


def test_group_halves_are_equal_for_an_odd_number_of_groups():
    """With 3 groups the halves held 2 groups and 1 group, but the bench read the cosine with the equal-halves
    formula n(1 − c)/c and n = B // 2 (a size neither half had)."""
    from flowalign.bench_snr import group_halves

    w = group_halves(3, 2, splits=20, seed=0)  # [20, 2, 6]
    sizes = (w > 0).sum(2)  # [20, 2]
    assert (sizes == 2).all()
    for s in range(20):
        assert not ((w[s, 0] > 0) & (w[s, 1] > 0)).any()
        for k in range(2):
            per_group = (w[s, k] > 0).view(3, 2).sum(1)
            assert ((per_group == 0) | (per_group == 2)).all()  # whole groups only
    assert ((group_halves(6, 4, splits=5, seed=0) > 0).sum(1) == 1).all()  # even counts: every rollout, as before


def test_grad_snr_reports_no_gradient_and_the_true_half_size(monkeypatch, capsys, tmp_path):
    """A constant reward gives no gradient at all: reported as such, not as c = +0.000 'no signal'; with an odd
    number of groups the printed rollouts per half are the halves' real size."""
    import flowalign.rewards as R
    from flowalign.bench_snr import bench_grad_snr

    class Constant:
        name, differentiable = "constant", False

        def __call__(self, images, prompts, metadata=None):
            return torch.full((images.shape[0],), 0.5)

    monkeypatch.setattr(R, "build_reward", lambda name, **kw: Constant())
    out = tmp_path / "snr.json"
    bench_grad_snr(["--prompts", "3", "--groups-per-prompt", "1", "--group-size", "2", "--steps", "3",
                    "--train-fraction", "0.5", "--methods", "flow_grpo", "--splits", "3", "--threads", "1",
                    "--lora-rank", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert "(2 per half)" in text  # 3 groups of 2: each half is 1 group = 2 rollouts (was "3 per half")
    row = next(ln for ln in text.splitlines() if ln.startswith("flow_grpo"))
    assert "no gradient" in row and "+0.000" not in row
    res = json.loads(out.read_text())
    assert res["per_half"] == 2 and math.isnan(res["methods"]["flow_grpo"]["cos"])
    assert res["methods"]["flow_grpo"]["rollouts_for_c_half"] is None


# ------------------------------------------------------------------------------------------------ compare


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
