"""Euphonium's reward-gradient-guided rollouts as a trainer option (``sampler.guide``; METHODS.md §4.5)."""

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from flowalign import config as C
from flowalign.credit import CreditInput, assign_credit
from flowalign.errors import UserError
from flowalign.samplers import eta_schedule, sample, schedules
from flowalign.values import (RewardGuidance, RewardPRM, make_probe, probe_values_naive, reward_grad_guide)

ROOT = Path(__file__).resolve().parents[1]

SMALL = [
    "train.iterations=2", "train.groups_per_iter=2", "train.group_size=4", "train.micro_batch=8",
    "train.checkpoint_every=0", "sampler.steps=4", "eval.before=false", "eval.after=false",
    "output.tensorboard=false", "train.lr=1e-3", "train.optimizer_steps_per_iter=2", "reward.weights={saturation: 1.0}",
]


class MeanReward:
    """A differentiable toy reward: the mean pixel value."""

    name, differentiable = "mean", True

    def __call__(self, images, prompts, metadata=None):
        return images.flatten(1).mean(1)


class FlatReward(MeanReward):
    differentiable = False


def test_reward_prm_scores_the_clean_estimate_with_its_gradient():
    vel = lambda x, s, c: 0.5 * x  # noqa: E731  (x̂0 = x − σ·v = (1 − σ/2)·x)
    prm = RewardPRM(vel, lambda z: z, {"mean": MeanReward()}, {"mean": 2.0}, probe="x0")
    prm.prompts = ["p"] * 3
    x = torch.randn(3, 4, 2, 2, requires_grad=True)
    sigma = torch.tensor(0.6)
    r = prm(x, sigma, None)  # [3]
    assert torch.allclose(r, 2.0 * (0.7 * x).flatten(1).mean(1))
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.allclose(g, torch.full_like(x, 2.0 * 0.7 / 16))  # d/dx of 2·mean((1 − σ/2)x), D = 16
    lat = RewardPRM(vel, lambda z: z, {"mean": MeanReward()}, {"mean": 1.0}, probe="latent")
    lat.prompts = ["p"] * 3
    assert torch.allclose(lat(x, sigma, None), x.flatten(1).mean(1))  # no generator forward
    prm.prompts = ["p"]
    with pytest.raises(ValueError, match="prompts"):
        prm(x, sigma, None)


def test_reward_grad_guide_rejects_flat_rewards_and_bad_lambda():
    kw = dict(velocity=lambda x, s, c: x, decode=lambda z: z)
    with pytest.raises(ValueError, match="differentiable"):
        reward_grad_guide(rewards={"flat": FlatReward()}, weights={"flat": 1.0}, **kw)
    with pytest.raises(ValueError, match="lam"):
        reward_grad_guide(rewards={"mean": MeanReward()}, weights={"mean": 1.0}, lam=-1.0, **kw)


def test_config_validates_the_guide():
    base = str(ROOT / "configs" / "shapes_grpo.yaml")
    with pytest.raises(UserError, match="reward_grad"):
        C.load_config(base, ["sampler.guide=reward_gard"])  # close match named
    with pytest.raises(UserError, match="plan=chain"):
        C.load_config(base, ["sampler.guide=reward_grad", "sampler.plan=branch"])
    with pytest.raises(UserError, match="guide=none"):
        C.load_config(base, ["sampler.guide_options={lam: 1.0}"])


def _train(tmp, *extra):
    from flowalign.train import train

    return train(C.load_config(str(ROOT / "configs" / "shapes_grpo.yaml"),
                               [*SMALL, f"output.run_dir={tmp}", *extra]))


def _lora(run):
    from safetensors.torch import load_file

    from flowalign.models.lora import WEIGHT_NAME

    return load_file(str(next((run / "checkpoints").glob("step-*")) / "raw" / WEIGHT_NAME))


def _last_metrics(run):
    import json

    return json.loads((run / "metrics.jsonl").read_text().strip().splitlines()[-1])


def test_trainer_guided_rollouts(tmp_path):
    """λ = 0 leaves the run bitwise unchanged; λ > 0 moves rollouts up the reward and feeds the process head."""
    plain = _train(tmp_path / "plain")
    zero = _train(tmp_path / "zero", "sampler.guide=reward_grad", "sampler.guide_options={lam: 0.0}")
    a, b = _lora(plain), _lora(zero)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m0 = _last_metrics(zero)
    assert m0["nfe/guidance"] > 0 and m0["nfe/sampling"] == _last_metrics(plain)["nfe/sampling"]
    strong = _train(tmp_path / "strong", "sampler.guide=reward_grad", "sampler.guide_options={lam: 3000.0}",
                    "credit.name=euphonium")
    ms = _last_metrics(strong)
    assert ms["reward/saturation"] > m0["reward/saturation"] + 0.01  # same seeds, guided up the saturation gradient
    assert ms["credit/process_abs_mean"] > 0  # Euphonium's process head is fed by the guide's PRM scores
    # guided = trained steps (T = 4, train_fraction 0.6: steps 0, 1), one PRM forward each + the last post-state;
    # 2 iterations x 8 rollouts
    assert ms["nfe/guidance"] == 2 * 8 * (2 + 1)


def test_unknown_guide_option_is_one_clear_error_before_any_write(tmp_path):
    with pytest.raises(UserError, match=r"unknown option\(s\) \['lamda'\].*known: rewards, lam"):
        _train(tmp_path / "bad", "sampler.guide=reward_grad", "sampler.guide_options={lamda: 300.0}")
    assert not (tmp_path / "bad").exists()


def test_guidance_in_chunks_equals_the_whole_batch_with_each_rows_prompt():
    """guide_options.chunk bounds the PRM's forward+backward memory; the rows are independent, so the shift and the
    recorded scores are the whole batch's, and each chunk scores its rows with their own prompts."""
    from flowalign.values import RewardGuidance

    class PromptReward(MeanReward):
        def __call__(self, images, prompts, metadata=None):
            scale = torch.tensor([1.0 if p == "a" else -2.0 for p in prompts])
            return scale * images.flatten(1).pow(2).mean(1)

    vel = lambda x, s, c: 0.5 * x + c["c"].view(-1, 1, 1, 1)  # noqa: E731 (per-row conditioning)
    x = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    cond = {"c": torch.arange(5, dtype=torch.float32)}
    out = {}
    for chunk in (None, 2, 1):
        prm = RewardPRM(vel, lambda z: z, {"r": PromptReward()}, {"r": 1.0}, probe="x0")
        prm.prompts = ["a", "b", "a", "b", "b"]
        guide = RewardGuidance(prm, 0.5, steps=[0], chunk=chunk)
        shift = guide(x, vel(x, None, cond), torch.tensor(0.8), torch.tensor(0.6), 0, cond)
        out[chunk] = (shift, guide.scores[0])
    for chunk in (2, 1):
        assert torch.allclose(out[chunk][0], out[None][0], atol=1e-7) and torch.allclose(out[chunk][1], out[None][1])
    with pytest.raises(ValueError, match="chunk"):
        RewardGuidance(prm, 0.5, chunk=0)


@pytest.mark.parametrize("scale_dt", [True, False])
def test_normalized_guidance_is_each_rows_own_unit_gradient(scale_dt):
    """``normalize=True`` divides each row's ∇_x R by that row's own norm: every row's shift has norm exactly
    λ·(σ − σ') (λ with ``scale_dt=False``) and its own gradient's direction, whatever the rows' gradient
    magnitudes (1e-4 … 1e4 apart: a norm over the whole batch, or none, fails); a zero-gradient row stays 0,
    not NaN."""
    prm = lambda z, s, c: -(z - 3.0).pow(2).flatten(1).mean(1)  # noqa: E731  ∇ = −2(z − 3)/D
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-4, 1.0, 1e4, 0.0])  # [B] the last row sits at the PRM's optimum: ∇ = 0
    x = 3.0 + scales.view(-1, 1, 1, 1) * torch.randn(4, 3, 2, 2, generator=g)  # [B, 3, 2, 2]
    sigma, sigma_next = torch.tensor(0.8), torch.tensor(0.6)
    lam = 2.5
    guide = RewardGuidance(prm, lam, steps=[1], scale_dt=scale_dt, normalize=True)
    shift = guide(x, torch.zeros_like(x), sigma, sigma_next, 1, {})  # [B, 3, 2, 2]
    coef = lam * (0.8 - 0.6) if scale_dt else lam
    grad = (-2.0 * (x - 3.0) / 12).flatten(1).double()  # [B, D] the analytic ∇_x R
    norms = shift.flatten(1).double().norm(dim=1)  # [B]
    assert norms[:3].tolist() == pytest.approx([coef] * 3, rel=1e-5)
    want = coef * grad[:3] / grad[:3].norm(dim=1, keepdim=True)  # [3, D]
    assert torch.allclose(shift.flatten(1)[:3].double(), want, rtol=1e-5, atol=1e-7 * coef)
    assert torch.equal(shift[3], torch.zeros_like(shift[3]))  # 0/‖0‖ is clamped: a zero row, finite
    # without normalize the magnitudes follow the gradients (the test's rows really differ 1e8-fold)
    raw = RewardGuidance(prm, lam, steps=[1], scale_dt=scale_dt)(x, torch.zeros_like(x), sigma, sigma_next, 1, {})
    r = raw.flatten(1).norm(dim=1)  # [B]
    assert float(r[2] / r[0]) > 1e7 and torch.allclose(raw.flatten(1).double(), coef * grad, rtol=1e-5)


# ----------------- guided rollouts in the Gaussian world: guided steps, Euphonium's process head, the probe engine

from gaussian_world import gaussian_world_velocity as gw_velocity  # noqa: E402  (exact; batch-invariant)

T = 6


def score(z, rows):
    return {"r": -(z - 2.0).pow(2).mean(1) + 0.3 * torch.sin(4 * z).mean(1)}


def _rollout(eta, b=8, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    cond = {"c": torch.tensor([[-0.3] * 3, [0.4] * 3])}
    ci = torch.arange(b) // (b // 2)
    return sample(gw_velocity, torch.randn(b, 3, generator=g), schedules.sd3_diffusers(T), cond, eta=eta,
                  kernel="flow_sde", generator=g, cond_index=ci, group=ci, keep_velocities=True, **kw)


@pytest.mark.parametrize("index, reads", [("post", "next"), ("pre", "this"), ("gain", "both")])
def test_euphonium_pra_probe_requests_only_the_states_its_index_reads(index, reads):
    """METHODS §5.3.5 (probe only what is trained): with ``pra_probe`` the process head probed the pre- *and*
    post-state of every trained step whatever ``pra_index`` read, e.g. V_full(x_0) (T − 1 forwards a row) for "post"."""
    tr = _rollout(eta_schedule(T, 0.7))
    term = score(tr.final, None)
    probe = make_probe(gw_velocity, tr, score, terminal=term)
    asked = []

    def spy(mode, mask):
        asked.append(mask.clone())
        return probe(mode, mask)

    trained = torch.zeros(8, T, dtype=torch.bool)
    trained[:, [0, 2, 3]] = True  # not contiguous: pre- and post-states differ
    inp = CreditInput(traj=tr, rewards=term, reward_weights={"r": 1.0}, trained=trained, probe=spy)
    got = assign_credit("euphonium", inp, {"pra_probe": "ode:full", "pra_index": index, "heads": "pra"}).advantages
    want_mask = torch.zeros(8, T + 1, dtype=torch.bool)
    if reads in ("next", "both"):
        want_mask[:, 1:] |= trained
    if reads in ("this", "both"):
        want_mask[:, :-1] |= trained
    want_mask[:, T] = False  # x_T is the terminal reward, never probed
    assert len(asked) == 1 and torch.equal(asked[0], want_mask)
    # the head itself is unchanged: the same as from precomputed reference values of every state
    ref = probe_values_naive(gw_velocity, tr, torch.ones(8, T + 1, dtype=torch.bool), "ode:full", score)
    ref["r"][:, T] = term["r"]
    full = assign_credit("euphonium", dataclasses.replace(inp, probe=None, values=ref),
                         {"pra_probe": "ode:full", "pra_index": index, "heads": "pra"}).advantages
    assert torch.allclose(got, full, atol=1e-6) and bool((got[:, [0, 2, 3]] != 0).any())


def test_negative_guided_steps_are_refused_not_silently_unguided():
    """``steps: [-4, -3, -2, -1]`` ("the last 4", as Euphonium's script guides) matched no loop index t ≥ 0: the
    rollout was silently unguided and the process head all zeros."""
    prm = lambda z, s, c: -(z - 3.0).pow(2).mean(1)  # noqa: E731
    with pytest.raises(ValueError, match="step indices"):
        RewardGuidance(prm, 1.0, steps=[-4, -3, -2, -1])

    class Diff:
        differentiable = True

        def __call__(self, images, prompts, metadata=None):
            return images.flatten(1).mean(1)

    with pytest.raises(ValueError, match="step indices"):
        reward_grad_guide(velocity=gw_velocity, decode=lambda z: z, rewards={"m": Diff()}, weights={"m": 1.0},
                          steps=[-1])
    RewardGuidance(prm, 1.0, steps=[0, 5])  # valid indices are accepted


def test_guided_steps_past_the_last_step_are_reported(caplog):
    prm = lambda z, s, c: -(z - 3.0).pow(2).mean(1)  # noqa: E731
    guide = RewardGuidance(prm, 1.0, steps=[4, 9])  # T = 6: step 9 does not exist
    tr = _rollout(eta_schedule(T, 0.7), mean_shift=guide)
    with caplog.at_level(logging.WARNING, logger="flowalign.values"):
        ex = guide.credit_extras(tr)
    assert "[9]" in caplog.text and ex["prm_steps"].tolist() == [False] * 4 + [True, False]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_incremental_make_probe_on_guided_random_eta_rollouts_equals_naive(seed):
    """make_probe over several partial masks (cache, ODE-skip past random η = 0 steps and a guided step, dedupe,
    chunking, terminal reuse) equals the one-probe-at-a-time reference for every probe mode."""
    g = torch.Generator().manual_seed(100 + seed)
    eta = (torch.rand(T, generator=g) < 0.5).float() * 0.7
    guide = RewardGuidance(lambda z, s, c: -(z - 3.0).pow(2).mean(1), 2.0, steps=[int(torch.randint(T, (1,),
                                                                                                   generator=g))])
    tr = _rollout(eta, seed=seed, mean_shift=guide)
    term = score(tr.final, None)
    for mode in ("x0", "ode:2", "ode:full", "ode2:1"):
        masks = [torch.rand(8, T + 1, generator=g) < 0.4 for _ in range(3)]
        full = masks[0] | masks[1] | masks[2]
        probe = make_probe(gw_velocity, tr, score, terminal=term if seed % 2 else None, max_batch=3, score_batch=5)
        for m in masks:
            probe(mode, m)
        got = probe(mode, full)["r"]
        ref = probe_values_naive(gw_velocity, tr, full, mode, score)["r"]
        assert torch.equal(torch.isnan(got), ~full)
        assert torch.allclose(got[full], ref[full], atol=1e-6), mode
