"""Evaluation summaries: the pass@k estimator and its per-task summary."""

import itertools
import math

import pytest

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
