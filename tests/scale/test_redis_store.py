"""RedisStore against a real redis-server: the SessionStore semantics of the memory store,
shared between store instances (replicas), and Redis failures reported as Unavailable."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from gru_serve.bench.topology import RedisServer
from gru_serve.launch import free_port
from gru_serve.ops.errors import (
    ResourceExhausted,
    SessionBusy,
    SessionExpired,
    SessionNotFound,
    Unavailable,
    VersionConflict,
    WrongModel,
)
from gru_serve.ops.settings import Settings
from gru_serve.stores.factory import build_store
from gru_serve.stores.redis_store import RedisStore, display_url
from gru_serve.stores.sessions import SessionRecord, new_session_id


def record(owner: str = "alice", logits: bool = True, layers: int = 2, hidden: int = 8) -> SessionRecord:
    rng = np.random.default_rng(7)
    state = rng.standard_normal((layers, hidden)).astype(np.float32)
    state.flat[:5] = [np.nan, np.inf, -0.0, 1e-45, np.finfo(np.float32).max]  # bits must survive
    return SessionRecord(
        new_session_id(),
        "timemachine-d2l",
        "ab" * 32,
        owner,
        state,
        rng.standard_normal(28).astype(np.float32) if logits else None,
        14,
        1_700_000_000.123456789,
        time.time(),
    )


def run(redis_server: RedisServer, scenario: Callable[..., Awaitable[None]], n: int = 1, **kw) -> None:
    """Run a scenario with n stores (replicas) on one Redis, each under a fresh key prefix."""

    async def main() -> None:
        prefix = f"t{new_session_id()[:8]}:"
        stores = [RedisStore(f"{redis_server.url}?prefix={prefix}", **kw) for _ in range(n)]
        try:
            await scenario(*stores)
        finally:
            for s in stores:
                await s.close()

    asyncio.run(main())


def same(a: SessionRecord, b: SessionRecord) -> None:
    assert (a.session_id, a.model, a.model_hash, a.owner) == (b.session_id, b.model, b.model_hash, b.owner)
    assert (a.tokens_seen, a.created, a.last_used, a.version) == (
        b.tokens_seen,
        b.created,
        b.last_used,
        b.version,
    )
    assert a.state.dtype == b.state.dtype == np.float32 and a.state.shape == b.state.shape
    assert a.state.tobytes() == b.state.tobytes()
    if a.logits is None:
        assert b.logits is None
    else:
        assert a.logits.tobytes() == b.logits.tobytes() and a.logits.shape == b.logits.shape


def test_build_store_picks_redis_from_the_url(redis_server):
    store = build_store(Settings(session_store=redis_server.url, session_ttl_s=60, max_sessions=5))
    assert isinstance(store, RedisStore) and (store.ttl_s, store.max_sessions) == (60, 5)
    with pytest.raises(ValueError, match="redis://HOST:PORT/DB"):
        build_store(Settings(session_store="mongodb://x"))


def test_records_round_trip_bit_for_bit(redis_server):
    async def scenario(a: RedisStore, b: RedisStore) -> None:
        for rec in (record(), record(logits=False), record(owner="")):
            await a.create(rec)
            same(await b.get(rec.session_id), rec)  # another replica reads exactly what was written
            got = await b.get(rec.session_id)
            got.state[0, 0] = 1.0  # a writable copy, not a view of Redis' bytes

    run(redis_server, scenario, 2)


def test_raw_float32_layout_with_format_version_and_model_hash(redis_server):
    async def scenario(s: RedisStore) -> None:
        rec = record()
        await s.create(rec)
        with redis_server.client() as r:
            h = r.hgetall(f"{s.prefix}s:{rec.session_id}")
        assert h[b"fmt"] == b"1" and h[b"hash"] == rec.model_hash.encode()
        assert h[b"state"] == rec.state.astype("<f4").tobytes() and h[b"state_shape"] == b"2,8"
        assert h[b"logits"] == rec.logits.astype("<f4").tobytes()
        assert len(h[b"state"]) == 2 * 8 * 4  # 4 bytes a number, not JSON

    run(redis_server, scenario)


def test_unknown_and_a_newer_format_are_refused_by_name(redis_server):
    async def scenario(s: RedisStore) -> None:
        with pytest.raises(SessionNotFound, match="is unknown"):
            await s.get("nope")
        rec = record()
        await s.create(rec)
        with redis_server.client() as r:
            r.hset(f"{s.prefix}s:{rec.session_id}", "fmt", "9")
        with pytest.raises(WrongModel, match="format 9"):
            await s.get(rec.session_id)

    run(redis_server, scenario)


def test_lease_is_cluster_wide_and_commit_bumps_the_version(redis_server):
    async def scenario(a: RedisStore, b: RedisStore) -> None:
        rec = record()
        await a.create(rec)
        leased = await a.acquire(rec.session_id)
        for store in (a, b):
            with pytest.raises(SessionBusy):
                await store.acquire(rec.session_id)
            with pytest.raises(SessionBusy):
                await store.delete(rec.session_id)
        new = leased.advanced(leased.state + 1, None, 30, time.time())
        stored = await a.commit(new)
        assert stored.version == 1 and stored.tokens_seen == 44
        same(await b.get(rec.session_id), stored)
        again = await b.acquire(rec.session_id)  # free again, on the other replica
        assert again.version == 1
        await b.release(rec.session_id)
        same(await a.get(rec.session_id), stored)  # a release leaves the session as it was

    run(redis_server, scenario, 2)


def test_two_replicas_never_both_commit(redis_server):
    async def scenario(a: RedisStore, b: RedisStore) -> None:
        rec = record()
        await a.create(rec)
        leased_a = await a.acquire(rec.session_id)
        with redis_server.client() as r:  # a's lease runs out (a stalled past lease_s)
            r.delete(f"{a.prefix}lease:{rec.session_id}")
        leased_b = await b.acquire(rec.session_id)
        with pytest.raises(VersionConflict, match="another request"):
            await a.commit(leased_a.advanced(leased_a.state, None, 1, time.time()))
        await b.commit(leased_b.advanced(leased_b.state, None, 2, time.time()))
        with pytest.raises(VersionConflict):  # a stale copy, even without a lease in the way
            await a.acquire(rec.session_id)
            await a.commit(leased_a)
        got = await b.get(rec.session_id)
        assert got.version == 1 and got.tokens_seen == 16
        await b.acquire(rec.session_id)  # a's refused commit gave its lease back: free at once
        await b.release(rec.session_id)

    run(redis_server, scenario, 2)


def test_a_dead_holders_lease_runs_out_and_a_live_one_is_renewed(redis_server):
    async def scenario(a: RedisStore, b: RedisStore) -> None:
        rec, held = record(), record()
        await a.create(rec)
        await a.create(held)
        with redis_server.client() as r:  # a holder that died: nobody renews its lease
            r.set(f"{a.prefix}lease:{rec.session_id}", "dead:1:x", px=int(a.lease_s * 1000))
        await a.acquire(held.session_id)  # a live holder: a renews it
        t0 = time.monotonic()
        while True:
            try:
                await b.acquire(rec.session_id)
                break
            except SessionBusy:
                assert time.monotonic() - t0 < a.lease_s + 2, "the dead holder's lease did not run out"
                await asyncio.sleep(0.02)
        assert time.monotonic() - t0 >= a.lease_s * 0.5
        # The condition under test is time passing: several lease lifetimes later a live
        # holder still holds its lease.
        await asyncio.sleep(max(0.0, 3 * a.lease_s - (time.monotonic() - t0)))
        with pytest.raises(SessionBusy):
            await b.acquire(held.session_id)
        stored = await a.commit(await a.get(held.session_id))
        assert stored.version == 1

    run(redis_server, scenario, 2, lease_s=0.4)


def test_expired_is_told_apart_from_unknown_and_delete_forgets(redis_server):
    async def scenario(s: RedisStore) -> None:
        rec = record()
        await s.create(rec)
        t0 = time.monotonic()
        while True:
            try:
                await s.get(rec.session_id)
            except SessionExpired as e:
                assert "has expired" in str(e) and e.owner == "alice"
                break
            assert time.monotonic() - t0 < 5, "the session did not expire"
            await asyncio.sleep(0.02)
        with pytest.raises(SessionExpired):
            await s.acquire(rec.session_id)
        other = record()
        await s.create(other)
        await s.delete(other.session_id)
        with pytest.raises(SessionNotFound, match="unknown"):
            await s.get(other.session_id)
        with pytest.raises(SessionNotFound):
            await s.delete(other.session_id)

    run(redis_server, scenario, ttl_s=0.3)


def test_a_busy_session_does_not_expire(redis_server):
    async def scenario(s: RedisStore) -> None:
        rec = record()
        await s.create(rec)
        leased = await s.acquire(rec.session_id)
        await asyncio.sleep(1.0)  # > 3 TTLs: the condition under test is the passing of time
        stored = await s.commit(leased.advanced(leased.state, None, 1, time.time()))
        same(await s.get(rec.session_id), stored)

    run(redis_server, scenario, ttl_s=0.3, lease_s=0.3)


def test_capacity_evicts_the_least_recently_used_idle_session(redis_server):
    async def scenario(s: RedisStore) -> None:
        a, b, c, d = record(), record(), record(), record()
        await s.create(a)
        await s.create(b)
        await s.acquire(a.session_id)  # a is busy, b idle
        await s.create(c)
        with pytest.raises(SessionExpired, match="evicted"):
            await s.get(b.session_id)
        assert s.stats.evictions == 1 and await s.count() == 2
        await s.acquire(c.session_id)
        with pytest.raises(ResourceExhausted, match="max_sessions"):
            await s.create(d)

    run(redis_server, scenario, max_sessions=2)


def test_unreachable_store_is_unavailable_with_its_name():
    async def scenario() -> None:
        url = f"redis://:secret@127.0.0.1:{free_port()}/0"
        store = RedisStore(url)
        try:
            for call in (
                store.ping(),
                store.get("x"),
                store.create(record()),
                store.acquire("x"),
                store.count(),
            ):
                with pytest.raises(
                    Unavailable, match=r"session store redis://:\*\*\*@127\.0\.0\.1:\d+/0 unreachable"
                ):
                    await call
            await store.release("x")  # never raises: an unreleased lease runs out by itself
        finally:
            await store.close()

    asyncio.run(scenario())
    assert display_url("redis://u:pw@h:1/0?lease_s=2") == "redis://u:***@h:1/0"


def test_recovers_by_itself_after_redis_restarts_and_times_out_when_it_hangs(tmp_path):
    server = RedisServer(tmp_path)
    server.start()

    async def scenario() -> None:
        store = RedisStore(server.url, timeout_s=0.5)
        try:
            await store.create(record())
            server.stop()
            with pytest.raises(Unavailable, match="unreachable"):
                await store.ping()
            server.start()  # empty: the Lua scripts are gone too
            rec = record()
            await store.create(rec)  # reconnects and reloads its scripts
            await store.acquire(rec.session_id)
            assert (await store.commit(await store.get(rec.session_id))).version == 1
            os.kill(server.proc.pid, signal.SIGSTOP)  # slow: a hung Redis
            try:
                t0 = time.monotonic()
                with pytest.raises(Unavailable, match="unreachable"):
                    await store.get(rec.session_id)
                assert time.monotonic() - t0 < 3
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            assert (await store.get(rec.session_id)).version == 1
        finally:
            await store.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_the_local_tier_reads_only_a_version_while_its_copy_is_current(redis_server):
    async def scenario(a: RedisStore, b: RedisStore) -> None:
        rec = record()
        await a.create(rec)
        full = a.stats.read_bytes
        got = await a.acquire(rec.session_id)  # a wrote it: its copy is current
        same(got, rec)
        assert a.stats.cache_hits == 1 and a.stats.read_bytes - full < 16
        mine = await a.commit(got.advanced(got.state + 1, got.logits, 3, time.time()))
        theirs = await b.acquire(rec.session_id)  # b has no copy: the whole record
        assert b.stats.cache_misses == 1 and b.stats.read_bytes > rec.state.nbytes + rec.logits.nbytes
        same(theirs, mine)
        newest = await b.commit(theirs.advanced(theirs.state - 1, theirs.logits, 1, time.time()))
        # a's copy is one version behind: a reads the record again, and gets b's commit.
        same(await a.get(rec.session_id), newest)
        assert a.stats.cache_misses == 1
        same(await a.get(rec.session_id), newest)
        assert a.stats.cache_hits == 2

    run(redis_server, scenario, n=2, local_cache=10)


def test_the_local_tier_never_mistakes_a_new_session_for_an_old_one_with_its_id(redis_server):
    """A Triton sequence id reused after its end gives a new session with the same id, whose
    versions start again at 0: a replica's copy of the old one must not pass for it."""

    async def scenario(a: RedisStore, b: RedisStore) -> None:
        old = record()
        await a.create(old)
        await b.delete(old.session_id)
        new = dataclasses.replace(
            record(), session_id=old.session_id, created=old.created + 1, tokens_seen=99
        )
        new = dataclasses.replace(new, state=new.state + 5)
        await b.create(new)
        same(await a.get(old.session_id), new)
        assert a.stats.cache_hits == 0

    run(redis_server, scenario, n=2, local_cache=10)


def test_checkpoints_round_trip_and_a_record_without_them_still_reads(redis_server):
    def marks(rec: SessionRecord) -> list[tuple]:
        return [
            (c.turn, c.tokens_seen, c.committed, c.state.tobytes(), c.logits is None or c.logits.tobytes())
            for c in rec.checkpoints
        ]

    async def scenario(a: RedisStore, b: RedisStore) -> None:
        plain = record()
        await a.create(plain)
        assert (await b.get(plain.session_id)).checkpoints == ()

        rec = record(logits=False).checkpointed(1_700_000_000.5, 3)  # turn 0: no text, no logits
        rec = rec.advanced(rec.state + 1, np.arange(28, dtype=np.float32), 5, 1_700_000_001.25, 3)
        await a.create(rec)
        got = await b.acquire(rec.session_id)
        assert [c.turn for c in got.checkpoints] == [0, 1] and got.checkpoints[0].logits is None
        assert marks(got) == marks(rec)
        for n in (2, 3):  # the newest 3 stay
            got = await b.commit(got.advanced(got.state - n, got.logits + n, n, 1_700_000_002.0 + n, 3))
            got = await b.acquire(rec.session_id)
        await b.release(rec.session_id)
        again = await a.get(rec.session_id)
        assert [c.turn for c in again.checkpoints] == [1, 2, 3]
        assert marks(again) == marks(got)
        again.checkpoints[0].state[0, 0] = 1.0  # writable copies, not views of Redis' bytes

    run(redis_server, scenario, 2)
