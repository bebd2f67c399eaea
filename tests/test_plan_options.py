"""sampler.plan_options values are checked against the plan's and the kernel's annotations (types and ranges) when
a config is checked, before anything is written: one line naming the option, the expected range, plan and kernel."""

import pytest
import torch

from flowalign import config as C
from flowalign.errors import UserError
from flowalign.train import _check_components, option_value_error
from flowalign.types import Interval


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
