"""The GRPO recipe, read top to bottom (DESIGN.md §1, METHODS.md §3).

    0. setup        run directory, resolved config, seeds, ranks
    1. model        adapter + LoRA + AdamW + EMA
    2. rewards      the weighted reward components
    3. data         prompt sampler (rank-local whole groups)
    4. resume       LoRA, optimizer, EMA, sampler state from the last good checkpoint
    5. base eval    shapes-bench (or the configured set) before training, and the "before" grid
    per iteration:
      6. rollout    groups → CFG rollouts with the chosen kernel and per-step noise
      7. rewards    decode → each reward component [B]
      8. credit     the registered credit assigner → advantages [B, T] (+ weights)
      9. update     train.objective: grpo re-scores stored transitions with grad → clipped surrogate + KL;
                    nft (DiffusionNFT) fits the final samples by negative-aware flow matching → AdamW (NaN guard)
                    at this iteration's learning rate (train.lr × the train.lr_schedule factor)
     10. log        metrics.jsonl, TensorBoard, progress bar, periodic eval, checkpoints
    11. final       eval with the EMA weights, the "after" grid, report.html

Every method is a choice of kernel, noise schedule, credit assigner (and probes) and update rule (``UPDATES``):
the loop does not change.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import shutil
import time
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from flowalign import config as C
from flowalign import data as D
from flowalign.dist import once_on_rank0, process_device, process_group
from flowalign.credit import CreditInput, assign_credit, clipped_heads, terminal_advantage, zero_std_ratio
from flowalign.errors import CommandParser, UserError
from flowalign.evaluate import find_protocol, run_eval
from flowalign.sample import check_out_parent, guidance
from flowalign.io import append_jsonl, atomic_dir, atomic_save, atomic_write_bytes, atomic_write_text
from flowalign.report import benchmark_line, eval_mismatch, read_summary
from flowalign.loss import (LR_SCHEDULES, NFT_NOISE, NFT_OPTIMALITY, SURROGATES, gaussian_kl, nft_loss, ratio_stats,
                            velocity_kl)
from flowalign.models import load_model
from flowalign.rewards.catalog import build_reward_checked
from flowalign.samplers import eta_schedule, gather_cond, live_eta, step_log_prob
from flowalign.samplers.kernels import get_kernel
from flowalign.samplers.loop import Generators, draw_rows, mix_seed
from flowalign.samplers.plans import PLANS
from flowalign.types import option_value_error
from flowalign.values import GUIDES, NFECounter, first_equal, make_probe

logger = logging.getLogger(__name__)


# The per-rank streams of an iteration: (seed, it, rank, tag) seeds the SDE step noise (11), the random trained-step
# choice (17) and NFT's update draws (13). Those 4-part keys have the form of a rollout's initial-noise key
# (seed, it, group, member), so a member whose index is a tag (groups of 12 or more) takes a 5-part key; before this
# rule (and the window key's own tag) such a member's x_1 repeated the first draws of a rank's step noise.
RANK_STREAMS = {"step_noise": 11, "update": 13, "trained_steps": 17}


def rank_stream_seed(seed: int, it: int, rank: int, stream: str) -> int:
    """The seed of rank ``rank``'s stream ``stream`` (a key of ``RANK_STREAMS``) in iteration ``it``."""
    return mix_seed(seed, it, rank, RANK_STREAMS[stream])


def group_stream_seed(seed: int, it: int, group: int, stream: str) -> int:
    """The seed of global group ``group``'s stream ``stream`` (a key of ``RANK_STREAMS``) in iteration ``it``, for
    ``sampler.step_noise=group`` (a 5-part key of its own, like the window's)."""
    return mix_seed(seed, it, group, RANK_STREAMS[stream], 3)


def rank_streams(seed: int, it: int, rank: int, positions: Sequence[int], stream: str, device: Any = "cpu"
                 ) -> torch.Generator:
    """``sampler.step_noise=rank``: one generator per process, seeded by (seed, iteration, rank, stream). A rollout's
    SDE noise depends on which groups share its process, so runs depend on the number of processes."""
    return torch.Generator(device=device).manual_seed(rank_stream_seed(seed, it, rank, stream))


def group_streams(seed: int, it: int, rank: int, positions: Sequence[int], stream: str, device: Any = "cpu"
                  ) -> list[torch.Generator]:
    """``sampler.step_noise=group``: one generator per global prompt group ``positions``, seeded by (seed, iteration,
    group, stream); the samplers (``samplers.loop.draw_rows``) and NFT's update (``nft_row_draws``) draw each group's
    rows from its own, so rollouts and NFT's draws do not depend on the number of processes."""
    return [torch.Generator(device=device).manual_seed(group_stream_seed(seed, it, g, stream)) for g in positions]


# sampler.step_noise → (seed, it, rank, positions, stream, device) -> the generator(s) of the step noise, the random
# trained-step choice and NFT's update draws
STEP_NOISE = {"rank": rank_streams, "group": group_streams}


def init_noise_seed(seed: int, it: int, group: int, member: int) -> int:
    """The seed of the initial noise x_1 of ``member`` of global group ``group`` in iteration ``it``."""
    if member in RANK_STREAMS.values():
        return mix_seed(seed, it, group, member, 1)
    return mix_seed(seed, it, group, member)


def window_seed(seed: int, it: int, group: int) -> int:
    """The seed of global group ``group``'s Flow-GRPO-Fast window start in iteration ``it`` (its own 5-part key)."""
    return mix_seed(seed, it, group, 7, 2)


def initial_noise(model: Any, seed: int, it: int, positions: Sequence[int], group_size: int, mode: str = "member"):
    """x_1 for the rows of global groups ``positions`` × members, seeded by (seed, iteration, group, member) (Q7;
    ``init_noise_seed``).

    ``mode`` "member": one draw per rollout (Flow-GRPO); "group": one draw per group shared by its members
    (DanceGRPO), so members differ only by the SDE noise of the steps. Same rows for any world size.
    """
    if mode not in ("member", "group"):
        raise ValueError(f"init_noise mode must be 'member' or 'group', got {mode!r}")
    seeds = [init_noise_seed(seed, it, gp, 0 if mode == "group" else m) for gp in positions for m in range(group_size)]
    return torch.cat([model.init_noise(1, torch.Generator().manual_seed(s)) for s in seeds])  # [G·n, *latent]


def group_windows(seed: int, it: int, positions: Sequence[int], lo: int, hi: int, size: int) -> list[int]:
    """Flow-GRPO-Fast window starts t0 ~ U{lo … hi − n}, one per global group ``positions`` (METHODS.md §2.6, Q5).

    Each group's draw comes from a generator seeded by (seed, iteration, group): upstream draws one t0 per
    process, so its windows depend on the world size; here a group gets the same window on any number of
    ranks, and the groups of one iteration spread their windows over the range.
    """
    top = max(lo, hi - size)
    return [int(torch.randint(lo, top + 1, (1,), generator=torch.Generator().manual_seed(window_seed(seed, it, gp))))
            for gp in positions]


def window_eta(steps: int, base_eta: float | torch.Tensor, starts: Sequence[int], size: int, group_size: int, *,
               last_step_noise: bool = False) -> torch.Tensor:
    """Per-row η [B, T] of per-group windows: group g's ``group_size`` rows are stochastic on t0_g … t0_g + n − 1
    (``eta_schedule`` with ``window=(t0_g, n)``), Euler elsewhere."""
    rows = [eta_schedule(steps, base_eta, window=(t0, size), last_step_noise=last_step_noise) for t0 in starts]
    return torch.stack(rows).repeat_interleave(group_size, dim=0)  # [G·n, T]


class EMA:
    """EMA of the trainable tensors: d_n = min((1+n)/(10+n), d_max), once per `every` optimizer steps (§3.7, Q4)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay_max: float = 0.9, every: int = 8):
        self.params, self.decay_max, self.every = list(params), decay_max, every
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, n: int) -> None:
        if (n + 1) % self.every:
            return
        d = min((1 + n) / (10 + n), self.decay_max)
        for s, p in zip(self.shadow, self.params):
            s.add_(p.detach() - s, alpha=1 - d)

    @contextlib.contextmanager
    def applied(self):
        """Swap the EMA weights in (for eval and checkpoints' LoRA file), then restore."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)


class LossScale:
    """Dynamic loss scaling for float16 forwards (``model.dtype=float16``; METHODS.md §3.7: fp16 for SD3).

    The GRPO loss's gradient at the transformer output is about A/(n·D·s), ~1e-9 at SD3.5 scale: below float16's
    smallest subnormal (6e-8), so without scaling the backward through fp16 activations returns exact zeros. The
    update multiplies its loss by ``scale`` before backward and divides the (fp32) LoRA gradients by it before the
    all-reduce, the clip and the step. A step whose gradients overflow is skipped on every rank and the scale halves;
    after ``growth_interval`` clean steps it doubles. Disabled (bf16, fp32) it is 1 and touches nothing.
    """

    def __init__(self, enabled: bool, init: float = 2.0 ** 16, growth_interval: int = 200):
        self.enabled, self.growth_interval = enabled, growth_interval
        self.scale = float(init) if enabled else 1.0
        self.good = 0  # clean steps since the last change

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale, self.good = max(self.scale / 2, 1.0), 0
            return
        self.good += 1
        if self.good >= self.growth_interval:
            self.scale, self.good = min(self.scale * 2, 2.0 ** 24), 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good": self.good}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state and self.enabled:
            self.scale, self.good = float(state["scale"]), int(state["good"])


def mean_group_std(rewards: torch.Tensor, group: torch.Tensor) -> float:
    """Mean over prompt groups of the within-group std of the (finite) rewards [B] (METHODS.md §3.2 logs it beside
    ``zero_std_ratio``); population std, groups with fewer than two finite rewards count as 0."""
    stds = []
    for g in torch.unique(group):
        r = rewards[group == g].double()
        r = r[torch.isfinite(r)]
        stds.append(float(r.std(unbiased=False)) if r.numel() > 1 else 0.0)
    return sum(stds) / max(1, len(stds))


# ------------------------------------------------------------------------------------------ helpers


# settings that may change between a run and its resume: where and how often it writes, how long it runs, how it
# is evaluated, the device; everything else decides the training trajectory, so exact resume needs it unchanged
RESUMABLE_CHANGES = ("output.", "train.iterations", "train.checkpoint_every", "train.keep_checkpoints", "eval.",
                     "data.eval_prompts", "model.device")


def _flat_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    import dataclasses

    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_flat_config(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


PATHS_FILE = "paths.json"  # the fingerprints of a run's local weights paths (io.path_fingerprint), for resumes


def _path_settings(cfg: C.ExperimentConfig) -> dict[str, str]:
    """The settings that name weights on disk: ``model.path`` and every string of ``reward.kwargs`` (a reward's
    path, checkpoint or tokenizer), by their dotted names."""
    out = {"model.path": cfg.model.path} if cfg.model.path else {}
    for name, kw in cfg.reward.kwargs.items():
        out.update({f"reward.kwargs.{name}.{k}": v for k, v in dict(kw).items() if isinstance(v, str) and v})
    return out


def _fingerprint_paths(cfg: C.ExperimentConfig, run: Path) -> None:
    """Write ``PATHS_FILE``: each local path of ``_path_settings`` with its fingerprint (hub ids have none)."""
    from flowalign.io import atomic_write_json, path_fingerprint

    found = {k: {"value": v, "sha256": fp} for k, v in _path_settings(cfg).items()
             if (fp := path_fingerprint(v)) is not None}
    if found:
        atomic_write_json(run / PATHS_FILE, found)
    else:
        (run / PATHS_FILE).unlink(missing_ok=True)


def _moved_paths(cfg: C.ExperimentConfig, run: Path) -> dict[str, str]:
    """{setting: its value when the run started} for the path settings a resume changed to a path that holds the
    same files (``PATHS_FILE``'s fingerprint): weights copied to node-local disk, say. A run without the file (an
    older one), or a path whose files differ, has none."""
    from flowalign.io import path_fingerprint

    try:
        known = json.loads((run / PATHS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    moved = {}
    for k, v in _path_settings(cfg).items():
        was = known.get(k) if isinstance(known, dict) else None
        if isinstance(was, dict) and was.get("value") != v and was.get("sha256") == path_fingerprint(v):
            moved[k] = was["value"]
    return moved


def _check_resume_config(cfg: C.ExperimentConfig, run: Path) -> None:
    """Exact resume needs the run's own settings: refuse (one line) when a trajectory-deciding field changed. A
    weights path may change when it holds the same files (``_moved_paths``)."""
    saved = run / "config.yaml"
    if not saved.is_file():
        return
    try:
        old = _flat_config(C.load_config(str(saved)))
    except UserError as e:
        raise UserError(f"cannot resume {run}: its config.yaml is unreadable ({e})") from None
    moved = _moved_paths(cfg, run)
    for k, was in moved.items():  # compare as if unmoved; say so
        logger.info("resume: %s moved (%r -> %r), the same files", k, was, _path_settings(cfg)[k])
    cfg = _with_paths(cfg, moved)
    new = _flat_config(cfg)
    # the eta file's path may change (moved, or named from another directory) when its etas do not: those are checked
    # against the run's copy (_check_resume_eta); a run without the copy (an older one) keeps its path fixed
    free = RESUMABLE_CHANGES + (("sampler.eta_file",) if (run / ETA_COPY).is_file() and cfg.sampler.eta_file else ())
    diff = [f"{k} ({old.get(k)!r} → {new.get(k)!r})" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(free)]
    if diff:
        raise UserError(f"cannot resume {run} with changed settings: {', '.join(diff)}; resume with the run's "
                        f"config ({saved}) or start a new output.run_dir")


def _with_paths(cfg: C.ExperimentConfig, values: Mapping[str, str]) -> C.ExperimentConfig:
    """``cfg`` with the path settings of ``values`` (``_path_settings`` names) set: a copy, for comparing."""
    import dataclasses

    if not values:
        return cfg
    model = cfg.model
    if "model.path" in values:
        model = dataclasses.replace(model, path=values["model.path"])
    kwargs = {name: dict(kw) for name, kw in cfg.reward.kwargs.items()}
    for key, v in values.items():
        if key.startswith("reward.kwargs."):
            name, arg = key[len("reward.kwargs."):].split(".", 1)
            kwargs[name][arg] = v
    return dataclasses.replace(cfg, model=model, reward=dataclasses.replace(cfg.reward, kwargs=kwargs))


def _check_components(cfg: C.ExperimentConfig, check_device: bool = True) -> None:
    """Registry names and option keys the config schema cannot check: refuse them before anything is written
    (``check_device=False`` for ``--describe``: a GPU config can be described on a machine without one)."""
    import difflib

    from flowalign.credit import CREDIT
    from flowalign.samplers.kernels import get_kernel
    from flowalign.samplers.loop import sample
    from flowalign.values import parse_mode

    c = cfg.credit
    if c.name not in CREDIT:
        close = difflib.get_close_matches(c.name, list(CREDIT), n=1)
        raise UserError(f"credit.name: unknown credit method {c.name!r}"
                        + (f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(CREDIT)}"))
    known = [k for k in inspect.signature(CREDIT[c.name]).parameters if k != "inp"]
    bad = [k for k in c.options if k not in known]
    if bad:
        raise UserError(f"credit.options: unknown option(s) {bad} for credit {c.name!r}; known: {', '.join(known) or 'none'}")
    hints = typing.get_type_hints(CREDIT[c.name], include_extras=True)
    for k, v in c.options.items():
        bad_value = option_value_error(hints.get(k), v)
        if bad_value:
            raise UserError(f"credit.options.{k}={v!r}: {bad_value} (credit {c.name!r})")
        if (k == "probe" or k.endswith("_probe")) and v is not None:
            try:
                parse_mode(str(v))
            except ValueError as e:
                raise UserError(f"credit.options.{k}: {e}") from None
    if cfg.sampler.eta_file:  # its etas, step count and kernel, before the model loads (and in --describe)
        read_eta_file(cfg)
    from flowalign.credit import preflight

    msg = preflight(c.name, c.options, reward_weights=cfg.reward.weights, aggregate=cfg.reward.aggregate,
                    guided=cfg.sampler.guide != "none")
    if msg:  # option combinations that would otherwise fail mid-run (after the model loaded and rollouts ran)
        raise UserError(msg)
    sp = cfg.sampler
    skip = {"velocity", "noise", "x", "sigmas", "cond", "cond_index", "group", "eta", "kernel", "generator",
            "keep_velocities", "trainable", "prompts", "reduce", "logp_form", "mean_shift", "options", "kernel_kwargs"}
    plan_fn = sample if sp.plan == "chain" else PLANS[sp.plan]  # the chain plan forwards its options to sample
    known = [k for k, p in inspect.signature(plan_fn).parameters.items() if k not in skip and p.kind != p.VAR_KEYWORD]
    known += [k for k, p in inspect.signature(get_kernel(sp.kernel)).parameters.items()
              if k not in ("x", "v", "sigma", "sigma_next", "eta") and p.kind == p.KEYWORD_ONLY]
    bad = [k for k in sp.plan_options if k not in known]
    if bad:
        raise UserError(f"sampler.plan_options: unknown option(s) {bad} for plan {sp.plan!r} with kernel "
                        f"{sp.kernel!r}; known: {', '.join(known) or 'none'}")
    hints = {**typing.get_type_hints(plan_fn, include_extras=True),
             **typing.get_type_hints(get_kernel(sp.kernel), include_extras=True)}
    for k, v in sp.plan_options.items():  # values against the plan's and the kernel's annotations (types, ranges)
        bad_value = option_value_error(hints.get(k), v)
        if bad_value:
            raise UserError(f"sampler.plan_options.{k}={v!r}: {bad_value} (plan {sp.plan!r}, kernel {sp.kernel!r})")
    from flowalign.models import resolve as resolve_model
    from flowalign.rewards import resolve as resolve_reward
    from flowalign.rewards.catalog import check_kwarg_types, check_kwargs

    check_kwargs(resolve_model(cfg.model.name).from_pretrained, cfg.model.kwargs, f"model.kwargs ({cfg.model.name})",
                 reserved=("path", "device", "dtype", "guidance_scale"))
    _resolution_kwargs(cfg.model)
    for name, kw in cfg.reward.kwargs.items():
        check_kwargs(resolve_reward(name), kw, f"reward.kwargs.{name}")
        check_kwarg_types(resolve_reward(name), kw, f"reward.kwargs.{name}")
        if name not in cfg.reward.weights and name not in cfg.eval.rewards:
            logger.warning("reward.kwargs.%s is set, but %s is neither a training reward (reward.weights) nor an "
                           "evaluation reward (eval.rewards): the options are unused", name, name)
    from flowalign.rewards.video import check_per_frame, check_temporal

    check_per_frame(cfg.reward.per_frame, "reward.per_frame")
    if getattr(resolve_model(cfg.model.name), "output_kind", "image") == "video":  # image models ignore per_frame
        check_temporal(cfg.reward.per_frame, [*cfg.reward.weights, *cfg.eval.rewards], "reward.per_frame")
    if not check_device:
        return
    from flowalign.dist import device_unavailable

    try:
        dev = torch.device(cfg.model.device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"model.device: unknown device {cfg.model.device!r}; e.g. cpu, cuda, cuda:1") from None
    why = device_unavailable(dev)
    if why:
        raise UserError(f"model.device={cfg.model.device!r} but {why}; use model.device=cpu (or install a CUDA "
                        f"build)")


def _resolution_kwargs(m: C.ModelConfig) -> dict[str, int]:
    """``model.resolution`` as the family loader's ``height`` and ``width`` ({} for 0 = the model default); one line
    when the family's size is fixed by its weights, or when ``model.kwargs`` sets the size too."""
    if not m.resolution:
        return {}
    from flowalign.models import resolve as resolve_model

    params = inspect.signature(resolve_model(m.name).from_pretrained).parameters
    if not {"height", "width"} <= set(params):
        raise UserError(f"model.resolution={m.resolution}: the {m.name} model's image size is fixed by its weights; "
                        "set model.resolution=0")
    both = sorted({"height", "width"} & set(m.kwargs))
    if both:
        raise UserError(f"model.resolution={m.resolution} and model.kwargs.{both[0]} both set the image size; "
                        "keep one (model.kwargs.height/width for a non-square size)")
    return {"height": int(m.resolution), "width": int(m.resolution)}


def _tb_scalars(writer: Any, values: Mapping[str, Any], step: int) -> None:
    """The finite numbers of ``values`` as TensorBoard scalars at ``step`` (no writer: nothing)."""
    if writer is None:
        return
    for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            writer.add_scalar(k, v, step)


def _check_run_dir(cfg: C.ExperimentConfig, world: int = 1) -> tuple[Path, Optional[Path]]:
    """Refuse to clobber an earlier run; return (run_dir, checkpoint to resume or None). Writes nothing."""
    run = Path(cfg.output.run_dir)
    if cfg.output.resume and cfg.output.overwrite:  # resume won silently; a check of the command, not of the config
        # (a run's saved config.yaml holds both flags as they were given and must still load)
        raise UserError("output.resume=true and output.overwrite=true contradict each other (resume continues the run "
                        "in output.run_dir, overwrite deletes it first); drop output.overwrite=true to continue the "
                        "run, or output.resume=true to start afresh")
    if run.exists() and not run.is_dir():  # a traceback later (iterdir, rmtree, mkdir) instead of one line
        raise UserError(f"output.run_dir={str(run)!r} is a file; set output.run_dir to a directory (new, or a run to resume)")
    check_out_parent(run, "output.run_dir")
    if run.is_dir() and (cfg.output.resume or cfg.output.overwrite):
        from flowalign.pretrain import is_pretrain_run

        if is_pretrain_run(run):  # its config.yaml failed to load as a training config: an opaque line
            final = f"; to fine-tune its model, set model.path={str(run / 'final')!r}" if (run / "final").is_dir() else ""
            raise UserError(f"output.run_dir={str(run)!r} holds a pretraining run (flowalign pretrain), not a training "
                            f"run; choose another output.run_dir{final}")
    if cfg.output.resume:
        ckpt = _latest_checkpoint(run)
        if ckpt is None and run.exists() and any(run.iterdir()) and not (run / "config.yaml").is_file():
            # a fresh start replaces metrics.jsonl, tb/ and report.html: only in a run's own directory (a run writes
            # config.yaml first; files of the user's beside it, e.g. a train.log, are left alone)
            raise UserError(f"output.resume=true: {str(run)!r} holds no checkpoint and is not a training run "
                            f"({_foreign_entries(run)}); choose another output.run_dir")
        if ckpt is None:
            logger.info("resume: no checkpoint in %s, starting fresh", run)
        else:
            _check_resume_config(cfg, run)
            _check_resume_eta(cfg, run)
            _check_resume_world(cfg, ckpt, world)
        return run, ckpt
    if run.exists() and any(run.iterdir()):
        if not cfg.output.overwrite:
            foreign = _foreign_entries(run)  # what overwrite would refuse to delete (and resume to start beside)
            if not (run / "config.yaml").is_file():  # not a training run: resume and overwrite would both be refused
                raise UserError(f"run directory {run} already exists, is not empty and holds no training run "
                                f"({foreign}); choose another output.run_dir")
            if foreign:  # a run with files of the user's beside it: overwrite deletes only a run's own
                raise UserError(f"run directory {run} already holds a training run, and other files ({foreign}); "
                                f"pass output.resume=true to continue it, or choose another output.run_dir")
            raise UserError(f"run directory {run} already exists and is not empty; pass output.resume=true to continue "
                            f"it, output.overwrite=true to replace it, or choose another output.run_dir")
        _check_replaceable(run)
    return run, None


CHECKPOINT_META = "meta.json"  # in checkpoints/step-N/: {"iteration": N, "world_size": processes that wrote it}


def _check_resume_world(cfg: C.ExperimentConfig, ckpt: Path, world: int) -> None:
    """With ``sampler.step_noise=rank`` every process draws its own SDE-noise stream, so a run resumed with another
    number of processes would go on with other noise than the uninterrupted run: refuse (one line). Checkpoints
    without ``meta.json`` (older ones) are not checked."""
    try:
        saved = int(json.loads((ckpt / CHECKPOINT_META).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if saved != world and cfg.sampler.step_noise == "rank":
        raise UserError(f"cannot resume {ckpt} exactly: {saved} process(es) wrote it and {world} run now, and with "
                        f"sampler.step_noise=rank each process draws its own SDE noise; resume with {saved} "
                        f"process(es) (runs started with sampler.step_noise=group do not depend on the count)")


RUN_ENTRIES = frozenset({"config.yaml", "metrics.jsonl", "checkpoints", "eval", "grids", "plots", "tb", "report.html",
                         "eta_file.json", "paths.json"})
"""What a training run writes at the top of its directory: ``output.overwrite`` deletes only such a directory."""


def _check_replaceable(run: Path) -> None:
    """``output.overwrite=true`` deletes ``run``: refuse (one line) unless it is an earlier training run, i.e. it holds
    ``config.yaml`` and nothing but what a run writes, and it is neither the working directory nor above it."""
    target, here = run.resolve(), Path.cwd().resolve()
    if target == here or target in here.parents:
        raise UserError(f"output.overwrite=true would delete {str(run)!r}, the working directory or one above it; "
                        f"choose a run directory inside it")
    what = _foreign_entries(run)
    if what:
        raise UserError(f"output.overwrite=true deletes only an earlier training run, and {str(run)!r} is not one "
                        f"({what}); choose another output.run_dir, or remove it yourself")


def _foreign_entries(run: Path) -> str:
    """'' if ``run`` looks like a training run (config.yaml, and nothing but what a run writes), else what it holds
    instead, for an error line."""
    foreign = sorted(p.name for p in run.iterdir() if p.name not in RUN_ENTRIES)
    if not foreign and (run / "config.yaml").is_file():
        return ""
    return f"it holds {', '.join(foreign[:3])}{' …' if len(foreign) > 3 else ''}" if foreign else "no config.yaml"


def _truncate_metrics(path: Path, iteration: int, rerun_end: bool = False) -> None:
    """Drop metric lines written after the checkpoint we resume from (a killed run may have logged more), and that
    iteration's end-of-run lines (those without ``train/`` metrics): the ranks' weight check always (it belongs to
    the end of a run; a resume to more iterations would leave it mid-run), the final evaluation when ``rerun_end``
    (the checkpoint is the run's last iteration, so this session repeats that evaluation). A resume to more
    iterations keeps the earlier final evaluation: a measurement of the weights at that iteration.
    """
    if not path.exists():
        return
    import json

    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln) if ln.strip() else None
        except json.JSONDecodeError:  # a line cut short by the kill
            logger.warning("metrics.jsonl: dropping a truncated line")
            continue
        if rec is None or rec.get("iteration", 0) > iteration:
            continue
        if (rec.get("iteration", 0) == iteration and not any(k.startswith("train/") for k in rec)
                and (rerun_end or not any(k.startswith("eval/") for k in rec))):
            continue
        keep.append(ln)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _elapsed_before(path: Path) -> float:
    """The wall time a resumed run had spent up to its checkpoint (``metrics.jsonl`` already cut back to it), so that
    ``time/elapsed_s`` goes on from there rather than restarting at 0; 0 without metrics."""
    from flowalign.compare import run_wall_s
    from flowalign.io import read_jsonl

    return run_wall_s(read_jsonl(path)) if path.is_file() else 0.0


def interrupt_hint(run: Path, checkpoint_every: int, overwrite: bool = False) -> str:
    """What ``flowalign train`` tells a user who pressed Ctrl-C: where ``output.resume=true`` continues from, or that
    there is no checkpoint yet, so a resume would start the run afresh. A run started with ``output.overwrite=true``
    must drop it (the two together are refused)."""
    flag = "output.resume=true output.overwrite=false" if overwrite else "output.resume=true"
    ckpt = _latest_checkpoint(run)
    if ckpt is None:
        every = f"train.checkpoint_every={checkpoint_every}" if checkpoint_every else "train.checkpoint_every=0: at the end only"
        return f"no checkpoint yet ({every}), so {flag} would start afresh"
    return f"continue from {ckpt} with {flag}"


def _latest_checkpoint(run: Path) -> Optional[Path]:
    from flowalign.models.lora import latest_checkpoint

    return latest_checkpoint(run)  # the highest step-N directory (one finder for train, sample's hints and models)


def _trained_mask(eta: torch.Tensor, fraction: float, batch: int, generator: Generators = None) -> torch.Tensor:
    """Flow-GRPO trains the first ⌊f·T⌋ steps that are stochastic (METHODS.md §3.5). [B, T] bool.

    ``eta`` [T], or [B, T] per row (per-group windows)."""
    steps = eta.shape[-1]
    first = torch.arange(steps) < min(int(math.floor(fraction * steps + 1e-9)), steps - 1)  # never the last step
    return ((eta.cpu() > 0) & first).expand(batch, steps)


def _random_trained_mask(eta: torch.Tensor, fraction: float, batch: int, generator: Generators) -> torch.Tensor:
    """DanceGRPO / Euphonium (METHODS.md §3.5): per rollout, a random subset of size ⌊(T−1)·f⌋ of steps 0…T−2
    (fewer if fewer of them are stochastic). [B, T] bool; a function of ``generator`` alone, so resume is exact."""
    steps = eta.shape[0]
    cand = (eta.cpu() > 0) & (torch.arange(steps) < steps - 1)  # [T] stochastic, not the last step
    k = min(int(math.floor(fraction * (steps - 1) + 1e-9)), int(cand.sum()))
    keys = draw_rows(torch.rand, (batch, steps), generator).masked_fill(~cand[None], 2.0)  # [B, T] non-candidates last
    return torch.zeros(batch, steps, dtype=torch.bool).scatter_(1, keys.argsort(1)[:, :k], True)


# sampler.train_steps → (eta [T], train_fraction, rows, generator) -> trained [rows, T] bool
TRAINED_STEPS = {"first": _trained_mask, "random": _random_trained_mask}


# ------------------------------------------------------------------------------------------ the recipe


def train(cfg: C.ExperimentConfig) -> Path:
    # 0. setup (validate everything before the first write: bad input leaves no trace) --------------------
    rank, world, reduce_mean, barrier = process_group()
    C.derived(cfg, world_size=world)  # the batch shapes divide on this world size (else a one-line UserError)
    _check_components(cfg)
    # rank 0 checks, every rank gets its verdict (the check's write probe would make the directory look non-empty to a
    # rank listing it at the same moment), before rank 0 writes into it
    run, ckpt_dir = once_on_rank0(lambda: _check_run_dir(cfg, world), rank, world)
    device = process_device(cfg.model.device, world)
    torch.manual_seed(cfg.train.seed)  # identical LoRA init on every rank (also broadcast below, as DDP does)

    # 1. rewards (built before the model: a wrong weights path is one line, not one after a long model load) --------
    from flowalign.models import resolve as resolve_family
    from flowalign.rewards.video import for_outputs

    outputs = getattr(resolve_family(cfg.model.name), "output_kind", "image")

    def make(name: str):  # image rewards score a video model's frames (reward.per_frame)
        reward = build_reward_checked(name, dict(cfg.reward.kwargs.get(name, {})), f"reward.kwargs.{name}")
        return for_outputs(reward, outputs, cfg.reward.per_frame)

    if cfg.reward.per_frame and outputs != "video":
        logger.warning("reward.per_frame is set, but %s makes images, not videos: the option is ignored",
                       cfg.model.name)
    with torch.random.fork_rng(devices=[]):  # loading reward weights must not move the seed of the LoRA's init
        rewards = {name: make(name) for name in cfg.reward.weights}
        # a training reward that also evaluates is the same object: built (and its weights loaded) once
        eval_rewards = {name: rewards[name] if name in rewards else make(name)
                        for name in dict.fromkeys([*cfg.eval.rewards, *cfg.reward.weights])}

    # 2. model --------------------------------------------------------------------------------------
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
    model = load_model(cfg.model.name, cfg.model.path, device=device, dtype=dtype, guidance_scale=cfg.model.guidance,
                       **_resolution_kwargs(cfg.model), **dict(cfg.model.kwargs))
    try:
        lora_r = cfg.model.lora_rank or None  # None: the family default rank and alpha (alpha = 2 x rank for all)
        lora_a = cfg.model.lora_alpha or (2 * lora_r if lora_r else None)  # 0 = 2 x rank (the config's doc)
        params = model.add_lora(lora_r, lora_a,
                                targets=tuple(cfg.model.lora_targets) or None)
    except ValueError as e:  # no module matches model.lora_targets
        raise UserError(f"model.lora_targets: {e}") from e
    if cfg.model.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    if device.type == "cuda" and rank == 0:  # what an update micro-batch will keep, before a rollout can run out
        from flowalign.bench_memory import preflight

        preflight(model, cfg.model.name, cfg.train.micro_batch, checkpointing=cfg.model.gradient_checkpointing,
                  lora=(tuple(cfg.model.lora_targets) or model.lora_targets, lora_r or model.lora_rank,
                        lora_a or model.lora_alpha))
    if world > 1:
        import torch.distributed as dist

        for p in params:
            dist.broadcast(p.data, src=0)
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay,
                            eps=cfg.train.adam_eps)
    ema = EMA(params, cfg.train.ema_decay_max, cfg.train.ema_every) if cfg.train.ema else None
    opt_total = cfg.train.iterations * cfg.train.optimizer_steps_per_iter
    if ema is not None and opt_total < cfg.train.ema_every and rank == 0:  # the EMA would stay the initial adapter
        logger.warning("train.ema=true updates the EMA every train.ema_every=%d optimizer steps, and this run takes %d: "
                       "the evaluated and saved weights (the EMA's) would be the initial adapter, unchanged; lower "
                       "train.ema_every or set train.ema=false (the trained weights are in each checkpoint's raw/)",
                       cfg.train.ema_every, opt_total)
    loss_scale = LossScale(enabled=dtype == torch.float16)  # fp16 forwards: gradients would underflow unscaled
    nfe = NFECounter(model)

    guide = None  # a rollout mean shift (Euphonium's reward-gradient guidance), flowalign.values.GUIDES
    if GUIDES[cfg.sampler.guide] is not None:
        g_opts = dict(cfg.sampler.guide_options)
        known = [k for k in inspect.signature(GUIDES[cfg.sampler.guide]).parameters
                 if k not in ("velocity", "decode", "weights", "counter")]  # "rewards" is the option's name
        bad = [k for k in g_opts if k not in known]
        if bad:
            raise UserError(f"sampler.guide_options: unknown option(s) {bad} for guide {cfg.sampler.guide!r}; "
                            f"known: {', '.join(known)}")
        g_weights = {str(k): float(w) for k, w in dict(g_opts.pop("rewards", None) or cfg.reward.weights).items()}
        g_rewards = {k: rewards[k] if k in rewards else make(k) for k in g_weights}
        try:
            guide = GUIDES[cfg.sampler.guide](velocity=model.velocity, decode=model.decode, rewards=g_rewards,
                                              weights=g_weights, counter=nfe, **g_opts)
        except (TypeError, ValueError) as e:
            raise UserError(f"sampler.guide_options: {e}") from None

    # 3. data ---------------------------------------------------------------------------------------
    prompts = D.load_prompts(cfg.data.train_prompts)
    eval_prompts = D.load_prompts(cfg.data.eval_prompts)
    eval_prompts = D.spaced_subset(eval_prompts, cfg.eval.max_prompts)
    seen = {r.prompt for r in prompts}
    overlap = sum(r.prompt in seen for r in eval_prompts) / max(1, len(eval_prompts))
    if rank == 0 and overlap > 0 and (cfg.eval.before or cfg.eval.after or cfg.eval.every):
        # all of them (e.g. one file for both): a warning; a part (the shapes world's small tasks, whose whole prompt
        # space is in shapes-train): a note
        logger.log(logging.WARNING if overlap >= 1 else logging.INFO,
                   "%.0f%% of the evaluation prompts (data.eval_prompts=%s) are training prompts (data.train_prompts=%s):"
                   " on those the evaluation measures fit to the training set, not generalisation", 100 * overlap,
                   cfg.data.eval_prompts, cfg.data.train_prompts)
    validate = getattr(model, "validate_prompts", None)  # adapters with a closed vocabulary (shapes) check text
    prompt_sets = {"data.train_prompts": prompts, "data.eval_prompts": eval_prompts}
    if validate is not None:  # fail early, naming the setting and the prompt's file and line: one line, exit 2
        for setting, texts in prompt_sets.items():
            D.check_prompts(texts, validate, setting)
    for fns, settings in ((rewards, list(prompt_sets)), (eval_rewards, ["data.eval_prompts"])):
        for fn in fns.values():  # rewards that parse their prompts (the shapes verifier) check them before sampling
            check = getattr(fn, "validate_prompts", None)
            if check is not None:
                for setting in settings:
                    D.check_prompts(prompt_sets[setting], check, setting)
    sampler = D.PromptSampler(prompts, cfg.train.groups_per_iter, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    sigmas = model.schedule(cfg.sampler.steps).to(device)  # [T+1]
    base_eta = _load_eta(cfg, sigmas, guidance=getattr(model, "guidance_scale", None))  # float, or a per-step [T] tensor (calibrated noise)

    # 4. resume -------------------------------------------------------------------------------------
    start, saved_steps, elapsed_before = 0, None, 0.0
    if ckpt_dir is not None:
        start, saved_steps = _load_checkpoint(ckpt_dir, model, opt, ema, sampler, nfe, loss_scale)
        if start > cfg.train.iterations:  # nothing written yet: refuse before the metrics are truncated
            raise UserError(f"cannot resume {ckpt_dir} (iteration {start}) with train.iterations={cfg.train.iterations}: "
                            f"the run is already past it; set train.iterations >= {start}")
        logger.info("resumed from %s (iteration %d)", ckpt_dir, start)
        _truncate_metrics(run / "metrics.jsonl", start, rerun_end=start == cfg.train.iterations)
        elapsed_before = _elapsed_before(run / "metrics.jsonl")
    if rank == 0:
        # the noise levels this run samples with, kept in the run: the file may be recalibrated in place or, as a
        # relative path, not be found from another directory when the run is resumed (read before an overwrite)
        eta_bytes = Path(cfg.sampler.eta_file).read_bytes() if cfg.sampler.eta_file else None
        if run.exists() and cfg.output.overwrite and not cfg.output.resume:
            shutil.rmtree(run)
        if cfg.output.resume and ckpt_dir is None:  # nothing to resume: a fresh start must not append to old logs
            for stale in ("metrics.jsonl", "tb"):
                if (run / stale).exists():
                    logger.warning("resume: no checkpoint in %s; removing the earlier %s of this run", run, stale)
                    shutil.rmtree(run / stale) if (run / stale).is_dir() else (run / stale).unlink()
        run.mkdir(parents=True, exist_ok=True)
        C.dump_yaml(cfg, run / "config.yaml")
        _fingerprint_paths(cfg, run)  # a resume may then name the same weights at another path
        if eta_bytes is not None and (ckpt_dir is None or not (run / ETA_COPY).is_file()):
            atomic_write_bytes(run / ETA_COPY, eta_bytes)
        logger.info("\n%s", C.summary(cfg, world))
    barrier()
    writer = _tensorboard(run, cfg, start) if rank == 0 else None

    t_run = time.time() - elapsed_before  # time/elapsed_s counts the earlier sessions' time up to the checkpoint too

    # 5. base eval ----------------------------------------------------------------------------------
    # a built-in evaluation set with a frozen protocol labels its numbers: benchmark or not (REWARDS_AND_EVAL §3.2)
    eval_protocol = find_protocol(cfg.data.eval_prompts)
    eval_extra = {"model": cfg.model.name, "path": cfg.model.path or None, "prompt_set": cfg.data.eval_prompts,
                  "max_prompts": cfg.eval.max_prompts,
                  **({"per_frame": dict(cfg.reward.per_frame)}
                     if cfg.reward.per_frame and getattr(model, "output_kind", "image") == "video" else {})}

    def evaluate(tag: str, iterations: int) -> dict:
        """Every rank calls this: each samples its share of the batches (``run_eval``'s ``shard``), rank 0 writes,
        logs and draws the grid. One rank evaluating while the others wait in a barrier would hit the process group's
        timeout on a long evaluation (e.g. GenEval on SD3.5) and kill the run."""
        # which weights were evaluated: the base (no LoRA) or this run's LoRA after `iterations` iterations
        trained = {"lora": f"{run.name} after {iterations} iteration{'s' if iterations != 1 else ''}", "trained_iterations": iterations,
                   "lora_ema": cfg.train.ema} if iterations else {}
        with (ema.applied() if ema is not None else contextlib.nullcontext()):
            summ = run_eval(model, eval_prompts, eval_rewards, run / "eval" / tag, steps=cfg.eval.steps,
                            guidance=cfg.eval.guidance, kernel=cfg.eval.kernel,
                            seeds_per_prompt=cfg.eval.seeds_per_prompt, batch_size=cfg.eval.batch_size,
                            extra_settings={**eval_extra, **trained}, protocol=eval_protocol,
                            shard=(rank, world), grid_prompts=cfg.eval.grid_prompts)
            if rank != 0:
                return summ
            if "benchmark" in summ["settings"]:
                logger.info("eval/%s: %s", tag, benchmark_line(summ["settings"]["benchmark"]))
            base_summary = run / "eval" / "base" / "summary.json"
            if tag != "base" and base_summary.is_file():  # e.g. a resume that changed eval.*
                mismatch = eval_mismatch(read_summary(base_summary), summ)
                if mismatch:
                    logger.warning("eval/%s and eval/base were evaluated with other settings (%s): their difference "
                                   "is not the model's change alone", tag, mismatch)
            if cfg.eval.grid_prompts:  # 0 = no grids
                # the grid is the evaluation's own scored images, captioned with their scores: the same prompts and
                # noise seeds before and after (it was sampled apart, from other seeds, without scores)
                (run / "grids").mkdir(parents=True, exist_ok=True)
                for suffix in (".png", ".gif"):  # a video model's grid also plays as a GIF
                    made = run / "eval" / tag / "grids" / f"eval{suffix}"
                    if made.is_file():
                        atomic_write_bytes(run / "grids" / f"{tag}{suffix}", made.read_bytes())
        return summ

    nfe_seen = dict(nfe.totals())  # forwards already in the logged tally (all ranks'; restored on resume)
    if start == 0 and cfg.eval.before:
        summ = evaluate("base", 0)
    if rank == 0 and start == 0 and cfg.eval.before:
        append_jsonl(run / "metrics.jsonl", {"iteration": 0, "time/elapsed_s": time.time() - t_run,
                                              **{f"eval/{k}": v for k, v in _flat_summary(summ).items()}})
        _tb_scalars(writer, {f"eval/{k}": v for k, v in _flat_summary(summ).items()}, 0)
    barrier()

    from tqdm.auto import tqdm

    bar = tqdm(range(start, cfg.train.iterations), initial=start, total=cfg.train.iterations, desc=cfg.train.objective,
               unit="it", disable=rank != 0, dynamic_ncols=True)
    # optimizer steps taken (the EMA's n): skipped updates do not count, so it is restored, not recomputed
    n_opt = [start * cfg.train.optimizer_steps_per_iter if saved_steps is None else saved_steps]  # mutable for on_step

    def on_step() -> None:  # after every optimizer step taken: the EMA reads that step's weights (§3.7, Q4)
        if ema is not None:
            ema.update(n_opt[0])
        n_opt[0] += 1

    warned_nan = False  # the first NaN reward of the run is a warning; later ones are counted (reward/nan_rows)
    for it in bar:
        t_start = time.time()
        metrics: dict[str, Any] = {"iteration": it + 1}

        # 6. rollout: rank-local whole groups, noise seeded by (seed, iteration, group, member) (Q7) -----------
        all_groups = sampler.next_groups()  # prompt index per global group
        positions = D.shard_groups(list(range(len(all_groups))), rank, world)  # this rank's global group ids
        groups = [all_groups[p] for p in positions]
        g_size = cfg.train.group_size
        cond_index, group = D.expand_groups(list(range(len(groups))), g_size)  # [B], [B]
        batch_prompts = [prompts[i].prompt for i in groups]
        cond = model.encode(batch_prompts)
        noise = initial_noise(model, cfg.train.seed, it, positions, g_size, cfg.sampler.init_noise)  # [B, *latent]
        if cfg.sampler.window_size:  # Flow-GRPO-Fast: one window per group, seeded by (seed, iteration, group) (Q5)
            lo, hi = C.window_bounds(cfg.sampler)
            starts = group_windows(cfg.train.seed, it, positions, lo, hi, cfg.sampler.window_size)
            eta = window_eta(cfg.sampler.steps, base_eta, starts, cfg.sampler.window_size, g_size,
                             last_step_noise=cfg.sampler.last_step_noise)  # [B0, T]
            eta = eta[0] if bool((eta == eta[:1]).all()) else eta  # one window for all (a pinned range): [T]
            metrics["sampler/window_start_mean"] = float(reduce_mean(torch.tensor([float(sum(starts)) / len(starts)
                                                                                   ])).item())
        else:
            eta = eta_schedule(cfg.sampler.steps, base_eta, last_step_noise=cfg.sampler.last_step_noise)  # [T]
        eta = live_eta(cfg.sampler.kernel, sigmas, eta, **_kernel_options(cfg.sampler))  # a zero-std step is Euler
        streams = STEP_NOISE[cfg.sampler.step_noise]
        step_gen = streams(cfg.train.seed, it, rank, positions, "step_noise", device)  # the SDE steps' ξ
        # a window trains all its steps (METHODS §3.5, config.trained_steps): train_fraction must not cut it short
        fraction = 1.0 if cfg.sampler.window_size else cfg.sampler.train_fraction
        selected = TRAINED_STEPS[cfg.sampler.train_steps](  # [B0, T] the steps each rollout trains
            eta, fraction, noise.shape[0],
            streams(cfg.train.seed, it, rank, positions, "trained_steps"))
        trainable = selected.any(0)  # [T] steps some rollout trains (the plan's and the guide's steps)
        shift = {}
        if guide is not None:
            guide.reset()
            guide.prm.prompts = [batch_prompts[int(i)] for i in cond_index]  # [B] row prompts
            if "steps" not in cfg.sampler.guide_options:  # default: guide the steps this iteration trains
                guide.steps = set(trainable.nonzero().flatten().tolist())
            shift = {"mean_shift": guide}
        with nfe.phase("sampling"):
            traj = PLANS[cfg.sampler.plan](model.velocity, noise, sigmas, cond, eta=eta.to(device),
                                           kernel=cfg.sampler.kernel, generator=step_gen,
                                           cond_index=cond_index.to(device), group=group.to(device),
                                           prompts=batch_prompts, reduce=cfg.sampler.logp_reduce,
                                           logp_form=cfg.sampler.logp_form, keep_velocities=True,
                                           trainable=trainable,
                                           **dict(cfg.sampler.plan_options), **shift)
        row_prompts = [batch_prompts[int(i)] for i in traj.cond_index]  # plans may add rows (branch children)
        metrics["rollouts/iteration"] = traj.batch_size * world  # final samples scored (ranks hold equal shapes)

        # 7. rewards ---------------------------------------------------------------------------------------
        def score(latents: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                images = model.decode(latents)  # [N, 3, H, W] in [0, 1]
                return {k: r(images, [row_prompts[int(i)] for i in rows]).float().cpu() for k, r in rewards.items()}

        reward_vals = score(traj.final, torch.arange(traj.batch_size))  # name -> [B]
        for k, v in reward_vals.items():
            metrics[f"reward/{k}"] = _mean_over_ranks(v, reduce_mean)  # NaN (not applicable) rows left out
        metrics["reward/zero_std_ratio"] = zero_std_ratio(sum(reward_vals.values()), traj.group.cpu())
        metrics["reward/group_std"] = mean_group_std(sum(reward_vals.values()), traj.group.cpu())
        # NaN = "not applicable" (REWARDS_AND_EVAL §1): the credit gives that rollout A = 0 and the filter drops it
        nan_rows = int(torch.stack([v.isnan() for v in reward_vals.values()]).any(0).sum())
        metrics["reward/nan_rows"] = nan_rows
        if nan_rows and not warned_nan:
            logger.warning("%d rollout(s) with a NaN reward (not applicable): masked out of the advantages and the "
                           "loss (counted as reward/nan_rows)", nan_rows)
            warned_nan = True

        # 8. credit: a registered assigner, with the process-reward core as its probe -----------------------
        # [B, T]; plans that add rows (branching) run with train_steps=first, whose rows are all alike
        trained = selected if selected.shape[0] == traj.batch_size else selected[:1].expand(traj.batch_size, -1)
        if "trained" in traj.extras:  # plans that make only some edges stochastic per row (branching)
            trained = trained & traj.extras["trained"].cpu()
        extras = {}
        if guide is not None:  # the PRM scores at guided states (+ post-states) for Euphonium's process head
            extras = guide.credit_extras(traj)
            prm = extras["prm"]
            metrics["guide/prm_mean"] = _mean_over_ranks(prm[torch.isfinite(prm)], reduce_mean)
        inp = CreditInput(
            traj=traj, rewards=reward_vals, reward_weights=dict(cfg.reward.weights), trained=trained,
            aggregate=cfg.reward.aggregate, std_scope=cfg.credit.std_scope, std_eps=cfg.credit.std_eps,
            std_ddof=cfg.credit.std_ddof, adv_clip=cfg.credit.adv_clip, probe=make_probe(
                model.velocity, traj, score, terminal=reward_vals, max_batch=cfg.credit.probe_max_batch or None,
                score_batch=cfg.credit.probe_score_batch or None), extras=extras,
            reduce_sum=(lambda t: reduce_mean(t).mul_(world)) if world > 1 else None)  # global std over all ranks
        with nfe.phase("probing"):
            credit = assign_credit(cfg.credit.name, inp, cfg.credit.options)
        if credit.mask is not None:  # the credit pruned edges (BranchGRPO depth / width pruning): not re-scored
            trained = trained & credit.mask.detach().cpu().to(torch.bool)
        advs = clipped_heads(credit, trained, cfg.credit.adv_clip)  # head -> [B, T], ±A_max then weights (§3.6)
        # each head (the main one and any extra, e.g. Euphonium's process head) is its own clipped term (§3.4 multi_head)
        metrics.update({f"credit/{h}_abs_mean": float(a[trained].abs().mean()) if trained.any() else 0.0
                        for h, a in advs.items()})

        # 9. update ----------------------------------------------------------------------------------------
        any_adv = torch.stack([a != 0 for a in advs.values()]).any(0)  # [B, T]
        # drop whole rollouts whose advantage is 0 at every trained step (§3.3); a kept rollout keeps all its steps
        keep = trained & any_adv.any(1, keepdim=True) if cfg.train.filter_zero_std else trained  # [B, T]
        pairs = keep.nonzero()  # [N, 2] (rollout, step)
        metrics["train/kept_fraction"] = float(keep.any(1).float().mean())
        counts = _rank_counts(pairs.shape[0], reduce_mean, rank, world)  # every rank's pair count
        total = sum(counts)
        order = transition_order(cfg.train.seed, it, total, cfg.train.shuffle_transitions)  # [total], every rank's
        chunks = step_chunks(pairs, counts, rank, order, cfg.train.optimizer_steps_per_iter)
        bad_input = nonfinite_inputs(advs, reward_vals)
        metrics["train/nonfinite_inputs"] = int(bad_input)
        gen = streams(cfg.train.seed, it, rank, positions, "update")  # the update's own draws (nft)
        lr = cfg.train.lr * LR_SCHEDULES[cfg.train.lr_schedule](it, cfg.train.iterations)  # a function of `it` alone
        for g in opt.param_groups:
            g["lr"] = lr
        metrics["train/lr"] = lr
        stats = UPDATES[cfg.train.objective](cfg, model, opt, traj, advs, pairs, reduce_mean, nfe, skip=bad_input,
                                             inp=inp, generator=gen, chunks=chunks, loss_scale=loss_scale,
                                             on_step=on_step)
        stats.pop("_steps_taken")
        metrics.update(stats)
        if loss_scale.enabled:
            metrics["train/loss_scale"] = loss_scale.scale

        # 10. eval, log, checkpoint -------------------------------------------------------------------------
        metrics["time/iteration_s"] = time.time() - t_start  # rollouts and update; a periodic eval comes after
        # the last iteration's periodic eval is the final eval (phase 11), unless that is off (eval.after=false)
        if cfg.eval.every and (it + 1) % cfg.eval.every == 0 and (it + 1 < cfg.train.iterations or not cfg.eval.after):
            summ = evaluate(f"step-{it + 1}", it + 1)
            metrics.update({f"eval/{k}": v for k, v in _flat_summary(summ).items()})
        if world > 1:  # totals over the ranks, like rollouts/iteration (METHODS §3.6: logged values reduced)
            nfe_seen = _sync_nfe(nfe, nfe_seen, reduce_mean, world)
            _reduce_metrics(metrics, cfg.train.objective, reduce_mean, world)
        metrics.update({f"nfe/{k}": v for k, v in nfe.totals().items()})  # this iteration's eval (nfe/other) included
        metrics["time/elapsed_s"] = time.time() - t_run  # wall time of the run (its sessions up to here), evals included
        if rank == 0:
            append_jsonl(run / "metrics.jsonl", metrics)
            _tb_scalars(writer, metrics, it + 1)
            bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3f}" for k in list(metrics)
                             if k.startswith("reward/") and k[len("reward/"):] in reward_vals},  # the rewards only
                            refresh=False)  # shown with the iteration's own count (the bar advances after the body)
            if (cfg.train.checkpoint_every and (it + 1) % cfg.train.checkpoint_every == 0) or it + 1 == cfg.train.iterations:
                saved = _save_checkpoint(run, it + 1, model, opt, ema, sampler, nfe, cfg.train.keep_checkpoints,
                                         n_opt[0], loss_scale, world=world)
                logger.info("checkpoint: %s", saved)
        barrier()

    if world > 1:  # DDP sanity: every rank must hold the same weights
        import torch.distributed as dist

        flat = torch.cat([p.detach().reshape(-1).float() for p in params])
        first = flat.clone()
        dist.broadcast(first, src=0)  # rank 0's weights; the largest difference of any rank's from them
        spread_t = (flat - first).abs().max().reshape(1)
        dist.all_reduce(spread_t, op=dist.ReduceOp.MAX)
        spread = spread_t.item()
        if rank == 0:
            logger.info("max |weight difference| across %d ranks: %.3g", world, spread)
        if rank == 0:
            append_jsonl(run / "metrics.jsonl", {"iteration": cfg.train.iterations, "dist/world_size": world,
                                                  "dist/max_weight_diff": spread})

    # 11. final eval and report ------------------------------------------------------------------------------
    # 0 iterations (evaluate the base only): the final weights are the base, already evaluated when eval.before
    same_as_base = cfg.train.iterations == 0 and cfg.eval.before
    if same_as_base and cfg.eval.after and rank == 0:
        logger.info("train.iterations=0: the base evaluation (eval/base) is the run's only one; no final evaluation")
    summ = evaluate("final", cfg.train.iterations) if cfg.eval.after and not same_as_base else None
    if world > 1 and summ is not None:  # every rank's evaluation forwards, for the final record
        nfe_seen = _sync_nfe(nfe, nfe_seen, reduce_mean, world)
    if rank == 0:
        if summ is not None:  # with the forwards so far, the final evaluation's (nfe/other) included
            append_jsonl(run / "metrics.jsonl", {"iteration": cfg.train.iterations, "time/elapsed_s": time.time() - t_run,
                                                  **{f"nfe/{k}": v for k, v in nfe.totals().items()},
                                                  **{f"eval/{k}": v for k, v in _flat_summary(summ).items()}})
            _tb_scalars(writer, {f"eval/{k}": v for k, v in _flat_summary(summ).items()}, cfg.train.iterations)
        if writer is not None:
            writer.close()
        from flowalign.report import write_report

        path = write_report(run)
        logger.info("report: %s", path)
    barrier()
    return run


def _mean_over_ranks(values: torch.Tensor, reduce_mean) -> float:
    """The mean of the non-NaN entries of every rank's ``values``, NaN if there are none: ranks weigh by how many
    they hold (a rank whose rows are all NaN, "not applicable", adds nothing instead of making the mean NaN); an inf
    (a broken reward, whose update is skipped) makes it inf, as the plain nanmean did."""
    finite = values[~torch.isnan(values)].float()  # ±inf stays: a broken reward must show in the log
    tally = reduce_mean(torch.tensor([float(finite.sum()), float(finite.numel())], dtype=torch.float64))  # [2]
    return float(tally[0] / tally[1]) if tally[1] > 0 else float("nan")


def _rank_counts(n: int, reduce_mean, rank: int, world: int) -> list[int]:
    """Every rank's count ``n`` (an all-gather through the mean all-reduce: rank r fills slot r)."""
    if world == 1:
        return [n]
    vec = torch.zeros(world, dtype=torch.float64)
    vec[rank] = float(n)
    return [int(round(v)) for v in reduce_mean(vec).mul_(world).tolist()]


def transition_order(seed: int, it: int, total: int, shuffle: bool) -> torch.Tensor:
    """The order [total] of iteration ``it``'s (rollout, step) pairs of all ranks, the same on every rank: a fresh
    permutation each iteration, drawn from (``train.seed``, ``it``) alone (so a resumed run draws the same one), or
    0 … total−1 when ``train.shuffle_transitions`` is off."""
    if not shuffle:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(mix_seed(seed, it, 3)))


def nonfinite_inputs(advs: Mapping[str, torch.Tensor], rewards: Mapping[str, torch.Tensor]) -> bool:
    """Whether the update must be skipped (counted in ``train/nonfinite_inputs``): any advantage that is not finite,
    or any reward that is ±inf in any row. A NaN reward is "not applicable" (its row's advantage is 0); an inf one
    is a broken reward, and credit alone would hide a single such row (its advantage is set to 0 too)."""
    return any(not bool(torch.isfinite(a).all()) for a in advs.values()) or \
        any(bool(v.isinf().any()) for v in rewards.values())


def step_chunks(pairs: torch.Tensor, counts: Sequence[int], rank: int, order: torch.Tensor, n_steps: int
                ) -> list[torch.Tensor]:
    """This rank's (rollout, step) pairs [n_s, 2] of each of the iteration's ``n_steps`` optimizer steps.

    The ranks' pair lists, concatenated in rank order, are the one-process list (ranks hold contiguous shares of
    whole groups, row-major); that global list is put in ``order`` (a permutation of its ``sum(counts)`` indices,
    the same on every rank) and split into ``n_steps`` equal chunks, and each rank takes its own pairs of each chunk.
    So every optimizer step sees the same pairs on any number of processes, and one process gets exactly the old
    local shuffle and split."""
    offset, mine = sum(counts[:rank]), counts[rank]
    if pairs.shape[0] != mine:
        raise ValueError(f"rank {rank} holds {pairs.shape[0]} pairs, counts say {mine}")
    out = []
    for part in torch.tensor_split(order, n_steps):
        local = part[(part >= offset) & (part < offset + mine)] - offset  # this rank's pairs of the chunk, in order
        out.append(pairs[local])
    return out


def state_classes(latents: torch.Tensor, cond_index: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """For each (rollout, step) pair [n, 2], the position of the first pair with the same state: the same step, the
    same prompt row and bit-identical latents x_t. [n] long (i where pair i is the first of its state).

    Branched rollouts store one state several times: every child of a TempFlow-GRPO / G²RPO branch step (and of a
    BranchGRPO split) starts from its parent's x_k, and a group with one initial noise shares x_0. Within each
    optimizer step the update evaluates the velocity once per state (the released G²RPO trainer also runs one
    forward per branch step and repeats it over the children); which pairs go to which step is not changed. The
    match is exact (``values.first_equal``, the probe engine's dedupe too).
    """
    b, t = pairs[:, 0].to(latents.device), pairs[:, 1].to(latents.device)  # [n]
    prompt_rows = cond_index.index_select(0, pairs[:, 0].to(cond_index.device)).cpu().tolist()
    keys = list(zip(pairs[:, 1].cpu().tolist(), prompt_rows))  # (step, prompt row)
    return first_equal(lambda idx: latents[b[idx.to(b.device)], t[idx.to(t.device)]], keys)


def shared_micro_batches(classes: torch.Tensor, micro_batch: int) -> list[torch.Tensor]:
    """Positions of one optimizer step's pairs in micro-batches of at most ``micro_batch`` distinct states, the pairs
    of one state together (states in order of first appearance). With no repeated state this is
    ``torch.split(arange(n), micro_batch)``, so runs without shared states keep their exact arithmetic."""
    members: dict[int, list[int]] = {}
    for i, c in enumerate(classes.tolist()):
        members.setdefault(c, []).append(i)
    out, cur, n_states = [], [], 0
    for group in members.values():
        if n_states == micro_batch:
            out.append(torch.tensor(cur, dtype=torch.long))
            cur, n_states = [], 0
        cur.extend(group)
        n_states += 1
    if cur:
        out.append(torch.tensor(cur, dtype=torch.long))
    return out


def _once_per_state(velocity, rep: torch.Tensor, inv: torch.Tensor):
    """``velocity`` evaluated on the rows ``rep`` only (one per distinct state) and expanded to every row by ``inv``:
    the backward sums the rows' gradients into their shared forward."""
    def fn(x, sigma, cond):
        return velocity(x[rep], sigma[rep], gather_cond(cond, rep))[inv]  # [n, *latent]
    return fn


def _update(cfg, model, opt, traj, advs, pairs, reduce_mean, nfe, *, skip: bool,
            chunks: Optional[Sequence[torch.Tensor]] = None, loss_scale: Optional[LossScale] = None,
            on_step: Optional[Callable[[], None]] = None, **_: Any) -> dict:
    """Micro-batched re-scoring + clipped GRPO loss per advantage head (+ exact KL to the adapter-disabled reference).

    ``chunks``: this rank's pairs of each optimizer step (``step_chunks``); None splits ``pairs`` in order.
    ``loss_scale`` / ``on_step``: see ``_optimizer_step``."""
    tr = cfg.train
    out = {"train/skipped_updates": 0, "_steps_taken": 0}
    n_steps = tr.optimizer_steps_per_iter
    if chunks is None:
        chunks = torch.tensor_split(pairs, n_steps) if pairs.shape[0] else [pairs] * n_steps
    kernel_kw = _kernel_options(cfg.sampler)  # the rollout's kernel keywords (sampler.plan_options), for ρ ≡ 1
    mean_n, skip = _global_counts([c.shape[0] for c in chunks], skip, reduce_mean)
    eta_rows = (getattr(traj, "extras", None) or {}).get("eta_rows")  # [B, T] per-row η (windows, branches) or None
    wants_old_mean = "old_mean" in inspect.signature(SURROGATES[tr.surrogate]).parameters  # only GRPO-Guard's
    logs: dict[str, list[float]] = {}
    for chunk, n in zip(chunks, mean_n):
        if n == 0 and not skip:  # no rank has pairs in this chunk: AdamW would still move the weights (momentum,
            continue  # decay) on zero grads; every rank sees the same global count, so all of them skip together
        opt.zero_grad(set_to_none=False)
        finite = not skip
        classes = state_classes(traj.latents, traj.cond_index, chunk) if finite else None  # [n_s] shared states
        for pos in shared_micro_batches(classes, tr.micro_batch) if finite and chunk.shape[0] else []:
            mb = chunk[pos]  # [n, 2] (rollout, step); the pairs of one state are adjacent
            b, t = mb[:, 0], mb[:, 1]
            x, x_next = traj.latents[b, t], traj.latents[b, t + 1]  # [n, *latent]
            sig, sig_next = traj.sigmas[t], traj.sigmas[t + 1]  # [n]
            eta = traj.eta[t] if eta_rows is None else eta_rows[b, t].to(x.device)  # [n] each row's own η
            cond = gather_cond(traj.cond, traj.cond_index[b])
            ids, inv = torch.unique_consecutive(classes[pos], return_inverse=True)  # [U], [n]
            velocity = model.velocity
            if ids.shape[0] < mb.shape[0]:  # children of one branch state: one forward (and backward) per state
                rep = torch.zeros(ids.shape[0], dtype=torch.long).scatter_reduce(
                    0, inv, torch.arange(mb.shape[0]), reduce="amin", include_self=False)  # [U] first row of each
                velocity = _once_per_state(model.velocity, rep.to(x.device), inv.to(x.device))
            with nfe.phase("training"):
                logp, trans = step_log_prob(velocity, x, x_next, sig, sig_next, eta, cond,
                                            kernel=cfg.sampler.kernel, reduce=cfg.sampler.logp_reduce,
                                            logp_form=cfg.sampler.logp_form, **kernel_kw)
            old = traj.log_probs[b, t]
            old_mean = None  # μ_old from the rollout's cached velocity: no forward (train.surrogate=guard reads it)
            if traj.velocities is not None and wants_old_mean:
                old_mean = get_kernel(cfg.sampler.kernel)(x, traj.velocities[b, t].to(x.device), sig, sig_next, eta,
                                                          **kernel_kw).mean  # [n, *latent]
            pol = torch.zeros_like(logp)
            for adv in advs.values():
                term, ratio = SURROGATES[tr.surrogate](logp, old, adv[b.cpu(), t.cpu()].to(logp.device), tr.clip_range,
                                                       mean=trans.mean, old_mean=old_mean, std=trans.std,
                                                       delta=sig - sig_next, reduce=cfg.sampler.logp_reduce)
                pol = pol + term
            loss_sum = pol.sum()
            kl = torch.zeros_like(pol)
            if tr.beta_kl > 0:
                with torch.no_grad(), model.reference(), nfe.phase("training"):
                    _, ref = step_log_prob(velocity, x, x_next, sig, sig_next, eta, cond,
                                           kernel=cfg.sampler.kernel, reduce=cfg.sampler.logp_reduce, **kernel_kw)
                kl = gaussian_kl(trans.mean, ref.mean, trans.std, sig_next - sig, form=tr.kl_form)
                loss_sum = loss_sum + tr.beta_kl * kl.sum()
            if not torch.isfinite(loss_sum):
                finite = False
                break
            loss = loss_sum / n  # / the ranks' mean count: after the gradient all-reduce, the mean over all pairs
            (loss * loss_scale.scale if loss_scale is not None and loss_scale.enabled else loss).backward()
            for k, v in {**ratio_stats(ratio, logp, old, tr.clip_range), "policy_loss": float(pol.detach().mean()),
                         **({"kl": float(kl.detach().mean())} if tr.beta_kl > 0 else {})}.items():  # only if computed
                logs.setdefault(k, []).extend([v] * mb.shape[0])  # weight by size: the means are over pairs
        _optimizer_step(opt, finite, reduce_mean, tr, logs, out, loss_scale=loss_scale, on_step=on_step)
    for k, v in logs.items():
        out[f"train/{k}"] = sum(v) / len(v)
    out["train/transitions"] = int(pairs.shape[0])
    return out


NFE_PHASES = ("sampling", "probing", "guidance", "training", "other")  # the counter's phases, in one order on all ranks
# per-rank update statistics, averaged over the ranks weighted by each rank's pairs (grpo) or rows (nft)
PAIR_STATS = {"grpo": ("train/approx_kl", "train/clipfrac_high", "train/clipfrac_low", "train/ratio_mean",
                       "train/policy_loss", "train/kl"),
              "nft": ("train/nft_loss", "train/kl", "train/nft_r_mean")}
# ranks hold equal rollouts: these are averaged plainly
RANK_STATS = ("train/kept_fraction", "reward/zero_std_ratio", "reward/group_std", "train/nonfinite_inputs")
SUM_STATS = ("reward/nan_rows",)  # per-rank counts, logged as totals over the ranks


def _sync_nfe(nfe, seen: dict, reduce_mean, world: int) -> dict:
    """Fold every rank's forwards since the last sync into every rank's counter: the logged ``nfe/*`` become totals
    over the ranks (as ``rollouts/iteration`` is), and the checkpoint (rank 0's counter) holds them for resume.
    ``seen`` = the tally at the last sync; returns the new one. One all-reduce."""
    now = nfe.totals()
    delta = torch.tensor([float(now.get(p, 0) - seen.get(p, 0)) for p in NFE_PHASES], dtype=torch.float64)  # [P]
    total = reduce_mean(delta).mul_(world)  # [P] the forwards of all ranks
    for p, d in zip(NFE_PHASES, total.tolist()):
        if d or p in now:
            nfe.counts[p] = seen.get(p, 0) + int(round(d))
    return dict(nfe.totals())


def _reduce_metrics(metrics: dict, objective: str, reduce_mean, world: int = 1) -> None:
    """Per-rank statistics → values over all ranks, in place: the update's per-pair means weighted by each rank's
    pairs (a rank without pairs has none of them and weighs 0), the rollout/group fractions plainly (equal shares),
    ``credit/*`` plainly, the pair (row) count as the total. One all-reduce over a key list that is the same on every
    rank."""
    count_key = "train/transitions" if objective == "grpo" else "train/nft_rows"
    n = float(metrics.get(count_key, 0))
    pair = PAIR_STATS[objective]
    plain = [*RANK_STATS, *sorted(k for k in metrics if k.startswith("credit/"))]
    w = [n if k in metrics else 0.0 for k in pair]
    vec = torch.tensor([*(float(metrics.get(k, 0.0)) * wk for k, wk in zip(pair, w)), *w,
                        *(float(metrics.get(k, 0.0)) for k in plain), *(float(metrics.get(k, 0)) for k in SUM_STATS),
                        n], dtype=torch.float64)
    vec = reduce_mean(vec)
    if count_key in metrics:
        metrics[count_key] = int(round(float(vec[-1]) * world))  # all ranks' pairs (rows), like rollouts/iteration
    for k, v in zip(SUM_STATS, vec[-1 - len(SUM_STATS):-1].tolist()):
        if k in metrics:
            metrics[k] = int(round(v * world))  # a count over all ranks
    vec = vec[:-1 - len(SUM_STATS)]
    sums, weights, means = vec[:len(pair)], vec[len(pair):2 * len(pair)], vec[2 * len(pair):]
    for k, s_, w_ in zip(pair, sums.tolist(), weights.tolist()):
        if w_ > 0:
            metrics[k] = s_ / w_
    for k, v in zip(plain, means.tolist()):
        if k in metrics:
            metrics[k] = v
    if "train/nonfinite_inputs" in metrics:  # any rank: the update was skipped on all of them
        metrics["train/nonfinite_inputs"] = int(metrics["train/nonfinite_inputs"] > 0)


def _kernel_options(sp) -> dict:
    """The keyword-only kernel options in ``sampler.plan_options`` (e.g. flow_sde's ``sigma_1``): the rollout's plan
    forwards them to the kernel, so re-scoring and the reference must use them too."""
    from flowalign.samplers.kernels import get_kernel

    params = inspect.signature(get_kernel(sp.kernel)).parameters
    return {k: v for k, v in dict(sp.plan_options).items() if k in params and params[k].kind == params[k].KEYWORD_ONLY}


def _global_counts(counts: Sequence[int], skip: bool, reduce_mean) -> tuple[list[float], bool]:
    """The ranks' mean of each optimizer step's local count of pairs (rows), and whether any rank must skip.

    Dividing a rank's loss sum by the mean count makes the all-reduced (averaged) gradient the mean over every rank's
    pairs, so a rank with few pairs (zero-std filtering, uneven chunks) weighs each of them like the others do, and
    two processes take the step one process would take on the same pairs. One all-reduce; every rank gets the same
    answer, so all of them skip an empty step or a non-finite update together.
    """
    vec = reduce_mean(torch.tensor([*map(float, counts), 1.0 if skip else 0.0], dtype=torch.float64))  # [S + 1]
    return [float(v) for v in vec[:-1]], bool(vec[-1] > 0)


def _optimizer_step(opt, finite: bool, reduce_mean, tr, logs: dict, out: dict, *,
                    loss_scale: Optional[LossScale] = None, on_step: Optional[Callable[[], None]] = None) -> None:
    """All-reduce the gradients and step, unless any rank saw a non-finite value (then nothing reaches the weights).

    ``loss_scale`` (float16): the gradients are divided by its scale; an overflow in them (inputs and loss finite)
    skips the step on every rank and halves the scale (counted as ``train/overflow_steps``, not as a skipped update).
    ``on_step`` runs after each step taken (the EMA of optimizer step n reads step n's weights, METHODS.md §3.7)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    grads_ok = finite and all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
    flag = reduce_mean(torch.tensor([1.0 if finite else 0.0, 1.0 if grads_ok else 0.0]))  # [2]
    inputs_ok, all_ok = float(flag[0]) >= 1.0, float(flag[1]) >= 1.0
    scaled = loss_scale is not None and loss_scale.enabled
    if not all_ok:
        if inputs_ok and scaled:  # float16 overflow of the scaled gradients: the next step retries at half the scale
            logger.info("float16 gradient overflow at loss scale %g: step skipped, scale halved", loss_scale.scale)
            loss_scale.update(overflow=True)
            out["train/overflow_steps"] = out.get("train/overflow_steps", 0) + 1
        else:
            logger.warning("non-finite reward, advantage, loss or gradient: optimizer step skipped")
            out["train/skipped_updates"] += 1
        opt.zero_grad(set_to_none=False)
        return
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    for p in params:
        if p.grad is None and distributed:  # a rank without pairs so far must still meet the others' all-reduce
            p.grad = torch.zeros_like(p)
        if p.grad is not None:
            reduce_mean(p.grad)
            if scaled:
                p.grad.div_(loss_scale.scale)
    gn = torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm if tr.max_grad_norm > 0 else math.inf)  # 0 = off
    logs.setdefault("grad_norm", []).append(float(gn))
    opt.step()
    if scaled:
        loss_scale.update(overflow=False)
    out["_steps_taken"] += 1
    if on_step is not None:
        on_step()


def nft_row_draws(traj, rows: torch.Tensor, mode: str, generator: Generators) -> tuple[torch.Tensor, torch.Tensor]:
    """The (t [N], ε [N, *latent]) of DiffusionNFT's rows ``rows`` [N] (sample index per row): t ~ U[0.02, 0.98], then
    ``loss.NFT_NOISE[mode]``. One generator draws all rows in order; per-group generators (``sampler.step_noise=group``;
    the samples are equal contiguous blocks, one per generator) draw each group's rows, in order, from its own, so the
    draws do not depend on which groups share the process."""
    if generator is None or isinstance(generator, torch.Generator):
        t = torch.rand(rows.shape[0], generator=generator).mul(0.96).add(0.02)  # [N] in [0.02, 0.98]
        return NFT_NOISE[mode](traj, rows, t, generator)
    gens = list(generator)
    if not gens or traj.batch_size % len(gens):
        raise ValueError(f"{len(gens)} per-group generators for {traj.batch_size} samples: the samples must split "
                         "into equal contiguous blocks, one per generator")
    per = traj.batch_size // len(gens)  # samples per group
    t = torch.empty(rows.shape[0])
    eps = torch.empty((rows.shape[0], *traj.final.shape[1:]))
    for g, gen in enumerate(gens):
        sel = ((rows >= g * per) & (rows < (g + 1) * per)).nonzero().flatten()  # this group's rows, in order
        if sel.numel():
            t_g = torch.rand(sel.shape[0], generator=gen).mul(0.96).add(0.02)
            t[sel], eps[sel] = NFT_NOISE[mode](traj, rows[sel], t_g, gen)
    return t, eps


def _update_nft(cfg, model, *args: Any, **kwargs: Any) -> dict:
    """The DiffusionNFT update (``_nft_update``) on the velocity of CFG scale ``train.nft_guidance``.

    ``None`` keeps the rollouts' scale (``model.guidance``): the update fits the guided velocity
    v_u + w·(v_c − v_u), whose gradient w·∂v_c − (w − 1)·∂v_u also moves the unconditional branch. ``1.0`` fits the
    conditional velocity v_c alone, as the DiffusionNFT paper trains (one transformer pass per row instead of CFG's
    two); the rollouts and evaluation keep their own scales, so the samples still come from the guided policy.
    """
    with guidance(model, cfg.train.nft_guidance):  # None: the rollouts' scale stays
        return _nft_update(cfg, model, *args, **kwargs)


def _nft_update(cfg, model, opt, traj, advs, pairs, reduce_mean, nfe, *, skip: bool, inp: CreditInput,
                generator: torch.Generator, loss_scale: Optional[LossScale] = None,
                on_step: Optional[Callable[[], None]] = None, **_: Any) -> dict:
    """DiffusionNFT update (Zheng et al. 2025, arXiv:2509.16117): negative-aware flow matching on the final samples.

    Each kept sample x_0 (advantage ≠ 0 with ``filter_zero_std``) gets ``nft_times`` draws (t, ε), x_t = (1−t)x_0 + tε
    (ε from ``loss.NFT_NOISE[nft_noise]``: fresh, the rollout's own initial noise, or a state it visited, t then = σ),
    target v = ε − x_0; v_old is the rollout policy's velocity (these weights, before this iteration's steps, with
    the rollout's CFG) and r = ``loss.NFT_OPTIMALITY[nft_optimality]``(A). Every optimizer step passes over all
    rows in micro-batches.
    Log-probs and the sampler's steps are not used, so any kernel (the ODE included) can produce the samples.
    ``beta_kl`` > 0 adds β_KL·``velocity_kl``(v_θ, v_ref) with v_ref the adapter-disabled model at the same points
    (one more forward per row, once per iteration); ``nft_weighting`` picks the branch loss in ``loss.NFT_WEIGHTINGS``.
    """
    tr = cfg.train
    out = {"train/skipped_updates": 0, "_steps_taken": 0}
    adv = terminal_advantage(inp).to(torch.float32)  # [B]
    keep = (adv != 0) if tr.filter_zero_std else torch.ones_like(adv, dtype=torch.bool)
    rows = keep.nonzero().flatten().repeat(tr.nft_times)  # [N] sample index of each (sample, t) row
    n = rows.shape[0]
    dev = traj.final.device
    t, eps = nft_row_draws(traj, rows, tr.nft_noise, generator)  # [N], [N, *latent]
    r = NFT_OPTIMALITY[tr.nft_optimality](adv[rows])  # [N]
    out["train/nft_rows"] = n
    # the GRPO mask these metrics come from elsewhere holds no trained transitions here: the samples' own
    out["train/kept_fraction"] = float(keep.float().mean())
    out["credit/main_abs_mean"] = float(adv.abs().mean())
    out["train/nft_r_mean"] = float(r.mean()) if n else 0.5
    (mean_n,), skip = _global_counts([n], skip, reduce_mean)
    if mean_n == 0 and not skip:  # every group of every rank tied: nothing to learn (all ranks return together)
        return out
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:  # every rank all-reduces the same tensors, even one without rows
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    lat = (1,) * (traj.final.dim() - 1)

    def batch(idx: torch.Tensor):
        x0 = traj.final[rows[idx].to(dev)].float()  # [n, *latent]
        tt, e = t[idx].to(dev), eps[idx].to(dev)
        xt = (1 - tt.view(-1, *lat)) * x0 + tt.view(-1, *lat) * e  # [n, *latent]
        return xt, tt, e - x0, gather_cond(traj.cond, traj.cond_index[rows[idx].to(dev)])

    micro = torch.split(torch.arange(n), tr.micro_batch) if n and not skip else []
    v_old = [torch.empty(0, *traj.final.shape[1:], device=dev)]
    v_ref = [torch.empty(0, *traj.final.shape[1:], device=dev)]
    with torch.no_grad(), nfe.phase("training"):
        for idx in micro:
            xt, tt, _, cond = batch(idx)
            v_old.append(model.velocity(xt, tt, cond).float())
            if tr.beta_kl > 0:  # the adapter-disabled reference at the same points, once per iteration
                with model.reference():
                    v_ref.append(model.velocity(xt, tt, cond).float())
    v_old, v_ref = torch.cat(v_old), torch.cat(v_ref)  # [N, *latent] each ([0, ...] without KL)
    logs: dict[str, list[float]] = {}
    for _ in range(tr.optimizer_steps_per_iter):
        opt.zero_grad(set_to_none=False)
        finite = not skip
        for idx in micro:
            xt, tt, target, cond = batch(idx)
            with nfe.phase("training"):
                v = model.velocity(xt, tt, cond)  # [n, *latent]
            loss = nft_loss(v, v_old[idx.to(dev)], target, r[idx].to(dev), tr.nft_beta, t=tt,
                            weighting=tr.nft_weighting)  # [n]
            kl = torch.zeros_like(loss)
            if tr.beta_kl > 0:
                kl = velocity_kl(v, v_ref[idx.to(dev)])  # [n]
            total = loss + tr.beta_kl * kl  # [n]
            if not bool(torch.isfinite(total).all()):
                finite = False
                break
            loss_mb = total.sum() / mean_n  # after the all-reduce: the mean over every rank's rows of this step
            (loss_mb * loss_scale.scale if loss_scale is not None and loss_scale.enabled else loss_mb).backward()
            logs.setdefault("nft_loss", []).extend([float(loss.detach().mean())] * len(idx))  # means over rows
            if tr.beta_kl > 0:  # not computed otherwise: a logged 0 would read as a measured divergence
                logs.setdefault("kl", []).extend([float(kl.detach().mean())] * len(idx))
        _optimizer_step(opt, finite, reduce_mean, tr, logs, out, loss_scale=loss_scale, on_step=on_step)
    for k, v in logs.items():
        out[f"train/{k}"] = sum(v) / len(v)
    return out


UPDATES = {"grpo": _update, "nft": _update_nft}  # train.objective → the update of phase 9


ETA_COPY = "eta_file.json"  # a run's copy of its sampler.eta_file, as it was when the run started (exact resume)


def read_eta_file(cfg) -> tuple[list[float], dict]:
    """The per-step ``eta`` list of ``sampler.eta_file`` and the whole file, checked against the config without the
    model (``calibrate.read_eta_file``): ``train`` and ``--describe`` call it before the model loads (minutes for SD3
    or FLUX); the sigma grid and CFG scale are checked by :func:`_load_eta` once the model is there."""
    from flowalign.calibrate import read_eta_file as read

    copy = Path(cfg.output.run_dir) / ETA_COPY
    hint = (f"resume with the run's copy, sampler.eta_file={str(copy)!r}" if cfg.output.resume and copy.is_file()
            else "write it with `flowalign calibrate`")
    return read(cfg.sampler.eta_file, cfg.sampler.steps, cfg.sampler.kernel, missing_hint=hint)


def _check_resume_eta(cfg, run: Path) -> None:
    """A resumed run must sample with the noise levels it started with: the file named by ``sampler.eta_file`` may
    have been recalibrated in place since, or, as a relative path, not be found from another working directory. The
    run keeps a copy (:data:`ETA_COPY`); refuse (one line) when the file's etas differ from it, naming the copy."""
    copy = run / ETA_COPY
    if not cfg.sampler.eta_file or not copy.is_file():
        return
    hint = f"resume with the run's copy, sampler.eta_file={str(copy)!r}, or start a new output.run_dir"
    try:
        now, _ = read_eta_file(cfg)
    except UserError as e:
        raise UserError(f"cannot resume {run}: {e}; {hint}") from None
    then = [float(v) for v in json.loads(copy.read_text())["eta"]]
    if now != then:
        raise UserError(f"cannot resume {run} exactly: sampler.eta_file={cfg.sampler.eta_file!r} now holds other etas "
                        f"({_short(now)}) than the run started with ({_short(then)}); {hint}")


def _short(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values[:6]) + (" …" if len(values) > 6 else "")


def _load_eta(cfg, sigmas: Optional[torch.Tensor] = None, guidance: Optional[float] = None) -> float | torch.Tensor:
    """sampler.eta, or the per-step list in sampler.eta_file (DenseGRPO's calibrated ψ_t).

    A file from ``flowalign calibrate`` also names its kernel and sigma grid: ψ is the ``dance_sde`` noise of that
    grid, so another kernel (which would read ψ as its own η, e.g. Flow-GRPO's a) or another grid (model, shift,
    steps) is refused in one line (:func:`read_eta_file`, before the model loads; the grid here). A file calibrated
    at another CFG scale than ``guidance`` (this run's), or for another model, weights or rewards, is used with a
    warning: the balance of reward gains it was tuned to depends on them.
    """
    if not cfg.sampler.eta_file:
        return cfg.sampler.eta
    path = Path(cfg.sampler.eta_file)
    eta, data = read_eta_file(cfg)
    if sigmas is not None:
        from flowalign.calibrate import check_eta_grid

        check_eta_grid(data, sigmas, f"sampler.eta_file={str(path)!r}", cfg.sampler.steps)
    tuned = data.get("guidance")
    if (isinstance(tuned, (int, float)) and not isinstance(tuned, bool) and guidance is not None
            and abs(float(tuned) - float(guidance)) > 1e-6):
        logger.warning("sampler.eta_file=%s was calibrated at CFG scale %g and this run samples at %g: the balance of "
                       "reward gains it was tuned to depends on the scale; recalibrate with `flowalign calibrate "
                       "--guidance %g`", path, tuned, guidance, guidance)
    for what, theirs, ours in (("model", data.get("model"), cfg.model.name),
                               ("weights (--path)", data.get("path"), cfg.model.path),
                               ("rewards", data.get("rewards"), dict(cfg.reward.weights))):
        if theirs is not None and theirs != ours:
            logger.warning("sampler.eta_file=%s was calibrated for %s %r and this run uses %r: the noise levels were "
                           "tuned to that model's reward gains; recalibrate with `flowalign calibrate` for this run",
                           path, what, theirs, ours)
    return torch.tensor(eta, dtype=torch.float32)


def _flat_summary(summ: dict) -> dict:
    flat = {f"overall/{k}": v for k, v in summ.get("overall", {}).items()}
    for task, d in summ.get("per_task", {}).items():
        flat.update({f"{task}/{k}": v for k, v in d.items()})
    return flat


def _tensorboard(run: Path, cfg, start: int = 0):
    if not cfg.output.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: metrics.jsonl still has everything
        logger.warning("tensorboard is not installed; writing metrics.jsonl only")
        return None
    # on resume from iteration `start`, TensorBoard drops the earlier session's events from step start + 1 on (a
    # killed run may have logged iterations after its last checkpoint), as _truncate_metrics does for metrics.jsonl.
    # A resume that only re-runs the end (start = train.iterations) re-writes the final evaluation at step `start`:
    # that step is purged too and the lines metrics.jsonl keeps for it (the last iteration's) written again.
    rerun_end = bool(start) and start == cfg.train.iterations
    writer = SummaryWriter(str(run / "tb"), purge_step=(start if rerun_end else start + 1) if start else None)
    if rerun_end and (run / "metrics.jsonl").is_file():
        from flowalign.io import read_jsonl

        for rec in read_jsonl(run / "metrics.jsonl"):
            if rec.get("iteration") == start:
                _tb_scalars(writer, {k: v for k, v in rec.items() if k != "iteration"}, start)
    return writer


def _save_checkpoint(run: Path, step: int, model, opt, ema, sampler, nfe, keep: int,
                     opt_steps: Optional[int] = None, loss_scale: Optional[LossScale] = None, world: int = 1) -> Path:
    """checkpoints/step-N/: the (EMA) LoRA in diffusers format + full training state + ``meta.json`` (the number of
    processes that wrote it, checked on resume before anything loads); written atomically (``io.atomic_dir``: every
    file fsynced before the directory appears under its name)."""
    final = run / "checkpoints" / f"step-{step}"
    for stale in final.parent.glob(f".{final.name}.*.tmp"):  # left by a process killed while writing this step
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(final) as tmp:
        with (ema.applied() if ema is not None else contextlib.nullcontext()):
            model.save_lora(tmp)  # what users load: the EMA weights when EMA is on
        (tmp / "raw").mkdir()
        model.save_lora(tmp / "raw")  # the live weights, for exact resume
        state = {"iteration": step, "optimizer": opt.state_dict(), "ema": ema.shadow if ema is not None else None,
                 "sampler": sampler.state_dict(), "nfe": nfe.state_dict(), "torch_rng": torch.get_rng_state(),
                 "opt_steps": opt_steps, "loss_scale": loss_scale.state_dict() if loss_scale is not None else None}
        atomic_save(state, tmp / "state.pt")
        atomic_write_text(tmp / CHECKPOINT_META, json.dumps({"iteration": step, "world_size": world}) + "\n")
        atomic_write_text(tmp / "COMPLETE", str(step))
    ckpts = sorted((int(p.name.split("-")[1]), p) for p in final.parent.glob("step-*") if p.name[5:].isdigit())
    for _, old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(ckpt: Path, model, opt, ema, sampler, nfe,
                     loss_scale: Optional[LossScale] = None) -> tuple[int, Optional[int]]:
    """Restore the training state; returns (iteration, optimizer steps taken, or None for older checkpoints)."""
    try:
        if not (ckpt / "COMPLETE").exists():
            raise ValueError("incomplete (no COMPLETE marker)")
        model.load_lora(ckpt / "raw")
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        opt.load_state_dict(state["optimizer"])
        if ema is not None and state["ema"] is not None:
            for s, v in zip(ema.shadow, state["ema"]):
                s.copy_(v)
        sampler.load_state_dict(state["sampler"])
        nfe.load_state_dict(state.get("nfe", {}))
        if loss_scale is not None:
            loss_scale.load_state_dict(state.get("loss_scale"))
        torch.set_rng_state(state["torch_rng"])
        steps = state.get("opt_steps")
        return int(state["iteration"]), (None if steps is None else int(steps))
    except UserError:
        raise
    except Exception as e:  # a corrupted checkpoint is bad input: one line, exit 2
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot resume from {ckpt}: corrupted checkpoint ({first}); delete it or resume from an "
                        f"earlier one") from e


def cli_main(argv: Sequence[str]) -> int:

    p = CommandParser(prog="flowalign train", description="GRPO or DiffusionNFT (train.objective=nft) fine-tuning from a YAML config.")
    p.add_argument("config", nargs="?", help="experiment YAML (e.g. configs/shapes_grpo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 credit.name=outcome")
    p.add_argument("--describe", action="store_true",
                   help="print every config field with its doc and exit: the values of CONFIG and its overrides when "
                        "given (validated), else the defaults")
    argv = list(argv)
    if "--describe" in argv:  # anywhere among the positionals: argparse takes it only before or after all of them
        argv = ["--describe", *(a for a in argv if a != "--describe")]
    args = p.parse_args(argv)
    if args.describe:
        import sys

        config, overrides = args.config, list(args.overrides)
        if config and "=" in config and not Path(config).exists():  # `--describe train.lr=1e-4`: overrides only
            config, overrides = None, [config, *overrides]
        cfg = C.load_config(config, overrides) if config or overrides else None
        if cfg is not None:  # "(validated)": registry names and options too, as train checks them (not the device)
            _check_components(cfg, check_device=False)
        sys.stdout.write(C.describe(C.ExperimentConfig, cfg) + "\n")
        return 0
    if not args.config:
        p.error("the following argument is required: config (an experiment YAML, e.g. configs/shapes_grpo.yaml)")
    cfg = C.load_config(args.config, args.overrides)
    try:
        run = train(cfg)
    except KeyboardInterrupt:  # the hint the CLI prints says what a resume would continue from
        raise KeyboardInterrupt(interrupt_hint(Path(cfg.output.run_dir), cfg.train.checkpoint_every,
                                               cfg.output.overwrite)) from None
    ckpt = _latest_checkpoint(run)
    if process_group()[0] == 0:  # once, not per rank under accelerate launch
        logger.info("done: %s (report.html%s)", run, f", LoRA: {ckpt}" if ckpt is not None else "")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Clean exit of gloo workers: without it ~5-25% of CPU runs abort at interpreter exit (ENVIRONMENT.md).
        import sys

        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
