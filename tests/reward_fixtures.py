"""Rewards used by trainer tests (registered at test time with monkeypatch)."""

import torch


class NaNEverySecondCall:
    """The shapes partial reward, but NaN for the whole batch on odd calls (1st, 3rd, ...)."""

    name = "nan_test"
    differentiable = False

    def __init__(self):
        from flowalign.rewards.shapes import ShapesPartial

        self.inner = ShapesPartial()
        self.calls = 0

    def __call__(self, images, prompts, metadata=None):
        self.calls += 1
        out = self.inner(images, prompts, metadata)
        if self.calls % 2 == 1:
            out = torch.full_like(out, float("nan"))
        return out
