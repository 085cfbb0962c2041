"""Session records and the store interface, with the in-memory store.

Semantics (docs/architecture.md): a request leases its session (one at a time; a second gets
SessionBusy at once), works on a copy, and either commits it (a version check guards the
write) or releases the lease leaving the session untouched. Idle sessions expire after a TTL
("expired", not "unknown"); at capacity the least recently used idle session is evicted. An
owner (a token) at its own quota (``max_per_owner``) evicts its own least recently used idle
session instead, so one token never pushes out another's; the quota counts no anonymous ('')
sessions (authentication off).
"""

from __future__ import annotations

import abc
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from gru_serve.ops.errors import (
    ResourceExhausted,
    SessionBusy,
    SessionExpired,
    SessionNotFound,
    VersionConflict,
)
from gru_serve.state import DTYPE, State, StateSizeError, StateSpec, logits_from_bytes, tensors, to_bytes

Clock = Callable[[], float]


def quota_full(limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"sessions: all {limit} sessions of this token are busy; the limit is max_sessions_per_owner"
    )


def new_session_id() -> str:
    """128 random bits, URL-safe: unguessable."""
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class Checkpoint:
    """The session as a committed request left it: what a rewind returns to."""

    turn: int  # 0: the session's creation; each committed request adds one
    tokens_seen: int
    state: State
    logits: np.ndarray | None
    committed: float  # wall-clock time


_CHECKPOINT_HEAD = struct.Struct("<IQd?")  # turn, tokens_seen, committed, has logits


def pack_checkpoints(checkpoints: tuple[Checkpoint, ...], spec: StateSpec) -> bytes:
    """Checkpoints as bytes for a store: per checkpoint a fixed header, then the state and logits
    (gru_serve.state's codec). Shapes are the record's own (every checkpoint of a session shares
    them): a checkpoint of another spec is refused here, not misread later."""
    out = bytearray()
    for c in checkpoints:
        if (own := tuple(a.shape for a in tensors(c.state))) != spec.shapes:
            raise StateSizeError(f"checkpoint {c.turn}: state of shapes {own}, the record's {spec.shapes}")
        out += _CHECKPOINT_HEAD.pack(c.turn, c.tokens_seen, c.committed, c.logits is not None)
        out += to_bytes(c.state)
        if c.logits is not None:
            out += to_bytes(c.logits)
    return bytes(out)


def unpack_checkpoints(data: bytes, spec: StateSpec, vocab: int) -> tuple[Checkpoint, ...]:
    out, at, view = [], 0, memoryview(data)
    logits_bytes = DTYPE.itemsize * vocab
    while at < len(data):
        turn, seen, committed, has_logits = _CHECKPOINT_HEAD.unpack_from(data, at)
        at += _CHECKPOINT_HEAD.size
        state = spec.from_bytes(view[at : at + spec.nbytes])
        at += spec.nbytes
        logits = None
        if has_logits:
            logits = logits_from_bytes(view[at : at + logits_bytes], vocab)
            at += logits_bytes
        out.append(Checkpoint(turn, seen, state, logits, committed))
    return tuple(out)


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    model: str
    model_hash: str
    owner: str
    state: State  # after every token seen (gru_serve.state)
    logits: np.ndarray | None  # [vocab] float32: the next token's distribution; None before any text
    tokens_seen: int
    created: float
    last_used: float
    version: int = 0
    checkpoints: tuple[Checkpoint, ...] = ()  # oldest first, at most max_checkpoints

    @property
    def turn(self) -> int:
        return self.checkpoints[-1].turn if self.checkpoints else 0

    def checkpointed(self, now: float, keep: int) -> SessionRecord:
        """The record with a checkpoint of its present state as the next turn (turn 0 for a
        new session), keeping the newest `keep` (0: none)."""
        turn = self.turn + 1 if self.checkpoints else 0
        mark = Checkpoint(turn, self.tokens_seen, self.state, self.logits, now)
        return replace(self, checkpoints=(*self.checkpoints, mark)[-keep:] if keep else ())

    def advanced(
        self,
        state: State,
        logits: np.ndarray | None,
        consumed: int,
        now: float,
        keep: int | None = None,
    ) -> SessionRecord:
        """After a request that consumed `consumed` tokens: the new state and, with `keep`, a
        checkpoint of it as the next turn (the newest `keep` kept). Without `keep` the turns
        stay as they are."""
        new = replace(
            self, state=state, logits=logits, tokens_seen=self.tokens_seen + consumed, last_used=now
        )
        return new if keep is None else new.checkpointed(now, keep)


@dataclass
class StoreStats:
    evictions: int = 0
    expirations: int = 0
    read_bytes: int = 0  # bytes of session data read from a remote store
    cache_hits: int = 0  # reads a replica's local copy answered (the remote sent only a version)
    cache_misses: int = 0


class SessionStore(abc.ABC):
    """Where sessions live. The memory store is the default; a Redis store shares sessions
    between replicas."""

    ttl_s: float
    stats: StoreStats

    @abc.abstractmethod
    async def create(self, record: SessionRecord) -> None: ...

    @abc.abstractmethod
    async def get(self, session_id: str) -> SessionRecord:
        """The committed record; SessionNotFound or SessionExpired."""

    @abc.abstractmethod
    async def acquire(self, session_id: str) -> SessionRecord:
        """Lease the session for one request; SessionBusy if another request holds it."""

    @abc.abstractmethod
    async def commit(self, record: SessionRecord) -> SessionRecord:
        """Store a leased session's new record (its version must be the leased one) and
        release the lease; returns the stored record."""

    @abc.abstractmethod
    async def release(self, session_id: str) -> None:
        """Give the lease back, leaving the session as it was."""

    @abc.abstractmethod
    async def delete(self, session_id: str) -> None: ...

    @abc.abstractmethod
    async def count(self) -> int: ...

    async def close(self) -> None:
        return None

    def cached(self, session_id: str) -> SessionRecord | None:
        """A copy of the session this process holds without asking the store, if any (it may be
        stale: only for decisions the store's own answer confirms)."""
        return None

    async def ping(self) -> None:
        """Raise gru_serve.ops.errors.Unavailable when the store cannot serve (health follows it)."""
        return None

    def expires(self, record: SessionRecord) -> float:
        return record.last_used + self.ttl_s


class MemoryStore(SessionStore):
    def __init__(
        self,
        ttl_s: float = 3600.0,
        max_sessions: int = 10_000,
        clock: Clock = time.time,
        tombstones: int = 100_000,
        max_per_owner: int = 0,
    ) -> None:
        """max_per_owner: sessions one (non-empty) owner keeps (0: no quota)."""
        self.ttl_s, self.max_sessions, self.clock = ttl_s, max_sessions, clock
        self.max_per_owner = max_per_owner
        self.stats = StoreStats()
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()  # LRU order
        self._owned: dict[str, OrderedDict[str, None]] = {}  # owner -> its session ids, LRU order
        self._busy: set[str] = set()
        self._gone: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (expired|evicted, owner)
        self._max_gone = tombstones

    def _bury(self, session_id: str, why: str) -> None:
        rec = self._records.pop(session_id, None)
        if rec is not None:
            self._disown(rec)
        self._gone[session_id] = (why, rec.owner if rec else "")
        while len(self._gone) > self._max_gone:
            self._gone.popitem(last=False)

    def _live(self, session_id: str) -> SessionRecord:
        rec = self._records.get(session_id)
        if rec is None:
            if session_id in self._gone:
                why, owner = self._gone[session_id]
                raise SessionExpired(session_id, evicted=why == "evicted", owner=owner)
            raise SessionNotFound(session_id)
        if session_id not in self._busy and self.clock() >= self.expires(rec):
            self._bury(session_id, "expired")
            self.stats.expirations += 1
            raise SessionExpired(session_id, owner=rec.owner)
        return rec

    def _sweep(self) -> None:
        now = self.clock()
        expired = []
        for sid, rec in self._records.items():  # oldest first: stops at the first live one
            if now < self.expires(rec):
                break
            if sid not in self._busy:
                expired.append(sid)
        for sid in expired:
            self._bury(sid, "expired")
            self.stats.expirations += 1

    def _disown(self, rec: SessionRecord) -> None:
        own = self._owned.get(rec.owner)
        if own is not None:
            own.pop(rec.session_id, None)
            if not own:
                del self._owned[rec.owner]

    def _used(self, sid: str) -> None:
        """LRU order, in the whole store and among its owner's sessions."""
        self._records.move_to_end(sid)
        own = self._owned.get(self._records[sid].owner)
        if own is not None and sid in own:
            own.move_to_end(sid)

    def _make_room_for(self, owner: str) -> None:
        """An owner at its quota gives up its own least recently used idle session."""
        own = self._owned.get(owner)
        if not (self.max_per_owner and owner and own is not None):
            return
        while len(own) >= self.max_per_owner:
            victim = next((sid for sid in own if sid not in self._busy), None)
            if victim is None:
                raise quota_full(self.max_per_owner)
            self._bury(victim, "evicted")
            self.stats.evictions += 1

    async def create(self, record: SessionRecord) -> None:
        self._sweep()
        self._make_room_for(record.owner)
        while len(self._records) >= self.max_sessions:
            victim = next((sid for sid in self._records if sid not in self._busy), None)
            if victim is None:
                raise ResourceExhausted(
                    f"sessions: all {self.max_sessions} sessions are busy; the limit is max_sessions"
                )
            self._bury(victim, "evicted")
            self.stats.evictions += 1
        self._records[record.session_id] = record
        if record.owner:
            self._owned.setdefault(record.owner, OrderedDict())[record.session_id] = None

    async def get(self, session_id: str) -> SessionRecord:
        return self._live(session_id)

    async def acquire(self, session_id: str) -> SessionRecord:
        rec = self._live(session_id)
        if session_id in self._busy:
            raise SessionBusy(session_id)
        self._busy.add(session_id)
        self._used(session_id)
        return rec

    async def commit(self, record: SessionRecord) -> SessionRecord:
        sid = record.session_id
        current = self._records.get(sid)
        if current is None or sid not in self._busy or current.version != record.version:
            self._busy.discard(sid)
            raise VersionConflict(f"session '{sid}' changed or vanished during the request")
        stored = replace(record, version=record.version + 1)
        self._records[sid] = stored
        self._used(sid)
        self._busy.discard(sid)
        return stored

    async def release(self, session_id: str) -> None:
        self._busy.discard(session_id)

    async def delete(self, session_id: str) -> None:
        self._live(session_id)
        if session_id in self._busy:
            raise SessionBusy(session_id)
        self._disown(self._records.pop(session_id))

    async def count(self) -> int:
        return len(self._records)
