"""Core types shared by every part of flowalign (DESIGN.md §3).

Index convention everywhere: step ``t`` maps ``x_t`` (at ``sigmas[t]``) to ``x_{t+1}`` (at
``sigmas[t+1]``); ``sigmas[0] = 1`` is noise, ``sigmas[T] = 0`` is data, ``dt < 0``.

This module imports nothing from the package (an import-direction test checks it).
"""

from __future__ import annotations

import collections.abc
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

from torch import Tensor, nn

Cond = dict[str, Tensor]
"""Batch-first conditioning tensors; keys are private to the adapter that made them."""


@runtime_checkable
class FlowModel(Protocol):
    """A flow-matching generator as a velocity field v(x, σ | prompt).

    Path: x_σ = (1-σ)·x_data + σ·ε; velocity v = ε − x_data.
    """

    transformer: nn.Module  # the module that LoRA wraps
    lora_targets: tuple[str, ...]

    def encode(self, prompts: Sequence[str]) -> Cond:  # includes the unconditional branch if CFG
        ...

    def schedule(self, steps: int) -> Tensor:  # [T+1], 1 → 0, model-specific shift applied here
        ...

    def init_noise(self, n: int, generator: Any = None) -> Tensor:  # [n, *latent]
        ...

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:  # CFG inside; σ → timestep inside
        ...

    def decode(self, x: Tensor) -> Tensor:  # [B,3,H,W] or [B,F,3,H,W] in [0,1]
        ...


class Transition(NamedTuple):
    """One reverse step as a Gaussian N(mean, std²·I)."""

    mean: Tensor  # [B, *latent]
    std: Tensor  # broadcastable to mean; 0 ⇒ deterministic (not trainable)


StepKernel = Callable[..., Transition]
"""(x, v, sigma, sigma_next, eta, *, sigma_1=...) -> Transition. Pure; Euler exactly at eta = 0."""

VelocityFn = Callable[[Tensor, Tensor, Cond], Tensor]
"""(x [B,*latent], sigma [B], cond (batch-aligned)) -> v [B,*latent]."""


@dataclass(frozen=True)
class Trajectory:
    """A batch of chains. The shapes in comments are part of the contract."""

    latents: Tensor  # [B, T+1, *latent]   fp32
    sigmas: Tensor  # [T+1]
    eta: Tensor  # [T]   noise scale per step; 0 ⇒ ODE step
    log_probs: Tensor  # [B, T] log p_old(x_{t+1} | x_t), reduced; 0 where eta == 0
    cond: Cond  # per prompt, indexed by cond_index
    cond_index: Tensor  # [B]
    group: Tensor  # [B]   rollouts compared with each other
    prompts: tuple[str, ...]  # per prompt (len = number of cond rows)
    velocities: Optional[Tensor] = None  # [B, T, *latent] cached v_t (for probes), if kept
    means: Optional[Tensor] = None  # [B, T, *latent] kernel means μ_old (GRPO-Guard), if kept
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])

    @property
    def final(self) -> Tensor:  # [B, *latent]
        return self.latents[:, -1]


@runtime_checkable
class RewardModel(Protocol):
    """Scores images [B,3,H,W] (or videos [B,F,3,H,W]) in [0,1] → float32 [B] (NaN = not applicable)."""

    name: str
    differentiable: bool

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> Tensor:
        ...


class Credit(NamedTuple):
    """What a credit assigner returns, per transition of a trajectory batch."""

    advantages: Tensor  # [B, T] (0 where a step is not trained)
    weights: Optional[Tensor] = None  # [B, T] positive per-step weights, or None
    heads: Optional[Mapping[str, Tensor]] = None  # extra advantage heads (e.g. a process head), [B, T] each
    mask: Optional[Tensor] = None  # [B, T] bool, the trained edges the credit keeps (pruning), or None = all


CreditAssigner = Callable[..., Credit]
"""(trajectory group data, terminal rewards, values if needed) -> Credit."""


@dataclass(frozen=True)
class Interval:
    """Range metadata of a registry function's numeric option, ``Annotated[float, Interval(0, 1, low_open=True)]``:
    the trainer checks a config's value against it before a run starts (``option_value_error``), and the
    function keeps its own check for direct calls."""

    low: float = float("-inf")
    high: float = float("inf")
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        lo = "-inf" if self.low == float("-inf") else f"{self.low:g}"
        hi = "inf" if self.high == float("inf") else f"{self.high:g}"
        return f"{'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


@dataclass(frozen=True)
class NonEmpty:
    """Metadata of a list option that needs at least one element, ``Annotated[Sequence[int], Interval(1),
    NonEmpty("[1, 2, 3]")]`` (``Interval`` checks each element, so it passes ``[]``): ``option_value_error`` refuses
    an empty list before a run starts, naming ``example``; the function keeps its own check for direct calls."""

    example: str = ""


def option_value_error(hint: Any, value: Any) -> Optional[str]:
    """Why ``value`` does not fit the annotation ``hint`` of a registry function's option, or None. Checks what a
    config can get wrong before a run starts: a Literal's choices, bool / int / float / str, a list of ints, and
    Optional; other annotations are left to the function."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is None or hint is Any:
        return None
    if origin is typing.Annotated:  # Annotated[float, Interval(...)]: the type, then the range
        err = option_value_error(args[0], value)
        if err is None:
            items = value if isinstance(value, (list, tuple)) else [value]  # a list option: every element
            for meta in args[1:]:
                if isinstance(meta, NonEmpty) and isinstance(value, (list, tuple)) and not value:
                    return "expected a non-empty list" + (f", e.g. {meta.example}" if meta.example else "")
                if isinstance(meta, Interval) and not all(meta.contains(v) for v in items):
                    return f"expected {'values' if items is value else 'a value'} in {meta}"
        return err
    if origin is typing.Union:  # Optional[X] and unions: fits if it fits one member
        errs = [option_value_error(a, value) for a in args]
        return None if any(e is None for e in errs) else next(e for e in errs if e)
    if hint is type(None):
        return None if value is None else "expected null"
    if origin is typing.Literal:
        return None if value in args else f"choose one of {', '.join(repr(a) for a in args)}"
    if hint is bool:
        return None if isinstance(value, bool) else "expected true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "expected a finite number"
    if hint is str:
        return None if isinstance(value, str) else "expected a string"
    if hint is Tensor:  # a config value is never a tensor: a union with a number checks the number
        return None if isinstance(value, Tensor) else "expected a tensor"
    if origin in (collections.abc.Sequence, list, tuple) and args and args[0] is int:
        ok = isinstance(value, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
        return None if ok else "expected a list of integers, e.g. [1, 4]"
    return None
