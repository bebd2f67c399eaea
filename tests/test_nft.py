"""DiffusionNFT (train.objective=nft): the loss's properties and the objective in the one trainer."""

import json
from pathlib import Path

import pytest
import torch

from flowalign import config as C
from flowalign.errors import UserError
from flowalign.loss import gaussian_kl, nft_loss, nft_optimality, nft_positive_only, nft_self_distill, velocity_kl

ROOT = Path(__file__).resolve().parents[1]


def _vel(seed, n=5, shape=(3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *shape), generator=g) for _ in range(3)]


@pytest.mark.parametrize("beta", [0.3, 1.0, 2.0])
def test_nft_gradient_at_the_old_policy_points_to_positives_and_away_from_negatives(beta):
    v_old, v, _ = _vel(0)
    r = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    v_theta = v_old.clone().requires_grad_(True)
    nft_loss(v_theta, v_old, v, r, beta).sum().backward()
    d = v_old[0].numel()
    expect = -2 * beta * (2 * r - 1).view(-1, 1, 1, 1) * (v - v_old) / d
    torch.testing.assert_close(v_theta.grad, expect, rtol=1e-5, atol=1e-7)
    assert v_theta.grad[2].abs().max() < 1e-7  # r = ½: no improvement direction


def test_nft_minimiser_and_plain_flow_matching_limit():
    v_old, v, v_theta = _vel(1)
    r, beta = torch.tensor([0.1, 0.3, 0.6, 0.8, 0.95]), 0.7
    best = (v_old + (2 * r - 1).view(-1, 1, 1, 1) * (v - v_old) / beta).requires_grad_(True)
    nft_loss(best, v_old, v, r, beta).sum().backward()
    assert best.grad.abs().max() < 1e-6
    # r = 1, β = 1: the loss is the flow-matching MSE of v_θ, whatever v_old is
    ones = torch.ones(v.shape[0])
    torch.testing.assert_close(nft_loss(v_theta, v_old, v, ones, 1.0), (v_theta - v).pow(2).flatten(1).mean(1))


def test_nft_adaptive_weighting_rescales_the_gradient_at_the_old_policy():
    """At v_θ = v_old both branch errors have magnitude |v − v_old|, so the adaptive weight t/mean|v − v_old| only
    rescales each row's uniform gradient; away from it the two branches are weighted differently."""
    v_old, v, v_theta = _vel(3)
    r, t, beta = torch.tensor([0.0, 0.3, 0.5, 0.8, 1.0]), torch.tensor([0.05, 0.2, 0.5, 0.7, 0.95]), 0.8
    grads = []
    for w in ("uniform", "adaptive"):
        x = v_old.clone().requires_grad_(True)
        nft_loss(x, v_old, v, r, beta, t=t, weighting=w).sum().backward()
        grads.append(x.grad)
    scale = (t / (v - v_old).abs().flatten(1).mean(1)).view(-1, 1, 1, 1)
    torch.testing.assert_close(grads[1], grads[0] * scale, rtol=1e-5, atol=1e-8)
    moved = nft_loss(v_theta, v_old, v, r, beta, t=t, weighting="adaptive")
    assert torch.isfinite(moved).all() and not torch.allclose(moved, nft_loss(v_theta, v_old, v, r, beta) * scale.flatten())


def test_nft_weighting_choices_are_the_registry():
    import typing

    from flowalign.loss import NFT_WEIGHTINGS

    hint = typing.get_type_hints(C.TrainConfig)["nft_weighting"]
    assert set(typing.get_args(hint)) == set(NFT_WEIGHTINGS)


def test_lr_schedules_are_the_registry_and_cosine_decays_from_one():
    import math
    import typing

    from flowalign.loss import LR_SCHEDULES

    assert set(typing.get_args(typing.get_type_hints(C.TrainConfig)["lr_schedule"])) == set(LR_SCHEDULES)
    cos = [LR_SCHEDULES["cosine"](it, 4) for it in range(4)]
    assert cos[0] == 1.0 and cos[2] == pytest.approx(0.5) and all(a > b > 0 for a, b in zip(cos, cos[1:]))
    assert cos[3] == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))  # the last iteration still learns
    assert [LR_SCHEDULES["constant"](it, 4) for it in range(4)] == [1.0] * 4


def test_nft_optimality_probability():
    a = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 7.0])
    torch.testing.assert_close(nft_optimality(a), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


def test_positive_only_optimality_fits_the_better_samples_and_ignores_the_rest():
    import typing

    from flowalign.loss import NFT_OPTIMALITY

    assert set(typing.get_args(typing.get_type_hints(C.TrainConfig)["nft_optimality"])) == set(NFT_OPTIMALITY)
    a = torch.tensor([-3.0, -0.2, 0.0, 0.1, 4.0])
    r = nft_positive_only(a)
    torch.testing.assert_close(r, torch.tensor([0.5, 0.5, 0.5, 1.0, 1.0]))
    # at v_θ = v_old the rows with A ≤ 0 give no gradient; those with A > 0 give plain flow matching's
    v_old, v, _ = _vel(3)
    theta = v_old.clone().requires_grad_(True)
    nft_loss(theta, v_old, v, r, 1.0).sum().backward()
    d = v_old[0].numel()
    assert theta.grad[:3].abs().max() == 0
    torch.testing.assert_close(theta.grad[3:], -2 * (v - v_old)[3:] / d)


def test_self_distillation_control_is_plain_flow_matching_whatever_the_advantage():
    a = torch.tensor([-3.0, -0.2, 0.0, 0.1, 4.0])
    r = nft_self_distill(a)
    torch.testing.assert_close(r, torch.ones(5))
    # with β = 1 the loss is ‖v_θ − v‖² row by row: its gradient ignores v_old and the advantages entirely
    v_old, v, theta0 = _vel(4)
    theta = theta0.clone().requires_grad_(True)
    loss = nft_loss(theta, v_old, v, r, 1.0)
    torch.testing.assert_close(loss, (theta0 - v).pow(2).flatten(1).mean(1))
    loss.sum().backward()
    torch.testing.assert_close(theta.grad, 2 * (theta0 - v) / v[0].numel())


def test_velocity_kl_is_the_gaussian_step_kl_up_to_its_constant():
    """Means x + dt·v under one std s: KL = dt²·velocity_kl/(2s²) exactly; zero iff the velocities agree."""
    x, v, v_ref = _vel(2)
    dt, s = -0.1, torch.full((5,), 0.3)
    kl = gaussian_kl(x + dt * v, x + dt * v_ref, s, torch.full((5,), dt))
    torch.testing.assert_close(kl, dt ** 2 * velocity_kl(v, v_ref) / (2 * s ** 2))
    assert velocity_kl(v, v).abs().max() == 0


SMALL = [
    "train.iterations=2", "train.groups_per_iter=2", "train.group_size=4", "train.micro_batch=8",
    "train.checkpoint_every=1", "train.keep_checkpoints=0", "sampler.steps=4", "eval.steps=4", "eval.max_prompts=2",
    "eval.seeds_per_prompt=1", "eval.grid_prompts=2", "output.tensorboard=false", "train.nft_times=2",
    "eval.before=false", "eval.after=false", "train.optimizer_steps_per_iter=2", "train.filter_zero_std=false",
]


def test_nft_trains_on_ode_samples_with_counted_forwards(tmp_path):
    from safetensors.torch import load_file

    from flowalign.models.lora import WEIGHT_NAME
    from flowalign.train import train

    cfg = C.load_config(str(ROOT / "configs" / "shapes_nft.yaml"), [*SMALL, f"output.run_dir={tmp_path / 'run'}"])
    run = train(cfg)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = 2 * 4 * 2  # every sample (filter off) x nft_times
    for it, m in enumerate(lines, 1):
        assert m["train/nft_rows"] == rows and m["train/skipped_updates"] == 0 and "train/nft_loss" in m
        # sampling: 8 ODE rollouts x 4 steps; training: v_old once + one forward per optimizer step, per row
        assert m["nfe/sampling"] == it * 8 * 4 and m["nfe/training"] == it * rows * (1 + 2)
        # from the samples NFT fits (they were 0: read off GRPO's mask of trained transitions, empty for ODE rollouts)
        assert m["train/kept_fraction"] == 1.0  # filter_zero_std=false keeps every sample
        assert m["credit/main_abs_mean"] > 0 or m["reward/zero_std_ratio"] == 1.0
    sd = load_file(str(run / "checkpoints" / "step-2" / "raw" / WEIGHT_NAME))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in sd.items())


@pytest.mark.parametrize("override, fitted", [(None, 4.0), (1.0, 1.0)])
def test_nft_guidance_picks_the_fitted_velocity_and_leaves_the_rollouts_guided(tmp_path, monkeypatch, override, fitted):
    """train.nft_guidance sets the CFG scale of every update forward (v_old and the fitted v_θ); rollouts keep
    model.guidance (4), also after an update, when the next iteration samples."""
    from flowalign.models.shapes import ShapesModel
    from flowalign.train import train

    calls = []  # (grad enabled, guidance scale) of every velocity call, in order
    velocity = ShapesModel.velocity

    def spy(self, x, sigma, cond):
        calls.append((torch.is_grad_enabled(), self.guidance_scale))
        return velocity(self, x, sigma, cond)

    monkeypatch.setattr(ShapesModel, "velocity", spy)
    extra = [] if override is None else [f"train.nft_guidance={override}"]
    cfg = C.load_config(str(ROOT / "configs" / "shapes_nft.yaml"),
                        [*SMALL, *extra, "train.optimizer_steps_per_iter=1", f"output.run_dir={tmp_path / 'run'}"])
    train(cfg)
    fits = [g for grad, g in calls if grad]
    first_fit = next(i for i, (grad, _) in enumerate(calls) if grad)
    assert len(fits) == 4 and set(fits) == {fitted}  # 16 rows in 2 micro-batches, 1 optimizer step, 2 iterations
    assert calls[0] == (False, 4.0)  # the first rollout step
    assert (False, 4.0) in calls[first_fit:]  # the second iteration's rollouts: the scale was restored
    assert (False, fitted) in calls[:first_fit]  # v_old at the update's scale, before the first fit


def test_self_distillation_in_the_trainer_ignores_the_reward(tmp_path):
    """train.nft_optimality=self: every sample is fitted with r = 1, so two runs that differ only in their reward end
    with bitwise equal LoRA weights (and those weights did move)."""
    from safetensors.torch import load_file

    from flowalign.models.lora import WEIGHT_NAME
    from flowalign.train import train

    weights = []
    for i, reward in enumerate(("{shapes_strict: 1.0}", "{jpeg_compressibility: 1.0}")):
        cfg = C.load_config(str(ROOT / "configs" / "shapes_nft.yaml"),
                            [*SMALL, "train.iterations=1", "train.nft_optimality=self", f"reward.weights={reward}",
                             f"output.run_dir={tmp_path / str(i)}"])
        run = train(cfg)
        m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert m["train/nft_r_mean"] == 1.0 and m["train/nft_rows"] == 2 * 4 * 2  # every sample, nft_times 2
        weights.append(load_file(str(run / "checkpoints" / "step-1" / "raw" / WEIGHT_NAME)))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights[0].items())


def test_nft_kl_to_the_reference_costs_one_forward_per_row_and_starts_at_zero(tmp_path):
    from flowalign.train import train

    cfg = C.load_config(str(ROOT / "configs" / "shapes_nft.yaml"),
                        [*SMALL, "train.beta_kl=1.0", "train.optimizer_steps_per_iter=1", f"output.run_dir={tmp_path / 'run'}"])
    run = train(cfg)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = 2 * 4 * 2
    for it, m in enumerate(lines, 1):  # v_old and v_ref once per row, one forward per optimizer step
        assert m["nfe/training"] == it * rows * (2 + 1)
    assert lines[0]["train/kl"] == 0.0  # the LoRA starts at zero: v_θ = v_ref on the first step
    assert lines[1]["train/kl"] > 0.0


def test_nft_with_equal_rewards_leaves_the_weights_alone(tmp_path):
    """All advantages 0 → r = ½ everywhere → zero gradient at v_θ = v_old; with zero-std filtering no rows at all."""
    from safetensors.torch import load_file

    from flowalign.models.lora import WEIGHT_NAME
    from flowalign.train import train

    cfg = C.load_config(str(ROOT / "configs" / "shapes_nft.yaml"),
                        [*SMALL, "train.iterations=1", "train.filter_zero_std=true", "train.weight_decay=0",
                         "reward.weights={jpeg_compressibility: 0.0}", f"output.run_dir={tmp_path / 'run'}"])
    run = train(cfg)
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert m["train/nft_rows"] == 0
    sd = load_file(str(run / "checkpoints" / "step-1" / "raw" / WEIGHT_NAME))
    assert all(v.abs().sum() == 0 for k, v in sd.items() if "lora_B" in k)


@pytest.mark.parametrize("override, needle", [
    ("credit.name=dense_gain", "credit.name=outcome"),
    ("train.beta_kl=-0.1", "beta_kl"),
    ("train.nft_beta=0", "nft_beta"),
    ("train.nft_times=0", "nft_times"),
    ("train.objective=dpo", "objective"),
    ("train.nft_optimality=best", "nft_optimality"),
    ("train.lr_schedule=linear", "lr_schedule"),
    ("train.nft_guidance=-1", "nft_guidance"),
])
def test_nft_config_errors_are_one_line(override, needle):
    with pytest.raises(UserError) as e:
        cfg = C.load_config(str(ROOT / "configs" / "shapes_nft.yaml"), [override])
        C.validate(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_nft_resume_is_exact(tmp_path, schedule):
    """Stop after iteration 1, resume to 2: LoRA bitwise equal to the uninterrupted run (the update's (t, ε) draws
    are seeded by (seed, iteration, rank), v_old comes from the restored weights). With the cosine schedule the
    resumed iteration must run at half the learning rate, not at the one the optimizer state was saved with."""
    from safetensors.torch import load_file

    from flowalign.models.lora import WEIGHT_NAME
    from flowalign.train import train

    def run(name, *extra):
        cfg = C.load_config(str(ROOT / "configs" / "shapes_nft.yaml"),
                            [*SMALL, f"output.run_dir={tmp_path / name}", f"train.lr_schedule={schedule}", *extra])
        return train(cfg)

    full = run("full")
    run("cut", "train.iterations=1")
    cut = run("cut", "output.resume=true")
    a = load_file(str(full / "checkpoints" / "step-2" / "raw" / WEIGHT_NAME))
    b = load_file(str(cut / "checkpoints" / "step-2" / "raw" / WEIGHT_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2] and lines[1]["nfe/sampling"] == 2 * 8 * 4  # continued, not redone
    lr = C.load_config(str(ROOT / "configs" / "shapes_nft.yaml"), []).train.lr
    assert lines[1]["train/lr"] == pytest.approx(lr * (0.5 if schedule == "cosine" else 1.0))


def test_nft_inf_reward_never_reaches_the_weights(tmp_path, monkeypatch):
    import sys

    from safetensors.torch import load_file

    from flowalign import rewards as R
    from flowalign.models.lora import WEIGHT_NAME
    from flowalign.train import train

    monkeypatch.setitem(R.REWARDS, "inf_test", "tests.reward_fixtures:InfEverySecondCall")
    sys.path.insert(0, str(ROOT))
    cfg = C.load_config(str(ROOT / "configs" / "shapes_nft.yaml"),
                        [*SMALL, "reward.weights={inf_test: 1.0}", f"output.run_dir={tmp_path / 'run'}"])
    run = train(cfg)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["train/skipped_updates"] == 2 and lines[1]["train/skipped_updates"] == 0
    sd1 = load_file(str(run / "checkpoints" / "step-1" / "raw" / WEIGHT_NAME))
    sd2 = load_file(str(run / "checkpoints" / "step-2" / "raw" / WEIGHT_NAME))
    assert all(v.abs().sum() == 0 for k, v in sd1.items() if "lora_B" in k)
    assert any(v.abs().sum() > 0 for k, v in sd2.items() if "lora_B" in k)


def test_nft_noise_is_fresh_or_the_rollouts_own_initial_noise():
    """train.nft_noise: `fresh` is the draw the update always made (so default runs are unchanged); `initial` takes
    each row's ε from its rollout's first state x_1 and draws nothing, so x_t = (1 − t)·x_0 + t·x_1 lies on the
    straight line from the noise that produced the sample (rectified flow's reflow coupling); `path` puts every row
    on a state the rollout visited (t = its σ)."""
    from flowalign.loss import NFT_NOISE
    from flowalign.types import Trajectory

    g = torch.Generator().manual_seed(0)
    lat = torch.randn(3, 5, 2, 4, 4, generator=g)  # [B, T+1, *latent]
    traj = Trajectory(latents=lat, sigmas=torch.linspace(1, 0, 5), eta=torch.zeros(4), log_probs=torch.zeros(3, 4),
                      cond={}, cond_index=torch.arange(3), group=torch.arange(3), prompts=("a", "b", "c"))
    rows = torch.tensor([2, 0, 2, 1])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    t = torch.tensor([0.5, 0.2, 0.9, 0.4])
    t1, eps = NFT_NOISE["fresh"](traj, rows, t, g1)
    assert t1 is t and torch.equal(eps, torch.randn((4, 2, 4, 4), generator=g2))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    t1, eps = NFT_NOISE["initial"](traj, rows, t, g1)
    assert t1 is t and torch.equal(eps, lat[rows, 0])
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # nothing drawn
    # path: x_t = (1 − t)·x_0 + t·ε is a state the rollout visited, at its σ, for every row
    t1, eps = NFT_NOISE["path"](traj, rows, t, torch.Generator().manual_seed(1))
    xt = (1 - t1.view(-1, 1, 1, 1)) * lat[rows, -1] + t1.view(-1, 1, 1, 1) * eps  # [N, *latent]
    for i, b in enumerate(rows.tolist()):
        k = int((traj.sigmas - t1[i]).abs().argmin())
        assert k < 4 and torch.allclose(xt[i], lat[b, k], atol=1e-5)


def test_nft_path_noise_draws_every_step_of_the_rollout_uniformly():
    """``nft_noise=path``: each row's step is k ~ U{0 … T−1} (loss.nft_path_noise), so t = σ_k takes every step's σ,
    the first (x_1, t = σ_0) included and the final sample (σ_T = 0) never, each with frequency about 1/T."""
    from flowalign.loss import NFT_NOISE
    from flowalign.types import Trajectory

    lat = torch.randn(2, 5, 1, 2, 2, generator=torch.Generator().manual_seed(0))  # [B, T+1, *latent], T = 4
    sig = torch.tensor([1.0, 0.8, 0.5, 0.25, 0.0])  # [T+1]
    traj = Trajectory(latents=lat, sigmas=sig, eta=torch.zeros(4), log_probs=torch.zeros(2, 4), cond={},
                      cond_index=torch.arange(2), group=torch.arange(2), prompts=("a", "b"))
    rows = torch.arange(2).repeat(2000)  # [4000]
    t, eps = NFT_NOISE["path"](traj, rows, torch.full((4000,), 0.5), torch.Generator().manual_seed(3))
    k = (t[:, None] - sig[None, :4]).abs().argmin(1)  # [4000] step index of each row
    assert torch.equal(t, sig[k]) and torch.isfinite(eps).all()
    freq = torch.bincount(k, minlength=4).double() / 4000  # [4]
    assert freq.shape[0] == 4 and (freq - 0.25).abs().max() < 0.03


@pytest.mark.parametrize("filter_zero_std", [True, False])
def test_nft_update_keeps_the_nonzero_advantage_samples_and_logs_their_rows(monkeypatch, filter_zero_std):
    """_nft_update with train.filter_zero_std drops the samples whose advantage is exactly 0 (positives and negatives
    alike stay: DiffusionNFT, arXiv:2509.16117, pushes negatives away) and repeats each kept sample nft_times times; it logs
    the rows, the kept fraction of samples, r's mean over the rows (½ when there are none) and mean |A| of all samples."""
    from types import SimpleNamespace

    from flowalign import train as T
    from flowalign.values import NFECounter
    from test_train_update import _Lin

    adv = torch.tensor([1.0, 0.0, -0.5, 0.0])  # [B] terminal advantages
    monkeypatch.setattr(T, "terminal_advantage", lambda inp: adv)
    model = _Lin()
    nfe, opt = NFECounter(model), torch.optim.SGD([model.w], lr=0.1)
    final = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))  # [B, D]
    traj = SimpleNamespace(final=final, batch_size=4, cond={"c": torch.zeros(4, 1)}, cond_index=torch.arange(4))
    tr = SimpleNamespace(filter_zero_std=filter_zero_std, nft_times=2, nft_noise="fresh", nft_optimality="clip",
                         micro_batch=3, beta_kl=0.0, optimizer_steps_per_iter=1, nft_beta=1.0, nft_weighting="uniform",
                         max_grad_norm=0.0)
    out = T._nft_update(SimpleNamespace(train=tr), model, opt, traj, {}, None, lambda t: t, nfe,
                        skip=False, inp=None, generator=torch.Generator().manual_seed(1))
    kept = [0, 2] if filter_zero_std else [0, 1, 2, 3]
    r = 0.5 + 0.5 * adv[kept]  # [kept] nft_optimality
    assert out["train/nft_rows"] == 2 * len(kept) and out["train/kept_fraction"] == len(kept) / 4
    assert out["train/nft_r_mean"] == pytest.approx(float(r.mean()))
    assert out["credit/main_abs_mean"] == pytest.approx(0.375) and out["_steps_taken"] == 1
    if not filter_zero_std:
        return
    adv.zero_()  # every group tied: no rows, no step, r's neutral mean
    w = model.w.detach().clone()
    out = T._nft_update(SimpleNamespace(train=tr), model, opt, traj, {}, None, lambda t: t, nfe,
                        skip=False, inp=None, generator=torch.Generator().manual_seed(1))
    assert out["train/nft_rows"] == 0 and out["train/nft_r_mean"] == 0.5 and out["_steps_taken"] == 0
    assert torch.equal(model.w.detach(), w)


def test_nft_with_the_initial_noise_trains_and_differs_from_fresh_noise(tmp_path):
    from safetensors.torch import load_file

    from flowalign.models.lora import WEIGHT_NAME
    from flowalign.train import train

    weights = []
    for noise in ("fresh", "initial", "path"):
        cfg = C.load_config(str(ROOT / "configs" / "shapes_nft.yaml"),
                            [*SMALL, "train.iterations=1", f"train.nft_noise={noise}",
                             f"output.run_dir={tmp_path / noise}"])
        run = train(cfg)
        m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert m["train/nft_rows"] == 2 * 4 * 2 and m["train/skipped_updates"] == 0
        weights.append(load_file(str(run / "checkpoints" / "step-1" / "raw" / WEIGHT_NAME)))
    for other in weights[1:]:
        assert any(not torch.equal(weights[0][k], other[k]) for k in weights[0] if "lora_B" in k)
    with pytest.raises(UserError, match="nft_noise"):
        C.load_config(str(ROOT / "configs" / "shapes_nft.yaml"), ["train.nft_noise=fixed"])
