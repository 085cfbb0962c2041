"""Slowloris on the HTTP front end: idle connections and requests sent in part, from raw
sockets, are closed by the server within --http-read-timeout-s while real httpx and gRPC
clients are served; a drain is not held by requests still arriving; --http-max-connections
caps what one client may open, with or without a token."""

import selectors
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass

import httpx

from gru_serve.client import Client
from gru_serve.launch import free_port
from gru_serve.ops.settings import Settings
from gru_serve.server import ThreadedServer
from tests.support.reliability import TALLY, record
from tests.support.serving import D2L, reference_generate

READ_TIMEOUT_S = 6.0
GRACE_S = 30.0
PER_KIND = 100  # slow connections of each kind in the attack
HEAD = "POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
PROMPT = "the time traveller"


@dataclass
class Slow:
    """A raw connection that sends part of a request (or nothing) and then nothing more."""

    kind: str  # idle, head (a request head in part) or body (a whole head, part of the body)
    sock: socket.socket
    opened: float
    closed_after: float | None = None  # seconds from opening to the server's close
    reply: bytes = b""


def open_slow(port: int, kind: str) -> Slow:
    sock = socket.create_connection(("127.0.0.1", port))
    slow = Slow(kind, sock, time.monotonic())
    if kind == "head":
        sock.sendall(HEAD.encode())  # no blank line: the head never ends
    elif kind == "body":
        # 100-continue: the server says when the route is reading the body, so the request is
        # known to be in the app (where a drain could wait for it) before the body stalls.
        sock.sendall(f"{HEAD}content-length: 1000\r\nexpect: 100-continue\r\n\r\n".encode())
        sock.settimeout(30)
        assert sock.recv(1024).startswith(b"HTTP/1.1 100"), "the route did not start reading the body"
        sock.sendall(b'{"prompt": "the ti')
    return slow


def wait_closed(slows: list[Slow], timeout: float) -> None:
    """Read every connection until the server closes it (EOF or reset), or the deadline."""
    sel = selectors.DefaultSelector()
    for s in slows:
        s.sock.setblocking(False)
        sel.register(s.sock, selectors.EVENT_READ, s)
    deadline = time.monotonic() + timeout
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            s: Slow = key.data
            try:
                data = s.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            s.reply += data
            if not data:
                s.closed_after = time.monotonic() - s.opened
                sel.unregister(s.sock)
                s.sock.close()
    open_still = [s.kind for s in slows if s.closed_after is None]
    sel.close()
    assert not open_still, f"{len(open_still)} still open after {timeout} s: {Counter(open_still)}"


def still_open(slows: list[Slow]) -> int:
    """How many the server has not closed yet (a peek: nothing is consumed)."""
    n = 0
    for s in slows:
        s.sock.setblocking(False)
        try:
            n += s.sock.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            n += 1  # nothing to read: open
        except ConnectionResetError:
            pass
        s.sock.setblocking(True)
    return n


def real_clients(grpc_target: str, http_url: str) -> int:
    """Calls of an httpx and a gRPC client, each checked against the model file; how many."""
    served = 0
    want = reference_generate(D2L, PROMPT, 30)
    with httpx.Client(base_url=http_url, timeout=30) as http, Client(grpc_target) as rpc:
        for _ in range(5):
            r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 30, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want
            assert rpc.generate_text(PROMPT, max_new_tokens=30)[0] == want
            served += 2
    return served


def test_slow_connections_are_closed_in_time_and_a_drain_does_not_wait_for_them(server_process, monkeypatch):
    # Given as GRU_SERVE_* variables, which a server without these settings ignores.
    monkeypatch.setenv("GRU_SERVE_HTTP_READ_TIMEOUT_S", str(READ_TIMEOUT_S))
    http_port = free_port()
    srv = server_process("--grace-s", str(GRACE_S), "--http-port", str(http_port))

    slows = [open_slow(http_port, kind) for kind in ("idle", "head", "body") for _ in range(PER_KIND)]
    served = real_clients(srv.target, f"http://127.0.0.1:{http_port}")
    open_while_served = still_open(slows)
    wait_closed(slows, timeout=READ_TIMEOUT_S + 30)
    for s in slows:
        # Closed by the read deadline, not before it; a request begun is told why.
        assert s.closed_after >= READ_TIMEOUT_S - 0.1, (s.kind, s.closed_after)
        if s.kind == "idle":
            assert s.reply == b""
        else:
            assert s.reply.startswith(b"HTTP/1.1 408") and b"http_read_timeout_s=6" in s.reply, s.reply
    assert real_clients(srv.target, f"http://127.0.0.1:{http_port}") == served  # still serving

    # A drain with requests still arriving: they did no work, so it does not wait for them (nor
    # for the read deadline that would close them).
    arriving = [open_slow(http_port, kind) for kind in ("head", "body") for _ in range(20)]
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=GRACE_S + 30) == 0
    drain_s = time.monotonic() - t0
    wait_closed(arriving, timeout=5)
    assert drain_s < READ_TIMEOUT_S, f"the drain took {drain_s:.1f} s (grace {GRACE_S} s)"

    closed = [s.closed_after for s in slows]
    TALLY["slow connections opened"] += len(slows) + len(arriving)
    record(
        "slowloris on HTTP",
        slow_connections_opened=len(slows),
        kinds=f"{PER_KIND} idle, {PER_KIND} part of a head, {PER_KIND} whole head and part of a body",
        read_timeout_s=READ_TIMEOUT_S,
        closed_by_server_after_s=f"{min(closed):.2f}..{max(closed):.2f}",
        open_while_real_clients_served=open_while_served,
        real_client_calls_served_during=served,
        drain_s=round(drain_s, 2),
        grace_s=GRACE_S,
        requests_arriving_at_drain=len(arriving),
    )


def test_connections_over_the_limit_get_503_until_the_slow_ones_are_closed():
    """With authentication off every client is anonymous: the connection cap is what bounds
    one of them."""
    limit = 16
    env = {"GRU_SERVE_HTTP_MAX_CONNECTIONS": str(limit), "GRU_SERVE_HTTP_READ_TIMEOUT_S": "2"}
    srv = ThreadedServer(Settings.load(env, port=0, models=(str(D2L),), engine="thread"), http=True)
    try:
        port = int(srv.http_target.rsplit(":", 1)[1])
        slows = [open_slow(port, "idle") for _ in range(limit)]
        refused = httpx.get(srv.http_target + "/v1/models")
        assert refused.status_code == 503, refused.text
        wait_closed(slows, timeout=30)
        assert httpx.get(srv.http_target + "/v1/models").status_code == 200
    finally:
        srv.stop()
    record("HTTP connection cap", max_connections=limit, over_the_cap="503", after_slow_ones_closed=200)
