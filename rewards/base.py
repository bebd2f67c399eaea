"""Shared pieces of the reward models (REWARDS_AND_EVAL.md §1).

* ``Reward``: a small base class carrying the catalogue attributes (``name``, ``differentiable``, ``kind``,
  ``measures``, ``checkpoints``, ``typical_range``) that ``flowalign rewards`` lists. A reward does not have to
  inherit from it: anything with ``name``, ``differentiable`` and ``__call__`` is a ``RewardModel``.
* ``Checkpoint``: what weights a reward needs and how a user with network obtains them.
* ``Scaled``: scale/offset wrapper (scorers return raw scales; flow_grpo's /26, /30 live here).
* ``resolve_source`` / ``hub_errors`` / ``hub_file``: local path or Hugging Face hub id, with a one-line ``UserError``
  when a hub id is needed but not cached and downloads are off (``HF_HUB_OFFLINE=1``) or the hub does not answer
  (checked once, before the hub library's download retries).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from flowalign.errors import UserError

logger = logging.getLogger("flowalign.rewards")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_BARE_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")  # the hub's ids without an owner: bert-base-uncased, gpt2
_FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,9}$")  # .pt, .json, .safetensors; not gpt-neo-1.3B's ".3B"


@dataclass(frozen=True)
class Checkpoint:
    """One artefact a reward needs.

    ``arg`` is the constructor keyword that takes it, ``default`` the hub id (or file) used when that keyword is not
    given, ``obtain`` one line telling a user with network how to get it for offline use.
    """

    arg: str
    default: Optional[str]
    obtain: str


class Reward:
    """Base class of flowalign's rewards: catalogue attributes plus input checks.

    Subclasses implement ``__call__(images, prompts, metadata=None) -> Tensor[B] float32`` on the caller's device.
    """

    name: str = "reward"
    differentiable: bool = False
    kind: str = "image"  # "image": [B,3,H,W]; "video": [B,F,3,H,W]
    measures: str = ""
    checkpoints: tuple[Checkpoint, ...] = ()
    typical_range: str = ""

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, differentiable={self.differentiable})"


def check_inputs(images: Tensor, prompts: Sequence[str], kind: str = "image") -> None:
    """Raise a one-line ``ValueError`` when ``images``/``prompts`` do not follow the reward interface."""
    want = 4 if kind == "image" else 5
    if not torch.is_tensor(images) or images.dim() != want or images.shape[-3] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        layout = "[B,3,H,W]" if kind == "image" else "[B,F,3,H,W]"
        raise ValueError(f"{kind} reward expects images {layout} in [0,1], got {shape}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        n = "a string" if isinstance(prompts, str) else len(prompts)
        raise ValueError(f"reward expects one prompt per image: {images.shape[0]} images, prompts: {n}")


def finite_images(images: Tensor) -> Tensor:
    """[B] bool: True where every value of image (or video) b is finite."""
    return torch.isfinite(images.detach()).flatten(1).all(dim=1)  # [B]


def nan_unless_finite(scores: Tensor, images: Tensor) -> Tensor:
    """``scores`` [B] with NaN for every image (or video) holding a non-finite value (spec §1: a failed sample is NaN,
    so training masks it). Applied by every reward whatever its path: a tower need not carry a NaN through, clamps
    map ±inf into [0, 1], and uint8 quantisation turns NaN into a pixel value. Gradients of the other scores are
    untouched."""
    keep = finite_images(images).to(scores.device)  # [B]
    return torch.where(keep, scores, torch.full_like(scores, float("nan")))  # [B]


class Scaled(Reward):
    """``scale · reward + offset`` (e.g. flow_grpo's PickScore/26, CLIP/30, −JPEG kB/500); attributes forwarded."""

    def __init__(self, reward, scale: float = 1.0, offset: float = 0.0):
        self.reward = reward
        self.scale = float(scale)
        self.offset = float(offset)
        self.name = getattr(reward, "name", "reward")
        self.differentiable = bool(getattr(reward, "differentiable", False))
        self.kind = getattr(reward, "kind", "image")
        self.measures = getattr(reward, "measures", "")
        self.checkpoints = getattr(reward, "checkpoints", ())
        self.typical_range = f"{self.scale:g}·({getattr(reward, 'typical_range', '?')}) + {self.offset:g}"

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> Tensor:
        return self.reward(images, prompts, metadata) * self.scale + self.offset

    def __getattr__(self, item):  # e.g. embed_images of the wrapped reward
        if item == "reward":
            raise AttributeError(item)
        return getattr(self.reward, item)


# --------------------------------------------------------------------------------------------------------------------
# weights: local path or hub id


def _looks_local(source: str) -> bool:
    """``owner/name`` whose ``owner`` is a directory here (e.g. ``weights/PickScore_v1``) is a local path that is
    missing, not a hub id: trying the hub would only wait on the network and then suggest a download."""
    head = str(source).split("/", 1)[0]
    return os.path.isdir(os.path.expanduser(head))


TOKENIZER_FILES = ("*.json", "*.txt")  # what a tokenizer or processor is read from (``hf download --include``)


def is_hub_id(source: str) -> bool:
    """Whether ``source``, which is no local path here, names a Hugging Face hub id: ``owner/name`` (unless ``owner``
    is a directory here), or a bare ``name`` (the hub's ids without an owner, e.g. ImageReward's default tokenizer
    ``bert-base-uncased``). A bare string that looks like a path (starts with ``.`` or ``~``, ends with a file suffix
    such as ``.pt``) is a missing path, not an id."""
    s = str(source)
    if os.path.exists(os.path.expanduser(s)):
        return False
    if _HUB_ID.match(s):
        return not _looks_local(s)
    return bool(_BARE_HUB_ID.match(s)) and not _FILE_SUFFIX.search(s)


def setting(arg: str, value: str, reward: Optional[str] = None) -> str:
    """How a user passes ``arg=value``: with ``reward`` (the name the reward was asked for by) both as a train config
    sets it and as ``flowalign eval``/``steer`` take it; without, the constructor keyword."""
    if not reward:
        return f"{arg}={value}"
    return (f"reward.kwargs.{reward}.{arg}={value} (train config) or --reward-arg {reward}.{arg}={value} "
            f"(flowalign eval/steer)")


def resolve_source(source, what: str, arg: Optional[str] = None, reward: Optional[str] = None) -> str:
    """A local path (expanded) or a hub id; anything else is a ``UserError`` naming the setting (``arg`` of
    ``reward``) to pass it with."""
    how = f" with {setting(arg, 'PATH', reward)}" if arg else ""
    if source is None:
        raise UserError(f"{what}: no path given (pass a local directory/file or a Hugging Face hub id{how})")
    s = os.path.expanduser(str(source))
    if os.path.exists(s):
        return s
    if is_hub_id(str(source)):
        return str(source)
    raise UserError(f"{what}: {source!r} does not exist (pass a local directory/file or a Hugging Face hub id{how})")


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_hint(repo: str, what: str, arg: str, filename: Optional[str] = None, reward: Optional[str] = None,
             include: Sequence[str] = ()) -> str:
    """One line: the checkpoint is missing, how to download it, and how to pass it. With ``reward`` (the name the
    reward was asked for by) the argument is named as a train config sets it and as ``flowalign eval``/``steer`` take
    it. ``include``: the file patterns that suffice (a tokenizer needs its ``*.json``/``*.txt``, not the weights)."""
    mode = "downloads are off (HF_HUB_OFFLINE=1)" if _offline() else "it could not be downloaded"
    item = f"file {filename!r} of {repo!r}" if filename else repo
    if "/" not in repo:  # a bare name is read as a hub id only when no such path exists: say so
        item += " (a hub id: no local path of that name here)"
    files = f" {filename}" if filename else ""
    only = " --include " + " ".join(f"'{pattern}'" for pattern in include) if include and not filename else ""
    where = f"DIR/{filename}" if filename else "DIR"
    how = f"pass it as {setting(arg, where, reward)}" if reward else f"pass {arg}={where}"
    return (
        f"{what}: checkpoint {item} is not in the local Hugging Face cache and {mode}; on a machine with network run "
        f"`hf download {repo}{files}{only} --local-dir DIR`, copy DIR here and {how}"
    )


def hub_cached(repo: str, filename: Optional[str] = None) -> bool:
    """Whether the local Hugging Face cache holds hub id ``repo``: its file ``filename``, or without one any snapshot
    of it. Reads the cache only (no network)."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache
        from huggingface_hub.file_download import repo_folder_name
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return True  # cannot tell: the loader decides, as before
    try:
        if filename is not None:
            return isinstance(try_to_load_from_cache(repo, filename), str)
        snapshots = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo, repo_type="model"), "snapshots")
        with os.scandir(snapshots) as entries:
            return any(True for _ in entries)
    except (OSError, ValueError):  # no such cache directory; an id the hub library refuses
        return False


def hub_unreachable(repo: str, filename: str) -> bool:
    """True when the hub cannot be asked for ``repo``'s ``filename``: downloads are off (``HF_HUB_OFFLINE=1``), or one
    metadata request, without retries, gets no answer (no network, a timeout). huggingface_hub's own download of a
    file that is not cached retries such failures with a back-off (about 25 s and ten warning lines per file), so an
    uncached hub id is probed once first. An answer, even an error (no such file, a gated repo), is False: the
    loader then runs as it would have."""
    if _offline():
        return True
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError:  # pragma: no cover
        return False
    http_log = logging.getLogger("huggingface_hub.utils._http")  # it warns about the failed request: the caller says it
    level = http_log.level
    http_log.setLevel(logging.ERROR)
    try:
        get_hf_file_metadata(hf_hub_url(repo, filename))
    except HfHubHTTPError:  # the hub answered
        return False
    except Exception:  # no answer: connection, DNS, timeout, offline mode
        return True
    finally:
        http_log.setLevel(level)
    return False


def _check_reachable(repo: str, filename: Optional[str], hint: str) -> None:
    """A one-line ``UserError`` (``hint``) at once when hub id ``repo`` (its ``filename``) is not in the local cache
    and the hub cannot be reached, instead of the hub library's retries; a cached id is left to the loader."""
    if not hub_cached(repo, filename) and hub_unreachable(repo, filename or "config.json"):
        raise UserError(hint)


@contextlib.contextmanager
def hub_errors(source: str, what: str, arg: str = "path", reward: Optional[str] = None,
               include: Sequence[str] = ()) -> Iterator[None]:
    """Turn a loader's failure on an uncached hub id into a one-line ``UserError`` (local paths re-raise as is). A hub
    id that is neither cached nor reachable is refused before the loader runs (``hub_unreachable``). ``reward`` and
    ``include`` as for ``hub_hint``."""
    hint = hub_hint(source, what, arg, reward=reward, include=include)
    if is_hub_id(source):
        _check_reachable(source, None, hint)
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as err:  # transformers/huggingface_hub raise OSError subclasses when offline
        if is_hub_id(source):
            raise UserError(hint) from err
        raise


def hub_file(source: Optional[str], repo: str, filename: str, what: str, arg: str, reward: Optional[str] = None) -> str:
    """A local file: ``source`` if it exists (a directory is searched for ``filename``), else ``repo/filename`` from the
    hub: the cached file, or a download when the hub answers (``hub_unreachable``), else a one-line ``UserError``.
    ``reward`` as for ``hub_hint``."""
    if source is not None:
        s = os.path.expanduser(str(source))
        if os.path.isdir(s):
            if os.path.isfile(os.path.join(s, filename)):
                return os.path.join(s, filename)
            raise UserError(f"{what}: {source!r} holds no {filename!r} (pass the directory holding it, or the file "
                            f"itself, with {setting(arg, 'PATH', reward)})")
        if os.path.isfile(s):
            return s
        if not is_hub_id(str(source)):
            raise UserError(f"{what}: {source!r} does not exist (pass the local file {filename!r} with "
                            f"{setting(arg, 'PATH', reward)})")
        repo = str(source)
    hint = hub_hint(repo, what, arg, filename, reward=reward)
    _check_reachable(repo, filename, hint)
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id=repo, filename=filename)
    except Exception as err:  # offline / not found / no network: all mean "get the file yourself"
        raise UserError(hint) from err


def torch_dtype(dtype) -> torch.dtype:
    """``torch.float32`` from a dtype or a string ('fp32', 'bf16', 'float16', ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
    if str(dtype) not in names:
        raise UserError(f"unknown dtype {dtype!r} (use one of {', '.join(names)})")
    return names[str(dtype)]


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Frozen parameters, eval mode (dropout off)."""
    module.eval()
    module.requires_grad_(False)
    return module
