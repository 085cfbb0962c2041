"""A server-sent-event stream whose client stops reading: once its socket and the server's
write buffer are full, --http-write-timeout-s drops the connection, which frees the stream's
slot (checked under --max-streams-per-token 1) and leaves its session as it was."""

import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from gru_serve.client import Client
from gru_serve.ops.settings import Settings
from gru_serve.server import ThreadedServer
from tests.support.serving import D2L, LONG, reference_generate, wait_until

TOKEN = "alice"
PROMPT = "the time traveller"
WRITE_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    # The timeout as a GRU_SERVE_* variable, which a server without the setting ignores.
    env = {"GRU_SERVE_HTTP_WRITE_TIMEOUT_S": str(WRITE_TIMEOUT_S)}
    settings = Settings.load(
        env, port=0, models=(str(D2L),), max_new_tokens=LONG, auth_tokens=(TOKEN,), max_streams_per_token=1
    )
    srv = ThreadedServer(settings, http=True)
    yield srv
    srv.stop()


def stalled_stream(port: int, session_id: str) -> socket.socket:
    """A raw client with a small receive buffer that starts a stream, reads its response head
    and then reads nothing more."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window it offers
    sock.connect(("127.0.0.1", port))
    body = json.dumps(
        {
            "prompt": " and",
            "max_tokens": LONG,
            "temperature": 0,
            "stream": True,
            "session_id": session_id,
            "logprobs": 1,
        }
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {TOKEN}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    sock.settimeout(30)
    got = b""
    while b"\r\n\r\n" not in got:
        got += sock.recv(1)  # byte by byte: leave the events unread
    assert got.startswith(b"HTTP/1.1 200") and b"text/event-stream" in got, got
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sent until it closed or reset the connection."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def test_a_stalled_reader_is_dropped_and_frees_its_slot_and_session(server):
    with Client(server.target, token=TOKEN) as rpc:
        sid = rpc.create_session(PROMPT).session_id
        before = rpc.get_session(sid)
    auth = {"authorization": f"Bearer {TOKEN}"}
    short = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.http_target, headers=auth, timeout=30) as http:
        stalled = stalled_stream(server.server.http_port, sid)
        # The stalled stream holds the token's one slot.
        refused = http.post("/v1/completions", json=short)
        assert refused.status_code == 429 and "max_streams_per_token=1" in refused.text, refused.text
        wait_until(lambda: server.service.active_streams == 0, timeout=30)
        with http.stream("POST", "/v1/completions", json=short) as r:
            assert r.status_code == 200
            assert [line for line in r.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
    stalled.settimeout(10)
    unread = read_to_end(stalled)
    stalled.close()
    assert b"data: {" in unread[:64] and b"[DONE]" not in unread  # dropped, not ended
    with Client(server.target, token=TOKEN) as rpc:
        after = rpc.get_session(sid)
        assert (after.tokens_seen, after.turns) == (before.tokens_seen, before.turns)
        text = rpc.generate_text(" and", session_id=sid, max_new_tokens=40)[0]
    assert text == reference_generate(D2L, PROMPT + " and", 40)
