"""Experiment configuration: frozen dataclasses are the schema, YAML files are experiments (DESIGN.md §5).

    cfg = load_config("configs/shapes_grpo.yaml", ["train.lr=1e-4", "credit.name=turning_points"])

* **Schema.** Nested frozen dataclasses; every field carries a one-line doc in ``metadata["doc"]``
  (``describe(ExperimentConfig)`` prints them all, as a commented YAML template).
* **Files.** A YAML file may include others with ``defaults: [base.yaml, ...]`` or ``base: base.yaml`` (paths
  relative to the including file); includes are merged first, in order, then the file on top. So scale-out
  is a second YAML that names the first as its base. Sections merge key by key; a mapping-valued *field*
  (``reward.weights``, ``reward.kwargs``, ``credit.options``) set by a file replaces the inherited mapping as a
  whole (a file naming ``weights: {pickscore: 1}`` means only PickScore).
* **Overrides.** ``section.field=value`` with the value parsed by ``yaml.safe_load`` and coerced to the field
  type. A dotted path that goes *into* a mapping field updates one key (``reward.weights.shapes_partial=0.5``;
  ``=null`` removes the key); ``reward.weights={pickscore: 1}`` replaces it.
* **Strict.** Unknown keys fail with the full dotted path and the closest valid key; values are coerced to the
  field type (PyYAML 1.1 reads ``1e-4`` as a *string*; ints widen to floats; ``2.5`` for an int field fails;
  Literal choices are listed). Every problem is one-line :class:`~flowalign.errors.UserError`.
* **Derived.** :func:`derived` computes and checks rollouts per iteration, groups per rank, trained steps,
  transitions and micro-batches; :func:`summary` prints them at start.

Configs are data only: no arithmetic, no GPU counts (the world size comes from the launcher).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from flowalign.errors import UserError, first_line

MAX_STEPS = 10_000
"""The most sampling steps any option takes (``sampler.steps``, ``eval.steps``, ``--steps``, a protocol's steps): far
above any schedule in use (SD3.5 and FLUX 28–50, Wan 50, fine reference solves 1,000), and it turns a typo such as
``--steps 1000000000`` into one line before the model loads instead of an 8 GB sigma grid and an out-of-memory kill."""


MAX_SEEDS = 10_000
"""The most images per prompt any option takes (``--seeds`` of ``eval`` and ``sample``, ``eval.seeds_per_prompt``,
``steer``'s seeds × particles): every image keeps its own noise seed (``evaluate.image_seed`` gives distinct seeds
while prompts + k stay below about 46,000), and a typo such as ``--seeds 100000000`` is one line before the model
loads instead of a job list that fills the memory."""


MAX_ROLLOUTS = 100_000
"""The most rollouts one training iteration takes (``train.groups_per_iter`` × ``train.group_size``): about 90 times
Flow-GRPO's published recipe (48 groups × 24 = 1,152), and a typo such as ``train.group_size=100000000`` is one
line before anything is written instead of a MemoryError traceback after the model loaded."""


def check_max_seeds(value: int | None, flag: str = "--seeds") -> None:
    """A one-line ``UserError`` when ``value`` images per prompt (None = the default) is above ``MAX_SEEDS``."""
    if value is not None and value > MAX_SEEDS:
        raise UserError(f"{flag} {value} is above the limit of {MAX_SEEDS} images per prompt; pass a smaller {flag}")


def check_max_steps(value: int | None, flag: str = "--steps") -> None:
    """A one-line ``UserError`` when a command's step count ``value`` (None = the default) is above ``MAX_STEPS``."""
    if value is not None and value > MAX_STEPS:
        raise UserError(f"{flag} {value} is above the limit of {MAX_STEPS} sampling steps; pass {flag} N, e.g. the "
                        f"default (leave {flag} out)")

logger = logging.getLogger(__name__)

__all__ = [
    "ModelConfig", "SamplerConfig", "RewardConfig", "CreditConfig", "TrainConfig", "DataConfig", "EvalConfig",
    "OutputConfig", "ExperimentConfig", "load_config", "apply_overrides", "from_dict", "to_dict", "dump_yaml",
    "describe", "summary", "derived", "validate", "trained_steps", "window_bounds",
]


def _f(default: Any, doc: str) -> Any:
    """A dataclass field with a one-line doc; mutable defaults become factories."""
    if isinstance(default, (dict, list)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc})


# ----------------------------------------------------------------------------------------------------------
# The schema. Names are stable: train.py, evaluate.py and the configs code against them.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("shapes", "model family, a key of flowalign.models.MODELS (shapes | shapes_video | sd3 | flux | wan)")
    path: str = _f("", "local directory or hub id of the weights; '' = the family default (shapes: the shipped model)")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "autocast dtype of transformer forwards; SDE math stays fp32; float16 trains with dynamic loss scaling")
    device: str = _f("cpu", "torch device for this process (cpu, cuda, cuda:1); under accelerate the rank's device wins")
    guidance: float = _f(4.5, "classifier-free guidance scale used for rollouts and training forwards (1 = no CFG)")
    lora_rank: int = _f(0, "LoRA rank r; 0 = the family default (METHODS §3.7)")
    lora_alpha: float = _f(0.0, "LoRA alpha; 0 = 2 x rank (the published recipes)")
    lora_targets: tuple[str, ...] = _f((), "LoRA target modules (peft names, matched as module-path suffixes); [] = the family default")
    resolution: int = _f(0, "image side in pixels (the loader's height = width; sd3, flux, wan); 0 = the model default")
    kwargs: dict = _f({}, "extra keyword arguments for the family's from_pretrained (family specific)")
    gradient_checkpointing: bool = _f(False, "recompute the transformer blocks' activations in the backward pass (diffusers' enable_gradient_checkpointing): far less activation memory per training forward (`flowalign bench train-memory`), about one more forward of compute, the same gradients")


@dataclass(frozen=True)
class SamplerConfig:
    kernel: Literal["euler", "flow_sde", "dance_sde", "cps", "ddim_sde"] = _f("flow_sde", "rollout step kernel (flowalign.samplers.kernels.KERNELS)")
    eta: float = _f(0.7, "noise level of the SDE kernel (Flow-GRPO a, DanceGRPO g, CPS a); 0 = ODE")
    steps: int = _f(10, "rollout steps T (sigma grid has T+1 points)")
    train_fraction: float = _f(0.99, "trained steps = the first floor(frac*T) steps (Flow-GRPO); the last step is never trained; with sampler.window_size > 0 the window's steps are trained instead")
    train_steps: Literal["first", "random"] = _f("first", "which steps are trained: the first floor(frac*T) (Flow-GRPO), or per rollout a random floor(frac*(T-1)) of steps 0..T-2 (DanceGRPO)")
    window_size: int = _f(0, "SDE window width n (Flow-GRPO-Fast); 0 = no window, every step stochastic")
    window_range: tuple[int, int] = _f((0, 0), "window start t0 ~ U{lo..hi-n}, drawn per group from (train.seed, iteration, group) (the same for any world size); (0, 0) = (0, T-1)")
    last_step_noise: bool = _f(False, "add SDE noise at the untrained last step (Flow-GRPO quirk Q1)")
    logp_reduce: Literal["mean", "sum"] = _f("mean", "reduction of the per-step log-density over latent elements (clip ranges assume mean)")
    logp_form: Literal["exact", "cps_mse"] = _f("exact", "true Gaussian log-density, or CPS's -MSE surrogate for parity (Q6)")
    eta_file: str = _f("", "JSON with a per-step 'eta' list (e.g. from `flowalign calibrate`); overrides sampler.eta")
    init_noise: Literal["member", "group"] = _f("member", "initial noise: one draw per rollout (Flow-GRPO) or one per group, shared by its members (DanceGRPO)")
    step_noise: Literal["rank", "group"] = _f("rank", "SDE step-noise and NFT-draw streams (train.STEP_NOISE): one per process (rank; the documented runs), or one per prompt group (group: runs do not depend on the number of processes)")
    plan: Literal["chain", "branch", "tree"] = _f("chain", "rollout plan (flowalign.samplers.plans.PLANS): chains, TempFlow branching, or BranchGRPO trees")
    plan_options: dict = _f({}, "plan options, e.g. {children: 4, branch_steps: random} for the branch plan, {split_steps: [0, 3], branching: 2} for the tree plan (split_noise_scale: 4.0 with kernel dance_sde, eta 0.3, as BranchGRPO)")
    guide: str = _f("none", "rollout mean shift (flowalign.values.GUIDES): none, or reward_grad (Euphonium's reward-gradient-guided SDE; log-probs stay unguided)")
    guide_options: dict = _f({}, "guide options, e.g. {lam: 300.0, rewards: {saturation: 1.0}, probe: x0, normalize: false, steps: [3, 4, 5], chunk: 4}; steps default to the trained steps; chunk = rows per PRM backward (default the whole batch)")


@dataclass(frozen=True)
class RewardConfig:
    weights: dict[str, float] = _f({"shapes_partial": 1.0}, "training rewards and their weights (names from flowalign.rewards.REWARDS)")
    aggregate: Literal["reward_sum", "advantage_sum"] = _f("advantage_sum", "multi-reward aggregation: sum raw rewards, or sum per-reward advantages (METHODS §3.4)")
    kwargs: dict[str, dict] = _f({}, "per-reward constructor kwargs, e.g. {pickscore: {path: /weights/pickscore}}")
    per_frame: dict = _f({}, "on a video model, how image rewards score the frames: PerFrame options {stride: 4, reduce: mean|min|first|mean_positive, temporal_weight: 0.0, temporal: auto}; {} = every 4th frame, mean")


@dataclass(frozen=True)
class CreditConfig:
    name: str = _f("outcome", "credit assigner, a key of flowalign.credit.CREDIT (outcome, dense_gain, turning_points, ...)")
    std_scope: Literal["group", "global"] = _f("group", "advantage std over the group, or over all rewards of the iteration")
    std_eps: float = _f(1e-4, "eps added to the std in the advantage denominator")
    std_ddof: int = _f(0, "std estimator: 0 = population (Flow-GRPO), 1 = unbiased (DanceGRPO)")
    adv_clip: float = _f(5.0, "advantages are clipped to [-A_max, A_max] before per-step weights")
    options: dict = _f({}, "assigner-specific options (probe mode, balance scope, ...), passed as keyword arguments")
    probe_max_batch: int = _f(0, "rows per transformer forward in the value probes of dense credit (0 = all probed states at once); bounds their memory")
    probe_score_batch: int = _f(0, "probe endpoints per decode + reward call (0 = all at once)")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = _f(42, "master seed: prompt order, initial noise (seed, iteration, group, member), windows")
    iterations: int = _f(100, "training iterations (rollout + update rounds)")
    objective: Literal["grpo", "nft"] = _f("grpo", "update rule: grpo (clipped policy gradient on the stored SDE transitions) | nft (DiffusionNFT: negative-aware flow matching on the final samples; any sampler, ODE included)")
    groups_per_iter: int = _f(8, "prompt groups per iteration, across all ranks")
    group_size: int = _f(8, "rollouts per prompt G, compared with each other")
    micro_batch: int = _f(16, "transitions per forward/backward in the update (GRPO: distinct states; branch children sharing x_k ride along)")
    optimizer_steps_per_iter: int = _f(1, "optimizer steps per iteration (only the first is on-policy)")
    lr: float = _f(3e-4, "AdamW learning rate (peak, before train.lr_schedule's factor)")
    lr_schedule: Literal["constant", "cosine"] = _f("constant", "learning-rate factor per iteration: constant | cosine (½·(1 + cos(π·it/iterations)), decays towards 0 at the last iteration; it follows train.iterations, so resuming with another value changes it)")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    adam_eps: float = _f(1e-8, "AdamW eps")
    max_grad_norm: float = _f(1.0, "gradient-norm clip; 0 = off")
    clip_range: float = _f(1e-4, "PPO ratio clip epsilon (calibrated to mean-reduced log-probs)")
    surrogate: Literal["clipped", "guard"] = _f("clipped", "GRPO policy loss: clipped (Flow-GRPO's PPO ratio clip) | guard (GRPO-Guard: the ratio re-centred by the mean-shift bias and scaled by the step std, loss divided by the step size; METHODS §3.9; the reference clip is 2e-6; needs sampler.logp_form=exact)")
    beta_kl: float = _f(0.0, "weight of the KL to the reference (LoRA disabled); with objective=nft the velocity form β·‖v_θ − v_ref‖²")
    kl_form: Literal["exact", "flow_grpo"] = _f("exact", "exact Gaussian KL, or Flow-GRPO's form without |dt| (Q3)")
    ema: bool = _f(True, "keep an EMA of the trainable weights, used for evaluation and checkpoints")
    ema_decay_max: float = _f(0.9, "EMA decay d_n = min((1+n)/(10+n), ema_decay_max)")
    ema_every: int = _f(8, "EMA update every this many optimizer steps")
    nft_beta: float = _f(1.0, "DiffusionNFT beta: implicit policies v± = v_old ± beta·(v_theta − v_old) (objective=nft)")
    nft_weighting: Literal["uniform", "adaptive"] = _f("uniform", "DiffusionNFT loss weight per row: uniform (velocity MSE) | adaptive (the paper's x_0-error self-normalisation) (objective=nft)")
    nft_optimality: Literal["clip", "positive", "self"] = _f("clip", "DiffusionNFT r from the advantage A: clip (½ + ½·clip(A, −1, 1), the paper) | positive (1 where A > 0, else ½: fit the better samples only; collapses on the shapes world, docs/results.md) | self (r = 1 for all: reward-free self-distillation, a diagnostic; use with train.filter_zero_std=false) (objective=nft)")
    nft_guidance: float | None = _f(None, "DiffusionNFT: CFG scale of the velocity the update fits; null = model.guidance (the rollouts'), 1 = the conditional velocity alone, one pass per row (objective=nft)")
    nft_noise: Literal["fresh", "initial", "path"] = _f("fresh", "DiffusionNFT: the noise ε of each row's x_t = (1−t)x_0 + tε: fresh (a new draw, the paper) | initial (the rollout's own initial noise, so the update fits the straight line from the noise that produced the sample: a reward-weighted reflow coupling) | path (a state x_k the rollout visited, t = σ_k, target (x_k − x_0)/σ_k); neither beat fresh on the shapes world, docs/results.md (objective=nft)")
    nft_times: int = _f(4, "DiffusionNFT: noise levels t ~ U(0.02, 0.98) drawn per final sample and iteration (objective=nft)")
    filter_zero_std: bool = _f(True, "drop rollouts whose advantage is 0 at every trained step")
    shuffle_transitions: bool = _f(True, "shuffle the (rollout, step) transitions before splitting into micro-batches")
    checkpoint_every: int = _f(10, "save a checkpoint every this many iterations (0 = only at the end)")
    keep_checkpoints: int = _f(2, "number of most recent checkpoints kept (0 = keep all)")


@dataclass(frozen=True)
class DataConfig:
    train_prompts: str = _f("shapes-train", "training prompt set: built-in name (flowalign.data.BUILTIN_PROMPTS) or .txt/.jsonl path")
    eval_prompts: str = _f("shapes-bench", "evaluation prompt set: built-in name or .txt/.jsonl path")
    shuffle: bool = _f(True, "shuffle training prompts every epoch (deterministic from train.seed)")


@dataclass(frozen=True)
class EvalConfig:
    every: int = _f(0, "evaluate every this many iterations; 0 = only before and after training")
    steps: int = _f(10, "sampling steps for evaluation")
    guidance: float = _f(4.5, "CFG scale for evaluation (explicit, not the training one: Q8)")
    kernel: Literal["euler"] = _f("euler", "evaluation kernel: euler only (the deterministic ODE protocol every reported number uses)")
    seeds_per_prompt: int = _f(4, "images per evaluation prompt (image k of prompt i gets the noise seed of (i, k))")
    batch_size: int = _f(64, "images per evaluation forward batch")
    max_prompts: int = _f(0, "evaluate an evenly spaced subset of N prompts (every task keeps its share); 0 = all")
    grid_prompts: int = _f(8, "prompts shown in the before/after image grids; 0 = no grids")
    rewards: tuple[str, ...] = _f(("shapes_strict", "shapes_partial"), "rewards reported at evaluation (first = headline metric)")
    before: bool = _f(True, "evaluate the base model before training (eval/base)")
    after: bool = _f(True, "evaluate the trained model after training (eval/final)")


@dataclass(frozen=True)
class OutputConfig:
    run_dir: str = _f("runs/shapes_grpo", "run directory: config.yaml, metrics.jsonl, checkpoints/, eval/, grids/, plots/, tb/, report.html")
    overwrite: bool = _f(False, "start afresh in a non-empty run directory: it is deleted first (default: refuse, nothing is overwritten)")
    resume: bool = _f(False, "resume from the latest checkpoint in run_dir, or start fresh when it holds none yet, so one command starts and continues a run (exact; only output.*, eval.*, data.eval_prompts, train.iterations, checkpointing and model.device may differ from the run's config.yaml)")
    tensorboard: bool = _f(True, "also write TensorBoard event files")


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = _section(ModelConfig, "the generator")
    sampler: SamplerConfig = _section(SamplerConfig, "rollout sampling")
    reward: RewardConfig = _section(RewardConfig, "training rewards")
    credit: CreditConfig = _section(CreditConfig, "advantage / credit assignment")
    train: TrainConfig = _section(TrainConfig, "GRPO optimisation")
    data: DataConfig = _section(DataConfig, "prompt sets")
    eval: EvalConfig = _section(EvalConfig, "evaluation during and after training")
    output: OutputConfig = _section(OutputConfig, "run directory and logging")


INCLUDE_KEYS = ("defaults", "base")


# ----------------------------------------------------------------------------------------------------------
# Type handling
# ----------------------------------------------------------------------------------------------------------

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any"
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(inner) + (" | null" if type(None) in args else "")
    if origin is not None:
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"list[{_type_name(args[0])}]"
        name = {tuple: "tuple", list: "list", dict: "dict"}.get(origin, getattr(origin, "__name__", str(origin)))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unspaced(key: Any, value: Any, raw: str = "") -> str | None:
    """``"saturation: 1.0"`` when the item ``key: value`` is what YAML makes of ``saturation:1.0`` written without a
    space after ':' (one key, ``saturation:1.0``, whose value is null); else None. A key quoted in ``raw`` (the text
    it was read from) is meant as written."""
    if value is not None or not isinstance(key, str) or f'"{key}"' in raw or f"'{key}'" in raw:
        return None
    name, colon, rest = (part.strip() for part in key.partition(":"))
    if not (colon and re.fullmatch(r"[\w.-]+", name) and rest and not rest.startswith("//")):  # no URL
        return None
    return f"{name}: {rest}"


def _unspaced_keys(value: Any, raw: str = "") -> dict[str, str]:
    """Every key of ``value`` (nested mappings and lists too) that :func:`_unspaced` reads as a missing space, with
    its spaced form, in order."""
    found: dict[str, str] = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            spaced = _unspaced(k, v, raw)
            if spaced is not None:
                found.setdefault(k, spaced)
            found.update({a: b for a, b in _unspaced_keys(v, raw).items() if a not in found})
    elif isinstance(value, (list, tuple)):
        for v in value:
            found.update({a: b for a, b in _unspaced_keys(v, raw).items() if a not in found})
    return found


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce a YAML/override value to the annotated type, or raise a one-line UserError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expected: str) -> UserError:
        return UserError(f"{where}: expected {expected}, got {_short(value)} ({type(value).__name__})")

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError:
                pass
        raise fail(_type_name(tp))
    if origin is Literal:
        choices = args
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return choice
        # allow e.g. a YAML-parsed 1 for a Literal["1"] or "2" for Literal[2]
        for choice in choices:
            try:
                if _coerce(value, type(choice), where) == choice:
                    return choice
            except UserError:
                pass
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"{where}: {_short(value)} is not one of {', '.join(repr(c) for c in choices)}{hint}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise fail(f"a mapping (section {where})")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise fail("a bool (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise fail("an int")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                return int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    raise fail("an int") from None
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            if abs(value) >= 2**53:  # from 2**53 on, the float may have rounded the typed digits (another seed, silently)
                raise UserError(f"{where}: {_short(value)} is too large to be an exact int as a float; "
                                "write the digits without a decimal point or exponent")
            return int(value)
        raise fail("an int")
    if tp is float:
        if isinstance(value, bool):
            raise fail("a float")
        if isinstance(value, (int, float)):
            try:
                return float(value)
            except OverflowError:  # an int beyond the float range
                raise fail("a float") from None
        if isinstance(value, str):
            try:
                return float(value.strip().replace("_", ""))
            except ValueError:
                raise fail("a float") from None
        raise fail("a float")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. run_dir=2024 or a numeric hub revision
        import datetime

        if isinstance(value, (datetime.date, datetime.datetime)):  # YAML reads `run_dir: 2024-06-01` as a date
            return str(value)  # as typed ('2024-06-01', '2024-06-01 12:30:00'), the same as on the command line
        raise fail("a string")
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, str):
            # `window_range=0,5` on the command line: parse as a YAML flow sequence
            import yaml

            try:
                value = yaml.safe_load(f"[{value}]")
            except yaml.YAMLError:
                raise fail(_type_name(tp)) from None
        if not isinstance(value, (list, tuple)):
            raise fail(_type_name(tp))
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise UserError(f"{where}: expected {len(args)} values ({_type_name(tp)}), got {len(value)}: {_short(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            spaced = _unspaced(value, None) if isinstance(value, str) and "{" not in value else None
            if spaced is not None:  # `weights=saturation:1.0`: one string
                raise UserError(f"{where}: expected a mapping {{key: value}}, got {_short(value)} (str); YAML needs a "
                                f"space after ':' — write {{{spaced}}}")
            raise fail("a mapping {key: value}")
        ktp, vtp = (args if args else (Any, Any))
        return {_coerce(k, ktp, f"{where} key"): _coerce(v, vtp, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail(_type_name(tp))


ALIASES = {  # names other tools (diffusers, Flow-GRPO's configs, `flowalign eval`'s flags) give to our fields
    "learning_rate": "train.lr", "seeds": "eval.seeds_per_prompt", "num_seeds": "eval.seeds_per_prompt",
    "prompts": "data.train_prompts or data.eval_prompts", "prompt_file": "data.train_prompts or data.eval_prompts",
    "batch_size": "train.micro_batch (update) or eval.batch_size (evaluation)",
    "num_inference_steps": "sampler.steps (rollouts) or eval.steps", "num_steps": "sampler.steps or eval.steps",
    "guidance_scale": "model.guidance or eval.guidance", "cfg": "model.guidance or eval.guidance",
    "num_generations": "train.group_size", "group": "train.group_size", "num_iterations": "train.iterations",
    "epochs": "train.iterations", "beta": "train.beta_kl (KL) or train.nft_beta (NFT)", "kl": "train.beta_kl",
    "clip": "train.clip_range", "output_dir": "output.run_dir", "out": "output.run_dir", "lora_r": "model.lora_rank",
}


def _closest_hint(key: str, cls: type, prefix: str, root: type | None = None) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    if key in ALIASES:
        return f"did you mean {ALIASES[key]}?"
    # a field that starts with what was typed (eval.seeds -> eval.seeds_per_prompt) before one a few letters away
    longer = [n for n in names if n.startswith(key) and len(key) >= 3]
    close = longer[:1] or difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    # the key may belong to another section (e.g. `lr` at the top level or under sampler): search every leaf path
    leaves = _leaf_paths(root, "") if root is not None else _leaf_paths(cls, prefix)
    matches = [p for p in leaves if p.rsplit(".", 1)[-1] == key]
    if not matches:
        tails = {p.rsplit(".", 1)[-1]: p for p in leaves}
        close = difflib.get_close_matches(key, list(tails), n=1, cutoff=0.6)
        matches = [tails[close[0]]] if close else []
    if matches:
        return f"did you mean '{matches[0]}'?"
    return f"valid keys: {', '.join(prefix + n for n in names)}"


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaf_paths(tp, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _check_keys(raw: Mapping, cls: type, prefix: str, source: str, root: type | None = None) -> None:
    """Fail on the first unknown key (full dotted path + closest valid key)."""
    root = root or (cls if not prefix else None)
    names = {f.name for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    for key, value in raw.items():
        if not isinstance(key, str):
            raise UserError(f"{source}: config keys must be strings, got {key!r} under '{prefix or '<top>'}'")
        if key not in names:
            raise UserError(f"{source}: unknown config key '{prefix}{key}'; {_closest_hint(key, cls, prefix, root)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise UserError(f"{source}: '{prefix}{key}' is a section and needs a mapping, got {_short(value)}")
            _check_keys(value, tp, f"{prefix}{key}.", source, root)


def _build(cls: type, raw: Mapping, where: str = "") -> Any:
    """Construct dataclass ``cls`` from a (possibly partial) mapping, coercing every value."""
    prefix = f"{where}." if where else ""
    _check_keys(raw, cls, prefix, "config")
    hints = _hints(cls)
    kwargs = {}
    for key, value in raw.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and value is None:
            continue
        kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def _unique_key_loader():
    """A ``yaml.SafeLoader`` that refuses a key repeated in one mapping (PyYAML keeps the last one silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: construct_mapping flattens it
                continue
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return loader.construct_mapping(node, deep=deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return UniqueKeyLoader


def _not_found(what: str, path: Path) -> str:
    """The one line for a missing config file. The example configs (``configs/*.yaml``) ship only in a source
    checkout, not in the installed package: `flowalign train configs/shapes_grpo.yaml` run elsewhere (a pip-installed
    wheel) said only "not found", so the line says where they live and how to fix it."""
    if path.is_dir():
        return f"{what} not found: {path} (it is a directory); pass the path to a YAML file"
    shown = str(path) if path.is_absolute() else f"{path} (resolved to {Path.cwd() / path})"
    if not path.is_absolute() and path.parts[:1] == ("configs",):
        return (f"{what} not found: {shown}; the example configs live in the configs/ directory of a flowalign source "
                f"checkout (not in the installed package): run from the root of a flowalign checkout, or pass the "
                f"path to a YAML file")
    return (f"{what} not found: {shown}; pass the path to a YAML file (the example configs, configs/*.yaml, are in "
            f"the root of a flowalign source checkout)")


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The YAML document in ``path`` (None when empty); every failure is one ``UserError`` line, a malformed file
    as ``FILE:LINE:COL: malformed YAML: …``, a key repeated in one mapping included. Shared by ``train`` and
    ``pretrain``; ``what`` names the file in the messages."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(_not_found(what, path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {what} {path}: {err}") from None
    try:
        return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        loc = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{loc}: malformed YAML: {problem}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # PyYAML's constructors, e.g. `!!float abc`
        first = first_line(err)
        raise UserError(f"{path}: malformed YAML: cannot construct a value ({first})") from None


def _read_yaml(path: Path) -> dict:
    data = read_yaml_file(path)
    if data is None:
        logger.warning("config file %s is empty: every setting takes its default (see `flowalign train --describe`)",
                       path)
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of sections (model:, train:, ...), got {type(data).__name__}")
    return data


def _merge(base: dict, layer: Mapping, cls: type) -> dict:
    """Merge ``layer`` on top of ``base`` (both plain dicts shaped like ``cls``): sections recurse, fields replace."""
    out = dict(base)
    hints = _hints(cls)
    for key, value in layer.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                continue
            out[key] = _merge(out.get(key) or {}, value, tp)
        else:
            out[key] = value
    return out


def _load_file(path: Path, schema: type, stack: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(p.name for p in (*stack, path))
        raise UserError(f"config include cycle: {chain}")
    raw = _read_yaml(path)
    includes: list[str] = []
    for key in INCLUDE_KEYS:
        if key in raw:
            value = raw.pop(key)
            if value is None:
                continue
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UserError(f"{path}: '{key}' must be a file name or a list of file names, got {_short(value)}")
            includes += value
    merged: dict = {}
    for inc in includes:
        inc_path = Path(inc).expanduser()
        if not inc_path.is_absolute():
            inc_path = path.parent / inc_path
        if not inc_path.is_file():
            raise UserError(f"{path}: included config '{inc}' not found (looked at {inc_path})")
        merged = _merge(merged, _load_file(inc_path, schema, (*stack, path)), schema)
    _check_keys(raw, schema, "", str(path))
    _validate_values(raw, schema, "", str(path))
    return _merge(merged, raw, schema)


def _validate_values(raw: Mapping, cls: type, prefix: str, source: str) -> None:
    """Coerce each value once so a type error names the file it came from."""
    hints = _hints(cls)
    for key, value in raw.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if isinstance(value, Mapping):
                _validate_values(value, tp, f"{prefix}{key}.", source)
            continue
        try:
            _coerce(value, tp, prefix + key)
        except UserError as err:
            raise UserError(f"{source}: {err}") from None


def _parse_override(text: str) -> tuple[list[str], Any, str]:
    import yaml

    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise UserError(f"override {text!r} must look like section.key=value (e.g. train.lr=1e-4)")
    key, raw_value = body.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r}: empty key; expected section.key=value")
    try:
        value = yaml.load(raw_value, Loader=_unique_key_loader()) if raw_value.strip() else ""  # noqa: S506
    except yaml.constructor.ConstructorError as err:
        if "duplicate key" not in str(err.problem):
            value = raw_value  # e.g. an unknown YAML tag: keep the raw string, coercion decides
        else:
            raise UserError(f"override {text!r}: {str(err.problem).split(' (first')[0]} in the value; keep one") from None
    except (yaml.YAMLError, ValueError, KeyError, TypeError, AttributeError):
        # not YAML (e.g. a path with ': '), or a value PyYAML's constructors choke on (`!!bool maybe`, an int of
        # more than 4300 digits): keep the raw string, coercion decides
        value = raw_value
    return key.split("."), value, raw_value.strip()


def _apply_override(tree: dict, parts: list[str], value: Any, cls: type, text: str, prefix: str = "",
                    root: type | None = None, raw: str | None = None) -> dict:
    """Set one dotted override in the plain-dict tree shaped like ``cls`` (returns a new tree)."""
    root = root or cls
    tree = dict(tree)
    key, rest = parts[0], parts[1:]
    path = prefix + key
    if key not in {f.name for f in dataclasses.fields(cls)}:
        raise UserError(f"override {text!r}: unknown config key '{path}'; {_closest_hint(key, cls, prefix, root)}")
    tp = _hints(cls)[key]
    if dataclasses.is_dataclass(tp):
        if rest:
            tree[key] = _apply_override(tree.get(key) or {}, rest, value, tp, text, path + ".", root, raw)
            return tree
        if not isinstance(value, Mapping):
            example = _leaf_paths(tp, path + ".")[0]
            raise UserError(f"override {text!r}: '{path}' is a section; set one of its keys, e.g. {example}=...")
        _check_keys(value, tp, path + ".", f"override {text!r}", root)
        tree[key] = _merge(tree.get(key) or {}, value, tp)
        return tree
    if not rest:
        if tp is str and raw is not None and not isinstance(value, str):
            value = raw  # a string field takes the text as typed (e.g. a path containing ': ')
        tree[key] = value
        return tree
    if typing.get_origin(tp) is dict or tp is dict:
        # a dotted path into a mapping field updates (or, with null, removes) one key
        current = dict(tree.get(key) or {})
        node = current
        for part in rest[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, Mapping) else {}
            node = child
        if value is None:
            if rest[-1] not in node:  # a typo would otherwise be a silent no-op
                close = difflib.get_close_matches(rest[-1], [str(k) for k in node], n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"its keys: {', '.join(map(str, node)) or 'none'}"
                raise UserError(f"override {text!r}: '{'.'.join([path, *rest])}' is not set, so there is nothing to "
                                f"remove; {hint}")
            node.pop(rest[-1])
        else:
            node[rest[-1]] = value
        tree[key] = current
        return tree
    raise UserError(f"override {text!r}: '{path}' is a {_type_name(tp)} value and has no sub-keys")


def _check_unspaced(text: str, parts: list[str], value: Any, raw: str, schema: type) -> None:
    """Refuse an override whose YAML value has a key that lacks the space after ':' (``reward.weights={saturation:1.0}``
    reads as the key ``saturation:1.0`` with no value), naming the fix. A string field keeps the text as typed."""
    bad = _unspaced_keys(value, raw)
    if not bad:
        return
    cls: Any = schema
    for part in parts:  # the field the override sets: a string one takes `{a:b}` as the text it is
        hints = _hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            break
        cls = hints[part]
    if cls is str:
        return
    fixed = raw
    for key, spaced in bad.items():
        fixed = fixed.replace(key, spaced)
    first = next(iter(bad))
    raise UserError(f"override {text!r}: {first!r} reads as one key with no value; YAML needs a space after ':' — "
                    f"write '{'.'.join(parts)}={fixed}' (quoted, for the shell)")


def _apply_overrides_tree(tree: dict, overrides: Sequence[str], schema: type) -> dict:
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        parts, value, raw = _parse_override(text)
        _check_unspaced(text, parts, value, raw, schema)
        tree = _apply_override(tree, parts, value, schema, text, raw=raw)
        # coerce now so the error names the override that caused it
        try:
            _build(schema, tree)
        except UserError as err:
            raise UserError(f"override {text!r}: {err}") from None
    return tree


def load_config(path: str | Path | None, overrides: Sequence[str] = (), schema: type = ExperimentConfig) -> Any:
    """Load a YAML experiment (with its includes), apply dotted overrides, coerce, validate.

    ``path=None`` starts from the schema defaults. Raises a one-line ``UserError`` on any problem.
    """
    tree = to_dict(schema())
    if path is not None and str(path) != "":
        path = Path(path).expanduser()
        if not path.is_file():  # named as given (_load_file resolves it): a relative configs/… path gets its hint
            raise UserError(_not_found("config file", path))
        tree = _merge(tree, _load_file(path, schema, ()), schema)
    tree = _apply_overrides_tree(tree, overrides, schema)
    if schema is ExperimentConfig:  # the shell leaves '~' in `output.run_dir=~/x` alone: a literal ./~ would be made
        for section, key in _USER_PATHS:
            value = tree.get(section, {}).get(key)
            if isinstance(value, str) and value.startswith("~"):
                tree[section][key] = str(Path(value).expanduser())
    cfg = _build(schema, tree)
    if schema is ExperimentConfig:
        validate(cfg)
    return cfg


# the path-valued fields whose leading '~' is the user's home (the prompt fields are expanded where they are read)
_USER_PATHS = (("output", "run_dir"), ("model", "path"), ("sampler", "eta_file"))


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """Return ``cfg`` with dotted overrides applied (e.g. a resumed run's config plus command-line changes)."""
    schema = type(cfg)
    out = _build(schema, _apply_overrides_tree(to_dict(cfg), overrides, schema))
    if schema is ExperimentConfig:
        validate(out)
    return out


def from_dict(data: Mapping, schema: type = ExperimentConfig) -> Any:
    """Build (and validate) a config from a nested mapping; missing keys take their defaults."""
    _check_keys(data, schema, "", "config")
    cfg = _build(schema, _merge(to_dict(schema()), data, schema))
    if schema is ExperimentConfig:
        validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    """Nested plain dict (tuples become lists) — what ``config.yaml`` holds."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def dump_yaml(cfg: Any, path: str | Path | None = None) -> str:
    """The resolved config as YAML (loads back to an equal config); written atomically when ``path`` is given."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    # block-style sections, but short lists ([0.9, 0.999]) on one line
    _Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    text = "# resolved flowalign config (load with flowalign.config.load_config)\n"
    text += yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True)
    if path is not None:
        from flowalign.io import atomic_write_text

        atomic_write_text(path, text)
    return text


# ----------------------------------------------------------------------------------------------------------
# Documentation and summaries
# ----------------------------------------------------------------------------------------------------------


def _yaml_scalar(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if text.endswith("..."):  # PyYAML ends a bare scalar document with an explicit end marker
        text = text[:-3].strip()
    return text


def describe(schema: type = ExperimentConfig, config: Any = None) -> str:
    """Every field with its type, value and doc, as a commented YAML template (valid YAML): the values of ``config``
    (an instance of ``schema``, e.g. a loaded experiment with its overrides), or the defaults."""
    lines: list[str] = []

    def walk(cls: type, inst: Any, indent: int) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            doc = f.metadata.get("doc", "")
            pad = "  " * indent
            if dataclasses.is_dataclass(tp):
                lines.append(f"{pad}{f.name}:" + (f"  # {doc}" if doc else ""))
                walk(tp, getattr(inst, f.name), indent + 1)
            else:
                value = _yaml_scalar(to_dict(getattr(inst, f.name)))
                lines.append(f"{pad}{f.name}: {value}  # ({_type_name(tp)}) {doc}")

    walk(schema, config if config is not None else schema(), 0)
    return "\n".join(lines)


def trained_steps(sampler: SamplerConfig) -> int:
    """Trained steps per trajectory (METHODS §3.5, §2.6): the window's n, or the first floor(frac·T) steps,
    never the last step (it is deterministic unless ``last_step_noise``, and Flow-GRPO never trains it)."""
    from flowalign.samplers.kernels import deterministic_at_sigma_one

    T = sampler.steps
    dead = 1 if deterministic_at_sigma_one(sampler.kernel) else 0  # step 0 (σ = 1 on every model's grid) is Euler
    if sampler.window_size > 0:  # a window free to move: an upper bound when it may hold step 0 of such a kernel
        lo, hi = window_bounds(sampler)
        return sampler.window_size - (dead if (lo, hi) == (0, sampler.window_size) else 0)  # pinned at step 0
    if sampler.train_steps == "random":  # DanceGRPO's count: floor(f·(T−1)) of steps 0…T−2 (METHODS §3.5)
        return min(int(math.floor(sampler.train_fraction * (T - 1) + 1e-9)), T - 1 - dead)
    return max(0, min(int(math.floor(sampler.train_fraction * T + 1e-9)), T - 1) - dead)


def window_bounds(sampler: SamplerConfig) -> tuple[int, int]:
    """(lo, hi) of the window start range, t0 ~ U{lo..hi-n} (METHODS §2.6); (0, 0) means (0, T-1)."""
    lo, hi = sampler.window_range
    if (lo, hi) == (0, 0):
        hi = sampler.steps - 1
    return lo, hi


def derived(cfg: ExperimentConfig, world_size: int = 1) -> dict[str, Any]:
    """Quantities implied by the config for ``world_size`` processes; raises ``UserError`` if they do not divide.

    Keys: rollouts_per_iter (final samples scored), samples_per_seed (plan: branch children), groups_per_rank,
    rollouts_per_rank, trained_steps, transitions_per_iter, transitions_per_rank, micro_batches_per_rank (per iteration, before zero-std filtering and a credit's pruning, e.g. the tree credit's prune_steps / width),
    micro_batches_per_optimizer_step, optimizer_steps_total, ema_updates_total, rollouts_total, nfe_rollout_per_iter
    (sampling forwards, one per step per rollout; CFG pairs count as one), window_starts (possible t0 of each group's window, or None),
    nft_rows_per_rank (objective=nft: (sample, noise level) rows before zero-advantage filtering).
    """
    t, s = cfg.train, cfg.sampler
    if world_size < 1:
        raise UserError(f"world size must be >= 1, got {world_size}")
    if t.groups_per_iter % world_size:
        lower = (t.groups_per_iter // world_size) * world_size or world_size
        upper = -(-t.groups_per_iter // world_size) * world_size
        raise UserError(
            f"train.groups_per_iter={t.groups_per_iter} is not divisible by the world size {world_size} (groups are "
            f"rank-local); set train.groups_per_iter to a multiple of {world_size} (e.g. {lower if lower == upper else f'{lower} or {upper}'}) or change the number of processes"
        )
    from flowalign.samplers.plans import plan_shape

    n_trained = trained_steps(s)
    stochastic = s.window_size if s.window_size > 0 else s.steps - (0 if s.last_step_noise else 1)
    try:
        per_seed, edges = plan_shape(s.plan, s.plan_options, min(stochastic, n_trained))  # branch: trained steps
    except (ValueError, TypeError) as e:
        raise UserError(f"sampler.plan_options: {e}") from None
    if per_seed > 1 and s.init_noise == "group":  # the plan already shares each initial noise among its samples
        raise UserError(f"sampler.init_noise=group with sampler.plan={s.plan} (which grows {per_seed} samples from each "
                        f"initial noise) would make every seed of a group identical; use sampler.init_noise=member")
    groups_per_rank = t.groups_per_iter // world_size
    rollouts_per_rank = groups_per_rank * t.group_size * per_seed
    # int(): a tree's edges per sample are a Fraction (shared edges are trained once), exact per root
    transitions_per_rank = int(rollouts_per_rank * (n_trained if edges is None else min(edges, n_trained)))
    # grpo splits the transitions into optimizer_steps_per_iter chunks (torch.tensor_split: the first N mod S get one
    # more), then each chunk into micro-batches
    n_steps = t.optimizer_steps_per_iter
    big, small = -(-transitions_per_rank // n_steps), transitions_per_rank // n_steps
    n_big = transitions_per_rank - small * n_steps
    micro_per_rank = n_big * -(-big // t.micro_batch) + (n_steps - n_big) * -(-small // t.micro_batch)
    if t.objective == "grpo" and n_steps > transitions_per_rank:  # a step without transitions
        raise UserError(
            f"train.optimizer_steps_per_iter={n_steps} exceeds the {transitions_per_rank} transitions per rank per "
            f"iteration, so some optimizer steps would have nothing to train on; lower it"
        )
    window_starts = None
    if s.window_size > 0:
        lo, hi = window_bounds(s)
        window_starts = list(range(lo, hi - s.window_size + 1))
    opt_total = t.iterations * t.optimizer_steps_per_iter
    return {
        "world_size": world_size,
        "rollouts_per_iter": rollouts_per_rank * world_size,
        "samples_per_seed": per_seed,
        "groups_per_rank": groups_per_rank,
        "rollouts_per_rank": rollouts_per_rank,
        "trained_steps": n_trained,
        "transitions_per_iter": transitions_per_rank * world_size,
        "transitions_per_rank": transitions_per_rank,
        "micro_batches_per_rank": micro_per_rank,
        "micro_batches_per_optimizer_step": -(-big // t.micro_batch),  # at most
        "optimizer_steps_total": opt_total,
        "ema_updates_total": (opt_total // t.ema_every) if t.ema else 0,
        "rollouts_total": t.iterations * rollouts_per_rank * world_size,
        "nfe_rollout_per_iter": t.groups_per_iter * t.group_size * s.steps if s.plan == "chain" else None,
        "window_starts": window_starts,
        "nft_rows_per_rank": rollouts_per_rank * t.nft_times,
    }


# float fields where +inf means "no limit" (as their own 0 = off or an unbounded clip would); NaN is refused everywhere
_INF_MEANS_OFF = ("credit.adv_clip", "train.max_grad_norm", "train.clip_range")


def _float_leaves(cfg: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted path, value) of every float, and float in a tuple such as train.betas, in the config."""
    out: list[tuple[str, float]] = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out += _float_leaves(v, f"{prefix}{f.name}.")
        elif isinstance(v, float):
            out.append((f"{prefix}{f.name}", v))
        elif isinstance(v, tuple):
            out += [(f"{prefix}{f.name}", x) for x in v if isinstance(x, float)]
    return out


def validate(cfg: ExperimentConfig) -> None:
    """Range and consistency checks that do not depend on the world size (one-line ``UserError``)."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    m, s, r, c, t, e = cfg.model, cfg.sampler, cfg.reward, cfg.credit, cfg.train, cfg.eval
    try:
        from flowalign.models import MODELS

        if m.name not in MODELS:
            close = difflib.get_close_matches(m.name, list(MODELS), n=1)
            raise UserError(f"model.name={m.name!r} is not a known model family; " + (f"did you mean {close[0]!r}?" if close else f"known: {', '.join(MODELS)}"))
    except ImportError:  # pragma: no cover - registry always ships with the package
        pass
    try:
        from flowalign.rewards import REWARDS
    except ImportError:  # pragma: no cover
        REWARDS = None
    for path, v in _float_leaves(cfg):  # an inf lr or weight decay would put inf/NaN into the weights
        if not math.isfinite(v) and not (v == math.inf and path in _INF_MEANS_OFF):
            raise UserError(f"{path}={v} must be a finite number" + (" or inf (no limit)" if path in _INF_MEANS_OFF else ""))
    need(len(r.weights) > 0, "reward.weights is empty; name at least one reward, e.g. reward.weights.shapes_partial=1.0")
    if REWARDS is not None:
        for where, names in (("reward.weights", list(r.weights)), ("reward.kwargs", list(r.kwargs)), ("eval.rewards", list(e.rewards))):
            for name in names:
                if name not in REWARDS:
                    close = difflib.get_close_matches(name, list(REWARDS), n=1)
                    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(REWARDS))}"
                    raise UserError(f"{where}: unknown reward {name!r}; {hint}")
    for name, w in r.weights.items():
        need(math.isfinite(w), f"reward.weights.{name}={w} must be finite")
    need(m.guidance >= 0, f"model.guidance={m.guidance} must be >= 0 (1 = no CFG)")
    need(m.lora_rank >= 0 and m.lora_alpha >= 0, "model.lora_rank and model.lora_alpha must be >= 0 (0 = family default)")
    need(m.resolution >= 0, f"model.resolution={m.resolution} must be >= 0 (0 = model default)")
    need(s.eta >= 0, f"sampler.eta={s.eta} must be >= 0")
    need(s.steps >= 2, f"sampler.steps={s.steps} must be >= 2 (the last step is never trained)")
    need(s.steps <= MAX_STEPS, f"sampler.steps={s.steps} is above the limit of {MAX_STEPS} steps; set sampler.steps=N, "
                               f"e.g. 10 (shapes) or 10-50 (SD3.5, FLUX, Wan)")
    need(0 < s.train_fraction <= 1, f"sampler.train_fraction={s.train_fraction} must be in (0, 1]")
    need(s.window_size >= 0, f"sampler.window_size={s.window_size} must be >= 0 (0 = no window)")
    need(s.window_size > 0 or tuple(s.window_range) == (0, 0),
         f"sampler.window_range={list(s.window_range)} has no effect without a window; set sampler.window_size "
         "(e.g. sampler.window_size=3) or drop sampler.window_range")
    if s.window_size > 0:
        lo, hi = window_bounds(s)
        need(0 <= lo and hi <= s.steps - 1,
             f"sampler.window_range=({s.window_range[0]}, {s.window_range[1]}) must lie in [0, steps-1={s.steps - 1}] (the last step is never trained)")
        need(hi - lo >= s.window_size,
             f"sampler.window_range=({lo}, {hi}) is narrower than sampler.window_size={s.window_size}; widen the range or shrink the window")
        # each group draws its own window (Q5): only unguided chains sample rows with per-row η (a guide shifts
        # whole steps, so it would move other groups' Euler steps too)
        who = f"sampler.plan={s.plan}" if s.plan != "chain" else f"sampler.guide={s.guide}"
        need((s.plan == "chain" and s.guide == "none") or hi - lo == s.window_size,
             f"{who} needs one window for every group, but sampler.window_range=({lo}, {hi}) lets each group draw "
             f"its start; pin it with sampler.window_range=[{lo}, {lo + s.window_size}]")
    if s.train_steps == "random":
        need(s.window_size == 0, "sampler.train_steps=random draws the trained steps itself; with sampler.window_size > 0 "
                                 "the window's steps are trained: set sampler.train_steps=first")
        need(s.plan == "chain", f"sampler.train_steps=random needs sampler.plan=chain (the {s.plan} plan trains its own "
                                "edges); set sampler.train_steps=first")
    if s.plan == "tree":  # a window moves the stochastic steps every iteration, and the tree's splits (its shape) with them
        need(s.window_size == 0, "sampler.plan=tree splits at fixed stochastic steps; it needs sampler.window_size=0")
        from flowalign.samplers.kernels import deterministic_at_sigma_one

        need(not deterministic_at_sigma_one(s.kernel),
             f"sampler.plan=tree splits from step 0 on, where sampler.kernel={s.kernel} draws no noise (σ = 1); use "
             "sampler.kernel=dance_sde (the reference's) or flow_sde")
        # a tree trains each shared edge once, on its first leaf: only the tree credit gives that edge its node's advantage
        need(c.name == "tree", f"sampler.plan=tree trains each shared edge once, with its node's advantage; it needs "
                               f"credit.name=tree (got {c.name!r})")
        scale = dict(s.plan_options).get("split_noise_scale", 1.0)
        need(s.kernel in ("flow_sde", "dance_sde") or scale == 1,  # the plan's check: the std must be ∝ η
             f"sampler.plan=tree scales the split steps' eta by split_noise_scale={scale}, which scales the noise only "
             f"for kernels whose std is proportional to eta (flow_sde, dance_sde), not {s.kernel}; set "
             "sampler.plan_options.split_noise_scale=1.0 or another kernel")
    need(c.name not in ("branch", "granular") or s.plan == "branch",
         f"credit.name={c.name} scores the children of branched rollouts; it needs sampler.plan=branch (got {s.plan!r})")
    need(c.name != "tree" or s.plan == "tree",
         f"credit.name=tree assigns node advantages of a tree rollout; it needs sampler.plan=tree (got {s.plan!r})")
    prune = dict(c.options).get("prune_steps", ()) if c.name == "tree" else ()
    if isinstance(prune, (list, tuple)):  # its type is the credit function's to check; its range needs sampler.steps
        bad = [k for k in prune if isinstance(k, int) and not 0 <= k < s.steps]
        need(not bad, f"credit.options.prune_steps={list(prune)}: {bad} are not steps 0 … {s.steps - 1} of "
                      f"sampler.steps={s.steps}; pick depths inside the rollout")
    if trained_steps(s) < 1:
        span = s.steps - (s.train_steps == "random")
        picked = int(math.floor(s.train_fraction * span + 1e-9))
        need(s.window_size > 0 or picked >= 1,
             f"no trained steps: floor(sampler.train_fraction={s.train_fraction} x "
             f"{'(sampler.steps - 1)' if s.train_steps == 'random' else 'sampler.steps'}={span}) = 0; raise train_fraction")
        # else the window or the picked steps hold only step 0, where the kernel draws no noise (ddim_sde at σ = 1)
        need(s.window_size == 0,
             f"no trained steps: sampler.window_range={list(window_bounds(s))} holds only step 0, where "
             f"sampler.kernel={s.kernel} draws no noise (σ = 1); pin the window later, e.g. "
             f"sampler.window_range=[1, {1 + s.window_size}]")
        need(False, f"no trained steps: the {picked} step(s) sampler.train_fraction={s.train_fraction} picks hold only "
                     f"step 0, where sampler.kernel={s.kernel} draws no noise (σ = 1); raise sampler.train_fraction or sampler.steps")
    if t.objective == "nft":
        need(c.name == "outcome", f"train.objective=nft learns from whole samples; it needs credit.name=outcome (got {c.name!r})")
        need(s.guide == "none", "train.objective=nft does not use guided rollouts; set sampler.guide=none")
        need(t.nft_beta > 0, f"train.nft_beta={t.nft_beta} must be > 0")
        need(t.nft_times >= 1, f"train.nft_times={t.nft_times} must be >= 1")
        need(t.nft_guidance is None or t.nft_guidance >= 0,
             f"train.nft_guidance={t.nft_guidance} must be >= 0 (1 = the conditional velocity) or null (= model.guidance)")
    elif s.kernel == "euler" or (s.eta == 0 and not s.eta_file):  # GRPO needs the log-probs of stochastic steps
        need(False, f"sampler.kernel={s.kernel!r} with sampler.eta={s.eta:g} is deterministic: GRPO would train no step "
                    "(set sampler.kernel=flow_sde sampler.eta=0.7, or train.objective=nft, which learns from ODE "
                    "samples)")
    from flowalign.values import GUIDES

    if s.guide not in GUIDES:
        close = difflib.get_close_matches(s.guide, list(GUIDES), n=1)
        raise UserError(f"sampler.guide={s.guide!r} is not a known guide; " + (f"did you mean {close[0]!r}?" if close else f"known: {', '.join(GUIDES)}"))
    if s.guide != "none":
        need(s.plan == "chain", f"sampler.guide={s.guide!r} guides chains; it needs sampler.plan=chain (got {s.plan!r})")
    elif s.guide_options:
        raise UserError("sampler.guide_options is set but sampler.guide=none; set sampler.guide=reward_grad or drop the options")
    if s.logp_form == "cps_mse":
        need(s.kernel == "cps", f"sampler.logp_form='cps_mse' is the CPS surrogate; it needs sampler.kernel='cps' (got {s.kernel!r})")
    need(c.std_eps > 0, f"credit.std_eps={c.std_eps} must be > 0 (it keeps A finite for equal rewards)")
    need(c.std_ddof in (0, 1), f"credit.std_ddof={c.std_ddof} must be 0 (population) or 1 (unbiased)")
    need(c.adv_clip > 0, f"credit.adv_clip={c.adv_clip} must be > 0")
    need(-(2**63) <= t.seed < 2**63,  # torch.manual_seed(seed) and the eval grid's seed + j must fit in 64 bits
         f"train.seed={_short(t.seed)} must be in [-2**63, 2**63) (a 64-bit seed)")
    need(t.iterations >= 0, f"train.iterations={t.iterations} must be >= 0")
    need(t.groups_per_iter >= 1, f"train.groups_per_iter={t.groups_per_iter} must be >= 1")
    need(t.groups_per_iter * t.group_size <= MAX_ROLLOUTS,
         f"train.groups_per_iter={t.groups_per_iter} x train.group_size={t.group_size} = "
         f"{t.groups_per_iter * t.group_size} rollouts per iteration is above the limit of {MAX_ROLLOUTS}; lower one of them")
    need(t.group_size >= 2 or (t.group_size == 1 and s.plan != "chain"),  # branch / tree: siblings of one seed compare
         f"train.group_size={t.group_size}: GRPO compares rollouts of the same prompt, so it needs >= 2 (e.g. train.group_size=8)"
         + ("" if s.plan == "chain" else f"; sampler.plan={s.plan} takes 1 (its samples of one seed are the group)"))
    need(t.micro_batch >= 1, f"train.micro_batch={t.micro_batch} must be >= 1")
    need(t.optimizer_steps_per_iter >= 1, f"train.optimizer_steps_per_iter={t.optimizer_steps_per_iter} must be >= 1")
    need(t.lr > 0, f"train.lr={t.lr} must be > 0")
    need(all(0 <= b < 1 for b in t.betas), f"train.betas={t.betas} must be in [0, 1)")
    need(t.weight_decay >= 0 and t.adam_eps > 0, "train.weight_decay must be >= 0 and train.adam_eps > 0")
    need(t.max_grad_norm >= 0, f"train.max_grad_norm={t.max_grad_norm} must be >= 0 (0 = off)")
    need(t.clip_range > 0, f"train.clip_range={t.clip_range} must be > 0")
    need(t.surrogate != "guard" or s.logp_form == "exact",
         f"train.surrogate=guard re-centres the exact Gaussian log-ratio; sampler.logp_form={s.logp_form} is not it "
         "(set sampler.logp_form=exact)")
    need(t.beta_kl >= 0, f"train.beta_kl={t.beta_kl} must be >= 0")
    need(cfg.credit.probe_max_batch >= 0 and cfg.credit.probe_score_batch >= 0,
         "credit.probe_max_batch and credit.probe_score_batch must be >= 0 (0 = no bound)")
    need(0 <= t.ema_decay_max < 1, f"train.ema_decay_max={t.ema_decay_max} must be in [0, 1)")
    need(t.ema_every >= 1, f"train.ema_every={t.ema_every} must be >= 1")
    need(t.checkpoint_every >= 0 and t.keep_checkpoints >= 0, "train.checkpoint_every and train.keep_checkpoints must be >= 0")
    need(e.every >= 0, f"eval.every={e.every} must be >= 0 (0 = before and after only)")
    need(1 <= e.steps <= MAX_STEPS, f"eval.steps={e.steps} must be between 1 and {MAX_STEPS}")
    need(e.guidance >= 0, f"eval.guidance={e.guidance} must be >= 0 (1 = no CFG)")
    need(e.seeds_per_prompt >= 1 and e.batch_size >= 1, "eval.seeds_per_prompt and eval.batch_size must be >= 1")
    need(e.seeds_per_prompt <= MAX_SEEDS, f"eval.seeds_per_prompt={e.seeds_per_prompt} is above the limit of {MAX_SEEDS} "
                                          "images per prompt")
    need(e.max_prompts >= 0 and e.grid_prompts >= 0, "eval.max_prompts and eval.grid_prompts must be >= 0")
    need(len(e.rewards) > 0, "eval.rewards is empty; name at least one reward, e.g. eval.rewards=[shapes_strict]")
    need(bool(cfg.output.run_dir), "output.run_dir is empty; set output.run_dir=runs/NAME")
    need(bool(cfg.data.train_prompts) and bool(cfg.data.eval_prompts), "data.train_prompts and data.eval_prompts must be set")
    derived(cfg, 1)


def summary(cfg: ExperimentConfig, world_size: int = 1) -> str:
    """A compact block of the main settings and derived quantities, printed at the start of a run."""
    d = derived(cfg, world_size)
    m, s, r, c, t, e = cfg.model, cfg.sampler, cfg.reward, cfg.credit, cfg.train, cfg.eval
    rewards = ", ".join(f"{k}={v:g}" for k, v in r.weights.items())
    from flowalign.samplers.kernels import deterministic_at_sigma_one

    moving = s.window_size and window_bounds(s)[1] - window_bounds(s)[0] > s.window_size
    window = (f"window {s.window_size} in {window_bounds(s)}" + (", start drawn per group" if moving else "")
              if s.window_size else
              f"random {d['trained_steps']} of steps 0..{s.steps - 2} per rollout" if s.train_steps == "random" else
              (f"steps 1..{d['trained_steps']} ({s.kernel} has no noise at step 0)" if deterministic_at_sigma_one(s.kernel) else
               f"first {d['trained_steps']} steps"))
    lora = f"r={m.lora_rank or 'default'}" + (f"/a={m.lora_alpha:g}" if m.lora_alpha else "")
    rows = [
        ("model", f"{m.name} ({m.path or 'default weights'}), {m.dtype}, {m.device}, cfg {m.guidance:g}, LoRA {lora}"
                  + (f", {m.resolution}px" if m.resolution else "") + (", gradient checkpointing" if m.gradient_checkpointing else "")),
        ("sampler", f"{s.kernel} eta={f'per step from {s.eta_file}' if s.eta_file else f'{s.eta:g}'}, T={s.steps}"
                    + (f", train {window}, logp {s.logp_form}/{s.logp_reduce}" if t.objective == "grpo" else ", final samples only")
                    + (", last-step noise" if s.last_step_noise else "")
                    + (", step noise per group" if s.step_noise == "group" else "")
                    + (f", guide {s.guide} {dict(s.guide_options)}" if s.guide != "none" else "")),
        ("reward", f"{rewards} ({r.aggregate})"),
        ("credit", f"{c.name}, std {c.std_scope} (ddof {c.std_ddof}, eps {c.std_eps:g}), clip |A|<={c.adv_clip:g}"
                   + (f", options {c.options}" if c.options else "")),
        ("optim", f"AdamW lr {t.lr:g} ({t.lr_schedule}), betas {tuple(t.betas)}, wd {t.weight_decay:g}, grad-clip {t.max_grad_norm:g}, "
                  + (f"ratio clip {t.clip_range:g} ({t.surrogate}), beta_kl {t.beta_kl:g} ({t.kl_form})" if t.objective == "grpo" else f"no ratio clip, beta_kl {t.beta_kl:g} (velocity)")
                  + (f", EMA<= {t.ema_decay_max:g}/{t.ema_every}" if t.ema else ", no EMA")),
        ("batch", f"{t.groups_per_iter} groups x G={t.group_size}"
                  + (f" seeds x {d['samples_per_seed']} {s.plan} samples" if d["samples_per_seed"] > 1 else "")
                  + f" = {d['rollouts_per_iter']} rollouts/iter; "
                  f"{d['groups_per_rank']} groups/rank on {world_size} rank(s)"),
        ("update", {
            "grpo": lambda: (f"grpo: {d['trained_steps']} trained steps -> {d['transitions_per_rank']} transitions/rank in "
                             f"{d['micro_batches_per_rank']} micro-batches of {t.micro_batch}, {t.optimizer_steps_per_iter} "
                             f"optimizer step(s)/iter (<= {d['micro_batches_per_optimizer_step']} micro-batches each)"),
            "nft": lambda: (f"nft (DiffusionNFT, beta {t.nft_beta:g}, r {t.nft_optimality}, {t.nft_weighting} weighting, "
                            f"update cfg {m.guidance if t.nft_guidance is None else t.nft_guidance:g}): <= {d['rollouts_per_rank']} samples x {t.nft_times} noise "
                            f"levels = <= {d['nft_rows_per_rank']} rows/rank in micro-batches of {t.micro_batch}, "
                            f"{t.optimizer_steps_per_iter} optimizer step(s)/iter over all rows"),
        }[t.objective]()),
        ("run", f"{t.iterations} iteration{'' if t.iterations == 1 else 's'}, {d['rollouts_total']} rollouts, {d['optimizer_steps_total']} optimizer steps, "
                f"seed {t.seed}, rollout NFE/iter {d['nfe_rollout_per_iter'] or 'see nfe/sampling in metrics'}"),
        ("data", f"train {cfg.data.train_prompts} ({'shuffled' if cfg.data.shuffle else 'in order'}), eval {cfg.data.eval_prompts}"),
        ("eval", f"{', '.join(w for w, on in (('before', e.before), (f'every {e.every} iters', e.every and (e.every < t.iterations or (e.every == t.iterations and not e.after))), ('after', e.after)) if on) or 'off'}, {e.kernel} T={e.steps} cfg {e.guidance:g}, "
                 f"{e.seeds_per_prompt} seeds/prompt{', ' + str(e.max_prompts) + ' prompts' if e.max_prompts else ''}, rewards {', '.join(e.rewards)}"),
        ("output", f"{cfg.output.run_dir}" + (" (resume)" if cfg.output.resume else "") + (" (overwrite)" if cfg.output.overwrite else "")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
