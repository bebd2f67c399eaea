"""Group normalisation and credit assigners (METHODS.md §3.2–3.4, §4; DESIGN.md §3).

A credit assigner maps (trajectory data, terminal rewards, values if needed) to per-transition advantages
[B, T] (0 where a step is not trained) plus optional positive per-step weights. Assigners are registered in
the ``CREDIT`` dict literal at the bottom; the trainer picks one by name (``credit.name``) and passes the
``credit.options`` mapping as keyword arguments. No method flags live in shared code.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor

from flowalign.types import Credit, Interval, NonEmpty, Trajectory
from flowalign.values import row_eta

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CreditInput:
    """Everything a credit assigner may read. Shapes are part of the contract."""

    traj: Trajectory
    rewards: Mapping[str, Tensor]  # name -> [B] raw terminal rewards (NaN = not applicable)
    reward_weights: Mapping[str, float]  # name -> weight
    trained: Tensor  # [B, T] bool: which transitions are trained
    aggregate: str = "advantage_sum"  # reward_sum | advantage_sum (METHODS.md §3.4)
    std_scope: str = "group"  # group | global
    std_eps: float = 1e-4
    std_ddof: int = 0
    adv_clip: float = 5.0  # A_max of the loss (credit.adv_clip): clipped_heads clips to it; assigners that fold
    # coefficients into their heads (Euphonium) clip to the same value first
    values: Optional[Mapping[str, Tensor]] = None  # name -> [B, T+1] per-state value estimates, if probed
    # probe(mode, mask [B, T+1] bool) -> {reward name: [B, T+1] values, NaN where not probed}; the trainer builds it
    # over the process-reward core (values.py) with θ_old, the rollout's CFG and an NFE phase "probing".
    probe: Optional[Callable[[str, Tensor], Mapping[str, Tensor]]] = None
    extras: Mapping[str, Any] = field(default_factory=dict)
    # sums a tensor over the ranks (all-reduce) under multi-process training, so std_scope="global" is the std of
    # every rank's rewards (METHODS.md §3.2), not of this rank's; None = one process
    reduce_sum: Optional[Callable[[Tensor], Tensor]] = None


def group_moments(x: Tensor, group: Tensor, ok: Tensor, *, scope: str = "group", ddof: int = 0,
                  reduce_sum: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-column group statistics of ``x`` [B, T] (float64) over the rows ``ok`` [B] (METHODS.md §3.2), shared by
    ``group_normalize`` and VGPO's ``floored_z``. Returns, each [B, T] but the last:

    * ``dev``: x minus its group's mean (0 outside ``ok``);
    * ``std``: the std of the row's group (``scope="group"``) or of every ``ok`` row (``"global"``, summed over the
      ranks by ``reduce_sum``), with ``ddof``;
    * ``flat``: every ``ok`` value of the row's group in that column is equal (x − mean can be ~1e-17, not 0);
    * ``count`` [B]: the ``ok`` rows of the row's group.
    """
    x = x.detach().to(torch.float64)  # [B, T]
    ok = ok.detach().to(device=x.device, dtype=torch.bool)  # [B]
    okc = ok[:, None]  # [B, 1]
    _, inv = torch.unique(group.to(x.device), return_inverse=True)  # [B] dense group ids, on x's device
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    zeros = torch.zeros(n_groups, x.shape[1], dtype=torch.float64, device=x.device)  # [G, T]
    cnt = torch.zeros(n_groups, dtype=torch.float64, device=x.device).index_add(0, inv, ok.double())  # [G]
    x0 = torch.where(okc, x, torch.zeros_like(x))  # [B, T]
    mean = zeros.index_add(0, inv, x0) / cnt.clamp_min(1)[:, None]  # [G, T]
    dev = torch.where(okc, x - mean[inv], torch.zeros_like(x))  # [B, T]
    if scope == "group":
        ss = zeros.index_add(0, inv, dev * dev)  # [G, T]
        std = torch.sqrt(ss / (cnt - ddof).clamp_min(1)[:, None])[inv]  # [B, T]
    elif scope == "global":
        total = torch.cat([ok.sum().to(torch.float64).reshape(1), x0.sum(0)])  # [1 + T]: count, column sums
        if reduce_sum is not None:
            total = reduce_sum(total.clone())
        n = total[0].clamp_min(1)
        gdev = torch.where(okc, x - total[1:] / n, torch.zeros_like(x))  # [B, T] around the global mean
        ss = (gdev * gdev).sum(0)  # [T]
        if reduce_sum is not None:
            ss = reduce_sum(ss.clone())
        std = torch.sqrt(ss / (n - ddof).clamp_min(1))[None].expand_as(x)  # [B, T]
    else:
        raise ValueError(f"std scope must be 'group' or 'global', got {scope!r}")
    inf = torch.full_like(zeros, math.inf)  # [G, T]
    idx = inv[:, None].expand_as(x)  # [B, T]
    gmax = (-inf).scatter_reduce(0, idx, torch.where(okc, x, -math.inf), reduce="amax")
    gmin = inf.scatter_reduce(0, idx, torch.where(okc, x, math.inf), reduce="amin")
    return dev, std, (gmax == gmin)[inv], cnt[inv]


def group_normalize(rewards: Tensor, group: Tensor, *, scope: str = "group", eps: float = 1e-4,
                    ddof: int = 0, reduce_sum: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """A_i = (R_i − mean_group R) / (std + eps) in float64 (Flow-GRPO Eq. 4; METHODS.md §3.2).

    ``scope="global"`` uses the std of all rewards (Flow-GRPO's ``global_std``). NaN rewards are left out of
    the statistics and get A = 0. A group whose rewards are all equal gets A = 0 (never NaN); a group of one
    gets 0. Returns float32 [B] on the rewards' device (``group`` may live on another device).
    ``reduce_sum`` (multi-process training) sums the global scope's statistics over the ranks; groups are
    rank-local, so the group scope needs none.
    """
    r = rewards.detach().to(torch.float64)  # [B]
    ok = torch.isfinite(r)
    dev, std, flat, cnt = group_moments(r[:, None], group, ok, scope=scope, ddof=ddof, reduce_sum=reduce_sum)
    dev, std, flat = dev[:, 0], std[:, 0], flat[:, 0]  # [B]
    adv = dev / (std + eps)
    if scope == "group":
        flat = flat | torch.isclose(std, torch.zeros_like(std), atol=1e-12)
    adv = torch.where(ok & (cnt >= 2) & ~flat, adv, torch.zeros_like(adv))  # one reward, or all equal: A = 0
    return adv.to(torch.float32)


def zero_std_ratio(rewards: Tensor, group: Tensor) -> float:
    """Fraction of groups whose (finite) rewards are all equal (logged, METHODS.md §3.2)."""
    zs = []
    for g in torch.unique(group):
        r = rewards[group == g]
        r = r[torch.isfinite(r)]
        zs.append(bool(r.numel() < 2 or (r.max() - r.min()).abs() < 1e-12))
    return float(sum(zs) / max(1, len(zs)))


def rows_with_reward(rewards: Mapping[str, Tensor], reward_weights: Mapping[str, float], aggregate: str) -> Tensor:
    """[B] bool: the rollouts that carry a reward under ``aggregate`` (METHODS.md §3.4; REWARDS_AND_EVAL.md §1: NaN =
    "not applicable", masked out of the group statistics and the loss).

    The masking unit follows the aggregation. ``reward_sum`` trains on Σ_k w_k·R_k, which is undefined when any
    weighted R_k is non-finite, so such a rollout has no reward. ``advantage_sum`` sums one term per reward, so the
    unit is the (rollout, reward) pair: a rollout with a non-finite R_k sits out reward k's statistics and its term
    is 0, while its other rewards still count; only a rollout whose every weighted reward is non-finite has none.
    Every registered credit assigner gives a rollout without a reward A = 0 on every step and head.
    """
    fin = [torch.isfinite(rewards[k].detach()).cpu() for k in reward_weights]  # [B] each
    if not fin:
        raise ValueError("no reward weights: credit needs at least one weighted reward")
    ok = torch.stack(fin)  # [K, B]
    if aggregate == "reward_sum":
        return ok.all(0)
    if aggregate == "advantage_sum":
        return ok.any(0)
    raise ValueError(f"aggregate must be 'reward_sum' or 'advantage_sum', got {aggregate!r}")


def terminal_advantage(inp: CreditInput) -> Tensor:
    """Per-rollout advantage [B] from the weighted terminal rewards, as ``inp.aggregate`` says (METHODS.md §3.4).

    ``reward_sum``: normalise Σ_k w_k·R_k. ``advantage_sum``: Σ_k w_k·normalise(R_k) (scale-free).
    """
    group = inp.traj.group
    norm = dict(scope=inp.std_scope, eps=inp.std_eps, ddof=inp.std_ddof, reduce_sum=inp.reduce_sum)
    if inp.aggregate == "reward_sum":
        total = sum(float(w) * inp.rewards[k].to(torch.float64) for k, w in inp.reward_weights.items())
        return group_normalize(total, group, **norm)
    if inp.aggregate == "advantage_sum":
        return sum(float(w) * group_normalize(inp.rewards[k], group, **norm) for k, w in inp.reward_weights.items())
    raise ValueError(f"aggregate must be 'reward_sum' or 'advantage_sum', got {inp.aggregate!r}")


def outcome(inp: CreditInput) -> Credit:
    """Flow-GRPO outcome credit (Liu et al. 2025, Eq. 4–6): every trained step of rollout i gets A_i.

    Paper symbols: Â_t^i = (R(x_0^i, c) − mean({R_j})) / std({R_j}) for all t; our A[i, t] for trained t.
    """
    adv = terminal_advantage(inp)  # [B]
    return Credit(advantages=adv[:, None] * inp.trained.to(device=adv.device, dtype=adv.dtype))  # [B, T]


def group_win_rates(rewards: Tensor, group: Tensor, margin: float = 0.0) -> Tensor:
    """Pref-GRPO's pairwise win rate within each group (Wang et al. 2025, "Pref-GRPO: Pairwise Preference
    Reward-based GRPO for Stable Text-to-Image Reinforcement Learning", arXiv:2508.20751; METHODS.md §4.8).

    R_i = (wins_i + ½·ties_i)/(n_g − 1) over the other members j of i's group, a pair judged by comparing rewards:
    i wins when r_i > r_j + ``margin``, ties when |r_i − r_j| ≤ ``margin`` (a pointwise reward as the judge; the
    paper's preference model judges the pair itself). A group's rates average ½ and depend only on the order of its
    rewards. NaN rewards take no part and get NaN; a lone finite member gets NaN too (nothing to compare).
    ``rewards`` [B], ``group`` [B] → float64 [B].
    """
    r = rewards.detach().to(torch.float64).cpu()  # [B]
    g = group.detach().cpu()
    ok = torch.isfinite(r)  # [B]
    pair = (g[:, None] == g[None, :]) & ok[:, None] & ok[None, :]  # [B, B] comparable pairs
    pair.fill_diagonal_(False)
    d = r[:, None] - r[None, :]  # [B, B] r_i − r_j
    wins = (pair & (d > margin)).sum(1).to(torch.float64)  # [B]
    ties = (pair & (d.abs() <= margin)).sum(1).to(torch.float64)  # [B]
    n = pair.sum(1).to(torch.float64)  # [B] members compared with
    return torch.where(ok & (n > 0), (wins + 0.5 * ties) / n.clamp_min(1), torch.full_like(r, float("nan")))


def win_rate(inp: CreditInput, *, margin: Annotated[float, Interval(0.0)] = 0.0) -> Credit:
    """Pref-GRPO credit (arXiv:2508.20751; METHODS.md §4.8): the group z-score of each rollout's pairwise win rate
    (``group_win_rates``) instead of its reward, on every trained step.

    Win rates spread a group's rewards over [0, 1] by rank, so the advantage depends only on the order of the
    rewards (any increasing transform of the reward gives the same credit). ``margin``: reward differences up to it
    count as ties, the pointwise stand-in for a preference judge that cannot tell two images apart (with 0, two
    nearly equal rewards still split into a win and a loss, the "illusory advantage" the paper warns of). Several
    rewards: ``reward_sum`` ranks Σ_k w_k·R_k, ``advantage_sum`` sums w_k·z(win rate of R_k).
    """
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin={margin} must be finite and >= 0")
    group = inp.traj.group.detach().cpu()
    norm = _norm_kw(inp)

    def z(r: Tensor) -> Tensor:
        return group_normalize(group_win_rates(r, group, margin), group, **norm).to(torch.float32)  # [B]

    if inp.aggregate == "reward_sum":
        adv = z(sum(float(w) * inp.rewards[k].detach().to(torch.float64).cpu() for k, w in inp.reward_weights.items()))
    elif inp.aggregate == "advantage_sum":
        adv = sum(float(w) * z(inp.rewards[k]) for k, w in inp.reward_weights.items())
    else:
        raise ValueError(f"aggregate must be 'reward_sum' or 'advantage_sum', got {inp.aggregate!r}")
    return Credit(advantages=adv[:, None] * inp.trained.detach().cpu().to(adv.dtype))  # [B, T]


# ------------------------------------------------------------------------------------------ dense credit helpers


def step_normalize(x: Tensor, group: Tensor, valid: Optional[Tensor] = None, *, scope: str = "group",
                   eps: float = 1e-4, ddof: int = 0, reduce_sum: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Per-step group z-score: column t of ``x`` [B, T] normalised over each group (METHODS.md §4.1).

    Entries outside ``valid`` [B, T] (or non-finite) are left out of the statistics and get 0; a column whose
    group values are all equal gets 0. Returns float32 [B, T].
    """
    x = x.detach().to(torch.float64)
    if valid is not None:
        x = torch.where(valid.to(x.device), x, torch.full_like(x, float("nan")))
    cols = [group_normalize(x[:, t], group, scope=scope, eps=eps, ddof=ddof, reduce_sum=reduce_sum)
            for t in range(x.shape[1])]
    return torch.stack(cols, dim=1) if cols else torch.zeros_like(x, dtype=torch.float32)  # [B, T]


def _norm_kw(inp: CreditInput, eps: Optional[float] = None) -> dict:
    return dict(scope=inp.std_scope, eps=inp.std_eps if eps is None else eps, ddof=inp.std_ddof,
                reduce_sum=inp.reduce_sum)


def state_values(inp: CreditInput, mode: str, mask: Tensor) -> dict[str, Tensor]:
    """{reward name: [B, T+1] float64} values of the states ``mask`` selects, V(x_T) = the terminal reward.

    Uses ``inp.values`` when given (precomputed), else ``inp.probe(mode, mask)`` (the process-reward core).
    Column T always holds ``inp.rewards`` (V(x_T) = R(x_T), METHODS.md §4.0), so x_T is never probed.
    """
    b, steps = inp.trained.shape
    names = list(inp.reward_weights)
    if inp.values is not None:
        vals = {k: inp.values[k].detach().to(torch.float64).cpu() for k in names}
    else:
        if inp.probe is None:
            raise ValueError("this credit method needs value probes: CreditInput.probe (or .values) is None; "
                             "build it with flowalign.values.make_probe")
        req = mask.detach().cpu().to(torch.bool).clone()
        req[:, steps] = False
        got = inp.probe(mode, req) if bool(req.any()) else {}
        vals = {}
        for k in names:
            v = got.get(k)
            vals[k] = (torch.full((b, steps + 1), float("nan"), dtype=torch.float64) if v is None
                       else v.detach().to(torch.float64).cpu().clone())
    for k in names:
        vals[k][:, steps] = inp.rewards[k].detach().to(torch.float64).cpu()
    return vals


def aggregate_rewards(inp: CreditInput, vals: Mapping[str, Tensor], fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``fn(V [B, T+1]) -> normalised A [B, T]`` per ``inp.aggregate`` (METHODS.md §3.4).

    ``reward_sum``: fn(Σ_k w_k·V_k). ``advantage_sum``: Σ_k w_k·fn(V_k). The last column of V is the terminal
    reward (``state_values``; a [B] V is the rewards themselves). A row whose terminal value is not finite (a NaN,
    "not applicable" reward; with ``reward_sum`` any weighted reward NaN) is handed to ``fn`` as NaN on every
    state, so statistics that skip non-finite entries leave it out, and gets 0 from that term on every step
    whatever ``fn`` returns for it (``rows_with_reward``).
    """
    def masked(v: Tensor) -> Tensor:
        ok = torch.isfinite(v if v.dim() == 1 else v[:, -1])  # [B] rows with a terminal reward
        shape = (-1,) + (1,) * (v.dim() - 1)
        out = fn(torch.where(ok.view(shape), v, torch.full_like(v, float("nan")))).to(torch.float32)  # [B, T]
        keep = ok.to(out.device).view((-1,) + (1,) * (out.dim() - 1))
        return torch.where(keep, out, torch.zeros_like(out))

    if inp.aggregate == "reward_sum":
        return masked(sum(float(w) * vals[k] for k, w in inp.reward_weights.items()))
    if inp.aggregate == "advantage_sum":
        return sum(float(w) * masked(vals[k]) for k, w in inp.reward_weights.items())
    raise ValueError(f"aggregate must be 'reward_sum' or 'advantage_sum', got {inp.aggregate!r}")


# ------------------------------------------------------------------------------------------ DenseGRPO


def reward_gains(values: Tensor) -> Tensor:
    """ΔR_t = V_{t+1} − V_t (DenseGRPO step reward, METHODS.md §4.1): [B, T+1] → [B, T] float64; Σ_t ΔR_t = V_T − V_0."""
    v = values.to(torch.float64)
    return v[:, 1:] - v[:, :-1]


def dense_gain(inp: CreditInput, *, probe: str = "ode:full", signal: Literal["gain", "value"] = "gain") -> Credit:
    """DenseGRPO step-wise reward gain (Deng et al. 2025, "From Sparse to Dense Reward…", §3; METHODS.md §4.1).

    Paper → ours: the step reward ΔR_t^i = R(x̂_{t−1}^i) − R(x̂_t^i) in diffusion time is our
    ΔR_it = V_{i,t+1} − V_{i,t}, with V_t = V_full(x_t) (the ODE completion of x_t on the native grid,
    ``probe="ode:full"``; few-step probes "ode:m", "ode2:m" or "x0" are cheaper ablations), V_T = R_i.
    Σ_t ΔR_it telescopes to R_i − V_{i,0}. Advantage: per-step group z-score
    A_it = (ΔR_it − mean_j ΔR_jt)/(std_j ΔR_jt + eps). ``signal="value"`` uses V_{t+1} instead of the gain
    (the paper's weaker variant). Probed states: the union of {t, t+1} over trained edges only.
    """
    if signal not in ("gain", "value"):
        raise ValueError(f"signal must be 'gain' or 'value', got {signal!r}")
    trained = inp.trained.detach().cpu().to(torch.bool)  # [B, T]
    b, steps = trained.shape
    mask = torch.zeros(b, steps + 1, dtype=torch.bool)
    mask[:, 1:] |= trained
    if signal == "gain":
        mask[:, :-1] |= trained
    vals = state_values(inp, probe, mask)
    group = inp.traj.group.detach().cpu()

    def fn(v: Tensor) -> Tensor:
        r = reward_gains(v) if signal == "gain" else v[:, 1:]  # [B, T]
        return step_normalize(r, group, trained, **_norm_kw(inp))

    adv = aggregate_rewards(inp, vals, fn)
    return Credit(advantages=adv * trained.to(adv.dtype))


def joint_normalize(x: Tensor, group: Tensor, valid: Tensor, *, scope: str = "group", eps: float = 1e-4,
                    ddof: int = 0, reduce_sum: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Joint group z-score over every valid (i, t) of a group at once (Stepwise-Flow-GRPO, METHODS.md §4.6):
    Ã_it = (x_it − mean_{j,s} x_js)/(std_{j,s} x_js + eps), the statistics over the group's entries at all steps.

    Unlike ``step_normalize`` (one z-score per column) it keeps the steps' relative scales: a step whose gains are
    small stays small instead of being blown up to unit spread. Entries outside ``valid`` [B, T] (or non-finite) are
    left out and get 0. ``x`` [B, T] → float32 [B, T].
    """
    x = x.detach().to(torch.float64)
    ok = valid.to(torch.bool).to(x.device)  # [B, T]
    entries = torch.where(ok, x, torch.full_like(x, float("nan")))[ok]  # [N] the valid entries, row-major
    groups = group.to(x.device)[:, None].expand_as(x)[ok]  # [N] each entry's group
    out = torch.zeros_like(x, dtype=torch.float32)  # [B, T]
    if entries.numel():
        out[ok] = group_normalize(entries, groups, scope=scope, eps=eps, ddof=ddof, reduce_sum=reduce_sum)
    return out


def stepwise_gain(inp: CreditInput, *, probe: str = "ode:5") -> Credit:
    """Stepwise-Flow-GRPO (METHODS.md §4.6 [secondary]): DenseGRPO's telescoping gains ΔR_it = V_{i,t+1} − V_{i,t}
    with a short ODE probe (T′ = 5 Euler sub-steps, ``probe="ode:5"``; T′ ≤ 3 is reported noisy), normalised
    **jointly** over all (i, t) of the group (``joint_normalize``) instead of per step, which the method reports
    to converge faster because per-step normalisation amplifies the late steps' small, noisy gains. The method
    shares x_0 within a group: pair it with ``sampler.init_noise=group``.
    """
    trained = inp.trained.detach().cpu().to(torch.bool)  # [B, T]
    b, steps = trained.shape
    mask = torch.zeros(b, steps + 1, dtype=torch.bool)
    mask[:, 1:] |= trained
    mask[:, :-1] |= trained
    vals = state_values(inp, probe, mask)
    group = inp.traj.group.detach().cpu()

    def fn(v: Tensor) -> Tensor:
        return joint_normalize(reward_gains(v), group, trained, **_norm_kw(inp))

    adv = aggregate_rewards(inp, vals, fn)
    return Credit(advantages=adv * trained.to(adv.dtype))


# ------------------------------------------------------------------------------------------ TP-GRPO


def turning_point_rewards(values: Tensor, *, constraint: bool = True, first_step: bool = True
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """TP-GRPO step rewards from a value sequence R^(0..n) [B, n+1] (METHODS.md §4.2).

    d_j = R^(j) − R^(j−1); Δ = R^(n) − R^(0); c_j = sgn(d_j)·sgn(Δ); g_j = R^(n) − R^(j−1).
    Turning point I_j (j ≥ 2): c_{j−1} < 0 ∧ c_j > 0, and with ``constraint`` also sgn(d_j)·sgn(R^(n) − R^(j)) > 0.
    j = 1 (``first_step``): c_1 > 0, or with ``constraint`` sgn(d_1)·sgn(R^(n) − R^(1)) > 0.
    r_j = I_j·g_j + (1 − I_j)·d_j. Returns (r, I, d, g, Δ): [B, n] ×4 (I bool) and [B].
    """
    v = values.to(torch.float64)
    d = v[:, 1:] - v[:, :-1]  # [B, n]
    delta = v[:, -1] - v[:, 0]  # [B]
    g = v[:, -1:] - v[:, :-1]  # [B, n]
    c = torch.sign(d) * torch.sign(delta)[:, None]  # [B, n]
    tail = torch.sign(d) * torch.sign(v[:, -1:] - v[:, 1:])  # sgn(d_j)·sgn(R^(n) − R^(j))  [B, n]
    turn = torch.zeros_like(d, dtype=torch.bool)
    turn[:, 1:] = (c[:, :-1] < 0) & (c[:, 1:] > 0)
    if first_step:
        turn[:, 0] = c[:, 0] > 0
    if constraint:
        turn &= tail > 0
    r = torch.where(turn, g, d)
    return r, turn, d, g, delta


def balance_turning_points(turn: Tensor, delta: Tensor, unit: Tensor) -> Tensor:
    """Balance positive and negative turning points per scope unit (TP-GRPO; METHODS.md §4.2).

    In each unit, P = {(i, j): I_ij, Δ_i > 0} and N = {(i, j): I_ij, Δ_i < 0}; if both are non-empty keep the
    m = min(|P|, |N|) of each with the largest |Δ_i| (ties: lower step index, then lower row) and clear the
    rest. ``turn`` [B, n] bool, ``delta`` [B], ``unit`` [B] → a new [B, n] bool.
    """
    out = turn.clone()
    for u in unit.unique().tolist():
        rows = (unit == u).nonzero().flatten().tolist()
        pos = [(i, j) for i in rows for j in out[i].nonzero().flatten().tolist() if delta[i] > 0]
        neg = [(i, j) for i in rows for j in out[i].nonzero().flatten().tolist() if delta[i] < 0]
        if not pos or not neg:
            continue
        m = min(len(pos), len(neg))
        for side in (pos, neg):
            ranked = sorted(side, key=lambda ij: (-abs(float(delta[ij[0]])), ij[1], ij[0]))
            for i, j in ranked[m:]:
                out[i, j] = False
    return out


def turning_points(inp: CreditInput, *, probe: str = "ode:full", constraint: bool = True, first_step: bool = True,
                   balance_scope: Literal["group", "batch", "none"] = "group") -> Credit:
    """TP-GRPO / TurningPoint-GRPO step rewards (METHODS.md §4.2; released code for the constraint and balancing).

    Paper → ours: the window of n stochastic steps s_1 < … < s_n (η > 0); R^(0) = V_full(x_{s_1}) (equals
    V_full of the trajectory's own x_0 when the prefix is ODE — quirk Q14 fixed: no fresh noise), R^(j) =
    V_full(x_{s_j+1}); R^(n) = R(x_T) when the tail is ODE. Incremental reward d_j, global trend Δ,
    turning points I_j (``constraint`` on = the shipped setting, ``first_step`` = the initial-step
    extension), aggregated long-term reward g_j; step reward r_j = I_j·g_j + (1 − I_j)·d_j for step s_j.
    ``balance_scope``: "group" (default, flowalign), "batch" (upstream's per-micro-batch), "none".
    Advantage: per-step group z-score of r (std + eps), 0 off trained steps.
    """
    if balance_scope not in ("group", "batch", "none"):
        raise ValueError(f"balance_scope must be 'group', 'batch' or 'none', got {balance_scope!r}")
    trained = inp.trained.detach().cpu().to(torch.bool)  # [B, T]
    b, steps = trained.shape
    stoch_rows = row_eta(inp.traj).detach().cpu() > 0  # [B, T] each row's window steps s_j (per-group windows)
    # rows that share a window (every row of a group does) are scored together: [(rows [b_p], steps s_j [n_p])]
    patterns = [((stoch_rows == p).all(1).nonzero().flatten(), p.nonzero().flatten())
                for p in stoch_rows.unique(dim=0) if bool(p.any())]
    if not patterns:
        return Credit(advantages=torch.zeros(b, steps))
    mask = torch.zeros(b, steps + 1, dtype=torch.bool)
    for rows, stoch in patterns:  # R^(0) at x_{s_1}, R^(j) at x_{s_j+1}
        mask[rows[:, None], torch.cat([stoch[:1], stoch + 1])[None]] = True
    vals = state_values(inp, probe, mask)
    group = inp.traj.group.detach().cpu()
    unit = group if balance_scope == "group" else torch.zeros_like(group)

    def fn(v: Tensor) -> Tensor:
        full = torch.full((b, steps), float("nan"), dtype=torch.float64)
        for rows, stoch in patterns:  # "batch" balancing runs within the rows of one window
            states = torch.cat([stoch[:1], stoch + 1])  # [n+1]
            r, turn, d, g, delta = turning_point_rewards(v[rows][:, states], constraint=constraint,
                                                         first_step=first_step)  # [b_p, n] ×4, [b_p]
            if balance_scope != "none":
                turn = balance_turning_points(turn, delta, unit[rows])
                r = torch.where(turn, g, d)
            full[rows[:, None], stoch[None]] = r
        return step_normalize(full, group, trained, **_norm_kw(inp))

    adv = aggregate_rewards(inp, vals, fn)
    return Credit(advantages=adv * trained.to(adv.dtype))


# ------------------------------------------------------------------------------------------ TempFlow-GRPO


def tempflow_weights(sigmas: Tensor, a: float | Tensor, trained_steps: Sequence[int] | Tensor,
                     kernel: str = "flow_sde", **kernel_kwargs) -> Tensor:
    """TempFlow-GRPO noise-aware weights w_k = s_k / mean_{k′∈trained} s_{k′} (METHODS.md §4.3).

    Paper → ours: Norm(σ̃_t·√Δt) with their σ̃ = our g_k, so s_k = g_k·√Δ_k is the std of the branch kernel
    (``kernel``, default Flow-GRPO's ``flow_sde`` with noise level ``a``, a float or per-step [T]) at step k.
    Upstream's hand constant C = 2.25 (SD3.5) is 1/mean s_k; here it is computed from the schedule.
    ``kernel_kwargs`` are the kernel's keyword options the children were drawn with (e.g. ``flow_sde``'s
    ``sigma_1``, which sets s_0); without them s_k is the kernel's default. Returns [len(trained_steps)] float32,
    mean 1.
    """
    from flowalign.samplers.kernels import get_kernel

    kern = get_kernel(kernel)
    sig = sigmas.detach().cpu().to(torch.float32)
    ks = torch.as_tensor(list(trained_steps) if not isinstance(trained_steps, Tensor) else trained_steps.cpu(),
                         dtype=torch.long)
    a_t = torch.as_tensor(a, dtype=torch.float32).cpu()
    a_k = a_t[ks] if a_t.dim() == 1 else a_t.expand(ks.shape[0])  # [K]
    x = torch.zeros(ks.shape[0], 1)
    s = kern(x, x, sig[ks], sig[ks + 1], a_k, **kernel_kwargs).std  # [K, 1] (or [K]): the std is scalar per row
    s = s.reshape(ks.shape[0], -1)[:, 0].to(torch.float64)  # [K]
    if not bool((s > 0).all()):
        raise ValueError("tempflow_weights: the kernel std is 0 at some trained step (η = 0 or last CPS step)")
    return (s / s.mean()).to(torch.float32)


def branch(inp: CreditInput, *, probe: Optional[str] = None, noise_weights: bool = True) -> Credit:
    """TempFlow-GRPO credit on a branched rollout (He et al. 2025, "TempFlow-GRPO"; METHODS.md §4.3).

    Needs a trajectory from ``flowalign.samplers.plans.branch``: each row is child b of (prompt, seed, k),
    ``traj.group`` is that sibling key, ``extras["branch_step"]`` its k. Paper → ours: R_{k,b} =
    V_full(x_{k+1}^{(b)}) is the child's terminal reward (the plan ODE-completes children, so no probe is
    needed; ``probe="ode:m"`` values x_{k+1} instead). A_{k,b} = (R_{k,b} − mean_b)/(std_b + eps) lives on
    the branch edge k only; ``weights`` carry w_k = s_k / mean s over the candidate branch steps
    (``tempflow_weights``), folded by the trainer after the ±A_max clip (METHODS.md §3.6). s_k is the std the
    children were drawn with: the plan's kernel (``extras["kernel"]``) with its keyword options
    (``extras["kernel_options"]``, e.g. ``sampler.plan_options.sigma_1``) at the candidate η (``extras["branch_eta"]``).
    A child without a reward (NaN) sits out its siblings' statistics and gets A = 0.
    """
    ex = inp.traj.extras or {}
    if "branch_step" not in ex:
        raise ValueError("credit 'branch' needs a branched rollout (sampler.plan=branch): extras['branch_step'] "
                         "is missing")
    trained = inp.trained.detach().cpu().to(torch.bool)  # [B, T]
    b, steps = trained.shape
    k = ex["branch_step"].detach().cpu().long()  # [B]
    rows = torch.arange(b)
    if probe is None:
        adv_row = terminal_advantage(inp)  # [B], normalised over traj.group = (prompt, seed, k)
    else:
        mask = torch.zeros(b, steps + 1, dtype=torch.bool)
        mask[rows, k + 1] = True
        vals = state_values(inp, probe, mask)
        group = inp.traj.group.detach().cpu()
        adv_row = aggregate_rewards(inp, vals, lambda v: group_normalize(v[rows, k + 1], group, **_norm_kw(inp))[:, None]
                             )[:, 0]
    adv = torch.zeros(b, steps)
    adv[rows, k] = adv_row.detach().cpu().to(adv.dtype)  # credit tensors live on the CPU
    adv = adv * trained.to(adv.dtype)
    weights = None
    if noise_weights:
        cands = ex.get("branch_candidates")
        cands = cands.detach().cpu().long() if cands is not None else k.unique()
        a = ex.get("branch_eta", inp.traj.eta).detach().cpu()
        w_c = tempflow_weights(inp.traj.sigmas, a, cands, kernel=ex.get("kernel", "flow_sde"),
                               **dict(ex.get("kernel_options") or {}))  # [C]
        w_step = torch.ones(steps)
        w_step[cands] = w_c
        weights = torch.ones(b, steps)
        weights[rows, k] = w_step[k]
    return Credit(advantages=adv, weights=weights)


def granular(inp: CreditInput, *,
             strides: Annotated[Sequence[int], Interval(1), NonEmpty("[1, 2, 3]")] = (1, 2, 3)) -> Credit:
    """G²RPO's (Granular-GRPO's) multi-granularity advantage on a branched rollout (METHODS.md §4.7, from secondary
    notes on the paper; §5.1's table).

    Rollouts come from ``flowalign.samplers.plans.branch`` (G²RPO's "singular stochastic sampling": an ODE trunk to
    x_k, one SDE step into G children, ODE elsewhere); restrict the branch steps to the high-noise half with
    ``sampler.train_fraction=0.5`` (k < T/2: 8 branch steps at T = 16, as METHODS §5.2's cost row counts; §4.7
    writes k ≤ T − ⌊T/2⌋ and marks that boundary unconfirmed; the released FLUX script bcmi/Granular-GRPO
    ``scripts/finetune/finetune_g2rpo_hps.sh`` confirms k < T/2: ``--eta_step_list 0 … 7`` at ``--sampling_steps
    16``). Paper → ours: each child x_{k+1}^{(i)} is completed on J coarsened grids, every λ_j-th native grid index
    (``strides`` λ_j; probe mode ``ode/λ``, Euler on ``subgrid(k+1, T, None, λ)``; λ = 1 is the child's own ODE
    completion, its terminal reward, no probe). The paper's Λ is {1, 2, 3}, our default; the released script trains
    with ``--granular_list 1 2`` (``strides: [1, 2]`` here). Our coarse grid strides from the child (k+1, k+1+λ, …, T);
    the release takes the child's next native step first (k+1, k+2, k+2+λ, …) and, where the stride misses σ = 0,
    ends at the x̂_0 prediction of its last point.
    A^mix_{k,i} = Σ_j z_i(R(completion_j of child i)), each z-score over the siblings (``traj.group`` = (prompt,
    seed, k)), lives on the branch edge k only. No per-step weights (TempFlow's noise weights are ``branch``'s).
    """
    ex = inp.traj.extras or {}
    if "branch_step" not in ex:
        raise ValueError("credit 'granular' needs a branched rollout (sampler.plan=branch): extras['branch_step'] "
                         "is missing")
    lams = [int(x) for x in strides]
    if not lams or any(x < 1 for x in lams):
        raise ValueError(f"strides must be a non-empty list of integers >= 1, e.g. [1, 2, 3]; got {list(strides)}")
    trained = inp.trained.detach().cpu().to(torch.bool)  # [B, T]
    b, steps = trained.shape
    k = ex["branch_step"].detach().cpu().long()  # [B]
    rows = torch.arange(b)
    group = inp.traj.group.detach().cpu()
    mask = torch.zeros(b, steps + 1, dtype=torch.bool)  # [B, T+1]
    mask[rows, k + 1] = True
    adv_row = torch.zeros(b)
    for lam in lams:
        vals = state_values(inp, f"ode/{lam}", mask)  # {name: [B, T+1]}
        z = aggregate_rewards(inp, vals, lambda v: group_normalize(v[rows, k + 1], group, **_norm_kw(inp))[:, None])
        adv_row = adv_row + z[:, 0].detach().cpu().to(adv_row.dtype)  # [B]
    adv = torch.zeros(b, steps)
    adv[rows, k] = adv_row  # credit tensors live on the CPU
    return Credit(advantages=adv * trained.to(adv.dtype))


# ------------------------------------------------------------------------------------------ BranchGRPO trees


def _tree_nodes(node: Tensor, depth: Tensor, tree: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Dense node table of a tree rollout: (inv [B, T] dense node index of each edge, member [U, B] leaf row below
    node u, u_depth [U], u_tree [U], u_first [U] the first step of u, its split edge)."""
    b, steps = node.shape
    _, inv = torch.unique(node.flatten(), return_inverse=True)  # [B·T] dense node index of each edge
    inv = inv.view(b, steps)  # [B, T]
    u = int(inv.max()) + 1 if inv.numel() else 0
    rows = torch.arange(b)[:, None].expand(b, steps)  # [B, T]
    member = torch.zeros(u, b, dtype=torch.bool)  # [U, B]
    member[inv.flatten(), rows.flatten()] = True
    u_depth = torch.zeros(u, dtype=torch.long).scatter_(0, inv.flatten(), depth.flatten())  # [U]
    u_tree = torch.zeros(u, dtype=torch.long).scatter_(0, inv.flatten(), tree[:, None].expand(b, steps).flatten())
    t_idx = torch.arange(steps)[None].expand(b, steps).flatten()
    u_first = torch.full((u,), steps, dtype=torch.long).scatter_reduce(0, inv.flatten(), t_idx, reduce="amin")  # [U]
    return inv, member, u_depth, u_tree, u_first


def tree_node_rewards(rewards: Tensor, node: Tensor, depth: Tensor, tree: Tensor, *, backup: str = "mean",
                      log_probs: Optional[Tensor] = None, temperature: float = 1.0) -> Tensor:
    """Node rewards of a tree rollout [B, T] (BranchGRPO, Li et al. 2025, arXiv:2509.06040, "tree-based advantage";
    METHODS.md §2.8): the reward of the node owning edge (row, t).

    ``backup="mean"``: a node's reward is the mean of its descendant leaves' rewards (NaN leaves left out).
    ``backup="softmax"`` (the reference's probability-weighted option): bottom-up, a node's reward is
    Σ_c softmax_c(α·log p_c)·R_c over its children c, log p_c the child's split-edge log-probability
    (``log_probs`` [B, T], the rollout's stored values) and α = ``temperature``; children without a finite reward
    are left out (the weights renormalise over the rest). Equal log-probs give the mean of the children, which is
    the mean of the leaves (every child has the same number of leaves).
    """
    if backup not in ("mean", "softmax"):
        raise ValueError(f"backup must be 'mean' or 'softmax', got {backup!r}")
    r = rewards.detach().to(torch.float64).cpu()  # [B]
    node, depth, tree = node.detach().cpu().long(), depth.detach().cpu().long(), tree.detach().cpu().long()
    inv, member, u_depth, _, u_first = _tree_nodes(node, depth, tree)
    ok = torch.isfinite(r)  # [B]
    if backup == "mean":
        cnt = (member & ok[None]).sum(1).to(torch.float64)  # [U]
        tot = (member.to(torch.float64) * torch.where(ok, r, torch.zeros_like(r))[None]).sum(1)  # [U]
        node_r = torch.where(cnt > 0, tot / cnt.clamp_min(1), torch.full_like(tot, float("nan")))  # [U]
        return node_r[inv]  # [B, T]
    if log_probs is None:
        raise ValueError("backup='softmax' needs the rollout's log_probs")
    lp = log_probs.detach().to(torch.float64).cpu()  # [B, T]
    n_u = member.shape[0]
    node_r = torch.full((n_u,), float("nan"), dtype=torch.float64)  # [U]
    leaf_row = member.to(torch.long).argmax(1)  # [U] one leaf row below each node
    split_lp = lp[leaf_row, u_first.clamp_max(lp.shape[1] - 1)]  # [U] log p of each node's split edge
    deepest = int(u_depth.max()) if n_u else 0
    last = inv[:, -1]  # [B] the leaf node of each row
    node_r[last] = torch.where(ok, r, torch.full_like(r, float("nan")))
    for d in range(deepest - 1, -1, -1):  # parents from the deepest internal depth up
        for p in (u_depth == d).nonzero().flatten().tolist():
            kids = ((u_depth == d + 1) & (member[:, member[p]].any(1)) & ~(member & ~member[p]).any(1))
            kids = kids.nonzero().flatten()  # [K] the children of p (nodes one deeper whose leaves lie below p)
            if kids.numel() == 0:
                continue
            kr = node_r[kids]
            fin = torch.isfinite(kr)
            if not bool(fin.any()):
                continue
            w = torch.softmax(float(temperature) * split_lp[kids][fin], 0)  # [K'] over the children with a reward
            node_r[p] = (w * kr[fin]).sum()
    return node_r[inv]  # [B, T]


def tree_node_advantages(rewards: Tensor, node: Tensor, depth: Tensor, tree: Tensor, *, scope: str = "group",
                         eps: float = 1e-4, ddof: int = 0, reduce_sum: Optional[Callable[[Tensor], Tensor]] = None,
                         backup: str = "mean", log_probs: Optional[Tensor] = None,
                         temperature: float = 1.0) -> Tensor:
    """BranchGRPO's tree-based advantage (Li et al. 2025, "BranchGRPO", arXiv:2509.06040; METHODS.md §2.8).

    Paper → ours: the reward of a leaf is ``rewards`` [B] (one row per leaf); the reward of an internal node is
    backed up from its leaves (``tree_node_rewards``: their mean, or the softmax-over-log-prob weighting); the
    advantage of a node is the z-score of node rewards over all nodes of the same depth in the same tree
    (``group_normalize`` over the key (tree, depth)), so a lone node (the root) gets 0. ``node`` [B, T] is the id of
    the node owning edge (row, t), ``depth`` [B, T] its depth, ``tree`` [B] the tree of each row. Returns A [B, T]
    float32, the owning node's advantage on every edge of every row (masking to one row per node is the caller's).
    """
    node, depth, tree = node.detach().cpu().long(), depth.detach().cpu().long(), tree.detach().cpu().long()
    edge_r = tree_node_rewards(rewards, node, depth, tree, backup=backup, log_probs=log_probs,
                               temperature=temperature)  # [B, T]
    inv, _, u_depth, u_tree, _ = _tree_nodes(node, depth, tree)
    node_r = torch.zeros(u_depth.shape[0], dtype=torch.float64).scatter_(0, inv.flatten(), edge_r.flatten())  # [U]
    _, key = torch.unique(torch.stack([u_tree, u_depth], 1), dim=0, return_inverse=True)  # [U] (tree, depth) id
    node_a = group_normalize(node_r, key, scope=scope, eps=eps, ddof=ddof, reduce_sum=reduce_sum)  # [U]
    return node_a[inv]  # [B, T]


def tree_width_mask(adv: Tensor, node: Tensor, depth: Tensor, tree: Tensor, ratio: float) -> Tensor:
    """BranchGRPO width pruning, "best and worst" (the reference's mode 2; METHODS.md §2.8): of the deepest nodes
    (the last split's children) of each tree, keep the ⌈ratio·n/2⌉ with the highest and as many with the lowest
    advantage (``adv`` [B, T], each node's advantage on its edges; ties: lower node id first) and drop the edges of
    the others; shallower nodes are kept. Returns keep [B, T] bool."""
    if not 0 < ratio <= 1:
        raise ValueError(f"width_ratio must be in (0, 1], got {ratio}")
    node, depth, tree = node.detach().cpu().long(), depth.detach().cpu().long(), tree.detach().cpu().long()
    inv, _, u_depth, u_tree, _ = _tree_nodes(node, depth, tree)
    a = adv.detach().cpu().to(torch.float64)
    u_adv = torch.zeros(u_depth.shape[0], dtype=torch.float64).scatter_(0, inv.flatten(), a.flatten())  # [U]
    keep_u = torch.ones(u_depth.shape[0], dtype=torch.bool)  # [U]
    deepest = int(u_depth.max()) if u_depth.numel() else 0
    for t in u_tree.unique().tolist():
        last = ((u_tree == t) & (u_depth == deepest)).nonzero().flatten()  # [n] ids in ascending order
        if deepest == 0 or last.numel() <= 2:
            continue
        k = max(1, math.ceil(ratio * last.numel() / 2))
        order = sorted(last.tolist(), key=lambda i: (-float(u_adv[i]), i))  # best first
        kept = set(order[:k]) | set(order[-k:])
        keep_u[last] = torch.tensor([i in kept for i in last.tolist()])
    return keep_u[inv]  # [B, T]


def tree(inp: CreditInput, *, backup: Literal["mean", "softmax"] = "mean",
         temperature: Annotated[float, Interval(0.0)] = 1.0,
         prune_steps: Sequence[int] = (), width: Literal["all", "extremes"] = "all",
         width_ratio: Annotated[float, Interval(0.0, 1.0, low_open=True)] = 0.5) -> Credit:
    """BranchGRPO credit on a tree rollout (Li et al. 2025, "BranchGRPO", arXiv:2509.06040; METHODS.md §2.8).

    Needs a trajectory from ``flowalign.samplers.plans.tree``: rows are leaves, ``traj.group`` the tree of each
    row, ``extras["node"]`` / ``extras["depth"]`` [B, T] the node owning each edge and its depth. Node rewards
    are the means of their descendant leaves' (weighted) rewards, node advantages the per-(tree, depth) z-scores
    of ``tree_node_advantages``; every edge of a node carries its node's advantage on the node's representative
    row only (``extras["trained"]``: each shared edge is trained once), 0 elsewhere. Several rewards follow
    ``inp.aggregate``: ``reward_sum`` z-scores the node means of Σ_k w_k·R_k, ``advantage_sum`` sums
    w_k·(advantage of R_k).

    Options (the reference's, METHODS.md §2.8): ``backup`` "mean" (default) or "softmax" (node reward = the
    softmax(``temperature``·log p)-weighted children's rewards, ``tree_node_rewards``); ``prune_steps`` (depth
    pruning: edges at these steps are not trained; the reference's tree has one node per step, so its pruned
    "depths" are steps); ``width`` "all" (default) or "extremes" (width pruning: of each tree's last-split nodes
    only the ``width_ratio`` share with the best and worst advantages is trained, ``tree_width_mask``; the
    reference's other width mode ranks a node's own steps, which share one advantage, so it is not offered).
    Pruned edges come back in ``Credit.mask``: the trainer does not re-score them. A leaf without a reward (NaN,
    ``rows_with_reward``) sits out the node rewards and gets 0 on all its edges, shared ones included: a shared edge
    whose training row is that leaf is not trained this iteration.
    """
    if width not in ("all", "extremes"):
        raise ValueError(f"width must be 'all' or 'extremes', got {width!r}")
    if not float(temperature) >= 0:  # α < 0 would favour the less likely children; 0 weighs them equally
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    ex = inp.traj.extras or {}
    if "node" not in ex or "depth" not in ex:
        raise ValueError("credit 'tree' needs a tree rollout (sampler.plan=tree): extras['node'] / ['depth'] missing")
    trained = inp.trained.detach().cpu().to(torch.bool)  # [B, T]
    if "trained" in ex:
        trained = trained & ex["trained"].detach().cpu().to(torch.bool)
    tree_id = inp.traj.group.detach().cpu()  # [B]

    steps = trained.shape[1]
    if isinstance(prune_steps, (str, bytes)) or not isinstance(prune_steps, Sequence):  # "12" would prune 1 and 2
        raise ValueError(f"prune_steps must be a list of steps, got {prune_steps!r}")
    bad = [int(k) for k in prune_steps if not 0 <= int(k) < steps]
    if bad:
        raise ValueError(f"prune_steps {bad} are not steps 0 … {steps - 1}")

    def fn(r: Tensor) -> Tensor:
        return tree_node_advantages(r, ex["node"], ex["depth"], tree_id, backup=backup, temperature=temperature,
                                    log_probs=inp.traj.log_probs, **_norm_kw(inp))

    adv = aggregate_rewards(inp, {k: inp.rewards[k].detach().to(torch.float64).cpu() for k in inp.reward_weights}, fn)
    mask = None
    if len(prune_steps) or width != "all":
        mask = torch.ones_like(trained)  # [B, T]
        mask[:, [int(k) for k in prune_steps]] = False
        if width == "extremes":
            mask &= tree_width_mask(adv, ex["node"], ex["depth"], tree_id, width_ratio)
        trained = trained & mask
    return Credit(advantages=adv * trained.to(adv.dtype), mask=mask)  # [B, T]


# ------------------------------------------------------------------------------------------ VGPO [recon]


def process_q(instant: Tensor, gamma: float = 1.0) -> Tensor:
    """Q_t = r_t + γ·Q_{t+1}, Q_{T−1} = r_{T−1} (VGPO process value, METHODS.md §4.4). [B, T] → [B, T]."""
    q = torch.zeros_like(instant, dtype=torch.float64)
    acc = torch.zeros(instant.shape[0], dtype=torch.float64, device=instant.device)
    for t in range(instant.shape[1] - 1, -1, -1):
        acc = instant[:, t].to(torch.float64) + gamma * acc
        q[:, t] = acc
    return q


def floored_z(x: Tensor, group: Tensor, ok: Tensor, *, floor: float, scope: str = "group", ddof: int = 0,
              reduce_sum: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """VGPO's per-step z-score with a floor (METHODS.md §4.4): z_it = (x_it − mean_{j∈g(i)} x_jt) / std_t where
    std_t ≥ ``floor``, else 0.

    std_t is the std of column t over the row's group (``scope="group"``) or over every row (``"global"``, summed
    over the ranks with ``reduce_sum``, like ``group_normalize``), with ``ddof``; the mean is always the group's
    (``group_moments``). Rows outside ``ok`` [B] are left out of the statistics and get 0; a column whose group
    values are all equal gets 0. ``x`` [B, T] → float64 [B, T].
    """
    if not (math.isfinite(floor) and floor > 0):
        raise ValueError(f"the z-score floor must be a finite number > 0, got {floor!r}")
    ok = ok.detach().to(device=x.device, dtype=torch.bool)  # [B]
    dev, std, flat, _ = group_moments(x, group, ok, scope=scope, ddof=ddof, reduce_sum=reduce_sum)  # [B, T] each
    z = dev / std.clamp_min(floor)
    return torch.where(ok[:, None] & ~flat & (std >= floor), z, torch.zeros_like(z))


def value_anchor(inp: CreditInput, *, probe: str = "x0", gamma: float = 1.0, kappa: float = 0.1,
                 t_anchor: Optional[int] = None, omega: Literal["group", "batch", "none"] = "group",
                 z_floor: Annotated[float, Interval(0.0, low_open=True)] = 1e-6) -> Credit:
    """VGPO value-anchored advantage — a RECONSTRUCTION (METHODS.md §4.4 [recon]; exact paper formulas unconfirmed).

    Instant reward r_it = V_x0(x_{i,t+1}) = R(decode(x̂0(x_{t+1}))) (free with velocity reuse; r_{T−1} = R_i);
    process value Q_it = r_it + γ·Q_{i,t+1}; temporal weight ω_t = mean_{i∈g} Q_it / mean_{i∈g, t′ trained} Q_it′
    (``omega="group"``; "batch" pools all rows; "none" → 1; the ratio assumes a positive mean reward, so ω falls
    back to 1 unless every trained step's mean Q is > 0 — with mixed signs a negative ω_t would flip that step's
    advantages);
    z_it = per-step z-score of Q (``floored_z``): Q minus its group mean, over the std of the group
    (``credit.std_scope=group``) or of all rollouts (``global``), with ``credit.std_ddof``, and 0 where that std is
    below ``z_floor`` (> 0), which stands in for ``credit.std_eps`` (not used here);
    Â_it = ω_t·[z_it + κ·Q_it·1(t < t_anchor)], t_anchor = ⌈T/2⌉ by default. Not invariant to reward shifts by
    design (the κ·Q anchor is absolute). A row whose reward is NaN ("not applicable"; ``rows_with_reward``) is left
    out of its group's statistics and gets Â = 0.
    """
    if omega not in ("group", "batch", "none"):
        raise ValueError(f"omega must be 'group', 'batch' or 'none', got {omega!r}")
    if not (math.isfinite(z_floor) and z_floor > 0):  # a floor of 0 divides a tied group's 0 by 0: NaN credit
        raise ValueError(f"z_floor must be a finite number > 0, got {z_floor!r}")
    trained = inp.trained.detach().cpu().to(torch.bool)  # [B, T]
    b, steps = trained.shape
    cols = trained.any(0)  # [T]
    if not bool(cols.any()):
        return Credit(advantages=torch.zeros(b, steps))
    t_min = int(cols.nonzero()[0])
    mask = torch.zeros(b, steps + 1, dtype=torch.bool)
    mask[:, t_min + 1:] = True
    vals = state_values(inp, probe, mask)
    group = inp.traj.group.detach().cpu()
    ta = math.ceil(steps / 2) if t_anchor is None else int(t_anchor)
    anchor = (torch.arange(steps) < ta).to(torch.float64)  # [T]
    unit = group if omega == "group" else torch.zeros_like(group)

    def fn(v: Tensor) -> Tensor:
        ok = torch.isfinite(v[:, -1].to(torch.float64)).cpu()  # [B] rows with a reward (NaN = "not applicable")
        inst = torch.nan_to_num(v[:, 1:], nan=0.0)  # [B, T] r_t = V(x_{t+1}); unprobed early steps unused
        q = process_q(inst, gamma)  # [B, T]
        z = floored_z(q, group, ok, floor=z_floor, scope=inp.std_scope, ddof=inp.std_ddof,
                      reduce_sum=inp.reduce_sum)  # [B, T]
        w = torch.ones_like(q)
        if omega != "none":
            for u in unit.unique():
                m = (unit == u) & ok
                if not bool(m.any()):
                    continue
                per_t = q[m].mean(0)  # [T]
                den = per_t[cols].mean()
                if bool((per_t[cols] > 0).all()) and math.isfinite(float(den)):  # implies den > 0
                    w[m] = (per_t / den)[None].expand(int(m.sum()), -1)
        return w * (z + kappa * q * anchor[None]) * ok[:, None]  # rows without a reward get 0

    adv = aggregate_rewards(inp, vals, fn)
    return Credit(advantages=adv * trained.to(adv.dtype))


# ------------------------------------------------------------------------------------------ Euphonium


def euphonium(inp: CreditInput, *, heads: Literal["both", "ora", "pra"] = "both",
              pra_index: Literal["post", "pre", "gain"] = "post", pra_probe: Optional[str] = None,
              eps: Annotated[float, Interval(0.0)] = 1e-8,
              c_ora: Annotated[float, Interval(0.0, 1.0, low_open=True)] = 1.0,
              c_pra: Annotated[float, Interval(0.0, 1.0, low_open=True)] = 1.0,
              adv_clip: Optional[Annotated[float, Interval(0.0, low_open=True)]] = None) -> Credit:
    """Euphonium dual-reward heads (METHODS.md §4.5; released sampler/loss code): outcome (ORA) + process (PRA).

    Paper → ours: ORA = the pixel ORM on x_T, group z-scored (std + ``eps``, 1e-8 upstream), the same at every
    trained step → ``advantages``. PRA = the latent PRM R_φ at guided steps, z-scored per step (std + eps), 0 at
    steps without a PRM evaluation → ``heads["process"]``. The PRM scores come from
    ``CreditInput.extras["prm"]`` [B, T+1] and the guided steps from ``extras["prm_steps"]`` [T] bool (both from
    ``flowalign.values.RewardGuidance.credit_extras``; without ``prm_steps`` a step counts as guided when its
    pre- and post-state are both scored), or, with
    ``pra_probe`` (e.g. "x0"), from the value engine with the pixel rewards as a process proxy.
    ``pra_index``: "post" (PRM(x_{t+1}), flowalign default), "pre" (PRM(x_t), upstream quirk Q16), "gain".
    ``heads``: "both" | "ora" | "pra" (then the PRA head is the main ``advantages``).

    Trainer contract (multi_head, METHODS.md §3.4): each head is its own clipped term,
    L = c_ORA·Σ_r w_r·ℓ_clip(ρ, clip(A^ORA_r, ±A_max)) + c_PRA·ℓ_clip(ρ, clip(A^PRA, ±A_max)); with several rewards
    (``advantage_sum``) the first reward's term is ``advantages`` and each further one a head ``"outcome/<name>"``
    (with ``reward_sum`` one ORA term on the summed reward). The coefficients are
    folded here as c·clip(A, ±adv_clip) (exact since c > 0 and ℓ_clip is positively homogeneous in A); the
    trainer's own ±A_max clip is then a no-op, which is why 0 < c ≤ 1 is required. ``adv_clip`` None = the
    loss's A_max (``CreditInput.adv_clip``, i.e. ``credit.adv_clip``); another value would make the trainer's
    second clip cut c·A at A_max instead of A.

    A rollout without a reward (``rows_with_reward``: NaN, "not applicable") gets 0 in every head: each outcome term
    leaves it out of that reward's statistics, and the process head leaves it out of its per-step statistics.
    ``preflight`` refuses, before a run, the settings that would fail here (the PRA head without PRM scores or
    ``pra_probe``, c_ora·w outside (0, 1] with several rewards).
    """
    adv_clip = inp.adv_clip if adv_clip is None else adv_clip
    if heads not in ("both", "ora", "pra"):
        raise ValueError(f"heads must be 'both', 'ora' or 'pra', got {heads!r}")
    if pra_index not in ("post", "pre", "gain"):
        raise ValueError(f"pra_index must be 'post', 'pre' or 'gain', got {pra_index!r}")
    for c in (c_ora, c_pra):
        if not 0 < c <= 1:
            raise ValueError(f"Euphonium head coefficients must be in (0, 1] (got {c}); scale the lr instead")
    if not adv_clip > 0:
        raise ValueError(f"adv_clip must be > 0, got {adv_clip!r}")
    trained = inp.trained.detach().cpu().to(torch.bool)  # [B, T]
    b, steps = trained.shape
    group = inp.traj.group.detach().cpu()
    tf = trained.to(torch.float32)
    ora, ora_more = None, {}
    if heads in ("both", "ora"):
        norm = dict(scope=inp.std_scope, eps=eps, ddof=inp.std_ddof, reduce_sum=inp.reduce_sum)
        if inp.aggregate == "reward_sum":
            tot = sum(float(w) * inp.rewards[k].to(torch.float64) for k, w in inp.reward_weights.items())
            a_row = group_normalize(tot, group, **norm)
            ora = c_ora * a_row.detach().cpu().clamp(-adv_clip, adv_clip)[:, None] * tf  # [B, T]
        elif len(inp.reward_weights) == 1:
            (k, w), = inp.reward_weights.items()
            a_row = float(w) * group_normalize(inp.rewards[k], group, **norm)
            ora = c_ora * a_row.detach().cpu().clamp(-adv_clip, adv_clip)[:, None] * tf  # [B, T]
        else:  # several rewards: c_ORA·Σ_r w_r·ℓ_clip(ρ, clip(A_r, ±A_max)), one clipped term per reward (§4.5)
            for i, (k, w) in enumerate(inp.reward_weights.items()):
                cw = c_ora * float(w)  # folded like c: ℓ_clip is positively homogeneous in A
                if not 0 < cw <= 1:
                    raise ValueError(f"euphonium with several rewards folds c_ora x weight into each reward's clipped "
                                     f"term, which must be in (0, 1]; got {cw:g} for {k!r}: scale the reward weights")
                a_r = cw * group_normalize(inp.rewards[k], group, **norm).detach().cpu().clamp(-adv_clip, adv_clip)
                if i == 0:
                    ora = a_r[:, None] * tf  # [B, T]
                else:
                    ora_more[f"outcome/{k}"] = a_r[:, None] * tf  # [B, T]
    pra = None
    if heads in ("both", "pra"):
        if pra_probe is None:
            prm = (inp.extras or {}).get("prm")
            if prm is None:
                raise ValueError("euphonium PRA head needs CreditInput.extras['prm'] [B, T+1] (RewardGuidance."
                                 "prm_values) or the option pra_probe='x0'")
            pv = prm.detach().to(torch.float64).cpu()  # [B, T+1]
            guided = (inp.extras or {}).get("prm_steps")
            if guided is None:  # a guided step has its pre- and post-state scored
                fin = torch.isfinite(pv).all(0)  # [T+1]
                guided = fin[:-1] & fin[1:]
            guided = torch.as_tensor(guided).detach().cpu().to(torch.bool)  # [T]
        else:
            mask = torch.zeros(b, steps + 1, dtype=torch.bool)  # probe only the states the index reads (§5.3.5)
            if pra_index in ("post", "gain"):
                mask[:, 1:] |= trained
            if pra_index in ("pre", "gain"):
                mask[:, :-1] |= trained
            vals = state_values(inp, pra_probe, mask)
            pv = sum(float(w) * vals[k] for k, w in inp.reward_weights.items())
            guided = trained.any(0)
        score = {"post": pv[:, 1:], "pre": pv[:, :-1], "gain": pv[:, 1:] - pv[:, :-1]}[pra_index]  # [B, T]
        has = rows_with_reward(inp.rewards, inp.reward_weights, inp.aggregate)  # [B] NaN-reward rows sit out
        valid = trained & guided[None] & torch.isfinite(score) & has[:, None]
        pra = c_pra * step_normalize(score, group, valid, scope=inp.std_scope, eps=eps, ddof=inp.std_ddof,
                                     reduce_sum=inp.reduce_sum).clamp(-adv_clip, adv_clip) * tf
    if heads == "ora":
        return Credit(advantages=ora, heads=ora_more or None)
    if heads == "pra":
        return Credit(advantages=pra)
    return Credit(advantages=ora, heads={**ora_more, "process": pra})


CREDIT = {
    "outcome": outcome,
    "win_rate": win_rate,
    "dense_gain": dense_gain,
    "stepwise_gain": stepwise_gain,
    "turning_points": turning_points,
    "branch": branch,
    "granular": granular,
    "tree": tree,
    "value_anchor": value_anchor,
    "euphonium": euphonium,
}


def preflight(name: str, options: Mapping[str, Any], *, reward_weights: Mapping[str, float], aggregate: str,
              guided: bool) -> Optional[str]:
    """Why credit ``name`` with ``options`` would fail in the middle of a run under these settings, as one line
    naming the config keys to change; None when nothing is wrong.

    Meant for the trainer's config check (``train._check_components``), before anything is written, with
    ``reward.weights``, ``reward.aggregate`` and ``guided`` = ``sampler.guide`` is not "none". It checks what an option's annotation cannot see alone (each value's own
    type and range are ``flowalign.types.option_value_error``'s): Euphonium's process (PRA) head needs PRM scores,
    from a guide or from ``pra_probe``, unless ``heads: ora``; with several rewards under ``advantage_sum`` its
    outcome head folds c_ora·w_k into one clipped term per reward, which must lie in (0, 1] for every reward.
    Options it cannot read as numbers are left to the annotation check.
    """
    import inspect

    if name not in CREDIT:
        return f"credit.name: unknown credit method {name!r}; known: {', '.join(CREDIT)}"
    if aggregate not in ("reward_sum", "advantage_sum"):
        return f"reward.aggregate={aggregate!r}: choose 'reward_sum' or 'advantage_sum'"
    defaults = {k: p.default for k, p in inspect.signature(CREDIT[name]).parameters.items()
                if p.default is not inspect.Parameter.empty}
    opts = {**defaults, **dict(options or {})}
    if name == "euphonium":
        heads = opts.get("heads")
        if heads in ("both", "pra") and opts.get("pra_probe") is None and not guided:
            return (f"credit.name=euphonium with heads={heads!r} needs process-reward scores for its PRA head: set "
                    "sampler.guide=reward_grad, or credit.options.pra_probe=x0, or credit.options.heads=ora")
        c = opts.get("c_ora")
        numeric = isinstance(c, (int, float)) and not isinstance(c, bool)
        if heads in ("both", "ora") and aggregate == "advantage_sum" and len(reward_weights) > 1 and numeric:
            bad = [f"{k}: {float(c) * float(w):g}" for k, w in reward_weights.items()
                   if not 0 < float(c) * float(w) <= 1]
            if bad:
                return (f"credit.name=euphonium with several rewards (reward.aggregate=advantage_sum) folds "
                        f"credit.options.c_ora={c:g} x reward.weights into one clipped term per reward, which must be "
                        f"in (0, 1]; got {', '.join(bad)}: scale reward.weights (or c_ora) down, or use "
                        "reward.aggregate=reward_sum")
    return None


def clipped_heads(credit: Credit, trained: Tensor, adv_clip: float) -> dict[str, Tensor]:
    """The advantages the loss uses, per head: clip to ±A_max, then the positive per-step weights, 0 off ``trained``.

    Returns ``{"main": [B, T], **credit.heads}``; each head is its own clipped term of the loss (METHODS.md §3.4, §3.6).
    """
    out = {}
    for h, a in {"main": credit.advantages, **dict(credit.heads or {})}.items():
        a = a.clamp(-adv_clip, adv_clip)  # [B, T]
        if credit.weights is not None:
            a = a * credit.weights  # max(w·x, w·y) = w·max(x, y) for w > 0: weights after the clip
        out[h] = torch.where(trained, a, torch.zeros_like(a))
    return out


def assign_credit(name: str, inp: CreditInput, options: Optional[Mapping[str, Any]] = None) -> Credit:
    """Run the credit assigner registered under ``name`` with ``options`` as keyword arguments."""
    if name not in CREDIT:
        import difflib

        close = difflib.get_close_matches(name, list(CREDIT), n=1)
        raise ValueError(f"unknown credit method {name!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                                              f" (known: {', '.join(CREDIT)})"))
    out = CREDIT[name](inp, **dict(options or {}))
    if not math.isfinite(float(out.advantages.abs().sum())):
        logger.warning("credit %s produced non-finite advantages", name)
    return out
