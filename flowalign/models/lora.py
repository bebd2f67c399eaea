"""Generic LoRA utilities over any ``nn.Module`` (peft backend), shared by every model adapter.

* ``add_lora`` injects peft LoRA layers in place. With ``init="gaussian"`` (METHODS.md §3.7) B = 0,
  so the adapter is an exact no-op at init. Base weights are frozen; LoRA weights are kept in fp32
  (fp32 master weights; peft casts the activations to the LoRA dtype and the result back).
* ``lora_disabled`` is the reference policy: the same module with the adapter switched off (no copy).
* ``save_lora`` writes ``pytorch_lora_weights.safetensors`` in the diffusers/peft convention
  (keys ``transformer.<module path>.lora_A.weight``; the peft ``LoraConfig`` as JSON in the
  safetensors metadata under ``lora_adapter_metadata``, keys prefixed ``transformer.``), which
  ``pipe.load_lora_weights(dir)`` reads with the right rank and alpha.
* ``load_lora`` reads it back bitwise; it injects the adapter from the stored config when the module
  has none yet. A file without that config (diffusers' ``save_lora_weights`` writes none unless given
  ``transformer_lora_adapter_metadata``) is loaded as diffusers' ``load_lora_weights`` loads it (``infer_config``):
  the modules its tensors name, their rank, and alpha = rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer"  # diffusers' component prefix for the denoiser


def _tuner_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(module: nn.Module, adapter_name: str = "default") -> bool:
    return adapter_name in (getattr(module, "peft_config", None) or {})


def add_lora(
    module: nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: int,
    *,
    init: str | bool = "gaussian",
    adapter_name: str = "default",
) -> list[nn.Parameter]:
    """Inject LoRA (rank ``rank``, scale ``alpha / rank``) into ``module`` in place; returns the LoRA parameters.

    ``targets`` are peft ``target_modules`` names, matched as module-path suffixes (e.g. ``attn.to_q``).
    Everything but the LoRA weights is frozen.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if has_lora(module, adapter_name):
        raise ValueError(f"module already has a LoRA adapter named {adapter_name!r}")
    # peft checks only r > 0: a fractional rank would be truncated, alpha <= 0 gives a no-op (scale 0, zero
    # gradient) or sign-flipped adapter, and a non-finite alpha makes every output NaN even at init (0 * nan)
    if isinstance(rank, bool) or not float(rank).is_integer() or int(rank) < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not math.isfinite(float(alpha)) or float(alpha) <= 0:
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    names = [n for n, _ in module.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:  # peft only fails when *no* target matches; a typo in one of several would pass silently
        raise ValueError(f"no module of {type(module).__name__} matches the LoRA target(s) {missing}")
    alpha = int(alpha) if float(alpha).is_integer() else float(alpha)  # peft scales by alpha / r; keep 0.5 as 0.5
    config = LoraConfig(r=int(rank), lora_alpha=alpha, init_lora_weights=init, target_modules=list(targets))
    try:
        if hasattr(module, "_hf_peft_config_loaded") and callable(getattr(module, "add_adapter", None)):
            module.add_adapter(config, adapter_name=adapter_name)  # diffusers ModelMixin: keeps its adapter bookkeeping
        else:
            inject_adapter_in_model(config, module, adapter_name=adapter_name)
    except ValueError as e:
        if "not found" not in str(e):
            raise
        raise ValueError(f"no module of {type(module).__name__} matches the LoRA targets {list(targets)}") from e
    for name, p in module.named_parameters():
        is_lora = ".lora_" in name and f".{adapter_name}." in name
        p.requires_grad_(is_lora)
        if is_lora and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 master weights (METHODS.md §3.7)
    params = lora_parameters(module, adapter_name)
    logger.info("LoRA r=%d alpha=%d on %d tensors (%d parameters)", rank, alpha, len(params),
                sum(p.numel() for p in params))
    return params


def lora_parameters(module: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
    """The LoRA tensors of ``adapter_name`` in ``module``, in ``named_parameters`` order."""
    return [p for n, p in module.named_parameters() if ".lora_" in n and n.endswith(f".{adapter_name}.weight")]


def lora_state_dict(module: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """peft-convention state dict (adapter name stripped: ``<path>.lora_A.weight``), detached, on CPU."""
    from peft import get_peft_model_state_dict

    if not has_lora(module, adapter_name):
        raise ValueError(f"module has no LoRA adapter named {adapter_name!r}")
    sd = get_peft_model_state_dict(module, adapter_name=adapter_name)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


@contextlib.contextmanager
def lora_disabled(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` as its base model (every adapter off), restoring adapters and ``requires_grad`` after.

    This is the reference policy of the KL term: exact, and no second copy of the weights.
    """
    layers = _tuner_layers(module)
    was_disabled = [bool(m.disable_adapters) for m in layers]
    grads = [(p, p.requires_grad) for n, p in module.named_parameters() if ".lora_" in n]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield module
    finally:
        for m, off in zip(layers, was_disabled):
            m.enable_adapters(not off)
        for p, g in grads:  # peft's enable_adapters(True) sets requires_grad=True on every active adapter
            p.requires_grad_(g)


def _config_dict(module: nn.Module, adapter_name: str) -> dict:
    cfg = module.peft_config[adapter_name].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}


def save_lora(module: nn.Module, directory, *, adapter_name: str = "default", prefix: str = PREFIX) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` atomically, as diffusers' ``load_lora_weights`` reads it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"{prefix}.{k}": v for k, v in lora_state_dict(module, adapter_name).items()}
    meta = {f"{prefix}.{k}": v for k, v in _config_dict(module, adapter_name).items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True, default=str)}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, directory / WEIGHT_NAME)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return directory / WEIGHT_NAME


def read_lora(directory, *, prefix: str = PREFIX) -> tuple[dict[str, Tensor], dict | None]:
    """(peft state dict with ``prefix.`` stripped, LoraConfig kwargs or None) from a ``save_lora`` directory or file."""
    from safetensors import safe_open

    path = Path(directory)
    path = path / WEIGHT_NAME if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"no LoRA file at {path}")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
        sd = {k[len(prefix) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}
        others = sorted({k.split(".", 1)[0] for k in f.keys() if not k.startswith(prefix + ".")})
    if others and not sd and any(k in o for o in others for k in ("lora_down", "lora_up", "lora_unet", "lora_te")):
        raise ValueError(f"{path} is a LoRA in another layout (kohya's lora_unet_… / lora_down / lora_up names); "
                         f"{FORMAT_HINT}")
    if others:  # e.g. diffusers' text-encoder LoRA layers: applying the rest alone would be another model, silently
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        what = f"also holds LoRA weights of {shown}" if sd else f"holds no {prefix} LoRA, only LoRA weights of {shown}"
        raise ValueError(f"{path} {what}, which flowalign does not apply (it adapts the {prefix} only); save the "
                         f"{prefix} LoRA alone")
    config = None
    if raw:
        config = {k[len(prefix) + 1:]: v for k, v in json.loads(raw).items() if k.startswith(prefix + ".")}
    if not sd:
        raise ValueError(f"{path} holds no '{prefix}.' LoRA tensors")
    return sd, config


_PEFT_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")
FORMAT_HINT = (f"flowalign loads the LoRAs it saves and diffusers/peft-format ones ({PREFIX}.<module>.lora_A.weight "
               f"and .lora_B.weight, as diffusers' save_lora_weights writes them)")


def infer_config(sd: dict[str, Tensor], source="the LoRA") -> dict:
    """LoraConfig kwargs of a peft-format state dict that carries no config, as diffusers' ``load_lora_weights`` infers
    them (``diffusers.utils.peft_utils.get_peft_kwargs`` without network alphas): ``target_modules`` = the module
    paths the tensors name, ``r`` = their rank (lora_A's rows), ``lora_alpha`` = ``r`` (scale 1: W + B·A, the
    diffusers/peft convention for a file without alphas). ``ValueError`` (one line) for keys in another layout
    (kohya's ``lora_down`` / ``.alpha``, DoRA magnitudes, LoRA biases) or ranks that differ between modules."""
    ranks: dict[str, int] = {}
    for key, tensor in sd.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None or tensor.dim() != 2:
            raise ValueError(f"{source}: tensor {PREFIX}.{key!r} is not a LoRA A or B matrix; {FORMAT_HINT}")
        rank = tensor.shape[0] if m.group(2) == "A" else tensor.shape[1]
        ranks.setdefault(m.group(1), int(rank))
    if len(set(ranks.values())) > 1:
        raise ValueError(f"{source}: its modules have different ranks ({sorted(set(ranks.values()))}); flowalign "
                         f"loads a LoRA of one rank")
    r = next(iter(ranks.values()))
    return {"r": r, "lora_alpha": r, "target_modules": sorted(ranks)}


# LoraConfig fields that, with the tensors, determine the adapter's function (scale alpha/r or alpha/sqrt(r))
_FUNCTION_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora")


def load_lora(module: nn.Module, directory, *, adapter_name: str = "default", prefix: str = PREFIX) -> None:
    """Load a ``save_lora`` file into ``module`` (bitwise); inject the adapter from the stored config if absent, or
    from the tensors (``infer_config``) for a file without one."""
    from peft import LoraConfig, set_peft_model_state_dict

    sd, config = read_lora(directory, prefix=prefix)
    cfg = None if config is None else LoraConfig(**{k: v for k, v in config.items()
                                                     if k in LoraConfig.__dataclass_fields__})
    if cfg is not None:
        # Weights alone do not fix the function: copying them into an adapter of another alpha (or one add_lora
        # builds without the stored rsLoRA / per-module patterns) would run them at the wrong scale, silently.
        have = module.peft_config[adapter_name] if has_lora(module, adapter_name) else \
            LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha)  # what add_lora below injects
        diff = {f: (getattr(have, f), getattr(cfg, f)) for f in _FUNCTION_FIELDS if getattr(have, f) != getattr(cfg, f)}
        if diff:
            raise ValueError(f"{directory}: the stored LoRA config differs from the adapter it would load into "
                             f"(field: (adapter, stored)): {diff}")
    if not has_lora(module, adapter_name):
        inferred = infer_config(sd, directory)  # the module paths the tensors name, and their rank
        if cfg is None:  # e.g. diffusers' save_lora_weights: built as diffusers' load_lora_weights builds it
            cfg = LoraConfig(**inferred)
        # the exact modules the file holds: a stored config may select them by a regex, exclude_modules or
        # layers_to_transform, which add_lora's list of names does not reproduce
        add_lora(module, inferred["target_modules"], cfg.r, cfg.lora_alpha, init=cfg.init_lora_weights,
                 adapter_name=adapter_name)
    expected = set(lora_state_dict(module, adapter_name))
    if set(sd) != expected:
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise ValueError(f"LoRA keys do not match the module: missing {missing[:3]}, unexpected {extra[:3]}")
    result = set_peft_model_state_dict(module, sd, adapter_name=adapter_name)
    bad = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if bad:
        raise ValueError(f"unexpected LoRA keys when loading {directory}: {bad[:3]}")
