"""The process-reward core (DESIGN.md §4, METHODS.md §4.0, §5.3): value probes of intermediate states.

One engine scores intermediate states x_t of a trajectory batch and is shared by every dense credit
method (DenseGRPO, TP-GRPO, VGPO, TempFlow) and by steering:

- probe modes (``parse_mode``): ``"x0"`` (R(x̂0_t), one Euler step to σ = 0, free with a cached velocity),
  ``"ode:m"`` (m Euler steps on the sub-grid round(linspace(t, T, m+1)) of the native grid),
  ``"ode:full"`` (the native remaining grid, V_full), ``"ode/λ"`` (every λ-th native index, then σ = 0:
  G²RPO's coarsened grids), ``"ode2:m"`` / ``"ode2:full"`` / ``"ode2/λ"`` (explicit midpoint, a second-order
  few-step completion, 2 NFE per sub-step);
- **staggered batching**: all probes of all rows run as one loop over the shared grid
  (``flowalign.samplers.plans.staggered_ode``), chunked by ``max_batch``;
- **velocity reuse**: a probe's first step uses the velocity the sampler cached at x_t;
- **skip around ODE steps** (``ode:full``, and ``ode:m`` / ``x0`` where the sub-grid is the native one):
  if η_t = 0, V_full(x_{t+1}) = V_full(x_t) exactly, so each requested state is mapped to the last state of
  its ODE run and probed once (a state followed only by ODE steps takes the terminal reward);
- **group-shared work**: identical (state, prompt) pairs, e.g. the x_0 of a group with shared initial
  noise, are integrated and scored once;
- **probe only what is asked**: the caller passes a [B, T+1] mask.

Two reference estimators, for measuring the probes (``flowalign bench credit --rank-references``), not for credit:
``refined_ode_values`` (the same Euler ODE with every native step split in F, ``refine_grid``) and
``sde_mc_values`` (K completions of each state with the rollouts' own SDE kernel: the sampling policy's value).

Guided rollouts (Euphonium, METHODS.md §4.5) live here too: ``RewardGuidance`` is the sampler's ``mean_shift``
hook, ``RewardPRM`` a training-free differentiable process reward (the rewards of x̂0), and ``GUIDES`` the registry
the trainer's ``sampler.guide`` selects from.

Cost is a first-class output: ``NFECounter`` wraps a model's velocity so every run reports model
forwards for sampling, probing and training separately (1 NFE = one forward of one sample, the CFG pair
counted once, as in METHODS.md §5.2).

The ``score`` callable the caller supplies is ``score(latents [N, *latent], rows [N] long) -> {name: [N]}``:
decode + every reward; ``rows`` are the trajectory rows the latents belong to (for prompts and metadata).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from typing import Callable, Hashable, Iterator, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from flowalign.samplers.loop import gather_cond, mix_seed, sample
from flowalign.samplers.plans import next_table, staggered_ode, subgrid
from flowalign.types import Cond, Trajectory, VelocityFn

logger = logging.getLogger(__name__)

ScoreFn = Callable[[Tensor, Tensor], Mapping[str, Tensor]]
"""score(latents [N, *latent], rows [N]) -> {reward name: [N]} (decode + rewards; rows index the trajectory)."""


class NFECounter:
    """Counts per-sample velocity evaluations by phase ("sampling", "probing", "training", ...).

    Installed on a model instance: ``model.velocity`` is replaced by a counting wrapper (the class and other
    instances are untouched). ``with counter.phase("probing"): ...`` attributes forwards to a phase.
    """

    def __init__(self, model) -> None:
        self._inner = model.velocity
        self.counts: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._phase = "other"
        model.velocity = self  # instance attribute shadows the bound method

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        self.counts[self._phase] += int(x.shape[0])
        self.calls[self._phase] += 1
        return self._inner(x, sigma, cond)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        prev, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = prev

    def totals(self) -> dict[str, int]:
        return dict(self.counts)

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "calls": dict(self.calls)}

    def load_state_dict(self, state: dict) -> None:
        self.counts = defaultdict(int, state.get("counts", {}))
        self.calls = defaultdict(int, state.get("calls", {}))


# ------------------------------------------------------------------------------------------ probe modes


class ProbeMode(NamedTuple):
    """A parsed probe mode: integration ``method`` ("euler" | "midpoint"), sub-steps ``m`` (None = native or
    strided) and the ``stride`` λ of a coarsened native grid (1 = every native index)."""

    method: str
    m: Optional[int]
    stride: int = 1

    def grid(self, t: int, steps: int) -> list[int]:
        """The grid indices of this probe from state ``t`` (``subgrid``)."""
        return subgrid(t, steps, self.m, self.stride)


def parse_mode(mode: str) -> ProbeMode:
    """``"x0"`` | ``"ode:m"`` | ``"ode:full"`` | ``"ode/λ"`` | ``"ode2:m"`` | ``"ode2:full"`` | ``"ode2/λ"`` →
    ProbeMode (METHODS.md §4.0; ``/λ``: every λ-th native grid index, G²RPO's coarsened grids, §4.7)."""
    if mode in ("x0", "x0hat"):
        return ProbeMode("euler", 1)
    if "/" in mode and ":" not in mode:
        head, _, tail = mode.partition("/")
        method = {"ode": "euler", "ode2": "midpoint"}.get(head)
        if method is not None and tail.isdigit() and int(tail) >= 1:
            return ProbeMode(method, None, int(tail))
    head, _, tail = mode.partition(":")
    method = {"ode": "euler", "ode2": "midpoint"}.get(head)
    if method is not None and tail:
        if tail == "full":
            return ProbeMode(method, None)
        if tail.isdigit() and int(tail) >= 1:
            return ProbeMode(method, int(tail))
    raise ValueError(f"unknown probe mode {mode!r}; use 'x0', 'ode:<m>', 'ode:full', 'ode/<stride>', 'ode2:<m>', "
                     "'ode2:full' or 'ode2/<stride>'")


def probe_nfe(mode: str, t: int, steps: int, reuse: bool = True) -> int:
    """Model forwards of one probe from state t (METHODS.md §4.0 table): m, or m − 1 with velocity reuse."""
    if t >= steps:
        return 0
    pm = parse_mode(mode)
    n = len(pm.grid(t, steps)) - 1
    per = 2 if pm.method == "midpoint" else 1
    return per * n - (1 if reuse else 0)


def row_eta(traj: Trajectory) -> Tensor:
    """Per-row noise scale [B, T]: ``extras["eta_rows"]`` (branch plans, per-group windows) or ``traj.eta`` broadcast."""
    er = traj.extras.get("eta_rows") if traj.extras else None
    if er is not None:
        return er.to(torch.float32)
    return traj.eta.to(torch.float32)[None].expand(traj.batch_size, -1)


def ode_canonical(eta_rows: Tensor, shifted: Optional[Tensor] = None) -> Tensor:
    """[B, T+1] long: for each state t the last state t' ≥ t reached from it through plain Euler steps only.

    A plain Euler step has η = 0 and no guidance shift (``shifted`` [T] or [B, T] bool, the sampler's
    ``extras["shifted"]``). With ``ode:full`` probes V_full(x_t) = V_full(x_{t'}) exactly (METHODS.md §5.3.4);
    t' = T means the value is the terminal reward.
    """
    b, steps = eta_rows.shape
    canon = torch.empty(b, steps + 1, dtype=torch.long)
    canon[:, steps] = steps
    ode = (eta_rows.cpu() == 0)  # [B, T]
    if shifted is not None:
        ode = ode & ~shifted.detach().cpu().to(torch.bool).expand(b, steps)
    for t in range(steps - 1, -1, -1):
        canon[:, t] = torch.where(ode[:, t], canon[:, t + 1], torch.full_like(canon[:, t], t))
    return canon


def first_equal(rows: Callable[[Tensor], Tensor], keys: Sequence[Hashable]) -> Tensor:
    """For n rows with ``keys`` [n], the position of the first row with the same key and bit-identical contents
    ([n] long; i where row i is the first of its kind). ``rows(idx)`` returns rows ``idx`` [s, *shape].

    Exact: each row's float32 bits are hashed (times fixed random integers, summed with int64 wrap-around, which does
    not depend on the order of summation), a few rows at a time so memory stays bounded, and a hash match counts only
    when the bits compare equal. NaN never equals itself, so a row holding a NaN is its own kind.
    """
    n = len(keys)
    out = torch.arange(n)
    if n < 2:
        return out
    probe = rows(torch.arange(1))
    d = probe[0].numel()
    weights = torch.randint(1, 2**62, (d,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    weights = weights.to(probe.device)  # [D]
    slab = max(1, 2**22 // d)  # rows hashed at once (32 MiB of int64)
    hashes = []
    for s in range(0, n, slab):
        bits = rows(torch.arange(s, min(n, s + slab))).to(torch.float32).reshape(-1, d).view(torch.int32)  # [s, D]
        hashes.append((bits.to(torch.int64) * weights).sum(dim=1))  # [s]
    h = torch.cat(hashes).cpu().tolist()
    first: dict[tuple, list[int]] = {}
    for i in range(n):
        key = (keys[i], h[i])
        for j in first.get(key, ()):  # a hash match is a candidate; equal bits make it the same row
            if torch.equal(rows(torch.tensor([i])), rows(torch.tensor([j]))):
                out[i] = j
                break
        else:
            first.setdefault(key, []).append(i)
    return out


def _dedupe(latents_t: Tensor, cond_index: Tensor) -> tuple[Tensor, Tensor]:
    """Identical (state bits, prompt row) pairs → (representative positions [U], inverse [n])."""
    first = first_equal(lambda idx: latents_t[idx.to(latents_t.device)], cond_index.detach().cpu().tolist())  # [n]
    rep, inv = torch.unique(first, return_inverse=True)  # [U] first occurrences, [n]
    return rep, inv


def _score_chunked(score: ScoreFn, latents: Tensor, rows: Tensor, chunk: Optional[int]) -> dict[str, Tensor]:
    n = latents.shape[0]
    size = chunk or max(1, n)
    parts: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for i in range(0, n, size):
            out = score(latents[i:i + size], rows[i:i + size])
            for k, v in out.items():
                parts.setdefault(k, []).append(v.detach().to(torch.float32).reshape(-1).cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


# ------------------------------------------------------------------------------------------ the engine


def probe_values(velocity: VelocityFn, traj: Trajectory, mask: Tensor, mode: str = "ode:full",
                 score: Optional[ScoreFn] = None, *, terminal: Optional[Mapping[str, Tensor]] = None,
                 reuse_velocity: bool = True, skip_ode: bool = True, dedupe: bool = True,
                 max_batch: Optional[int] = None, score_batch: Optional[int] = None,
                 counter: Optional["NFECounter"] = None) -> dict[str, Tensor]:
    """Value estimates V(x_t) of the states ``mask`` [B, T+1] selects (METHODS.md §4.0, §5.3; DESIGN.md §4).

    Args:
        velocity: θ_old's ``v(x, σ [n], cond_b)`` with the rollout's CFG (the NFE counter when one is installed).
        traj: the rollout; ``traj.velocities`` (``keep_velocities=True``) enables velocity reuse.
        mode: see ``parse_mode``.
        score: ``score(latents, rows) -> {name: [N]}`` (decode + rewards).
        terminal: {name: [B]} rewards of x_T already computed by the caller; reused for V(x_T) and for every
            state the ODE-skip rule maps to x_T (otherwise x_T is scored here).
        reuse_velocity / skip_ode / dedupe: the compute-saving techniques (on by default; off = reference).
        max_batch: rows per model forward; ``score_batch``: latents per ``score`` call.
        counter: an ``NFECounter`` whose ``"probing"`` phase the forwards are attributed to.

    Returns {name: [B, T+1] float32} with NaN where a state was not requested. V(x_T) is never re-integrated.
    """
    b, steps = traj.batch_size, traj.steps
    mask = mask.detach().cpu().to(torch.bool)
    if tuple(mask.shape) != (b, steps + 1):
        raise ValueError(f"probe mask must be [B, T+1] = [{b}, {steps + 1}], got {list(mask.shape)}")
    pm = parse_mode(mode)
    req_b, req_t = mask.nonzero(as_tuple=True)  # requested states
    req_c = req_t.clone()  # the state actually probed
    if skip_ode and pm.method == "euler":
        # Euler on the native grid from t passes through x_{t+1} exactly when step t is ODE, so V(x_t) = V(x_{t'})
        # (t' = the end of t's ODE run). That holds for ode:full everywhere and for ode:m where T − t ≤ m.
        on_native = torch.tensor([pm.grid(t, steps) == list(range(t, steps + 1)) for t in range(steps + 1)])
        native = on_native[req_t]  # [R] the probe's grid from t is the native one
        req_c = torch.where(native, ode_canonical(row_eta(traj), traj.extras.get("shifted"))[req_b, req_t], req_t)
    # unique probes (row, state) with state < T; state T takes the terminal reward
    inner = req_c < steps
    pair = torch.unique(req_b[inner] * (steps + 1) + req_c[inner])  # [P0]
    pb, pt = pair // (steps + 1), pair % (steps + 1)
    lat = traj.latents
    dev = lat.device
    # group-shared work: identical (state, prompt) pairs are probed once
    rep_of = torch.arange(pb.shape[0])  # [P0] index of each pair's representative
    if dedupe and pb.numel() > 1:
        for t in pt.unique().tolist():
            sel = (pt == t).nonzero().flatten()
            if sel.numel() < 2:
                continue
            rep, inv = _dedupe(lat[pb[sel].to(dev), t], traj.cond_index[pb[sel].to(dev)])
            rep_of[sel] = sel[rep[inv]]
    uniq = rep_of.unique()  # [P] positions (into pair) of the probes that run
    ub, ut = pb[uniq], pt[uniq]
    values: dict[str, Tensor] = {}
    if uniq.numel():
        if score is None:
            raise ValueError("probe_values needs a score function for states before x_T")
        first = has = None
        if reuse_velocity and traj.velocities is not None:
            first = traj.velocities[ub.to(dev), ut.to(dev)]  # [P, *latent]
            has = torch.isfinite(first.flatten(1)).all(1)  # [P]
        nxt = next_table(ut, steps, pm.m, pm.stride)
        ctx = counter.phase("probing") if counter is not None else contextlib.nullcontext()
        with ctx:
            comp = staggered_ode(velocity, lat[ub.to(dev), ut.to(dev)], ut.to(dev), traj.sigmas, traj.cond,
                                 traj.cond_index[ub.to(dev)], nxt=nxt, method=pm.method, first_velocity=first,
                                 has_first=has, max_batch=max_batch)
        scored = _score_chunked(score, comp.final, ub.to(dev), score_batch)  # name -> [P]
        slot = torch.full((pb.shape[0],), -1, dtype=torch.long)
        slot[uniq] = torch.arange(uniq.shape[0])
        pair_val = {k: v[slot[rep_of]] for k, v in scored.items()}  # name -> [P0]
        values = pair_val
    # terminal values for rows whose requests map to x_T
    need_T = req_b[~inner].unique()
    term: dict[str, Tensor] = {}
    if need_T.numel():
        if terminal is not None:
            term = {k: v.detach().to(torch.float32).reshape(-1).cpu() for k, v in terminal.items()}
        else:
            if score is None:
                raise ValueError("probe_values needs terminal rewards or a score function for x_T")
            s_t = _score_chunked(score, lat[need_T.to(dev), steps], need_T.to(dev), score_batch)
            term = {k: torch.full((b,), float("nan")).index_copy_(0, need_T, v) for k, v in s_t.items()}
    names = list(values) or list(term)
    out = {k: torch.full((b, steps + 1), float("nan")) for k in names}  # name -> [B, T+1]
    if inner.any():
        pos = torch.searchsorted(pair, req_b[inner] * (steps + 1) + req_c[inner])
        for k in names:
            out[k][req_b[inner], req_t[inner]] = values[k][pos]
    if (~inner).any():
        for k in names:
            if k not in term:
                raise ValueError(f"terminal rewards lack {k!r} (have {sorted(term)})")
            out[k][req_b[~inner], req_t[~inner]] = term[k][req_b[~inner]]
    return out


def probe_values_naive(velocity: VelocityFn, traj: Trajectory, mask: Tensor, mode: str = "ode:full",
                       score: Optional[ScoreFn] = None) -> dict[str, Tensor]:
    """Reference implementation: one probe at a time, no reuse, no skipping, no batching (for tests)."""
    b, steps = traj.batch_size, traj.steps
    pm = parse_mode(mode)
    sig = traj.sigmas.to(torch.float32)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for i, t in mask.detach().cpu().nonzero().tolist():
            x = traj.latents[i, t][None].to(torch.float32)  # [1, *latent]
            cb = gather_cond(traj.cond, traj.cond_index[i:i + 1])
            lat = (1,) * (x.dim() - 1)
            path = pm.grid(t, steps)
            for a, c in zip(path[:-1], path[1:]):
                sa, sc = sig[a].reshape(1), sig[c].reshape(1)
                v = velocity(x, sa, cb).to(torch.float32)
                if pm.method == "midpoint":
                    sm = 0.5 * (sa + sc)
                    v = velocity(x + (sm - sa).view(-1, *lat) * v, sm, cb).to(torch.float32)
                x = x + (sc - sa).view(-1, *lat) * v
            res = score(x, torch.tensor([i], device=x.device))
            for k, v in res.items():
                out.setdefault(k, torch.full((b, steps + 1), float("nan")))[i, t] = float(v.reshape(-1)[0])
    return out


def refine_grid(sigmas: Tensor, factor: int) -> Tensor:
    """[T+1] → [F·T+1]: every step of the grid split into ``factor`` equal steps in σ (every F-th point is the
    original grid, so a refined probe starts where the sampler's state lies)."""
    if factor < 1:
        raise ValueError(f"the refinement factor must be at least 1, got {factor}")
    sig = sigmas.detach().to(torch.float32).cpu()  # [T+1]
    frac = torch.arange(factor, dtype=torch.float32) / factor  # [F]
    inner = sig[:-1, None] + (sig[1:] - sig[:-1])[:, None] * frac  # [T, F]
    return torch.cat([inner.reshape(-1), sig[-1:]])  # [F·T+1]


def refined_ode_values(velocity: VelocityFn, traj: Trajectory, mask: Tensor, score: ScoreFn, factor: int,
                       *, max_batch: Optional[int] = None, score_batch: Optional[int] = None) -> dict[str, Tensor]:
    """Reference values R(ODE_F(x_t)): Euler from each state ``mask`` [B, T+1] selects to σ = 0 on the trajectory's
    grid with every step split into ``factor`` equal steps (``refine_grid``) → {name: [B, T+1]}.

    The probe of METHODS.md §4.0 ``ode_full`` integrates the probability-flow ODE on the sampler's own grid, so its
    value carries that grid's discretisation error. Solving the same ODE F times finer tells how much of a ranking
    by ``ode:full`` is the ODE's and how much is the grid's (``flowalign bench credit --rank-references fine:F``).
    F = 1 is ``ode:full`` without its savings (no velocity reuse or ODE skipping: a diagnostic, not a credit probe).
    """
    b, steps = traj.batch_size, traj.steps
    fine = refine_grid(traj.sigmas, factor)  # [F·T+1]
    req_b, req_t = mask.detach().cpu().to(torch.bool).nonzero(as_tuple=True)  # [P], [P]
    out: dict[str, Tensor] = {}
    if req_b.numel() == 0:
        return out
    dev = traj.latents.device
    with torch.no_grad():
        comp = staggered_ode(velocity, traj.latents[req_b.to(dev), req_t.to(dev)], (req_t * factor).to(dev),
                             fine.to(dev), traj.cond, traj.cond_index[req_b.to(dev)], max_batch=max_batch)
        scored = _score_chunked(score, comp.final, req_b.to(dev), score_batch)  # name -> [P]
    for k, v in scored.items():
        out[k] = torch.full((b, steps + 1), float("nan"))
        out[k][req_b, req_t] = v
    return out


def sde_mc_values(velocity: VelocityFn, traj: Trajectory, mask: Tensor, score: ScoreFn, *, k: int, kernel: str,
                  seed: int, max_batch: Optional[int] = None,
                  score_batch: Optional[int] = None) -> dict[str, Tensor]:
    """Monte-Carlo values of the sampling policy itself: for each selected state x_t (``mask`` [B, T+1]), the
    rewards of ``k`` completions to σ = 0 with the trajectory's own kernel and per-row η → {name: [k, B, T+1]}.

    Their mean estimates E[R(x_T) | x_t] under the SDE that is being trained, the quantity an RL value function is
    (METHODS.md §4.0 uses the deterministic ODE completion as a cheap stand-in for it). A completion of a row whose
    remaining steps all have η = 0 is the ``ode:full`` value, k times. Completion j of row i from state t draws its
    noise from its own generator, seeded by ``mix_seed(seed, t, i, j)``, so a completion draws the same noise whatever
    ``max_batch``, ``mask`` or call order (one call, or one call per state) computes it (with a batch-invariant
    velocity the same values, bit for bit; a network's forwards may differ in the last bits between batch sizes).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    b, steps = traj.batch_size, traj.steps
    eta = row_eta(traj)  # [B, T]
    mask = mask.detach().cpu().to(torch.bool)
    dev = traj.latents.device
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for t in range(steps + 1):
            rows = mask[:, t].nonzero(as_tuple=True)[0]  # [n]
            if rows.numel() == 0:
                continue
            if t == steps:  # x_T itself: its reward, k times
                for name, v in _score_chunked(score, traj.latents[rows.to(dev), t], rows.to(dev), score_batch).items():
                    out.setdefault(name, torch.full((k, b, steps + 1), float("nan")))[:, rows, t] = v
                continue
            rr = rows.repeat(k)  # [k·n], completion j of row i at j·n + i
            jj = torch.arange(k).repeat_interleave(rows.numel())  # [k·n] completion index j
            chunk = max_batch or rr.numel()
            for s in range(0, rr.numel(), chunk):
                part = rr[s:s + chunk]
                ci = traj.cond_index[part.to(dev)]
                gens = [torch.Generator(device=dev).manual_seed(mix_seed(seed, t, int(i), int(j)))
                        for i, j in zip(part, jj[s:s + chunk])]  # one stream per completion
                rest = sample(velocity, traj.latents[part.to(dev), t], traj.sigmas[t:], traj.cond,
                              eta=eta[part, t:], kernel=kernel, generator=gens, cond_index=ci)
                scored = _score_chunked(score, rest.final, part.to(dev), score_batch)  # name -> [len(part)]
                for name, v in scored.items():
                    dst = out.setdefault(name, torch.full((k, b, steps + 1), float("nan")))
                    dst[jj[s:s + part.numel()], part, t] = v
    return out


def make_probe(velocity: VelocityFn, traj: Trajectory, score: ScoreFn, *,
               terminal: Optional[Mapping[str, Tensor]] = None, counter: Optional["NFECounter"] = None,
               **engine_options) -> Callable[[str, Tensor], dict[str, Tensor]]:
    """The ``CreditInput.probe`` callable over this engine: ``probe(mode, mask) -> {name: [B, T+1]}``.

    Results are cached per mode, so a second request probes only states not yet probed.
    """
    cache: dict[str, tuple[Tensor, dict[str, Tensor]]] = {}

    def probe(mode: str, mask: Tensor) -> dict[str, Tensor]:
        mask = mask.detach().cpu().to(torch.bool)
        done, vals = cache.get(mode, (torch.zeros_like(mask), {}))
        todo = mask & ~done
        if bool(todo.any()):
            new = probe_values(velocity, traj, todo, mode, score, terminal=terminal, counter=counter,
                               **engine_options)
            vals = {k: torch.where(todo, new[k], vals[k]) if k in vals else new[k] for k in new}
            done = done | todo
            cache[mode] = (done, vals)
        return {k: torch.where(mask, v, torch.full_like(v, float("nan"))) for k, v in vals.items()}

    return probe


# ------------------------------------------------------------------------------------------ guidance hook


class RewardGuidance:
    """Process-reward gradient guidance of the sampler mean (Euphonium; METHODS.md §4.5).

    A ``mean_shift`` hook for ``flowalign.samplers.loop.sample``: at guided steps t it returns
    λ·Δ_t·∇_x R_φ(x_t, σ_t, c) (without Δ_t when ``scale_dt=False``; ``normalize`` replaces ∇ by ∇/‖∇‖, so
    ``normalize`` alone gives λ·Δ_t·∇/‖∇‖ and with ``scale_dt=False`` λ·∇/‖∇‖), which the loop adds to the
    kernel mean μ_t while the log-prob stays under the unguided μ_t. Paper → ours: the PRM R_φ(z_t, t, c) is
    ``prm(x [B,*], sigma [B], cond_b) -> [B]`` (differentiable in x); their step size/λ is ``lam``
    (λ = η²/(2β) in "KL mode"). λ = 0 reproduces the unguided kernel exactly (DanceGRPO with ``dance_sde``).

    The PRM scores at guided states are recorded (``scores``); ``prm_values(traj)`` returns them as
    [B, T+1] (NaN where not evaluated) after adding the post-states of guided steps (one extra no-grad PRM
    forward at the last guided step), for ``credit.euphonium`` (``CreditInput.extras["prm"]``).
    """

    def __init__(self, prm: Callable[[Tensor, Tensor, Cond], Tensor], lam: float,
                 steps: Optional[Sequence[int]] = None, *, scale_dt: bool = True, normalize: bool = False,
                 chunk: Optional[int] = None):
        self.prm, self.lam = prm, float(lam)
        if chunk is not None and int(chunk) < 1:
            raise ValueError(f"chunk={chunk} must be >= 1 rows per PRM backward (or None: the whole batch)")
        self.chunk = None if chunk is None else int(chunk)  # rows per PRM forward+backward (bounds activation memory)
        self.steps = None if steps is None else set(int(s) for s in steps)
        if self.steps is not None and any(s < 0 for s in self.steps):  # the loop's t is never negative: a silent no-op
            raise ValueError(f"guided steps must be step indices 0 … T−1, got {sorted(self.steps)} "
                             f"(no negative indices: for the last 4 of T = 16 steps write [12, 13, 14, 15])")
        self.scale_dt, self.normalize = scale_dt, normalize
        self.scores: dict[int, Tensor] = {}  # state index -> [B] PRM(x_t)
        self._cond: Optional[Cond] = None

    def __call__(self, x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, t: int, cond_b: Cond) -> Optional[Tensor]:
        if self.steps is not None and t not in self.steps:
            return None
        self._cond = cond_b
        b = x.shape[0]
        rs, grads = [], []
        for lo in range(0, b, self.chunk or b):  # the rows are independent: chunks give the same r and ∇
            idx = torch.arange(lo, min(b, lo + (self.chunk or b)), device=x.device)
            cond_c = cond_b if idx.shape[0] == b else gather_cond(cond_b, idx)
            with torch.enable_grad():
                xg = x[idx].detach().to(torch.float32).requires_grad_(True)
                r = (self.prm(xg, sigma.reshape(-1).expand(b)[idx], cond_c) if idx.shape[0] == b else  # [n]
                     self.prm(xg, sigma.reshape(-1).expand(b)[idx], cond_c, rows=idx))  # a chunk: the PRM takes rows=
                grads.append(torch.autograd.grad(r.sum(), xg)[0])  # [n, *latent]
            rs.append(r.detach().to(torch.float32))
        r, grad = torch.cat(rs), torch.cat(grads)  # [B], [B, *latent]
        self.scores[t] = r
        lat = (1,) * (x.dim() - 1)
        if self.normalize:
            grad = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *lat)
        coef = self.lam * ((sigma - sigma_next) if self.scale_dt else 1.0)
        return coef * grad  # [B, *latent]

    def guided_steps(self, steps: int) -> Tensor:
        """[T] bool: the steps where guidance was applied (and PRM(x_t) recorded)."""
        out = torch.zeros(steps, dtype=torch.bool)
        for t in self.scores:
            if t < steps:
                out[t] = True
        return out

    def credit_extras(self, traj: Trajectory) -> dict[str, Tensor]:
        """``{"prm": [B, T+1], "prm_steps": [T]}`` for ``CreditInput.extras`` (credit ``euphonium``)."""
        late = sorted(s for s in (self.steps or ()) if s >= traj.steps)
        if late and not getattr(self, "_warned_late", False):
            self._warned_late = True
            logger.warning("guided steps %s do not exist in a rollout of T = %d steps: they are never guided", late,
                           traj.steps)
        return {"prm": self.prm_values(traj, post=True), "prm_steps": self.guided_steps(traj.steps)}

    def reset(self) -> None:
        """Forget recorded scores (call before each rollout when the hook is reused)."""
        self.scores.clear()

    def prm_values(self, traj: Trajectory, post: bool = True) -> Tensor:
        """[B, T+1] PRM scores at evaluated states; with ``post`` also at x_{t+1} of every guided step t."""
        b, steps = traj.batch_size, traj.steps
        out = torch.full((b, steps + 1), float("nan"))
        for t, r in self.scores.items():
            out[:, t] = r.cpu()
        if post:
            cond_b = gather_cond(traj.cond, traj.cond_index)
            with torch.no_grad():
                for t in sorted(self.scores):
                    if t + 1 not in self.scores and t + 1 <= steps:
                        x = traj.latents[:, t + 1]
                        out[:, t + 1] = self.prm(x, traj.sigmas[t + 1].expand(b), cond_b).float().cpu()
        return out


# ------------------------------------------------------------------------------------------ guided rollouts


class RewardPRM:
    """A training-free differentiable process reward R_φ(x_t, σ_t, c) for ``RewardGuidance`` (METHODS.md §4.5).

    Euphonium trains a latent PRM; without one, the standard stand-in scores the current clean-image estimate
    with the (differentiable) outcome rewards: ``probe="x0"`` gives R_φ = Σ_k w_k·R_k(decode(x̂0)), with
    x̂0 = x_t − σ_t·v_θ(x_t, σ_t, c) (gradient through the generator, 1 forward + 1 backward per guided step);
    ``probe="latent"`` gives Σ_k w_k·R_k(decode(x_t)) (no generator forward; only sensible in pixel space).

    The rewards need prompts: set ``prompts`` (one per trajectory row, in row order) before each rollout.
    Generator forwards are attributed to ``counter``'s ``"guidance"`` phase when a counter is given.
    """

    def __init__(self, velocity: VelocityFn, decode: Callable[[Tensor], Tensor], rewards: Mapping[str, Callable],
                 weights: Mapping[str, float], *, probe: str = "x0", counter: Optional[NFECounter] = None):
        if probe not in ("x0", "latent"):
            raise ValueError(f"PRM probe must be 'x0' or 'latent', got {probe!r}")
        missing = [k for k in weights if k not in rewards]
        if missing:
            raise ValueError(f"PRM weights name rewards that were not built: {missing}")
        self.velocity, self.decode, self.rewards = velocity, decode, dict(rewards)
        self.weights = {k: float(w) for k, w in weights.items()}
        self.probe, self.counter = probe, counter
        self.prompts: Sequence[str] = ()

    def __call__(self, x: Tensor, sigma: Tensor, cond_b: Cond, rows: Optional[Tensor] = None) -> Tensor:
        """R_φ of ``x`` [n, *latent]; ``rows`` [n]: the rollout rows they are (a chunk of the batch; None = all)."""
        b = x.shape[0]
        n_rows = b if rows is None else len(self.prompts)
        if len(self.prompts) != n_rows:
            raise ValueError(f"RewardPRM.prompts has {len(self.prompts)} entries for a batch of {b}; set it per rollout")
        prompts = list(self.prompts) if rows is None else [self.prompts[int(i)] for i in rows]
        z = x
        if self.probe == "x0":
            ctx = self.counter.phase("guidance") if self.counter is not None else contextlib.nullcontext()
            with ctx:
                v = self.velocity(x, sigma.reshape(-1).expand(b), cond_b).to(torch.float32)  # [B, *latent]
            z = x.to(torch.float32) - sigma.reshape(-1, *((1,) * (x.dim() - 1))).to(torch.float32) * v  # x̂0 [B, *latent]
        images = self.decode(z)  # [B, 3, H, W] (or video) in [0, 1]
        total = torch.zeros(b, dtype=torch.float32, device=x.device)  # [B]
        for k, w in self.weights.items():
            total = total + w * self.rewards[k](images, prompts).to(torch.float32).to(x.device)
        return total


def reward_grad_guide(*, velocity: VelocityFn, decode: Callable[[Tensor], Tensor], rewards: Mapping[str, Callable],
                      weights: Mapping[str, float], counter: Optional[NFECounter] = None, lam: float = 1.0,
                      probe: str = "x0", normalize: bool = False, scale_dt: bool = True,
                      steps: Optional[Sequence[int]] = None, chunk: Optional[int] = None) -> RewardGuidance:
    """Euphonium's reward-gradient-guided SDE (METHODS.md §4.5) with ``RewardPRM`` as the process reward.

    ``lam``: λ of μ^g = μ + λ·Δ_t·∇R_φ (``normalize``: ∇/‖∇‖ in place of ∇; ``scale_dt=False``: no Δ_t);
    ``steps``: the guided steps (None = the
    trainer's trained steps of each iteration); ``chunk``: rows per PRM forward+backward (None = the whole batch; set
    it when the decode + reward graph of a batch does not fit in memory). Every reward in ``weights`` must be
    differentiable.
    """
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam={lam} must be finite and >= 0")
    flat = [k for k in weights if not getattr(rewards.get(k), "differentiable", False)]
    if flat:
        raise ValueError(f"reward guidance needs differentiable rewards; {flat} are not (see `flowalign rewards`), "
                         f"e.g. rewards: {{saturation: 1.0}}")
    prm = RewardPRM(velocity, decode, rewards, weights, probe=probe, counter=counter)
    return RewardGuidance(prm, lam, steps, scale_dt=scale_dt, normalize=normalize, chunk=chunk)


GUIDES: dict[str, Optional[Callable[..., RewardGuidance]]] = {
    "none": None,
    "reward_grad": reward_grad_guide,
}
"""Rollout mean-shift hooks the trainer can select (``sampler.guide``); ``"none"`` samples the plain kernel."""
