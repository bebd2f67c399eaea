"""Reward models behind one interface (DESIGN.md §3, REWARDS_AND_EVAL.md §1).

``REWARDS`` maps a reward name to ``"module:factory"``; modules are imported only when a reward is built,
so ``import flowalign.rewards`` stays light. ``build_reward(name, **kwargs)`` returns a ``RewardModel``.
"""

from __future__ import annotations

import importlib
from typing import Any

from flowalign.errors import UserError

REWARDS: dict[str, str] = {
    # the shapes world (verifiable, exact)
    "shapes_strict": "flowalign.rewards.shapes:ShapesStrict",
    "shapes_strict_intact": "flowalign.rewards.shapes:ShapesStrictIntact",
    "shapes_partial": "flowalign.rewards.shapes:ShapesPartial",
    "shapes_soft": "flowalign.rewards.shapes:ShapesSoft",
    "shapes_motion_strict": "flowalign.rewards.shapes:ShapesMotionStrict",
    "shapes_motion_partial": "flowalign.rewards.shapes:ShapesMotionPartial",
    # model-free quality rewards
    "jpeg_compressibility": "flowalign.rewards.quality:JpegCompressibility",
    "jpeg_incompressibility": "flowalign.rewards.quality:JpegIncompressibility",
    "edge_crispness": "flowalign.rewards.quality:EdgeCrispness",
    "saturation": "flowalign.rewards.quality:Saturation",
    # learned rewards (weights injected by path)
    "pickscore": "flowalign.rewards.pickscore:PickScore",
    "hps": "flowalign.rewards.hps:HPSv2",
    "hpsv21": "flowalign.rewards.hps:HPSv21",
    "imagereward": "flowalign.rewards.imagereward:ImageReward",
    "aesthetic": "flowalign.rewards.aesthetic:Aesthetic",
    "clipscore": "flowalign.rewards.clipscore:CLIPScore",
    # over the network
    "remote": "flowalign.rewards.remote:RemoteReward",
}


def resolve(name: str) -> Any:
    """The factory (class or function) registered under ``name``."""
    if name not in REWARDS:
        import difflib

        close = difflib.get_close_matches(name, list(REWARDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(REWARDS))})"
        raise UserError(f"unknown reward {name!r}{hint}")
    module, attr = REWARDS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def build_reward(name: str, **kwargs: Any):
    """Build the reward registered under ``name`` with keyword arguments (paths, device, ...)."""
    return resolve(name)(**kwargs)
