"""The process-reward core (DESIGN.md §4): value probes of intermediate states, and the NFE counter.

Cost is a first-class output: ``NFECounter`` wraps a model's velocity so every run reports model
forwards for sampling, probing and training separately (1 NFE = one forward of one sample, the CFG pair
counted once, as in METHODS.md §5.2).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator

from torch import Tensor

from flowalign.types import Cond


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
