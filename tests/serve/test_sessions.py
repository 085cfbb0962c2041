import asyncio

import grpc
import numpy as np
import pytest

from gru_serve.client import Client
from gru_serve.ops.errors import (
    ResourceExhausted,
    SessionBusy,
    SessionExpired,
    SessionNotFound,
    VersionConflict,
)
from gru_serve.ops.settings import Settings
from gru_serve.server import ThreadedServer
from gru_serve.stores.sessions import MemoryStore, SessionRecord, new_session_id
from tests.support.serving import D2L


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(sid: str, now: float = 1000.0) -> SessionRecord:
    return SessionRecord(sid, "m", "h", "", np.zeros((1, 4), np.float32), None, 0, now, now)


def run(coro):
    return asyncio.run(coro)


def test_ids_are_unguessable():
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 22 for i in ids)  # 128 bits, base64url


def test_ttl_expiry_says_expired_and_unknown_says_unknown():
    clock = Clock()
    store = MemoryStore(ttl_s=10, clock=clock)

    async def scenario():
        await store.create(record("a"))
        clock.now += 9.9
        assert (await store.get("a")).session_id == "a"
        clock.now += 0.2
        with pytest.raises(SessionExpired, match="expired"):
            await store.get("a")
        with pytest.raises(SessionNotFound, match="unknown"):
            await store.get("b")

    run(scenario())
    assert store.stats.expirations == 1


def test_lease_commit_and_version_conflict():
    store = MemoryStore(clock=Clock())

    async def scenario():
        await store.create(record("a"))
        leased = await store.acquire("a")
        with pytest.raises(SessionBusy):
            await store.acquire("a")
        stored = await store.commit(leased.advanced(leased.state + 1, None, 3, 1001.0))
        assert stored.version == 1 and stored.tokens_seen == 3
        with pytest.raises(VersionConflict):  # a stale copy cannot be committed
            await store.acquire("a")
            await store.commit(leased)
        again = await store.acquire("a")
        await store.release("a")
        assert (await store.get("a")) == again

    run(scenario())


def test_capacity_evicts_least_recently_used_idle_session():
    store = MemoryStore(max_sessions=2, clock=Clock())

    async def scenario():
        await store.create(record("a"))
        await store.create(record("b"))
        await store.acquire("a")
        await store.release("a")  # a is now more recent than b
        await store.create(record("c"))
        with pytest.raises(SessionExpired, match="evicted"):
            await store.get("b")
        await store.acquire("a")
        await store.acquire("c")
        with pytest.raises(ResourceExhausted, match="max_sessions"):
            await store.create(record("d"))

    run(scenario())
    assert store.stats.evictions == 1


def test_expired_session_over_grpc_differs_from_unknown():
    clock = Clock()
    srv = ThreadedServer(
        Settings(port=0, models=(str(D2L),)), store=MemoryStore(ttl_s=60, clock=clock), clock=clock
    )
    try:
        with Client(srv.target) as c:
            s = c.create_session("time")
            clock.now += 61
            with pytest.raises(grpc.RpcError) as expired:
                c.generate_text("x", session_id=s.session_id)
            with pytest.raises(grpc.RpcError) as unknown:
                c.generate_text("x", session_id="never-existed")
    finally:
        srv.stop()
    assert expired.value.code() == unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "expired" in expired.value.details() and "unknown" in unknown.value.details()
