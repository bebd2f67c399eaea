"""Rollout plans and the staggered ODE integrator (METHODS.md §2.7, §2.8, §4.3, §5.1, §5.3).

A **rollout plan** decides which chains are sampled: a plain chain per noise row (Flow-GRPO, DenseGRPO,
TP-GRPO, VGPO, Euphonium), an ODE trunk with K stochastic children per branch step (TempFlow-GRPO), or an
SDE tree that splits every frontier node at fixed steps (BranchGRPO).
Every plan has the signature::

    plan(velocity, noise [S, *latent], sigmas [T+1], cond, *, cond_index [S], group [S], eta [T], kernel,
         generator, keep_velocities, **options) -> Trajectory

and is registered in ``PLANS``. The trainer calls ``PLANS[cfg.sampler.plan]``.

``staggered_ode`` runs many ODE completions that start at different indices of one shared sigma grid in
a single loop over the grid (at index j the forward batch holds every completion positioned at j), so
the number of sequential model launches is T, not Σ(lengths). Branch children are completed with it
here, and the value probes of ``flowalign.values`` are built on it.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Annotated, Callable, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from flowalign.samplers.kernels import gaussian_log_prob, get_kernel
from flowalign.samplers.loop import Generators, _noise_like, eta_schedule, gather_cond, sample
from flowalign.types import Cond, Interval, Trajectory, VelocityFn


class Completion(NamedTuple):
    """Result of ``staggered_ode``."""

    final: Tensor  # [N, *latent] the state reached at σ = 0
    states: Optional[Tensor]  # [N, T+1, *latent] states on the native grid (keep_path; NaN before the start)
    velocities: Optional[Tensor]  # [N, T, *latent] velocity used at each native step (keep_path; NaN elsewhere)


def subgrid(start: int, steps: int, m: Optional[int], stride: int = 1) -> list[int]:
    """Grid indices of an m-step probe from ``start``: round(linspace(start, T, m+1)), deduplicated.

    ``m=None`` is the native remaining grid start, start+1, …, T (METHODS.md §4.0 ``ode_m`` / ``ode_full``).
    When m ≥ T − start the sub-grid is the native grid. ``stride`` λ > 1 (with ``m=None``) is every λ-th native
    index start, start+λ, …, then T (G²RPO's coarsened completion grids, METHODS.md §4.7; the last step may be
    shorter).
    """
    if start >= steps:
        return [steps]
    if stride < 1:
        raise ValueError(f"probe stride must be ≥ 1, got {stride}")
    if stride > 1:
        if m is not None:
            raise ValueError("a probe grid takes either m sub-steps or a stride, not both")
        return list(range(start, steps, stride)) + [steps]
    if m is None or m >= steps - start:
        return list(range(start, steps + 1))
    if m < 1:
        raise ValueError(f"probe steps m must be ≥ 1, got {m}")
    pts = torch.linspace(float(start), float(steps), m + 1, dtype=torch.float64).round().long().tolist()
    out = [pts[0]]
    for p in pts[1:]:
        if p != out[-1]:
            out.append(p)
    return out


def next_table(starts: Tensor, steps: int, m: Optional[int], stride: int = 1) -> Tensor:
    """[N, T+1] long: for each completion, the next grid index after j on its path (−1 where j is off-path)."""
    per_start = torch.full((steps + 1, steps + 1), -1, dtype=torch.long)  # [T+1 (start), T+1 (j)]
    for s in range(steps + 1):
        path = subgrid(s, steps, m, stride)
        for a, b in zip(path[:-1], path[1:]):
            per_start[s, a] = b
    return per_start[starts.cpu()]  # [N, T+1]


def staggered_ode(velocity: VelocityFn, x: Tensor, start: Tensor, sigmas: Tensor, cond: Cond, cond_index: Tensor, *,
                  nxt: Optional[Tensor] = None, method: str = "euler", first_velocity: Optional[Tensor] = None,
                  has_first: Optional[Tensor] = None, max_batch: Optional[int] = None,
                  keep_path: bool = False) -> Completion:
    """Integrate N states ``x`` [N, *latent], each from grid index ``start`` [N] to σ = 0, in one staggered loop.

    Args:
        nxt: [N, T+1] next-index table (``next_table``); default: the native grid (every index).
        method: ``"euler"`` (x ← x + (σ_b − σ_a)·v(x, σ_a)) or ``"midpoint"`` (explicit RK2: v at
            σ_mid = (σ_a + σ_b)/2 from an Euler half-step, 2 NFE per sub-step).
        first_velocity: [N, *latent] cached v(x, σ_start) (velocity reuse, METHODS.md §5.3.1); used for the
            first step of rows where ``has_first`` [N] is true (default: all rows).
        max_batch: rows per model forward (chunking bounds memory); None = one forward per grid index.
        keep_path: also return the native-grid states and velocities (for branch children).

    The Euler update is written exactly like the sampler's Euler kernel (``x + (σ' − σ)·v`` in fp32), so
    completing an all-ODE chain from any of its states reproduces its later states bit for bit when the
    velocity is batch-invariant.
    """
    if method not in ("euler", "midpoint"):
        raise ValueError(f"method must be 'euler' or 'midpoint', got {method!r}")
    n = x.shape[0]
    steps = int(sigmas.shape[0]) - 1
    dev = x.device
    sig = sigmas.to(device=dev, dtype=torch.float32)  # [T+1]
    start = start.to(device=dev, dtype=torch.long)  # [N]
    if nxt is None:
        nxt = next_table(start.cpu(), steps, None)
    nxt = nxt.to(dev)  # [N, T+1]
    cur = x.detach().to(torch.float32).clone()  # [N, *latent]
    pos = start.clone()  # [N] current grid index
    lat = (1,) * (x.dim() - 1)
    if first_velocity is not None and has_first is None:
        has_first = torch.ones(n, dtype=torch.bool, device=dev)
    states = vels = None
    if keep_path:
        states = torch.full((n, steps + 1, *x.shape[1:]), float("nan"), device=dev)  # [N, T+1, *latent]
        states[torch.arange(n, device=dev), start] = cur
        vels = torch.full((n, steps, *x.shape[1:]), float("nan"), device=dev)  # [N, T, *latent]

    def forward(rows: Tensor, xs: Tensor, s: Tensor) -> Tensor:
        chunk = max_batch or max(1, rows.shape[0])
        outs = []
        for i in range(0, rows.shape[0], chunk):
            r = rows[i:i + chunk]
            cb = gather_cond(cond, cond_index[r])
            outs.append(velocity(xs[i:i + chunk], s[i:i + chunk], cb).to(torch.float32))
        return torch.cat(outs) if outs else xs.new_zeros(xs.shape)

    with torch.no_grad():
        for j in range(steps):
            idx = ((pos == j) & (start <= j)).nonzero().flatten()  # [n_j] completions positioned at j
            if idx.numel() == 0:
                continue
            b = nxt[idx, j]  # [n_j] next grid index
            if bool((b < 0).any()):
                raise ValueError("next-index table has a hole on a completion's path")
            xa = cur[idx]  # [n_j, *latent]
            s_a = sig[j].expand(idx.shape[0])  # [n_j]
            s_b = sig[b]  # [n_j]
            v = torch.empty_like(xa)
            use = torch.zeros(idx.shape[0], dtype=torch.bool, device=dev)
            if first_velocity is not None:
                use = has_first[idx] & (start[idx] == j)
                if bool(use.any()):
                    v[use] = first_velocity[idx[use]].to(torch.float32)
            need = (~use).nonzero().flatten()
            if need.numel():
                v[need] = forward(idx[need], xa[need], s_a[need])
            if keep_path:
                vels[idx, j] = v
            if method == "midpoint":
                s_m = 0.5 * (s_a + s_b)  # [n_j]
                x_mid = xa + (s_m - s_a).view(-1, *lat) * v
                v = forward(idx, x_mid, s_m)
            cur[idx] = xa + (s_b - s_a).view(-1, *lat) * v  # same expression as the Euler kernel
            pos[idx] = b
            if keep_path:
                states[idx, b] = cur[idx]
    return Completion(cur, states, vels)


# ------------------------------------------------------------------------------------------ plans


def chain(velocity: VelocityFn, noise: Tensor, sigmas: Tensor, cond: Cond, *, cond_index: Optional[Tensor] = None,
          group: Optional[Tensor] = None, eta: float | Tensor = 0.0, kernel="flow_sde",
          generator: Generators = None, keep_velocities: bool = False,
          trainable: Optional[Tensor] = None, **options) -> Trajectory:
    """One chain per noise row: ``loop.sample`` (Flow-GRPO, DenseGRPO, TP-GRPO, VGPO, Euphonium).

    ``trainable`` [T] bool (the steps the trainer updates) is accepted for the plan interface and not needed:
    a chain samples every step with its η whether or not the step is trained (Flow-GRPO). A float η means every step
    but the deterministic last, as in the other plans (``eta_schedule``).
    """
    if not isinstance(eta, Tensor):
        eta = eta_schedule(sigmas.shape[0] - 1, float(eta))
    return sample(velocity, noise, sigmas, cond, eta=eta, kernel=kernel, generator=generator, cond_index=cond_index,
                  group=group, keep_velocities=keep_velocities, **options)


def _plan_inputs(noise: Tensor, steps: int, cond_index: Optional[Tensor], group: Optional[Tensor],
                 eta: float | Tensor, trainable: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A plan's common inputs: (cond_index [S], group [S] on the noise's device; η [T] on the CPU, a float meaning
    every step but the deterministic last, as ``eta_schedule``; the steps that are stochastic and, with
    ``trainable`` [T], trained [T] bool)."""
    dev = noise.device
    if cond_index is None:
        cond_index = torch.arange(noise.shape[0], device=dev)
    if group is None:
        group = cond_index.clone()
    eta_vec = eta.detach().to(torch.float32).cpu() if isinstance(eta, Tensor) and eta.dim() == 1 else \
        eta_schedule(steps, float(eta))  # [T]
    if eta_vec.shape[0] != steps:
        raise ValueError(f"eta has {eta_vec.shape[0]} entries, expected {steps}")
    allowed = eta_vec > 0  # [T]
    if trainable is not None:
        trainable = torch.as_tensor(trainable, dtype=torch.bool).cpu()  # [T]
        if trainable.shape != allowed.shape:
            raise ValueError(f"trainable has shape {tuple(trainable.shape)}, expected ({steps},)")
        allowed = allowed & trainable
    return cond_index.to(dev), group.to(dev), eta_vec, allowed


def branch(velocity: VelocityFn, noise: Tensor, sigmas: Tensor, cond: Cond, *, cond_index: Optional[Tensor] = None,
           group: Optional[Tensor] = None, eta: float | Tensor = 0.7, kernel="flow_sde",
           generator: Generators = None, keep_velocities: bool = False,
           children: Annotated[int, Interval(1)] = 6, branch_steps: str | int | Sequence[int] = "all",
           prompts: Sequence[str] = (), reduce: str = "mean", logp_form: str = "exact",
           max_batch: Optional[Annotated[int, Interval(1)]] = None, trainable: Optional[Tensor] = None,
           **kernel_kwargs) -> Trajectory:
    """TempFlow-GRPO branching (He et al. 2025, "TempFlow-GRPO"; METHODS.md §2.7, §4.3).

    Each noise row is a *seed*: a pure-ODE trunk x_0 → x_k (computed once per seed), then at every chosen
    branch step k, K children x_{k+1}^{(b)} = μ_k + s_k·ξ_b share the trunk's kernel Gaussian (the trunk's
    velocity at x_k is reused), and each child is ODE-completed on the native grid (``staggered_ode``).

    Args:
        noise: [S, *latent] one row per seed (the trainer's group_size = seeds per prompt).
        eta: float or [T]; the candidate branch steps are those with η_k > 0 (by default 0…T−2), and the
            branch noise at k is η_k (the paper's a; upstream hard-codes 0.7).
        children: K children per (seed, k).
        branch_steps: ``"all"`` (every candidate, the released SD3 code), ``"random"`` (one random
            candidate per seed, drawn from ``generator``), an int n (n distinct random candidates per seed),
            or an explicit list of steps.
        trainable: [T] bool, the steps the trainer updates; when given, candidates are restricted to them
            (a child branched at an untrained step would carry no gradient).

    Returns a Trajectory with N = Σ_seeds |K_s|·K rows ordered (seed, k, child). ``group`` is the sibling
    key (prompt, seed, k), the normalisation unit of TempFlow's advantage; ``traj.eta`` [T] holds η at every
    branch step used by some row. ``extras``:
        ``parent`` [N] seed row; ``branch_step`` [N] k; ``prompt_group`` [N] the input group;
        ``trained`` [N, T] bool (only the row's own branch edge); ``eta_rows`` [N, T] per-row η (0 off the
        row's branch edge); ``branch_candidates`` [C] long; ``branch_eta`` [T] (the candidate η);
        ``kernel`` (name, for the weights); ``kernel_options`` (its keyword options, e.g. ``sigma_1``);
        ``children`` K.
    """
    steps = int(sigmas.shape[0]) - 1
    kern = get_kernel(kernel)
    s_rows = noise.shape[0]
    dev = noise.device
    cond_index, group, eta_vec, stochastic = _plan_inputs(noise, steps, cond_index, group, eta, trainable)
    sig = sigmas.to(device=dev, dtype=torch.float32)
    cands = stochastic.nonzero().flatten()  # [C]
    if cands.numel():  # a step whose kernel std is 0 despite η > 0 (ddim_sde at σ = 1) would give identical children
        probe = torch.zeros(cands.numel(), 1, device=dev)  # the std does not depend on x or v
        s_c = kern(probe, probe, sig[cands], sig[cands + 1], eta_vec[cands].to(dev), **kernel_kwargs).std.reshape(-1)
        cands = cands[(s_c > 0).cpu()]
    if cands.numel() == 0:
        raise ValueError("branch plan: no candidate branch step (η or the kernel std is 0 everywhere)")
    if children < 1:
        raise ValueError(f"children must be ≥ 1, got {children}")
    per_seed = _choose_steps(branch_steps, cands, s_rows, generator)  # list of lists
    kmax = max(max(ks) for ks in per_seed)

    # trunk: ODE x_0 → x_kmax once per seed, velocities kept (the branch kernel reuses v_k)
    if kmax > 0:
        trunk = sample(velocity, noise, sig[: kmax + 1], cond, eta=0.0, kernel="euler", cond_index=cond_index,
                       keep_velocities=True)
        trunk_lat, trunk_vel = trunk.latents, trunk.velocities  # [S, kmax+1, *latent], [S, kmax, *latent]
    else:
        trunk_lat, trunk_vel = noise.to(torch.float32)[:, None], noise.new_zeros((s_rows, 0, *noise.shape[1:]))
    with torch.no_grad():
        v_last = velocity(trunk_lat[:, kmax], sig[kmax].expand(s_rows), gather_cond(cond, cond_index))
    trunk_v = torch.cat([trunk_vel.to(torch.float32), v_last.to(torch.float32)[:, None]], dim=1)  # [S, kmax+1, *]

    seed_of, k_of = [], []
    for s, ks in enumerate(per_seed):
        for k in ks:
            seed_of += [s] * children
            k_of += [k] * children
    seed_t = torch.tensor(seed_of, dtype=torch.long, device=dev)  # [N]
    k_t = torch.tensor(k_of, dtype=torch.long, device=dev)  # [N]
    n = seed_t.shape[0]
    x_k = trunk_lat[seed_t, k_t]  # [N, *latent]
    v_k = trunk_v[seed_t, k_t]  # [N, *latent]
    eta_k = eta_vec.to(dev)[k_t]  # [N]
    tr = kern(x_k, v_k, sig[k_t], sig[k_t + 1], eta_k, **kernel_kwargs)
    std = tr.std.expand_as(tr.mean) if tr.std.dim() == tr.mean.dim() else tr.std
    x_next = tr.mean + std * _noise_like(tr.mean, generator)  # [N, *latent]
    lp = gaussian_log_prob(x_next, tr.mean, tr.std, reduce=reduce, form=logp_form)  # [N]

    comp = staggered_ode(velocity, x_next, k_t + 1, sig, cond, cond_index[seed_t], max_batch=max_batch,
                         keep_path=True)
    rows = torch.arange(n, device=dev)
    t_idx = torch.arange(steps + 1, device=dev)
    pre = t_idx[None, :] <= k_t[:, None]  # [N, T+1] trunk part
    trunk_full = trunk_lat[seed_t]  # [N, kmax+1, *latent]
    lat_shape = (1,) * (noise.dim() - 1)
    latents = comp.states.clone()  # [N, T+1, *latent]
    latents[:, : kmax + 1] = torch.where(pre[:, : kmax + 1].view(n, kmax + 1, *lat_shape), trunk_full,
                                         latents[:, : kmax + 1])
    latents[rows, k_t + 1] = x_next
    logps = torch.zeros(n, steps, dtype=torch.float32, device=dev)  # [N, T]
    logps[rows, k_t] = lp
    onehot = torch.zeros(n, steps, dtype=torch.bool, device=dev)  # [N, T]
    onehot[rows, k_t] = True
    vels = None
    if keep_velocities:
        vels = comp.velocities.clone()  # [N, T, *latent]
        pre_v = (t_idx[None, :steps] <= k_t[:, None])[:, : kmax + 1]  # [N, kmax+1]
        vels[:, : kmax + 1] = torch.where(pre_v.view(n, kmax + 1, *lat_shape), trunk_v[seed_t],
                                          vels[:, : kmax + 1])
    used = torch.zeros(steps, dtype=torch.bool)
    used[k_t.unique().cpu()] = True
    traj_eta = torch.where(used, eta_vec, torch.zeros_like(eta_vec)).to(dev)  # [T]
    sib = seed_t * (steps + 1) + k_t
    _, sib_group = torch.unique(sib, return_inverse=True)  # [N] (prompt, seed, k) key
    return Trajectory(
        latents=latents, sigmas=sig, eta=traj_eta, log_probs=logps, cond=cond, cond_index=cond_index[seed_t],
        group=sib_group, prompts=tuple(prompts), velocities=vels,
        extras={"parent": seed_t, "branch_step": k_t, "prompt_group": group[seed_t], "trained": onehot,
                "eta_rows": torch.where(onehot, eta_k[:, None].expand(n, steps), torch.zeros(n, steps, device=dev)),
                "branch_candidates": cands.to(dev), "branch_eta": eta_vec.to(dev),
                "kernel": kernel if isinstance(kernel, str) else getattr(kernel, "__name__", "custom"),
                "kernel_options": dict(kernel_kwargs),  # e.g. sigma_1: TempFlow's weights use the children's own std
                "children": int(children)})


def _choose_steps(spec, cands: Tensor, seeds: int, generator: Generators) -> list[list[int]]:
    """Each seed's branch steps. Per-group generators (a sequence of P, seeds in P equal contiguous blocks) draw
    each block's choices from its own, as ``_noise_like`` draws their noise."""
    c = cands.tolist()
    if isinstance(spec, str):
        if spec == "all":
            return [list(c) for _ in range(seeds)]
        if spec == "random":
            spec = 1
        else:
            raise ValueError(f"branch_steps must be 'all', 'random', an int or a list of steps, got {spec!r}")
    if isinstance(spec, int):
        if not 1 <= spec <= len(c):
            raise ValueError(f"branch_steps={spec}: choose between 1 and {len(c)} candidate steps")
        if generator is None or isinstance(generator, torch.Generator):
            per_seed = [generator] * seeds
        else:
            gens = list(generator)
            if not gens or seeds % len(gens):
                raise ValueError(f"{len(gens)} per-group generators for {seeds} seeds: one block of seeds per generator")
            per_seed = [g for g in gens for _ in range(seeds // len(gens))]
        out = []
        for gen in per_seed:
            perm = torch.randperm(len(c), generator=gen, device=gen.device if gen is not None else "cpu").cpu()[:spec]
            out.append(sorted(c[i] for i in perm.tolist()))
        return out
    ks = sorted(int(k) for k in spec)
    bad = [k for k in ks if k not in c]
    if bad:
        raise ValueError(f"branch steps {bad} are not candidates (η = 0 there, or not trained); candidates: {c}")
    return [list(ks) for _ in range(seeds)]


TREE_SPLITS = (0, 3, 6, 9)  # BranchGRPO's split steps (METHODS.md §2.8), clipped to the allowed steps by default


def _tree_splits(spec: Optional[Sequence[int]], allowed: Sequence[int]) -> list[int]:
    """The split steps of a tree: ``spec`` (validated: distinct steps, each in ``allowed``) or, for None, the
    default ``TREE_SPLITS`` clipped to ``allowed`` (the stochastic, trainable steps)."""
    allowed = sorted(int(k) for k in allowed)
    if spec is None:
        ks = [k for k in TREE_SPLITS if k in allowed]
        if not ks:
            raise ValueError(f"tree plan: none of the default split steps {list(TREE_SPLITS)} is stochastic and "
                             f"trained (allowed steps: {allowed}); set sampler.plan_options.split_steps")
        return ks
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise ValueError(f"split_steps must be a list of steps, got {spec!r}")
    ks = sorted(int(k) for k in spec)
    if not ks or len(set(ks)) != len(ks):
        raise ValueError(f"split_steps must be a non-empty list of distinct steps, got {list(spec)}")
    bad = [k for k in ks if k not in allowed]
    if bad:
        raise ValueError(f"split steps {bad} are not stochastic and trained steps (η = 0 there, or not trained); "
                         f"allowed: {allowed}")
    return ks


def tree(velocity: VelocityFn, noise: Tensor, sigmas: Tensor, cond: Cond, *, cond_index: Optional[Tensor] = None,
         group: Optional[Tensor] = None, eta: float | Tensor = 0.7, kernel="flow_sde",
         generator: Generators = None, keep_velocities: bool = False,
         split_steps: Optional[Sequence[int]] = None, branching: Annotated[int, Interval(2)] = 2,
         split_noise_scale: Annotated[float, Interval(0.0, low_open=True)] = 1.0,
         prompts: Sequence[str] = (), reduce: str = "mean", logp_form: str = "exact",
         trainable: Optional[Tensor] = None, **kernel_kwargs) -> Trajectory:
    """BranchGRPO tree rollouts (Li et al. 2025, "BranchGRPO: Stable and Efficient GRPO with Structured Branching
    in Diffusion Models", arXiv:2509.06040, "branch sampling"; METHODS.md §2.8).

    Each noise row is the root of one tree. The whole tree is sampled with the SDE kernel (every η_t > 0 step
    stochastic, as ``chain``). At each split step k every frontier node splits into ``branching`` children that
    share the node's state x_k and kernel Gaussian N(μ_k, s_k²) and draw independent noise ξ_b:
    x_{k+1}^{(b)} = μ_k + s_k·ξ_b. Paper → ours: their split points {0, 3, 6, 9} of a 20-step FLUX grid are
    ``split_steps``, the binary split is ``branching`` = 2, their noise multiplier 4 at split steps is
    ``split_noise_scale``.

    A **node** is the segment of a tree between two splits: depth 0 (the root) covers steps [0, k_1), a depth-j
    node covers [k_j, k_{j+1}) (k_{D+1} = T), and its first edge is the split edge k_j. A node is shared by every
    leaf below it.

    The split noise is part of the per-step η, so the trainer's re-scoring (``traj.eta[t]``, the same kernel) sees
    exactly the Gaussian that was sampled (ρ ≡ 1 on-policy): η_k ← ``split_noise_scale``·η_k at split steps. For
    ``flow_sde`` and ``dance_sde`` the std is proportional to η, so s_k is multiplied by exactly that factor (their
    mean is the marginal-preserving drift at the scaled level; the reference keeps μ at η and stores the log-prob
    under the unscaled std). A kernel whose std is not proportional to η (``cps``) is refused unless
    ``split_noise_scale`` = 1.

    Args:
        noise: [S, *latent] one root per row; the trainer's ``group_size`` = seeds (roots, trees) per prompt,
            as for ``branch``.
        eta: float or [T]; a float means every step but the deterministic last (``eta_schedule``).
        split_steps: the split steps (sorted, distinct; each stochastic and, with ``trainable``, trained);
            None = ``TREE_SPLITS`` = (0, 3, 6, 9) clipped to those steps.
        branching: children per split (≥ 2).
        split_noise_scale: multiplier of the split steps' η (> 0). Default 1: the reference's 4 goes with DanceGRPO's
            η = 0.3 (``dance_sde``); on ``flow_sde`` at a = 0.7 it would make a = 2.8 at step 0, far off the model's
            marginals (the scaled η moves the mean's drift too).
        trainable: [T] bool, the steps the trainer updates; default split steps are restricted to them.

    Returns a Trajectory with N = S·branching^D rows, the leaves, ordered (root, child at split 1, …, child at
    split D); each row holds its full path (shared prefixes duplicated), log-probs and velocities. ``group`` is
    the tree (root) of each row, the normalisation unit of ``flowalign.credit.tree``; ``traj.eta`` [T] the η used
    (split steps scaled). ``extras``:
        ``root`` [N] root row; ``prompt_group`` [N] the input group; ``node`` [N, T] long, the id of the node that
        owns edge (row, t) (ids unique over the batch); ``depth`` [N, T] long, its depth; ``trained`` [N, T] bool,
        each node's stochastic edges on ONE row only (the first leaf of its subtree), so a shared edge is trained
        once, and never the root's edges (a lone node: advantage 0); ``split_steps`` [D] long; ``branching`` int.
    """
    steps = int(sigmas.shape[0]) - 1
    kern = get_kernel(kernel)
    s_rows = noise.shape[0]
    dev = noise.device
    cond_index, group, eta_vec, allowed = _plan_inputs(noise, steps, cond_index, group, eta, trainable)
    if int(branching) != branching or branching < 2:
        raise ValueError(f"branching must be an integer ≥ 2, got {branching}")
    branching = int(branching)
    if not split_noise_scale > 0:
        raise ValueError(f"split_noise_scale must be > 0, got {split_noise_scale}")
    splits = _tree_splits(split_steps, allowed.nonzero().flatten().tolist())
    is_split = torch.zeros(steps, dtype=torch.bool)  # [T]
    is_split[splits] = True
    eta_used = torch.where(is_split, eta_vec * float(split_noise_scale), eta_vec)  # [T]
    sig = sigmas.to(device=dev, dtype=torch.float32)  # [T+1]
    ks = torch.tensor(splits, dtype=torch.long)
    probe = torch.zeros(len(splits), 1, device=dev)  # the std does not depend on x or v
    s_base = kern(probe, probe, sig[ks], sig[ks + 1], eta_vec[ks].to(dev), **kernel_kwargs).std.reshape(-1)
    s_used = kern(probe, probe, sig[ks], sig[ks + 1], eta_used[ks].to(dev), **kernel_kwargs).std.reshape(-1)
    if not bool((s_base > 0).all()):
        raise ValueError(f"tree plan: the kernel std is 0 at a split step of {splits}: the children would coincide")
    if not torch.allclose(s_used, float(split_noise_scale) * s_base, rtol=1e-4, atol=0.0):
        raise ValueError(f"tree plan: the std of kernel {kernel!r} is not proportional to η, so scaling η by "
                         f"split_noise_scale={split_noise_scale} does not scale the split noise by it; "
                         f"set split_noise_scale=1 or use flow_sde / dance_sde")

    eta_host = eta_used.tolist()
    x = noise.detach().to(torch.float32)  # [F_0 = S, *latent] the frontier at grid index 0
    front_root = torch.arange(s_rows, device=dev)  # [F_t] root of each frontier row
    states, lps, vs, parents = [x], [], [], []  # per grid index / step, frontier-aligned
    with torch.no_grad():
        for t in range(steps):
            v = velocity(x, sig[t].expand(x.shape[0]), gather_cond(cond, cond_index[front_root]))  # [F_t, *latent]
            tr = kern(x, v, sig[t], sig[t + 1], eta_used[t].to(dev), **kernel_kwargs)
            mean, std = tr.mean, tr.std  # [F_t, *latent], broadcastable
            par = torch.arange(x.shape[0], device=dev)  # [F_{t+1}] frontier row at t of each row at t+1
            if bool(is_split[t]):
                par = par.repeat_interleave(branching)
                mean = mean.index_select(0, par)  # children share μ_k and s_k
                std = std.index_select(0, par) if std.dim() > 0 and std.shape[0] == tr.mean.shape[0] else std
                front_root = front_root.index_select(0, par)
            if eta_host[t] > 0:
                x = mean + std * _noise_like(mean, generator)  # [F_{t+1}, *latent]
                lps.append(gaussian_log_prob(x, mean, std, reduce=reduce, form=logp_form))  # [F_{t+1}]
            else:
                x = mean
                lps.append(torch.zeros(x.shape[0], device=dev))
            states.append(x)
            vs.append(v.to(torch.float32))
            parents.append(par)

    # leaves' full paths: walk each leaf's ancestry back through the parent maps
    n = x.shape[0]
    depth_t = torch.cumsum(is_split.long(), 0)  # [T] depth of the node that owns step t
    n_depth = [s_rows * branching ** d for d in range(len(splits) + 1)]  # nodes per depth over the batch
    offset = torch.tensor([sum(n_depth[:d]) for d in range(len(splits) + 1)], dtype=torch.long, device=dev)
    latents = torch.empty((n, steps + 1, *noise.shape[1:]), dtype=torch.float32, device=dev)  # [N, T+1, *latent]
    logps = torch.zeros(n, steps, dtype=torch.float32, device=dev)  # [N, T]
    vels = torch.empty((n, steps, *noise.shape[1:]), dtype=torch.float32, device=dev) if keep_velocities else None
    node = torch.empty(n, steps, dtype=torch.long, device=dev)  # [N, T]
    idx = torch.arange(n, device=dev)  # [N] each leaf's frontier row at grid index j
    latents[:, steps] = states[steps]
    for t in range(steps - 1, -1, -1):
        logps[:, t] = lps[t][idx]
        node[:, t] = offset[depth_t[t]] + idx  # a frontier row after step t is one node at its depth
        idx = parents[t][idx]
        latents[:, t] = states[t][idx]
        if keep_velocities:
            vels[:, t] = vs[t][idx]
    depth = depth_t.to(dev)[None].expand(n, steps).clone()  # [N, T]
    rows = torch.arange(n, device=dev)
    first = torch.full((int(offset[-1]) + n_depth[-1],), n, dtype=torch.long, device=dev)  # [nodes]
    first = first.scatter_reduce(0, node.flatten(), rows[:, None].expand(n, steps).flatten(), reduce="amin")
    trained = (first[node] == rows[:, None]) & (eta_used.to(dev) > 0)[None] & (depth > 0)  # [N, T]
    return Trajectory(
        latents=latents, sigmas=sig, eta=eta_used.to(dev), log_probs=logps, cond=cond,
        cond_index=cond_index[front_root], group=front_root.clone(), prompts=tuple(prompts), velocities=vels,
        extras={"root": front_root, "prompt_group": group[front_root], "node": node, "depth": depth,
                "trained": trained, "split_steps": ks.to(dev), "branching": branching})


def _chain_shape(options: Mapping, candidate_steps: int) -> tuple[int, Optional[int]]:
    """A chain: one final sample per initial noise, trained at every trained step."""
    return 1, None


def _branch_shape(options: Mapping, candidate_steps: int) -> tuple[int, Optional[int]]:
    """TempFlow-GRPO: K = ``children`` per branch step of each seed (``branch_steps`` "all" = every one of the
    ``candidate_steps``, "random" = 1, an int n = n, a list = its length); each child trains its branch edge only."""
    spec = options.get("branch_steps", "all")
    if isinstance(spec, str) and spec not in ("all", "random"):
        raise ValueError(f"branch_steps must be 'all', 'random', an int or a list of steps, got {spec!r}")
    n = candidate_steps if spec == "all" else 1 if spec == "random" else \
        int(spec) if isinstance(spec, int) else len(spec)
    k = options.get("children", 6)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:  # else the derived counts go to 0 or below
        raise ValueError(f"children must be an integer ≥ 1, got {k!r}")
    return k * max(1, n), 1


def _tree_shape(options: Mapping, candidate_steps: int) -> tuple[int, Optional[Fraction]]:
    """BranchGRPO tree: branching^D leaves per root (D = number of split steps), and the mean number of trained
    edges per leaf, a Fraction (each node's edges are trained once, on one leaf; the root's never). Assumes the
    candidate steps are 0 … candidate_steps − 1 (the trainer's first trained steps; the config refuses windows)."""
    b = options.get("branching", 2)
    if not isinstance(b, int) or b < 2:
        raise ValueError(f"branching must be an integer ≥ 2, got {b!r}")
    scale = options.get("split_noise_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ValueError(f"split_noise_scale must be a finite number > 0, got {scale!r}")
    ks = _tree_splits(options.get("split_steps"), range(candidate_steps))
    bounds = [*ks, candidate_steps]
    per_root = sum(b ** (j + 1) * (bounds[j + 1] - bounds[j]) for j in range(len(ks)))  # trained node-steps
    leaves = b ** len(ks)
    return leaves, Fraction(per_root, leaves)


def plan_shape(plan: str, options: Mapping, candidate_steps: int) -> tuple[int, Optional[int | Fraction]]:
    """(final samples per initial noise, trained edges per final sample — None: every trained step; a Fraction when
    edges shared by several samples are trained once) of a plan, from ``PLAN_SHAPES`` (one entry per ``PLANS``
    entry); ``candidate_steps`` = stochastic and trained steps. Used for the trainer's derived batch shapes."""
    if plan not in PLAN_SHAPES:
        raise ValueError(f"unknown rollout plan {plan!r}; choose from {', '.join(PLANS)}")
    return PLAN_SHAPES[plan](options, candidate_steps)


PLANS: dict[str, Callable[..., Trajectory]] = {
    "chain": chain,
    "branch": branch,
    "tree": tree,
}

# batch shape of each plan (for derived quantities); a new plan registers both entries
PLAN_SHAPES: dict[str, Callable[[Mapping, int], tuple[int, Optional[int | Fraction]]]] = {
    "chain": _chain_shape,
    "branch": _branch_shape,
    "tree": _tree_shape,
}
