"""The Redis session store: sessions shared by every replica behind a load balancer.

Keys (PREFIX defaults to ``gru:``):

- ``PREFIX s:{id}``      a hash: the record. ``fmt`` (format version), ``model``, ``hash`` (model
  hash), ``owner``, ``tokens_seen``, ``created``, ``last_used`` (repr floats, exact),
  ``version``, ``state`` and ``logits`` by gru_serve.state's codec with their shapes
  (``logits`` absent: None), ``checkpoints`` (sessions.pack_checkpoints; absent: none, so the
  field is an addition within format 1: older records read as sessions without turns).
  Written whole, in one Lua script, so no reader ever sees half a session. Its Redis expiry is
  the session TTL.
- ``PREFIX lease:{id}``  the lease of the request working on the session (SET NX PX, a random
  token): busy is busy on every replica. The holder renews it every third of its TTL; when the
  holder dies it runs out after at most ``lease_s`` and the session is free again.
- ``PREFIX gone:{id}``   a tombstone, ``expired|OWNER`` or ``evicted|OWNER``, written with every
  create and commit and living a day longer than the session: a missing session with a
  tombstone has expired (or was evicted), one without is unknown. Delete removes both.
- ``PREFIX pfx:{key}``   a prefix state (gru_serve.engine.prefix_cache): the state then
  logits after a zero-state prompt's first whole blocks, keyed by their hash chain; written by
  the replica that prefilled them, read by any on a local miss. No expiry, so Redis's
  ``volatile-*`` eviction never takes them and they never push sessions out: ``PREFIX pfx-lru``
  (a sorted set of their keys by last use, Redis clock) and ``PREFIX pfx-bytes`` (their bytes,
  each counted as its value plus PREFIX_OVERHEAD) bound them to ``prefix_bytes``, the least
  recently used evicted at each write; a write holds at most the first blocks the budget takes.
- ``PREFIX sessions``    a sorted set of ids scored by their expiry deadline (ms, Redis clock):
  the session count and, at ``max_sessions``, the least recently used idle session to evict.
  ``PREFIX sessions:{owner}`` the same for one owner's sessions (authentication on): at
  ``max_per_owner`` the owner's own least recently used idle session is evicted.
  The limit is best effort: replicas creating at the same instant may overshoot it briefly,
  and the scripts touch keys they do not declare, so this needs a single Redis (or a primary
  with replicas), not Redis Cluster.

The local tier (``local_cache`` > 0, the server's --session-cache): a replica keeps copies of
the sessions it read or wrote last. Reads and leases send the copy's (version, created), and
Redis answers ``same`` instead of the record when they are current, so a turn on the replica
that served the previous one moves a few bytes, not the state; Redis's version stays the
arbiter, so a stale copy is never used.

Every read-modify-write is one Lua script (gru_serve.stores.redis_scripts), so it is atomic. A
commit checks the version it leased (and that no other request holds the lease): of two
replicas that worked on one version, exactly one commits. Unreachable or slow Redis (socket
timeouts 1-1.5 s) raises Unavailable naming the store; redis-py reconnects on the next call, so
the store recovers by itself when Redis returns (scripts are reloaded when a restarted Redis
has lost them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gru_serve.ops.errors import (
    ResourceExhausted,
    SessionBusy,
    SessionExpired,
    SessionNotFound,
    Unavailable,
    VersionConflict,
    WrongModel,
)
from gru_serve.state import StateSpec, array_from_bytes, to_bytes
from gru_serve.stores.redis_scripts import SCRIPTS
from gru_serve.stores.sessions import (
    SessionRecord,
    SessionStore,
    StoreStats,
    pack_checkpoints,
    quota_full,
    unpack_checkpoints,
)

log = logging.getLogger(__name__)

FORMAT = b"1"
DAY_MS = 86_400_000
# Per prefix block, beside its value: its key, the string object and the LRU index's entry.
PREFIX_OVERHEAD = 320


def encode(rec: SessionRecord) -> list[bytes | str]:
    """The record as hash fields: metadata as text, arrays by gru_serve.state's codec."""
    spec = StateSpec.like(rec.state)
    fields: dict[str, bytes | str] = {
        "fmt": FORMAT,
        "model": rec.model,
        "hash": rec.model_hash,
        "owner": rec.owner,
        "tokens_seen": str(rec.tokens_seen),
        "created": repr(float(rec.created)),
        "last_used": repr(float(rec.last_used)),
        "version": str(rec.version),
        "state_shape": spec.describe(),
        "state": to_bytes(rec.state),
    }
    if rec.logits is not None:
        fields["logits_shape"] = ",".join(map(str, np.shape(rec.logits)))
        fields["logits"] = to_bytes(rec.logits)
    if rec.checkpoints:
        fields["checkpoints"] = pack_checkpoints(rec.checkpoints, spec)
    return [x for kv in fields.items() for x in kv]


def decode(session_id: str, flat: list[bytes]) -> SessionRecord:
    f = dict(zip(flat[::2], flat[1::2], strict=True))
    fmt = f.get(b"fmt", b"?")
    if fmt != FORMAT:
        raise WrongModel(
            f"session '{session_id}' is stored in format {fmt.decode(errors='replace')}; this server "
            f"reads format {FORMAT.decode()} (run one gru-serve version against a store)"
        )
    logits = None
    if b"logits" in f:
        dims = [int(d) for d in f[b"logits_shape"].decode().split(",") if d]
        logits = array_from_bytes(f[b"logits"], dims, "logits")
    spec = StateSpec.parse(f[b"state_shape"].decode())
    # Checkpoints share the record's shapes; one with logits implies a record with logits (text
    # seen stays seen: rewinding to before the first text drops every later checkpoint).
    vocab = 0 if logits is None else logits.shape[-1]
    checkpoints = unpack_checkpoints(f.get(b"checkpoints", b""), spec, vocab)
    return SessionRecord(
        session_id=session_id,
        model=f[b"model"].decode(),
        model_hash=f[b"hash"].decode(),
        owner=f[b"owner"].decode(),
        state=spec.from_bytes(f[b"state"]),
        logits=logits,
        tokens_seen=int(f[b"tokens_seen"]),
        created=float(f[b"created"]),
        last_used=float(f[b"last_used"]),
        version=int(f[b"version"]),
        checkpoints=checkpoints,
    )


def display_url(url: str) -> str:
    """The URL without its password or query, for messages and logs."""
    parts = urlsplit(url)
    base = url.partition("?")[0].partition("#")[0]  # not urlunsplit: it turns unix:///p into unix:/p
    if parts.password is None:
        return base
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return base.replace(parts.netloc, f"{user}:***@{netloc}", 1)


class RedisStore(SessionStore):
    """Sessions in Redis; see the module docstring for the layout and the guarantees.

    URL: ``redis://[:PASSWORD@]HOST:PORT/DB`` (or ``rediss://`` for TLS, or
    ``unix:///PATH?db=DB`` for a Unix socket), read by redis-py's own parser, with optional query
    parameters ``lease_s`` (lease TTL, default 3) and ``prefix`` (key prefix, default ``gru:``).
    """

    def __init__(
        self,
        url: str,
        ttl_s: float = 3600.0,
        max_sessions: int = 10_000,
        lease_s: float = 3.0,
        prefix: str = "gru:",
        timeout_s: float = 1.5,
        local_cache: int = 0,
        max_per_owner: int = 0,
        prefix_bytes: int = 64 * 2**20,
    ) -> None:
        """max_per_owner: sessions one (non-empty) owner keeps (0: no quota); prefix_bytes: the
        shared prefix tier's budget."""
        # redis-py's parser (every scheme it serves, unix:// included); the store's own query
        # parameters come out before the rest go to its connections.
        options = parse_url(url)
        lease_s = float(options.pop("lease_s", lease_s))
        prefix = str(options.pop("prefix", prefix))
        if lease_s <= 0 or ttl_s <= 0 or max_sessions < 1:
            raise ValueError("lease_s and session_ttl_s must be positive and max_sessions at least 1")
        self.url = display_url(url)
        self.ttl_s, self.max_sessions, self.lease_s, self.prefix = ttl_s, max_sessions, lease_s, prefix
        self.max_per_owner, self.prefix_bytes = max_per_owner, prefix_bytes
        self.stats = StoreStats()
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._gone_ms = self._ttl_ms + DAY_MS
        self._lease_ms = max(1, round(lease_s * 1000))
        defaults: dict[str, Any] = dict(
            socket_timeout=timeout_s,
            socket_connect_timeout=min(timeout_s, 1.0),
            # One immediate retry on a broken connection (e.g. Redis restarted since the pooled
            # connection was opened); never on a timeout, where the script may have run.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            client_name="gru-serve",
        )
        # The URL's options win, as with from_url.
        self._redis = aioredis.Redis.from_pool(aioredis.ConnectionPool(**{**defaults, **options}))
        self._scripts = {name: self._redis.register_script(src) for name, src in SCRIPTS.items()}
        self._held: dict[str, str] = {}  # session id -> lease token, for leases this process holds
        self._lost: set[str] = set()  # tokens whose lease ran out while held (logged once)
        self._renewer: asyncio.Task | None = None
        self._holder = f"{socket.gethostname()}:{os.getpid()}"
        # The local tier: copies of the sessions this replica read or wrote last, LRU. Redis
        # stays the arbiter: a copy is used only when Redis says its version is current.
        self._local: collections.OrderedDict[str, SessionRecord] = collections.OrderedDict()
        self._local_max = local_cache

    # -- plumbing --

    def _keys(self, session_id: str, *kinds: str) -> list[str]:
        p = self.prefix
        names = {
            "s": f"{p}s:{session_id}",
            "lease": f"{p}lease:{session_id}",
            "gone": f"{p}gone:{session_id}",
            "index": f"{p}sessions",
        }
        return [names[k] for k in kinds]

    async def _guard(self, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except RedisError as e:
            raise Unavailable(f"session store {self.url} unreachable: {e}") from e
        except OSError as e:  # socket errors redis-py did not wrap
            raise Unavailable(f"session store {self.url} unreachable: {e}") from e

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._guard(self._scripts[name](keys=keys, args=args))

    @staticmethod
    def _gone(session_id: str, tombstone: bytes) -> Exception:
        if not tombstone:
            return SessionNotFound(session_id)
        why, _, owner = tombstone.decode().partition("|")
        return SessionExpired(session_id, evicted=why == "evicted", owner=owner)

    def _tombstone(self, rec: SessionRecord) -> str:
        return f"expired|{rec.owner}"

    def cached(self, session_id: str) -> SessionRecord | None:
        return self._local.get(session_id)

    def _known(self, session_id: str) -> list[str]:
        """(version, created) of the local copy, as stored, or blanks."""
        rec = self._local.get(session_id)
        return ["", ""] if rec is None else [str(rec.version), repr(float(rec.created))]

    def _keep(self, rec: SessionRecord) -> SessionRecord:
        if self._local_max:
            self._local[rec.session_id] = rec
            self._local.move_to_end(rec.session_id)
            while len(self._local) > self._local_max:
                self._local.popitem(last=False)
        return rec

    def _record(self, session_id: str, reply: list) -> SessionRecord:
        """The session from an 'ok' (whole record) or 'same' (the local copy is current) reply."""
        self.stats.read_bytes += sum(len(x) for x in reply if isinstance(x, bytes))
        if reply[0] == b"same":
            self.stats.cache_hits += 1
            self._local.move_to_end(session_id)
            return self._local[session_id]
        self.stats.cache_misses += 1
        return self._keep(decode(session_id, reply[1:]))

    # -- the store --

    async def ping(self) -> None:
        await self._guard(self._redis.ping())

    async def create(self, record: SessionRecord) -> None:
        sid = record.session_id
        status, expired, evicted = await self._run(
            "create",
            self._keys(sid, "s", "gone", "index"),
            [
                self._ttl_ms,
                self._gone_ms,
                self.max_sessions,
                self.prefix,
                sid,
                self._tombstone(record),
                record.owner,
                self.max_per_owner,
                *encode(record),
            ],
        )
        self.stats.expirations += int(expired)
        self.stats.evictions += int(evicted)
        if status == b"owner full":
            raise quota_full(self.max_per_owner)
        if status == b"full":
            raise ResourceExhausted(
                f"sessions: all {self.max_sessions} sessions are busy; the limit is max_sessions"
            )
        self._keep(record)

    async def get(self, session_id: str) -> SessionRecord:
        reply = await self._run("get", self._keys(session_id, "s", "gone"), self._known(session_id))
        if reply[0] == b"gone":
            self._local.pop(session_id, None)
            raise self._gone(session_id, reply[1])
        return self._record(session_id, reply)

    async def acquire(self, session_id: str) -> SessionRecord:
        token = f"{self._holder}:{secrets.token_hex(8)}"
        reply = await self._run(
            "acquire",
            self._keys(session_id, "s", "lease", "gone", "index"),
            [token, self._lease_ms, self._ttl_ms, self._gone_ms, session_id, *self._known(session_id)],
        )
        if reply[0] == b"busy":
            raise SessionBusy(session_id)
        if reply[0] == b"gone":
            self._local.pop(session_id, None)
            raise self._gone(session_id, reply[1])
        self._held[session_id] = token
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_leases(), name="gru-serve-lease-renewal")
        try:
            return self._record(session_id, reply)
        except BaseException:
            await self.release(session_id)
            raise

    async def commit(self, record: SessionRecord) -> SessionRecord:
        sid = record.session_id
        token = self._held.get(sid)
        if token is None:
            raise VersionConflict(f"session '{sid}' changed during the request: this request held no lease")
        stored = replace(record, version=record.version + 1)
        reply = await self._run(  # Unavailable leaves the lease held, for release() to give back
            "commit",
            self._keys(sid, "s", "lease", "gone", "index"),
            [
                token,
                str(record.version),
                self._ttl_ms,
                self._gone_ms,
                sid,
                self._tombstone(record),
                *encode(stored),
            ],
        )
        self._held.pop(sid, None)
        if reply[0] != b"ok":
            self._local.pop(sid, None)
            raise VersionConflict(f"session '{sid}' changed during the request: {reply[1].decode()}")
        return self._keep(stored)

    async def release(self, session_id: str) -> None:
        """Give the lease back. Never raises for an unreachable store: the lease then simply runs
        out after lease_s, as if this process had died."""
        token = self._held.pop(session_id, None)
        if token is None:
            return
        try:
            await self._run(
                "release", self._keys(session_id, "s", "lease", "index"), [token, self._ttl_ms, session_id]
            )
        except Unavailable as e:
            log.warning(
                "session %s: lease not released (it runs out in %.1f s): %s", session_id, self.lease_s, e
            )

    async def delete(self, session_id: str) -> None:
        self._local.pop(session_id, None)
        reply = await self._run("delete", self._keys(session_id, "s", "lease", "gone", "index"), [session_id])
        if reply[0] == b"busy":
            raise SessionBusy(session_id)
        if reply[0] != b"ok":
            raise self._gone(session_id, reply[1])

    async def count(self) -> int:
        n, expired = await self._run("count", self._keys("", "index"), [])
        self.stats.expirations += int(expired)
        return int(n)

    # -- prefix states shared between replicas (gru_serve.engine.prefix_cache) --

    async def get_prefix_blocks(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        names = [f"{self.prefix}pfx:{k}" for k in keys]
        return await self._run("prefix_get", [f"{self.prefix}pfx-lru", *names], keys)

    async def put_prefix_blocks(self, blocks: dict[str, bytes]) -> None:
        if not blocks:
            return
        await self._run(
            "prefix_put",
            [f"{self.prefix}pfx-lru", f"{self.prefix}pfx-bytes"],
            [
                self.prefix_bytes,
                PREFIX_OVERHEAD,
                f"{self.prefix}pfx:",
                *(x for kv in blocks.items() for x in kv),
            ],
        )

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        for sid in list(self._held):
            await self.release(sid)
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()

    # -- leases --

    async def _renew_leases(self) -> None:
        """Keep this process's leases (and their sessions) alive while it works on them."""
        while self._held:
            await asyncio.sleep(self.lease_s / 3)
            for sid, token in list(self._held.items()):
                try:
                    ok = await self._run(
                        "renew",
                        self._keys(sid, "s", "lease", "index"),
                        [token, self._lease_ms, self._ttl_ms, sid],
                    )
                except Unavailable as e:
                    log.warning("session %s: lease not renewed: %s", sid, e)
                    continue
                if not ok and self._held.get(sid) == token and token not in self._lost:
                    # Kept in _held: the commit reports the conflict, the release is a no-op.
                    self._lost.add(token)
                    log.warning("session %s: lease lost; the request's commit will be refused", sid)
            self._lost &= set(self._held.values())
