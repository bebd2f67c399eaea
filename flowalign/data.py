"""Prompt sets, the prompt stream of a training run, group expansion and rank-local sharding.

* :func:`load_prompts` reads a built-in set by name (``shapes-train``, ``shapes-bench``, ``geneval``, ``parti``,
  ``pickscore``, ...; see :data:`BUILTIN_PROMPTS`) or a file: ``.txt`` (one prompt a line; blank lines and ``#``
  comment lines skipped), ``.jsonl`` (one object a line with a ``"prompt"`` key; the other keys become
  ``metadata``, e.g. GenEval's ``tag``/``include``), or ``.json`` (a list of strings or of such objects).
  Prompt text is kept exactly (no stripping: some benchmark prompts end in a space on purpose).
* :class:`PromptSampler` is the deterministic, epoch-shuffled stream of prompt indices for training, with
  ``state_dict``/``load_state_dict`` for exact resume. Every rank builds the same global list each iteration
  and keeps its own whole groups (:func:`shard_groups`), so the stream does not depend on the world size.
* :func:`expand_groups` maps each rollout to its prompt row (``cond_index``) and its group id (``group``).
"""

from __future__ import annotations

import codecs
import difflib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from flowalign.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "PromptRecord", "BUILTIN_PROMPTS", "load_prompts", "builtin_path", "describe_builtins", "task_of",
    "PromptSampler", "prompt_fingerprint", "shard_groups", "expand_groups", "HPD_STYLES", "load_hpd_benchmark",
    "source_of", "check_prompts",
]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt and its metadata (every other key of its JSONL line, e.g. ``task`` or GenEval's ``tag``)."""

    prompt: str
    metadata: dict = field(default_factory=dict)


def _at(record: PromptRecord, where: str) -> PromptRecord:
    """``record``, remembering where it was read (see :func:`source_of`). Kept beside the fields, not as one: equality,
    ``dataclasses.fields`` and every JSON of a record (digests, journals, results) stay text and metadata only."""
    object.__setattr__(record, "_source", where)
    return record


def source_of(record: Any) -> str | None:
    """Where :func:`load_prompts` read ``record``: ``FILE:LINE`` (.txt, .jsonl; a built-in set as ``NAME:LINE``),
    ``FILE[INDEX]`` (.json, the HPSv2 benchmark's style files), or None (a record made in code, a plain string)."""
    return getattr(record, "_source", None)


# name -> (path under flowalign/assets/prompts/, description). Benchmark files are vendored verbatim with their
# PROVENANCE.md (licences: MIT / Apache-2.0, see assets/prompts/benchmarks/).
BUILTIN_PROMPTS: dict[str, tuple[str, str]] = {
    "shapes-train": ("shapes-train.jsonl", "shapes world: training specifications for RL (metadata: task)"),
    "shapes-bench": ("shapes-bench.jsonl", "shapes world: evaluation prompts; two_object, position and color_attr disjoint from train, the small single_object, colors and counting spaces in train whole (metadata: task)"),
    "shapes-motion-train": ("shapes-motion-train.jsonl", "shapes world in motion: training prompts for video models (metadata: task)"),
    "shapes-motion-bench": ("shapes-motion-bench.jsonl", "shapes world in motion: evaluation prompts (metadata: task)"),
    "geneval": ("benchmarks/geneval/evaluation_metadata.jsonl", "GenEval, 553 prompts with tag/include/exclude (MIT)"),
    "parti": ("benchmarks/parti/prompts.jsonl", "PartiPrompts, 1,632 prompts with category/challenge (Apache-2.0)"),
    "pickscore": ("benchmarks/pickscore_sfw/test.txt", "Pick-a-Pic v1 SFW test captions via Flow-GRPO, 1,024 (MIT repo)"),
    "hpsv2": ("benchmarks/hps_das/hps_v2_all_eval.txt", "HPS-v2-style COCO captions via DAS, 50 eval prompts; NOT the official HPSv2 benchmark (MIT)"),
    "hpsv2-train": ("benchmarks/hps_das/hps_v2_all.txt", "HPS-v2-style COCO captions via DAS, 750 training prompts (MIT)"),
    "ocr": ("benchmarks/flow_grpo_ocr/test.txt", "Flow-GRPO OCR test prompts, 1,018, each with a quoted string (MIT)"),
    "imagereward": ("benchmarks/imagereward/benchmark_prompts.jsonl", "ImageReward benchmark, 100 prompts (Apache-2.0)"),
    "vbench": ("benchmarks/vbench/all_dimension.txt", "VBench all dimensions, 946 lines (944 unique) (Apache-2.0)"),
}
for _dim in ("appearance_style", "color", "human_action", "multiple_objects", "object_class", "overall_consistency",
             "scene", "spatial_relationship", "subject_consistency", "temporal_flickering", "temporal_style"):
    BUILTIN_PROMPTS[f"vbench-{_dim.replace('_', '-')}"] = (f"benchmarks/vbench/{_dim}.txt", f"VBench {_dim} prompts (Apache-2.0)")
for _cat in ("3d_spatial", "color", "complex", "non_spatial", "numeracy", "shape", "spatial", "texture"):
    BUILTIN_PROMPTS[f"t2i-compbench-{_cat.replace('_', '-')}"] = (
        f"benchmarks/t2i_compbench/{_cat}_val.txt", f"T2I-CompBench {_cat} validation split, 300 prompts (MIT)")
del _dim, _cat


def builtin_path(name: str) -> Path:
    """The installed file of built-in prompt set ``name`` (it may be missing if its generator has not run)."""
    import importlib.resources

    rel = BUILTIN_PROMPTS[name][0]
    root = importlib.resources.files("flowalign") / "assets" / "prompts"
    return Path(str(root.joinpath(*rel.split("/"))))


def describe_builtins() -> str:
    """One line per built-in prompt set: name and description."""
    width = max(map(len, BUILTIN_PROMPTS))
    return "\n".join(f"{name:<{width}}  {desc}" for name, (_, desc) in BUILTIN_PROMPTS.items())


def task_of(record: PromptRecord) -> str | None:
    """The task label used for per-task tables: ``task`` (shapes), ``tag`` (GenEval) or ``category`` (Parti)."""
    for key in ("task", "tag", "category"):
        value = record.metadata.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _parse_txt(text: str, source: str) -> list[PromptRecord]:
    out = []
    # newlines only (the reader already turned \r\n and \r into \n): str.splitlines() also breaks at U+2028, NEL,
    # form feeds, ..., which would silently cut one prompt into two
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        out.append(_at(PromptRecord(line, {}), f"{source}:{i}"))
    return out


_JSON_TYPES = {type(None): "null", bool: "true/false", int: "number", float: "number", list: "list", dict: "object"}


def _record_from_obj(obj: Any, where: str) -> PromptRecord:
    if isinstance(obj, str):
        obj = {"prompt": obj}
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with a \"prompt\" key, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if "prompt" in obj and not isinstance(prompt, str):
        raise UserError(f"{where}: \"prompt\" must be a string, got {_JSON_TYPES.get(type(prompt), type(prompt).__name__)}")
    if not isinstance(prompt, str):
        keys = ", ".join(map(str, obj)) or "none"
        raise UserError(f"{where}: no string \"prompt\" key (keys: {keys}); each line needs {{\"prompt\": \"...\", ...}}")
    if not prompt.strip():  # an empty prompt would silently be sampled (unconditionally) and scored
        raise UserError(f"{where}: empty prompt {prompt!r}; give each line a non-empty \"prompt\" or delete the line")
    return PromptRecord(prompt, {k: v for k, v in obj.items() if k != "prompt"})


def _parse_jsonl(text: str, source: str) -> list[PromptRecord]:
    out = []
    # split on newlines only: str.splitlines() also breaks at U+2028, U+0085, form feeds, ... which JSON strings may hold
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{source}:{i}: invalid JSON ({err.msg} at column {err.colno})") from None
        out.append(_at(_record_from_obj(obj, f"{source}:{i}"), f"{source}:{i}"))
    return out


def _parse_json(text: str, source: str) -> list[PromptRecord]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{source}:{err.lineno}: invalid JSON ({err.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("prompts"), list):
        data = data["prompts"]
    if not isinstance(data, list):
        raise UserError(f"{source}: a .json prompt file must hold a list of strings or of {{\"prompt\": ...}} objects")
    return [_at(_record_from_obj(obj, f"{source}[{i}]"), f"{source}[{i}]") for i, obj in enumerate(data)]


_PARSERS = {".txt": _parse_txt, ".jsonl": _parse_jsonl, ".json": _parse_json}


def _builtin_names_short() -> str:
    """Built-in names for error messages, with the per-dimension families folded."""
    families = ("vbench-", "t2i-compbench-")
    names = [n for n in BUILTIN_PROMPTS if not n.startswith(families)]
    return ", ".join(names + ["vbench-<dimension>", "t2i-compbench-<category>"])


def _unknown_name_error(name: str) -> UserError:
    close = difflib.get_close_matches(name, list(BUILTIN_PROMPTS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return UserError(f"prompt set {name!r} is neither a file nor a built-in name; {hint}built-in: {_builtin_names_short()}")


def load_prompts(name_or_path: str | Path) -> list[PromptRecord]:
    """Load a prompt set by built-in name or from a .txt / .jsonl / .json file (one-line ``UserError`` on problems)."""
    name = str(name_or_path)
    if name in BUILTIN_PROMPTS:
        path = builtin_path(name)
        if not path.is_file():
            raise UserError(f"built-in prompt set {name!r} is missing from the installed package ({path}); reinstall flowalign")
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise _unknown_name_error(name) if not (path.suffix or "/" in name) else UserError(
                f"prompt file not found: {path}; pass a .txt/.jsonl path or a built-in name ({_builtin_names_short()})")
        if path.is_dir():
            present = [style for style in HPD_STYLES if (path / f"{style}.json").is_file()]
            if len(present) == len(HPD_STYLES):
                return load_hpd_benchmark(path)
            if present:
                missing = [f"{style}.json" for style in HPD_STYLES if style not in present]
                raise UserError(f"prompt directory {path} looks like the HPSv2 benchmark's but lacks {', '.join(missing)}")
            raise UserError(f"prompt path {path} is a directory; pass a .txt, .jsonl or .json file (or the HPSv2 "
                            f"benchmark's directory, holding {', '.join(s + '.json' for s in HPD_STYLES)})")
    suffix = path.suffix.lower()
    parser = _PARSERS.get(suffix)
    if parser is None:
        raise UserError(f"prompt file {path}: unsupported extension {suffix or '(none)'!r}; use .txt, .jsonl or .json")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of the first prompt
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    records = parser(text, name if name in BUILTIN_PROMPTS else str(path))  # a built-in set's lines: NAME:LINE
    if not records:
        raise UserError(f"prompt file {path} contains no prompts")
    logger.debug("loaded %d prompts from %s", len(records), path)
    return records


HPD_STYLES = ("anime", "concept-art", "paintings", "photo")  # the HPSv2 benchmark's styles (REWARDS_AND_EVAL §3.3)


def load_hpd_benchmark(directory: str | Path) -> list[PromptRecord]:
    """The HPSv2 benchmark's prompts (Wu et al. 2023, "Human Preference Score v2", arXiv:2306.09341; REWARDS_AND_EVAL.md
    §3.3): ``directory`` holds ``<style>.json`` for the four styles (HPDv2's ``benchmark/``, 800 prompts each, not
    vendored), each a JSON list of strings. Records come style by style in ``HPD_STYLES`` order, with ``task`` = the
    style and ``style_index`` = the prompt's index in its file (the official image name is ``<style>/<index:05d>.jpg``)."""
    out = []
    for style in HPD_STYLES:
        path = Path(directory) / f"{style}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list) or not data or not all(isinstance(x, str) and x.strip() for x in data):
            raise UserError(f"{path}: the HPSv2 benchmark's style files hold a non-empty JSON list of prompt strings")
        out += [_at(PromptRecord(text, {"task": style, "style_index": i}), f"{path}[{i}]") for i, text in enumerate(data)]
    return out


def check_prompts(records: Sequence[Any], check: Callable[[list[str]], Any], setting: str | None = None) -> None:
    """Run ``check`` (a ``validate_prompts``: a closed-vocabulary model's, or a reward's that parses its prompts) on
    the distinct prompts of ``records`` (``PromptRecord`` objects or strings). Its one-line ``UserError`` comes back
    naming where the failing prompt came from: ``setting`` (e.g. ``data.train_prompts``) and the file and line of
    :func:`source_of`, as ``data.train_prompts (typo.txt:2): prompt 'a red squar': unknown word 'squar'; ...``.
    The set is checked whole first; only when that fails is each prompt checked alone, to find the one."""
    texts = list(dict.fromkeys(r if isinstance(r, str) else r.prompt for r in records))
    try:
        check(texts)
        return
    except UserError as err:
        whole = err
    if setting is None and not any(source_of(r) for r in records):
        raise whole  # nothing to add
    for text in texts:
        try:
            check([text])
        except UserError as err:
            where = next((source_of(r) for r in records if not isinstance(r, str) and r.prompt == text), None)
            label = " ".join(filter(None, [setting, f"({where})" if setting and where else where]))
            located = UserError(f"{label}: {err}")
            located.command = err.command
            raise located from None
    raise whole  # no prompt fails alone (a rule over the set): its own message


def _not_utf8(path: Path) -> UserError:
    """The error for a file that is not UTF-8, naming the line and the byte offset in the file (the utf-8-sig
    decoder counts bytes after the BOM, so its own offset is 3 short when there is one)."""
    raw = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        raw[skip:].decode("utf-8")
        return UserError(f"prompt file {path} is not UTF-8 text; save it as UTF-8")  # changed while reading
    except UnicodeDecodeError as err:
        at = skip + err.start
        line = 1 + raw.count(b"\n", 0, at) + raw.count(b"\r", 0, at) - raw.count(b"\r\n", 0, at)  # as the reader splits
        return UserError(f"{path}:{line}: prompt file is not UTF-8 text ({err.reason} at byte {at}); save it as UTF-8")


class PromptSampler:
    """Deterministic stream of prompt indices: epoch e is ``permutation(n)`` drawn from ``(seed, e)`` (or
    ``0..n-1`` without shuffling); each iteration takes the next ``groups_per_iter`` indices, crossing epochs.

    The stream is a pure function of (seed, position), so ``state_dict()`` is tiny and resume is exact; the
    same global list is produced on every rank, independent of the world size. Built from records (not a
    count), the state also holds a fingerprint of their text and metadata, so resuming over an edited prompt
    file of the same length is refused instead of silently training on other prompts.
    """

    def __init__(self, records: Sequence[Any] | int, groups_per_iter: int, seed: int, shuffle: bool = True):
        self.n = records if isinstance(records, int) else len(records)
        self.fingerprint = None if isinstance(records, int) else prompt_fingerprint(records)
        if self.n < 1:
            raise UserError("the training prompt set is empty")
        if groups_per_iter < 1:
            raise UserError(f"groups_per_iter must be >= 1, got {groups_per_iter}")
        self.groups_per_iter = int(groups_per_iter)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0  # next index within the current epoch's order
        self.iteration = 0  # calls to next_groups so far
        self._order_epoch = -1
        self._order: list[int] = []

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            if self.shuffle:
                import numpy as np

                # SeedSequence mixes (seed, epoch) into independent, well-spread streams
                # (a negative seed such as train.seed=-1 as its 64-bit word: numpy refuses negative entropy)
                seed = self.seed if self.seed >= 0 else self.seed & (2**64 - 1)
                self._order = np.random.default_rng([seed, epoch]).permutation(self.n).tolist()
            else:
                self._order = list(range(self.n))
            self._order_epoch = epoch
        return self._order

    def next_groups(self) -> list[int]:
        """The global list of prompt indices (one per group) for the next iteration."""
        out: list[int] = []
        while len(out) < self.groups_per_iter:
            order = self._epoch_order(self.epoch)
            take = min(self.groups_per_iter - len(out), self.n - self.position)
            out += order[self.position:self.position + take]
            self.position += take
            if self.position == self.n:
                self.epoch += 1
                self.position = 0
        self.iteration += 1
        return out

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "position": self.position, "iteration": self.iteration, "seed": self.seed,
                 "n": self.n, "groups_per_iter": self.groups_per_iter, "shuffle": self.shuffle}
        if self.fingerprint is not None:
            state["prompts_sha256"] = self.fingerprint
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the stream position; fails if the prompt set or the seed/shuffle settings changed."""
        for key, mine in (("n", self.n), ("seed", self.seed), ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise UserError(
                    f"cannot resume the prompt stream: the checkpoint has {key}={state[key]!r} but this run has {key}={mine!r} "
                    "(use the same prompt set, train.seed and data.shuffle as the original run)")
        saved = state.get("prompts_sha256")  # absent in checkpoints written before it existed: nothing to check
        if saved is not None and self.fingerprint is not None and saved != self.fingerprint:
            raise UserError(
                f"cannot resume the prompt stream: the training prompts changed since the checkpoint (same count, "
                f"n={self.n}, but other prompt text or metadata: sha256 {saved[:12]}... vs {self.fingerprint[:12]}...); "
                "resume with the original prompt file, or start a new run for the edited one")
        if state.get("groups_per_iter", self.groups_per_iter) != self.groups_per_iter:
            logger.warning("resuming with groups_per_iter=%d (checkpoint: %d): the stream continues from the same position",
                           self.groups_per_iter, state["groups_per_iter"])
        if not 0 <= int(state["position"]) < self.n:
            raise UserError(f"corrupt sampler state: position {state['position']} outside [0, {self.n})")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.iteration = int(state.get("iteration", 0))

    @staticmethod
    def shard_groups(groups: Sequence[int], rank: int, world_size: int) -> list[int]:
        """See the module-level :func:`shard_groups`."""
        return shard_groups(groups, rank, world_size)


def prompt_fingerprint(records: Sequence[Any]) -> str:
    """sha256 hex of the prompts' text and metadata, in order: one JSON line per record (JSON escapes newlines,
    so the joining is unambiguous; keys sorted so the metadata's key order does not matter)."""
    h = hashlib.sha256()
    for r in records:
        item = [r.prompt, r.metadata] if isinstance(r, PromptRecord) else [r, {}]  # a bare string = a record without metadata
        h.update(json.dumps(item, sort_keys=True, default=repr).encode("ascii") + b"\n")
    return h.hexdigest()


def shard_groups(groups: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous share of whole groups; the count must divide (``UserError`` naming both numbers)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    if len(groups) % world_size:
        raise UserError(
            f"{len(groups)} groups per iteration do not split evenly over {world_size} processes; "
            f"set train.groups_per_iter to a multiple of {world_size}")
    k = len(groups) // world_size
    return list(groups[rank * k:(rank + 1) * k])


def expand_groups(prompt_idx: Sequence[int], group_size: int, group_offset: int = 0, device: Any = None):
    """Map every rollout to its prompt row and its group.

    ``prompt_idx`` has one entry per group (a rank's groups). Rollouts are laid out group-major: rollout
    ``i`` belongs to group ``i // group_size``. Returns ``(cond_index [N], group [N])`` int64 tensors with
    ``N = len(prompt_idx) * group_size``; ``cond_index`` indexes the rows of ``encode([prompt of each group])``
    (one row per group, so a prompt drawn twice is simply encoded twice), and ``group`` is the group id,
    offset by ``group_offset`` (e.g. ``rank * groups_per_rank``) so ids are unique across ranks.
    """
    import torch

    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    rows = torch.arange(len(prompt_idx), device=device)  # [n_groups]
    cond_index = rows.repeat_interleave(group_size)  # [N]
    group = cond_index + int(group_offset)  # [N]
    return cond_index, group


def spaced_subset(records: Sequence[Any], n: int) -> list:
    """``n`` evenly spaced records (all if n <= 0 or n >= len), in file order; every task keeps its share (±1),
    also when the tasks are interleaved (then the spacing is within each task)."""
    if n <= 0 or n >= len(records):
        return list(records)
    tasks = [task_of(r) if isinstance(r, PromptRecord) else None for r in records]
    runs = [t for i, t in enumerate(tasks) if i == 0 or t != tasks[i - 1]]
    if len(runs) == len(set(runs)):  # task-ordered (or unlabelled): even spacing keeps each task's share
        return [records[(i * len(records)) // n] for i in range(n)]
    # tasks interleaved (e.g. a shuffled set): even spacing would sample shares at random and can drop a task,
    # so space evenly within each task and give out the shares by largest remainder (ties: first task seen)
    by_task: dict[Any, list[int]] = {}
    for i, t in enumerate(tasks):
        by_task.setdefault(t, []).append(i)
    quota = {t: n * len(ix) / len(records) for t, ix in by_task.items()}
    take = {t: int(q) for t, q in quota.items()}
    for t in sorted(quota, key=lambda t: take[t] - quota[t])[: n - sum(take.values())]:
        take[t] += 1
    picked = sorted(ix[(j * len(ix)) // take[t]] for t, ix in by_task.items() for j in range(take[t]))
    return [records[i] for i in picked]
