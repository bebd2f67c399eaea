"""Model adapters implementing ``FlowModel``; one file per family (DESIGN.md §2, §6.4).

``MODELS`` maps a family name to ``"module:Class"``; the class offers ``from_pretrained(path, **kwargs)``.
A new model is one file and one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from flowalign.errors import UserError

MODELS: dict[str, str] = {
    "shapes": "flowalign.models.shapes:ShapesModel",
    "shapes_video": "flowalign.models.shapes_video:ShapesVideoModel",
    "sd3": "flowalign.models.sd3:SD3Model",
    "flux": "flowalign.models.flux:FluxModel",
    "wan": "flowalign.models.wan:WanModel",
}


def resolve(name: str) -> Any:
    if name not in MODELS:
        import difflib

        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(MODELS)})"
        raise UserError(f"unknown model family {name!r}{hint}")
    module, attr = MODELS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def load_model(name: str, path: str = "", **kwargs: Any):
    """Load the adapter of family ``name`` from a local directory or hub id (``path``; '' = the family default)."""
    return resolve(name).from_pretrained(path, **kwargs)
