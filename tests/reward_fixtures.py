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


class InfEverySecondCall(NaNEverySecondCall):
    """The shapes partial reward, but +inf for the whole batch on odd calls: a broken reward, not "not applicable"."""

    name = "inf_test"

    def __call__(self, images, prompts, metadata=None):
        out = super().__call__(images, prompts, metadata)
        return torch.where(out.isnan(), torch.full_like(out, float("inf")), out)


class NaNForFirstSample:
    """The shapes partial reward, NaN ("not applicable") for the first sample of every call."""

    name = "nan_first"
    differentiable = False

    def __init__(self):
        from flowalign.rewards.shapes import ShapesPartial

        self.inner = ShapesPartial()

    def __call__(self, images, prompts, metadata=None):
        out = self.inner(images, prompts, metadata).clone()
        out[0] = float("nan")
        return out
