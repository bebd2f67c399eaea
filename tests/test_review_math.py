"""Review of the sampling / process-reward / credit / loss math against METHODS.md: regression and property tests."""

import itertools
import math

import pytest
import torch

from flowalign.credit import CreditInput, group_normalize, outcome, step_normalize
from flowalign.loss import clipped_surrogate, gaussian_kl
from flowalign.samplers import KERNELS, branch, eta_schedule, gaussian_log_prob, sample, sd3_diffusers, step_log_prob
from flowalign.samplers.plans import branch as plan_branch
from flowalign.types import Trajectory
from flowalign.values import probe_values, probe_values_naive

T = 6


def elementwise_velocity(x, sigma, cond):
    """Batch-invariant (elementwise) velocity: bit-exact comparisons across batch compositions are meaningful."""
    s = sigma.to(torch.float32).view(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(x) * (0.5 + s) - cond["e"] * (1 - s) + 0.1 * x * x


def _cond(n=2, shape=(3, 2), seed=0):
    return {"e": torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))}


# ------------------------------------------------------------------------------------------ regressions


def test_global_scope_all_equal_group_gets_exactly_zero():
    """METHODS §3.2: a group whose rewards are all equal gets A = 0 — also with std_scope="global" (Flow-GRPO's
    default), where float64 rewards (e.g. reward_sum with weight 1/26) left r − mean ≈ 1e-16 ≠ 0, so zero-std
    filtering (A != 0) kept those rollouts."""
    flat = [0.7] * 24
    r = torch.tensor(flat + [0.0, 1.0, 2.0], dtype=torch.float64)
    g = torch.tensor([0] * 24 + [1, 1, 1])
    for scope in ("global", "group"):
        a = group_normalize(r, g, scope=scope)
        assert bool((a[:24] == 0).all()), (scope, a[:3].tolist())
        assert bool((a[24:] != 0).any())
    # per-step columns (dense credit under the global scope)
    x = torch.stack([r, r / 3.0], dim=1)  # [B, 2]
    a = step_normalize(x, g, scope="global")
    assert bool((a[:24] == 0).all())
    # the outcome assigner with reward_sum aggregation and weight 1/26 (PickScore/26)
    traj = Trajectory(latents=torch.zeros(27, T + 1, 2), sigmas=sd3_diffusers(T), eta=eta_schedule(T, 0.7),
                      log_probs=torch.zeros(27, T), cond={"c": torch.zeros(1, 2)},
                      cond_index=torch.zeros(27, dtype=torch.long), group=g, prompts=("p",))
    rw = torch.tensor([22.37] * 24 + [21.0, 22.0, 23.0], dtype=torch.float32)
    inp = CreditInput(traj=traj, rewards={"pick": rw}, reward_weights={"pick": 1 / 26}, aggregate="reward_sum",
                      std_scope="global", trained=torch.ones(27, T, dtype=torch.bool))
    adv = outcome(inp).advantages
    assert bool((adv[:24] == 0).all())
    assert bool((adv[24:] != 0).any())


@pytest.mark.parametrize("step", [0, T - 1])
def test_branch_at_first_and_last_step_keeps_velocities(step):
    """``loop.branch`` at step 0 (empty ODE prefix) or T−1 (empty suffix) with keep_velocities used to fail in
    torch.stack([]); velocities must be [B·K, T, *latent] with v(x_t, σ_t) at every state."""
    cond = _cond()
    x = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(1))
    sig = sd3_diffusers(T)
    tr = branch(elementwise_velocity, x, sig, cond, step=step, children=3, eta=0.7, keep_velocities=True,
                generator=torch.Generator().manual_seed(2))
    assert tuple(tr.velocities.shape) == (6, T, 3, 2)
    ci = tr.cond_index
    for t in range(T):
        v = elementwise_velocity(tr.latents[:, t], sig[t].expand(6), {"e": cond["e"][ci]})
        assert torch.equal(tr.velocities[:, t], v)
    assert bool((tr.log_probs[:, step] != 0).all())
    # a zero-step sample returns empty [B, 0, *latent] velocities / means
    z = sample(elementwise_velocity, x, sig[:1], cond, eta=0.0, kernel="euler", keep_velocities=True, keep_means=True)
    assert tuple(z.velocities.shape) == (2, 0, 3, 2) and tuple(z.means.shape) == (2, 0, 3, 2)


# ------------------------------------------------------------------------------------------ kernel properties


def _ref_transition(name, x, v, s, sn, a, s1):
    """METHODS §2.1–2.4 in float64, written independently of samplers.kernels."""
    x, v = x.double(), v.double()
    dt = sn - s
    if name == "euler" or a == 0:
        return x + dt * v, 0.0
    x1 = x + (1 - s) * v
    x0 = x - s * v
    if name == "flow_sde":
        st = s if s < 1 else s1
        g = a * math.sqrt(s / (1 - st))
        return x + dt * (v + g * g / (2 * s) * x1), g * math.sqrt(-dt)
    if name == "dance_sde":
        return x + dt * (v + a * a / (2 * s) * x1), a * math.sqrt(-dt)
    if name == "ddim_sde":  # METHODS §4.6: s = a·σ'·√(1 − σ), DDIM's coefficient-preserving mean
        std = a * sn * math.sqrt(1 - s)
        return (1 - sn) * x0 + math.sqrt(max(sn * sn - std * std, 0.0)) * x1, std
    std = sn * math.sin(a * math.pi / 2)
    return (1 - sn) * x0 + math.sqrt(max(sn * sn - std * std, 0.0)) * x1, std


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_stored_log_probs_equal_an_independent_float64_gaussian(name):
    """The rollout's stored log p (reduce=sum and mean) equals the Gaussian density of METHODS §2.5 with μ, s from
    an independent float64 implementation of §2.1–2.4; η = 0 steps store 0 and are exact Euler."""
    sig = sd3_diffusers(T)
    a = {"flow_sde": 0.7, "dance_sde": 0.3, "cps": 0.8, "ddim_sde": 0.7, "euler": 0.5}[name]
    eta = eta_schedule(T, a, window=(1, 3))
    cond = _cond()
    x0 = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(5))
    ci = torch.tensor([0, 0, 1, 1])
    for reduce in ("sum", "mean"):
        tr = sample(elementwise_velocity, x0, sig, cond, eta=eta, kernel=name, reduce=reduce, cond_index=ci,
                    generator=torch.Generator().manual_seed(6), keep_velocities=True)
        for t in range(T):
            x, xn, v = tr.latents[:, t], tr.latents[:, t + 1], tr.velocities[:, t]
            mu, std = _ref_transition(name, x, v, float(sig[t]), float(sig[t + 1]), float(eta[t]), float(sig[1]))
            if std == 0:
                assert bool((tr.log_probs[:, t] == 0).all())
                assert torch.equal(xn, x + (sig[t + 1] - sig[t]) * v)  # exact Euler (fp32)
                continue
            ref = (-(xn.double() - mu) ** 2 / (2 * std * std) - math.log(std) - 0.5 * math.log(2 * math.pi))
            ref = ref.flatten(1).sum(1) if reduce == "sum" else ref.flatten(1).mean(1)
            torch.testing.assert_close(tr.log_probs[:, t].double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_bf16_inputs_still_do_fp32_kernel_math(name):
    """METHODS §2: x, v (and x_{t+1}) are cast to fp32 before any kernel arithmetic."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 3, generator=g).to(torch.bfloat16)
    v = torch.randn(5, 4, 3, generator=g).to(torch.bfloat16)
    sig = sd3_diffusers(T)
    s, sn = sig[:5], sig[1:6]
    eta = torch.tensor([0.7, 0.0, 0.5, 0.7, 0.0])
    tr = KERNELS[name](x, v, s, sn, eta)
    ref = KERNELS[name](x.float(), v.float(), s, sn, eta)
    assert tr.mean.dtype == torch.float32 and torch.as_tensor(tr.std).dtype == torch.float32
    assert torch.equal(tr.mean, ref.mean) and torch.equal(torch.as_tensor(tr.std), torch.as_tensor(ref.std))
    lp = gaussian_log_prob(x, tr.mean.to(torch.bfloat16), tr.std)
    assert lp.dtype == torch.float32
    # rows with η = 0 are bit-exact Euler even in a mixed batch
    eu = x.float() + (sn - s).view(-1, 1, 1) * v.float()
    zero = eta == 0
    assert torch.equal(tr.mean[zero], eu[zero])
    assert bool((torch.as_tensor(tr.std).reshape(5, -1)[zero] == 0).all())


# ------------------------------------------------------------------------------------------ plans / engine


@pytest.mark.parametrize("kernel", ["flow_sde", "cps", "dance_sde"])
def test_branch_plan_on_policy_ratio_is_exactly_one_in_shuffled_micro_batches(kernel):
    """§3.8 for the branch plan: re-scoring the branch edges in shuffled flat micro-batches (mixed k) with the
    same kernel gives ρ ≡ 1 bit for bit, and the first update's clipfrac is 0; the exact KL to itself is 0."""
    sig = sd3_diffusers(T)
    cond = _cond()
    noise = torch.randn(3, 3, 2, generator=torch.Generator().manual_seed(3))
    ci = torch.tensor([0, 0, 1])
    a = {"flow_sde": 0.7, "cps": 0.8, "dance_sde": 0.3}[kernel]
    tr = plan_branch(elementwise_velocity, noise, sig, cond, eta=eta_schedule(T, a), children=2, kernel=kernel,
                     cond_index=ci, generator=torch.Generator().manual_seed(4))
    b_idx, t_idx = tr.extras["trained"].nonzero(as_tuple=True)
    perm = torch.randperm(b_idx.shape[0], generator=torch.Generator().manual_seed(5))
    b_idx, t_idx = b_idx[perm], t_idx[perm]
    for mb in torch.split(torch.arange(b_idx.shape[0]), 5):
        b, t = b_idx[mb], t_idx[mb]
        logp, trn = step_log_prob(elementwise_velocity, tr.latents[b, t], tr.latents[b, t + 1], tr.sigmas[t],
                                  tr.sigmas[t + 1], tr.eta[t], {"e": cond["e"][tr.cond_index[b]]}, kernel=kernel)
        assert torch.equal(logp, tr.log_probs[b, t])
        _, ratio = clipped_surrogate(logp, tr.log_probs[b, t], torch.ones_like(logp), 1e-5)
        assert bool((ratio == 1).all())
        assert bool((gaussian_kl(trn.mean, trn.mean, trn.std, tr.sigmas[t + 1] - tr.sigmas[t]) == 0).all())


def test_probe_engine_equals_naive_on_shared_noise_chains_and_branch_trees():
    """The batched engine (staggered, reuse, ODE-skip, dedupe, chunking) equals the one-probe-at-a-time reference
    bit for bit on a batch-invariant velocity, for chains with shared initial noise and windowed SDE, and on a
    branched rollout whose children share the trunk prefix."""
    sig = sd3_diffusers(T)
    cond = _cond()

    def score(lat, rows):
        return {"r": lat.flatten(1).sum(1), "q": (lat ** 2).flatten(1).mean(1)}

    noise = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(0)).repeat_interleave(3, 0)
    ci = torch.tensor([0, 0, 0, 1, 1, 1])
    cases = [("flow_sde", eta_schedule(T, 0.7)), ("cps", eta_schedule(T, 0.5, window=(1, 3)))]
    for kernel, eta in cases:
        tr = sample(elementwise_velocity, noise, sig, cond, eta=eta, kernel=kernel, cond_index=ci, keep_velocities=True,
                    generator=torch.Generator().manual_seed(3))
        mask = torch.ones(6, T + 1, dtype=torch.bool)
        for mode in ("x0", "ode:2", "ode:full", "ode2:2"):
            ref = probe_values_naive(elementwise_velocity, tr, mask, mode, score)
            for reuse, skip, dedupe, mb in itertools.product([True, False], [True, False], [True, False], [None, 2]):
                got = probe_values(elementwise_velocity, tr, mask, mode, score, reuse_velocity=reuse, skip_ode=skip,
                                   dedupe=dedupe, max_batch=mb)
                for k in ref:
                    assert torch.equal(got[k], ref[k]), (kernel, mode, reuse, skip, dedupe, mb, k)
    trb = plan_branch(elementwise_velocity, torch.randn(2, 3, 2), sig, cond, eta=eta_schedule(T, 0.7), children=3,
                      generator=torch.Generator().manual_seed(4), keep_velocities=True, branch_steps=[1, 3])
    mask = torch.ones(trb.batch_size, T + 1, dtype=torch.bool)
    for mode in ("x0", "ode:2", "ode:full", "ode2:full"):
        ref = probe_values_naive(elementwise_velocity, trb, mask, mode, score)
        got = probe_values(elementwise_velocity, trb, mask, mode, score)
        for k in ref:
            assert torch.equal(got[k], ref[k]), (mode, k)
