"""Flow-matching pretraining (used to make the built-in shapes model; generic over model and data).

Objective (rectified flow; Liu et al. 2022, Lipman et al. 2022; SD3 = Esser et al. 2024, Eq. 1–3 and §3.1):

    x_σ = (1 − σ)·x + σ·ε,        L(θ) = E_{x, c, σ, ε} ‖v_θ(x_σ, σ | c) − (ε − x)‖²

with σ drawn logit-normal (σ = sigmoid(m + s·n), n ~ N(0, 1); SD3's "lognorm(m, s)" sampling), captions
replaced by the empty prompt with probability ``caption_dropout`` (so the model learns the unconditional
branch for classifier-free guidance), AdamW with linear warm-up and cosine decay, gradient clipping, and an
exponential moving average (EMA) of the weights — the exported weights are the EMA.

The model only needs what a ``FlowModel`` adapter has plus a few members (a "pretrainable" model):
``components`` (name → ``nn.Module``, as on ``FlowAdapter``; every parameter of every component is trained),
``from_config(dict)`` (class method, fresh weights), ``encode_images(images [B,3,H,W] in [0,1]) -> x``,
``save_pretrained(dir)``, and a ``velocity`` that runs one conditional forward when ``guidance_scale`` is 1.

Data is a *stateless* function of the step: ``batch(step, batch_size) -> (captions, images)``; every random
draw of step k (data, dropout, σ, ε) comes from generators seeded with (seed, k). Resuming from a checkpoint
(model, optimizer, EMA, step, RNG) therefore reproduces the uninterrupted run bit for bit.

Run directory::

    OUT/config.yaml                       the resolved pretraining config
    OUT/metrics.jsonl                     step, loss, lr, seconds (wall time of the run, resumed sessions
                                          included; every ``log_every`` steps)
    OUT/checkpoints/step-N/state.pt       model + optimizer + EMA + RNG + step + seconds (atomic directory rename)
    OUT/final/{model.safetensors,config.json}   the EMA weights (what ships)

(``flowalign report OUT`` adds report.html and plots/; the run stays resumable. ``--resume`` without ``--config``
continues with OUT/config.yaml.)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from flowalign.errors import CommandParser, UserError, first_line

logger = logging.getLogger(__name__)

BatchFn = Callable[[int, int], tuple[list[str], Tensor]]  # (step, batch_size) -> (captions, images [B,3,H,W] in [0,1])
MAX_THREADS = 1024  # the largest `threads` accepted: more would oversubscribe any machine this runs on


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run depends on (one YAML file; CLI flags override single fields)."""

    model: str = "shapes"  # model family in flowalign.models.MODELS; its class has from_config(dict)
    model_config: dict = field(default_factory=dict)  # architecture + sampling defaults for from_config
    data: str = "shapes"  # data source in DATA_SOURCES
    data_config: dict = field(default_factory=dict)  # keyword arguments of the data source
    steps: int = 3000  # optimizer steps
    batch_size: int = 64
    lr: float = 5e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay ends at lr·min_lr_ratio
    warmup: int = 200  # linear warm-up steps
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.99)
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    ema_decay: float = 0.999  # EMA decay (with warm-up min(decay, (1+k)/(10+k)))
    caption_dropout: float = 0.1  # probability of training on the empty prompt (CFG)
    logit_mean: float = 0.0  # σ = sigmoid(logit_mean + logit_std·n)
    logit_std: float = 1.0
    uniform_fraction: float = 0.0  # share of each batch with σ ~ U(0, 1) instead (covers σ → 1, where layout is decided)
    seed: int = 0
    checkpoint_every: int = 500  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    log_every: int = 25
    threads: int = 0  # torch.set_num_threads for the run (0 = leave as is)
    init_from: str = ""  # model directory (e.g. an earlier run's final/) whose weights start this run ("" = fresh init)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PretrainConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        for k, v in d.items():
            if k not in known:
                import difflib

                close = difflib.get_close_matches(k, list(known), n=1)
                raise UserError(f"unknown pretrain config key {k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            default = known[k].default
            if known[k].default_factory is dict and not isinstance(v, dict):
                raise UserError(f"pretrain config {k!r}: expected a mapping of options (key: value lines), got {v!r}")
            try:
                if isinstance(default, bool):
                    v = bool(v)
                elif isinstance(default, int):
                    if isinstance(v, float) and not v.is_integer():
                        raise ValueError(v)
                    v = int(v)
                elif isinstance(default, float):
                    v = float(v)  # PyYAML reads 5e-4 as a string
                elif isinstance(default, tuple):
                    v = tuple(float(x) for x in v)
            except (TypeError, ValueError):
                raise UserError(f"pretrain config {k!r}: expected {type(default).__name__}, got {v!r}") from None
            out[k] = v
        cfg = cls(**out)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """One-line ``UserError`` for a value no run can use (a run of 0 steps would write an untrained final/)."""
        rules = [("steps", self.steps >= 1, "at least 1"), ("batch_size", self.batch_size >= 1, "at least 1"),
                 ("seed", 0 <= self.seed < 2**64, "in [0, 2**64)"),  # torch.manual_seed takes 64 bits
                 ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
                 ("lr", self.lr >= 0, ">= 0"), ("warmup", self.warmup >= 0, ">= 0"),
                 ("min_lr_ratio", self.min_lr_ratio >= 0, ">= 0"), ("grad_clip", self.grad_clip >= 0, ">= 0"),
                 ("ema_decay", 0 <= self.ema_decay <= 1, "in [0, 1]"),
                 ("caption_dropout", 0 <= self.caption_dropout <= 1, "in [0, 1]"),
                 ("uniform_fraction", 0 <= self.uniform_fraction <= 1, "in [0, 1]"),
                 ("checkpoint_every", self.checkpoint_every >= 0, ">= 0 (0 = only at the end)"),
                 ("keep_checkpoints", self.keep_checkpoints >= 1, "at least 1"),
                 ("log_every", self.log_every >= 1, "at least 1"),
                 # torch.set_num_threads overflows at 2**31 (a traceback) and below that would spawn a pool no machine has
                 ("threads", 0 <= self.threads <= MAX_THREADS, f"in [0, {MAX_THREADS}] (0 = as is)")]
        # NaN/inf pass the range checks above (or have none) and train a NaN or degenerate model for the whole run
        rules = [(f.name, math.isfinite(getattr(self, f.name)), "a finite number") for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), float)] + rules
        flags = {"steps", "batch_size", "lr", "seed", "threads"}  # also settable on the command line
        for name, ok, want in rules:
            if not ok:
                where = f"--{name.replace('_', '-')} or {name}: in the config" if name in flags else f"{name}: in the config"
                raise UserError(f"pretrain {name} must be {want}, got {getattr(self, name)!r}; fix {where}")


# ------------------------------------------------------------------------------------------------ data


def _task_mix(task_weights: Optional[dict[str, float]], tasks: Sequence[str], world: str):
    """(task names, their probabilities as a numpy array) from ``data_config.task_weights`` (default uniform);
    one-line ``UserError`` for unknown tasks or weights that are not numbers >= 0 with a positive sum."""
    import numpy as np

    if task_weights is not None and not isinstance(task_weights, dict):
        raise UserError(f"data_config.task_weights must map task names to weights (e.g. {tasks[0]}: 2.0), "
                        f"got {task_weights!r}")
    weights = dict(task_weights or {t: 1.0 for t in tasks})
    bad = sorted(set(weights) - set(tasks))
    if bad:
        raise UserError(f"unknown {world} task(s) {bad} in task_weights (tasks: {', '.join(tasks)})")
    names = list(weights)
    try:
        p = np.asarray([float(weights[t]) for t in names])
    except (TypeError, ValueError):
        p = np.asarray([np.nan])
    if not (np.all(np.isfinite(p)) and np.all(p >= 0) and p.sum() > 0):
        raise UserError(f"data_config.task_weights must be numbers >= 0 with a positive sum, got {weights}")
    return names, p / p.sum()


def shapes_data(task_weights: Optional[dict[str, float]] = None, image_size: int = 32, seed: int = 0) -> BatchFn:
    """Infinite (caption, image) stream from the shapes world: sample a spec, render a scene that satisfies it.

    ``task_weights`` sets the task mix (default uniform over the grammar's tasks); image k of step t uses
    ``numpy.random.default_rng((seed, t, k))``, so a batch depends only on (seed, step).
    Rendering costs ~0.2 ms per 32×32 image, negligible next to a training step.
    """
    import numpy as np

    from flowalign.shapes.grammar import TASKS, sample_spec, to_prompt
    from flowalign.shapes.render import render

    if not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"data_config.image_size must be a positive integer, got {image_size!r}")
    names, p = _task_mix(task_weights, TASKS, "shapes")

    def batch(step: int, batch_size: int) -> tuple[list[str], Tensor]:
        caps, imgs = [], np.empty((batch_size, image_size, image_size, 3), dtype=np.float32)
        for k in range(batch_size):
            rng = np.random.default_rng((seed, step, k))
            spec = sample_spec(rng, names[int(rng.choice(len(names), p=p))])
            caps.append(to_prompt(spec))
            imgs[k] = render(spec, image_size, rng)
        return caps, torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()  # [B, 3, H, W]

    return batch


def shapes_motion_data(task_weights: Optional[dict[str, float]] = None, image_size: int = 32, frames: int = 8,
                       seed: int = 0) -> BatchFn:
    """Infinite (caption, video [F, 3, H, W]) stream from the shapes world in motion (SHAPES_WORLD.md §6): a motion
    spec drawn uniformly from the task chosen by ``task_weights`` (default uniform), rendered by
    :func:`flowalign.shapes.motion.render_motion`. Video k of step t uses ``default_rng((seed, t, k))``.
    ``frames`` must be at least ``shapes.motion.MIN_FRAMES`` (5), the fewest the motion verifier can judge."""
    import numpy as np

    from flowalign.shapes.motion import TASKS, check_frames, enumerate_specs, render_motion, to_prompt

    check_frames(frames, "data_config.frames")  # shorter clips would fail the motion reward they are rendered for
    if not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"data_config.image_size must be a positive integer, got {image_size!r}")
    names, p = _task_mix(task_weights, TASKS, "shapes motion")
    specs = {t: enumerate_specs(t) for t in names}

    def batch(step: int, batch_size: int) -> tuple[list[str], Tensor]:
        caps, vids = [], np.empty((batch_size, frames, image_size, image_size, 3), dtype=np.float32)
        for k in range(batch_size):
            rng = np.random.default_rng((seed, step, k))
            pool = specs[names[int(rng.choice(len(names), p=p))]]
            spec = pool[int(rng.integers(len(pool)))]
            caps.append(to_prompt(spec))
            vids[k] = render_motion(spec, frames, image_size, rng)
        return caps, torch.from_numpy(vids).permute(0, 1, 4, 2, 3).contiguous()  # [B, F, 3, H, W]

    return batch


DATA_SOURCES: dict[str, Callable[..., BatchFn]] = {
    "shapes": shapes_data,
    "shapes_motion": shapes_motion_data,
}

# what each data source gives, as a model's ``output_kind`` names it: "image" [B,3,H,W] or "video" [B,F,3,H,W]
DATA_KINDS: dict[str, str] = {
    "shapes": "image",
    "shapes_motion": "video",
}


def _check_data_kind(cfg: PretrainConfig) -> None:
    """One-line ``UserError`` before the model is built when the model's ``output_kind`` (class attribute) is not what
    the registered data source gives (a video model on images failed with a traceback in ``encode_images``)."""
    from flowalign.models import resolve

    model_kind = getattr(resolve(cfg.model), "output_kind", "image")
    data_kind = DATA_KINDS.get(cfg.data)
    if data_kind is None or data_kind == model_kind:
        return
    fits = [name for name, kind in DATA_KINDS.items() if kind == model_kind]
    fix = f"set data: {fits[0]}" if fits else f"use a model that takes {data_kind}s"
    raise UserError(f"model {cfg.model} takes {model_kind}s but data {cfg.data!r} gives {data_kind}s; {fix}")


# ------------------------------------------------------------------------------------------------ math


def logit_normal_sigmas(n: int, mean: float, std: float, generator: torch.Generator,
                        uniform_fraction: float = 0.0) -> Tensor:
    """σ = sigmoid(m + s·n), n ~ N(0, 1) (SD3 §3.1 "logit-normal sampling"), mixed with U(0, 1).

    Each draw is uniform with probability ``uniform_fraction``. Logit-normal(0, 1) almost never draws
    σ > 0.95 (0.16%), yet for sparse pixel-space scenes that is where the layout is decided; without the
    uniform share the first sampling steps run on an untrained region (measured: objects break into
    patch-aligned blocks).
    """
    ln = torch.sigmoid(mean + std * torch.randn(n, generator=generator))  # [B]
    u = torch.rand(n, generator=generator)  # [B]
    pick = torch.rand(n, generator=generator) < uniform_fraction  # [B]
    return torch.where(pick, u, ln)


def flow_matching_loss(v_pred: Tensor, x: Tensor, eps: Tensor) -> Tensor:
    """Rectified-flow regression onto the velocity target ε − x (per-element mean of the squared error)."""
    return (v_pred.float() - (eps - x).float()).pow(2).mean()


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up: min(decay, (1 + k)/(10 + k)) after k updates, so early averages are not stuck at init."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: Sequence[Tensor], params: Sequence[Tensor], decay: float) -> None:
    """In place: ema ← decay·ema + (1 − decay)·θ."""
    torch._foreach_lerp_(list(ema), [p.detach() for p in params], 1.0 - decay)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``lr·min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of every torch draw of one step (dropout, σ, ε): a pure function of (seed, step)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 7919 + 17) % (2**63 - 1))


# ------------------------------------------------------------------------------------------ checkpoints


def _checkpoints(out: Path) -> list[Path]:
    d = out / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir()  # not a copy such as step-250.bak
             if p.name.startswith("step-") and p.name[5:].isdigit() and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def components(model: Any) -> dict[str, nn.Module]:
    """The trained modules of a pretrainable model (``model.components``; a bare nn.Module is its own component)."""
    comps = getattr(model, "components", None)
    if comps is None and isinstance(model, nn.Module):
        comps = {"model": model}
    if not comps:
        raise UserError(f"{type(model).__name__} has no trainable components")
    return dict(comps)


def save_checkpoint(out: Path, step: int, model: Any, opt: torch.optim.Optimizer, ema: Sequence[Tensor],
                    cfg: PretrainConfig, keep: int, log_acc: tuple[float, int] = (0.0, 0), seconds: float = 0.0) -> Path:
    """Write ``checkpoints/step-N/state.pt`` atomically (temp directory + rename); prune old ones.

    ``log_acc`` = (loss sum, steps) of the metrics window still open at ``step`` (a checkpoint between two log rows),
    so that a resumed run logs the same mean loss as the uninterrupted one; ``seconds`` = the run's wall time so far,
    from which a resumed run's metrics ``seconds`` go on."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save({"step": step, "model": {k: m.state_dict() for k, m in components(model).items()}, "optimizer": opt.state_dict(),
                "ema": [t.clone() for t in ema], "rng": torch.get_rng_state(), "config": dataclasses.asdict(cfg),
                "log_acc": [float(log_acc[0]), int(log_acc[1])], "seconds": float(seconds)},
               tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


# fields a resumed run may change: where and how often it writes, and the threads; every other field decides the
# weights (``steps`` too: the cosine schedule ends at ``steps``), so an exact resume needs it unchanged
RESUMABLE_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every", "threads")


def _check_resume_config(cfg: PretrainConfig, saved: Optional[dict[str, Any]], ckpt: Path) -> None:
    """One line, before anything is written, when ``--resume`` would continue a checkpoint with other settings."""
    if saved is None:  # a checkpoint written before configs were stored
        return
    new = _plain(dataclasses.asdict(cfg))
    diff = [f"{k} ({_plain(saved.get(k))!r} → {new.get(k)!r})" for k in new
            if k not in RESUMABLE_FIELDS and k in saved and _plain(saved[k]) != new[k]]
    if diff:
        raise UserError(f"cannot resume {ckpt} with changed settings: {', '.join(diff)}; resume with the run's "
                        "config.yaml and flags, or choose a new --out")


def _seconds_at(state: dict[str, Any], metrics: Path, step: int) -> float:
    """The run's wall time at the checkpoint ``state`` of ``step``; for a checkpoint written before it was stored,
    the ``seconds`` of the last metrics row up to ``step`` (0 without one)."""
    saved = state.get("seconds")
    if isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved) and saved >= 0:
        return float(saved)
    best = 0.0
    try:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
    except (OSError, ValueError):
        lines = []
    for line in lines:
        try:
            rec = json.loads(line)
            if int(rec["step"]) <= step and math.isfinite(float(rec["seconds"])):
                best = max(best, float(rec["seconds"]))
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill, or without seconds
            continue
    return best


def _drop_metrics_after(path: Path, step: int) -> None:
    """Keep only the metric rows up to ``step``: a run killed after its last checkpoint logged rows that the
    resumed run logs again (and a fresh run in the same directory starts the log over)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut short by the kill
            continue
    _atomic_text(path, "".join(keep))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- training


def build_model(cfg: PretrainConfig) -> Any:
    from flowalign.models import resolve

    cls = resolve(cfg.model)
    if not hasattr(cls, "from_config"):
        raise UserError(f"model family {cfg.model!r} cannot be pretrained here (its class has no from_config)")
    try:
        return cls.from_config(dict(cfg.model_config))
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError, AssertionError) as err:  # e.g. head_dim: -3
        first = first_line(err, 200)
        raise UserError(f"model_config does not make a {cfg.model} model ({first}); fix model_config in the "
                        f"config") from None


def _check_forward(model: Any, data: BatchFn, cfg: PretrainConfig) -> None:
    """One forward on one training image before the run directory is written: an architecture whose output does not
    match its input (e.g. model_config.image_size not a multiple of patch_size) fails here in one line, not in the
    first training step after config.yaml and metrics.jsonl were written. The RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        captions, images = data(0, 1)
        x = model.encode_images(images)
        try:
            v = model.velocity(x, torch.full((x.shape[0],), 0.5, device=x.device), model.encode(list(captions)))
        except (RuntimeError, ValueError, TypeError) as err:
            first = first_line(err, 200)
            raise UserError(f"model_config of model {cfg.model!r} cannot run on the data ({first}); fix "
                            f"model_config in the config") from None
    if tuple(v.shape) != tuple(x.shape):
        raise UserError(f"model_config of model {cfg.model!r} maps inputs {list(x.shape[1:])} to outputs "
                        f"{list(v.shape[1:])} (is image_size a multiple of patch_size?); fix model_config in the config")


def _data_sizes(cfg: PretrainConfig) -> dict[str, Any]:
    """The registered data source's settings other than the seed and task mix, defaults filled in."""
    params = inspect.signature(DATA_SOURCES[cfg.data]).parameters
    out = {k: p.default for k, p in params.items() if k not in ("seed", "task_weights")}
    out.update({k: v for k, v in cfg.data_config.items() if k in out})
    return out


def _size_fix(data: dict[str, Any], arch: dict[str, Any]) -> str:
    """How to fix a data/model size mismatch: the settings the data source and the model's config share (e.g.
    ``frames``, ``image_size``) whose values differ; the data source's size keys if none do."""
    keys = [k for k in data if k in arch and arch[k] != data[k]] or [k for k in ("frames", "image_size") if k in data]
    return "make " + " and ".join(f"data_config.{k} ({data[k]!r}) match model_config.{k}"
                                  + (f" ({arch[k]!r})" if k in arch else "") for k in keys)


def init_weights_from(model: Any, model_dir: str | os.PathLike) -> None:
    """Copy the weights of a saved model directory (same family and architecture) into ``model``.

    Used for staged recipes: a second stage starts from the first stage's ``final/`` with its own learning-rate
    schedule and data mix. A different architecture fails with one line naming the directory.
    """
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise UserError(f"init_from {str(d)!r} is not a model directory (no config.json); point it at a run's final/")
    src = type(model).from_pretrained(str(d))
    src_comps = components(src)
    for k, m in components(model).items():
        try:
            m.load_state_dict(src_comps[k].state_dict())
        except (KeyError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"init_from {str(d)!r} does not match the configured architecture ({k}: {first})") from None
    logger.info("initialised the weights from %s", d)


def pretrain(cfg: PretrainConfig, out: str | os.PathLike, *, resume: bool = False, data: Optional[BatchFn] = None,
             progress: bool = True, stop_after: Optional[int] = None) -> Any:
    """Pretrain a fresh model (or resume the newest checkpoint in ``out``); returns the EMA model.

    ``data`` overrides the registered data source (tests pass a tiny synthetic one); ``stop_after`` ends the
    run early after that many total steps, as if killed right after the checkpoint at that step (tests).
    ``cfg.threads`` applies to this run only: the caller's torch thread count is restored on return or error.
    """
    previous = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(cfg, Path(out), resume=resume, data=data, progress=progress, stop_after=stop_after)
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _pretrain(cfg: PretrainConfig, out: Path, *, resume: bool, data: Optional[BatchFn], progress: bool,
              stop_after: Optional[int]) -> Any:
    for up in (out, *out.parents):  # the nearest existing ancestor: a file there fails only at mkdir, after the model is built
        if up.exists():
            if not up.is_dir():
                raise UserError(f"run directory {str(out)!r} cannot be made: {str(up)!r} is a file")
            break
    sizes: dict[str, Any] = {}  # the registered data source's settings (none for data passed in)
    if data is None:  # a bad data_config (e.g. data_config.frames: 3) fails here, before the model is built
        if cfg.data not in DATA_SOURCES:
            raise UserError(f"unknown data source {cfg.data!r} (known: {', '.join(DATA_SOURCES)})")
        known = set(inspect.signature(DATA_SOURCES[cfg.data]).parameters) - {"seed"}
        bad = sorted(set(cfg.data_config) - known)
        if bad:
            raise UserError(f"unknown data_config key(s) {bad} for data source {cfg.data!r} (known: {', '.join(sorted(known))}; "
                            "the seed is the top-level seed)")
        _check_data_kind(cfg)
        data = DATA_SOURCES[cfg.data](**dict(cfg.data_config), seed=cfg.seed)
        sizes = _data_sizes(cfg)
        if any(k in cfg.model_config and cfg.model_config[k] != v for k, v in sizes.items()):
            raise UserError(f"the data does not fit model {cfg.model!r}: {_size_fix(sizes, dict(cfg.model_config))}")
    torch.manual_seed(cfg.seed)  # the initial weights are a function of the seed
    model = build_model(cfg)
    comps = components(model)
    ckpts = _checkpoints(out) if resume else []
    if cfg.init_from and not ckpts:  # also on --resume before the first checkpoint: that run started from init_from
        init_weights_from(model, cfg.init_from)
    for m in comps.values():
        m.train().requires_grad_(True)
    guidance = getattr(model, "guidance_scale", 1.0)
    model.guidance_scale = 1.0  # training = one conditional (or dropped-caption) forward
    # a data/model size mismatch would otherwise fail inside the first forward, after the run directory is written
    with torch.no_grad():
        sample = data(0, 1)[1]
        try:
            got = tuple(model.encode_images(sample).shape[1:])
        except (ValueError, RuntimeError) as err:  # data passed in: e.g. images for a video model
            raise UserError(f"model {cfg.model!r} cannot encode the data (shape {list(sample.shape[1:])}: "
                            f"{first_line(err, 200)}); give it data of its kind ({getattr(model, 'output_kind', 'image')}s)"
                            ) from None
        want = tuple(model.init_noise(1, torch.Generator().manual_seed(0)).shape[1:])
    if got != want:
        raise UserError(f"the data's images encode to {list(got)} but model {cfg.model!r} works on {list(want)}; "
                        + (_size_fix(sizes, dict(getattr(getattr(model, "config", None), "__dict__", {})))
                           if sizes else "make the data's size match model_config"))
    _check_forward(model, data, cfg)
    params = [p for m in comps.values() for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # biases, norms, positional tables stay undecayed
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))
    ema = [p.detach().clone() for p in params]
    start, log_acc, seconds = 0, (0.0, 0), 0.0
    if resume:
        if ckpts:
            try:
                state = torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=False)
                if not isinstance(state, dict) or not {"model", "optimizer", "ema", "rng", "step"} <= set(state):
                    raise ValueError("not a pretraining checkpoint")
            except Exception as err:  # truncated / overwritten file: torch raises pickle, zip, EOF, ... errors
                raise _unreadable_checkpoint(out, ckpts[-1], first_line(err, 200)) from None
            _check_resume_config(cfg, state.get("config"), ckpts[-1])
            for k, m in comps.items():
                m.load_state_dict(state["model"][k])
            opt.load_state_dict(state["optimizer"])
            for e, s in zip(ema, state["ema"]):
                e.copy_(s)
            torch.set_rng_state(state["rng"])
            start = int(state["step"])
            log_acc = tuple(state.get("log_acc", (0.0, 0)))  # the open metrics window (older checkpoints: none)
            seconds = _seconds_at(state, out / "metrics.jsonl", start)  # metrics' seconds go on from here
            logger.info("resumed from %s (step %d)", ckpts[-1], start)
        else:
            logger.info("--resume: no checkpoint in %s, starting fresh", out)
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    _drop_metrics_after(out / "metrics.jsonl", start)
    _atomic_text(out / "config.yaml", yaml.safe_dump(_plain(dataclasses.asdict(cfg)), sort_keys=False))
    n_params = sum(p.numel() for p in params)
    logger.info("pretraining %s (%.2fM params) for %d steps, batch %d, threads %d", cfg.model, n_params / 1e6,
                cfg.steps, cfg.batch_size, torch.get_num_threads())

    from tqdm.auto import tqdm

    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="pretrain", unit="step", dynamic_ncols=True)
    metrics = (out / "metrics.jsonl").open("a")
    t0, (loss_acc, n_acc) = time.time() - seconds, (float(log_acc[0]), int(log_acc[1]))  # t0: as if never stopped
    try:
        for step in range(start, end):
            loss = train_step(model, opt, data, step, cfg)
            ema_update(ema, params, ema_decay_at(step, cfg.ema_decay))
            loss_acc, n_acc = loss_acc + loss, n_acc + 1
            bar.update(1)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                rec = {"step": done, "loss": loss_acc / n_acc, "lr": lr_at(step, cfg), "seconds": time.time() - t0}
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
                loss_acc, n_acc = 0.0, 0
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == end:
                save_checkpoint(out, done, model, opt, ema, cfg, cfg.keep_checkpoints, (loss_acc, n_acc),
                                time.time() - t0)
    finally:
        bar.close()
        metrics.close()
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    for m in comps.values():
        m.eval().requires_grad_(False)
    if end == cfg.steps:
        model.guidance_scale = guidance
        model.save_pretrained(out / "final")
        logger.info("wrote the EMA model to %s (%.1f s)", out / "final", time.time() - t0)
    return model


def ema_model_from_checkpoint(checkpoint: str | os.PathLike) -> Any:
    """The EMA model stored in ``checkpoints/step-N`` (or its ``state.pt``), in eval mode (e.g. to export it)."""
    path = Path(checkpoint)
    path = path / "state.pt" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"no pretraining checkpoint at {str(path)!r}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = PretrainConfig.from_dict(state["config"])
    model = build_model(cfg)
    comps = components(model)
    for k, m in comps.items():
        m.load_state_dict(state["model"][k])
    params = [p for m in comps.values() for p in m.parameters()]
    with torch.no_grad():
        for p, e in zip(params, state["ema"]):
            p.copy_(e)
    for m in comps.values():
        m.eval().requires_grad_(False)
    return model


def train_step(model: Any, opt: torch.optim.Optimizer, data: BatchFn, step: int, cfg: PretrainConfig) -> float:
    """One optimizer step of the rectified-flow objective; every random draw comes from (seed, step)."""
    g = step_generator(cfg.seed, step)
    captions, images = data(step, cfg.batch_size)
    drop = torch.rand(len(captions), generator=g) < cfg.caption_dropout  # [B]
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    x = model.encode_images(images)  # [B, C, H, W] data
    sigma = logit_normal_sigmas(x.shape[0], cfg.logit_mean, cfg.logit_std, g, cfg.uniform_fraction).to(x.device)  # [B]
    eps = torch.randn(x.shape, generator=g).to(x.device, x.dtype)  # [B, C, H, W]
    s = sigma.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    x_sigma = (1 - s) * x + s * eps  # [B, C, H, W]
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    v = model.velocity(x_sigma, sigma, model.encode(captions))  # [B, C, H, W]
    loss = flow_matching_loss(v, x, eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], cfg.grad_clip)
    opt.step()
    return float(loss.detach())


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------- CLI


def load_config(path: Optional[str], overrides: dict[str, Any]) -> PretrainConfig:
    d: dict[str, Any] = {}
    if path:
        from flowalign.config import read_yaml_file

        d = read_yaml_file(path, "pretrain config") or {}
        if not isinstance(d, dict):
            raise UserError(f"pretrain config {path!r} must be a mapping of PretrainConfig fields (steps: ..., lr: ...), "
                            f"got {type(d).__name__}")
    d.update({k: v for k, v in overrides.items() if v is not None})
    return PretrainConfig.from_dict(d)


# what a pretraining run writes in --out, and what `flowalign report` adds to it (report.html, plots/)
RUN_ENTRIES = {"config.yaml", "metrics.jsonl", "checkpoints", "final", "report.html", "plots"}

# what `flowalign train` writes into checkpoints/step-N/ beside its state.pt (flowalign.train._save_checkpoint: the
# COMPLETE marker, meta.json, the LoRA and raw/); a pretraining checkpoint holds state.pt alone
TRAIN_CHECKPOINT_ENTRIES = ("COMPLETE", "meta.json", "raw", "pytorch_lora_weights.safetensors")


def _saved_config(out: Path) -> Any:
    """``out/config.yaml`` as YAML data; None when it is missing, empty or unreadable."""
    import yaml

    try:
        return yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _is_pretrain_config(saved: Any) -> bool:
    return isinstance(saved, dict) and bool(saved) and set(saved) <= {f.name for f in dataclasses.fields(PretrainConfig)}


def holds_training_run(out: Path) -> bool:
    """Whether the directory ``out`` holds a ``flowalign train`` run: a config.yaml of the trainer's sections (a
    ``model:`` mapping, ``sampler:``, ``train:`` ...) or a checkpoint with what the trainer writes beside state.pt."""
    from flowalign.config import ExperimentConfig

    saved = _saved_config(out)
    if isinstance(saved, dict) and saved and set(saved) <= {f.name for f in dataclasses.fields(ExperimentConfig)}:
        pretrain_fields = {f.name for f in dataclasses.fields(PretrainConfig)}
        if set(saved) - pretrain_fields or isinstance(saved.get("model"), dict):  # pretrain's model is a name
            return True
    ckpts = out / "checkpoints"
    return ckpts.is_dir() and any((p / name).exists() for p in ckpts.glob("step-*") if p.is_dir()
                                  for name in TRAIN_CHECKPOINT_ENTRIES)


def _training_run_error(out: Path) -> UserError:
    return UserError(f"{str(out)!r} holds a training run (flowalign train), not a pretraining run; choose a new --out")


def _refuse_training_run(out: Path) -> None:
    if out.is_dir() and holds_training_run(out):
        raise _training_run_error(out)


def _unreadable_checkpoint(out: Path, ckpt: Path, why: str) -> UserError:
    """The error for a checkpoint ``--resume`` cannot load. Deleting it is advised only in a pretraining run (a
    config.yaml of PretrainConfig fields, or none, and checkpoints as pretrain writes them), never in another's."""
    if holds_training_run(out):
        return _training_run_error(out)
    saved = _saved_config(out)
    if _is_pretrain_config(saved) or (saved is None and not (out / "config.yaml").exists()):
        return UserError(f"cannot read checkpoint {ckpt / 'state.pt'} ({why}); delete {ckpt} to resume from an "
                         f"earlier checkpoint, or choose a new --out")
    return UserError(f"cannot read checkpoint {ckpt / 'state.pt'} ({why}) and {str(out)!r} holds no pretraining run "
                     f"(its config.yaml is not a pretrain config); choose a new --out")


def is_pretrain_run(out: Path) -> bool:
    """Whether the directory ``out`` holds (the start of) a pretraining run: only what ``pretrain`` writes there
    (hidden files aside: its temporary files), no training run, and a ``config.yaml`` of ``PretrainConfig`` fields
    or (that file missing or unreadable) a checkpoint."""
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    if not names <= RUN_ENTRIES or holds_training_run(out):
        return False
    saved = _saved_config(out)
    return _is_pretrain_config(saved) or (saved is None and bool(_checkpoints(out)))


def check_run_dir(out: Path, resume: bool) -> None:
    """The ``--out`` of ``flowalign pretrain``, checked before anything is built: new or empty, or (with ``resume``)
    a pretraining run to continue; never another command's directory, a finished run or one whose checkpoints a
    fresh run would overwrite; and writable. A one-line ``UserError`` otherwise."""
    from flowalign.io import check_out_parent

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; pass a run directory (new, or one to --resume)")
    _refuse_training_run(out)
    if not out.is_dir() or not any(out.iterdir()):
        check_out_parent(out)
        return
    if not is_pretrain_run(out):
        raise UserError(f"--out {str(out)!r} is not empty and holds no pretraining run; choose a new or empty --out")
    if not resume and _checkpoints(out):
        raise UserError(f"{str(out)!r} already holds checkpoints; pass --resume to continue or choose a new --out")
    if (out / "final").exists() and not _checkpoints(out):  # its checkpoints were deleted
        raise UserError(f"{str(out)!r} holds a finished run (final/) and no checkpoint to resume; choose a new --out")
    if not resume:  # a run stopped before its first checkpoint: --resume starts it over
        raise UserError(f"{str(out)!r} holds a pretraining run without a checkpoint; pass --resume to start it over "
                        f"there, or choose a new --out")
    check_out_parent(out)


# the two stages of the shipped shapes model, as the Makefile's `shapes-base` target runs them
SHIPPED_STAGES = ("configs/shapes_pretrain.yaml", "configs/shapes_pretrain_stage2.yaml")


def _default_recipe() -> str:
    d = PretrainConfig()
    return (f"{d.steps} steps, batch {d.batch_size}, lr {d.lr:g}, warm-up {d.warmup}, the {d.model} model's default "
            f"architecture and data")


def cli_main(argv: Sequence[str]) -> int:
    ap = CommandParser(prog="flowalign pretrain", description="Flow-matching pretraining (rectified flow, "
                                 "logit-normal σ, caption dropout, EMA); writes OUT/final/ with the EMA weights.")
    ap.add_argument("--config", default=None, help="YAML file of PretrainConfig fields (e.g. configs/shapes_pretrain.yaml); "
                    "with --resume and no --config, the run's own --out/config.yaml. Without it (and without a run to "
                    f"--resume) a default recipe runs: {_default_recipe()}; it is neither shipped stage (`make "
                    f"shapes-base` runs {SHIPPED_STAGES[0]}, then {SHIPPED_STAGES[1]})")
    ap.add_argument("--out", required=True, help="run directory (checkpoints, metrics, final/): new or empty, or a run "
                                                 "to --resume")
    ap.add_argument("--steps", type=int, default=None, help="override the config's optimizer steps")
    ap.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    ap.add_argument("--lr", type=float, default=None, help="override the config's peak learning rate")
    ap.add_argument("--seed", type=int, default=None, help="override the config's seed (data, noise and initial weights)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for this run (the config default applies)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out (same "
                    "--config and flags as before, or none: the run's saved config.yaml); with no checkpoint "
                    "there yet, start fresh")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(list(argv))
    out = Path(args.out)
    _refuse_training_run(out)  # before any other message: its checkpoints are no pretraining run's to resume or delete
    config = args.config
    if config is None and args.resume and (out / "config.yaml").is_file():
        # --resume alone continues the run with its own settings (the resolved config it saved, flags included)
        check_run_dir(out, args.resume)
        config = str(out / "config.yaml")
    cfg = load_config(config, {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                               "seed": args.seed, "threads": args.threads})
    check_run_dir(out, args.resume)
    if config is None:
        logger.info("no --config: pretraining the default recipe (steps %d, batch %d, lr %g), neither shipped "
                       "stage; the shipped model's are --config %s, then %s (make shapes-base)", cfg.steps,
                       cfg.batch_size, cfg.lr, *SHIPPED_STAGES)
    pretrain(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    return 0
