"""The process group of a multi-process launch (``accelerate launch`` / ``torchrun``): rank, world size, collectives.

One process (the default) gives rank 0 of 1 and no-op collectives, so every caller runs the same code either way.
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")


TIMEOUT_ENV = "FLOWALIGN_DIST_TIMEOUT_MIN"  # minutes a collective may wait for the slowest rank
DEFAULT_TIMEOUT_MIN = 120
MAX_TIMEOUT_MIN = 1e7  # 19 years: "no timeout" in practice


def world_size_env() -> int:
    """``WORLD_SIZE`` as set by accelerate launch / torchrun (1 when unset), or a one-line ``UserError`` for a value
    that is not a process count (e.g. ``WORLD_SIZE=$SLURM_NTASKS`` with the variable unset)."""
    from flowalign.errors import UserError

    raw = os.environ.get("WORLD_SIZE", "").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a process count; unset it, or start the "
                        f"processes with accelerate launch or torchrun")
    return int(raw)


def die_with_launcher(world: int) -> None:
    """Under ``accelerate launch`` / torchrun (``world`` > 1, ``TORCHELASTIC_RUN_ID`` set), end this process when the
    launcher's agent, its parent, dies (Linux ``PR_SET_PDEATHSIG``): a launcher killed with SIGKILL left its workers
    training on, and a resume started then ran beside them in the same run directory, interleaving its metrics and
    checkpoints. A no-op for one process (a run under nohup outlives its shell) and where prctl is unavailable."""
    import signal
    import sys

    if world <= 1 or "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def _timeout():
    """The process group's collective timeout: ``FLOWALIGN_DIST_TIMEOUT_MIN`` minutes (default 120; torch's own
    default, 10 or 30 min by backend, is shorter than one evaluation or checkpoint of a large model can take)."""
    from datetime import timedelta

    from flowalign.errors import UserError

    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        minutes = float(raw) if raw else DEFAULT_TIMEOUT_MIN
        if not 0 < minutes <= MAX_TIMEOUT_MIN:  # NaN fails too; torch keeps the timeout in int64 milliseconds
            raise ValueError
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of minutes, at most {MAX_TIMEOUT_MIN:g} "
                        f"(default {DEFAULT_TIMEOUT_MIN})") from None
    return timedelta(minutes=minutes)


def process_group():
    """(rank, world_size, all_reduce_mean) — torch.distributed when launched by accelerate/torchrun."""
    import torch.distributed as dist

    if world_size_env() > 1 and not dist.is_initialized():
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        timeout = _timeout()
        try:
            Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
        except (ValueError, RuntimeError, KeyError) as err:  # WORLD_SIZE set by hand: no group to join
            from flowalign.errors import UserError, first_line

            raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but there is no process group to join "
                            f"({first_line(err)}); start the processes with accelerate launch or torchrun, or unset "
                            f"WORLD_SIZE") from None
    if dist.is_available() and dist.is_initialized():
        ws = dist.get_world_size()
        # NCCL (accelerate's multi-GPU backend) reduces CUDA tensors only; metrics and flags live on the CPU
        comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None

        def reduce_mean(t: torch.Tensor) -> torch.Tensor:
            u = t if comm is None or t.device == comm else t.to(comm)
            dist.all_reduce(u)
            u.div_(ws)
            if u is not t:
                t.copy_(u)
            return t

        return dist.get_rank(), ws, reduce_mean, dist.barrier
    return 0, 1, (lambda t: t), (lambda: None)


def once_on_rank0(fn: Callable[[], T], rank: int, world: int) -> T:
    """``fn()`` on rank 0 only, its result (or its one-line ``UserError``) shared with every rank, so that all ranks
    go on with the same value or all raise the same error. For checks with side effects that the other ranks must not
    see, e.g. a writability probe that makes a directory look non-empty to a rank listing it at the same moment."""
    from flowalign.errors import UserError

    if world == 1:
        return fn()
    import torch.distributed as dist

    from flowalign.errors import first_line

    box: list[Any] = [None]
    failure = None
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as err:
            box[0] = ("error", str(err))
        except Exception as err:  # noqa: BLE001  (re-raised on rank 0 once the others know: none waits alone)
            failure, box[0] = err, ("error", f"rank 0 failed: {first_line(err)}")
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


def device_unavailable(dev: torch.device) -> str:
    """'' when this machine can use ``dev``, else why not, phrased to follow "but": no CUDA build or no GPU visible, a
    CUDA index beyond the GPUs seen, MPS not available, another backend (xpu, ...) this torch lacks. The one check
    behind every device a command takes (--device, model.device, a reward's device=), before anything loads; torch
    itself fails only inside the first ``.to(device)``, with a multi-line traceback."""
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return ("no CUDA device is visible here" if torch.backends.cuda.is_built() else
                    f"this torch ({torch.__version__}) has no CUDA")
        if (dev.index or 0) >= count:
            return f"{count} CUDA device(s) are visible here (indices below {count})"
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            return "MPS is not available here"
    elif dev.type not in ("cpu", "meta"):
        backend = getattr(torch, dev.type, None)
        if backend is not None and callable(getattr(backend, "is_available", None)) and not backend.is_available():
            return f"this torch ({torch.__version__}) has no {dev.type} device here"
    return ""


def process_device(name: str, world: int) -> torch.device:
    """``model.device``, except that under a multi-process launch each rank takes its own GPU (the one accelerate
    made current: the local rank's), as the field's doc says; "cuda:1" on every rank would put all ranks on one GPU."""
    dev = torch.device(name)
    if world > 1 and dev.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return dev
