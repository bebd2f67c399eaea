"""Euphonium's reward-gradient-guided rollouts as a trainer option (``sampler.guide``; METHODS.md §4.5)."""

from pathlib import Path

import pytest
import torch

from flowalign import config as C
from flowalign.errors import UserError
from flowalign.values import RewardPRM, reward_grad_guide

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
