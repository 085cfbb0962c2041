"""The SQLite session store: one server's sessions on its own disk, kept across restarts.

``--session-store sqlite:///PATH`` (PATH relative to the working directory; an absolute PATH
gives four slashes, ``sqlite:////var/lib/gru/sessions.db``). The semantics are the memory and
Redis stores': leases, versioned commits, expiry by TTL told apart from "unknown" by
tombstones, eviction of the least recently committed idle session at ``max_sessions`` (the
order the Redis store uses), and of an owner's own at ``max_per_owner``.

Tables: ``sessions`` (one row a session: metadata, ``state`` and ``logits`` by gru_serve.state's
codec with the state's shape, the checkpoints packed by
``gru_serve.stores.sessions.pack_checkpoints``, and ``expires`` = last_used + TTL, indexed: expiry
and LRU order) and ``tombstones`` (id, 'expired' | 'evicted', owner, until: a day after the
session would have expired; at most TOMBSTONES_PER_SESSION x max_sessions, the oldest dropped).
Every create and commit is one transaction, written before the call returns. The file and its
WAL are its owner's alone (0600), and give the pages of deleted sessions back as it goes
(auto_vacuum=INCREMENTAL), so it shrinks when sessions go.

Hot sessions stay in memory too (an LRU copy, always the committed record: this process is
the file's only writer); a session untouched for ``idle_to_disk_s`` leaves memory and is read
from disk when it is next used. Memory is bounded by the sessions used in that window, not by
the sessions on disk.

Leases live in memory only: a restarted server holds none, which is right, since the process
that held them is gone and so is its request; that session is as its last commit left it. The
file is locked for the process's life (SQLite's exclusive locking mode), so a second server
cannot open it and hand out leases of its own (nor can any other reader: copy the file for a
backup after the server stops); the OS drops the lock when a process dies.

All disk work runs on one worker thread, so the event loop never waits on the disk; store
operations run one at a time (an asyncio lock), which keeps memory and disk in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from gru_serve.ops.errors import (
    ResourceExhausted,
    SessionBusy,
    SessionExpired,
    SessionNotFound,
    Unavailable,
    VersionConflict,
)
from gru_serve.state import StateSpec, logits_from_bytes, to_bytes
from gru_serve.stores.sessions import (
    Clock,
    SessionRecord,
    SessionStore,
    StoreStats,
    pack_checkpoints,
    quota_full,
    unpack_checkpoints,
)

T = TypeVar("T")

FORMAT = 1  # PRAGMA user_version of a file this code writes
DAY_S = 86_400.0
# Tombstones kept, per session of max_sessions: past it the oldest go (their ids then read as
# unknown, not expired), so creating and evicting sessions cannot grow the file for a day.
TOMBSTONES_PER_SESSION = 4
SHRINK_PAGES = 256  # free pages (1 MiB of 4 KiB pages) a write leaves before the file is shrunk
WAL_LIMIT_BYTES = 16 << 20  # the WAL file is cut back to this after a checkpoint

COLUMNS = (
    "id",
    "model",
    "hash",
    "owner",
    "tokens_seen",
    "created",
    "last_used",
    "version",
    "state",
    "state_shape",
    "logits",
    "vocab",
    "checkpoints",
    "expires",
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
  id TEXT PRIMARY KEY, model TEXT NOT NULL, hash TEXT NOT NULL, owner TEXT NOT NULL,
  tokens_seen INTEGER NOT NULL, created REAL NOT NULL, last_used REAL NOT NULL,
  version INTEGER NOT NULL, state BLOB NOT NULL, state_shape TEXT NOT NULL, logits BLOB,
  vocab INTEGER NOT NULL, checkpoints BLOB NOT NULL, expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires);
CREATE INDEX IF NOT EXISTS sessions_owner ON sessions (owner, expires);
CREATE TABLE IF NOT EXISTS tombstones (
  id TEXT PRIMARY KEY, why TEXT NOT NULL, owner TEXT NOT NULL, until REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tombstones_until ON tombstones (until);
"""
INSERT = f"INSERT OR REPLACE INTO sessions ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
SELECT = f"SELECT {', '.join(COLUMNS)} FROM sessions WHERE id = ?"


def encode(rec: SessionRecord, ttl_s: float) -> tuple:
    """The record as a sessions row. Floats are stored as SQLite REALs (8-byte IEEE): exact."""
    spec = StateSpec.like(rec.state)
    # Checkpoints need the vocabulary size to unpack, and the record's own logits may be None.
    sizes = [x.size for x in (rec.logits, *(c.logits for c in rec.checkpoints)) if x is not None]
    return (
        rec.session_id,
        rec.model,
        rec.model_hash,
        rec.owner,
        rec.tokens_seen,
        float(rec.created),
        float(rec.last_used),
        rec.version,
        to_bytes(rec.state),
        spec.describe(),
        None if rec.logits is None else to_bytes(rec.logits),
        sizes[0] if sizes else 0,
        pack_checkpoints(rec.checkpoints, spec),
        float(rec.last_used) + ttl_s,
    )


def decode(row: tuple) -> SessionRecord:
    sid, model, hash_, owner, seen, created, last_used, version, state, shape, logits, vocab, cps, _ = row
    spec = StateSpec.parse(shape)
    return SessionRecord(
        session_id=sid,
        model=model,
        model_hash=hash_,
        owner=owner,
        state=spec.from_bytes(state),
        logits=None if logits is None else logits_from_bytes(logits, vocab),
        tokens_seen=seen,
        created=created,
        last_used=last_used,
        version=version,
        checkpoints=unpack_checkpoints(cps, spec, vocab),
    )


def _row_bytes(row: tuple) -> int:
    return sum(len(x) for x in row if isinstance(x, bytes))


def _owner_only(path: str) -> None:
    """The file (and a -wal or -shm left by an earlier run) readable by its owner alone, set
    before SQLite writes a byte; SQLite gives the -wal and -shm files it makes the file's mode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for extra in (f"{path}-wal", f"{path}-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(extra, 0o600)


class SQLiteStore(SessionStore):
    """Sessions in a SQLite file on this node; see the module docstring."""

    def __init__(
        self,
        path: str,
        ttl_s: float = 3600.0,
        max_sessions: int = 10_000,
        idle_to_disk_s: float = 300.0,
        clock: Clock = time.time,
        max_per_owner: int = 0,
    ) -> None:
        """max_per_owner: sessions one (non-empty) owner keeps (0: no quota)."""
        if ttl_s <= 0 or max_sessions < 1 or idle_to_disk_s < 0:
            raise ValueError("session_ttl_s must be positive, max_sessions at least 1, idle_to_disk_s >= 0")
        self.url = f"sqlite:///{path}"
        self.path = path
        self.ttl_s, self.max_sessions, self.clock = ttl_s, max_sessions, clock
        self.max_per_owner = max_per_owner
        self.idle_to_disk_s = idle_to_disk_s
        self.stats = StoreStats()
        folder = os.path.dirname(os.path.abspath(path))
        if not path or not os.path.isdir(folder):
            raise OSError(f"session store {self.url}: directory {folder} does not exist")
        self.max_tombstones = TOMBSTONES_PER_SESSION * max_sessions
        try:
            _owner_only(path)
            self._db = sqlite3.connect(path, timeout=1.0, isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as e:
            raise OSError(f"session store {self.url}: {e} ({os.path.abspath(path)})") from e
        try:
            self._rows = self._open()
        except (sqlite3.Error, OSError) as e:
            self._db.close()
            why = "in use by another server" if "locked" in str(e) else str(e)
            raise OSError(f"session store {self.url}: {why} ({os.path.abspath(path)})") from e
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gru-serve-sqlite")
        self._lock = asyncio.Lock()
        self._busy: set[str] = set()  # leased session ids
        self._hot: OrderedDict[str, tuple[SessionRecord, float]] = OrderedDict()  # id -> (record, used)

    # -- the worker thread's side: the connection and the row count belong to it --

    def _open(self) -> int:
        db = self._db
        # Exclusive: one server per file (its leases are in its memory). Set before WAL, so WAL
        # needs no shared-memory index.
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL: a commit is in the WAL file when the call returns, so a
        # killed process (SIGKILL, OOM) loses nothing committed; a power loss or OS crash may
        # lose the last commits before the next checkpoint (the file stays consistent). FULL
        # would fsync every commit and lose nothing even then, at a disk flush per request.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            # INCREMENTAL, so deleted sessions' pages can go back to the file system (_write);
            # a file made without it (or new) takes it with one VACUUM.
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            db.execute("VACUUM")
        with self._write():  # takes the file's lock now: a second server fails here, at start
            found = db.execute("PRAGMA user_version").fetchone()[0]
            if found not in (0, FORMAT):
                raise OSError(f"written in format {found}; this server reads format {FORMAT}")
            db.execute(f"PRAGMA user_version={FORMAT}")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        self._tombs = db.execute("SELECT count(*) FROM tombstones").fetchone()[0]  # at most
        return db.execute("SELECT count(*) FROM sessions").fetchone()[0]

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        if self._db.execute("PRAGMA freelist_count").fetchone()[0] >= SHRINK_PAGES:
            # The pages of deleted sessions go back to the file system (the file shrinks at the
            # next checkpoint). executescript steps the pragma to its end (execute frees one page).
            self._db.executescript("PRAGMA incremental_vacuum;")

    def _bury(self, dead: list[tuple[str, str, str, float]]) -> None:
        """Sessions to tombstones: (id, why, owner, until)."""
        self._db.executemany("INSERT OR REPLACE INTO tombstones VALUES (?, ?, ?, ?)", dead)
        self._db.executemany("DELETE FROM sessions WHERE id = ?", [(d[0],) for d in dead])
        self._tombs += len(dead)  # an over-count (replaced ones) only brings the next trim closer
        if self._tombs > self.max_tombstones:
            # The oldest go, down to 3/4 of the bound: one trim per bound/4 tombstones.
            keep = self.max_tombstones * 3 // 4
            self._db.execute(
                "DELETE FROM tombstones WHERE id IN "
                "(SELECT id FROM tombstones ORDER BY until DESC LIMIT -1 OFFSET ?)",
                (keep,),
            )
            self._tombs = self._db.execute("SELECT count(*) FROM tombstones").fetchone()[0]

    def _sweep_rows(self, now: float, busy: frozenset[str]) -> list[str]:
        """Bury the expired idle sessions and forget tombstones past their day; in a write."""
        rows = self._db.execute("SELECT id, owner, expires FROM sessions WHERE expires <= ?", (now,))
        dead = [(sid, "expired", who, exp + DAY_S) for sid, who, exp in rows.fetchall() if sid not in busy]
        self._bury(dead)
        self._db.execute("DELETE FROM tombstones WHERE until <= ?", (now,))
        return [d[0] for d in dead]

    def _db_sweep(self, now: float, busy: frozenset[str]) -> list[str]:
        with self._write():
            expired = self._sweep_rows(now, busy)
        self._rows -= len(expired)
        return expired

    def _evict_oldest(self, need: int, now: float, busy: frozenset[str], owner: str = "") -> list[str]:
        """Bury up to `need` least recently committed idle sessions (`owner`'s only, if given);
        in a write. Fewer than `need` back: the rest are busy."""
        if need <= 0:
            return []
        where, args = ("WHERE owner = ? ", (owner,)) if owner else ("", ())
        oldest = self._db.execute(
            f"SELECT id, owner FROM sessions {where}ORDER BY expires LIMIT ?", (*args, need + len(busy))
        ).fetchall()
        idle = [(v, o) for v, o in oldest if v not in busy][:need]
        self._bury([(v, "evicted", o, now + self.ttl_s + DAY_S) for v, o in idle])
        return [v for v, _ in idle]

    def _db_create(self, row: tuple, now: float, busy: frozenset[str]) -> tuple[list[str], list[str], str]:
        """-> (expired ids, evicted ids, the limit that refused it or ''). The sweep and
        evictions commit even when full. An owner at its quota evicts its own sessions first."""
        sid, owner = row[0], row[3]
        with self._write() as db:
            expired = self._sweep_rows(now, busy)
            rows = self._rows - len(expired)
            replacing = db.execute("SELECT 1 FROM sessions WHERE id = ?", (sid,)).fetchone() is not None
            evicted: list[str] = []
            full = ""
            if owner and self.max_per_owner and not replacing:
                have = db.execute("SELECT count(*) FROM sessions WHERE owner = ?", (owner,)).fetchone()[0]
                need = have + 1 - self.max_per_owner
                evicted = self._evict_oldest(need, now, busy, owner)
                full = "max_sessions_per_owner" if len(evicted) < need else ""
            if not full:
                need = 0 if replacing else rows - len(evicted) + 1 - self.max_sessions
                more = self._evict_oldest(need, now, busy)
                evicted += more
                full = "max_sessions" if len(more) < need else ""
            if not full:
                db.execute(INSERT, row)
                db.execute("DELETE FROM tombstones WHERE id = ?", (sid,))
        self._rows = rows - len(evicted) + (1 if not full and not replacing else 0)
        return expired, evicted, full

    def _db_read(self, sid: str) -> tuple[tuple | None, tuple | None]:
        """-> (session row or None, (why, owner) of its tombstone or None)."""
        row = self._db.execute(SELECT, (sid,)).fetchone()
        if row is not None:
            return row, None
        return None, self._db.execute("SELECT why, owner FROM tombstones WHERE id = ?", (sid,)).fetchone()

    def _db_expire(self, sid: str, owner: str, expires: float) -> None:
        with self._write():
            self._bury([(sid, "expired", owner, expires + DAY_S)])
        self._rows -= 1

    def _db_commit(self, row: tuple, version: int) -> str:
        """Write a committed record if its session is still at `version`: '' or why not."""
        with self._write() as db:
            found = db.execute("SELECT version FROM sessions WHERE id = ?", (row[0],)).fetchone()
            if found is None:
                return "it expired, was evicted or was deleted"
            if found[0] != version:
                return "another request committed first"
            db.execute(INSERT, row)
        return ""

    def _db_delete(self, sid: str) -> None:
        with self._write() as db:
            n = db.execute("DELETE FROM sessions WHERE id = ?", (sid,)).rowcount
            db.execute("DELETE FROM tombstones WHERE id = ?", (sid,))
        self._rows -= n

    # -- the event loop's side --

    async def _disk(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except sqlite3.Error as e:
            raise Unavailable(f"session store {self.url}: {e}") from e

    async def _serial(self, body: Coroutine[Any, Any, T]) -> T:
        """One store operation at a time, each run to its end even when its caller is cancelled
        (a client that disconnects during a commit): memory and disk must never part ways."""

        async def locked() -> T:
            async with self._lock:
                self._trim()
                return await body

        task = asyncio.ensure_future(locked())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller is gone but the operation finishes; its error, if any, has no one to go to.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            raise

    def _trim(self) -> None:
        """Sessions idle for idle_to_disk_s leave memory (the disk keeps them). Every store call
        trims, and a server pings its store every second, so idle memory drains by itself."""
        edge = self.clock() - self.idle_to_disk_s
        while self._hot and next(iter(self._hot.values()))[1] <= edge:
            self._hot.popitem(last=False)

    def _keep(self, rec: SessionRecord) -> None:
        if self.idle_to_disk_s > 0:
            self._hot[rec.session_id] = (rec, self.clock())
            self._hot.move_to_end(rec.session_id)

    async def _live(self, sid: str) -> SessionRecord:
        hot = self._hot.get(sid)
        if hot is not None:
            rec = hot[0]
            self.stats.cache_hits += 1
        else:
            row, tombstone = await self._disk(self._db_read, sid)
            if row is None:
                if tombstone is None:
                    raise SessionNotFound(sid)
                raise SessionExpired(sid, evicted=tombstone[0] == "evicted", owner=tombstone[1])
            self.stats.cache_misses += 1
            self.stats.read_bytes += _row_bytes(row)
            rec = decode(row)
        if sid not in self._busy and self.clock() >= self.expires(rec):
            self._hot.pop(sid, None)
            await self._disk(self._db_expire, sid, rec.owner, self.expires(rec))
            self.stats.expirations += 1
            raise SessionExpired(sid, owner=rec.owner)
        self._keep(rec)
        return rec

    def _forget(self, expired: Sequence[str], evicted: Sequence[str] = ()) -> None:
        for sid in (*expired, *evicted):
            self._hot.pop(sid, None)
        self.stats.expirations += len(expired)
        self.stats.evictions += len(evicted)

    async def create(self, record: SessionRecord) -> None:
        async def body() -> None:
            row = encode(record, self.ttl_s)
            expired, evicted, full = await self._disk(
                self._db_create, row, self.clock(), frozenset(self._busy)
            )
            self._forget(expired, evicted)
            if full == "max_sessions_per_owner":
                raise quota_full(self.max_per_owner)
            if full:
                raise ResourceExhausted(
                    f"sessions: all {self.max_sessions} sessions are busy; the limit is max_sessions"
                )
            self._hot.pop(record.session_id, None)
            self._keep(record)

        await self._serial(body())

    async def get(self, session_id: str) -> SessionRecord:
        return await self._serial(self._live(session_id))

    async def acquire(self, session_id: str) -> SessionRecord:
        async def body() -> SessionRecord:
            rec = await self._live(session_id)
            if session_id in self._busy:
                raise SessionBusy(session_id)
            self._busy.add(session_id)
            return rec

        return await self._serial(body())

    async def commit(self, record: SessionRecord) -> SessionRecord:
        sid = record.session_id

        async def body() -> SessionRecord:
            if sid not in self._busy:
                raise VersionConflict(f"session '{sid}' changed during the request: it held no lease")
            stored = replace(record, version=record.version + 1)
            self._hot.pop(sid, None)  # until the disk has the new record
            try:
                why = await self._disk(self._db_commit, encode(stored, self.ttl_s), record.version)
            finally:
                self._busy.discard(sid)
            if why:
                raise VersionConflict(f"session '{sid}' changed during the request: {why}")
            self._keep(stored)
            return stored

        return await self._serial(body())

    async def release(self, session_id: str) -> None:
        self._busy.discard(session_id)

    async def delete(self, session_id: str) -> None:
        async def body() -> None:
            await self._live(session_id)
            if session_id in self._busy:
                raise SessionBusy(session_id)
            self._hot.pop(session_id, None)
            await self._disk(self._db_delete, session_id)

        await self._serial(body())

    async def count(self) -> int:
        async def body() -> int:
            self._forget(await self._disk(self._db_sweep, self.clock(), frozenset(self._busy)))
            return self._rows

        return await self._serial(body())

    def cached(self, session_id: str) -> SessionRecord | None:
        hot = self._hot.get(session_id)
        return None if hot is None else hot[0]

    async def ping(self) -> None:
        self._trim()
        await self._disk(lambda: self._db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        """Close the file (leases are simply gone, as after a crash)."""
        async with self._lock:
            self._hot.clear()
            with contextlib.suppress(Unavailable):
                await self._disk(self._db.close)
        self._pool.shutdown(wait=True)
