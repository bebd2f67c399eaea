"""G²RPO (Granular-GRPO, METHODS.md §4.7): coarsened completion grids in the probe engine and the multi-granularity
advantage on branched rollouts, in the one trainer."""

import json

import pytest
import torch

from flowalign import config as C
from flowalign.credit import CreditInput, assign_credit, group_normalize
from flowalign.errors import UserError
from flowalign.samplers import eta_schedule, schedules
from flowalign.samplers.plans import PLANS, subgrid
from flowalign.values import make_probe, probe_nfe, probe_values_naive

from cli_checks import no_model  # noqa: F401,E402  (the fixture is used by name)
from test_credit_methods import T, gaussian_world_velocity, score  # noqa: E402  (conftest puts tests/ on sys.path)


def test_strided_grids_cover_every_lambda_th_index_and_end_at_T():
    assert subgrid(0, 10, None, 2) == [0, 2, 4, 6, 8, 10]
    assert subgrid(1, 10, None, 2) == [1, 3, 5, 7, 9, 10]  # the last step is shorter
    assert subgrid(3, 10, None, 4) == [3, 7, 10] and subgrid(9, 10, None, 5) == [9, 10]
    assert subgrid(4, 10, None, 1) == list(range(4, 11))
    with pytest.raises(ValueError, match="either m sub-steps or a stride"):
        subgrid(0, 10, 2, 2)
    with pytest.raises(ValueError, match="stride must be"):
        subgrid(0, 10, None, 0)


class _Velocity:
    """The Gaussian world's exact velocity with a forward counter (rows per call)."""

    def __init__(self):
        self.rows = 0

    def __call__(self, x, sigma, cond):
        self.rows += int(x.shape[0])
        return gaussian_world_velocity(x, sigma, cond)


def _branched(kids=4, seed=0):
    sig = schedules.sd3_diffusers(T)
    cond = {"c": torch.tensor([[-0.3] * 3, [0.4] * 3])}
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(seed))
    ci = torch.tensor([0, 0, 1])
    tr = PLANS["branch"](gaussian_world_velocity, x, sig, cond, cond_index=ci, group=ci, eta=eta_schedule(T, 0.7),
                         generator=torch.Generator().manual_seed(seed + 1), children=kids, keep_velocities=True)
    rew = score(tr.final, None)
    trained = (tr.eta > 0)[None].expand(tr.batch_size, -1) & tr.extras["trained"]
    return tr, rew, trained


def test_granular_advantage_is_the_sum_of_per_grid_sibling_z_scores():
    tr, rew, trained = _branched()
    vel = _Velocity()
    inp = CreditInput(traj=tr, rewards=rew, reward_weights={"r": 1.0}, trained=trained,
                      probe=make_probe(vel, tr, score, terminal=rew))
    credit = assign_credit("granular", inp, {"strides": [1, 2, 3]})
    k = tr.extras["branch_step"]
    rows = torch.arange(tr.batch_size)
    # by hand: every child's x_{k+1} completed one probe at a time on the λ-strided native grid, z-scored per
    # sibling set (prompt, seed, k), summed over λ
    want = torch.zeros(tr.batch_size, dtype=torch.float64)
    for lam in (1, 2, 3):
        mask = torch.zeros(tr.batch_size, T + 1, dtype=torch.bool)
        mask[rows, k + 1] = True
        v = probe_values_naive(gaussian_world_velocity, tr, mask, f"ode/{lam}", score)["r"][rows, k + 1]
        want += group_normalize(v.to(torch.float64), tr.group)
    assert torch.allclose(credit.advantages[rows, k].double(), want, atol=1e-4)
    off = torch.ones_like(credit.advantages, dtype=torch.bool)
    off[rows, k] = False
    assert (credit.advantages[off] == 0).all() and credit.weights is None
    for g in tr.group.unique():  # each term is zero-mean over the siblings, so the sum is too
        assert abs(float(credit.advantages[rows, k][tr.group == g].sum())) < 1e-4
    # λ = 1 is the child's own ODE completion: its terminal reward, no forward; λ = 2, 3 cost ⌈(T−k−1)/λ⌉ − 1 each
    # (the child's velocity at x_{k+1}, cached by the plan's completion, is reused)
    want_nfe = sum(probe_nfe(f"ode/{lam}", int(kk) + 1, T) for lam in (2, 3) for kk in k)
    assert vel.rows == want_nfe > 0
    # one granularity of λ = 1 is TempFlow's advantage without the noise weights
    one = assign_credit("granular", inp, {"strides": [1]})
    plain = assign_credit("branch", inp, {"noise_weights": False})
    assert torch.allclose(one.advantages, plain.advantages, atol=1e-6)
    # the grids differ, so the coarse completions change the ranking signal (not a copy of λ = 1)
    assert not torch.allclose(credit.advantages, 3 * one.advantages, atol=1e-3)


def test_granular_needs_a_branched_rollout_and_valid_strides():
    tr, rew, trained = _branched()
    inp = CreditInput(traj=tr, rewards=rew, reward_weights={"r": 1.0}, trained=trained,
                      probe=make_probe(gaussian_world_velocity, tr, score, terminal=rew))
    with pytest.raises(ValueError, match="strides must be"):
        assign_credit("granular", inp, {"strides": []})
    chain = PLANS["chain"](gaussian_world_velocity, torch.randn(4, 3), schedules.sd3_diffusers(T),
                           {"c": torch.zeros(1, 3)}, eta=eta_schedule(T, 0.7), cond_index=torch.zeros(4, dtype=torch.long),
                           group=torch.zeros(4, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    inp2 = CreditInput(traj=chain, rewards=score(chain.final, None), reward_weights={"r": 1.0},
                       trained=torch.ones(4, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs a branched rollout"):
        assign_credit("granular", inp2)


def test_config_refuses_granular_and_branch_credit_on_chains_and_bad_strides():
    with pytest.raises(UserError, match="credit.name=granular scores the children of branched rollouts; it needs "
                                        "sampler.plan=branch"):
        C.load_config(None, ["credit.name=granular"])
    with pytest.raises(UserError, match="credit.name=branch .* needs sampler.plan=branch"):
        C.load_config(None, ["credit.name=branch"])
    from flowalign.train import _check_components

    for bad, why in (("[0, 2]", r"expected values in \[1, inf\]"), ("[1.5]", "expected a list of integers"),
                     ("[]", r"strides=\[\]: expected a non-empty list")):
        cfg = C.load_config(None, ["sampler.plan=branch", "credit.name=granular", f"credit.options.strides={bad}"])
        with pytest.raises(UserError, match=why):
            _check_components(cfg)



def test_train_refuses_empty_granular_strides_before_writing(capsys, no_model, tmp_path):
    """`credit.options={strides: []}` passed the per-element range check, wrote config.yaml, loaded the model and
    failed with a ValueError traceback after the first rollout."""
    from cli_checks import fails

    run = tmp_path / "run"
    from pathlib import Path

    config = str(Path(__file__).resolve().parents[1] / "configs" / "shapes_grpo.yaml")
    fails(capsys, ["train", config, "sampler.plan=branch", "credit.name=granular", "credit.options={strides: []}",
                   f"output.run_dir={run}"], "credit.options.strides=[]", "non-empty", "[1, 2, 3]")
    assert not run.exists()


def test_non_empty_marker_is_generic():
    """The option check (``types.option_value_error``, behind every registry's options) reads a ``NonEmpty``
    annotation wherever it stands: no list of option names, and an unmarked list option may be empty."""
    import typing

    from flowalign.credit import CREDIT
    from flowalign.types import Interval, NonEmpty, option_value_error

    strides = typing.get_type_hints(CREDIT["granular"], include_extras=True)["strides"]
    assert option_value_error(strides, []) == "expected a non-empty list, e.g. [1, 2, 3]"
    assert option_value_error(strides, [2]) is None
    bare = typing.Annotated[typing.Sequence[int], Interval(0), NonEmpty()]
    assert option_value_error(typing.Optional[bare], []) == "expected a non-empty list"
    assert option_value_error(typing.Optional[bare], None) is None
    unmarked = typing.Annotated[typing.Sequence[int], Interval(0)]  # e.g. tree's prune_steps: () is valid
    assert option_value_error(unmarked, []) is None

def test_trainer_runs_g2rpo_on_policy(tmp_path):
    """The G²RPO recipe in the one trainer: branch in the high-noise half, granular credit; on-policy ratio 1."""
    from flowalign.train import train
    from test_train_update import _cfg

    cfg = _cfg(tmp_path / "run", "sampler.plan=branch", "sampler.plan_options.children=4",
               "sampler.plan_options.branch_steps=all", "sampler.train_fraction=0.5", "credit.name=granular",
               "train.group_size=1", "train.iterations=1", "train.micro_batch=1000", "train.filter_zero_std=false",
               "train.shuffle_transitions=false", "train.optimizer_steps_per_iter=1")
    d = C.derived(cfg)
    run = train(cfg)
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert m["rollouts/iteration"] == d["rollouts_per_iter"] and m["train/transitions"] == d["transitions_per_iter"]
    assert abs(m["train/ratio_mean"] - 1) < 1e-5 and m["train/clipfrac_high"] == 0
    assert m["nfe/probing"] > 0


def test_tempflow_weights_use_each_steps_own_noise_level():
    """TempFlow-GRPO (METHODS.md §4.3): with a per-step a [T], s_k is the kernel std at step k with a_k (not a_0)."""
    from flowalign.credit import tempflow_weights
    from flowalign.samplers.kernels import flow_sde

    sig = schedules.sd3_diffusers(T)
    a = torch.tensor([0.3, 0.5, 0.7, 0.9, 1.1, 0.0])  # [T]
    ks = [1, 2, 3, 4]
    s = torch.stack([flow_sde(torch.zeros(1, 1), torch.zeros(1, 1), sig[k], sig[k + 1], a[k]).std.reshape(-1)[0]
                     for k in ks]).double()  # [4]
    assert torch.allclose(tempflow_weights(sig, a, ks).double(), s / s.mean(), atol=1e-6)


def test_branch_weights_are_the_candidate_weights_at_each_rows_own_step():
    """``branch`` credit: w_k = s_k / mean over the plan's candidate steps (``extras["branch_candidates"]``), read at
    each row's branch step k, also when only some candidates were drawn (``branch_steps`` random)."""
    from flowalign.credit import tempflow_weights
    from flowalign.types import Trajectory

    k = torch.tensor([1, 1, 3, 3])  # [4] the drawn branch steps, of candidates 0 … 4
    trained = torch.zeros(4, T, dtype=torch.bool)
    trained[torch.arange(4), k] = True
    sig = schedules.sd3_diffusers(T)
    traj = Trajectory(latents=torch.zeros(4, T + 1, 2), sigmas=sig, eta=torch.full((T,), 0.7),
                      log_probs=torch.zeros(4, T), cond={"c": torch.zeros(1, 2)},
                      cond_index=torch.zeros(4, dtype=torch.long), group=torch.tensor([0, 0, 1, 1]), prompts=("p",),
                      extras={"branch_step": k, "branch_candidates": torch.arange(5),
                              "branch_eta": torch.full((T,), 0.7), "trained": trained})
    inp = CreditInput(traj=traj, rewards={"r": torch.tensor([0.0, 1.0, 2.0, 5.0])}, reward_weights={"r": 1.0},
                      trained=trained)
    w = assign_credit("branch", inp).weights  # [4, T]
    want = tempflow_weights(sig, 0.7, range(5))  # [5]
    assert torch.allclose(w[torch.arange(4), k], want[k]) and bool((w[~trained] == 1).all())
