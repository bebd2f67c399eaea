"""sampler.plan_options values are checked against the plan's and the kernel's annotations (types and ranges) when
a config is checked, before anything is written: one line naming the option, the expected range, plan and kernel."""

import pytest
import torch

from flowalign import config as C
from flowalign.errors import UserError
from flowalign.train import _check_components, option_value_error
from flowalign.types import Interval

from test_train_update import _cfg  # noqa: E402  (conftest puts tests/ on sys.path)


def _check(*overrides):
    _check_components(C.load_config(None, list(overrides)))


@pytest.mark.parametrize("plan,opts,why", [
    ("branch", "{max_batch: 0}", r"sampler.plan_options.max_batch=0: expected a value in \[1, inf\] \(plan 'branch'"),
    ("branch", "{max_batch: 2.5}", "max_batch=2.5: expected an integer"),
    ("branch", "{sigma_1: 1.0}", r"sigma_1=1.0: expected a value in \[0, 1\) \(plan 'branch', kernel 'flow_sde'\)"),
    ("branch", "{sigma_1: abc}", "sigma_1='abc': expected a finite number"),
    ("tree", "{split_noise_scale: 0.0, split_steps: [0, 1]}", "split_noise_scale must be a finite number > 0"),
    ("tree", "{branching: 1, split_steps: [0, 1]}", "branching"),
    ("chain", "{sigma_1: -0.1}", r"sigma_1=-0.1: expected a value in \[0, 1\) \(plan 'chain'"),
])
def test_bad_plan_option_values_are_refused_in_one_line(plan, opts, why):
    extra = ["credit.name=tree"] if plan == "tree" else ["credit.name=branch"] if plan == "branch" else []
    with pytest.raises(UserError, match=why):
        _check(f"sampler.plan={plan}", f"sampler.plan_options={opts}", *extra)


@pytest.mark.parametrize("plan,opts", [
    ("branch", "{children: 4, branch_steps: all, max_batch: 16, sigma_1: 0.9}"),
    ("branch", "{branch_steps: [0, 2]}"),
    ("branch", "{branch_steps: 2}"),
    ("tree", "{split_steps: [0, 3], branching: 3, split_noise_scale: 4.0}"),
    ("chain", "{sigma_1: 0.95}"),
])
def test_good_plan_option_values_pass(plan, opts):
    extra = ["credit.name=tree"] if plan == "tree" else ["credit.name=branch"] if plan == "branch" else []
    _check(f"sampler.plan={plan}", f"sampler.plan_options={opts}", *extra)


def test_list_options_check_every_element_and_tensor_unions_check_the_number():
    from typing import Annotated, Optional, Sequence

    hint = Annotated[Sequence[int], Interval(1)]
    assert option_value_error(hint, [1, 2, 3]) is None
    assert option_value_error(hint, [1, 0]) == "expected values in [1, inf]"
    assert option_value_error(hint, [1, 2.0]) == "expected a list of integers, e.g. [1, 4]"
    union = Optional[Annotated[float, Interval(0.0, 1.0, high_open=True)] | torch.Tensor]
    assert option_value_error(union, None) is None and option_value_error(union, 0.5) is None
    assert option_value_error(union, 1.5) == "expected a value in [0, 1)"
    assert option_value_error(union, torch.tensor(0.3)) is None


# ----------------------------------------------------- credit options and the annotations they are checked against


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


@pytest.mark.parametrize("extra, needle", [
    # the branch plan's children: 0 and -2 were reported as "exceeds the 0 (-96) transitions per rank"
    (["sampler.plan=branch", "sampler.plan_options={children: 0}"], "children must be an integer ≥ 1, got 0"),
    (["sampler.plan=branch", "sampler.plan_options={children: -2}"], "children must be an integer ≥ 1, got -2"),
])
def test_branch_children_out_of_range_are_one_line_config_errors(extra, needle):
    with pytest.raises(UserError, match=needle) as e:
        _cfg("unused", *extra)
    assert "\n" not in str(e.value)
