"""Per-owner session quotas (--max-sessions-per-owner) in every store, built from the settings as
the server builds them: memory, SQLite on disk and a real redis-server. One token filling its
quota evicts its own least recently used idle sessions, never another token's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from gru_serve.bench.topology import RedisServer
from gru_serve.ops.errors import ResourceExhausted, SessionExpired
from gru_serve.ops.settings import Settings
from gru_serve.stores.factory import build_store
from gru_serve.stores.sessions import SessionRecord, SessionStore, new_session_id

STORES = ("memory", "sqlite", "redis")
ALICE, BOB = "a" * 32, "b" * 32  # principals as the server derives them from tokens


def record(owner: str, value: float = 0.0) -> SessionRecord:
    now = time.time()
    state = np.full((1, 4), value, np.float32)
    return SessionRecord(new_session_id(), "m", "ab" * 32, owner, state, None, 0, now, now)


def run(
    kind: str,
    tmp_path: Path,
    redis_server: RedisServer,
    scenario: Callable[[SessionStore], Awaitable[None]],
    **settings,
) -> None:
    url = {
        "memory": "memory",
        "sqlite": f"sqlite:///{tmp_path}/sessions.db",  # an absolute path: four slashes
        "redis": f"{redis_server.url}?prefix=q{new_session_id()[:8]}:",
    }[kind]

    async def main() -> None:
        store = build_store(Settings(session_store=url, **settings))
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(main())


def tick() -> None:
    """Let the clocks pass a millisecond (Redis orders sessions by its millisecond clock)."""
    start = time.time()
    while time.time() < start + 0.002:
        pass


async def evicted(store: SessionStore, session_id: str) -> bool:
    try:
        await store.get(session_id)
    except SessionExpired as e:
        assert "evicted" in str(e), e
        return True
    return False


@pytest.mark.parametrize("kind", STORES)
def test_one_token_creating_max_sessions_evicts_none_of_another_tokens(kind, tmp_path, redis_server):
    """The review's attack with the shipped defaults: alice creates max_sessions empty sessions."""
    defaults = Settings()

    async def scenario(store: SessionStore) -> None:
        bobs = [record(BOB, i) for i in range(5)]
        for rec in bobs:  # bob's are the least recently used of all
            await store.create(rec)
        alices = [record(ALICE) for _ in range(defaults.max_sessions)]
        for rec in alices:
            await store.create(rec)
        for rec in bobs:
            got = await store.get(rec.session_id)
            assert got.owner == BOB and got.state.tobytes() == rec.state.tobytes()
        quota = defaults.max_sessions_per_owner
        assert quota < defaults.max_sessions
        assert await store.count() == len(bobs) + quota
        # alice lost her own oldest (Redis orders by its millisecond clock: ties in any order).
        assert await evicted(store, alices[0].session_id)
        assert not await evicted(store, alices[-1].session_id)
        assert store.stats.evictions == defaults.max_sessions - quota

    run(kind, tmp_path, redis_server, scenario)


@pytest.mark.parametrize("kind", STORES)
def test_the_owners_own_least_recently_used_idle_session_goes(kind, tmp_path, redis_server):
    async def scenario(store: SessionStore) -> None:
        a1, a2, a3, b1 = record(ALICE, 1), record(ALICE, 2), record(ALICE, 3), record(BOB)
        for rec in (b1, a1, a2):
            await store.create(rec)
            tick()
        leased = await store.acquire(a1.session_id)  # a1 is used: a2 is alice's least recent
        await store.commit(leased.advanced(leased.state, None, 0, time.time()))
        await store.create(a3)
        assert await evicted(store, a2.session_id)
        assert not await evicted(store, a1.session_id) and not await evicted(store, b1.session_id)
        # Deleting frees a place in the quota: the next create evicts nothing.
        await store.delete(a1.session_id)
        await store.create(record(ALICE))
        assert not await evicted(store, a3.session_id)
        assert store.stats.evictions == 1

    run(kind, tmp_path, redis_server, scenario, max_sessions_per_owner=2, max_sessions=10)


@pytest.mark.parametrize("kind", STORES)
def test_a_full_quota_of_busy_sessions_is_resource_exhausted_naming_the_limit(kind, tmp_path, redis_server):
    async def scenario(store: SessionStore) -> None:
        mine = [record(ALICE), record(ALICE)]
        for rec in mine:
            await store.create(rec)
            await store.acquire(rec.session_id)
        with pytest.raises(ResourceExhausted, match="max_sessions_per_owner") as err:
            await store.create(record(ALICE))
        assert "2 sessions" in str(err.value)
        await store.create(record(BOB))  # another token is not refused
        for rec in mine:
            assert not await evicted(store, rec.session_id)
        await store.release(mine[0].session_id)
        await store.create(record(ALICE))  # now alice's idle one makes room
        assert await evicted(store, mine[0].session_id)

    run(kind, tmp_path, redis_server, scenario, max_sessions_per_owner=2, max_sessions=10)


@pytest.mark.parametrize("kind", STORES)
def test_without_authentication_only_max_sessions_applies(kind, tmp_path, redis_server):
    """The anonymous owner ('') is every caller when auth is off: no per-owner quota for it."""

    async def scenario(store: SessionStore) -> None:
        for _ in range(6):
            await store.create(record(""))
        assert await store.count() == 6 and store.stats.evictions == 0

    run(kind, tmp_path, redis_server, scenario, max_sessions_per_owner=2, max_sessions=10)


def test_the_redis_owner_index_follows_deletes_and_global_evictions(redis_server, tmp_path):
    """The quota is counted in Redis (one script per create): an owner's index holds exactly
    its live sessions after deletes and after evictions at max_sessions."""

    async def scenario(store) -> None:
        recs = [record(owner) for owner in (ALICE, BOB, ALICE, BOB, ALICE)]
        for rec in recs:
            await store.create(rec)  # the fifth evicts the first at max_sessions (4)
            tick()  # creates a millisecond apart: Redis's LRU order is the creation order
        await store.delete(recs[3].session_id)  # one of bob's
        live = {ALICE: set(), BOB: set()}
        for rec in recs:
            if rec is not recs[3] and not await evicted(store, rec.session_id):
                live[rec.owner].add(rec.session_id)
        assert sum(map(len, live.values())) == 3 and store.stats.evictions == 1
        with redis_server.client() as c:
            own = {o: {m.decode() for m in c.zrange(f"{store.prefix}sessions:{o}", 0, -1)} for o in live}
        assert own == live

    run("redis", tmp_path, redis_server, scenario, max_sessions_per_owner=3, max_sessions=4)
