"""Review of the BranchGRPO tree plan's config checks (s19b): combinations that used to pass ``validate`` and then
failed (a traceback in the first rollout, after the model load and the base evaluation) or trained silently wrong."""

import pytest

from flowalign import config as C

from test_train_update import _cfg  # noqa: E402  (conftest puts tests/ on sys.path)


def test_tree_credit_needs_the_tree_plan():
    """credit.name=tree reads extras['node'] of a tree rollout: with the chain plan it raised ValueError mid-run."""
    with pytest.raises(C.UserError, match="sampler.plan=tree"):
        _cfg("unused", "credit.name=tree")


def test_tree_plan_needs_the_tree_credit():
    """A tree trains each shared edge once, on its first leaf (extras['trained']): a per-row credit such as outcome
    would credit a shared edge with that one leaf's terminal advantage, silently ignoring its siblings."""
    with pytest.raises(C.UserError, match="credit.name=tree"):
        _cfg("unused", "sampler.plan=tree")
    _cfg("unused", "sampler.plan=tree", "credit.name=tree")  # the documented pair is accepted


def test_tree_split_noise_scale_is_checked_before_anything_loads():
    """CPS's std is not proportional to η, so the plan refuses split_noise_scale != 1 with it, and a
    scale <= 0 is refused too; both used to pass the config and fail in the first rollout."""
    tree = ("sampler.plan=tree", "credit.name=tree")
    with pytest.raises(C.UserError, match="split_noise_scale"):
        _cfg("unused", *tree, "sampler.kernel=cps", "sampler.plan_options.split_noise_scale=4.0")
    _cfg("unused", *tree, "sampler.kernel=cps")  # the default scale 1 leaves the kernel's noise alone
    for bad in ("0", "-2.0", "nan"):
        with pytest.raises(C.UserError, match="split_noise_scale"):
            _cfg("unused", *tree, f"sampler.plan_options.split_noise_scale={bad}")
    _cfg("unused", *tree, "sampler.kernel=dance_sde", "sampler.plan_options.split_noise_scale=4.0")
