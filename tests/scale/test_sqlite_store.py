"""SQLiteStore: the SessionStore semantics of the memory and Redis stores on one node's disk,
sessions that survive a SIGKILL of the server, and a server whose memory does not grow with the
sessions it keeps on disk."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from gru_serve.bench.topology import D2L, Replica, wait_for
from gru_serve.client import Client
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2_grpc as pb_grpc
from gru_serve.ops.errors import (
    ResourceExhausted,
    SessionBusy,
    SessionExpired,
    SessionNotFound,
    VersionConflict,
)
from gru_serve.ops.settings import Settings
from gru_serve.stores.factory import build_store
from gru_serve.stores.sessions import SessionRecord, new_session_id
from gru_serve.stores.sqlite_store import COLUMNS, DAY_S, SQLiteStore
from tests.support.records import same
from tests.support.serving import reference_generate

PROMPT = "time traveller"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def record(
    owner: str = "alice", logits: bool = True, turns: int = 3, now: float | None = None
) -> SessionRecord:
    rng = np.random.default_rng(7)
    state = rng.standard_normal((2, 8)).astype(np.float32)
    state.flat[:5] = [np.nan, np.inf, -0.0, 1e-45, np.finfo(np.float32).max]  # bits must survive
    now = time.time() if now is None else now
    rec = SessionRecord(
        new_session_id(), "timemachine-d2l", "ab" * 32, owner, state, None, 14, 1_700_000_000.123456789, now
    )
    rec = rec.checkpointed(now, 8)  # turn 0: no logits yet
    for i in range(turns):
        rec = rec.advanced(state + i, rng.standard_normal(28).astype(np.float32), 5, now + 1e-6 * i, 8)
    return rec if logits else replace(rec, logits=None)


def run(path: Path, scenario: Callable[[SQLiteStore], Awaitable[None]], **kw) -> None:
    """Run a scenario with a store on the file, closed at its end (the next opens as after a
    restart)."""

    async def main() -> None:
        store = SQLiteStore(str(path), **kw)
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(main())


def test_build_store_takes_a_relative_or_absolute_path_and_names_a_missing_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings(session_store="sqlite:///rel.db", session_ttl_s=60, max_sessions=5, idle_to_disk_s=7)
    store = build_store(s)
    assert isinstance(store, SQLiteStore) and (store.ttl_s, store.max_sessions, store.idle_to_disk_s) == (
        60,
        5,
        7,
    )
    asyncio.run(store.close())
    assert (tmp_path / "rel.db").exists()
    store = build_store(Settings(session_store=f"sqlite:///{tmp_path}/abs.db"))
    asyncio.run(store.close())
    assert (tmp_path / "abs.db").exists()
    with pytest.raises(OSError, match=re.escape(f"directory {tmp_path}/nope does not exist")):
        build_store(Settings(session_store=f"sqlite:///{tmp_path}/nope/s.db"))


def test_one_server_per_file_and_a_file_of_another_format_is_refused(tmp_path):
    path = str(tmp_path / "s.db")

    async def scenario() -> None:
        first = SQLiteStore(path)
        try:
            with pytest.raises(OSError, match="in use by another server"):
                SQLiteStore(path)
        finally:
            await first.close()
        SQLiteStore(path)  # free again once closed; the OS also frees it when a process dies

    asyncio.run(scenario())
    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("PRAGMA user_version=9")
    with pytest.raises(OSError, match="format 9"):
        SQLiteStore(str(tmp_path / "other.db"))


@pytest.mark.parametrize("idle_to_disk_s", [300.0, 0.0])
def test_records_round_trip_bit_for_bit_with_their_checkpoints(tmp_path, idle_to_disk_s):
    recs = [record(), record(logits=False), record(owner="", turns=0)]

    async def write(s: SQLiteStore) -> None:
        for rec in recs:
            await s.create(rec)
            same(await s.get(rec.session_id), rec)
        assert (s.stats.cache_hits > 0) == (idle_to_disk_s > 0)  # 0: only the disk holds them

    async def read(s: SQLiteStore) -> None:  # after a restart: from the file
        for rec in recs:
            got = await s.get(rec.session_id)
            same(got, rec)
            got.state[0, 0] = 1.0  # a writable copy, not a view of the row's bytes
        assert s.stats.cache_misses == len(recs) and s.stats.read_bytes > sum(r.state.nbytes for r in recs)

    run(tmp_path / "s.db", write, idle_to_disk_s=idle_to_disk_s)
    run(tmp_path / "s.db", read, idle_to_disk_s=idle_to_disk_s)
    with sqlite3.connect(tmp_path / "s.db") as db:
        state, shape = db.execute(
            "SELECT state, state_shape FROM sessions WHERE id = ?", (recs[0].session_id,)
        ).fetchone()
    assert state == recs[0].state.astype("<f4").tobytes() and shape == "2,8"  # raw float32, 4 bytes a number


def test_a_lease_is_exclusive_and_a_commit_bumps_the_version(tmp_path):
    async def scenario(s: SQLiteStore) -> None:
        rec = record()
        await s.create(rec)
        leased = await s.acquire(rec.session_id)
        with pytest.raises(SessionBusy):
            await s.acquire(rec.session_id)
        with pytest.raises(SessionBusy):
            await s.delete(rec.session_id)
        stored = await s.commit(leased.advanced(leased.state + 1, None, 30, time.time(), 8))
        assert stored.version == 1 and stored.tokens_seen == rec.tokens_seen + 30
        same(await s.get(rec.session_id), stored)
        await s.acquire(rec.session_id)  # free again
        await s.release(rec.session_id)
        same(await s.get(rec.session_id), stored)  # a release leaves the session as it was

    run(tmp_path / "s.db", scenario)


def test_of_two_requests_on_one_version_only_the_first_commits(tmp_path):
    async def scenario(s: SQLiteStore) -> None:
        rec = record()
        await s.create(rec)
        first = await s.acquire(rec.session_id)
        await s.commit(first.advanced(first.state, None, 1, time.time()))
        await s.acquire(rec.session_id)  # a second request, holding a copy of the old version
        with pytest.raises(VersionConflict, match="another request committed first"):
            await s.commit(first.advanced(first.state, None, 2, time.time()))
        with pytest.raises(VersionConflict, match="no lease"):
            await s.commit(first)
        got = await s.get(rec.session_id)
        assert got.version == 1 and got.tokens_seen == rec.tokens_seen + 1
        await s.acquire(rec.session_id)  # the refused commit gave its lease back
        await s.release(rec.session_id)

    run(tmp_path / "s.db", scenario)


def test_a_commit_whose_caller_is_cancelled_still_lands_whole(tmp_path):
    async def scenario(s: SQLiteStore) -> None:
        rec = record()
        await s.create(rec)
        leased = await s.acquire(rec.session_id)
        new = leased.advanced(leased.state + 1, leased.logits, 3, time.time(), 8)
        call = asyncio.create_task(s.commit(new))
        await asyncio.sleep(0)  # under way: the disk write is queued
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        same(await s.get(rec.session_id), replace(new, version=1))  # memory and disk agree
        await s.acquire(rec.session_id)

    run(tmp_path / "s.db", scenario, idle_to_disk_s=0)
    run(tmp_path / "s.db", scenario)


def test_expired_is_told_apart_from_unknown_across_a_restart_and_delete_forgets(tmp_path):
    clock = Clock()
    ids: dict[str, str] = {}

    async def first(s: SQLiteStore) -> None:
        read, swept, busy, gone = (record(now=clock.now) for _ in range(4))
        for rec in (read, swept, busy, gone):
            await s.create(rec)
        await s.acquire(busy.session_id)
        await s.delete(gone.session_id)
        clock.now += 11  # past the TTL
        with pytest.raises(SessionExpired, match="has expired") as e:
            await s.get(read.session_id)
        assert e.value.owner == "alice"
        same(await s.get(busy.session_id), busy)  # a busy session does not expire
        assert await s.count() == 1  # swept unread; busy kept
        assert s.stats.expirations == 2
        ids.update(read=read.session_id, swept=swept.session_id, busy=busy.session_id, gone=gone.session_id)

    async def restarted(s: SQLiteStore) -> None:
        for name in ("read", "swept"):
            with pytest.raises(SessionExpired, match="has expired"):
                await s.acquire(ids[name])
        with pytest.raises(SessionNotFound, match="unknown"):
            await s.get(ids["gone"])
        with pytest.raises(SessionNotFound):
            await s.delete(ids["gone"])
        with pytest.raises(SessionExpired):  # no lease survives: now it is idle, and expired
            await s.get(ids["busy"])
        clock.now += DAY_S + 11  # tombstones live a day longer than their session would have
        assert await s.count() == 0
        with pytest.raises(SessionNotFound, match="unknown"):
            await s.get(ids["read"])

    run(tmp_path / "s.db", first, ttl_s=10, clock=clock)
    run(tmp_path / "s.db", restarted, ttl_s=10, clock=clock)


def test_capacity_evicts_the_least_recently_used_idle_session(tmp_path):
    clock = Clock()

    async def scenario(s: SQLiteStore) -> None:
        a, b, c, d = (record(now=clock.now + i) for i in range(4))
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

    run(tmp_path / "s.db", scenario, max_sessions=2, clock=clock)


def test_idle_sessions_leave_memory_for_the_disk_and_come_back_when_used(tmp_path):
    clock = Clock()

    async def scenario(s: SQLiteStore) -> None:
        rec = record(now=clock.now)
        await s.create(rec)
        assert s.cached(rec.session_id) is rec
        clock.now += 4
        await s.ping()
        assert s.cached(rec.session_id) is rec
        clock.now += 2  # 6 s idle > idle_to_disk_s
        await s.ping()  # a server pings its store every second
        assert s.cached(rec.session_id) is None
        same(await s.get(rec.session_id), rec)  # from disk, and in memory again
        assert s.stats.cache_misses == 1 and s.cached(rec.session_id) is not None

    run(tmp_path / "s.db", scenario, idle_to_disk_s=5, clock=clock)


def test_a_new_store_on_the_file_has_every_committed_session_and_no_lease(tmp_path):
    recs = [record() for _ in range(3)]
    stored: list[SessionRecord] = []

    async def before(s: SQLiteStore) -> None:
        for rec in recs:
            await s.create(rec)
        leased = await s.acquire(recs[0].session_id)
        stored.append(await s.commit(leased.advanced(leased.state + 1, leased.logits, 7, time.time(), 8)))
        await s.acquire(recs[1].session_id)  # in flight when the process ends

    async def after(s: SQLiteStore) -> None:
        same(await s.get(recs[0].session_id), stored[0])
        for rec in recs[1:]:
            same(await s.acquire(rec.session_id), rec)  # no lease came back from the dead
        assert await s.count() == 3

    run(tmp_path / "s.db", before)
    run(tmp_path / "s.db", after)


# -- the server --


def test_a_missing_directory_stops_the_start_with_one_line_naming_it(tmp_path):
    url = f"sqlite:///{tmp_path}/missing/s.db"
    cmd = [sys.executable, "-m", "gru_serve.cli", "serve", "--port", "0", "--http-port", "0"]
    cmd += ["--model", str(D2L)]
    r = subprocess.run([*cmd, "--session-store", url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if "gru-serve: error" in x]
    assert f"directory {tmp_path}/missing does not exist" in line


def serve(tmp: Path, name: str, db: Path, *flags: str) -> Replica:
    r = Replica(name, f"sqlite:///{db}", tmp, *flags)
    r.start()
    return r


def test_sigkill_mid_stream_keeps_every_committed_session_exactly(tmp_path):
    db = tmp_path / "sessions.db"
    server = serve(tmp_path, "sqlite", db, "--max-new-tokens", "1000000")
    reference = reference_generate(D2L, PROMPT, 400)
    before: dict[str, str] = {}  # session -> its committed text after the prompt
    turns: list[str] = []  # a session taking 5-token turns until the kill
    try:
        with Client(server.target) as c:
            for _ in range(3):
                sid = c.create_session(PROMPT).session_id
                before[sid] = c.generate_text(session_id=sid, max_new_tokens=20)[0]
            busy = c.create_session(PROMPT).session_id
            before[busy] = c.generate_text(session_id=busy, max_new_tokens=20)[0]
            looping = c.create_session(PROMPT).session_id
            stream = c.generate(session_id=busy, max_new_tokens=500_000)
            assert next(stream).tokens and next(stream).tokens  # in flight, holding the lease

            def loop() -> None:
                with Client(server.target) as c2:
                    try:
                        while True:
                            text, finished = c2.generate_text(session_id=looping, max_new_tokens=5)
                            assert finished.generated_tokens == 5  # committed before Finished is sent
                            turns.append(text)
                    except grpc.RpcError:
                        pass

            t = threading.Thread(target=loop)
            t.start()
            wait_for(lambda: len(turns) >= 3, 30, "turns committed")
            server.kill()
            t.join(30)
            with pytest.raises(grpc.RpcError) as lost:
                for _ in stream:
                    pass
            assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if server.alive():
            server.kill()

    server.start()  # the same file
    try:
        with Client(server.target) as c:
            for sid, text in before.items():
                # The in-flight request's session is as before that request, and free.
                assert c.get_session(sid).tokens_seen == len(PROMPT) + 20
                after, _ = c.generate_text(session_id=sid, max_new_tokens=20)
                assert text + after == reference[:40]
            # Every turn whose Finished arrived was committed; the last one may have been
            # committed with its reply lost in the kill.
            seen = c.get_session(looping).tokens_seen - len(PROMPT)
            assert seen in (5 * len(turns), 5 * len(turns) + 5)
            assert "".join(turns) == reference[: 5 * len(turns)]
            after, _ = c.generate_text(session_id=looping, max_new_tokens=20)
            assert after == reference[seen : seen + 20]
    finally:
        server.stop()


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def create_sessions(target: str, n: int, window: int = 64) -> list[str]:
    """n empty sessions through the API, `window` calls in flight."""
    ids: list[str] = []
    pending: collections.deque = collections.deque()
    with grpc.insecure_channel(target) as ch:
        create = pb_grpc.GenerationServiceStub(ch).CreateSession
        for _ in range(n):
            pending.append(create.future(pb.CreateSessionRequest()))
            if len(pending) >= window:
                ids.append(pending.popleft().result().session_id)
        ids.extend(f.result().session_id for f in pending)
    return ids


def settled_rss(server: Replica, wait_s: float = 3.0) -> float:
    """The server's RSS once idle sessions have left memory (idle_to_disk_s < wait_s)."""
    time.sleep(wait_s)
    return rss_mb(server.pid)


def exercise(server: Replica) -> str:
    """Every kind of call the measurement makes (2020 new sessions, 20 of them read and
    generated on); returns a session that has seen PROMPT and 10 generated tokens."""
    create_sessions(server.target, 2000)
    with Client(server.target) as c:
        for _ in range(20):
            sid = c.create_session(PROMPT).session_id
            c.generate_text(session_id=sid, max_new_tokens=10)
            c.get_session(sid)
    return sid


def test_100k_idle_sessions_on_disk_keep_server_memory_within_50_mb_of_idle(tmp_path):
    """Idle size: the server on an empty file after `exercise`. Then 100,000 sessions are put
    in the file (copies of one the server wrote, through the store's own columns: creating
    them through the API takes about 2 minutes on 2 cores), and the server, restarted on it,
    does the same calls, reads 2000 of them, generates on 20 and creates 10,000 more through
    the API (they pass through memory and leave it after idle_to_disk_s)."""
    n, db = 100_000, tmp_path / "sessions.db"
    flags = ("--idle-to-disk-s", "1", "--max-sessions", "200000", "--session-ttl-s", "86400")
    server = serve(tmp_path, "sqlite", db, *flags)
    try:
        template = exercise(server)
        idle = settled_rss(server)
    finally:
        server.stop()
    ids = [new_session_id() for _ in range(n)]
    copy = ", ".join("?" if c == "id" else c for c in COLUMNS)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            f"INSERT INTO sessions SELECT {copy} FROM sessions WHERE id = ?", ((i, template) for i in ids)
        )
    server.start()
    try:
        exercise(server)
        rng = np.random.default_rng(0)
        reference = reference_generate(D2L, PROMPT, 20)
        with Client(server.target) as c:
            for sid in rng.choice(ids, 2000, replace=False):
                assert c.get_session(str(sid)).tokens_seen == len(PROMPT) + 10
            for sid in rng.choice(ids, 20, replace=False):
                assert c.generate_text(session_id=str(sid), max_new_tokens=10)[0] == reference[10:]
        t0 = time.monotonic()
        create_sessions(server.target, 10_000)
        created_s = time.monotonic() - t0
        total = 2 * 2020 + n + 10_000
        wait_for(lambda: server.metrics()["gru_serve_active_sessions"] == total, 10, "the count")
        full = settled_rss(server)
    finally:
        server.stop()
    print(
        f"\nserver RSS: idle {idle:.1f} MiB; with {total} sessions on disk "
        f"({os.path.getsize(db) / 2**20:.0f} MiB) {full:.1f} MiB (+{full - idle:.1f}); "
        f"10,000 created through the API in {created_s:.1f} s"
    )
    assert full - idle <= 50
