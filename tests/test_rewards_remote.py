"""The HTTP reward server and client (flowalign.rewards.remote) and `flowalign rewards serve`."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from flowalign.errors import UserError
from flowalign.rewards import build_reward
from flowalign.rewards.remote import RemoteReward, encode_images, serve
from tiny_rewards import tiny_clip_dir  # noqa: F401  (session fixture)


class Toy:
    """Deterministic, prompt-dependent; NaN for prompt 'nan'; raises for prompt 'boom'; sleeps for 'slow'."""

    name = "toy"
    differentiable = True
    kind = "image"

    def __call__(self, images, prompts, metadata=None):
        if "boom" in prompts:
            raise RuntimeError("kaboom")
        if "slow" in prompts:
            time.sleep(1.5)
        s = images.float().flatten(1).mean(1) * 3.1 + torch.tensor([len(p) * 0.01 for p in prompts])
        if metadata is not None:
            s = s + torch.tensor([float(m.get("bonus", 0)) for m in metadata])
        return torch.where(torch.tensor([p == "nan" for p in prompts]), torch.full_like(s, float("nan")), s)


@pytest.fixture(scope="module")
def toy_server():
    with serve(Toy(), max_bytes=20_000) as srv:
        yield srv


def raw(srv, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
    conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read() or b"{}")
    conn.close()
    return out


def good_payload(n=2, encoding="float32"):
    return {"images": encode_images(torch.rand(n, 3, 8, 8), encoding), "prompts": ["a"] * n, "metadata": None}


def test_round_trip_exact_float32_and_uint8_quantised(tiny_clip_dir):
    local = build_reward("pickscore", path=str(tiny_clip_dir))
    imgs = torch.rand(5, 3, 40, 36)
    prompts = ["a red cat", "a dog", "a red cat", "two stars", "nan?"]
    with serve(local) as srv:
        assert srv.host == "127.0.0.1"
        exact = RemoteReward(srv.url, encoding="float32")(imgs, prompts)  # same batch as local: bit-exact
        assert exact.dtype == torch.float32 and torch.equal(exact, local(imgs, prompts))
        split = RemoteReward(srv.url, encoding="float32", batch_size=2)(imgs, prompts)  # 3 requests
        assert torch.allclose(split, exact, atol=1e-5, rtol=0)  # batch independence (§1), not bitwise
        q = RemoteReward(srv.url)(imgs, prompts)  # default uint8
        assert torch.equal(q, local((imgs * 255).round() / 255, prompts))
        h = RemoteReward(srv.url, encoding="float16")(imgs, prompts)
        assert torch.allclose(h, local(imgs, prompts), atol=1e-2)
        status, info = raw(srv, "GET", "/health")
        assert status == 200 and info["name"] == "pickscore" and info["differentiable"] is False


def test_nan_metadata_and_video_shapes(toy_server):
    imgs = torch.rand(3, 3, 8, 8)
    client = RemoteReward(toy_server.url, encoding="float32")
    out = client(imgs, ["x", "nan", "yy"], metadata=[{"bonus": 1}, {}, {"bonus": 2}])
    ref = Toy()(imgs, ["x", "nan", "yy"], [{"bonus": 1}, {}, {"bonus": 2}])
    assert torch.isnan(out[1]) and torch.equal(out[[0, 2]], ref[[0, 2]])
    vid = torch.rand(2, 4, 3, 8, 8)  # the server forwards [B,F,3,H,W] as is
    status, body = raw(toy_server, "POST", "/score",
                       json.dumps({"images": encode_images(vid, "float32"), "prompts": ["a", "b"]}).encode())
    assert status == 200 and len(body["scores"]) == 2


def test_malformed_requests_get_4xx_and_server_keeps_serving(toy_server):
    bad = {
        "not json": b"{nope",
        "not an object": b"[1, 2]",
        "bad dtype": json.dumps({**good_payload(), "images": {**good_payload()["images"], "dtype": "int64"}}).encode(),
        "bad shape": json.dumps({**good_payload(), "images": {**good_payload()["images"], "shape": [2, 4, 8, 8]}}).encode(),
        "short data": json.dumps({**good_payload(), "images": {**good_payload()["images"], "shape": [3, 3, 8, 8]}}).encode(),
        "bad base64": json.dumps({**good_payload(), "images": {**good_payload()["images"], "data": "@@@"}}).encode(),
        "prompt count": json.dumps({**good_payload(), "prompts": ["a"]}).encode(),
        "prompt type": json.dumps({**good_payload(), "prompts": [1, 2]}).encode(),
        "metadata": json.dumps({**good_payload(), "metadata": [{}]}).encode(),
    }
    for what, body in bad.items():
        status, reply = raw(toy_server, "POST", "/score", body)
        assert status == 400, (what, status, reply)
        assert "malformed" in reply["error"]
    assert raw(toy_server, "GET", "/nope")[0] == 404
    assert raw(toy_server, "POST", "/scores", json.dumps(good_payload()).encode())[0] == 404
    big = json.dumps(good_payload(n=40)).encode()  # > 20 kB limit
    assert len(big) > 20_000
    status, reply = raw(toy_server, "POST", "/score", big)
    assert status == 413 and "batch_size" in reply["error"]
    # a reward that raises → 500 (client: one-line UserError), and the server still answers afterwards
    with pytest.raises(UserError, match="HTTP 500.*kaboom"):
        RemoteReward(toy_server.url, retries=0)(torch.rand(1, 3, 8, 8), ["boom"])
    with pytest.raises(UserError, match="HTTP 413"):
        RemoteReward(toy_server.url, batch_size=64, encoding="float32", retries=0)(torch.rand(40, 3, 8, 8), ["a"] * 40)
    ok = RemoteReward(toy_server.url, batch_size=8, encoding="float32")(torch.rand(40, 3, 8, 8), ["a"] * 40)
    assert ok.shape == (40,) and torch.isfinite(ok).all()


def test_dead_or_slow_server_fails_fast_with_one_line_error():
    srv = serve(Toy())
    url = srv.url
    assert torch.isfinite(RemoteReward(url)(torch.rand(1, 3, 4, 4), ["a"])).all()
    srv.close()
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        RemoteReward(url, retries=2, backoff=0.05, timeout=2)(torch.rand(1, 3, 4, 4), ["a"])
    assert time.monotonic() - t0 < 3.0
    msg = str(e.value)
    assert "\n" not in msg and "unreachable after 3 attempts" in msg and url in msg
    with serve(Toy()) as slow:
        t0 = time.monotonic()
        with pytest.raises(UserError, match="unreachable after 1 attempts"):
            RemoteReward(slow.url, retries=0, timeout=0.3)(torch.rand(1, 3, 4, 4), ["slow"])
        assert time.monotonic() - t0 < 1.4


def test_client_argument_errors():
    with pytest.raises(UserError, match="http"):
        RemoteReward("127.0.0.1:8000")
    with pytest.raises(UserError, match="encoding"):
        RemoteReward("http://127.0.0.1:1", encoding="png")
    with pytest.raises(ValueError, match="one prompt per image"):
        RemoteReward("http://127.0.0.1:1")(torch.rand(2, 3, 4, 4), ["a"])


def test_cli_serve_subprocess():
    """`flowalign rewards serve NAME --port 0 key=value` serves the registered reward built with those kwargs;
    we stop the process we started."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flowalign.cli", "rewards", "serve", "jpeg_compressibility",
                             "--port", "0", "quality=50", "--max-mb", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving reward 'jpeg_compressibility' at http://127.0.0.1:" in line, line
        url = line.split(" at ")[1].split(" ")[0]
        imgs = torch.rand(3, 3, 8, 8)
        out = RemoteReward(url, encoding="float32")(imgs, ["a"] * 3)
        assert torch.equal(out, build_reward("jpeg_compressibility", quality=50)(imgs, ["a"] * 3))
        assert not torch.equal(out, build_reward("jpeg_compressibility")(imgs, ["a"] * 3))  # quality=50 was used
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------------------------- protocol robustness


class _Const:
    name = "const"
    differentiable = False
    kind = "image"

    def __call__(self, images, prompts, metadata=None):
        return torch.ones(images.shape[0])


def test_reward_server_answers_a_negative_content_length_at_once():
    """``Content-Length: -1`` made the handler call ``rfile.read(-1)``, which waits for the client to close the
    connection: the client hung (until the 120 s handler timeout) instead of getting a 400."""
    from flowalign.rewards.remote import serve

    with serve(_Const()) as srv:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
        conn.putrequest("POST", "/score")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", "-1")
        conn.endheaders()
        resp = conn.getresponse()  # old code: socket timeout here
        assert resp.status == 400
        assert "Content-Length" in json.loads(resp.read())["error"]
        conn.close()


class _FakeServer:
    """A stdlib HTTP server answering every POST with a fixed (bad) reply; counts the requests."""

    def __init__(self, reply):
        self.calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                outer.calls += 1
                self.rfile.read(int(self.headers["Content-Length"]))
                reply(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _html(handler):
    body = b"<html><body>not a reward server</body></html>"
    handler.send_response(200)
    handler.send_header("Content-Type", "text/html")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _truncated(handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", "100")
    handler.end_headers()
    handler.wfile.write(b'{"scores": [')  # the connection closes before the announced 100 bytes
    handler.close_connection = True


def test_remote_client_non_json_reply_is_a_one_line_user_error():
    """A 200 reply that is not JSON (another service on that port) raised a bare JSONDecodeError."""
    from flowalign.rewards.remote import RemoteReward

    fake = _FakeServer(_html)
    try:
        with pytest.raises(UserError, match="not JSON"):
            RemoteReward(fake.url, retries=0, timeout=5)(torch.rand(2, 3, 8, 8), ["a", "b"])
    finally:
        fake.close()


def test_remote_client_retries_a_cut_reply_then_gives_a_user_error():
    """A reply cut short (http.client.IncompleteRead, an HTTPException rather than an OSError) escaped the retry loop
    as a raw exception on the first attempt; it is a transient failure like a reset connection."""
    from flowalign.rewards.remote import RemoteReward

    fake = _FakeServer(_truncated)
    try:
        with pytest.raises(UserError, match="unreachable after 2 attempts"):
            RemoteReward(fake.url, retries=1, backoff=0.0, timeout=5)(torch.rand(2, 3, 8, 8), ["a", "b"])
        assert fake.calls == 2
    finally:
        fake.close()


def test_serve_refuses_a_reward_argument_of_the_wrong_type_in_one_line(capsys, monkeypatch, tmp_path):
    """`rewards serve clipscore path=… batch_size=abc`: one line naming the reward and the argument, before any
    weights load; a wrong value that only the constructor sees is one line too (not a traceback)."""
    from cli_checks import fails

    from flowalign.rewards.quality import JpegCompressibility

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the argument was checked")

    monkeypatch.setattr("flowalign.rewards.clip_common.HFClip.__init__", no_load)
    fails(capsys, ["rewards", "serve", "clipscore", f"path={tmp_path}", "batch_size=abc", "--port", "0"],
          "reward 'clipscore': batch_size='abc': expected an integer", cmd="rewards serve")
    fails(capsys, ["rewards", "serve", "clipscore", f"path={tmp_path}", "w=high", "--port", "0"],
          "w='high': expected a finite number", cmd="rewards serve")

    def init(self, quality=None):  # neither annotation nor default type: only the constructor sees the bad value
        self.quality = int(quality or 95)

    monkeypatch.setattr(JpegCompressibility, "__init__", init)
    fails(capsys, ["rewards", "serve", "jpeg_compressibility", "quality=high", "--port", "0"],
          "reward 'jpeg_compressibility': cannot be built with quality='high'", cmd="rewards serve")


@pytest.mark.parametrize("mb", ["nan", "inf", "-inf", "0", "-1", "1e-9"])
def test_serve_refuses_a_max_mb_that_is_not_a_finite_positive_size(capsys, monkeypatch, mb):
    """`rewards serve … --max-mb nan|inf` raised a traceback at int(), and 0 or -1 started a server that answered
    every request with 413: one line, exit 2, before the reward is built or a port bound."""
    from cli_checks import fails

    import flowalign.rewards.catalog as catalog

    def no_build(*a, **k):
        raise AssertionError("the reward was built before --max-mb was checked")

    monkeypatch.setattr(catalog, "build_reward_checked", no_build)
    monkeypatch.setattr(catalog, "_check_bind", no_build)
    fails(capsys, ["rewards", "serve", "shapes_strict", "--port", "0", f"--max-mb={mb}"],
          "--max-mb must be a finite number of MiB > 0", cmd="rewards serve")


def test_check_max_mb_converts_mib_to_bytes():
    from flowalign.rewards.catalog import check_max_mb

    assert check_max_mb(256.0) == 256 << 20
    assert check_max_mb(0.5) == 1 << 19
    assert check_max_mb(1 / 2**20) == 1  # one byte is the smallest limit


# --------------------------------------------------------------------------------------------- review fixes


def _drip(with_length: bool):
    """A 200 reply whose body trickles out one byte every 0.1 s (~4 s in all): each socket read succeeds in time."""

    def reply(handler):
        body = json.dumps({"scores": [0.5, 0.5]}).encode()
        handler.send_response(200)
        if with_length:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        try:
            for ch in body:
                handler.wfile.write(bytes([ch]))
                handler.wfile.flush()
                time.sleep(0.1)
        except OSError:  # the client gave up and closed the connection
            pass
        handler.close_connection = True

    return reply


@pytest.mark.parametrize("with_length", [True, False])
def test_remote_timeout_bounds_the_whole_attempt(with_length):
    """`urlopen(timeout=…)` bounded each socket read only: a server dripping a byte every 0.3 s held a client with
    timeout=1 for 6 s and its scores were accepted. Each attempt now ends at `timeout` (connect + send + reply), then
    the client retries and fails as documented. Without Content-Length a cut reply would read as complete."""
    fake = _FakeServer(_drip(with_length))
    try:
        t0 = time.monotonic()
        with pytest.raises(UserError) as e:
            RemoteReward(fake.url, timeout=0.5, retries=1, backoff=0.0)(torch.rand(2, 3, 8, 8), ["a", "b"])
        took = time.monotonic() - t0
        msg = str(e.value)
        assert "\n" not in msg and "unreachable after 2 attempts" in msg and "timeout=0.5 s" in msg, msg
        assert fake.calls == 2 and 0.9 < took < 2.0, took
    finally:
        fake.close()


def _scores_reply(text: bytes):
    def reply(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(text)))
        handler.end_headers()
        handler.wfile.write(text)

    return reply


@pytest.mark.parametrize("scores, bad", [(b'["abc", 1.0]', '"abc"'), (b'[1.0, {"x": 1}]', '{"x": 1}'),
                                         (b"[[1.0], [2.0]]", "[1.0]"), (b"[true, false]", "true")])
def test_remote_scores_that_are_not_numbers_are_a_one_line_error(scores, bad):
    """Strings, objects and lists were a raw ValueError/TypeError, and JSON booleans were read as 1.0 and 0.0."""
    fake = _FakeServer(_scores_reply(b'{"scores": ' + scores + b"}"))
    try:
        with pytest.raises(UserError) as e:
            RemoteReward(fake.url, retries=0, timeout=5)(torch.rand(2, 3, 8, 8), ["a", "b"])
        msg = str(e.value)
        index = 1 if bad.startswith("{") else 0
        assert "\n" not in msg and f"the score of image {index} is {bad}" in msg and "a number or null" in msg, msg
    finally:
        fake.close()


def test_remote_null_is_nan_and_integers_are_numbers():
    fake = _FakeServer(_scores_reply(b'{"scores": [null, 2, 1.5]}'))
    try:
        out = RemoteReward(fake.url, retries=0, timeout=5)(torch.rand(3, 3, 8, 8), ["a", "b", "c"])
        assert torch.isnan(out[0]) and out[1:].tolist() == [2.0, 1.5]
    finally:
        fake.close()


class _Raises:
    name, kind, differentiable = "raises", "image", False

    def __call__(self, images, prompts, metadata=None):
        raise RuntimeError("Error(s) in loading state_dict:\n\tMissing key(s): 'a'\n\tUnexpected key(s): 'b'")


def test_remote_multi_line_server_error_stays_one_line(caplog):
    """The server's 500 carries the reward's exception text, which may span lines; the client's error is one line."""
    with caplog.at_level("CRITICAL", logger="flowalign.rewards"), serve(_Raises()) as srv:
        with pytest.raises(UserError) as e:
            RemoteReward(srv.url, retries=0)(torch.rand(1, 3, 8, 8), ["x"])
    msg = str(e.value)
    assert "\n" not in msg and "HTTP 500: RuntimeError: Error(s) in loading state_dict: Missing key(s): 'a'" in msg


@pytest.mark.parametrize("encoding", ["uint8", "float16", "float32"])
def test_remote_non_finite_images_score_nan_with_every_encoding(toy_server, encoding):
    """uint8 has no NaN: quantising turned a diverged sample into a real image with a finite score (spec §1: NaN)."""
    x = torch.rand(3, 3, 8, 8)
    x[0, :, 2:5, 2:5] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    out = RemoteReward(toy_server.url, encoding=encoding)(x, ["a", "b", "c"])
    assert torch.isnan(out[:2]).all() and torch.isfinite(out[2])


def test_remote_client_refuses_a_bad_timeout_or_url():
    for t in (0, -1, float("nan"), float("inf")):
        with pytest.raises(UserError, match="timeout must be a finite number"):
            RemoteReward("http://127.0.0.1:1", timeout=t)
    with pytest.raises(UserError, match="no valid host, port or ASCII path"):
        RemoteReward("http://127.0.0.1:notaport")


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA or MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_serve_refuses_an_unavailable_or_malformed_device_in_one_line(capsys, monkeypatch, tmp_path, no_cuda):
    """`rewards serve pickscore path=… device=cuda` without CUDA was a 20-line traceback (Torch not compiled with
    CUDA enabled) after the weights loaded; now one line before anything loads."""
    from cli_checks import fails

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the device was checked")

    monkeypatch.setattr("flowalign.rewards.clip_common.HFClip.__init__", no_load)
    fails(capsys, ["rewards", "serve", "pickscore", f"path={tmp_path}", "device=cuda", "--port", "0"],
          "reward 'pickscore': device='cuda'", "pass device=cpu", cmd="rewards serve")
    fails(capsys, ["rewards", "serve", "pickscore", f"path={tmp_path}", "device=mps", "--port", "0"],
          "device='mps' but MPS is not available", cmd="rewards serve")
    fails(capsys, ["rewards", "serve", "clipscore", f"path={tmp_path}", "device=gpu0", "--port", "0"],
          "device='gpu0' is not a torch device", cmd="rewards serve")


def test_build_reward_checked_checks_the_device_first(monkeypatch, no_cuda, tiny_clip_dir):
    from flowalign.rewards.catalog import build_reward_checked

    with pytest.raises(UserError, match=r"^reward\.kwargs\.pickscore: device='cuda:1' but .*; pass device=cpu$"):
        build_reward_checked("pickscore", {"path": str(tiny_clip_dir), "device": "cuda:1"}, "reward.kwargs.pickscore")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="1 CUDA device"):
        build_reward_checked("pickscore", {"path": str(tiny_clip_dir), "device": "cuda:1"})
    assert build_reward_checked("pickscore", {"path": str(tiny_clip_dir), "device": "cpu"}).device.type == "cpu"
    # a reward without a device argument: the unknown argument is what the constructor refuses, not the device
    with pytest.raises(UserError, match="cannot be built with device='cuda'"):
        build_reward_checked("saturation", {"device": "cuda"})


def test_remote_url_forms_resolve_before_any_request():
    """A bare IPv6 host took its last ':1' as the port (http.client parses host:port when no port is given), and an
    empty or over-long host label or a non-ASCII path escaped as a UnicodeError traceback at the first score."""
    r = RemoteReward("http://[::1]")
    assert (r._host, r._port) == ("::1", 80)
    assert RemoteReward("https://[2001:db8::5]/x")._port == 443
    assert RemoteReward("http://127.0.0.1:8000")._port == 8000
    for bad in ("http://a..b:8000", "http://" + "x" * 70 + ":8000", "http://127.0.0.1:8000/\u00fc", "http://[::1"):
        with pytest.raises(UserError, match="no valid host, port or ASCII path"):
            RemoteReward(bad)


def test_remote_connect_shares_one_deadline_over_every_address(monkeypatch):
    """socket.create_connection gives each address of a host the whole timeout: 4 unanswering addresses took 4 x
    timeout per attempt. The accept queue of a listener is filled so that further connects hang (SYNs dropped)."""
    import socket

    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    port = ls.getsockname()[1]
    fill = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fill.append(s)
    time.sleep(0.2)
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda host, *a, **k: real("127.0.0.1", *a, **k) * 4 if host == "multi.test" else real(host, *a, **k))
    r = RemoteReward(f"http://multi.test:{port}", timeout=0.5, retries=0)
    t0 = time.monotonic()
    try:
        with pytest.raises(UserError, match="unreachable after 1 attempts"):
            r(torch.rand(1, 3, 4, 4), ["a"])
        assert time.monotonic() - t0 < 1.2  # one deadline (0.5 s), not 4 x 0.5 s
    finally:
        for s in [*fill, ls]:
            s.close()


def _status_then_scores(statuses, text: bytes):
    """Answer the i-th request with HTTP ``statuses[i]`` (a JSON error body) while any are left, then 200 ``text``."""
    left = list(statuses)

    def reply(handler):
        code = left.pop(0) if left else 200
        body = text if code == 200 else json.dumps({"error": f"status {code}"}).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return reply


def test_remote_retries_502_503_504_with_doubling_backoff_but_not_other_errors(monkeypatch):
    """RemoteReward's contract: a 502/503/504 is transient (retried, sleeping backoff·2**k before retry k = 0, 1, …);
    any other 4xx/5xx is a one-line ``UserError`` at once (the same request would fail again)."""
    import types

    import flowalign.rewards.remote as remote

    sleeps = []
    monkeypatch.setattr(remote, "time", types.SimpleNamespace(sleep=sleeps.append, monotonic=time.monotonic))
    fake = _FakeServer(_status_then_scores([503, 502, 504], b'{"scores": [0.5, 1.5]}'))
    try:
        out = RemoteReward(fake.url, retries=3, backoff=0.5, timeout=5)(torch.rand(2, 3, 8, 8), ["a", "b"])  # [2]
        assert out.tolist() == [0.5, 1.5] and fake.calls == 4 and sleeps == [0.5, 1.0, 2.0]
    finally:
        fake.close()
    for code in (400, 500):
        fake = _FakeServer(_status_then_scores([code], b'{"scores": [0.5]}'))
        try:
            with pytest.raises(UserError, match=f"HTTP {code}: status {code}"):
                RemoteReward(fake.url, retries=3, backoff=0.0, timeout=5)(torch.rand(1, 3, 8, 8), ["a"])
            assert fake.calls == 1, code
        finally:
            fake.close()
