"""The Gaussian world (DESIGN.md §7, METHODS.md §2.9): data ~ N(m + c, s_d²) per dimension, whose flow-matching
velocity is known exactly. Tests of samplers, probes, credit, guidance and steering share this one velocity."""

from __future__ import annotations

import torch

M, SD = 2.0, 0.5  # the data mean m and std s_d


def gaussian_world_velocity(x, sigma, cond=None):
    """Exact velocity for data ~ N(m + c, s_d²), c = ``cond["c"]`` per prompt row ([B, D], 0 without it);
    elementwise, so batch-invariant, and differentiable in x. Computed in float64, returned in float32."""
    s = sigma.to(torch.float64).view(-1, *([1] * (x.dim() - 1)))
    c = cond.get("c") if isinstance(cond, dict) else None
    m = M + (c.to(torch.float64) if c is not None else 0.0)
    x = x.to(torch.float64)
    num = s - (1 - s) * SD**2
    den = (1 - s) ** 2 * SD**2 + s**2
    return (num / den * (x - (1 - s) * m) - m).to(torch.float32)


class Counting:
    """Wraps a velocity function and counts its per-sample evaluations (``nfe``) and launches (``calls``)."""

    def __init__(self, fn):
        self.fn, self.nfe, self.calls = fn, 0, 0

    def __call__(self, x, sigma, cond):
        self.nfe += x.shape[0]
        self.calls += 1
        return self.fn(x, sigma, cond)
