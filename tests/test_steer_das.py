"""DAS in ``fk_steer`` (METHODS.md §6.4): a guided proposal with its importance correction, tempering, and
``flowalign steer --proposal guided / --temper / --reward-std``.

The exactness checks run in the Gaussian world of tests/test_steer.py: r(x) = x, λ = 3, so the target is the
sampler's own final law N(m_s, v_s) tilted by exp(3x), i.e. N(m_s + 3·v_s, v_s).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_checks import fails, no_model  # noqa: F401  (the fixture is used by name)

from flowalign import steer as S
from flowalign.cli import main
from flowalign.rewards import build_reward
from flowalign.samplers import eta_schedule, sample, schedules
from flowalign.samplers.kernels import gaussian_log_prob, get_kernel

from gaussian_world import gaussian_world_velocity  # noqa: E402
from test_steer import _noise, exact_u, linear_reward  # noqa: E402
from test_steer_cli import PROMPTS, model  # noqa: F401,E402  (the shapes model fixture)

T, LAM = 40, 3.0


@pytest.fixture(scope="module")
def target():
    """Mean of the tilted target, m_s + λ·v_s, from 40,000 plain samples of the sampler."""
    sig = schedules.shifted_linear(T, 1.0)
    plain = sample(gaussian_world_velocity, _noise(40_000, 7), sig, {}, eta=eta_schedule(T, 0.7), kernel="flow_sde",
                   generator=torch.Generator().manual_seed(8), cond_index=torch.zeros(40_000, dtype=torch.long)).final
    return plain.double().mean().item() + LAM * plain.double().var().item()


def _das(k, tilt, **kw):
    """FK with a guided proposal that tilts toward exp(tilt·x) (exact h-transform), weighted toward exp(3x)."""
    sig = schedules.shifted_linear(T, 1.0)
    eta = eta_schedule(T, 0.7)
    guide = S.TiltGuidance(kernel="flow_sde", eta=eta, grad_fn=exact_u(tilt), band=(0.0, 1.0))
    res = S.fk_steer(gaussian_world_velocity, _noise(k, 1), sig, {}, linear_reward(), k=k, lam=LAM,
                     cond_index=torch.zeros(k, dtype=torch.long), eta=eta, potential="diff", proposal=guide,
                     generator=torch.Generator().manual_seed(2), resample_generator=torch.Generator().manual_seed(3),
                     **kw)
    w = torch.softmax(res.log_weight, 0)
    return res, (w * res.final[:, 0].double()).sum().item(), res.final[:, 0].double().mean().item()


def test_proposal_log_ratio_is_the_difference_of_the_two_gaussian_log_densities():
    g = torch.Generator().manual_seed(0)
    mu, shift = torch.randn(5, 3, 4, generator=g), 0.3 * torch.randn(5, 3, 4, generator=g)
    std, xi = torch.tensor(0.4), torch.randn(5, 3, 4, generator=g)
    x_next = mu + shift + std * xi
    want = (gaussian_log_prob(x_next, mu, std, reduce="sum") - gaussian_log_prob(x_next, mu + shift, std, reduce="sum"))
    assert torch.allclose(S.proposal_log_ratio(shift, std, xi), want.double(), atol=1e-4)


def test_a_wrong_proposal_is_corrected_by_its_importance_weights(target):
    """The proposal tilts a third too hard (exp(4x)); its particles land near m + 4·s_d² = 3.0, yet the weighted
    particles estimate the exp(3x) target's mean. Dropping the correction log p − log q lands near 3.75."""
    _, weighted, unweighted = _das(6000, 4.0, steps_s=())  # no resampling: pure importance sampling
    assert unweighted > target + 0.2  # the particles follow the over-tilted proposal
    assert abs(weighted - target) < 0.03, (weighted, target)
    res, weighted, _ = _das(6000, 4.0)  # and with FK's resampling along the way
    assert abs(weighted - target) < 0.03, (weighted, target)
    assert res.resampled.sum() >= 2


def das_weight_spread(a, steps, k=4000):
    """(log-weight std, final particle mean) of DAS with the exact h-transform proposal toward exp(3x), no resampling,
    flow SDE at noise level a: the table of docs/steering.md ("When the guided proposal is exact")."""
    sig = schedules.shifted_linear(steps, 1.0)
    eta = eta_schedule(steps, a)
    guide = S.TiltGuidance(kernel="flow_sde", eta=eta, grad_fn=exact_u(LAM), band=(0.0, 1.0))
    res = S.fk_steer(gaussian_world_velocity, _noise(k, 1), sig, {}, linear_reward(), k=k, lam=LAM, eta=eta,
                     cond_index=torch.zeros(k, dtype=torch.long), potential="diff", steps_s=(), proposal=guide,
                     generator=torch.Generator().manual_seed(2), resample_generator=torch.Generator().manual_seed(3))
    return res.log_weight.double().std().item(), res.final.double().mean().item()


def test_the_h_transform_proposal_is_doobs_at_the_time_reversal_noise_level():
    """At a = √2 the flow SDE's g²/2 = σ/(1−σ) and it is the time reversal of the noising process: the tilt
    guidance's shift (σ/(1−σ) + g²/2)·∇log h is then g²·∇log h, Doob's h-transform, whose path law is the base's
    times h_T/h_0, so the DAS weights p·exp(λ·r)/q are constant up to the step size (log-weight std ∝ 1/T). At
    Flow-GRPO's a = 0.7 the same shift gives the tilted marginals but another path law: the weights keep a spread
    near 1.1 that a finer grid does not remove (the table in docs/steering.md is this function's output)."""
    table = {(a, t): das_weight_spread(a, t) for a in (0.7, math.sqrt(2)) for t in (40, 160, 640)}
    root2 = [table[(math.sqrt(2), t)][0] for t in (40, 160, 640)]
    assert root2[0] < 0.05 and root2[1] < root2[0] / 3 and root2[2] < root2[1] / 3  # ∝ 1/T
    a07 = [table[(0.7, t)][0] for t in (40, 160, 640)]
    assert min(a07) > 1.0 and max(a07) < 1.25  # no decay with T
    assert all(abs(mean - 2.75) < 0.03 for _, mean in table.values())  # the tilted marginal m + λ·s_d² at both a


def test_tempering_keeps_the_target_and_ramps_lambda():
    f = S.temper_factors(12, 2, 0.1)
    assert f[:2].tolist() == [0.0, 0.0] and f[2].item() == pytest.approx(0.1)
    assert (f.diff() >= 0).all() and f.max().item() == 1.0
    assert S.temper_factors(5, 0, None).tolist() == [1.0] * 5
    # diff potentials under a tempered λ_t telescope to λ_last·r_last (the DAS twist ratios)
    state, total = S.initial_state(3), torch.zeros(3, dtype=torch.float64)
    rs = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for lam_t, r in zip((0.2, 0.5, 0.9, 1.0), rs):
        lg, state = S.potential_diff(r, state, lam_t)
        total += lg
    assert torch.allclose(total, 1.0 * rs[-1])
    with pytest.raises(ValueError, match="temper"):
        S.temper_factors(10, 0, 0.0)


def test_tempered_das_still_reaches_the_target(target):
    _, weighted, _ = _das(6000, 4.0, temper=0.2)
    assert abs(weighted - target) < 0.03, (weighted, target)


def test_the_proposal_is_not_called_at_deterministic_steps():
    steps, k = 8, 4
    sig = schedules.shifted_linear(steps, 1.0)
    eta = eta_schedule(steps, 0.7)
    eta[5:] = 0.0
    calls = []

    def hook(x, v, s, sn, t, cond_b):
        calls.append(t)
        return torch.full_like(x, 0.01)

    S.fk_steer(gaussian_world_velocity, _noise(k), sig, {}, linear_reward(), k=k, lam=1.0,
               cond_index=torch.zeros(k, dtype=torch.long), eta=eta, proposal=hook,
               generator=torch.Generator().manual_seed(0), resample_generator=torch.Generator().manual_seed(1))
    assert calls == [0, 1, 2, 3, 4]


def test_das_on_the_shapes_model_raises_a_differentiable_reward_over_plain_fk(model):
    """The same FK run (k = 2, same seeds) with the guided proposal: the saturation of the chosen outputs rises,
    and the guidance's reward rows count in the cost. (λ = 300, i.e. guidance β = 1/300: at λ = 50 the shift is
    within the noise of these 4 outputs, +/- 0.02 in the sum over run seeds 0-3; at 300 it gains +0.06 to +0.10 on
    each of run seeds 0-2.)"""
    steer = {"saturation": (build_reward("saturation"), 1.0)}
    kw = dict(method="fk", steps=6, k=2, lam=300.0, kernel="flow_sde", eta=0.7, seeds_per_prompt=2, seed=0,
              schedule=[2, 4, 5], band=(0.0, 1.0))
    plain, _, c_plain = S.steer_prompts(model, PROMPTS, steer, {}, **kw)
    das, _, c_das = S.steer_prompts(model, PROMPTS, steer, {}, proposal="guided", **kw)
    assert sum(d["steer_reward"] for d in das) > sum(p["steer_reward"] for p in plain)
    assert c_das["forwards_per_image"] == c_plain["forwards_per_image"]  # x0 mode: no extra forwards
    assert c_das["steer_reward_rows_per_image"] > c_plain["steer_reward_rows_per_image"]
    with pytest.raises(ValueError, match="method='fk'"):
        S.steer_prompts(model, PROMPTS, steer, {}, **{**kw, "method": "best_of_n"}, proposal="guided")


def test_steer_cli_das_and_reward_std(tmp_path):
    base = tmp_path / "none"
    assert main(["steer", "a red circle", "a blue square", "--method", "none", "--steps", "4", "--seeds", "2",
                 "--eval-rewards", "saturation", "--reward", "saturation", "--out", str(base)]) == 0
    scores = [json.loads(line)["saturation"] for line in (base / "results.jsonl").read_text().splitlines()]
    m = sum(scores) / len(scores)
    std = math.sqrt(sum((s - m) ** 2 for s in scores) / (len(scores) - 1))
    out = tmp_path / "das"
    assert main(["steer", "a red circle", "--method", "fk", "-k", "2", "--steps", "4", "--reward", "saturation",
                 "--eval-rewards", "saturation", "--proposal", "guided", "--temper", "0.5", "--lam", "2",
                 "--reward-std", str(base), "--out", str(out)]) == 0
    st = json.loads((out / "summary.json").read_text())["settings"]
    assert st["proposal"] == "guided" and st["temper"] == 0.5 and st["lam"] == 2.0
    assert st["reward_std"] == pytest.approx(std) and st["lam_per_reward_unit"] == pytest.approx(2.0 / std)


@pytest.mark.parametrize("extra, needles", [
    (["--method", "fk", "--proposal", "guided"], ["differentiable", "shapes_partial"]),
    (["--method", "fk", "--proposal", "guided", "--reward", "saturation", "--lam", "0"], ["--lam > 0"]),
    (["--method", "fk", "--proposal", "guided", "--reward", "saturation", "--kernel", "euler"], ["stochastic"]),
    (["--method", "best_of_n", "--proposal", "guided"], ["only with --method fk"]),
    (["--method", "fk", "--temper", "0"], ["--temper"]),
    (["--method", "best_of_n", "--output", "drawn"], ["--output is FK's"]),
    (["--method", "fk", "--beta", "2"], ["--beta is --method guided's"]),
    (["--method", "fk", "--reward-std", "0"], ["--reward-std", "> 0"]),
    (["--method", "fk", "--reward-std", "/nonexistent"], ["--reward-std", "results.jsonl"]),
    (["--method", "best_of_n", "--reward-std", "1"], ["--reward-std", "best_of_n"]),
    (["--guidance", "nan"], ["--guidance"]),
    (["--method", "fk", "--band", "0.1,0.5"], ["--band", "only with --method guided"]),
    (["--method", "best_of_n", "--normalize", "0.1"], ["--normalize", "only with"]),
    (["--method", "fk", "--temper", "0.1", "--lam", "0"], ["--temper", "--lam 0"]),
])
def test_steer_refuses_bad_das_input_before_loading_the_model(tmp_path, capsys, no_model, extra, needles):
    fails(capsys, ["steer", "a red circle", *extra, "--out", str(tmp_path / "o")], *needles)
    assert list(tmp_path.iterdir()) == []


def test_a_nan_final_reward_kills_its_particle():
    """A particle alive until the end whose final reward is NaN gets ℓw = −∞ (nan_to_num's default made it
    −1.8e308: alive, and `drawn` could pick it in a group whose other particles were dead)."""
    steps, k = 6, 4
    sig = schedules.shifted_linear(steps, 1.0)
    calls = [0]

    def reward(z, rows):
        calls[0] += 1
        r = z.flatten(1).mean(1).clone()
        if calls[0] == 1 + len(S.resample_steps(steps)):  # the final scoring
            r[rows == 2] = float("nan")
        return r

    res = S.fk_steer(gaussian_world_velocity, _noise(k), sig, {}, reward, k=k, lam=1.0,
                     cond_index=torch.zeros(k, dtype=torch.long), eta=eta_schedule(steps, 0.7),
                     generator=torch.Generator().manual_seed(0), resample_generator=torch.Generator().manual_seed(1))
    assert res.log_weight[2].item() == -math.inf and torch.isfinite(res.log_weight[[0, 1, 3]]).all()


def test_a_guided_proposal_without_stochastic_steps_is_refused(model):
    steer = {"saturation": (build_reward("saturation"), 1.0)}
    with pytest.raises(ValueError, match="stochastic"):
        S.steer_prompts(model, PROMPTS, steer, {}, method="fk", steps=4, k=2, lam=5.0, proposal="guided")


def test_reward_std_from_a_run_without_the_steering_reward_is_one_line(tmp_path, capsys, no_model):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.jsonl").write_text(json.dumps({"prompt": "a red circle", "shapes_strict": 1.0}) + "\n")
    fails(capsys, ["steer", "a red circle", "--method", "fk", "--reward-std", str(tmp_path / "r"),
                   "--out", str(tmp_path / "o")], "no 'shapes_partial' score")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, needles", [
    (["--method", "fk", "--reward-std", "1e-320"], ["--lam", "--reward-std"]),  # λ/std = inf
    (["--method", "fk", "--reward", "saturation", "--proposal", "guided", "--lam", "1e-320"], ["--lam", "1/"]),
    (["--method", "fk", "--reward", "saturation", "--proposal", "guided", "--lam", "1e-300", "--reward-std", "1e30"],
     ["--lam"]),  # λ/std underflows to 0
    (["--method", "guided", "--reward", "saturation", "--beta", "1e-200", "--reward-std", "1e-200"], ["--beta"]),
])
def test_lam_and_beta_out_of_range_after_scaling_are_refused_before_loading_the_model(tmp_path, capsys, no_model,
                                                                                      extra, needles):
    fails(capsys, ["steer", "a red circle", *extra, "--out", str(tmp_path / "o")], *needles)
    assert list(tmp_path.iterdir()) == []


def test_guided_method_ignores_a_lam_that_reward_std_would_overflow(tmp_path):
    """--method guided does not use --lam: a tiny --reward-std that overflows λ/std must not refuse it."""
    from flowalign.cli import main

    assert main(["steer", "a red circle", "--method", "guided", "--reward", "saturation", "--eval-rewards",
                 "saturation", "--steps", "2", "--reward-std", "1e-320", "--beta", "1e300",
                 "--out", str(tmp_path / "o")]) == 0


def test_reward_std_from_an_unreadable_results_file_is_one_line(tmp_path, capsys, no_model):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.jsonl").write_bytes(b"\xff\xfe\x00not utf-8\n")
    fails(capsys, ["steer", "a red circle", "--method", "fk", "--reward-std", str(tmp_path / "r"),
                   "--out", str(tmp_path / "o")], "--reward-std")
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------- tempering inside fk_steer


def test_tempering_ramps_the_intermediate_potentials_from_the_first_resampling_step():
    """λ_t = λ·f_t in the intermediate potentials, f_t = min((1+γ)^(t−start+1) − 1, 1) from start = S[0] (METHODS.md
    §6.4), and the guided proposal is consulted only where f_t > 0. T = 8, S = {3, 5}, γ = 0.2: f_3 = 0.2, f_5 = 0.728;
    rewards fixed per row, ``rt`` potentials and no ESS-triggered resampling, so ℓw is λ·f_3·r at step 3 and
    λ·(f_3 + f_5)·r at step 5, whose ESS the run must report; the proposal is called at steps 3 … 6 (η = 0 at 7)."""
    T, k, lam, gamma = 8, 4, 2.0, 0.2
    r = torch.arange(k, dtype=torch.float64) * 0.5  # [k] the reward of each row, whatever its latent
    calls = []

    def hook(x, v, s, sn, t, cond_b):
        calls.append(t)
        return None  # the kernel's own step

    res = S.fk_steer(gaussian_world_velocity, _noise(k), schedules.shifted_linear(T, 1.0), {},
                     lambda z, rows: r[rows].to(torch.float32), k=k, lam=lam,
                     cond_index=torch.zeros(k, dtype=torch.long), steps_s=[3, 5], potential="rt",
                     eta=eta_schedule(T, 0.7), ess_threshold=1e-6, proposal=hook, temper=gamma,
                     generator=torch.Generator().manual_seed(0), resample_generator=torch.Generator().manual_seed(1))
    f3, f5 = gamma, (1 + gamma) ** 3 - 1

    def ess(logw):  # [k] -> 1 / Σ w̄²
        w = torch.softmax(logw, 0)
        return 1.0 / (w * w).sum().item()

    assert res.ess[:, 0].tolist() == pytest.approx([ess(lam * f3 * r), ess(lam * (f3 + f5) * r)], rel=1e-5)
    assert res.resampled[:, 0].tolist() == [False, True]  # only the forced last step of S
    assert calls == [3, 4, 5, 6]


def test_the_guided_shift_is_scaled_by_the_temper_factor_and_importance_weighted():
    """At a stochastic step the particle is drawn from N(μ + f_t·δ, s²) (``temper`` scales the proposal's shift) and
    ℓw gains log N(x'; μ, s²) − log N(x'; μ + f_t·δ, s²) (METHODS.md §6.4). With S = ∅ the ramp starts at step 0, so
    at step 1 f_1 = (1.2)² − 1 = 0.44; a shift δ proposed at step 1 only must move x_2 by 0.44·δ from the unguided run
    on the same noise, and λ = 0 leaves exactly that log ratio in ℓw."""
    T, k = 8, 3
    sig, eta = schedules.shifted_linear(T, 1.0), eta_schedule(T, 0.7)
    delta = torch.tensor([[0.3], [-0.2], [0.5]])  # [k, 1]

    def run(hook):
        xs = []

        def velocity(x, s, cond):
            xs.append(x.clone())  # [k, 1] the state entering each step
            return gaussian_world_velocity(x, s, cond)

        res = S.fk_steer(velocity, _noise(k), sig, {}, linear_reward(), k=k, lam=0.0,
                         cond_index=torch.zeros(k, dtype=torch.long), steps_s=(), eta=eta, proposal=hook, temper=0.2,
                         generator=torch.Generator().manual_seed(4))
        return res, xs

    guided, xg = run(lambda x, v, s, sn, t, cond_b: delta if t == 1 else None)
    plain, xp = run(None)
    f1 = 1.2 ** 2 - 1
    assert torch.equal(xg[1], xp[1])
    assert torch.allclose(xg[2] - xp[2], f1 * delta, atol=1e-6)
    tr = get_kernel("flow_sde")(xg[1], gaussian_world_velocity(xg[1], sig[1].expand(k), {}), sig[1], sig[2], eta[1])
    want = (gaussian_log_prob(xg[2], tr.mean, tr.std, reduce="sum")
            - gaussian_log_prob(xg[2], tr.mean + f1 * delta, tr.std, reduce="sum"))  # [k]
    assert torch.allclose(guided.log_weight, want.double(), atol=1e-5)
    assert (plain.log_weight == 0).all()
