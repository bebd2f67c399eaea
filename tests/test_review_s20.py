"""Review of the per-group windows, tree options and ddim_sde commits (243b53e..198d880): regressions for the bugs
found (derived counts vs the trainer, config errors)."""

import json

import pytest
import torch

from flowalign import config as C
from flowalign.errors import UserError

from test_train_update import _cfg


def test_ddim_sde_window_pinned_at_step_zero_counts_what_the_trainer_trains(tmp_path):
    """ddim_sde draws no noise at σ = 1 (live_eta makes step 0 Euler): a window pinned at [0, 2) trains step 1 only,
    and the derived counts (which size the update) must say so."""
    from flowalign.train import train

    cfg = _cfg(tmp_path / "run", "sampler.kernel=ddim_sde", "sampler.window_size=2", "sampler.window_range=[0, 2]",
               "train.iterations=1", "train.filter_zero_std=false", "train.optimizer_steps_per_iter=1")
    d = C.derived(cfg)
    assert d["trained_steps"] == 1
    run = train(cfg)
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert m["train/transitions"] == d["transitions_per_iter"]


def test_ddim_sde_window_holding_only_step_zero_is_refused_in_one_line():
    """A one-step window pinned at step 0 with ddim_sde trains nothing, every iteration: refuse it up front."""
    with pytest.raises(UserError, match="no trained steps.*ddim_sde"):
        _cfg("unused", "sampler.kernel=ddim_sde", "sampler.window_size=1", "sampler.window_range=[0, 1]")


def test_no_trained_steps_error_tells_the_true_cause_for_ddim_sde():
    """floor(0.25 × 4) = 1, but that one step is ddim_sde's noiseless σ = 1 step: the message must not claim the
    floor is 0."""
    with pytest.raises(UserError) as e:
        _cfg("unused", "sampler.kernel=ddim_sde", "sampler.train_fraction=0.25")
    msg = str(e.value)
    assert "= 0;" not in msg and "ddim_sde" in msg and "\n" not in msg


@pytest.mark.parametrize("bad", [3, "12"])
def test_tree_prune_steps_that_are_not_a_list_of_steps_are_refused_in_one_line(bad):
    """credit.options.prune_steps=3 raised "'int' object is not iterable", and "12" silently pruned steps 1 and 2."""
    from flowalign.credit import assign_credit

    from test_tree import _inp, _tree

    tr, *_ = _tree(roots=2, splits=[0, 3, 6])
    ex = tr.extras
    inp = _inp(torch.randn(tr.batch_size, generator=torch.Generator().manual_seed(0)), ex["node"], ex["depth"],
               ex["trained"], tr.group)
    with pytest.raises(ValueError, match="prune_steps must be a list of steps"):
        assign_credit("tree", inp, {"prune_steps": bad})
    assign_credit("tree", inp, {"prune_steps": (4,)})  # a tuple (or list) of steps is fine


def test_trees_refuse_a_kernel_without_noise_at_step_zero():
    """The tree's derived shape assumes candidate steps 0 … n−1 (BranchGRPO splits at 0); ddim_sde has none at σ = 1:
    at T = 10 derived said 8 leaves while the sampler grew 4, at T = 4 training failed after the base evaluation."""
    from flowalign import config as C
    from flowalign.errors import UserError

    with pytest.raises(UserError, match="draws no noise"):
        C.load_config(None, ["sampler.plan=tree", "credit.name=tree", "sampler.kernel=ddim_sde"])


@pytest.mark.parametrize("options, needle", [
    ("{width: best}", "credit.options.width='best': choose one of 'all', 'extremes'"),
    ("{temperature: .nan}", "credit.options.temperature=nan: expected a finite number"),
    ("{prune_steps: '12'}", "expected a list of integers"),
    ("{backup: 2}", "choose one of 'mean', 'softmax'"),
    ("{width: extremes, width_ratio: 0}", "credit.options.width_ratio=0: expected a value in (0, 1]"),
    ("{width_ratio: 1.5}", "expected a value in (0, 1]"),
    ("{backup: softmax, temperature: -1.0}", "credit.options.temperature=-1.0: expected a value in [0, inf]"),
])
def test_bad_credit_option_values_are_one_line_errors_before_anything_is_written(tmp_path, options, needle):
    """Credit option values used to fail only inside the first iteration (a ValueError traceback after the base
    evaluation had written the run directory); the trainer now checks them against the function's annotations."""
    from flowalign.train import train

    cfg = _cfg(tmp_path / "run", "sampler.plan=tree", "credit.name=tree", "sampler.plan_options.split_steps=[0, 1]",
               f"credit.options={options}")
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_option_value_error_reads_the_annotations():
    from typing import Literal, Optional, Sequence

    from flowalign.train import option_value_error as err

    assert err(Literal["a", "b"], "a") is None and "choose one of" in err(Literal["a", "b"], "c")
    assert err(Optional[int], None) is None and err(Optional[int], 3) is None and err(Optional[int], 2.5)
    assert err(float, 1) is None and err(float, True) and err(float, float("inf"))
    assert err(bool, 1) and err(bool, False) is None and err(int, True)
    assert err(Sequence[int], [1, 2]) is None and err(Sequence[int], (3,)) is None and err(Sequence[int], [1.5])
    assert err(dict, {"x": 1}) is None  # not checked here: left to the function


def test_option_ranges_come_from_interval_annotations():
    """Annotated[float, Interval(...)]: the type first, then the range; the credit registry's ranged options carry
    one, so `margin: -1` or `c_ora: 2` is refused before a run as `width_ratio: 0` is."""
    import typing
    from typing import Annotated

    from flowalign.credit import CREDIT
    from flowalign.train import option_value_error as err
    from flowalign.types import Interval

    half_open = Annotated[float, Interval(0.0, 1.0, low_open=True)]
    assert err(half_open, 1.0) is None and err(half_open, 0.5) is None
    assert err(half_open, 0.0) == "expected a value in (0, 1]" and err(half_open, 1.01)
    assert err(half_open, "x") == "expected a finite number"  # the type is checked before the range
    assert str(Interval(0.0)) == "[0, inf]" and str(Interval(high=2, high_open=True)) == "[-inf, 2)"
    for name, option, bad, good in [("win_rate", "margin", -0.1, 0.0), ("euphonium", "c_ora", 2.0, 0.5),
                                    ("euphonium", "c_pra", 0.0, 1.0), ("tree", "width_ratio", 0.0, 1.0),
                                    ("tree", "temperature", -1.0, 0.0)]:
        hint = typing.get_type_hints(CREDIT[name], include_extras=True)[option]
        assert err(hint, bad) and err(hint, good) is None, (name, option)


def test_tree_prune_steps_outside_the_rollout_are_refused_when_the_config_loads():
    """A prune step ≥ sampler.steps used to fail only inside the first iteration's credit, after the base evaluation;
    the config now refuses it in one line, and steps inside the rollout still load."""
    tree = ["sampler.plan=tree", "credit.name=tree", "sampler.kernel=flow_sde", "train.group_size=2",
            "sampler.plan_options={split_steps: [0, 1]}"]
    with pytest.raises(UserError, match=r"prune_steps=\[1, 4\]: \[4\] are not steps 0 … 3 of sampler.steps=4") as e:
        _cfg("unused", *tree, "credit.options={prune_steps: [1, 4]}")
    assert "\n" not in str(e.value)
    _cfg("unused", *tree, "credit.options={prune_steps: [1, 3]}")


@pytest.mark.parametrize("extra, needle", [
    # the branch plan's children: 0 and -2 were reported as "exceeds the 0 (-96) transitions per rank"
    (["sampler.plan=branch", "sampler.plan_options={children: 0}"], "children must be an integer ≥ 1, got 0"),
    (["sampler.plan=branch", "sampler.plan_options={children: -2}"], "children must be an integer ≥ 1, got -2"),
])
def test_branch_children_out_of_range_are_one_line_config_errors(extra, needle):
    with pytest.raises(UserError, match=needle) as e:
        _cfg("unused", *extra)
    assert "\n" not in str(e.value)


def test_tree_credit_refuses_a_negative_temperature_when_called_directly():
    """A negative softmax-backup temperature ran and favoured the less likely children; the trainer refuses it from
    the annotation (above), a direct call from the function's own check."""
    from flowalign.credit import assign_credit

    from test_tree import _inp, _tree

    tr, *_ = _tree(roots=2, splits=[0, 3, 6])
    ex = tr.extras
    inp = _inp(torch.randn(tr.batch_size, generator=torch.Generator().manual_seed(0)), ex["node"], ex["depth"],
               ex["trained"], tr.group)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        assign_credit("tree", inp, {"backup": "softmax", "temperature": -1.0})
    assign_credit("tree", inp, {"backup": "softmax", "temperature": 0.0})  # 0 weighs the children equally
