"""Dense credit assigners (METHODS.md §4.1–4.5, §5.4): hand-made sequences, schedule-derived weights, invariances."""

import dataclasses
import math

import pytest
import torch

from flowalign.calibrate import calibrate_noise, calibration_update, initial_psi
from flowalign.credit import (CREDIT, CreditInput, assign_credit, balance_turning_points, process_q, reward_gains,
                              tempflow_weights, turning_point_rewards)
from flowalign.loss import clipped_surrogate
from flowalign.samplers import eta_schedule, sample, schedules
from flowalign.samplers.plans import PLANS
from flowalign.types import Trajectory
from flowalign.values import make_probe, probe_values_naive

from gaussian_world import gaussian_world_velocity  # noqa: E402

T = 6


def score(z, rows):
    return {"r": -(z - 2.0).pow(2).mean(1) + 0.3 * torch.sin(4 * z).mean(1), "q": z.mean(1)}


def _fake_traj(group, eta, extras=None, steps=T):
    b = group.shape[0]
    return Trajectory(latents=torch.zeros(b, steps + 1, 2), sigmas=schedules.sd3_diffusers(steps), eta=eta,
                      log_probs=torch.zeros(b, steps), cond={"c": torch.zeros(1, 2)},
                      cond_index=torch.zeros(b, dtype=torch.long), group=group, prompts=("p",),
                      extras=extras or {})


def _inp(values, group, eta, *, trained=None, extras_traj=None, rewards=None, eps=1e-9, **kw):
    b, t1 = next(iter(values.values())).shape
    traj = _fake_traj(group, eta, extras_traj, steps=t1 - 1)
    if trained is None:
        trained = (eta > 0)[None].expand(b, -1).clone()
    rewards = rewards or {k: v[:, -1].clone() for k, v in values.items()}
    return CreditInput(traj=traj, rewards=rewards, reward_weights={k: 1.0 for k in values}, trained=trained,
                       values=values, std_eps=eps, **kw)


def _gw_rollout(eta, b=8, seed=0, shared=False, keep=True):
    g = torch.Generator().manual_seed(seed)
    cond = {"c": torch.tensor([[-0.3] * 3, [0.4] * 3])}
    ci = torch.arange(b) // (b // 2)
    x = torch.randn(b, 3, generator=g)
    if shared:
        x = x[ci * (b // 2)]
    return sample(gaussian_world_velocity, x, schedules.sd3_diffusers(T), cond, eta=eta, kernel="flow_sde",
                  generator=g, cond_index=ci, group=ci, keep_velocities=keep)


def _engine_inp(traj, trained=None, **kw):
    term = score(traj.final, None)
    probe = make_probe(gaussian_world_velocity, traj, score, terminal=term)
    if trained is None:
        trained = (traj.eta > 0)[None].expand(traj.batch_size, -1).clone()
    return CreditInput(traj=traj, rewards=term, reward_weights={"r": 1.0, "q": 0.5}, trained=trained, probe=probe, **kw)


# ------------------------------------------------------------------------------------------ DenseGRPO


def test_dense_gains_hand_sequence_and_telescoping():
    v = torch.tensor([[0.0, 0.2, 0.5, 0.4, 0.9]], dtype=torch.float64)
    assert torch.allclose(reward_gains(v), torch.tensor([[0.2, 0.3, -0.1, 0.5]], dtype=torch.float64), atol=1e-15)
    vr = torch.randn(5, 11, dtype=torch.float64)
    assert torch.allclose(reward_gains(vr).sum(1), vr[:, -1] - vr[:, 0], atol=1e-13, rtol=0)


def test_dense_gain_on_engine_values_telescopes_and_is_column_centred():
    traj = _gw_rollout(eta_schedule(T, 0.7))
    inp = _engine_inp(traj)
    credit = assign_credit("dense_gain", inp)
    adv = credit.advantages
    assert adv.shape == (8, T) and credit.weights is None
    trained = inp.trained
    assert (adv[~trained] == 0).all() and (adv[trained] != 0).all()
    for g in (0, 1):
        assert adv[traj.group == g].mean(0).abs().max() < 1e-5  # every step column has zero group mean
    # V_0 = full-ODE value of the stored x_0; the gains telescope to R − V_0
    mask = torch.ones(8, T + 1, dtype=torch.bool)
    vals = inp.probe("ode:full", mask)
    m0 = torch.zeros(8, T + 1, dtype=torch.bool)
    m0[:, 0] = True
    ref0 = probe_values_naive(gaussian_world_velocity, traj, m0, "ode:full", score)
    assert torch.equal(vals["r"][:, 0], ref0["r"][:, 0])
    gains = reward_gains(vals["r"])
    assert torch.allclose(gains.sum(1), (inp.rewards["r"].double() - vals["r"][:, 0].double()), atol=1e-6)


def test_dense_gain_all_ode_trajectory_gives_zero():
    traj = _gw_rollout(0.0)
    inp = _engine_inp(traj, trained=torch.ones(8, T, dtype=torch.bool))
    vals = inp.probe("ode:full", torch.ones(8, T + 1, dtype=torch.bool))
    assert torch.equal(vals["r"], inp.rewards["r"][:, None].expand(-1, T + 1))  # V_t = V_T bit-exactly
    assert (assign_credit("dense_gain", inp).advantages == 0).all()


def test_dense_gain_few_step_probe_modes_run_through_options():
    traj = _gw_rollout(eta_schedule(T, 0.7))
    for mode in ("ode:2", "x0", "ode2:1"):
        adv = assign_credit("dense_gain", _engine_inp(traj), {"probe": mode}).advantages
        assert torch.isfinite(adv).all() and adv.abs().sum() > 0


def test_dense_gain_value_signal_z_scores_the_post_step_value():
    """signal="value" (DenseGRPO's weaker variant, Deng et al. 2025 §3; METHODS.md §4.1): A_it is the per-step group
    z-score of V_{t+1}, the value of the step's post-state, not of V_t; only the post-states of trained edges are
    probed (x_T never: its value is the reward)."""
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    eta = torch.tensor([0.3, 0.3, 0.3, 0.0])  # the last step is not trained
    v = torch.tensor([[0.0, 1.0, 4.0, 2.0, 7.0], [3.0, 0.0, 1.0, 5.0, 1.0], [1.0, 2.0, 0.0, 9.0, 3.0],
                      [2.0, 6.0, 1.0, 0.0, 2.0], [5.0, 1.0, 3.0, 4.0, 8.0], [0.0, 3.0, 9.0, 1.0, 0.0]],
                     dtype=torch.float64)  # [B, T+1], every column ordered differently from its neighbours
    eps = 1e-4

    def z(x):  # per-group z-score with population std + eps
        out = torch.zeros_like(x)
        for g in group.unique():
            m = group == g
            out[m] = (x[m] - x[m].mean()) / (x[m].std(unbiased=False) + eps)
        return out

    want = torch.stack([z(v[:, t + 1]) for t in range(3)] + [torch.zeros(6, dtype=torch.float64)], 1)  # [B, T]
    got = assign_credit("dense_gain", _inp({"r": v}, group, eta, eps=eps), {"signal": "value"}).advantages
    assert torch.allclose(got.double(), want, atol=1e-6, rtol=0)
    assert not torch.allclose(got[:, :3].double(), torch.stack([z(v[:, t]) for t in range(3)], 1), atol=1e-2)
    seen = []

    def probe(mode, mask):  # the engine's contract: values of the requested states, NaN elsewhere
        seen.append((mode, mask.clone()))
        return {"r": torch.where(mask, v, torch.full_like(v, float("nan")))}

    inp = dataclasses.replace(_inp({"r": v}, group, eta, eps=eps), values=None, probe=probe)
    assert torch.allclose(assign_credit("dense_gain", inp, {"signal": "value"}).advantages, got, atol=0, rtol=0)
    (mode, mask), = seen
    want_mask = torch.zeros(6, 5, dtype=torch.bool)
    want_mask[:, 1:4] = True  # post-states t+1 of the trained steps 0..2; x_4 = x_T is the reward, not probed
    assert mode == "ode:full" and torch.equal(mask, want_mask)


def test_win_rates_by_hand_and_their_group_mean():
    from flowalign.credit import group_win_rates

    r = torch.tensor([1.0, 2.0, 2.0, 5.0, 0.3, float("nan"), 0.1, 7.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    w = group_win_rates(r, g)
    assert w[:4].tolist() == [0.0, 0.5, 0.5, 1.0]  # 1 beats none; 2 beats 1, ties 2, loses to 5; 5 beats all three
    assert w[[4, 6]].tolist() == [1.0, 0.0] and w[5].isnan() and w[7].isnan()  # NaN and a lone member: no rate
    assert w[:4].mean().item() == 0.5
    assert group_win_rates(r, g, margin=1.5)[:4].tolist() == [1 / 3, 1 / 3, 1 / 3, 1.0]  # 1 and the 2s tie (|Δ| ≤ 1.5)


def test_win_rate_credit_depends_only_on_the_order_of_the_rewards():
    """Any increasing transform of the reward leaves Pref-GRPO's credit unchanged; outcome credit changes. A margin
    turns nearly equal rewards into ties (advantage 0) where outcome credit blows their difference up."""
    g = torch.Generator().manual_seed(4)
    group = torch.arange(16) // 8
    r = torch.randn(16, generator=g, dtype=torch.float64)
    eta = torch.full((3,), 0.7)

    def credit(name, rr, **opts):
        vals = {"r": rr[:, None].expand(16, 4).clone()}
        return assign_credit(name, _inp(vals, group, eta, eps=1e-12), opts).advantages[:, 0].double()

    assert torch.allclose(credit("win_rate", r), credit("win_rate", torch.exp(3 * r) + r ** 3), atol=1e-6)
    assert not torch.allclose(credit("outcome", r), credit("outcome", torch.exp(3 * r) + r ** 3), atol=1e-2)
    near = 0.5 + 1e-6 * torch.arange(16, dtype=torch.float64)  # differences far below any judge's resolution
    assert credit("outcome", near).abs().max() > 1.0  # the "illusory advantage"
    assert (credit("win_rate", near, margin=1e-3) == 0).all()
    with pytest.raises(ValueError, match="margin"):
        credit("win_rate", r, margin=-1.0)


def test_stepwise_gain_normalises_jointly_and_keeps_the_steps_relative_scale():
    """Stepwise-Flow-GRPO (METHODS §4.6): the gains of a group are z-scored over all its (i, t) together, so the
    credit is a single affine map of the gains per group: zero mean and unit spread over the group's trained entries,
    a step with 10× smaller gains keeps 10× smaller advantages (per-step normalisation would blow it up to unit
    spread), and the same gains as DenseGRPO's rank within every step."""
    g = torch.Generator().manual_seed(0)
    b, steps = 8, 4
    gains = torch.randn(b, steps, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1.0, 1.0, 0.1])
    vals = {"r": torch.cat([torch.zeros(b, 1, dtype=torch.float64), gains.cumsum(1)], 1)}  # V_0 = 0, gains telescope
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    eta = torch.full((steps,), 0.7)
    trained = torch.ones(b, steps, dtype=torch.bool)
    trained[0, 1] = False  # an untrained entry is left out of the statistics and gets 0
    adv = assign_credit("stepwise_gain", _inp(vals, group, eta, trained=trained)).advantages.double()
    dense = assign_credit("dense_gain", _inp(vals, group, eta, trained=trained)).advantages.double()
    assert adv[0, 1] == 0
    for k in (0, 1):
        rows = group == k
        a, x = adv[rows][trained[rows]], gains[rows][trained[rows]]
        assert abs(a.mean().item()) < 1e-6 and a.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
        assert torch.allclose(a, (x - x.mean()) / x.std(unbiased=False), atol=1e-3)
        # the small last step's spread stays small jointly; per-step normalisation gives it unit spread
        assert adv[rows][:, 3].std() < 0.3 * adv[rows][:, 1:3][trained[rows][:, 1:3].all(1)].std(0).mean()
        assert dense[rows][:, 3].std() > 0.5 * dense[rows][:, 2].std()
        for t in range(steps):  # within a step both order the rollouts alike
            m = trained[rows][:, t]
            assert torch.equal(adv[rows][m, t].argsort(), dense[rows][m, t].argsort())


def test_stepwise_gain_on_engine_values_uses_the_five_step_probe():
    traj = _gw_rollout(eta_schedule(T, 0.7))
    inp = _engine_inp(traj)
    adv = assign_credit("stepwise_gain", inp).advantages
    vals = inp.probe("ode:5", torch.ones(8, T + 1, dtype=torch.bool))
    want = {k: reward_gains(v) for k, v in vals.items()}
    assert torch.isfinite(adv).all() and (adv[~inp.trained] == 0).all()
    for grp in (0, 1):  # advantage_sum aggregation: each reward's gains jointly z-scored in the group, then weighted
        rows = traj.group == grp
        m = inp.trained[rows]
        z = {k: (w[rows][m] - w[rows][m].mean()) / (w[rows][m].std(unbiased=False) + inp.std_eps) for k, w in want.items()}
        assert torch.allclose(adv[rows][m].double(), z["r"] + 0.5 * z["q"], atol=1e-4)


# ------------------------------------------------------------------------------------------ TP-GRPO


def test_turning_points_hand_sequence():
    r_seq = torch.tensor([[0.50, 0.40, 0.60, 0.55, 0.70]])
    for constraint, want_i in ((False, [0, 1, 0, 1]), (True, [0, 1, 0, 0])):
        r, turn, d, g, delta = turning_point_rewards(r_seq, constraint=constraint)
        assert torch.allclose(d, torch.tensor([[-0.10, 0.20, -0.05, 0.15]], dtype=torch.float64), atol=1e-7)
        assert abs(float(delta) - 0.20) < 1e-7
        assert turn.long().tolist() == [want_i]
        assert torch.allclose(g, torch.tensor([[0.20, 0.30, 0.10, 0.15]], dtype=torch.float64), atol=1e-7)
        assert torch.allclose(r, torch.tensor([[-0.10, 0.30, -0.05, 0.15]], dtype=torch.float64), atol=1e-7)


def test_turning_points_edge_cases():
    mono = torch.tensor([[0.1, 0.2, 0.4, 0.5, 0.9]])
    for constraint in (False, True):
        _, turn, d, g, _ = turning_point_rewards(mono, constraint=constraint)
        assert not turn[:, 1:].any()
        assert torch.allclose(g, d.flip(1).cumsum(1).flip(1))  # g_j = Σ_{m≥j} d_m
    flat = torch.tensor([[0.3, 0.6, 0.1, 0.3]])  # Δ = 0
    for constraint in (False, True):
        r, turn, d, _, delta = turning_point_rewards(flat, constraint=constraint)
        assert float(delta) == 0 and not turn.any() and torch.equal(r, d)
    # under the constraint I_n ≡ 0
    _, turn, *_ = turning_point_rewards(torch.randn(50, 6), constraint=True)
    assert not turn[:, -1].any()


def test_turning_point_balancing():
    turn = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    delta = torch.tensor([0.5, 0.9, -0.2, 0.3])
    unit = torch.zeros(4, dtype=torch.long)
    # all-positive Δ keeps everything
    assert torch.equal(balance_turning_points(turn[[0, 1, 3]], delta[[0, 1, 3]], unit[:3]), turn[[0, 1, 3]])
    out = balance_turning_points(turn, delta, unit)
    # P = (0,0),(0,2),(1,1),(3,2); N = (2,0),(2,1) → keep 2 of P with largest |Δ|: row 1, then row 0 step 0
    assert out.long().tolist() == [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]]
    # per-unit scope: a unit without negatives keeps everything
    out2 = balance_turning_points(turn, delta, torch.tensor([0, 1, 0, 1]))
    assert out2[1].tolist() == turn[1].tolist() and out2[3].tolist() == turn[3].tolist()
    assert torch.equal(out2[[0, 2]], turn[[0, 2]])  # unit 0: |P| = |N| = 2, all kept


def test_turning_points_baseline_is_the_trajectorys_own_x0():
    eta = eta_schedule(T, 0.7, window=(2, 3))  # ODE prefix 0–1, window 2–4, ODE tail
    traj = _gw_rollout(eta)
    inp = _engine_inp(traj)
    seen = {}
    inner = inp.probe

    def spy(mode, mask):
        out = inner(mode, mask)
        seen["mask"], seen["vals"] = mask.clone(), out
        return out

    credit = assign_credit("turning_points", dataclasses.replace(inp, probe=spy))
    assert seen["mask"][:, [2, 3, 4]].all() and not seen["mask"][:, [0, 1, 6]].any()
    ref = probe_values_naive(gaussian_world_velocity, traj, torch.nn.functional.pad(
        torch.ones(8, 1, dtype=torch.bool), (0, T)), "ode:full", score)
    assert torch.equal(seen["vals"]["r"][:, 2], ref["r"][:, 0])  # R^(0) = V_full(x_0) of the same noise (Q14)
    adv = credit.advantages
    assert (adv[:, [0, 1, 5]] == 0).all() and (adv[:, 2:5] != 0).any()


# ------------------------------------------------------------------------------------------ TempFlow


def test_tempflow_weights_sd35_vector():
    sig = schedules.sd3_diffusers(10, 3.0)
    w = tempflow_weights(sig, 0.7, range(9))
    want = torch.tensor([1.577, 1.673, 1.208, 1.004, 0.882, 0.795, 0.719, 0.635, 0.508])
    assert (w - want).abs().max() < 1e-3
    assert abs(float(w.mean()) - 1) < 1e-6 and (w > 0).all()
    s = torch.tensor([0.7, 0.74296, 0.53615, 0.44590, 0.39179, 0.35280, 0.31907, 0.28201, 0.22536])
    assert abs(1 / float(s.mean()) - 2.25) < 0.01  # upstream's hand constant C = 1/mean(s_k)


def test_branch_credit_on_branched_rollout():
    steps, kids = T, 4
    sig = schedules.sd3_diffusers(steps)
    cond = {"c": torch.tensor([[-0.3] * 3, [0.4] * 3])}
    x = torch.randn(3, 3)
    ci = torch.tensor([0, 0, 1])
    eta = eta_schedule(steps, 0.7)
    tr = PLANS["branch"](gaussian_world_velocity, x, sig, cond, cond_index=ci, group=ci, eta=eta,
                         generator=torch.Generator().manual_seed(0), children=kids, keep_velocities=True)
    rew = score(tr.final, None)
    trained = (tr.eta > 0)[None].expand(tr.batch_size, -1) & tr.extras["trained"]
    inp = CreditInput(traj=tr, rewards=rew, reward_weights={"r": 1.0}, trained=trained)
    credit = assign_credit("branch", inp)
    k = tr.extras["branch_step"]
    rows = torch.arange(tr.batch_size)
    off = torch.ones_like(credit.advantages, dtype=torch.bool)
    off[rows, k] = False
    assert (credit.advantages[off] == 0).all() and (credit.advantages[rows, k] != 0).any()
    for grp in tr.group.unique():  # zero mean within each (prompt, seed, k) sibling set
        assert abs(float(credit.advantages[rows, k][tr.group == grp].sum())) < 1e-5
    w = tempflow_weights(sig, 0.7, range(steps - 1))
    assert torch.allclose(credit.weights[rows, k], w[k])
    # the probed variant (values of x_{k+1} by ODE completion) equals the terminal-reward variant
    probe = make_probe(gaussian_world_velocity, tr, score, terminal=rew)
    c2 = assign_credit("branch", dataclasses.replace(inp, probe=probe), {"probe": "ode:full"})
    assert torch.allclose(c2.advantages, credit.advantages, atol=1e-6)
    # folding the weights into A after the clip equals the explicitly weighted loss (METHODS §3.6)
    a = credit.advantages[rows, k].clamp(-5, 5)
    wk = credit.weights[rows, k]
    logp = torch.randn(tr.batch_size) * 1e-3
    old = torch.zeros(tr.batch_size)
    folded, _ = clipped_surrogate(logp, old, wk * a, 1e-4)
    explicit, _ = clipped_surrogate(logp, old, a, 1e-4)
    assert torch.allclose(folded, wk * explicit, atol=1e-7)


# ------------------------------------------------------------------------------------------ VGPO


def test_vgpo_q_recursion_anchor_and_omega():
    assert torch.allclose(process_q(torch.tensor([[1.0, 2.0, 3.0]]), 0.5),
                          torch.tensor([[2.75, 3.5, 3.0]], dtype=torch.float64))
    steps = 4
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    eta = torch.tensor([0.7, 0.7, 0.7, 0.0])
    base = torch.rand(6, steps + 1, generator=torch.Generator().manual_seed(0)) + 0.5
    # equal rewards inside group 0: z = 0, but the anchor keeps Â ≠ 0 for t < t_anchor
    v = base.clone()
    v[:3] = v[0]
    inp = _inp({"r": v}, group, eta)
    adv = assign_credit("value_anchor", inp, {"t_anchor": 2}).advantages
    assert (adv[:3, :2] != 0).all() and (adv[:3, 2:] == 0).all()
    # κ = 0 and ω ≡ 1: a per-step z-score of Q
    adv0 = assign_credit("value_anchor", _inp({"r": base}, group, eta), {"kappa": 0.0, "omega": "none"}).advantages
    q = process_q(base[:, 1:])
    for g in (0, 1):
        qg = q[group == g]
        z = (qg - qg.mean(0)) / qg.std(0, unbiased=False)
        assert torch.allclose(adv0[group == g][:, :3], z[:, :3].float(), atol=1e-5)
    # ω has mean 1 over trained steps: with z = 0 and the anchor everywhere, Â / (κQ) = ω
    flat = base.clone()
    flat[:3] = flat[0]
    flat[3:] = flat[3]
    a = assign_credit("value_anchor", _inp({"r": flat}, group, eta), {"kappa": 1.0, "t_anchor": steps}).advantages
    omega = a[:, :3] / process_q(flat[:, 1:])[:, :3].float()
    assert torch.allclose(omega.mean(1), torch.ones(6), atol=1e-5) and not torch.allclose(omega, torch.ones(6, 3))


def test_vgpo_omega_falls_back_to_one_when_a_step_mean_is_not_positive():
    """Mixed-sign Q (e.g. ImageReward): ω_t < 0 would flip a step's advantages, so ω ≡ 1 (METHODS.md §4.4)."""
    group = torch.zeros(3, dtype=torch.long)
    eta = torch.tensor([0.7, 0.7, 0.0])
    v = torch.tensor([[0.0, 6.2, -0.9, -1.0], [0.0, 5.8, -1.1, -0.8], [0.0, 6.0, -1.0, -1.2]])  # Q_t=1 < 0
    adv = assign_credit("value_anchor", _inp({"r": v}, group, eta), {"kappa": 0.0}).advantages
    ref = assign_credit("value_anchor", _inp({"r": v}, group, eta), {"kappa": 0.0, "omega": "none"}).advantages
    assert torch.equal(adv, ref)
    q = process_q(v[:, 1:])[:, 1]
    assert (torch.sign(adv[:, 1]) == torch.sign(q - q.mean()).float()).all()  # the higher Q, the higher Â


def test_vgpo_rows_without_a_reward_get_zero_and_leave_the_others_unchanged():
    group = torch.tensor([0, 0, 0, 0])
    eta = torch.tensor([0.7, 0.7, 0.0])
    v = torch.rand(4, 4, generator=torch.Generator().manual_seed(1)) + 0.5
    nan = v.clone()
    nan[3, -1] = float("nan")  # row 3's reward is "not applicable"
    adv = assign_credit("value_anchor", _inp({"r": nan}, group, eta), {}).advantages
    ref = assign_credit("value_anchor", _inp({"r": v[:3]}, group[:3], eta), {}).advantages
    assert (adv[3] == 0).all() and torch.allclose(adv[:3], ref, atol=1e-6)


def test_vgpo_uses_free_x0_probes_of_post_step_states():
    traj = _gw_rollout(eta_schedule(T, 0.7))
    inp = _engine_inp(traj)
    seen = {}
    inner = inp.probe

    def spy(mode, mask):
        seen["mode"], seen["mask"] = mode, mask.clone()
        return inner(mode, mask)

    adv = assign_credit("value_anchor", dataclasses.replace(inp, probe=spy)).advantages
    assert seen["mode"] == "x0" and not seen["mask"][:, 0].any() and seen["mask"][:, 1:T].all()
    assert torch.isfinite(adv).all() and (adv[:, -1] == 0).all()


# ------------------------------------------------------------------------------------------ Euphonium


def test_euphonium_heads():
    steps = 5
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    eta = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    vals = {"r": torch.randn(8, steps + 1, generator=g)}
    prm = torch.full((8, steps + 1), float("nan"))
    prm[:, 2:5] = torch.randn(8, 3, generator=g)  # guided steps 2, 3 (post-states 3, 4; pre 2, 3)
    guided = torch.tensor([False, False, True, True, False])
    inp = _inp(vals, group, eta, extras={"prm": prm, "prm_steps": guided})
    no_mask = assign_credit("euphonium", _inp(vals, group, eta, extras={"prm": prm})).heads["process"]
    cr = assign_credit("euphonium", inp)
    ora, pra = cr.advantages, cr.heads["process"]
    assert torch.allclose(ora[:, 0], ora[:, 3]) and (ora[:, 4] == 0).all()
    assert (pra[:, [0, 1, 4]] == 0).all() and (pra[:, 2:4] != 0).all()  # zero at unguided steps ("post")
    assert torch.equal(no_mask, pra)  # guided steps inferred from the scored pre- and post-states
    pre = assign_credit("euphonium", inp, {"pra_index": "pre"}).heads["process"]
    assert (pre[:, [0, 1, 4]] == 0).all() and (pre[:, 2:4] != 0).all() and not torch.allclose(pre, pra)
    # folded head coefficient c: c·clip(A) and ℓ_clip(ρ, c·clip(A)) = c·ℓ_clip(ρ, clip(A))
    half = assign_credit("euphonium", inp, {"c_pra": 0.5, "heads": "pra"}).advantages
    assert torch.allclose(half, 0.5 * pra)
    logp, old = torch.randn(8) * 1e-3, torch.zeros(8)
    l_half, _ = clipped_surrogate(logp, old, half[:, 2], 1e-4)
    l_full, _ = clipped_surrogate(logp, old, pra[:, 2], 1e-4)
    assert torch.allclose(l_half, 0.5 * l_full)
    with pytest.raises(ValueError):
        assign_credit("euphonium", _inp(vals, group, eta))  # no PRM scores and no probe: say so
    with pytest.raises(ValueError):
        assign_credit("euphonium", inp, {"c_ora": 2.0})


def test_lambda_zero_with_flow_grpo_g_is_the_flow_sde_kernel():
    sig = schedules.sd3_diffusers(T)
    x = torch.randn(4, 3)
    cond = {"c": torch.zeros(1, 3)}
    ci = torch.zeros(4, dtype=torch.long)
    psi = initial_psi(sig, 0.7)  # g_t = a·sqrt(σ/(1 − σ̃)), last step 0
    a = sample(gaussian_world_velocity, x, sig, cond, eta=psi, kernel="dance_sde", cond_index=ci,
               generator=torch.Generator().manual_seed(0))
    b = sample(gaussian_world_velocity, x, sig, cond, eta=eta_schedule(T, 0.7), kernel="flow_sde", cond_index=ci,
               generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a.latents, b.latents, atol=1e-5) and torch.allclose(a.log_probs, b.log_probs, atol=1e-4)


# ------------------------------------------------------------------------------------------ invariances


def _cases():
    steps = 5
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    eta = torch.tensor([0.7, 0.7, 0.7, 0.7, 0.0])
    g = torch.Generator().manual_seed(3)
    vals = {"r": torch.randn(8, steps + 1, generator=g).cumsum(1), "q": torch.rand(8, steps + 1, generator=g)}
    prm = torch.randn(8, steps + 1, generator=g)
    k = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    branch_extras = {"branch_step": k, "branch_candidates": torch.arange(4), "branch_eta": eta, "kernel": "flow_sde"}
    trained_b = torch.zeros(8, steps, dtype=torch.bool)
    trained_b[torch.arange(8), k] = True
    return {
        "outcome": (vals, group, eta, {}, {}, None),
        "dense_gain": (vals, group, eta, {}, {}, None),
        "stepwise_gain": (vals, group, eta, {}, {}, None),
        "win_rate": (vals, group, eta, {}, {}, None),
        "turning_points": (vals, group, eta, {}, {}, None),
        "turning_points_batch": (vals, group, eta, {}, {"balance_scope": "batch", "constraint": False}, None),
        "branch": (vals, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), eta, branch_extras, {}, trained_b),
        "granular": (vals, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), eta, branch_extras, {}, trained_b),
        "euphonium": (vals, group, eta, {"prm_traj": prm}, {}, None),
        "value_anchor": (vals, group, eta, {}, {}, None),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_credit_invariances(case):
    vals, group, eta, ex, opts, trained = _cases()[case]
    name = case.replace("_batch", "")
    prm = ex.get("prm_traj")
    tex = {k: v for k, v in ex.items() if k != "prm_traj"}

    def run(v, grp=group, perm=None, prm_v=prm):
        extras = {"prm": prm_v} if prm_v is not None else {}
        tr = trained
        te = dict(tex)
        if perm is not None:
            v = {k: x[perm] for k, x in v.items()}
            grp = grp[perm]
            tr = tr[perm] if tr is not None else None
            if prm_v is not None:
                extras = {"prm": prm_v[perm]}
            if "branch_step" in te:
                te["branch_step"] = te["branch_step"][perm]
        inp = _inp(v, grp, eta, trained=tr, extras_traj=te, extras=extras)
        return assign_credit(name, inp, opts).advantages

    base = run(vals)
    assert torch.isfinite(base).all() and base.abs().sum() > 0
    # permuting rows (within and across groups) permutes the credit rows
    perm = torch.tensor([3, 1, 0, 2, 6, 7, 5, 4])
    assert torch.allclose(run(vals, perm=perm), base[perm], atol=1e-6)
    if name != "value_anchor":  # VGPO's κ·Q anchor is absolute by design (METHODS §4.4)
        shifted = {k: v + 3.7 for k, v in vals.items()}
        scaled = {k: v * 2.5 for k, v in vals.items()}
        assert torch.allclose(run(shifted, prm_v=None if prm is None else prm + 3.7), base, atol=1e-5)
        assert torch.allclose(run(scaled, prm_v=None if prm is None else prm * 2.5), base, atol=1e-5)
    # groups do not leak: changing group 1's values leaves group 0's credit unchanged
    other = {k: v.clone() for k, v in vals.items()}
    g1 = group != group[0]
    for v in other.values():
        v[g1] = torch.randn(int(g1.sum()), v.shape[1])
    if case != "turning_points_batch":  # batch-scope balancing mixes groups on purpose
        assert torch.allclose(run(other)[~g1], base[~g1], atol=1e-6)


def test_every_registered_assigner_is_covered():
    assert set(CREDIT) == {"outcome", "dense_gain", "stepwise_gain", "turning_points", "branch", "value_anchor",
                           "euphonium", "tree", "win_rate", "granular"}  # tree's invariances: tests/test_tree.py


# ------------------------------------------------------------------------------------------ calibration


def test_calibration_update_rule():
    psi = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.005, 0.3])
    gains = torch.tensor([[1.0, -1.0, 1.0, 0.0, 1.0, 1.0],
                          [2.0, -2.0, -1.0, 0.0, 1.0, -1.0],
                          [1.0, -1.0, 1.0, 0.0, 1.0, float("nan")],
                          [3.0, -3.0, -1.0, 0.0, 1.0, float("nan")]])
    new, imb = calibration_update(psi, gains, eps1=2, eps2=0.01)
    assert imb.tolist() == [4, -4, 0, 0, 4, 0]
    assert torch.allclose(new, torch.tensor([0.49, 0.49, 0.51, 0.51, 0.0, 0.31]))  # clamp at 0
    fixed, _ = calibration_update(psi, gains, steps=torch.tensor([True] * 5 + [False]))
    assert fixed[5] == psi[5]
    sig = schedules.sd3_diffusers(10)
    p0 = initial_psi(sig, 0.7)
    assert p0[-1] == 0 and abs(float(p0[0] * torch.sqrt(sig[0] - sig[1])) - 0.7) < 1e-5  # s_0 = a


def test_calibrate_noise_runs_on_the_gaussian_world():
    sig = schedules.sd3_diffusers(T)
    cond = {"c": torch.zeros(2, 3)}

    def make_batch(it):
        return torch.randn(8, 3, generator=torch.Generator().manual_seed(it)), cond, torch.arange(8) // 4

    psi, hist = calibrate_noise(make_batch, gaussian_world_velocity, sig, score, {"r": 1.0}, iterations=2)
    assert psi.shape == (T,) and psi[-1] == 0 and len(hist) == 2
    steps = torch.arange(T) < T - 1
    for h, nxt in zip(hist, [hist[1]["psi"], psi.tolist()]):
        want = torch.tensor(h["psi"]) + torch.where(torch.tensor(h["imbalance"]).abs() < 2, 0.01, -0.01)
        assert torch.allclose(torch.tensor(nxt)[steps], want[steps].clamp_min(0), atol=1e-6)
    assert math.isfinite(sum(psi.tolist()))


def test_euphonium_folds_its_coefficients_at_the_losss_adv_clip():
    """c·clip(A, ±A_max) must use the loss's A_max (credit.adv_clip): with its own 5.0 and credit.adv_clip = 0.5, the
    trainer's second clip turned c·A (c = 0.5) into clip(0.5·A, ±0.5), i.e. 0.5·clip(A, ±1), not 0.5·clip(A, ±0.5)."""
    from flowalign.credit import clipped_heads

    group = torch.tensor([0, 0, 1, 1])
    eta = torch.tensor([0.3, 0.0])
    vals = {"r": torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 5.0]])}
    inp = _inp(vals, group, eta, adv_clip=0.5)
    cr = assign_credit("euphonium", inp, {"heads": "ora", "c_ora": 0.5})
    loss_adv = clipped_heads(cr, inp.trained, inp.adv_clip)["main"][:, 0]  # what the loss sees
    assert torch.allclose(loss_adv, torch.tensor([-0.25, 0.25, -0.25, 0.25]))  # 0.5 · clip(±1, ±0.5)


def test_euphonium_outcome_head_is_one_clipped_term_per_reward():
    """METHODS §4.5: L = c_ORA·Σ_r w_r·ℓ_clip(ρ, clip(A_r, ±5)) + c_PRA·ℓ_clip(...). One clipped term of the summed
    advantages (the old head) differs from the sum of per-reward terms once the ratio leaves the trust region with
    advantages of opposite signs."""
    from flowalign.credit import clipped_heads

    group = torch.tensor([0, 0, 0, 0])
    eta = torch.tensor([0.3, 0.0])
    r = torch.tensor([0.0, 1.0, 2.0, 3.0])
    q = torch.tensor([3.0, 2.0, 1.0, 0.0])  # opposite ranking: A_r + A_q = 0 for every row
    vals = {"r": torch.zeros(4, 3), "q": torch.zeros(4, 3)}
    inp = _inp(vals, group, eta, rewards={"r": r, "q": q})
    inp = dataclasses.replace(inp, reward_weights={"r": 1.0, "q": 0.5})
    cr = assign_credit("euphonium", inp, {"heads": "ora"})
    assert set(cr.heads) == {"outcome/q"}
    heads = clipped_heads(cr, inp.trained, inp.adv_clip)
    logp, old = torch.full((4,), 0.5), torch.zeros(4)  # ρ = e^0.5, outside 1 ± 0.2
    got = sum(clipped_surrogate(logp, old, a[:, 0], 0.2)[0] for a in heads.values())  # [4]
    from flowalign.credit import group_normalize
    want = sum(w * clipped_surrogate(logp, old, group_normalize(x, group, eps=1e-8), 0.2)[0]
               for x, w in ((r, 1.0), (q, 0.5)))
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="scale the reward weights"):
        assign_credit("euphonium", dataclasses.replace(inp, reward_weights={"r": 1.0, "q": 2.0}), {"heads": "ora"})


@pytest.mark.parametrize("setup", ["one_reward", "reward_sum", "advantage_sum"])
def test_euphonium_outcome_head_uses_its_own_eps(setup):
    """ORA = (R − mean_group R)/(std + eps) with Euphonium's ``eps`` option (METHODS.md §4.5; 1e-8 upstream), not
    credit.std_eps: a large eps shrinks every advantage by std/(std + eps), most in a group of tiny spread."""
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    eta = torch.tensor([0.3, 0.0])
    r = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0, 5.001, 5.002, 5.003], dtype=torch.float64)  # group 1: std ~1.1e-3
    q = torch.tensor([2.0, 0.0, 3.0, 1.0, 1.0, 1.0, 1.004, 1.004], dtype=torch.float64)  # group 1: std 2e-3

    def z(x, eps):
        out = torch.zeros_like(x)
        for g in (0, 1):
            m = group == g
            out[m] = (x[m] - x[m].mean()) / (x[m].std(unbiased=False) + eps)
        return out

    rewards, weights, agg = {"r": r, "q": q}, {"r": 1.0, "q": 0.5}, "advantage_sum"
    if setup == "one_reward":
        rewards, weights = {"r": r}, {"r": 1.0}
    elif setup == "reward_sum":
        agg = "reward_sum"
    inp = _inp({k: torch.zeros(8, 3) for k in rewards}, group, eta, rewards=rewards, eps=1e-4, aggregate=agg)
    inp = dataclasses.replace(inp, reward_weights=weights)
    for eps in (1e-8, 0.5, 2.0):
        cr = assign_credit("euphonium", inp, {"heads": "ora", "eps": eps})
        if agg == "reward_sum":
            want = {"main": z(r + 0.5 * q, eps)}
        else:
            want = {"main": z(r, eps), **({"outcome/q": 0.5 * z(q, eps)} if "q" in weights else {})}
        got = {"main": cr.advantages, **dict(cr.heads or {})}
        assert set(got) == set(want)
        for h, a in got.items():
            assert torch.allclose(a[:, 0].double(), want[h], atol=1e-5, rtol=1e-5)
            assert (a[:, 1] == 0).all()
    cr = assign_credit("euphonium", inp, {"heads": "ora", "eps": 1.0})
    for a in (cr.advantages, *dict(cr.heads or {}).values()):  # std ≤ 3e-3 ≪ eps = 1: that group is nearly silenced
        assert a[4:, 0].abs().max() < 3e-3 and a[:4, 0].abs().max() > 0.1


def test_euphonium_reward_sum_outcome_head_is_c_times_the_clipped_advantage():
    """reward_sum: ORA = c_ORA·clip(A, ±A_max) (METHODS.md §4.5: clip first, then fold c, exact because ℓ_clip is
    positively homogeneous in A), not clip(c_ORA·A, ±A_max), which would let c·A reach A_max. Here A_max = 0.5 and
    c = 0.5: A = ±1.34 gives ±0.25, A = ±0.45 gives ±0.22."""
    from flowalign.credit import clipped_heads

    group = torch.tensor([0, 0, 0, 0])
    eta = torch.tensor([0.3, 0.0])
    r, q = torch.tensor([0.0, 0.0, 1.0, 2.0]), torch.tensor([0.0, 1.0, 1.0, 1.0])  # R = r + q = 0, 1, 2, 3
    inp = _inp({"r": torch.zeros(4, 3), "q": torch.zeros(4, 3)}, group, eta, rewards={"r": r, "q": q},
               aggregate="reward_sum", adv_clip=0.5)
    a = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / 1.25 ** 0.5  # z-score of R: ±1.342, ±0.447
    want = 0.5 * a.clamp(-0.5, 0.5)
    for opts in ({}, {"adv_clip": 0.5}):  # adv_clip None = the loss's A_max (CreditInput.adv_clip)
        cr = assign_credit("euphonium", inp, {"heads": "ora", "c_ora": 0.5, **opts})
        assert cr.heads is None
        assert torch.allclose(cr.advantages[:, 0], want, atol=1e-6) and (cr.advantages[:, 1] == 0).all()
        assert torch.allclose(clipped_heads(cr, inp.trained, inp.adv_clip)["main"][:, 0], want, atol=1e-6)


# ------------------------------------------------------------------------------------------ NaN ("not applicable") rewards


def _drop(case, keep):
    """``_cases()[case]`` restricted to the rows ``keep`` (as if the dropped rollouts had never been sampled)."""
    vals, group, eta, ex, opts, trained = _cases()[case]
    ex = {k: (v[keep] if k in ("branch_step", "prm_traj") else v) for k, v in ex.items()}
    return ({k: v[keep] for k, v in vals.items()}, group[keep], eta, ex, opts,
            None if trained is None else trained[keep])


def _nan_case_credit(vals, group, eta, ex, opts, trained, name, **kw):
    prm = ex.get("prm_traj")
    tex = {k: v for k, v in ex.items() if k != "prm_traj"}
    inp = _inp(vals, group, eta, trained=trained, extras_traj=tex, extras={"prm": prm} if prm is not None else {}, **kw)
    return assign_credit(name, inp, opts)


@pytest.mark.parametrize("name", sorted(CREDIT))
def test_a_rollout_without_a_reward_gets_zero_credit_and_sits_out_the_statistics(name):
    """REWARDS_AND_EVAL.md §1: a NaN reward masks the rollout out of the group statistics and the loss. DenseGRPO,
    TP-GRPO, Stepwise-Flow-GRPO, G²RPO and Euphonium's process head used to credit such a row from its (finite)
    probe values, e.g. A = [-0.17, 0.35, 0.30, 0] under dense_gain, and let it shift its group's statistics."""
    if name == "tree":
        from test_tree import _hand_tree
        from test_tree import _inp as tree_inp

        node, depth, trained = _hand_tree()
        r = torch.tensor([float("nan"), 3.0, 5.0, 11.0])  # row 0 represents shared edges (node 1) too
        cr = assign_credit("tree", tree_inp(r, node, depth, trained, torch.zeros(4, dtype=torch.long)))
        heads = {"main": cr.advantages, **dict(cr.heads or {})}
        assert all((a[0] == 0).all() and torch.isfinite(a).all() for a in heads.values())
        assert (cr.advantages[1:] != 0).any()
        return
    vals, group, eta, ex, opts, trained = _cases()[name]
    nan = {k: v.clone() for k, v in vals.items()}
    for v in nan.values():
        v[0, -1] = float("nan")  # row 0: every reward "not applicable"
    cr = _nan_case_credit(nan, group, eta, ex, opts, trained, name)
    heads = {"main": cr.advantages, **dict(cr.heads or {})}
    for h, a in heads.items():
        assert (a[0] == 0).all(), (h, a[0])
        assert torch.isfinite(a[1:]).all(), h
    assert (cr.advantages[1:] != 0).any()
    # the other rows' credit is what they get when row 0 was never sampled: it took no part in any statistic
    keep = torch.arange(1, 8)
    ref = _nan_case_credit(*_drop(name, keep), name)
    for h, a in {"main": ref.advantages, **dict(ref.heads or {})}.items():
        assert torch.allclose(heads[h][1:], a, atol=1e-5), h


@pytest.mark.parametrize("name", ["outcome", "dense_gain", "turning_points", "value_anchor"])
def test_the_masking_unit_follows_the_aggregation(name):
    """reward_sum: Σ_k w_k·R_k is undefined when one R_k is NaN, so the rollout gets 0. advantage_sum: the unit is
    the (rollout, reward) pair, so the rollout keeps the other rewards' terms (a prompt a reward does not apply to
    still trains on the rest)."""
    from flowalign.credit import rows_with_reward

    vals, group, eta, *_ = _cases()[name]
    nan = {k: v.clone() for k, v in vals.items()}
    nan["r"][0, -1] = float("nan")  # row 0: reward r "not applicable", q fine
    rew = {k: v[:, -1].clone() for k, v in nan.items()}
    assert rows_with_reward(rew, {"r": 1.0, "q": 1.0}, "reward_sum").tolist() == [False] + [True] * 7
    assert rows_with_reward(rew, {"r": 1.0, "q": 1.0}, "advantage_sum").all()
    summed = assign_credit(name, _inp(nan, group, eta, aggregate="reward_sum")).advantages
    assert (summed[0] == 0).all() and torch.isfinite(summed).all() and (summed[1:] != 0).any()
    both = assign_credit(name, _inp(nan, group, eta)).advantages  # advantage_sum, weights 1
    only_q = assign_credit(name, _inp({"q": nan["q"]}, group, eta)).advantages
    only_r = assign_credit(name, _inp({"r": nan["r"]}, group, eta)).advantages
    assert (only_r[0] == 0).all() and (only_q[0] != 0).any()
    assert torch.allclose(both, only_r + only_q, atol=1e-6)


# ------------------------------------------------------------------------------------------ preflight


def test_preflight_names_the_settings_that_would_fail_mid_run():
    from flowalign.credit import preflight

    one, two = {"r": 1.0}, {"r": 1.0, "q": 0.5}

    def pf(name, options=None, weights=one, aggregate="advantage_sum", guided=False):
        return preflight(name, options or {}, reward_weights=weights, aggregate=aggregate, guided=guided)

    msg = pf("euphonium")
    assert msg and "\n" not in msg and "sampler.guide=reward_grad" in msg and "pra_probe" in msg
    assert "heads=ora" in msg and "pra" in pf("euphonium", {"heads": "pra"})
    assert pf("euphonium", guided=True) is None and pf("euphonium", {"pra_probe": "x0"}) is None
    assert pf("euphonium", {"heads": "ora"}) is None
    # several rewards: c_ora·w_k folds into each reward's clipped term, which must be in (0, 1]
    assert pf("euphonium", {"heads": "ora"}, weights=two) is None
    msg = pf("euphonium", {"heads": "ora"}, weights={"r": 1.0, "q": 2.0})
    assert msg and "q: 2" in msg and "reward.weights" in msg and "\n" not in msg
    assert pf("euphonium", {"heads": "ora", "c_ora": 0.5}, weights={"r": 1.0, "q": 2.0}) is None
    assert "r: -1" in pf("euphonium", {"heads": "ora"}, weights={"r": -1.0, "q": 1.0})
    assert pf("euphonium", {"heads": "ora"}, weights={"r": 1.0, "q": 2.0}, aggregate="reward_sum") is None
    assert pf("euphonium", {"heads": "pra", "pra_probe": "x0"}, weights={"r": 1.0, "q": 2.0}) is None
    assert pf("euphonium", {"heads": "ora"}, weights={"r": 3.0}) is None  # one reward: one term, nothing folded
    # every combination preflight accepts runs; every one it refuses fails inside the credit
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    eta = torch.tensor([0.7, 0.7, 0.0])
    vals = {k: torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i, k in enumerate("rq")}
    for opts, weights in [({}, one), ({"heads": "ora"}, {"r": 1.0, "q": 2.0}), ({"heads": "ora"}, two)]:
        inp = dataclasses.replace(_inp({k: vals[k] for k in weights}, group, eta), reward_weights=weights)
        if pf("euphonium", opts, weights=weights) is None:
            assign_credit("euphonium", inp, opts)
        else:
            with pytest.raises(ValueError):
                assign_credit("euphonium", inp, opts)
    # the other methods need nothing beyond their annotations; unknown names say so
    assert all(pf(n, weights=two) is None for n in CREDIT if n != "euphonium")
    assert "unknown credit method" in pf("dense_gains")
    # Euphonium's own eps and adv_clip carry ranges too: a negative eps can divide by 0, adv_clip <= 0 inverts the clip
    import typing

    from flowalign.train import option_value_error

    hints = typing.get_type_hints(CREDIT["euphonium"], include_extras=True)
    assert option_value_error(hints["adv_clip"], 0.0) and option_value_error(hints["adv_clip"], None) is None
    assert option_value_error(hints["eps"], -1e-8) and option_value_error(hints["eps"], 0.0) is None
    with pytest.raises(ValueError, match="adv_clip"):
        assign_credit("euphonium", _inp(vals, group, eta), {"heads": "ora", "adv_clip": -1.0})


# ------------------------------------------------------------------------------------------ VGPO's z_floor and std settings


def test_vgpo_z_floor_must_be_positive_in_the_config_and_the_function():
    """z_floor = 0 divided a tied group's 0 by 0: NaN credit for the whole group."""
    from flowalign import config as C
    from flowalign.errors import UserError
    from flowalign.train import _check_components

    for bad in ("0", "-0.5"):
        cfg = C.load_config(None, ["credit.name=value_anchor", f"credit.options.z_floor={bad}"])
        with pytest.raises(UserError, match=r"credit.options.z_floor=.*expected a value in \(0, inf\]"):
            _check_components(cfg)
    _check_components(C.load_config(None, ["credit.name=value_anchor", "credit.options.z_floor=0.001"]))
    group = torch.tensor([0, 0, 1, 1])
    v = torch.tensor([[.1, .2, .3, .4, .5], [.1, .2, .3, .4, .5], [.3, .5, .2, .1, .2], [.0, .3, .3, .6, .9]])
    eta = torch.tensor([.7, .7, .7, .0])
    with pytest.raises(ValueError, match="z_floor"):
        assign_credit("value_anchor", _inp({"r": v}, group, eta), {"z_floor": 0.0})
    adv = assign_credit("value_anchor", _inp({"r": v}, group, eta), {"z_floor": 1e-12}).advantages
    assert torch.isfinite(adv).all()


def test_vgpo_honours_the_std_scope_and_ddof():
    """credit.std_scope / credit.std_ddof were ignored by value_anchor (its z used the group's population std)."""
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    eta = torch.tensor([.7, .7, .7, .0])
    v = torch.rand(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    v[3:] *= 10
    z_only = {"kappa": 0.0, "omega": "none"}

    def adv(**kw):
        return assign_credit("value_anchor", _inp({"r": v.clone()}, group, eta, **kw), z_only).advantages[:, :3]

    q = process_q(v[:, 1:])[:, :3]  # [B, 3]
    mean = torch.stack([q[group == g].mean(0) for g in (0, 1)])[group]  # [B, 3] group means
    pop = torch.stack([q[group == g].std(0, unbiased=False) for g in (0, 1)])[group]
    assert torch.allclose(adv(), ((q - mean) / pop).float(), atol=1e-5)
    samp = torch.stack([q[group == g].std(0, unbiased=True) for g in (0, 1)])[group]
    assert torch.allclose(adv(std_ddof=1), ((q - mean) / samp).float(), atol=1e-5)
    glob = torch.sqrt(((q - q.mean(0)) ** 2).mean(0))  # [3] the std of every rollout's Q at each step
    assert torch.allclose(adv(std_scope="global"), ((q - mean) / glob).float(), atol=1e-5)
    # global scope across two identical ranks (reduce_sum doubles every statistic) is the one-process value
    assert torch.allclose(adv(std_scope="global", reduce_sum=lambda t: 2 * t), adv(std_scope="global"), atol=1e-6)
    tied = v.clone()
    tied[:3] = tied[0]
    assert (assign_credit("value_anchor", _inp({"r": tied}, group, eta, std_scope="global"), z_only)
            .advantages[:3] == 0).all()  # a tied group gets 0 under the global std too


# ------------------------------------------------------------------------------------------ TempFlow weights, kernel options


def test_branch_weights_use_the_kernel_options_the_children_were_drawn_with():
    """sampler.plan_options.sigma_1 reaches the branch kernel (s_0 = a·sqrt(1/(1 − σ_1))·sqrt(Δ_0)), but the
    weights recomputed s_k with the kernel's default σ_1 (= σ_1 of the grid): w_0 = 1.58 instead of 0.51."""
    from flowalign.samplers.kernels import flow_sde

    steps = 10
    sig = schedules.sd3_diffusers(steps)
    eta = eta_schedule(steps, 0.7)
    cond = {"c": torch.zeros(1, 3)}
    tr = PLANS["branch"](gaussian_world_velocity, torch.randn(2, 3), sig, cond, cond_index=torch.zeros(2, dtype=torch.long),
                         eta=eta, children=2, branch_steps="all", sigma_1=0.5,
                         generator=torch.Generator().manual_seed(0))
    # the plan records the kernel options it drew with (extras["kernel_options"]; samplers/plans.py)
    tr = dataclasses.replace(tr, extras={**tr.extras, "kernel_options": {"sigma_1": 0.5}})
    z = torch.zeros(1, 1)
    drawn = torch.stack([flow_sde(z, z, sig[j], sig[j + 1], 0.7, sigma_1=0.5).std.reshape(()) for j in range(9)])
    inp = CreditInput(traj=tr, rewards={"r": torch.randn(tr.batch_size)}, reward_weights={"r": 1.0},
                      trained=tr.extras["trained"].clone())
    cr = assign_credit("branch", inp)
    k = tr.extras["branch_step"]
    got = torch.stack([cr.weights[(k == j).nonzero()[0, 0], j] for j in range(9)])
    assert torch.allclose(got, (drawn / drawn.mean()).float(), atol=1e-5)
    assert abs(float(got[0]) - 0.509) < 1e-3  # not the default-σ_1 weight 1.577 (test_tempflow_weights_sd35_vector)
    assert torch.allclose(tempflow_weights(sig, 0.7, range(9), sigma_1=0.5), got, atol=1e-6)
