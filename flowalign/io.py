"""Safe file writes for run directories (DESIGN.md §5: writes are atomic, temp file + rename).

A crash (or a kill from a scheduler) in the middle of a write must never leave a half-written
``config.yaml``, ``summary.json``, checkpoint or PNG behind: every writer here writes a temporary file in the
same directory, flushes and fsyncs it, then ``os.replace``s it over the target (atomic on POSIX and Windows
within one filesystem). ``metrics.jsonl`` is appended one whole line per ``write`` call, and the reader
tolerates a truncated last line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Collection, Iterator, Sequence, Union

from flowalign.errors import UserError, first_line

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


_UMASK: int | None = None


def _umask() -> int:
    """The process's umask (read once: reading it means setting it)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0)
        os.umask(_UMASK)
    return _UMASK


def _new_file_mode(path: Path) -> int:
    """Mode for the replacement file: the existing file's, else what open() would give (0o666 & ~umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        pass
    return 0o666 & ~_umask()


def new_file_mode() -> int:
    """What ``open`` would give a new file: 0o666 & ~umask (``tempfile.mkstemp`` gives 0o600)."""
    return 0o666 & ~_umask()


def new_dir_mode() -> int:
    """What ``mkdir`` would give a new directory: 0o777 & ~umask (``tempfile.mkdtemp`` gives 0o700)."""
    return 0o777 & ~_umask()


def _tmp_path(path: Path) -> Path:
    # mkstemp creates 0600 files; give the final file ordinary permissions
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _new_file_mode(path))
    except (AttributeError, OSError):  # pragma: no cover - Windows
        pass
    os.close(fd)
    return Path(name)


def _fsync_path(path: PathLike) -> None:
    # fsync a file or a directory (a directory: make a rename in it durable); not supported everywhere (e.g. Windows,
    # some filesystems), where it is skipped
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_fsync_dir = _fsync_path


def _atomic_write(path: PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """``write(fh)`` into a temporary file beside ``path``, fsync, then rename it onto ``path`` (parents created): a
    reader sees the old file or the whole new one, never a part. On any error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parents created). Returns the path."""
    return _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (parents created). Returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values, paths, tuples and dataclasses into plain JSON values (recursively)."""
    import dataclasses

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    # torch / numpy without importing them: both expose .tolist() (and .item() for scalars)
    if hasattr(obj, "tolist"):
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return to_jsonable(obj.item())
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` (converted with :func:`to_jsonable`) as JSON atomically. NaN is written as ``NaN``."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=indent, sort_keys=False) + "\n")


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` atomically (optimizer / RNG / sampler state in checkpoints)."""
    import torch

    return _atomic_write(path, lambda fh: torch.save(obj, fh))


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Build a directory atomically: yields a temporary sibling directory; on success it replaces ``path``.

    Used for ``checkpoints/step-N/``: a reader never sees a checkpoint with only some of its files. If ``path``
    exists it is replaced once the new one is complete: swapped in atomically where the OS allows (Linux), else
    moved aside first (briefly missing); the old contents are then deleted. On an exception the
    temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:  # mkdtemp makes 0700: a checkpoint gets what mkdir would give (others on a shared machine may read it)
        os.chmod(tmp, new_dir_mode())
    except OSError:  # pragma: no cover - Windows
        pass
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_tree(tmp)  # the caller's files (e.g. safetensors' save_file) are not fsynced: make them durable first
    old = None
    if path.is_dir() and not path.is_symlink() and _exchange(tmp, path):
        old = tmp  # the swap was atomic: ``path`` was never missing; tmp now holds the old contents
    else:
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            old.rmdir()
            os.replace(path, old)
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` so a rename of ``root`` never outlives its contents (power loss)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                _fsync_path(p)
        _fsync_path(dirpath)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``). False where the platform, the C
    library or the filesystem does not support it (the caller then falls back to two renames)."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux / glibc < 2.28
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def append_jsonl(path: PathLike, record: dict) -> None:
    """Append one JSON object as one line (a single ``write`` on an ``O_APPEND`` file, then flush + fsync)."""
    append_jsonl_records(path, [record])


def append_jsonl_records(path: PathLike, records: Sequence[dict]) -> None:
    """Append JSON objects, one per line, in a single ``write`` on an ``O_APPEND`` file, then flush + fsync: a crash
    leaves at most a truncated last line, which ``read_jsonl`` skips."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(to_jsonable(r)) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: PathLike, strict: bool = False) -> list[dict]:
    """Read a JSONL file; blank lines are skipped and a truncated *last* line (a crash mid-append) is ignored
    with a warning. A corrupt line elsewhere raises ``ValueError`` naming the line; with ``strict`` (a file another
    program wrote whole, not one of our append-only logs) so does a corrupt last line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[dict] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1 and not strict:
                logger.warning("%s:%d: ignoring a truncated last line (%s)", path, i + 1, err.msg)
                break
            raise ValueError(f"{path}:{i + 1}: invalid JSON line ({err.msg})") from None
    return out



PROMPTS_KEY = "prompts_sha256"  # BatchJournal's settings key for the digest of the job's prompts


def prompts_digest(prompts: Sequence[Any]) -> str:
    """SHA-256 (hex) of ``prompts`` in order, texts and metadata (their JSON with sorted keys, via ``to_jsonable``):
    equal exactly when a job would sample the same prompts."""
    import hashlib

    text = json.dumps(to_jsonable(list(prompts)), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _setting_change(key: str, before: Any, now: Any) -> str:
    """One difference between a journal's settings and a resume's, as ``BatchJournal`` names it."""
    if key == PROMPTS_KEY:
        if before is None:
            return ("the prompts cannot be checked: the journal is from a flowalign that did not record them, so start "
                    "again without --resume")
        if now is None:
            return "the prompts cannot be checked: this command does not pass them to the journal"
        return f"the prompts differ in text, order or metadata, sha256 {before[:12]} -> {now[:12]}"
    if isinstance(before, dict) and isinstance(now, dict):  # name the nested values that differ, not both dicts
        return "; ".join(_setting_change(f"{key}.{k}", before.get(k), now.get(k))
                         for k in sorted(set(before) | set(now), key=str) if before.get(k) != now.get(k))
    return f"{key} {before!r} -> {now!r}"


def path_fingerprint(path: PathLike, edge: int = 1 << 20) -> str | None:
    """A SHA-256 standing for the files at a local ``path`` (a file, or a directory's files, hidden ones left out:
    ``hf download``'s ``.cache`` holds timestamps), so a resume can tell weights that were moved from other weights:
    each file's relative name, size and first and last ``edge`` bytes (a fine-tune of the same architecture has the
    same names and sizes but other bytes). Cheap for multi-GB checkpoints; None when ``path`` is no local file or
    directory (a hub id)."""
    import hashlib

    root = Path(os.path.expanduser(str(path)))
    if root.is_file():
        files = [(root.name, root)]
    elif root.is_dir():
        files = sorted((str(f.relative_to(root)), f) for f in root.rglob("*")
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts))
    else:
        return None
    digest = hashlib.sha256()
    for name, f in files:
        size = f.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(edge))
            if size > 2 * edge:
                fh.seek(size - edge)
                digest.update(fh.read(edge))
            elif size > edge:
                digest.update(fh.read())
    return digest.hexdigest()


class BatchJournal:
    """The finished batches of a long job (``flowalign eval``, ``flowalign steer``), so an interrupted run can resume.

    ``path`` is a JSONL file: a header ``{"journal": settings}``, then per finished batch its records followed by an
    end line ``{"journal_batch": b, **meta}``, all of a batch in one appending ``write``. A batch counts as done only
    with its end line, so a crash mid-write (a truncated or missing end line) loses just that batch.

    ``resume=False`` starts a new journal (the file is replaced); ``resume=True`` reads the old one. Its settings must
    equal ``settings`` (JSON-compared), else a one-line ``UserError`` names the differences. ``done`` maps each
    finished batch to (records, meta), leaving out the batches in ``redo`` (``redone`` counts their records); the file
    is rewritten with just those, so what it holds is always what is done. ``close()`` deletes it once the job's own outputs are written.

    ``prompts`` (the job's prompt records, in order, as sampled: after any subset) adds their ``prompts_digest`` to the
    settings as ``prompts_sha256``, so a resume whose prompts differ (an edited prompt file, other metadata) is refused
    even where the path and the count are the same. A journal written without it (flowalign before this check) cannot
    show its prompts were the same, so a resume that passes ``prompts`` refuses it too (start the run again).

    ``rebatch=(key, batch_of)`` lets the setting ``key`` (a batch size) differ on resume, for jobs whose records do
    not depend on it: the finished records are then regrouped by ``batch_of(record)``, the batch of the new size that
    holds each, so a batch may be partly done (the caller samples just its missing jobs, which ``add`` files under the
    same batch: entries of one batch are merged on reading). ``redo`` then names batches of the new size.
    """

    def __init__(self, path: PathLike, settings: dict, *, resume: bool = False, redo: Collection[int] = (),
                 prompts: Sequence[Any] | None = None,
                 rebatch: tuple[str, Callable[[dict], int]] | None = None):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(to_jsonable(settings)))
        if prompts is not None:
            self.settings[PROMPTS_KEY] = prompts_digest(prompts)
        self.done: dict[int, tuple[list[dict], dict]] = {}
        self.redone = 0  # records of finished batches in ``redo``, to be produced again
        self.rebatched = False  # resumed with another ``rebatch`` key value (then ``rebatched_from`` holds the old one)
        self.rebatched_from: Any = None
        if resume:
            try:
                rows = read_jsonl(self.path) if self.path.is_file() else []
            except ValueError as err:  # a corrupt line that is not the last
                raise UserError(f"--resume: cannot read {self.path} ({err}); delete it and start again without "
                                "--resume") from None
            if not rows or not isinstance(rows[0].get("journal"), dict):
                raise UserError(f"--resume: {self.path} is missing or has no settings header; start again without "
                                "--resume")
            before = rows[0]["journal"]
            free = rebatch[0] if rebatch is not None else None
            self.rebatched = free is not None and before.get(free) != self.settings.get(free)
            diff = [_setting_change(k, before.get(k), self.settings.get(k))
                    for k in sorted(set(before) | set(self.settings)) if before.get(k) != self.settings.get(k)
                    and k != free]
            if diff:
                raise UserError(f"--resume: the interrupted run in {self.path.parent} used other settings "
                                f"({'; '.join(diff)}); pass the same arguments, or choose a new --out")
            if self.rebatched:
                self.rebatched_from = before.get(free)
            entries: list[tuple[int, list[dict], dict]] = []  # (batch, its records, meta) in file order
            pending: list[dict] = []
            for row in rows[1:]:
                if "journal_batch" in row:
                    if isinstance(row["journal_batch"], int):
                        entries.append((row["journal_batch"], pending,
                                        {k: v for k, v in row.items() if k != "journal_batch"}))
                    pending = []
                else:
                    pending.append(row)
            if self.rebatched:  # the finished records, filed under the batches of the new size that hold them
                regrouped: dict[int, list[dict]] = {}
                for _, recs, _ in entries:
                    for r in recs:
                        regrouped.setdefault(int(rebatch[1](r)), []).append(r)
                entries = [(b, recs, {}) for b, recs in sorted(regrouped.items())]
            for b, recs, meta in entries:
                if b in redo:
                    self.redone += len(recs)
                elif b in self.done:  # a partly done batch finished later: one batch, its records merged
                    self.done[b] = (self.done[b][0] + recs, {**self.done[b][1], **meta})
                else:
                    self.done[b] = (recs, meta)
        lines = [{"journal": self.settings}]
        for b in sorted(self.done):
            lines += [*self.done[b][0], {"journal_batch": b, **self.done[b][1]}]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in lines))

    def records(self) -> list[dict]:
        """Every record of the finished batches, in batch order."""
        return [r for b in sorted(self.done) for r in self.done[b][0]]

    def add(self, batch: int, records: Sequence[dict], **meta: Any) -> None:
        """Record a finished batch (its records, and e.g. its cost) in one appending write."""
        append_jsonl_records(self.path, [*records, {"journal_batch": int(batch), **meta}])

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def check_writable_dir(directory: str | Path, path: str | Path, flag: str = "--out") -> None:
    """One-line ``UserError`` naming ``path`` when no file can be created in the existing ``directory`` (where the
    output ``path``, or the first of its missing parent directories, would be made): no write permission, or a
    read-only or virtual file system. Checked by ``os.access`` and then for real, by creating and deleting an empty
    temporary file there: ``os.access`` tells root that it may write anywhere, /sys and /proc included."""
    d = Path(directory)
    why = None if os.access(d, os.W_OK | os.X_OK) else "permission denied"
    if why is None:
        try:
            fd, probe = tempfile.mkstemp(prefix=".flowalign-write-probe-", dir=d)
        except OSError as err:
            why = err.strerror or first_line(err)
        else:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)
    if why is not None:
        raise UserError(f"{flag} {str(path)!r} cannot be written: no file can be created in {d} ({why}); pass a path "
                        f"in a writable directory")


def check_out_parent(path: str | Path, flag: str = "--out") -> None:
    """One-line ``UserError``, before any work, when the output ``path`` could not be written: an existing ancestor
    is a file, or the nearest existing directory on its way (``path`` itself when it is an existing directory, e.g.
    an output directory) is not writable (``check_writable_dir``). Without this, the write failed only after all the
    sampling (training, calibration, ...) was done. An existing file at ``path`` is judged by its directory: outputs
    are replaced through a temporary file beside them."""
    out = Path(path).absolute()
    for d in (out, *out.parents):
        try:
            if not d.exists() or (d == out and not d.is_dir()):
                continue
        except OSError:  # e.g. a parent without search permission: an answer further up
            continue
        if not d.is_dir():
            raise UserError(f"{flag} {str(path)!r}: {d} is a file, not a directory; pass a path in a directory")
        check_writable_dir(d, path, flag)
        return
