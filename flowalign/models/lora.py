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
* ``lora_origin`` names the model family a LoRA was trained on (the file's ``flowalign_model`` metadata, else the
  ``config.yaml`` of the ``flowalign train`` run it is a checkpoint of); ``lora_dir_hint`` says which directory was
  probably meant when one without a LoRA file is given (a run directory → its newest checkpoint), and
  ``lora_as_model_hint`` what to pass when a LoRA or a training run is given as the model.
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
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer"  # diffusers' component prefix for the denoiser
FAMILY_KEY = "flowalign_model"  # safetensors metadata: the family (flowalign.models.MODELS name) it was trained on


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
        raise ValueError(f"no module of {type(module).__name__} matches the LoRA target(s) "
                         f"{short_list(missing, 100)}")
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
        raise ValueError(f"no module of {type(module).__name__} matches the LoRA targets "
                         f"{short_list(targets, 100)}") from e
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


def short_list(items: Sequence[str], budget: int = 120) -> str:
    """``items`` as a Python list cut at whole items after ``budget`` characters (at least one item), with
    ``(+N more)`` for the rest: a one-line message never ends inside a quoted name."""
    items = [str(i) for i in items]
    shown: list[str] = []
    for item in items:
        if shown and len(repr(shown + [item])) > budget:
            break
        shown.append(item)
    rest = len(items) - len(shown)
    return repr(shown) + (f" (+{rest} more)" if rest else "")


def save_lora(module: nn.Module, directory, *, adapter_name: str = "default", prefix: str = PREFIX,
              family: Optional[str] = None) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` atomically, as diffusers' ``load_lora_weights`` reads it.
    ``family``: the model family it belongs to, kept in the metadata (``FAMILY_KEY``) so that a LoRA loaded into
    another model says whose it is (``lora_origin``)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"{prefix}.{k}": v for k, v in lora_state_dict(module, adapter_name).items()}
    meta = {f"{prefix}.{k}": v for k, v in _config_dict(module, adapter_name).items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True, default=str)}
    if family:
        metadata[FAMILY_KEY] = str(family)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    from flowalign.io import new_file_mode

    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, new_file_mode())  # mkstemp makes 0600; a LoRA is meant to be shared (others may read it)
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
        try:
            add_lora(module, inferred["target_modules"], cfg.r, cfg.lora_alpha, init=cfg.init_lora_weights,
                     adapter_name=adapter_name)
        except ValueError as err:  # its modules are not this network's: most often a LoRA of another model
            raise ValueError(_with_origin(str(err), directory)) from err
    expected = set(lora_state_dict(module, adapter_name))
    if set(sd) != expected:
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise ValueError(_with_origin(f"LoRA keys do not match the module: missing {short_list(missing, 80)}, "
                                      f"unexpected {short_list(extra, 80)}", directory))
    result = set_peft_model_state_dict(module, sd, adapter_name=adapter_name)
    bad = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if bad:
        raise ValueError(f"unexpected LoRA keys when loading {directory}: {bad[:3]}")


def _with_origin(message: str, directory) -> str:
    """``message`` plus the model the LoRA at ``directory`` was trained on, when known (``lora_origin``)."""
    origin = lora_origin(directory)
    return f"{message}: a LoRA of {origin}" if origin else message


def _run_config_model(run: Path) -> Optional[dict]:
    """The ``model`` section of ``run/config.yaml`` (a ``flowalign train`` run's resolved config); None if unknown."""
    import yaml

    try:
        saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    model = saved.get("model") if isinstance(saved, dict) else None
    return model if isinstance(model, dict) and isinstance(model.get("name"), str) and model["name"] else None


def lora_origin(directory) -> Optional[str]:
    """The model a LoRA was trained on, e.g. ``"shapes_video"`` or ``"shapes with --path 'runs/base/final'"``: the
    family its file records (``FAMILY_KEY``), else the ``model`` of the ``flowalign train`` run it is a checkpoint of
    (``RUN/checkpoints/step-N[/raw]`` → ``RUN/config.yaml``); None when neither says."""
    from safetensors import safe_open

    path = Path(directory)
    ckpt = path.parent if path.suffix == ".safetensors" else path
    try:
        with safe_open(str(ckpt / WEIGHT_NAME), framework="pt", device="cpu") as f:
            family = (f.metadata() or {}).get(FAMILY_KEY)
    except Exception:  # unreadable: read_lora has said so already, or will  # noqa: BLE001
        family = None
    if family:
        return family
    if ckpt.name == "raw":  # the live weights beside the checkpoint's EMA LoRA
        ckpt = ckpt.parent
    if ckpt.parent.name != "checkpoints":
        return None
    model = _run_config_model(ckpt.parent.parent)
    if model is None:
        return None
    where = model.get("path")
    return model["name"] + (f" with --path {str(where)!r}" if where else "")


def latest_checkpoint(run, *needs: str) -> Optional[Path]:
    """The newest ``run/checkpoints/step-N`` (highest N) that holds every file in ``needs``; None when there is none."""
    found = []
    for p in Path(run, "checkpoints").glob("step-*"):
        n = p.name[len("step-"):]
        if n.isdigit() and p.is_dir() and all((p / f).is_file() for f in needs):
            found.append((int(n), p))
    return max(found)[1] if found else None


def lora_dir_hint(path) -> Optional[str]:
    """What a directory that holds no ``WEIGHT_NAME`` was probably meant to be, for a ``--lora`` error: a training run
    (or its ``checkpoints/``) → its newest checkpoint; a model directory → ``--path``. None when nothing fits."""
    path = Path(path)
    if not path.is_dir():
        return None
    for run in (path, path.parent) if path.name == "checkpoints" else (path,):
        ckpt = latest_checkpoint(run, WEIGHT_NAME)
        if ckpt is not None:
            return f"did you mean {str(ckpt)!r}, the newest checkpoint of that `flowalign train` run?"
    for model in (path, path / "final"):
        if (model / "model.safetensors").is_file() and (model / "config.json").is_file():
            return f"{str(model)!r} holds a model, not a LoRA; pass it as --path {str(model)!r}"
    return None


def lora_as_model_hint(path) -> Optional[str]:
    """What to pass when ``path``, given as a model (``--path`` / ``model.path``), is a LoRA directory or a
    ``flowalign train`` run (or its ``checkpoints/``): the LoRA as ``--lora`` with its base model as ``--path``, named
    from the run's ``config.yaml`` when it has one, else from the LoRA (``lora_origin``). None when it is neither."""
    path = Path(path)
    if (path / WEIGHT_NAME).is_file():
        ckpt = path.parent if path.name == "raw" else path
        run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
        return _with_base(f"{str(path)!r} holds a LoRA, not a model ({WEIGHT_NAME}); pass it as --lora "
                          f"{str(path)!r} with its base model as --path (model.path in a config)", run, path)
    run = path.parent if path.name == "checkpoints" else path
    ckpt = latest_checkpoint(run, WEIGHT_NAME)
    if ckpt is None:
        return None
    return _with_base(f"{str(run)!r} is a `flowalign train` run, which holds LoRAs, not a model; pass --lora "
                      f"{str(ckpt)!r} (its newest checkpoints/step-N) with the run's base model as --path (model.path "
                      f"in a config)", run, ckpt)


def _with_base(message: str, run: Optional[Path], lora: Path) -> str:
    """``message`` plus the base model: ``--model NAME --path P`` from the training run's ``config.yaml``, else the
    family the LoRA names (``_with_origin``)."""
    model = _run_config_model(run) if run is not None else None
    if model is None:
        return _with_origin(message, lora)
    where = f" --path {str(model['path'])!r}" if model.get("path") else " (its default --path)"
    return f"{message}: the run trained --model {model['name']}{where}"
