"""``flowalign bench train-memory``: what one training forward keeps for its backward, with and without gradient
checkpointing (``model.gradient_checkpointing``), and what the backward then costs.

The figure is exact on any device. Every tensor that autograd saves for the backward passes through a
``torch.autograd.graph.saved_tensors_hooks`` pack hook; :func:`saved_bytes` sums the bytes of their distinct
storages and leaves out the model's own parameters, which exist whether or not anything trains. With diffusers'
non-reentrant checkpointing a block saves only its inputs (through torch's input saver, which the hook sees) and
recomputes the rest in the backward, so the figure falls to the blocks' inputs plus what lies outside the blocks.
On CUDA the step's peak allocated memory is printed as well.

The forward is the trainer's: the guided velocity (both CFG branches in one batch) of a LoRA-wrapped model at one
noise level, reduced to a scalar. The LoRA gradients of the two modes are compared, so the table also shows that
checkpointing leaves the update unchanged.

``--arch`` counts the published SD3.5 / FLUX / Wan transformers without their weights: built on the meta device
(shapes only) from ``ARCHITECTURES`` of their family file and fed that family's ``step_inputs``
(:func:`count_config`). :func:`preflight` runs the same count for a loaded model before a GPU training run.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from flowalign.errors import CommandParser, UserError
from flowalign.models import MODELS  # names and module paths only: no model code is imported

logger = logging.getLogger(__name__)

FAMILIES = tuple(MODELS)
PROMPTS = {"shapes": "a red circle above a blue square", "shapes_video": "a red circle moving to the right"}


@contextmanager
def saved_bytes(exclude: Iterable[nn.Parameter] = ()) -> Iterator[dict[int, int]]:
    """Collect, while the block runs, the storages autograd saves for the backward: {storage id: bytes}.

    Tensors sharing a storage count once; storages of ``exclude`` (the model's parameters, saved by every linear
    layer's backward but not allocated by the forward) do not count. ``sum(result.values())`` is the memory the
    forward keeps alive for its backward beyond the model itself. Storages are told apart by identity, so this
    also counts meta tensors (shapes without memory).
    """
    skip = {p.untyped_storage()._cdata for p in exclude}  # the storage object itself: meta storages all sit at 0
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s._cdata not in skip:
            seen[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


class _FusedAttentionSaves(torch.autograd.Function):
    """Scaled dot-product attention on the meta device, keeping for the backward what the fused kernels (flash,
    memory-efficient) keep: q, k, v, the output and a float32 log-sum-exp per query (and the mask, if any). Without
    it the meta device takes the math path, which keeps the whole attention matrix, as no GPU run does."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, *mask: Tensor) -> Tensor:
        # [B, H, Lq, Dv], laid out [B, Lq, H, Dv] as the fused kernels write it (a later transpose is then a view)
        out = torch.empty((q.shape[0], q.shape[2], q.shape[1], v.shape[-1]), device=q.device, dtype=q.dtype).transpose(1, 2)
        lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)  # [B, H, Lq]
        ctx.save_for_backward(q, k, v, out, lse, *mask)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:  # pragma: no cover (meta tensors are only counted)
        raise RuntimeError("the meta-device attention stand-in only counts memory")


@contextmanager
def fused_attention_on_meta() -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` on meta tensors through :class:`_FusedAttentionSaves`."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None, *args: Any,
             **kwargs: Any) -> Tensor:  # torch's parameter names: diffusers passes them by keyword
        if query.device.type != "meta":
            return real(query, key, value, attn_mask, *args, **kwargs)
        return _FusedAttentionSaves.apply(query, key, value, *([attn_mask] if attn_mask is not None else []))

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def family_module(family: str) -> Any:
    """The module of a registered model family (``flowalign.models.MODELS``)."""
    import importlib

    return importlib.import_module(MODELS[family].split(":")[0])


def architectures() -> dict[str, str]:
    """{published architecture: model family} over the registered families that list theirs (``ARCHITECTURES``)."""
    return {arch: fam for fam in MODELS for arch in getattr(family_module(fam), "ARCHITECTURES", {})}


def count_config(family: str, config: dict[str, Any], prompts: int, height: int, width: int, *, frames: int = 1,
                 dtype: torch.dtype = torch.bfloat16, device: Any = "meta", lora: Optional[tuple] = None,
                 **input_kwargs: Any) -> dict[str, Any]:
    """Bytes a training forward of a ``family`` transformer built from ``config`` keeps for its backward, without and
    with checkpointing: the transformer in ``dtype`` with the family's default LoRA (fp32), fed the inputs its
    adapter's ``velocity`` batches for ``prompts`` prompts. On the meta device (the default) nothing is allocated and
    attention is counted as the fused kernels keep it. ``lora`` = (targets, rank, alpha) replaces the family's
    default LoRA; ``input_kwargs`` (e.g. ``max_sequence_length``) go to the family's ``step_inputs``."""
    import diffusers

    from flowalign.models import resolve
    from flowalign.models.base import build_transformer
    from flowalign.models.lora import add_lora

    mod = family_module(family)
    cls = resolve(family)
    tr = build_transformer(getattr(diffusers, mod.TRANSFORMER), config, dtype, device)
    lora_params = add_lora(tr, *(lora or (cls.lora_targets, cls.lora_rank, cls.lora_alpha)))
    inputs = mod.step_inputs(config, prompts, height, width, dtype, device=device, frames=frames, **input_kwargs)
    kept = []
    for mode in (False, True):
        tr.enable_gradient_checkpointing() if mode else tr.disable_gradient_checkpointing()
        with fused_attention_on_meta(), saved_bytes(tr.parameters()) as seen:
            tr(**inputs, return_dict=False)
        kept.append(sum(seen.values()))
    return {"family": family, "prompts": prompts, "rows": int(inputs["timestep"].shape[0]), "height": height,
            "width": width, "frames": frames, "dtype": str(dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in tr.parameters()), "lora_parameters": sum(p.numel() for p in lora_params),
            "saved_bytes_off": kept[0], "saved_bytes_on": kept[1]}


def count_architecture(arch: str, prompts: int, height: int, width: int, *, frames: int = 1,
                       dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """:func:`count_config` for a published architecture (``ARCHITECTURES`` of its family), on the meta device."""
    family = architectures()[arch]
    config = family_module(family).ARCHITECTURES[arch]
    return {"arch": arch, **count_config(family, config, prompts, height, width, frames=frames, dtype=dtype)}


def preflight(model: Any, family: str, micro_batch: int, *, checkpointing: bool, lora: tuple,
              free_bytes: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Before a GPU run's first rollout: what one update micro-batch will keep for its backward, counted on the meta
    device from the loaded transformer's own config, size, text length, dtype and guidance scale (the rows ``velocity``
    runs: both CFG branches only when it is > 1) and the run's LoRA = (targets, rank, alpha) (:func:`count_config`),
    plus the LoRA's gradients and AdamW moments (12 bytes per LoRA parameter), against the device's free memory. Logs
    the estimate; warns, naming both fixes, when it exceeds 90 % of what is free. None (and nothing logged) for a
    family without ``step_inputs`` (the shapes models). ``free_bytes`` defaults to ``torch.cuda.mem_get_info``."""
    from flowalign.models.lora import lora_parameters

    if family not in MODELS or not hasattr(family_module(family), "step_inputs"):
        return None
    tr = model.transformer
    config = {k: v for k, v in dict(tr.config).items() if not k.startswith("_")}
    est = count_config(family, config, micro_batch, model.height, model.width,
                       frames=int(getattr(model, "num_frames", 1)), dtype=model.dtype, lora=tuple(lora),
                       max_sequence_length=int(model.max_sequence_length),
                       guidance_scale=float(model.guidance_scale))
    kept = est["saved_bytes_on" if checkpointing else "saved_bytes_off"]
    need = kept + 12 * sum(p.numel() for p in lora_parameters(tr))
    if free_bytes is None:
        free_bytes = int(torch.cuda.mem_get_info(model.device)[0])
    gib = 2.0 ** 30
    logger.info("memory: an update micro-batch of %d keeps about %.1f GiB for its backward (%.1f GiB with gradient "
                "checkpointing, %.1f without) plus %.1f GiB of LoRA gradients and AdamW state; %.1f GiB free on %s",
                micro_batch, kept / gib, est["saved_bytes_on"] / gib, est["saved_bytes_off"] / gib,
                (need - kept) / gib, free_bytes / gib, model.device)
    if need > 0.9 * free_bytes:
        fixes = ("a smaller train.micro_batch" if checkpointing else
                 "model.gradient_checkpointing=true (the same gradients) or a smaller train.micro_batch")
        logger.warning("memory: the update needs about %.1f GiB but %.1f GiB are free on %s; it will likely run out of "
                       "memory: set %s", need / gib, free_bytes / gib, model.device, fixes)
    return {**est, "needed_bytes": need, "free_bytes": free_bytes}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: Any, prompt: str, batch: int, *, sigma: float = 0.5, repeat: int = 3, seed: int = 0
            ) -> list[dict[str, Any]]:
    """One row per mode (checkpointing off, on): saved bytes, forward and backward seconds (median of ``repeat``
    after a warm-up), CUDA peak bytes, the max |Δ| of the LoRA gradients against the first mode, and the rows the
    transformer was fed (counted by a forward pre-hook)."""
    params = model.lora_parameters()
    device = model.device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *model.latent_shape), generator=gen).to(device)  # [B, *latent]
    sig = torch.full((batch,), float(sigma), device=device)  # [B]
    with torch.no_grad():
        cond = model.encode([prompt] * batch)
    fed: list[int] = []  # rows the transformer is fed per call: 2 x batch with CFG, batch for guidance-distilled FLUX

    def count_rows(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        if x is not None:
            fed.append(int(x.shape[0]))

    hook = model.transformer.register_forward_pre_hook(count_rows, with_kwargs=True)
    try:
        return _measure_modes(model, params, device, x, sig, cond, repeat, fed)
    finally:
        hook.remove()
        model.set_gradient_checkpointing(False)


def _measure_modes(model: Any, params: list, device: torch.device, x: Tensor, sig: Tensor, cond: Any, repeat: int,
                   fed: list[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    ref: Optional[Tensor] = None
    for mode in (False, True):
        model.set_gradient_checkpointing(mode)
        fwd_s, bwd_s, kept, peak = [], [], 0, None
        for i in range(repeat + 1):  # the first pass warms up (allocator, kernels) and is not timed
            for p in params:
                p.grad = None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            fed.clear()
            t0 = time.perf_counter()
            with saved_bytes(model.transformer.parameters()) as seen:
                loss = model.velocity(x, sig, cond).float().pow(2).mean()  # [] (the trainer's forward, a scalar)
            _sync(device)
            t1 = time.perf_counter()
            loss.backward()
            _sync(device)
            t2 = time.perf_counter()
            kept = sum(seen.values())
            if i:
                fwd_s.append(t1 - t0)
                bwd_s.append(t2 - t1)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
        grad = torch.cat([p.grad.detach().flatten().float() for p in params if p.grad is not None])  # [n_lora]
        diff = 0.0 if ref is None else float((grad - ref).abs().max())
        ref = grad if ref is None else ref
        rows.append({"checkpointing": mode, "rows_per_forward": sum(fed),
                     "saved_bytes": kept, "forward_s": statistics.median(fwd_s), "backward_s": statistics.median(bwd_s),
                     "cuda_peak_bytes": peak, "grad_max_abs_diff": diff})
    return rows


def tiny_models_file() -> Path:
    """``tests/tiny_models.py`` next to the package: it builds the tiny SD3 / FLUX / Wan pipelines, and only a source
    checkout has it (a pip-installed wheel ships no tests/)."""
    import flowalign

    return Path(flowalign.__file__).resolve().parents[1] / "tests" / "tiny_models.py"


def _needs_tiny(family: str, path: str) -> bool:
    """Whether :func:`_load` builds ``family`` from ``tests/tiny_models.py`` (no --path, not a shipped shapes model)."""
    return not path and family not in ("shapes", "shapes_video")


def _load(family: str, path: str, *, device: str, dtype: torch.dtype, resolution: int, workdir: Path, frames: int = 1
          ) -> Optional[tuple[Any, str]]:
    """(model, description) for a family: the shipped shapes models, a local checkpoint (``path``) of any family,
    or the tiny random SD3 / FLUX / Wan pipelines of ``tests/tiny_models.py`` (only from a source checkout)."""
    import importlib.util

    from flowalign.models import load_model

    kw: dict[str, Any] = {"device": device, "dtype": dtype}
    if not _needs_tiny(family, path):
        if resolution and family not in ("shapes", "shapes_video"):
            kw.update(height=resolution, width=resolution)
        if family == "wan":
            kw.update(num_frames=frames)  # the adapter's default is 81 frames
        what = path or "the shipped model"
        return load_model(family, path, **kw), what
    src = tiny_models_file()
    if not src.is_file():
        logger.warning("%s skipped: no --path and %s not found (the tiny pipelines need a source checkout)", family, src)
        return None
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()  # building and loading the tiny pipelines is instant; their bars are noise here
    tlog.disable_progress_bar()
    spec = importlib.util.spec_from_file_location("_flowalign_tiny_models", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    built = getattr(mod, f"build_tiny_{family}")(workdir / f"tiny_{family}")
    return load_model(family, str(built), **kw, **mod.TINY_SIZES[family]), "tiny random pipeline (tests/tiny_models.py)"


def _print_architectures(args: argparse.Namespace, dtype: torch.dtype) -> None:
    known = architectures()
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    bad = [a for a in archs if a not in known]
    if bad or not archs:
        raise UserError(f"--arch {args.arch!r}: unknown or no architecture(s) {bad}; choose from {', '.join(known)}")
    side = args.resolution or 512
    if side % 16:
        raise UserError(f"--resolution {side}: use a multiple of 16")
    print(f"train-memory --arch: bytes one training forward keeps for its backward, counted on the meta device "  # noqa: T201
          f"(no weights), {args.batch} prompt(s), {side}x{side}, {args.dtype} weights, fp32 LoRA (family defaults), "
          "attention as the fused kernels keep it")
    print(f"{'architecture':<16}{'rows':>5}{'frames':>7}{'params':>9}{'off GiB':>10}{'on GiB':>9}{'less':>7}")  # noqa: T201
    out = []
    for arch in archs:
        r = count_architecture(arch, args.batch, side, side, frames=args.frames if known[arch] == "wan" else 1,
                               dtype=dtype)
        out.append(r)
        print(f"{arch:<16}{r['rows']:>5}{r['frames']:>7}{r['parameters'] / 1e9:>8.2f}B"  # noqa: T201
              f"{r['saved_bytes_off'] / 2**30:>10.2f}{r['saved_bytes_on'] / 2**30:>9.2f}"
              f"{r['saved_bytes_off'] / max(r['saved_bytes_on'], 1):>6.1f}x")
    if args.json:
        from flowalign.io import atomic_write_json

        atomic_write_json(args.json, {"meta": True, "architectures": out})
    sys.stdout.flush()


def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _refuse_with_arch(args: argparse.Namespace) -> None:
    """``--arch`` counts on the meta device from published configs: options that pick, load or time a model would be
    silently ignored, so they are refused in one line."""
    for flag, value in (("--models", args.models), ("--path", args.path or None), ("--device", args.device),
                        ("--repeat", args.repeat)):
        if value is not None:
            raise UserError(f"{flag} does not apply to --arch (a meta-device count of published architectures, no "
                            f"model loaded or timed); drop {flag}, or drop --arch to measure --models")
    known = architectures()
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    if args.frames != 1 and archs and all(known.get(a) not in (None, "wan") for a in archs):
        raise UserError(f"--frames {args.frames} applies to the Wan architectures only and --arch {args.arch!r} has "
                        f"none; drop --frames or add e.g. wan2.1-1.3b")


def _refuse_unused_sizes(args: argparse.Namespace, models: list[str]) -> None:
    """Without ``--arch`` only a ``--path`` checkpoint takes a size: the shapes models and the tiny test pipelines
    have theirs fixed, so ``--resolution`` / ``--frames`` would change nothing."""
    sized = bool(args.path) and models[0] not in ("shapes", "shapes_video")
    if args.resolution and not sized:
        raise UserError(f"--resolution {args.resolution} applies only to --arch or a --path checkpoint of "
                        "sd3/flux/wan (the shapes models and the tiny test pipelines have fixed sizes); drop it")
    if args.frames != 1 and not (args.path and models == ["wan"]):
        raise UserError(f"--frames {args.frames} applies only to Wan: --arch with a Wan architecture, or --models wan "
                        "with --path (the shapes_video model and the tiny pipeline have fixed frames); drop it")


def bench_train_memory(argv: Sequence[str]) -> None:
    """Print, per model, the activation memory and time of a training forward + backward without and with
    gradient checkpointing."""
    ap = CommandParser(prog="flowalign bench train-memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None,
                    help=f"comma list of: {', '.join(FAMILIES)} (default shapes,shapes_video; sd3/flux/wan: the tiny "
                    "test pipelines unless --path); not with --arch")
    ap.add_argument("--arch", default="", help="comma list of published architectures to count on the meta device "
                    "instead (no weights needed; takes --batch, --resolution, --frames, --dtype): "
                    + ", ".join(architectures()))
    ap.add_argument("--frames", type=int, default=1, help="Wan video frames (4k + 1; 1 = DanceGRPO's images): for "
                    "the Wan architectures of --arch, or --models wan with --path")
    ap.add_argument("--path", default="", help="a local checkpoint of the (single) --models family, e.g. an SD3.5 "
                    "directory; not with --arch")
    ap.add_argument("--batch", type=int, default=8, help="prompts per training forward (rows = 2 x batch with CFG)")
    ap.add_argument("--resolution", type=int, default=0, help="image side: for --arch (0 = 512) or a --path "
                    "checkpoint of sd3/flux/wan (0 = the adapter's default); the shapes models and the tiny test "
                    "pipelines have fixed sizes")
    ap.add_argument("--device", default=None, help="torch device, e.g. cpu (default), cuda (peak memory is measured "
                    "on CUDA); not with --arch, which counts on the meta device")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="model dtype (default float32; bfloat16 with --arch)")
    ap.add_argument("--repeat", type=int, default=None, help="timed passes per mode after one warm-up (default 3); "
                    "not with --arch, which times nothing")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    from flowalign.bench_snr import add_output_args, check_json_out

    add_output_args(ap)
    args = ap.parse_args(list(argv))
    from flowalign.sample import check_device

    if args.arch:
        _refuse_with_arch(args)
    args.models = "shapes,shapes_video" if args.models is None else args.models
    args.device = "cpu" if args.device is None else args.device
    args.repeat = 3 if args.repeat is None else args.repeat
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in FAMILIES]
    if bad or not models:
        raise UserError(f"--models {args.models!r}: unknown or no model(s) {bad}; choose from {', '.join(FAMILIES)}")
    if args.path and len(models) != 1:
        raise UserError(f"--path {args.path!r} belongs to one model family; pass a single --models, e.g. --models sd3")
    if args.path and not Path(args.path).is_dir():
        raise UserError(f"--path {args.path!r} is not a directory; pass a local checkpoint directory")
    if args.batch < 1 or args.repeat < 1 or args.threads < 1 or args.resolution < 0:
        raise UserError("--batch, --repeat and --threads must be >= 1 and --resolution >= 0")
    if args.frames < 1 or (args.frames - 1) % 4:
        raise UserError(f"--frames {args.frames}: Wan takes 4k + 1 frames (1, 33, 81)")
    if not args.arch:
        _refuse_unused_sizes(args, models)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    check_device(args.device)  # e.g. 'gpu' failed in the model's .to() with torch's list of device types
    check_json_out(args.json, args.overwrite)
    if not args.arch and all(_needs_tiny(m, args.path) for m in models) and not tiny_models_file().is_file():
        # every requested model would be skipped: this printed the table's header and exited 0 (JSON of no models)
        raise UserError(f"--models {args.models!r}: every requested model would be skipped: {', '.join(models)} "
                        f"{'needs' if len(models) == 1 else 'need'} --path or the tiny random pipelines of "
                        f"tests/tiny_models.py, which only a flowalign source checkout has (not found: "
                        f"{tiny_models_file()}); install flowalign from a checkout (`pip install -e .` in it), "
                        f"pass --path with a local checkpoint, or use --models shapes or shapes_video")
    torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if args.arch else "float32")
    dtype = getattr(torch, args.dtype)
    if args.arch:
        _print_architectures(args, dtype)
        return
    out: list[dict[str, Any]] = []
    print(f"train-memory: one training forward (guided velocity, LoRA) + backward, batch {args.batch}, "  # noqa: T201
          f"{args.device}, {args.dtype}; 'kept' = bytes saved for the backward (parameters excluded)")
    print(f"{'model':<14}{'rows':>5}  {'checkpointing':<14}{'kept MiB':>10}{'fwd s':>9}{'bwd s':>9}"  # noqa: T201
          f"{'cuda peak MiB':>15}{'grad max |d|':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for family in models:
            loaded = _load(family, args.path, device=args.device, dtype=dtype, resolution=args.resolution,
                           workdir=Path(tmp), frames=args.frames)
            if loaded is None:
                continue
            model, what = loaded
            model.add_lora()
            rows = measure(model, PROMPTS.get(family, "a red cat on a blue chair"), args.batch, repeat=args.repeat)
            for r in rows:
                print(f"{family:<14}{r['rows_per_forward']:>5}  {'on' if r['checkpointing'] else 'off':<14}"  # noqa: T201
                      f"{_mib(r['saved_bytes']):>10}{r['forward_s']:>9.3f}{r['backward_s']:>9.3f}"
                      f"{_mib(r['cuda_peak_bytes']):>15}{r['grad_max_abs_diff']:>14.2e}")
            off, on = rows
            print(f"{'':<14}kept {off['saved_bytes'] / max(on['saved_bytes'], 1):.1f}x less with checkpointing, "  # noqa: T201
                  f"backward {on['backward_s'] / max(off['backward_s'], 1e-9):.2f}x the time ({what})")
            out.append({"model": family, "weights": what, "batch": args.batch, "rows": rows})
            del model
    if args.json:
        from flowalign.io import atomic_write_json

        atomic_write_json(args.json, {"device": args.device, "dtype": args.dtype, "models": out})
    sys.stdout.flush()
