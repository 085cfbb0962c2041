"""The SessionStore contract, one suite every session store passes: memory, SQLite on disk and a
real redis-server, each built from the settings as the server builds them (build_store).

What each store does beyond the contract stays in its own tests: the memory store's clock
(tests/serve/test_sessions.py), SQLite's file, restarts and memory (tests/scale/test_sqlite_store.py,
tests/unit/test_sqlite_hygiene.py), Redis' replicas, layout, local tier and failures
(tests/scale/test_redis_store.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gru_serve.bench.topology import RedisServer
from gru_serve.ops.errors import (
    ResourceExhausted,
    SessionBusy,
    SessionExpired,
    SessionNotFound,
    VersionConflict,
)
from gru_serve.ops.settings import Settings
from gru_serve.stores.factory import build_store
from gru_serve.stores.sessions import SessionRecord, SessionStore, new_session_id
from tests.support.records import same
from tests.support.redis import running_redis

STORES = ("memory", "sqlite", "redis")
ALICE, BOB = "a" * 32, "b" * 32  # principals as the server derives them from tokens
Scenario = Callable[[SessionStore], Awaitable[None]]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=STORES)
def run(request, tmp_path: Path) -> Callable[..., None]:
    """run(scenario, **settings): the scenario on a fresh store of this kind, closed at its end."""
    kind = request.param

    def run(scenario: Scenario, **settings) -> None:
        url = {
            "memory": "memory",
            "sqlite": f"sqlite:///{tmp_path}/sessions.db",  # an absolute path: four slashes
            "redis": lambda: f"{request.getfixturevalue('redis_server').url}?prefix=c{new_session_id()[:8]}:",
        }[kind]
        url = url() if callable(url) else url

        async def main() -> None:
            store = build_store(Settings(session_store=url, **settings))
            try:
                await scenario(store)
            finally:
                await store.close()

        asyncio.run(main())

    return run


def record(owner: str = ALICE, logits: bool = True, turns: int = 0) -> SessionRecord:
    rng = np.random.default_rng(7)
    state = rng.standard_normal((2, 8)).astype(np.float32)
    state.flat[:5] = [np.nan, np.inf, -0.0, 1e-45, np.finfo(np.float32).max]  # bits must survive
    now = time.time()
    rec = SessionRecord(
        new_session_id(), "timemachine-d2l", "ab" * 32, owner, state, None, 14, 1_700_000_000.123456789, now
    )
    if turns:
        rec = rec.checkpointed(now, 8)  # turn 0: no text, no logits
        for i in range(turns):
            rec = rec.advanced(state + i, rng.standard_normal(28).astype(np.float32), 5, now + 1e-6 * i, 8)
    elif logits:
        rec = replace(rec, logits=rng.standard_normal(28).astype(np.float32))
    return rec if logits else replace(rec, logits=None)


def tick() -> None:
    """Let the clocks pass a millisecond (Redis orders sessions by its millisecond clock)."""
    start = time.time()
    while time.time() < start + 0.002:
        pass


async def gone(store: SessionStore, session_id: str, timeout: float = 5.0) -> SessionExpired:
    """Wait (bounded) for a session's TTL to run out; the SessionExpired its get raises."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await store.get(session_id)
        except SessionExpired as e:
            return e
        assert time.monotonic() < deadline, "the session did not expire"
        await asyncio.sleep(0.02)


def test_records_round_trip_bit_for_bit(run):
    async def scenario(s: SessionStore) -> None:
        for rec in (record(), record(logits=False), record(owner="")):
            await s.create(rec)
            same(await s.get(rec.session_id), rec)
            same(await s.acquire(rec.session_id), rec)
            await s.release(rec.session_id)
        assert await s.count() == 3

    run(scenario)


def test_a_lease_is_exclusive_and_a_commit_bumps_the_version(run):
    async def scenario(s: SessionStore) -> None:
        rec = record()
        await s.create(rec)
        leased = await s.acquire(rec.session_id)
        assert leased.version == 0
        with pytest.raises(SessionBusy):
            await s.acquire(rec.session_id)
        with pytest.raises(SessionBusy):
            await s.delete(rec.session_id)
        stored = await s.commit(leased.advanced(leased.state + 1, None, 30, time.time()))
        assert stored.version == 1 and stored.tokens_seen == 44
        same(await s.get(rec.session_id), stored)
        again = await s.acquire(rec.session_id)  # a commit gives the lease back
        assert again.version == 1
        await s.release(rec.session_id)
        same(await s.get(rec.session_id), stored)  # a release leaves the session as it was
        await s.acquire(rec.session_id)  # and frees it
        await s.release(rec.session_id)

    run(scenario)


def test_a_stale_copy_is_never_committed(run):
    async def scenario(s: SessionStore) -> None:
        rec = record()
        await s.create(rec)
        first = await s.acquire(rec.session_id)
        await s.commit(first.advanced(first.state, None, 2, time.time()))
        with pytest.raises(VersionConflict):
            await s.acquire(rec.session_id)
            await s.commit(first)  # version 0, the store holds 1
        got = await s.get(rec.session_id)
        assert got.version == 1 and got.tokens_seen == 16
        await s.acquire(rec.session_id)  # the refused commit gave its lease back: free at once
        await s.release(rec.session_id)

    run(scenario)


def test_expired_is_told_apart_from_unknown_and_names_its_owner(run):
    async def scenario(s: SessionStore) -> None:
        with pytest.raises(SessionNotFound, match="unknown"):
            await s.get(new_session_id())
        rec = record()
        await s.create(rec)
        e = await gone(s, rec.session_id)
        assert "has expired" in str(e) and e.owner == ALICE
        with pytest.raises(SessionExpired):
            await s.acquire(rec.session_id)

    run(scenario, session_ttl_s=0.3)


def test_delete_forgets_the_session_and_its_tombstone(run):
    async def scenario(s: SessionStore) -> None:
        rec = record()
        await s.create(rec)
        await s.delete(rec.session_id)
        with pytest.raises(SessionNotFound, match="unknown"):
            await s.get(rec.session_id)
        with pytest.raises(SessionNotFound):
            await s.delete(rec.session_id)
        assert await s.count() == 0

    run(scenario)


def test_capacity_evicts_the_least_recently_used_idle_session(run):
    async def scenario(s: SessionStore) -> None:
        a, b, c, d = record(), record(BOB), record(), record()
        await s.create(a)
        tick()
        await s.create(b)
        tick()
        await s.acquire(a.session_id)  # a is busy, b idle
        await s.create(c)
        with pytest.raises(SessionExpired, match="evicted") as e:
            await s.get(b.session_id)
        assert e.value.owner == BOB  # the tombstone remembers whose it was
        assert s.stats.evictions == 1 and await s.count() == 2
        await s.acquire(c.session_id)
        with pytest.raises(ResourceExhausted, match="max_sessions"):
            await s.create(d)

    run(scenario, max_sessions=2)


def test_an_owner_at_its_quota_evicts_its_own_idle_sessions_only(run):
    async def scenario(s: SessionStore) -> None:
        bobs = [record(BOB) for _ in range(2)]
        for rec in bobs:
            await s.create(rec)
            tick()
        alices = [record(ALICE) for _ in range(4)]
        for rec in alices:
            await s.create(rec)
            tick()
        for rec in bobs:  # another owner's sessions are never taken
            await s.get(rec.session_id)
        for rec in alices[:2]:
            with pytest.raises(SessionExpired, match="evicted"):
                await s.get(rec.session_id)
        for rec in alices[2:]:
            await s.acquire(rec.session_id)
        with pytest.raises(ResourceExhausted, match="max_sessions_per_owner"):
            await s.create(record(ALICE))
        await s.create(record(BOB))  # bob has room

    run(scenario, max_sessions_per_owner=2)


def test_checkpoints_round_trip_and_the_newest_stay(run):
    def marks(rec: SessionRecord) -> list[tuple]:
        return [
            (c.turn, c.tokens_seen, c.committed, c.state.tobytes(), c.logits is None or c.logits.tobytes())
            for c in rec.checkpoints
        ]

    async def scenario(s: SessionStore) -> None:
        plain = record()
        await s.create(plain)
        assert (await s.get(plain.session_id)).checkpoints == ()
        rec = record(turns=1)
        await s.create(rec)
        got = await s.acquire(rec.session_id)
        assert [c.turn for c in got.checkpoints] == [0, 1] and got.checkpoints[0].logits is None
        assert marks(got) == marks(rec)
        for n in (2, 3):  # the newest 3 stay
            got = await s.commit(got.advanced(got.state - n, got.logits + n, n, time.time(), 3))
            got = await s.acquire(rec.session_id)
        await s.release(rec.session_id)
        again = await s.get(rec.session_id)
        assert [c.turn for c in again.checkpoints] == [1, 2, 3]
        assert marks(again) == marks(got)
        same(again, got)

    run(scenario)
