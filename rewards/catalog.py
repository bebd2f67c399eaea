"""``flowalign rewards``: the reward catalogue, and ``flowalign rewards serve`` (a reward behind HTTP).

    flowalign rewards [list] [--json]        every registered reward: what it measures, weights, differentiable, range
    flowalign rewards serve NAME [--host 127.0.0.1] [--port 8000] [--max-mb 256] [key=value ...]

Descriptions come from each class's attributes (``measures``, ``checkpoints``, ``differentiable``, ``typical_range``,
``kind``); rewards whose classes do not carry them are described by ``FALLBACK`` below. Importing a reward module is
cheap (heavy libraries load inside constructors), so listing never loads weights.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Any, Callable, Collection, Mapping, Optional, Sequence

from flowalign.errors import CommandParser, UserError

logger = logging.getLogger("flowalign.rewards")

# For reward classes without catalogue attributes (owned by other modules).
FALLBACK: dict[str, dict[str, Any]] = {
    "shapes_strict": {"measures": "shapes world: 1 iff every clause of the prompt holds (exact scene verifier, GenEval-style)",
                      "typical_range": "{0, 1}"},
    "shapes_partial": {"measures": "shapes world: mean clause score (counts 1 − |found − want|/want; colours, relation 0/1)",
                       "typical_range": "[0, 1]"},
    "shapes_soft": {"measures": "shapes world: shapes_partial with logistic thresholds (area, shape cues, relation); a training reward",
                    "typical_range": "[0, 1]"},
    "shapes_motion_strict": {"measures": "shapes world in motion (videos): 1 iff every named object is in every frame and moves steadily in its direction",
                             "typical_range": "{0, 1}"},
    "shapes_motion_partial": {"measures": "shapes world in motion (videos): mean of per-object presence share, direction 0/1, steadiness 0/1",
                              "typical_range": "[0, 1]"},
    "jpeg_compressibility": {"measures": "−JPEG size in kB at quality 95 (DDPO); drives images flat",
                             "typical_range": "−kB, size-dependent (flow_grpo scales by 1/500)"},
    "jpeg_incompressibility": {"measures": "+JPEG size in kB at quality 95 (DDPO); drives images to noise",
                               "typical_range": "+kB, size-dependent"},
    "edge_crispness": {"measures": "variance of the Laplacian of the luminance (sharpness / focus measure)",
                       "typical_range": "≥ 0, image-dependent"},
    "saturation": {"measures": "mean HSV saturation (max − min)/max", "typical_range": "[0, 1]"},
}


def describe(name: str) -> dict[str, Any]:
    """Catalogue entry for a registered reward: name, kind, differentiable, measures, checkpoints, typical_range."""
    from flowalign.rewards import REWARDS, resolve

    entry: dict[str, Any] = {"name": name, "target": REWARDS[name], "kind": "image", "differentiable": None,
                             "measures": "", "checkpoints": [], "typical_range": ""}
    fallback = FALLBACK.get(name, {})
    try:
        cls = resolve(name)
    except Exception as err:  # module missing or broken: still list it
        entry.update(fallback)
        entry["error"] = f"{type(err).__name__}: {err}"
        return entry
    entry["kind"] = getattr(cls, "kind", "image")
    diff = getattr(cls, "differentiable", None)
    entry["differentiable"] = diff if isinstance(diff, bool) else None
    doc = (getattr(cls, "__doc__", "") or "").strip().splitlines()
    entry["measures"] = getattr(cls, "measures", "") or fallback.get("measures") or (doc[0] if doc else "")
    entry["typical_range"] = getattr(cls, "typical_range", "") or fallback.get("typical_range", "")
    entry["checkpoints"] = [
        {"arg": c.arg, "default": c.default, "obtain": c.obtain} for c in getattr(cls, "checkpoints", ()) or ()
    ]
    return entry


def catalog() -> list[dict[str, Any]]:
    from flowalign.rewards import REWARDS

    return [describe(n) for n in REWARDS]


def format_catalog(entries: Sequence[dict[str, Any]]) -> str:
    diff = {True: "differentiable", False: "not differentiable", None: "differentiable: ?"}
    lines = []
    for e in entries:
        lines.append(f"{e['name']}  [{e['kind']}, {diff[e['differentiable']]}]  range: {e['typical_range'] or '?'}")
        lines.append(f"    measures: {e['measures']}")
        if e["checkpoints"]:
            for c in e["checkpoints"]:
                given = f"default {c['default']}" if c["default"] else "required"
                lines.append(f"    weights:  {c['arg']}= ({given}): {c['obtain']}")
        else:
            lines.append("    weights:  none needed (no checkpoint to download)")
        if "error" in e:
            lines.append(f"    (not importable here: {e['error']})")
    lines += ["", "Wrappers: Combined({name: weight}) (flowalign.rewards.multi), PerFrame(reward, stride, reduce) for video "
                  "(flowalign.rewards.video), Scaled(reward, scale, offset) (flowalign.rewards.base).",
              "Serve a reward over HTTP: flowalign rewards serve NAME --port 8000 key=value ...; "
              "score with RemoteReward('http://127.0.0.1:8000'). Details: docs/rewards.md."]
    return "\n".join(lines)


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs → kwargs (values read as YAML scalars: 1 → int, true → bool, fp32 → str)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"reward argument {item!r} is not key=value (e.g. path=/models/PickScore_v1 device=cuda)")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v else ""
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def check_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any], what: str, reserved: Collection[str] = ()) -> None:
    """Raise a one-line ``UserError`` when ``fn`` (a class or function) has no keyword parameter named like a key
    of ``kwargs``, naming the bad key, the valid ones and the closest. ``reserved`` parameters are set by the
    command itself and are not offered. Functions taking ``**kwargs`` accept anything and are not checked.

    Used by the commands that take constructor arguments from the user (``rewards serve``, ``eval --reward-arg``
    and ``--model-arg``), before anything is built; it lives here, low in the import order, so all can use it."""
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature (a C builtin): let the call decide
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in reserved]
    bad = [k for k in kwargs if k not in valid]
    if not bad:
        return
    import difflib

    close = difflib.get_close_matches(bad[0], valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    takes = f"valid: {', '.join(valid)}" if valid else "it takes none"
    raise UserError(f"{what} has no argument {bad[0]!r} ({takes}){hint}")


def _scalar_hint(hint: Any) -> bool:
    """Whether ``hint`` is bool, int or float, possibly ``Optional`` or ``Annotated`` (with an ``Interval``): the
    annotations whose values a command line can get wrong; paths, dtypes, mappings and unions of other types are
    left to the constructor."""
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return _scalar_hint(args[0])
    if origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        return len(rest) == 1 and _scalar_hint(rest[0])
    return hint in (bool, int, float)


def check_kwarg_types(fn: Callable[..., Any], kwargs: Mapping[str, Any], what: str) -> None:
    """A one-line ``UserError`` naming the first argument of ``kwargs`` whose value does not fit ``fn``'s parameter:
    its resolved annotation when that is bool / int / float (``Optional`` and ``Interval`` ranges included), else the
    type of its default, checked by ``flowalign.types.option_value_error`` (the trainer's check of registry options).
    Run with ``check_kwargs`` before anything is built, so that ``batch_size=abc`` is one line rather than a traceback
    after the weights loaded."""
    import inspect
    import typing

    from flowalign.types import option_value_error

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    target = fn.__init__ if isinstance(fn, type) else fn  # a reward class: its constructor's annotations
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # an annotation that does not resolve here: fall back to the defaults' types
        hints = {}
    for key, value in kwargs.items():
        param = params.get(key)
        if param is None:
            continue
        hint = hints.get(key)
        if hint is None and isinstance(param.default, (bool, int, float)):
            hint = type(param.default)
        if not _scalar_hint(hint):
            continue
        err = option_value_error(hint, value)
        if err:
            default = "" if param.default in (param.empty, None) else f", default {param.default!r}"
            raise UserError(f"{what}: {key}={value!r}: {err}{default}")


def check_device(value: Any, what: str) -> None:
    """A one-line ``UserError`` unless ``value`` (a reward's ``device`` argument) names a device this machine has:
    a string torch cannot parse, a bare integer, or a device this machine lacks (``dist.device_unavailable``, the
    check of every command's devices). Checked before the reward's weights load."""
    import torch

    if isinstance(value, int) and not isinstance(value, bool):  # `device=0` reads as YAML's integer 0
        raise UserError(f"{what}: device={value!r} is a bare index; pass device=cuda:{value} (or device=cpu)")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"{what}: device={value!r} is not a torch device; pass e.g. device=cpu, device=cuda or "
                        f"device=cuda:1") from None
    from flowalign.dist import device_unavailable

    why = device_unavailable(dev)
    if why:
        raise UserError(f"{what}: device={value!r} but {why}; pass device=cpu")


def _takes(fn: Callable[..., Any], arg: str) -> bool:
    """Whether ``fn`` (a class or function) accepts keyword ``arg`` (a ``**kwargs`` parameter counts)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == arg and p.kind is not p.POSITIONAL_ONLY) for p in params)


def build_reward_checked(name: str, kwargs: Mapping[str, Any], what: Optional[str] = None):
    """``build_reward(name, **kwargs)`` for the commands: a ``device`` the reward takes is checked first
    (``check_device``: an unavailable CUDA/MPS device or a malformed name is one line before any weights load); a
    ``TypeError``/``ValueError`` raised while building (a value of the wrong type or range that only the constructor
    sees) becomes a one-line ``UserError`` naming the reward and the argument(s) it came from (those whose value the
    error quotes, else all given)."""
    from flowalign.errors import first_line
    from flowalign.rewards import build_reward, resolve

    what = what or f"reward {name!r}"
    if kwargs.get("device") is not None and _takes(resolve(name), "device"):
        check_device(kwargs["device"], what)
    try:
        return build_reward(name, **kwargs)
    except UserError:
        raise
    except (TypeError, ValueError) as err:
        text = str(err)
        named = [k for k, v in kwargs.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)
                 and (repr(v) in text or (isinstance(v, str) and len(v) > 1 and v in text))]
        args = ", ".join(f"{k}={kwargs[k]!r}" for k in (named or list(kwargs)))
        raise UserError(f"{what}: cannot be built with {args or 'its defaults'} ({first_line(err)}); fix the "
                        f"value{'s' * (len(named or kwargs) > 1)} (`flowalign rewards` lists what each reward takes)"
                        ) from err


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        try:
            return _serve(argv[1:])
        except UserError as err:  # prefixed like serve's argument errors
            err.command = err.command or "rewards serve"
            raise
    p = CommandParser(prog="flowalign rewards", description="List every registered reward "
                                "(or `flowalign rewards serve NAME ...` to serve one over HTTP).")
    p.add_argument("command", nargs="?", default="list", choices=["list", "serve"],
                   help="list (default): the catalogue; serve NAME [key=value ...]: serve a reward over HTTP "
                        "(see `flowalign rewards serve --help`)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if args.command == "serve":  # `serve` not first, e.g. `rewards --json serve`
        raise UserError("`serve` must come first: flowalign rewards serve NAME [key=value ...] (see --help there)")
    entries = catalog()
    sys.stdout.write((json.dumps(entries, indent=2, ensure_ascii=False) if args.json else format_catalog(entries)) + "\n")
    return 0


def _check_bind(host: str, port: int) -> None:
    """One-line ``UserError`` if ``host:port`` cannot be bound (an unknown or foreign address, a port in use), found
    with a throw-away socket set up like the server's (SO_REUSEADDR), so nothing loads first."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise UserError(f"--host {host!r} is not an address of this machine ({err}); use 127.0.0.1 or 0.0.0.0") from None
    family = infos[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot serve on {host}:{port} ({err.strerror or err}); pass another --port (0 = any free "
                            "port) or --host") from None


def check_max_mb(value: float, flag: str = "--max-mb") -> int:
    """The request limit in bytes for ``value`` MiB, or a one-line ``UserError`` unless ``value`` is a finite number
    whose limit is at least one byte: NaN or inf cannot be converted, and a limit of 0 bytes or less would make the
    server answer every request with 413."""
    if not (math.isfinite(value) and value > 0) or int(value * 2**20) < 1:
        raise UserError(f"{flag} must be a finite number of MiB > 0 (the largest request body; default 256), "
                        f"got {value:g}")
    return int(value * 2**20)


def _serve(argv: Sequence[str]) -> int:
    from flowalign.rewards.remote import serve

    p = CommandParser(prog="flowalign rewards serve", description="Serve a reward over HTTP (JSON protocol "
                                "of flowalign.rewards.remote); reward constructor arguments as key=value.")
    p.add_argument("name", help="a registered reward name (see `flowalign rewards`)")
    p.add_argument("kwargs", nargs="*", default=[], help="constructor arguments, e.g. path=/models/PickScore_v1 device=cuda")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; no authentication)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    p.add_argument("--max-mb", type=float, default=256.0,
                   help="largest request body in MiB, a number > 0 (larger → HTTP 413)")
    args = p.parse_intermixed_args(list(argv))  # options and key=value pairs in any order
    from flowalign.rewards import resolve

    kwargs = parse_kwargs(args.kwargs)
    check_kwargs(resolve(args.name), kwargs, f"reward {args.name!r}")  # before any weights load
    check_kwarg_types(resolve(args.name), kwargs, f"reward {args.name!r}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535 (0 = any free port), got {args.port}")
    max_bytes = check_max_mb(args.max_mb)
    _check_bind(args.host, args.port)  # before any weights load
    reward = build_reward_checked(args.name, kwargs)
    try:
        server = serve(reward, host=args.host, port=args.port, max_bytes=max_bytes, background=False)
    except OSError as err:  # taken between the check and the bind
        raise UserError(f"cannot serve on {args.host}:{args.port} ({err.strerror or err}); pass another --port "
                        "(0 = any free port) or --host") from None
    sys.stdout.write(f"serving reward {getattr(reward, 'name', args.name)!r} at {server.url} (POST /score, GET /health); "
                     f"Ctrl-C stops\n")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
