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
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from flowalign.types import Credit, Trajectory

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
    values: Optional[Mapping[str, Tensor]] = None  # name -> [B, T+1] per-state value estimates, if probed
    extras: Mapping[str, Any] = field(default_factory=dict)


def group_normalize(rewards: Tensor, group: Tensor, *, scope: str = "group", eps: float = 1e-4,
                    ddof: int = 0) -> Tensor:
    """A_i = (R_i − mean_group R) / (std + eps) in float64 (Flow-GRPO Eq. 4; METHODS.md §3.2).

    ``scope="global"`` uses the std of all rewards (Flow-GRPO's ``global_std``). NaN rewards are left out of
    the statistics and get A = 0. A group whose rewards are all equal gets A = 0 (never NaN); a group of one
    gets 0. Returns float32 [B].
    """
    r = rewards.detach().to(torch.float64)  # [B]
    ok = torch.isfinite(r)
    r0 = torch.where(ok, r, torch.zeros_like(r))
    _, inv = torch.unique(group, return_inverse=True)  # [B] dense group ids
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    cnt = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, ok.double())  # [G]
    tot = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, r0)
    mean = tot / cnt.clamp_min(1)  # [G]
    dev = torch.where(ok, r - mean[inv], torch.zeros_like(r))  # [B]
    if scope == "group":
        ss = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, dev * dev)
        std = torch.sqrt(ss / (cnt - ddof).clamp_min(1))[inv]  # [B]
    elif scope == "global":
        n = ok.sum().clamp_min(1)
        gm = r0.sum() / n
        gdev = torch.where(ok, r - gm, torch.zeros_like(r))
        std = torch.sqrt((gdev * gdev).sum() / (n - ddof).clamp_min(1)).expand_as(r)
    else:
        raise ValueError(f"std scope must be 'group' or 'global', got {scope!r}")
    adv = dev / (std + eps)
    single = cnt[inv] < 2
    flat = torch.isclose(std, torch.zeros_like(std), atol=1e-12) if scope == "group" else torch.zeros_like(single)
    adv = torch.where(ok & ~single & ~flat, adv, torch.zeros_like(adv))
    return adv.to(torch.float32)


def zero_std_ratio(rewards: Tensor, group: Tensor) -> float:
    """Fraction of groups whose (finite) rewards are all equal (logged, METHODS.md §3.2)."""
    zs = []
    for g in torch.unique(group):
        r = rewards[group == g]
        r = r[torch.isfinite(r)]
        zs.append(bool(r.numel() < 2 or (r.max() - r.min()).abs() < 1e-12))
    return float(sum(zs) / max(1, len(zs)))


def terminal_advantage(inp: CreditInput) -> Tensor:
    """Per-rollout advantage [B] from the weighted terminal rewards, as ``inp.aggregate`` says (METHODS.md §3.4).

    ``reward_sum``: normalise Σ_k w_k·R_k. ``advantage_sum``: Σ_k w_k·normalise(R_k) (scale-free).
    """
    group = inp.traj.group
    norm = dict(scope=inp.std_scope, eps=inp.std_eps, ddof=inp.std_ddof)
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
    return Credit(advantages=adv[:, None] * inp.trained.to(adv.dtype))  # [B, T]


CREDIT = {
    "outcome": outcome,
}


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
