"""What every diffusers-backed model adapter shares: LoRA plumbing, device/dtype, noise, pipeline loading.

Nothing here is family-specific; ``sd3.py``, ``flux.py`` and ``wan.py`` subclass ``FlowAdapter`` and
implement ``encode`` / ``schedule`` / ``velocity`` / ``decode`` (the ``FlowModel`` protocol).

Precision contract: the transformer runs in the model dtype (fp16/bf16 on GPU, fp32 in tests), its
output is upcast and returned as float32 (kernel maths, log-probs and latents are fp32); the VAE
always runs in fp32; LoRA weights are fp32 master weights.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import numbers
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from flowalign.errors import UserError, first_line
from flowalign.models import lora as _lora

logger = logging.getLogger(__name__)


class FlowAdapter:
    """Base of the model adapters. Subclasses set ``lora_targets``, ``lora_rank``, ``lora_alpha`` and
    ``default_steps``, the sampling steps the commands use when given no ``--steps`` (the diffusers pipeline's default
    for a diffusers family).

    ``guidance_scale`` is read at every ``velocity`` call, so it can be changed between training
    (e.g. 4.5) and evaluation without re-encoding prompts.
    """

    lora_targets: tuple[str, ...] = ()
    output_kind: str = "image"  # what ``decode`` returns: "image" [B,3,H,W] or "video" [B,F,3,H,W]
    lora_rank: int = 32
    lora_alpha: int = 64

    def __init__(
        self,
        transformer: nn.Module,
        *,
        guidance_scale: float,
        latent_shape: Sequence[int],
        dtype: torch.dtype,
        components: Optional[Mapping[str, nn.Module]] = None,
    ) -> None:
        self.transformer = transformer
        self.guidance_scale = float(guidance_scale)
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):  # NaN would give NaN images
            raise UserError(f"guidance_scale={guidance_scale!r} must be a finite number >= 0 (1 = no CFG)")
        self.latent_shape = tuple(int(s) for s in latent_shape)  # per sample, without the batch dim
        self._dtype = dtype
        self.components: dict[str, nn.Module] = {"transformer": transformer, **dict(components or {})}

    # ---- device / dtype -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype (LoRA master weights stay fp32 regardless)."""
        return self._dtype

    def output_size(self) -> dict[str, int]:
        """The size of what ``decode`` returns, for results to record (REWARDS_AND_EVAL.md §3.2): ``height``,
        ``width`` and, for video, ``num_frames`` (the diffusers adapters' sampling sizes)."""
        return {k: int(getattr(self, k)) for k in ("height", "width", "num_frames")
                if isinstance(getattr(self, k, None), int)}

    def to(self, device: Any) -> "FlowAdapter":
        for module in self.components.values():
            module.to(device)
        return self

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the transformer blocks' activations in the backward pass instead of keeping them (diffusers'
        non-reentrant ``enable_gradient_checkpointing``). Gradients are unchanged; activation memory per training
        forward falls to the blocks' inputs. Only forwards with gradients enabled are affected (rollouts run
        under ``no_grad``)."""
        tr = self.transformer
        if not getattr(tr, "_supports_gradient_checkpointing", False) or not hasattr(tr, "enable_gradient_checkpointing"):
            raise UserError(f"model.gradient_checkpointing: the {type(tr).__name__} transformer does not support "
                            "gradient checkpointing; set model.gradient_checkpointing=false")
        tr.enable_gradient_checkpointing() if enabled else tr.disable_gradient_checkpointing()

    # ---- noise ----------------------------------------------------------------------------------

    def init_noise(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """x_0 ~ N(0, I), fp32, [n, *latent_shape]; drawn on the generator's device, then moved."""
        gen_device = generator.device if generator is not None else self.device
        x = torch.randn((n, *self.latent_shape), generator=generator, device=gen_device, dtype=torch.float32)
        return x.to(self.device)  # [n, *latent]

    # ---- LoRA (delegates to flowalign.models.lora) ---------------------------------------------

    def add_lora(
        self,
        rank: Optional[int] = None,
        alpha: Optional[float] = None,
        *,
        targets: Optional[Sequence[str]] = None,
        init: str | bool = "gaussian",
    ) -> list[nn.Parameter]:
        """Wrap the transformer with LoRA (family defaults from METHODS.md §3.7); returns the trainable tensors."""
        return _lora.add_lora(
            self.transformer,
            tuple(targets) if targets is not None else self.lora_targets,
            self.lora_rank if rank is None else rank,
            self.lora_alpha if alpha is None else alpha,
            init=init,
        )

    def reference(self) -> contextlib.AbstractContextManager:
        """Context in which ``velocity`` is the base (reference) model: the adapter is disabled, not copied."""
        return _lora.lora_disabled(self.transformer)

    def lora_parameters(self) -> list[nn.Parameter]:
        return _lora.lora_parameters(self.transformer)

    def lora_state_dict(self) -> dict[str, Tensor]:
        return _lora.lora_state_dict(self.transformer)

    def save_lora(self, directory) -> Path:
        """Write ``directory/pytorch_lora_weights.safetensors`` (loads with diffusers' ``pipe.load_lora_weights``); the
        metadata names this model's family, so that loading it into another model says whose it is."""
        return _lora.save_lora(self.transformer, directory, family=self.family_name())

    @classmethod
    def family_name(cls) -> Optional[str]:
        """This adapter's name in ``flowalign.models.MODELS`` (e.g. ``"shapes_video"``); None for a class not there."""
        from flowalign.models import MODELS

        spec = f"{cls.__module__}:{cls.__qualname__}"
        return next((name for name, s in MODELS.items() if s == spec), None)

    def load_lora(self, directory) -> None:
        """Load a saved LoRA (bitwise); adds the adapter first if the transformer has none."""
        _lora.load_lora(self.transformer, directory)

    # ---- small shared helpers for subclasses ----------------------------------------------------

    @staticmethod
    def _sigma_batch(sigma: Tensor, batch: int, device: torch.device) -> Tensor:
        """σ as float32 [B] (accepts a 0-d tensor, a float or [B])."""
        s = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1)
        return s.expand(batch) if s.numel() == 1 else s  # [B]


def build_transformer(transformer_cls: Any, config: Mapping[str, Any], dtype: torch.dtype, device: Any = "meta") -> nn.Module:
    """A ``transformer_cls(**config)`` with uninitialised weights in ``dtype``, except the parameters and buffers the
    class keeps in float32 (``_keep_in_fp32_modules``, as ``from_pretrained`` loads them). On the meta device (the
    default) it holds shapes only: what a step would keep can be counted without the weights."""
    with torch.device(device):
        tr = transformer_cls(**config)
    keep = tuple(getattr(tr, "_keep_in_fp32_modules", None) or ())
    for name, t in [*tr.named_parameters(), *tr.named_buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return tr


def uses_cfg(guidance_scale: float) -> bool:
    """Whether a CFG adapter's ``velocity`` runs both branches (2 transformer rows per sample): w > 1, as diffusers."""
    return float(guidance_scale) > 1.0


def check_sizes(family: str, **sizes: Any) -> None:
    """One-line ``UserError`` unless every value (height, width, num_frames, max_sequence_length) is an integer ≥ 1;
    0 or a negative size passes the multiple-of checks and fails later inside the transformer."""
    for key, value in sizes.items():
        ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
              and value == int(value) and value >= 1)
        if not ok:
            raise UserError(f"{family}: {key}={value!r} must be an integer >= 1 (model.kwargs.{key} / --model-arg "
                            f"{key}=...)")


def check_text_length(family: str, max_sequence_length: int, limit: int = 512) -> None:
    """One-line ``UserError`` when ``max_sequence_length`` exceeds ``limit``, the most T5 tokens the family's diffusers
    pipeline accepts (its ``check_inputs`` refuses more; the adapters call ``encode_prompt`` directly, which does not)."""
    if max_sequence_length > limit:
        raise UserError(f"{family}: max_sequence_length={max_sequence_length} is above {limit}, the most T5 tokens the "
                        f"diffusers pipeline takes; pass at most {limit} (model.kwargs.max_sequence_length / "
                        f"--model-arg max_sequence_length=...)")


def loading_options(*, variant: Optional[str] = None, revision: Optional[str] = None,
                    use_safetensors: Optional[bool] = None, local_files_only: Optional[bool] = None) -> dict[str, Any]:
    """The diffusers ``from_pretrained`` loading options the adapters forward, type-checked (one-line ``UserError``);
    options left at None are not passed, so diffusers' own defaults apply."""
    out: dict[str, Any] = {}
    for key, value in (("variant", variant), ("revision", revision)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            raise UserError(f"{key}={value!r} must be a non-empty string (e.g. variant=fp16, revision=main)")
        out[key] = str(value)  # a YAML-parsed numeric revision is still a revision
    for key, value in (("use_safetensors", use_safetensors), ("local_files_only", local_files_only)):
        if value is None:
            continue
        if not isinstance(value, bool):
            raise UserError(f"{key}={value!r} must be true or false")
        out[key] = value
    return out


def _families() -> dict[str, tuple[str, str]]:
    """{family: (pipeline class name, transformer class name)} of the registered diffusers-backed families (the family
    modules' ``PIPELINE`` and ``TRANSFORMER``)."""
    import importlib

    from flowalign.models import MODELS

    out = {}
    for fam, spec in MODELS.items():
        mod = importlib.import_module(spec.split(":")[0])
        if getattr(mod, "PIPELINE", None) and getattr(mod, "TRANSFORMER", None):
            out[fam] = (mod.PIPELINE, mod.TRANSFORMER)
    return out


def _pipeline_family(class_name: str, families: Mapping[str, tuple[str, str]]) -> Optional[str]:
    """The family whose pipelines ``class_name`` names: its pipeline class, or a variant of it (the class's stem
    followed by a capital: FluxImg2ImgPipeline is flux, Flux2Pipeline is not); None for no registered family."""
    for fam, (pipe, _) in families.items():
        stem = pipe[: -len("Pipeline")] if pipe.endswith("Pipeline") else pipe
        rest = class_name[len(stem):]
        if class_name == pipe or (class_name.startswith(stem) and rest[:1].isupper()):
            return fam
    return None


def _checkpoint_json(path: str, filename: str, revision: Optional[str] = None) -> Optional[dict]:
    """A JSON file of a checkpoint (``model_index.json``, ``transformer/config.json``): read from a local directory, or
    for a hub id from the local hub cache (no network); None when there is none to read."""
    root = Path(path)
    if root.is_dir():
        file: Any = root / filename
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            file = try_to_load_from_cache(str(path), filename, revision=revision)
        except Exception:  # an id the hub client refuses (a missing local path, say): diffusers reports it
            return None
        if not isinstance(file, str):
            return None
        file = Path(file)
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None  # no or an unreadable file: diffusers reports it
    return data if isinstance(data, dict) else None


def checkpoint_class(path: str, revision: Optional[str] = None) -> Optional[str]:
    """``_class_name`` of a checkpoint's ``model_index.json`` (``_checkpoint_json``); None when there is none to read."""
    name = (_checkpoint_json(path, "model_index.json", revision) or {}).get("_class_name")
    return name if isinstance(name, str) else None


def pipeline_family(path: str) -> Optional[str]:
    """The flowalign family whose pipeline a checkpoint holds (from its ``model_index.json``, read locally or from the
    hub cache, no network): e.g. "sd3" for a StableDiffusion3Pipeline; None when there is none to read or no family
    loads it."""
    found = checkpoint_class(path)
    return _pipeline_family(found, _families()) if found is not None else None


def checkpoint_config(path: str, component: str, revision: Optional[str] = None) -> Optional[dict]:
    """The ``config.json`` of a checkpoint's component (``transformer``, ``vae``) as a dict, read before anything loads
    (``_checkpoint_json``); None when there is none to read."""
    return _checkpoint_json(path, f"{component}/config.json", revision)


def config_value(config: Mapping[str, Any], key: str, class_name: str) -> Any:
    """``config[key]``, or when the config (a ``config.json`` written by an older diffusers) lacks it, the default of
    that ``__init__`` argument of the diffusers class ``class_name``: the value ``from_pretrained`` would use."""
    if key in config:
        return config[key]
    import diffusers

    param = inspect.signature(getattr(diffusers, class_name).__init__).parameters.get(key)
    return None if param is None or param.default is param.empty else param.default


def refuse_conditioned_variant(family: str, where: str, transformer: Mapping[str, Any], class_name: str,
                               expected: int, expected_what: str, variants: str, fix: str) -> None:
    """One-line ``UserError`` when a transformer config takes other than ``expected`` input channels (or gives out
    other than it takes): an image-conditioned variant (``variants``) whose pipeline concatenates a conditioning
    latent, which a text-to-image/video adapter cannot sample."""
    c_in = int(config_value(transformer, "in_channels", class_name))
    c_out = config_value(transformer, "out_channels", class_name) or c_in
    if c_in != expected or c_out != c_in:
        raise UserError(f"{family}: {where} is an image-conditioned variant (such as {variants}): its transformer takes "
                        f"{c_in} input channels for {c_out} output channels, where {expected_what}; flowalign's "
                        f"adapter cannot sample it, {fix}")


def vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    """The image pipelines' (SD3, FLUX) ``vae_scale_factor``: 2^(number of VAE blocks − 1)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def _use_family(owner: str) -> str:
    return f"load it as {owner} (--model {owner}, or model.name: {owner} in a config)"


def path_hint(path: Any, family: str) -> Optional[str]:
    """What a local ``path`` that holds no ``family`` model holds instead, and what to pass: a LoRA or a ``flowalign
    train`` run (``lora.lora_as_model_hint``), a diffusers pipeline of another family (from its ``model_index.json``),
    one component folder of a pipeline (``transformer/``), flowalign's built-in model given to a diffusers family, or
    a single file. None when it is none of these (the caller's own advice applies)."""
    root = Path(path)
    diffusers_family = family in _families()
    want = "the pipeline directory (with model_index.json)" if diffusers_family else \
        "the model directory (with config.json and model.safetensors)"
    if root.is_file():
        if root.name == _lora.WEIGHT_NAME:
            return _lora.lora_as_model_hint(root.parent)
        home = next((d for d in (root.parent, root.parent.parent) if (d / "model_index.json").is_file()), None)
        if home is None and (root.parent / "config.json").is_file() and (root.parent / "model.safetensors").is_file():
            home = root.parent  # a shapes model's file
        if home is None:
            plain = " (flowalign loads diffusers-format directories, not single-file checkpoints)" if diffusers_family \
                else ""
            return f"{str(root)!r} is a single file; pass {want}{plain}"
        other = path_hint(home, family)  # the directory it is in may be another family's
        return f"{str(root)!r} is a single file; " + (other or f"pass {want}: did you mean {str(home)!r}?")
    if not root.is_dir():
        return None
    hint = _lora.lora_as_model_hint(root)
    if hint is not None:
        return hint
    found = checkpoint_class(str(root))
    if found is not None:
        owner = _pipeline_family(found, _families())
        if owner is None:
            return f"{str(root)!r} holds a {found}, which no flowalign model family loads"
        return None if owner == family else f"{str(root)!r} holds a {found}; pass --model {owner} --path {str(root)!r}"
    parent = _checkpoint_json(str(root.parent), "model_index.json")
    if parent is not None and root.name in parent:
        return f"{str(root)!r} is the {root.name}/ folder of the pipeline at {str(root.parent)!r}; pass its parent " \
               f"{str(root.parent)!r}"
    config = _checkpoint_json(str(root), "config.json")
    if config is not None and isinstance(config.get("_class_name"), str):
        return f"{str(root)!r} holds only a {config['_class_name']} (one component of a diffusers pipeline); " \
               f"pass {want}"
    if config is not None and diffusers_family and (root / "model.safetensors").is_file():
        from flowalign.models.shapes import checkpoint_family

        shapes = checkpoint_family(config, root / "model.safetensors")
        if shapes is not None:
            return (f"{str(root)!r} holds a {shapes.ASSET} model (flowalign's built-in); pass --model {shapes.ASSET} "
                    f"--path {str(root)!r}")
    if diffusers_family and (root / "final" / "config.json").is_file():  # a `flowalign pretrain` run
        return path_hint(root / "final", family)
    return None


def check_checkpoint_family(path: str, pipeline_cls: Any, family: str, revision: Optional[str] = None) -> Optional[str]:
    """Before loading: one-line ``UserError`` when the checkpoint's ``model_index.json`` names another family's pipeline
    (naming the right family) or a pipeline no family loads. Returns the class name of a variant of the family's own
    pipeline (e.g. FluxImg2ImgPipeline), which ``load_pipeline`` loads with a warning once its transformer and VAE
    configs pass the family's checks (an image-conditioned variant does not); else None."""
    found = checkpoint_class(path, revision)
    want = pipeline_cls.__name__
    if found is None or found == want:
        return None
    families = _families()
    owner = _pipeline_family(found, families)
    if owner == family:
        return found
    if owner is not None:
        raise UserError(f"the checkpoint at {path!r} is a {found}, not a {family} checkpoint ({want}); "
                        f"{_use_family(owner)}")
    known = ", ".join(f"{f} ({p})" for f, (p, _) in families.items())
    raise UserError(f"the checkpoint at {path!r} is a {found}, which no flowalign model family loads; "
                    f"families: {known}")


def _refuse_transformer(found: str, path: str, family: str) -> None:
    """One-line ``UserError`` unless ``found`` (a transformer class name) is the family's transformer class, naming
    the family it belongs to."""
    families = _families()
    want = families[family][1]
    if found == want:
        return
    owner = next((f for f, (_, t) in families.items() if t == found), None)
    fix = _use_family(owner) if owner else f"pass a {families[family][0]} checkpoint"
    raise UserError(f"the checkpoint at {path!r} has a {found} transformer, not the {family} family's {want}; {fix}")


def check_transformer(pipe: Any, path: str, family: str) -> None:
    """After loading: one-line ``UserError`` when the pipeline's transformer is not the family's transformer class (a
    checkpoint of another family loaded under this family's pipeline class), naming the family it belongs to."""
    import diffusers

    tr = getattr(pipe, "transformer", None)
    cls = getattr(diffusers, _families()[family][1], None)
    if tr is None or cls is None or isinstance(tr, cls):
        return
    _refuse_transformer(type(tr).__name__, path, family)


@contextlib.contextmanager
def _library_logs_held(library: str):
    """Hold the log records a library (diffusers, transformers: their root logger does not propagate) emits inside the
    block and replay them through its handlers if the block succeeds. On failure they are dropped: the caller's
    one-line error says what went wrong, and diffusers' interim lines ("An error occurred while trying to fetch …",
    "Defaulting to unsafe serialization …") would only precede it with a half-truth."""
    root = logging.getLogger(library)
    held: list[logging.LogRecord] = []

    class _Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    handlers, hold = root.handlers[:], _Hold()
    for h in handlers:
        root.removeHandler(h)
    root.addHandler(hold)
    try:
        yield
    finally:
        root.removeHandler(hold)
        for h in handlers:
            root.addHandler(h)
    for record in held:  # only reached on success
        root.handle(record)


def load_pipeline(pipeline_cls: Any, path: str, *, dtype: torch.dtype, device: Any, family: str,
                  check: Optional[Callable[[Mapping[str, Any], Mapping[str, Any]], None]] = None, **kwargs: Any):
    """``pipeline_cls.from_pretrained(path)`` in ``dtype`` with the VAE in fp32, every module frozen and in eval mode.

    ``path`` is a local diffusers directory or a hub id (offline runs need a local directory); ``kwargs`` are diffusers
    loading options (``loading_options``). A checkpoint of another family is refused in one line, before loading
    when its ``model_index.json`` can be read (``check_checkpoint_family``), else by its transformer class.
    ``check(transformer_config, vae_config)`` is the family's one-line refusal of a checkpoint it cannot sample (an
    image-conditioned variant, a size the transformer cannot take): it runs here on the components' ``config.json``
    when both can be read before loading; the adapter runs it again on the loaded modules' configs.
    """
    import diffusers.pipelines.pipeline_utils as pu

    revision = kwargs.get("revision")
    if Path(path).exists() and not (Path(path) / "model_index.json").is_file():  # diffusers would say only that
        hint = path_hint(path, family)
        if hint is not None:
            raise UserError(f"no {family} pipeline at {path!r} (no model_index.json there); {hint}")
    variant_of = check_checkpoint_family(path, pipeline_cls, family, revision)
    if check is not None:
        configs = [checkpoint_config(path, c, revision) for c in ("transformer", "vae")]
        if all(c is not None for c in configs):
            name, families = configs[0].get("_class_name"), _families()
            if name in (None, families[family][1]):
                try:
                    check(*configs)
                except (KeyError, TypeError, ValueError, IndexError):  # a config.json without the keys it needs:
                    pass  # diffusers reports it when loading, or the adapter checks the loaded modules' configs
            elif any(t == name for _, t in families.values()):  # another family's: say so, not why its channels
                _refuse_transformer(name, path, family)  # do not fit this family's
            # any other class is judged once loaded (check_transformer, then the adapter's own check)
    if variant_of is not None:
        logger.warning("the checkpoint at %r is a %s; the %s adapter loads it as a %s", path, variant_of, family,
                       pipeline_cls.__name__)
    # Per-component dtypes ({"default": dtype, "vae": fp32}) load the VAE directly in fp32. diffusers renamed
    # ``torch_dtype`` to ``dtype`` (the old name warns); older versions only know torch_dtype.
    dtype_key = "dtype" if hasattr(pu, "_resolve_dtype") else "torch_dtype"
    dtypes = {"default": dtype, "vae": torch.float32}
    try:
        with _library_logs_held("diffusers"):
            pipe = pipeline_cls.from_pretrained(path, **{dtype_key: dtypes}, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(_load_failure(path, family, e, kwargs)) from e
    check_transformer(pipe, path, family)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "vae", None) is not None and pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)  # VAE in fp32 (METHODS.md §3.7, REWARDS_AND_EVAL.md §4.1)
    pipe.to(device)
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False)
            module.eval()
    return pipe


def _load_failure(path: str, family: str, err: BaseException, options: Mapping[str, Any]) -> str:
    """The one-line reason ``from_pretrained(path)`` failed, with the fix: a hub id that is not in the local cache
    (offline, or no network) is said plainly; another error keeps its first line, shortened at a sentence or word
    boundary with its parentheses closed."""
    path = str(path)
    chain, e = [], err
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(str(c) for c in chain)
    if not Path(path).exists() and (path.startswith(("/", ".", "~")) or path.count("/") > 1
                                    or "neither a valid local path nor a valid repo id" in text):
        return f"cannot load the {family} pipeline: there is no directory {path!r}; pass a local diffusers " \
               f"directory (with model_index.json) as --path DIR (model.path: DIR in a config)"
    if not Path(path).exists() and re.search(r"not (fully )?cached|cached snapshot|outgoing traffic has been disabled",
                                             text):
        if options.get("local_files_only"):
            why = "local_files_only is set"
        elif any(type(c).__name__ == "OfflineModeIsEnabled" for c in chain) or "offline mode" in text:
            why = "offline mode is on (HF_HUB_OFFLINE)"
        else:
            why = "the hub cannot be reached (no network)"
        rev = f" --revision {options['revision']}" if options.get("revision") else ""
        return (f"cannot load the {family} pipeline: {path!r} is not a local directory, and as a Hugging Face hub id "
                f"it is not (fully) in the local cache and {why}; download it on a machine with network (hf download "
                f"{path}{rev} --local-dir DIR) and pass --path DIR (model.path: DIR in a config)")
    first = first_line(err, limit=10_000)
    missing = re.search(r"no file named (\S+) found in directory (\S+?)\.?$", first)
    if missing:  # diffusers tried .safetensors, then .bin, and names only the last
        first = f"no weights file ({missing.group(1).rsplit('.', 1)[0]}.safetensors or .bin) in {missing.group(2)}"
    return f"cannot load the {family} pipeline from {path!r} ({_clip(first)}); pass a local diffusers directory"


def _clip(text: str, limit: int = 240) -> str:
    """``text`` cut to about ``limit`` characters at the end of a sentence, else of a word (marked "…"), with any
    parenthesis or bracket the cut left open closed, so the line around it still reads."""
    if len(text) > limit:
        cut = text[:limit]
        sentence, word = cut.rfind(". "), cut.rfind(" ")
        if sentence >= limit // 3:
            cut = cut[: sentence + 1]
        else:
            cut = (cut[:word].rstrip(",;:(") if word > 0 else cut) + " …"
        opened = []
        for ch in cut:
            if ch in "([{":
                opened.append(ch)
            elif ch in ")]}" and opened:
                opened.pop()
        text = cut + "".join({"(": ")", "[": "]", "{": "}"}[c] for c in reversed(opened))
    return text


def pipeline_modules(pipe: Any) -> dict[str, nn.Module]:
    """Every nn.Module component of a diffusers pipeline, by name."""
    return {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}


# ---- the scheduler's sigma grid ------------------------------------------------------------------
#
# flowalign builds the grid itself (samplers handle σ only), so every scheduler option that changes diffusers' grid is
# either reproduced by ``flow_match_sigmas`` or refused at load time: a checkpoint is never silently sampled on a grid
# other than the one its diffusers pipeline would use.

# The FlowMatchEulerDiscreteScheduler options ``flow_match_sigmas`` reproduces. A non-default value of any other
# __init__ option (invert_sigmas, stochastic_sampling, or one a newer diffusers adds) is refused.
FLOW_MATCH_OPTIONS = frozenset({
    "num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
    "max_image_seq_len", "time_shift_type", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas",
})


def refuse_scheduler_options(scheduler: Any, family: str, expected: Mapping[str, Any]) -> None:
    """``UserError`` (one line) for the first option in the scheduler's config whose value is not ``expected[option]``.

    Options absent from the config are not checked. None, False and 0 are the same "off" value, as diffusers tests them
    with ``if config.option``.
    """
    cfg = scheduler.config
    for key, want in expected.items():
        if key not in cfg:
            continue
        value = cfg[key]
        if value == want or (not value and not want):
            continue
        raise UserError(
            f"{family}: the checkpoint's scheduler ({type(scheduler).__name__}) sets {key}={value!r}, which flowalign "
            f"does not support yet; set {key} to {want!r} in scheduler/scheduler_config.json"
        )


def check_flow_match_scheduler(scheduler: Any, family: str) -> None:
    """Refuse, at load time, a scheduler whose grid ``flow_match_sigmas`` does not reproduce: another scheduler class,
    or a FlowMatchEulerDiscreteScheduler with a non-default option outside ``FLOW_MATCH_OPTIONS``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise UserError(
            f"{family}: the pipeline's scheduler is {type(scheduler).__name__}; flowalign reproduces only "
            f"FlowMatchEulerDiscreteScheduler's sigma grid, so load the checkpoint with that scheduler"
        )
    params = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
    refuse_scheduler_options(scheduler, family, {
        k: p.default for k, p in params.items() if k not in FLOW_MATCH_OPTIONS and p.default is not p.empty
    })
    cfg = scheduler.config
    if not cfg.get("use_dynamic_shifting", False):  # the static shift shapes the grid (dynamic shifting ignores it)
        check_shift(cfg.get("shift", 1.0), f"{family}: shift={cfg.get('shift', 1.0)!r} in the checkpoint's "
                    "scheduler/scheduler_config.json", "set it there (1.0 = no shift; SD3/3.5 use 3.0)")


def check_shift(value: Any, what: str, fix: str) -> float:
    """``value`` as a float when it is a finite number > 0, else a one-line ``UserError`` "{what} must be ...; {fix}":
    a shift of 0, below 0 or NaN makes the shifted grid NaN or non-monotone (``samplers.schedules.shift``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise UserError(f"{what} must be a finite number > 0; {fix}")
    return float(value)


def scheduler_mu(config: Mapping[str, Any], seq_len: int, *, max_shift: float) -> float:
    """The pipelines' dynamic-shift μ for ``seq_len`` image tokens with the scheduler's constants (METHODS.md §1.3):
    linear in the token count between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift).
    ``max_shift`` is the pipeline's default when the config has none (FLUX 1.15, SD3 1.16)."""
    from flowalign.samplers.schedules import flux_mu

    return flux_mu(seq_len, base_seq_len=int(config.get("base_image_seq_len", 256)),
                   max_seq_len=int(config.get("max_image_seq_len", 4096)),
                   base_shift=float(config.get("base_shift", 0.5)), max_shift=float(config.get("max_shift", max_shift)))


def flow_match_sigmas(config: Mapping[str, Any], steps: int, *, mu: Optional[float] = None,
                      sigmas: Optional[Tensor] = None) -> Tensor:
    """The sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler.from_config(config)`` after
    ``set_timesteps(steps, sigmas=sigmas, mu=mu)``, float32 [T+1] ending in 0, computed in float64 (METHODS.md §1.2-1.3).

    The steps of ``set_timesteps``: (1) without ``sigmas``, u = linspace(σ_max, σ_min, T) over the training table
    (σ_max = 1; σ_min = shift_s(1/N), or 1/N when the table is unshifted because of dynamic shifting); (2) the static
    shift shift_s(u), or the dynamic time shift e^μ/(e^μ + 1/u − 1) ("exponential") or μ/(μ + 1/u − 1) ("linear");
    (3) ``shift_terminal``: stretch 1 − σ so the last sigma is the terminal value; (4) Karras / exponential / beta
    spacing between the first and last sigma (``config`` ``sigma_min`` / ``sigma_max`` override them, as in diffusers);
    (6) append 0. Options ``check_flow_match_scheduler`` refuses are not handled here.
    """
    from flowalign.samplers.schedules import shift

    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    dynamic = bool(config.get("use_dynamic_shifting", False))
    s = float(config.get("shift", 1.0))
    if sigmas is None:
        n = int(config.get("num_train_timesteps", 1000))
        sigma_min = 1.0 / n if dynamic else s * (1.0 / n) / (1.0 + (s - 1.0) * (1.0 / n))
        u = torch.linspace(n, sigma_min * n, steps, dtype=torch.float64) / n  # [T]
    else:
        u = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)  # [T]
    if dynamic:
        if mu is None:
            raise ValueError("mu is required when the scheduler has use_dynamic_shifting")
        m = math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else float(mu)
        sig = m / (m + (1.0 / u - 1.0))  # [T]
    else:
        sig = shift(u, s)  # [T]
    terminal = config.get("shift_terminal")
    if terminal:  # LTX-Video's stretch: 1 − σ scaled so that σ_{T−1} = shift_terminal
        one_minus = 1.0 - sig
        sig = 1.0 - one_minus / (one_minus[-1] / (1.0 - float(terminal)))
    if config.get("use_karras_sigmas") or config.get("use_exponential_sigmas") or config.get("use_beta_sigmas"):
        lo = config.get("sigma_min")
        hi = config.get("sigma_max")
        lo = float(sig[-1]) if lo is None else float(lo)
        hi = float(sig[0]) if hi is None else float(hi)
        ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)  # [T]
        if config.get("use_karras_sigmas"):  # Karras et al. 2022, ρ = 7
            rho = 7.0
            sig = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        elif config.get("use_exponential_sigmas"):
            sig = torch.exp(torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64))
        else:  # "Beta Sampling is All You Need", α = β = 0.6
            import scipy.stats

            ppf = torch.from_numpy(scipy.stats.beta.ppf((1.0 - ramp).numpy(), 0.6, 0.6)).to(torch.float64)
            sig = lo + ppf * (hi - lo)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)  # [T+1]
