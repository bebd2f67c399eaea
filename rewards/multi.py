"""Weighted multi-reward (METHODS.md §3.4, REWARDS_AND_EVAL.md §1).

``Combined`` scores every component once and keeps the per-component scores for logging and for the trainer's
``advantage_sum`` (A = Σ_k w_k·normalise(R_k), computed by the trainer from ``components``). Its ``__call__`` is the
``reward_sum`` aggregate R = Σ_k w_k·R_k on raw scales (Flow-GRPO). Return types never depend on a flag:

    comps = combined.components(images, prompts)   # dict[str, Tensor[B]], in construction order
    total = combined.aggregate(comps)               # Tensor[B] = Σ w_k · comps[k]
    total = combined(images, prompts)               # the same, in one call

NaN (not applicable) in any component makes the aggregate NaN for that sample: the trainer masks such samples.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from torch import Tensor

from flowalign.errors import UserError
from flowalign.rewards.base import Reward

Spec = Union[Mapping[str, Any], Sequence[tuple[Any, float]]]


class Combined(Reward):
    """Weighted sum of rewards.

    Args:
        rewards: either ``{name: weight}`` (each built with ``build_reward(name, **kwargs.get(name, {}))``),
            ``{key: (reward, weight)}``, or a list of ``(reward, weight)`` pairs (keys from ``reward.name``,
            de-duplicated as ``name_2``, …).
        kwargs: per-name constructor arguments for the ``{name: weight}`` form (paths, device, ...).
    """

    name = "combined"
    measures = "weighted sum Σ w_k·R_k of its components (reward_sum); components kept for logging/advantage_sum"

    def __init__(self, rewards: Spec, kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None):
        from flowalign.rewards import build_reward

        kwargs = dict(kwargs or {})
        items: list[tuple[str, Any, float]] = []
        if isinstance(rewards, Mapping):
            for key, val in rewards.items():
                if isinstance(val, (tuple, list)) and len(val) == 2 and callable(val[0]):
                    items.append((str(key), val[0], float(val[1])))
                else:
                    items.append((str(key), build_reward(str(key), **dict(kwargs.pop(key, {}))), float(val)))
            if kwargs:
                raise UserError(f"combined: kwargs given for rewards that are not combined: {sorted(kwargs)}")
        else:
            seen: dict[str, int] = {}
            for pair in rewards:
                if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                    raise UserError("combined: pass {name: weight} or a list of (reward, weight) pairs")
                reward, weight = pair
                base = str(getattr(reward, "name", type(reward).__name__))
                seen[base] = seen.get(base, 0) + 1
                items.append((base if seen[base] == 1 else f"{base}_{seen[base]}", reward, float(weight)))
        if not items:
            raise UserError("combined: no rewards given")
        self.rewards = {k: r for k, r, _ in items}
        self.weights = {k: w for k, _, w in items}
        kinds = {getattr(r, "kind", "image") for r in self.rewards.values()}
        if len(kinds) > 1:
            raise UserError(f"combined: cannot mix image and video rewards ({sorted(kinds)}); wrap image rewards in PerFrame")
        self.kind = kinds.pop()
        self.differentiable = all(bool(getattr(r, "differentiable", False)) for r in self.rewards.values())
        self.name = "+".join(f"{w:g}*{k}" for k, w in self.weights.items())

    def validate_prompts(self, prompts: Sequence[str]) -> None:
        """Every component's prompt check (rewards that parse their prompts have one), before anything is sampled."""
        for r in self.rewards.values():
            check = getattr(r, "validate_prompts", None)
            if check is not None:
                check(prompts)

    def components(self, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> dict[str, Tensor]:
        """Each component's raw score, float32 [B] on the caller's device, keyed like ``weights``."""
        return {k: r(images, prompts, metadata).float().to(images.device) for k, r in self.rewards.items()}

    def aggregate(self, components: Mapping[str, Tensor]) -> Tensor:
        """Σ_k w_k · components[k] (METHODS.md §3.4 ``reward_sum``), float32 [B]."""
        missing = set(self.weights) - set(components)
        if missing:
            raise KeyError(f"combined: components missing {sorted(missing)}")
        total = None
        for k, w in self.weights.items():
            term = w * components[k].float()  # [B]
            total = term if total is None else total + term
        return total

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> Tensor:
        return self.aggregate(self.components(images, prompts, metadata))

    def __repr__(self) -> str:
        return f"Combined({self.weights})"

