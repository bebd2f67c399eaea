"""`flowalign bench grad-snr`: per-step gradients, group halves and the split-half cosine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from cli_checks import fails as _fails, no_model  # noqa: F401  (the fixture is used by name)

from flowalign.bench_snr import group_halves, per_step_grads, split_half_cosine
from flowalign.samplers import eta_schedule, gather_cond, sample, schedules, step_log_prob
from test_values import TinyNet  # a tiny velocity model with weights


def test_per_step_gradients_recombine_into_the_batched_grpo_gradient():
    """Σ_{i,t} A[i,t]·G[t,i] must equal autograd of Σ A·log p over one flat batch that mixes steps and rollouts."""
    torch.manual_seed(0)
    net = TinyNet()
    params = list(net.parameters())
    steps_t = 5
    cond = {"c": torch.tensor([[-0.3] * 4, [0.4] * 4])}
    ci = torch.tensor([0, 0, 0, 1, 1, 1])
    with torch.no_grad():
        traj = sample(net, torch.randn(6, 4), schedules.sd3_diffusers(steps_t), cond, eta=eta_schedule(steps_t, 0.7),
                      kernel="flow_sde", generator=torch.Generator().manual_seed(1), cond_index=ci, group=ci)
    steps = [0, 1, 3]
    grads = per_step_grads(net, params, traj, steps, kernel="flow_sde")  # [3, 6, D]
    assert grads.shape == (3, 6, sum(p.numel() for p in params))
    adv = torch.randn(6, steps_t)
    pairs = torch.tensor([(i, t) for i in range(6) for t in steps])
    b, t = pairs[:, 0], pairs[:, 1]
    for p in params:
        p.grad = None
    lp, _ = step_log_prob(net, traj.latents[b, t], traj.latents[b, t + 1], traj.sigmas[t], traj.sigmas[t + 1],
                          traj.eta[t], gather_cond(traj.cond, traj.cond_index[b]), kernel="flow_sde")
    (adv[b, t] * lp).sum().backward()
    expected = torch.cat([p.grad.reshape(-1) for p in params])
    got = sum(adv[:, s] @ grads[h] for h, s in enumerate(steps))
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_group_halves_split_whole_groups_disjointly():
    w = group_halves(6, 4, splits=5, seed=0)  # [5, 2, 24]
    assert w.shape == (5, 2, 24)
    for s in range(5):
        a, b = w[s, 0] > 0, w[s, 1] > 0
        assert not (a & b).any() and (a | b).all()  # disjoint, together every rollout
        for half in (a, b):
            per_group = half.view(6, 4)
            assert ((per_group.sum(1) == 0) | (per_group.sum(1) == 4)).all()  # whole groups only
        assert torch.allclose(w[s].sum(1), torch.ones(2))  # means
    with pytest.raises(ValueError):
        group_halves(1, 4, 2, 0)


def test_split_half_cosine_is_one_for_pure_signal_and_near_zero_for_pure_noise():
    b, d = 32, 20000
    w = group_halves(8, 4, splits=10, seed=1)
    signal = torch.randn(d).expand(1, b, d).clone()  # every rollout's gradient is the same vector
    adv = torch.ones(b, 3)
    assert torch.allclose(split_half_cosine(signal, adv, [1], w), torch.ones(10), atol=1e-5)
    noise = torch.randn(1, b, d, generator=torch.Generator().manual_seed(2))  # independent per rollout
    assert split_half_cosine(noise, adv, [1], w).abs().max() < 0.05
    # signal + noise: in between, and the per-step selection only counts the selected steps
    mixed = torch.cat([signal + 3 * noise, noise])  # step 0 carries signal, step 1 none
    c_sig = split_half_cosine(mixed, adv, [0, 2], w, select=[0]).mean()
    c_all = split_half_cosine(mixed, adv, [0, 2], w).mean()
    assert 0.2 < c_sig < 0.95 and 0 < c_all < c_sig


def test_bench_grad_snr_from_the_command_line(tmp_path):
    """`flowalign bench grad-snr ... --json PATH` writes the figures; a bad method is one line, exit 2."""
    out = tmp_path / "snr.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "flowalign.cli", "bench", "grad-snr", *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=300)
    r = run("--prompts", "2", "--groups-per-prompt", "2", "--group-size", "2", "--steps", "4", "--train-fraction",
            "0.5", "--methods", "flow_grpo,dense_x0", "--splits", "4", "--threads", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["rollouts"] == 8 and res["steps"] == [0, 1]
    for m in ("flow_grpo", "dense_x0"):
        assert -1.0 <= res["methods"][m]["cos"] <= 1.0 and len(res["methods"][m]["per_step"]) == 2
    assert "flow_grpo" in r.stdout
    # an SDE window (Euler outside it) trains exactly the window's steps, whatever --train-fraction says; the
    # earlier figures are replaced only with --overwrite
    w = run("--prompts", "2", "--groups-per-prompt", "2", "--group-size", "2", "--steps", "5", "--window", "1,3",
            "--init-noise", "group", "--methods", "flow_grpo", "--splits", "2", "--threads", "1", "--json", str(out),
            "--overwrite")
    assert w.returncode == 0, w.stderr[-2000:]
    assert json.loads(out.read_text())["steps"] == [1, 2] and "initial noise per group" in w.stdout
    badw = run("--window", "3,9", "--steps", "5")
    assert badw.returncode == 2 and "--window=3,9 must satisfy" in badw.stderr
    badk = run("--kernel", "nope")
    assert badk.returncode == 2 and "invalid choice: 'nope'" in badk.stderr
    bad = run("--methods", "flow_grpo,nope", "--json", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "unknown grad-snr method" in bad.stderr
    assert sum("error" in ln.lower() for ln in bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad.json").exists()


# -------------------------------------------------------------------------- undefined cosines and odd group counts


def test_split_half_cosine_is_undefined_not_zero_without_a_gradient():
    """All-zero advantages (e.g. a reward that is constant in every group) give two zero gradients; torch's
    cosine_similarity returns 0 for them, which the bench printed as c = +0.000, 'no signal detected'."""
    from flowalign.bench_snr import group_halves, split_half_cosine

    w = group_halves(4, 2, splits=3, seed=0)  # [3, 2, 8]
    grads = torch.randn(1, 8, 5, generator=torch.Generator().manual_seed(0))  # [S, B, D]
    assert torch.isnan(split_half_cosine(grads, torch.zeros(8, 2), [0], w)).all()
    # one half without gradient: undefined as well; a split with both halves non-zero stays finite
    adv = torch.zeros(8, 2)
    adv[:2, 0] = 1.0  # only group 0 has credit
    c = split_half_cosine(grads, adv, [0], w)
    assert torch.isnan(c).all()
    assert torch.isfinite(split_half_cosine(grads, torch.ones(8, 2), [0], w)).all()


def test_group_halves_are_equal_for_an_odd_number_of_groups():
    """With 3 groups the halves held 2 groups and 1 group, but the bench read the cosine with the equal-halves
    formula n(1 − c)/c and n = B // 2 (a size neither half had)."""
    from flowalign.bench_snr import group_halves

    w = group_halves(3, 2, splits=20, seed=0)  # [20, 2, 6]
    sizes = (w > 0).sum(2)  # [20, 2]
    assert (sizes == 2).all()
    for s in range(20):
        assert not ((w[s, 0] > 0) & (w[s, 1] > 0)).any()
        for k in range(2):
            per_group = (w[s, k] > 0).view(3, 2).sum(1)
            assert ((per_group == 0) | (per_group == 2)).all()  # whole groups only
    assert ((group_halves(6, 4, splits=5, seed=0) > 0).sum(1) == 1).all()  # even counts: every rollout, as before


def test_grad_snr_reports_no_gradient_and_the_true_half_size(monkeypatch, capsys, tmp_path):
    """A constant reward gives no gradient at all: reported as such, not as c = +0.000 'no signal'; with an odd
    number of groups the printed rollouts per half are the halves' real size."""
    import flowalign.rewards as R
    from flowalign.bench_snr import bench_grad_snr

    class Constant:
        name, differentiable = "constant", False

        def __call__(self, images, prompts, metadata=None):
            return torch.full((images.shape[0],), 0.5)

    monkeypatch.setattr(R, "build_reward", lambda name, **kw: Constant())
    out = tmp_path / "snr.json"
    bench_grad_snr(["--prompts", "3", "--groups-per-prompt", "1", "--group-size", "2", "--steps", "3",
                    "--train-fraction", "0.5", "--methods", "flow_grpo", "--splits", "3", "--threads", "1",
                    "--lora-rank", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert "(2 per half)" in text  # 3 groups of 2: each half is 1 group = 2 rollouts (was "3 per half")
    row = next(ln for ln in text.splitlines() if ln.startswith("flow_grpo"))
    assert "no gradient" in row and "+0.000" not in row
    res = json.loads(out.read_text())
    assert res["per_half"] == 2 and math.isnan(res["methods"]["flow_grpo"]["cos"])
    assert res["methods"]["flow_grpo"]["rollouts_for_c_half"] is None


# ------------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, needle", [
    (["--splits", "0"], "--splits"),  # was a NaN table
    (["--splits", "-1"], "--splits"),
    (["--lora-rank", "0"], "--lora-rank"),
    (["--eta", "0"], "no stochastic step"),  # was a TypeError after the rollouts and gradients
    (["--steps", "1"], "no stochastic step"),
    (["--steps", "2", "--train-fraction", "0.4"], "no stochastic step"),
])
def test_grad_snr_refuses_runs_without_a_gradient_to_compare(capsys, no_model, extra, needle):
    _fails(capsys, ["bench", "grad-snr", *extra], needle)


# ------------------------------------------------------------------------------- the cosine's terms and its reading


def test_split_half_cosine_weights_each_step_by_its_own_advantage_column():
    """ĝ_half = Σ_i w_i Σ_h A[i, steps[h]]·G[h, i]: the advantage of the step ``steps[h]`` (not of position h), and
    ``select`` keeps only the listed positions; checked against the sum written out."""
    gen = torch.Generator().manual_seed(3)
    w = group_halves(4, 2, splits=3, seed=0)  # [3, 2, 8]
    grads = torch.randn(2, 8, 6, generator=gen)  # [S, B, D] for steps [0, 2]
    adv = torch.randn(8, 4, generator=gen)  # [B, T]
    steps = [0, 2]

    def expected(sel):
        out = []
        for s in range(3):
            g = [sum(w[s, k, i] * adv[i, steps[h]] * grads[h, i] for i in range(8) for h in sel) for k in range(2)]
            out.append(torch.dot(g[0], g[1]) / (g[0].norm() * g[1].norm()))
        return torch.stack(out)  # [splits]

    assert torch.allclose(split_half_cosine(grads, adv, steps, w), expected([0, 1]), atol=1e-5)
    assert torch.allclose(split_half_cosine(grads, adv, steps, w, select=[1]), expected([1]), atol=1e-5)


def test_group_halves_draw_a_new_random_split_each_time_reproducibly():
    """The spread over splits needs different splits; the same seed gives the same ones."""
    w = group_halves(6, 2, splits=8, seed=0)  # [8, 2, 12]
    assert len({tuple((w[s, 0] > 0).tolist()) for s in range(8)}) > 1
    assert torch.equal(w, group_halves(6, 2, splits=8, seed=0))
    assert not torch.equal(w, group_halves(6, 2, splits=8, seed=1))


def test_grad_snr_reads_the_finite_cosines_per_step_and_shares_noise_within_a_group(monkeypatch, tmp_path):
    """The printed figures from the split cosines: mean and std over the finite splits, n(1 − c)/c rollouts at
    c = 0.5 with n the rollouts per half, one cosine per trained step (position h selects step h), the first
    ⌊f·T⌋ steps trained; with --init-noise group the members of a group share x_1 and groups do not."""
    import flowalign.bench_snr as BS
    import flowalign.samplers.loop as L

    nan = float("nan")
    selects, noises, real = [], [], L.sample

    def fake_cosine(grads, adv, steps, weights, select=None):
        selects.append(select)
        if select is None:
            return torch.tensor([0.2, nan, 0.6, 0.4])  # [splits]: finite mean 0.4, std 0.2
        return torch.full((weights.shape[0],), 0.1 * (select[0] + 1))

    def spy(velocity, noise, *a, **kw):
        noises.append(noise.clone())
        return real(velocity, noise, *a, **kw)

    monkeypatch.setattr(BS, "split_half_cosine", fake_cosine)
    monkeypatch.setattr(L, "sample", spy)
    out = tmp_path / "snr.json"
    BS.bench_grad_snr(["--prompts", "2", "--groups-per-prompt", "2", "--group-size", "2", "--steps", "4",
                       "--train-fraction", "0.6", "--init-noise", "group", "--reward", "saturation", "--methods",
                       "flow_grpo", "--splits", "4", "--threads", "1", "--lora-rank", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["steps"] == [0, 1] and res["per_half"] == 4  # ⌊0.6·4⌋ = 2 steps; 4 groups of 2, 2 per half
    assert res["methods"]["flow_grpo"] == {"cos": 0.4, "split_std": 0.2, "rollouts_for_c_half": 6,
                                           "per_step": [0.1, 0.2]}  # 4·(1 − 0.4)/0.4 = 6
    assert selects == [None, [0], [1]]
    (noise,) = noises
    per_group = noise.flatten(1).view(4, 2, -1)  # [groups, G, D]
    assert torch.equal(per_group, per_group[:, :1].expand_as(per_group))
    assert all(not torch.equal(per_group[i, 0], per_group[j, 0]) for i in range(4) for j in range(i))
