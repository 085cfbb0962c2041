"""A Redis session store reached over a Unix socket (unix:///PATH?db=N): a real redis-server
listening on a socket only, a server that starts on it, and the store's own query parameters
(prefix, lease_s) still honoured."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from gru_serve.bench.topology import D2L, wait_for
from gru_serve.client import Client
from gru_serve.ops.settings import Settings
from gru_serve.server import ThreadedServer
from gru_serve.stores.factory import build_store
from gru_serve.stores.redis_store import display_url
from gru_serve.stores.sessions import SessionRecord, new_session_id
from tests.support.binaries import installed_binary

PREFIX = "ux:"


@pytest.fixture(scope="module")
def socket_path(tmp_path_factory) -> Iterator[Path]:
    """redis-server with no TCP port at all: only its Unix socket answers."""
    tmp = tmp_path_factory.mktemp("redis-unix")
    path = tmp / "redis.sock"
    log = open(tmp / "redis.log", "ab")  # noqa: SIM115 (the process keeps it)
    argv = [installed_binary("redis-server"), "--port", "0", "--unixsocket", str(path)]
    proc = subprocess.Popen(
        [*argv, "--unixsocketperm", "700", "--save", "", "--appendonly", "no"],
        cwd=tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()

    def pong() -> bool:
        try:
            with redis.Redis(unix_socket_path=str(path), socket_timeout=2) as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    try:
        wait_for(lambda: proc.poll() is not None or pong(), 10, "redis-server answers on its socket")
        assert proc.poll() is None, (tmp / "redis.log").read_text()
        yield path
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_server_serves_sessions_from_redis_over_a_unix_socket(socket_path):
    url = f"unix://{socket_path}?db=3&prefix={PREFIX}&lease_s=7"
    srv = ThreadedServer(Settings(port=0, models=(str(D2L),), session_store=url, engine="thread"))
    try:
        with Client(srv.target) as client:
            sid = client.create_session("the time machine").session_id
            _, finished = client.generate_text(" by h", session_id=sid, max_new_tokens=5)
            assert finished.generated_tokens == 5
            assert client.get_session(sid).session_id == sid
        assert srv.service.store.url == f"unix://{socket_path}"  # the password-free form for logs
    finally:
        srv.stop()
    # An independent client on the same socket: the session is in db 3 under the prefix.
    with redis.Redis(unix_socket_path=str(socket_path), db=3) as r:
        assert r.exists(f"{PREFIX}s:{sid}")
        assert r.zscore(f"{PREFIX}sessions", sid) is not None
    with redis.Redis(unix_socket_path=str(socket_path), db=0) as r:
        assert not r.keys(f"{PREFIX}*")


def test_the_stores_own_parameters_still_apply_over_a_socket(socket_path):
    url = f"unix://{socket_path}?db=5&prefix={PREFIX}&lease_s=7"
    state, now = np.zeros((1, 4), np.float32), time.time()
    rec = SessionRecord(new_session_id(), "m", "ab" * 32, "alice", state, None, 0, now, now)

    async def main() -> None:
        store = build_store(Settings(session_store=url))
        try:
            await store.create(rec)
            await store.acquire(rec.session_id)
            with redis.Redis(unix_socket_path=str(socket_path), db=5) as r:
                ttl_ms = r.pttl(f"{PREFIX}lease:{rec.session_id}")
            assert 3_000 < ttl_ms <= 7_000  # lease_s=7, not the default 3
            await store.release(rec.session_id)
        finally:
            await store.close()

    asyncio.run(main())


def test_display_url_keeps_the_unix_form_and_hides_passwords():
    assert display_url("unix:///run/redis.sock?db=2&prefix=a:") == "unix:///run/redis.sock"
    assert display_url("redis://:pw@h:6379/0?prefix=a:") == "redis://:***@h:6379/0"
    assert display_url("unix://:pw@/run/redis.sock?db=1") == "unix://:***@/run/redis.sock"
