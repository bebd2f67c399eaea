"""A reward behind HTTP: ``serve(reward)`` (stdlib server) and ``RemoteReward(url)`` (client) (REWARDS_AND_EVAL.md §2.8).

Use it for rewards whose dependencies conflict with the training environment (GenEval's mmdet stack, a VLM judge)
or that live on another GPU. Never pickle: the protocol is JSON.

Protocol (version 1):

* ``POST /score`` with ``Content-Type: application/json``::

      {"images": {"dtype": "uint8" | "float16" | "float32", "shape": [B,3,H,W] or [B,F,3,H,W],
                  "data": base64 of the C-order little-endian array},
       "prompts": [B strings], "metadata": null or [B JSON objects]}

  uint8 holds round(255·clamp(x, 0, 1)) and is decoded as q/255; float16/float32 hold x itself.
  Reply ``{"scores": [B numbers, null for NaN], "name": ...}``. Scores travel as JSON numbers written from float32
  values, so they round-trip exactly.
* ``GET /health`` → ``{"status": "ok", "name", "kind", "differentiable": false, "protocol": 1}``.
* Errors: 400 malformed request (bad JSON, base64, dtype, shape, prompt count), 404 unknown path, 411 no
  Content-Length, 413 body above ``max_bytes``, 500 the reward raised. The server keeps serving after each.

Exactness: with ``encoding="float32"`` the remote scores equal the local reward's scores bit for bit (same device,
dtype and batch; a different ``batch_size`` changes them only within the reward's batch independence, ~1e-6); with the default ``uint8`` they equal the local reward applied to the quantised images q/255 (the parity path's
quantisation, 4× less traffic); ``float16`` keeps ~3 significant digits of each pixel.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from flowalign.errors import UserError
from flowalign.rewards.base import Reward, check_inputs, nan_unless_finite
from flowalign.rewards.clip_common import batched, quantize

logger = logging.getLogger("flowalign.rewards")

PROTOCOL = 1
ENCODINGS = ("uint8", "float16", "float32")


# --------------------------------------------------------------------------------------------------------------------
# payload


def encode_images(images: Tensor, encoding: str = "uint8") -> dict:
    """[B,3,H,W] / [B,F,3,H,W] in [0,1] → the JSON ``images`` object."""
    if encoding not in ENCODINGS:
        raise UserError(f"remote reward: unknown encoding {encoding!r} (use one of {', '.join(ENCODINGS)})")
    x = images.detach()
    arr = quantize(x).cpu().numpy() if encoding == "uint8" else x.to(getattr(torch, encoding)).cpu().numpy()
    arr = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False)
    return {"dtype": encoding, "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_images(obj: Any) -> Tensor:
    """The JSON ``images`` object → float32 [B,3,H,W] / [B,F,3,H,W]; ``ValueError`` on anything malformed."""
    if not isinstance(obj, dict):
        raise ValueError("'images' must be an object with dtype, shape and data")
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if dtype not in ENCODINGS:
        raise ValueError(f"images.dtype must be one of {ENCODINGS}, got {dtype!r}")
    if not (isinstance(shape, list) and len(shape) in (4, 5) and all(isinstance(s, int) and s > 0 for s in shape)
            and shape[-3] == 3):
        raise ValueError(f"images.shape must be [B,3,H,W] or [B,F,3,H,W] with positive ints, got {shape!r}")
    if not isinstance(data, str):
        raise ValueError("images.data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as err:
        raise ValueError(f"images.data is not valid base64 ({err})") from None
    np_dtype = np.dtype(dtype).newbyteorder("<")
    if len(raw) != math.prod(shape) * np_dtype.itemsize:
        raise ValueError(f"images.data holds {len(raw)} bytes, shape {shape} {dtype} needs {math.prod(shape) * np_dtype.itemsize}")
    arr = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
    x = torch.from_numpy(arr.astype(np.float32 if dtype != "uint8" else np.uint8))
    return x.float() / 255.0 if dtype == "uint8" else x


def _scores_to_json(scores: Tensor) -> list:
    return [None if not math.isfinite(v) else v for v in scores.detach().float().cpu().tolist()]


# --------------------------------------------------------------------------------------------------------------------
# server


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"
    timeout = 120  # seconds a connection may stall before its thread gives up

    def log_message(self, fmt: str, *args) -> None:  # route the stdlib's stderr access log to logging
        logger.debug("reward server: " + fmt, *args)

    def _reply(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if code >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            r = self.server.reward
            self._reply(200, {"status": "ok", "name": getattr(r, "name", "reward"), "kind": getattr(r, "kind", "image"),
                              "differentiable": False, "protocol": PROTOCOL})
        else:
            self._reply(404, {"error": f"unknown path {self.path!r} (use POST /score or GET /health)"})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/score":
            self._reply(404, {"error": f"unknown path {self.path!r} (use POST /score or GET /health)"})
            return
        length = self.headers.get("Content-Length")
        if length is None:
            self._reply(411, {"error": "Content-Length required"})
            return
        try:
            n = int(length)
            if n < 0:  # rfile.read(-1) would wait for the client to close the connection
                raise ValueError
        except ValueError:
            self._reply(400, {"error": f"bad Content-Length {length!r}"})
            return
        if n > self.server.max_bytes:  # refuse without holding the body: drain it in chunks so the client reads the 413
            left = n
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
            self._reply(413, {"error": f"request of {n} bytes exceeds the server limit of {self.server.max_bytes}; "
                                       f"lower the client's batch_size"})
            return
        try:
            req = json.loads(self.rfile.read(n))
            if not isinstance(req, dict):
                raise ValueError("the body must be a JSON object")
            images = decode_images(req.get("images"))
            prompts = req.get("prompts")
            if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
                raise ValueError("'prompts' must be a list of strings")
            if len(prompts) != images.shape[0]:
                raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
            metadata = req.get("metadata")
            if metadata is not None and not (isinstance(metadata, list) and len(metadata) == len(prompts)):
                raise ValueError("'metadata' must be null or a list with one object per image")
        except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            self._reply(400, {"error": f"malformed request: {err}"})
            return
        try:
            with self.server.lock, torch.no_grad():  # one batch at a time on the device
                scores = self.server.reward(images.to(self.server.device), prompts, metadata)
            if not (torch.is_tensor(scores) and scores.shape == (len(prompts),)):
                raise RuntimeError(f"reward returned {getattr(scores, 'shape', type(scores))}, expected [{len(prompts)}]")
        except Exception as err:  # report, keep serving
            logger.exception("reward server: scoring failed")
            self._reply(500, {"error": f"{type(err).__name__}: {err}"})
            return
        self._reply(200, {"scores": _scores_to_json(scores), "name": getattr(self.server.reward, "name", "reward")})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, reward, max_bytes: int, device):
        super().__init__(addr, _Handler)
        self.reward, self.max_bytes, self.device = reward, int(max_bytes), device
        self.lock = threading.Lock()


class RewardServer:
    """A running reward server: ``url``, ``port``, ``close()``; a context manager."""

    def __init__(self, httpd: _Server, thread: Optional[threading.Thread]):
        self.httpd, self.thread = httpd, thread
        host, port = httpd.server_address[:2]
        self.host, self.port = host, int(port)
        self.url = f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        """Stop serving and release the port."""
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join(timeout=5)
        self.httpd.server_close()

    def __enter__(self) -> "RewardServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(reward, host: str = "127.0.0.1", port: int = 0, *, max_bytes: int = 256 << 20, device=None,
          background: bool = True) -> RewardServer:
    """Serve ``reward`` on ``host:port`` (port 0 = a free port; see ``.url``).

    ``background=True`` serves from a daemon thread and returns at once; ``False`` returns a server whose
    ``serve_forever()`` the caller runs (the CLI). Images are moved to ``device`` (default: the reward's ``device``
    attribute, else CPU). Bind to 127.0.0.1 unless the network between client and server is trusted: there is no
    authentication.
    """
    dev = device if device is not None else getattr(reward, "device", "cpu")
    httpd = _Server((host, int(port)), reward, max_bytes, torch.device(dev))
    thread = None
    if background:
        thread = threading.Thread(target=httpd.serve_forever, name="flowalign-reward-server", daemon=True)
        thread.start()
    srv = RewardServer(httpd, thread)
    logger.info("reward server %r listening on %s", getattr(reward, "name", "reward"), srv.url)
    return srv


# --------------------------------------------------------------------------------------------------------------------
# client


class RemoteReward(Reward):
    """Client of a ``serve``-d reward; a ``RewardModel`` (not differentiable).

    Args:
        url: server base URL, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds per attempt for the whole request: connect, send, and read of the complete reply. A server
            that answers slowly (or trickles its reply) is cut off at the deadline and the attempt counts as a timeout.
        retries: extra attempts after a connection error, timeout or 502/503/504 (0 = one attempt).
        backoff: sleep ``backoff · 2**attempt`` seconds between attempts.
        batch_size: images per request.
        encoding: ``uint8`` (default) | ``float16`` | ``float32`` (exact; see the module docstring).
        name, kind: reported attributes (the server's reward name is not fetched at construction).
    Unreachable after all attempts → ``UserError`` (one line, with the URL and the last error). A 4xx/500 reply →
    ``UserError`` with the server's message on one line (not retried: the same request would fail again). A reply
    whose scores are not numbers or null → ``UserError`` naming the first bad entry. An image with a non-finite value
    scores NaN whatever the encoding (uint8 cannot carry NaN to the server). The client connects directly: proxy
    variables (``HTTP_PROXY``, ...) are not used.
    """

    differentiable = False
    measures = "a reward served over HTTP by `flowalign rewards serve` (JSON, base64 images)"
    typical_range = "that of the served reward"

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, batch_size: int = 64,
                 encoding: str = "uint8", name: str = "remote", kind: str = "image"):
        if encoding not in ENCODINGS:
            raise UserError(f"remote reward: unknown encoding {encoding!r} (use one of {', '.join(ENCODINGS)})")
        if not str(url).startswith(("http://", "https://")):
            raise UserError(f"remote reward: url must start with http:// or https://, got {url!r}")
        if not (math.isfinite(float(timeout)) and float(timeout) > 0):
            raise UserError(f"remote reward: timeout must be a finite number of seconds > 0, got {timeout!r}")
        self.url = str(url).rstrip("/")
        try:
            parts = urllib.parse.urlsplit(self.url)
            port = parts.port
            host = parts.hostname
            host.encode("idna") if host else None  # an empty or over-long label: refused here, not mid-training
            (parts.path + "/score").encode("ascii")
        except (ValueError, UnicodeError):
            host = port = None
            parts = None
        if parts is None or not host:
            raise UserError(f"remote reward: url {url!r} has no valid host, port or ASCII path; pass e.g. "
                            f"http://127.0.0.1:8000")
        self._https, self._host, self._path = parts.scheme == "https", host, parts.path + "/score"
        # the port always explicit: http.client would read the last ':…' of a bare IPv6 host ('::1') as one
        self._port = port if port is not None else (443 if self._https else 80)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.batch_size, self.encoding = int(batch_size), encoding
        self.name, self.kind = name, kind

    def _attempt(self, body: bytes) -> tuple[int, str, bytes]:
        """One POST /score within ``timeout`` seconds → (status, reason, body). Raises ``TimeoutError`` at the
        deadline, ``OSError`` / ``http.client.HTTPException`` on a failed connection or a cut reply.

        A socket timeout only bounds each single read, so a server that sends a byte now and then would hold the
        client indefinitely: a timer shuts the socket down at the deadline, which wakes the blocked call."""
        conn_cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = conn_cls(self._host, self._port, timeout=self.timeout)
        deadline = time.monotonic() + self.timeout
        conn._create_connection = lambda address, timeout=None, source_address=None: _connect_within(  # noqa: SLF001
            address, deadline, source_address)  # socket.create_connection gives every address the whole timeout
        expired = threading.Event()
        held: list[socket.socket] = []  # the connected socket: http.client drops conn.sock once a reply says "close"

        def expire() -> None:
            expired.set()
            for sock in held:
                try:  # the base class's shutdown: an SSL socket's would also tear down its TLS state under the reader
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(self.timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            conn.connect()  # TCP connect within the deadline (_connect_within), a TLS handshake's reads by the timer
            held.append(conn.sock)
            if expired.is_set():  # before the socket was held: expire() could not shut it down
                raise TimeoutError
            conn.request("POST", self._path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            try:
                data = resp.read()
            finally:
                resp.close()
            if expired.is_set():  # a reply without Content-Length reads as complete when the socket shuts down
                raise TimeoutError
            return resp.status, resp.reason, data
        except (OSError, http.client.HTTPException):
            if expired.is_set():
                raise TimeoutError(f"no complete reply within timeout={self.timeout:g} s") from None
            raise
        finally:
            timer.cancel()
            conn.close()

    def _post(self, payload: dict) -> dict:
        body = json.dumps(payload).encode()
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                status, reason, raw = self._attempt(body)
            except (ConnectionError, TimeoutError, OSError, http.client.HTTPException) as err:
                # HTTPException: a reply cut short (IncompleteRead) or garbled, not an HTTP error status
                last = _one_line(str(err) or type(err).__name__)
                continue
            if not 200 <= status < 300:
                msg = _error_message(raw) or reason
                if status in (502, 503, 504):
                    last = f"HTTP {status} {msg}"
                    continue
                raise UserError(f"remote reward {self.url}: HTTP {status}: {msg}")
            try:
                return json.loads(raw)
            except ValueError:  # e.g. an HTML page from another service on that port
                raise UserError(f"remote reward {self.url}: the reply is not JSON ({raw[:80]!r}); is it a "
                                f"`flowalign rewards serve` server?") from None
        raise UserError(
            f"remote reward {self.url} unreachable after {self.retries + 1} attempts (last error: {last}); start it with "
            f"`flowalign rewards serve NAME --port PORT` or fix the url"
        )

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> Tensor:
        check_inputs(images, prompts, self.kind)
        out: list[float] = []
        for s in batched(images.shape[0], self.batch_size):
            payload = {"images": encode_images(images[s], self.encoding), "prompts": list(prompts[s]),
                       "metadata": None if metadata is None else list(metadata[s])}
            reply = self._post(payload)
            scores = reply.get("scores") if isinstance(reply, dict) else None
            if not isinstance(scores, list) or len(scores) != s.stop - s.start:
                raise UserError(f"remote reward {self.url}: bad reply (expected {s.stop - s.start} scores)")
            out.extend(self._score(v, s.start + i) for i, v in enumerate(scores))
        return nan_unless_finite(torch.tensor(out, dtype=torch.float32, device=images.device), images)  # [B]

    def _score(self, value: Any, index: int) -> float:
        """A reply's score: a JSON number, or null for NaN (the protocol); anything else is a one-line error."""
        if value is None:
            return float("nan")
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # JSON true/false arrive as bool
            try:
                return float(value)
            except OverflowError:  # an integer literal beyond float range
                pass
        shown = _one_line(json.dumps(value), 60)
        raise UserError(f"remote reward {self.url}: bad reply: the score of image {index} is {shown}, expected a "
                        f"number or null; is it a `flowalign rewards serve` server (protocol {PROTOCOL})?")


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` with its line breaks and runs of white space folded to single spaces, cut to ``limit`` characters: a
    server's or socket's message inside a one-line ``UserError``."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _error_message(raw: bytes) -> str:
    """The ``error`` text of an error reply's JSON body, on one line; "" when the body is not such JSON."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return ""
    msg = obj.get("error") if isinstance(obj, dict) else None
    return _one_line(msg) if isinstance(msg, str) else ""


def _connect_within(address: tuple[str, int], deadline: float, source_address: Any = None):
    """``socket.create_connection`` with one deadline for every address the host resolves to: each try gets the time
    left, not the whole timeout (a host whose IPv6 address is black-holed would take twice the timeout). The name
    lookup itself is the system resolver's and is not bounded."""
    host, port = address
    last: Optional[BaseException] = None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            last = err
            sock.close()
    if last is not None and deadline - time.monotonic() > 0:
        raise last
    raise TimeoutError("connecting timed out")
