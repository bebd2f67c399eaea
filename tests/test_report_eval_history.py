"""Where the report's evaluation history puts ``eval/final`` (the same rule as ``flowalign compare``)."""

from flowalign.report import _final_eval_iteration


def _iteration(it):
    return {"iteration": it, "rollouts/iteration": 64, "train/lr": 1e-3, "nfe/sampling": 640 * it, "time/iteration_s": 8.0}


def test_final_sits_where_the_end_of_run_evaluation_was_logged():
    base = {"iteration": 0, "time/elapsed_s": 40.0, "eval/overall/shapes_strict": 0.40}
    periodic = {**_iteration(4), "eval/overall/shapes_strict": 0.45}  # a step-N eval shares its iteration's line
    end8 = {"iteration": 8, "time/elapsed_s": 200.0, "eval/overall/shapes_strict": 0.50}  # the first session's end
    records = [base] + [_iteration(i) for i in range(1, 4)] + [periodic] + [_iteration(i) for i in range(5, 9)] + [end8]
    assert _final_eval_iteration(records) == 8.0
    # resumed with train.iterations=12 and not finished yet: eval/final is still the one taken at 8
    assert _final_eval_iteration(records + [_iteration(9), _iteration(10)]) == 8.0
    # finished: the new end-of-run line wins
    end12 = {"iteration": 12, "time/elapsed_s": 90.0, "eval/overall/shapes_strict": 0.55}
    assert _final_eval_iteration(records + [_iteration(i) for i in range(9, 13)] + [end12]) == 12.0
    # no end-of-run line (an older run, or metrics written by hand): the caller's fallback applies
    assert _final_eval_iteration([base, periodic]) is None
