"""The SQLite store's file: its owner's alone (the file and its WAL), a bounded number of
tombstones, and a file that shrinks when sessions go."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gru_serve.ops.errors import SessionExpired, SessionNotFound
from gru_serve.stores.sessions import SessionRecord, new_session_id
from gru_serve.stores.sqlite_store import SQLiteStore

HIDDEN = 4096  # a 32 KiB state: a few hundred sessions make a file of megabytes


def session(hidden: int = 8) -> SessionRecord:
    state = np.random.default_rng(1).standard_normal((2, hidden)).astype(np.float32)
    return SessionRecord(new_session_id(), "m", "ab" * 32, "alice", state, None, 3, time.time(), time.time())


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which files are made world-readable by default."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_file_and_its_wal_are_the_owners_alone(tmp_path, umask_022):
    old = tmp_path / "old.db"
    old.touch(0o644)  # a file left world-readable (e.g. by an earlier version)
    for path in (tmp_path / "new.db", old):

        async def main(path: Path = path) -> None:
            store = SQLiteStore(str(path))
            try:
                await store.create(session())
                files = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
                assert Path(f"{path}-wal") in files  # the WAL holds the session now
                assert {p.name: oct(mode(p)) for p in files} == {p.name: oct(0o600) for p in files}
            finally:
                await store.close()

        asyncio.run(main())
    assert mode(tmp_path / "new.db") == mode(old) == 0o600


def test_tombstones_are_bounded_the_oldest_dropped(tmp_path):
    path = tmp_path / "s.db"
    ids = []

    async def main() -> None:
        store = SQLiteStore(str(path), max_sessions=5)
        try:
            for _ in range(300):  # each create past 5 evicts the oldest: one tombstone each
                rec = session()
                ids.append(rec.session_id)
                await store.create(rec)
            # The newest evicted still reads as evicted; the first ones are forgotten.
            with pytest.raises(SessionExpired, match="was evicted"):
                await store.get(ids[-6])
            with pytest.raises(SessionNotFound):
                await store.get(ids[0])
        finally:
            await store.close()

    asyncio.run(main())
    with sqlite3.connect(path) as db:  # an independent reader of the file
        tombstones = db.execute("SELECT count(*) FROM tombstones").fetchone()[0]
        live = db.execute("SELECT count(*) FROM sessions").fetchone()[0]
    print(f"tombstones after 295 evictions at max_sessions=5: {tombstones}")
    assert live == 5
    assert 0 < tombstones <= 4 * 5


def test_the_file_shrinks_when_sessions_go(tmp_path):
    path = tmp_path / "s.db"
    n, kept = 300, 10
    ids = [session(HIDDEN) for _ in range(n)]

    async def with_store(work) -> None:
        store = SQLiteStore(str(path), max_sessions=n)
        try:
            await work(store)
        finally:
            await store.close()  # checkpoints the WAL into the file

    async def fill(store: SQLiteStore) -> None:
        for rec in ids:
            await store.create(rec)

    async def empty(store: SQLiteStore) -> None:
        for rec in ids[kept:]:
            await store.delete(rec.session_id)

    asyncio.run(with_store(fill))
    full = path.stat().st_size
    asyncio.run(with_store(empty))
    after = path.stat().st_size
    print(f"sqlite file: {full} bytes with {n} sessions, {after} bytes after deleting {n - kept}")
    assert full > n * HIDDEN * 2 * 4  # the states are in it
    assert after < full / 4
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM sessions").fetchone()[0] == kept
