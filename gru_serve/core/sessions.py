"""Session operations over the store: ownership, fresh states, create, get, delete, fork,
rewind, export and import, and snapshots sealed and opened."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from gru_serve.core.jobs import Jobs
from gru_serve.core.limits import encode
from gru_serve.core.models import ModelSet
from gru_serve.core.snapshots import Snapshot, load_keys, open_, require_keys, seal
from gru_serve.engine.api import ModelRuntime
from gru_serve.ops.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SessionExpired,
    SessionNotFound,
    WrongModel,
)
from gru_serve.ops.settings import Settings
from gru_serve.outputs import DoneEvent
from gru_serve.sampling import SamplingParams
from gru_serve.stores.sessions import SessionRecord, SessionStore, new_session_id

MAX_SESSION_ID_CHARS = 128


@dataclass(frozen=True)
class TurnInfo:
    turn: int
    tokens_seen: int
    committed: float


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    model: str
    tokens_seen: int
    created: float
    last_used: float
    expires: float
    turns: tuple[TurnInfo, ...] = ()  # the checkpoints a rewind can return to, oldest first


class Sessions:
    def __init__(
        self,
        store: SessionStore,
        models: ModelSet,
        jobs: Jobs,
        settings: Settings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.models = models
        self.jobs = jobs
        self.settings = settings
        self.clock = clock
        self.snapshot_keys = load_keys(settings)

    # -- records --

    def info(self, rec: SessionRecord) -> SessionInfo:
        turns = tuple(TurnInfo(c.turn, c.tokens_seen, c.committed) for c in rec.checkpoints)
        expires = self.store.expires(rec)
        return SessionInfo(
            rec.session_id, rec.model, rec.tokens_seen, rec.created, rec.last_used, expires, turns
        )

    async def owned(self, session_id: str, owner: str, lease: bool) -> SessionRecord:
        """The caller's session, leased if asked. Ownership is checked before the lease, so a
        stranger never blocks the owner; with authentication on, an unknown session and someone
        else's look the same, so a token learns nothing about sessions it does not own."""
        if len(session_id) > MAX_SESSION_ID_CHARS or not session_id.isprintable():
            raise SessionNotFound(session_id[:MAX_SESSION_ID_CHARS].encode("unicode_escape").decode())
        not_yours = PermissionDenied(f"session '{session_id}' is not available to this token")
        known = self.store.cached(session_id) if lease else None
        if known is not None and known.owner == owner:
            # This replica's copy says the caller owns it (a session's owner never changes):
            # lease at once, one round trip to a shared store instead of two.
            rec = await self.store.acquire(session_id)
            if rec.owner == owner:
                return rec
            await self.store.release(session_id)
            raise not_yours
        try:
            rec = await self.store.get(session_id)
        except NotFound as e:
            if owner and not (isinstance(e, SessionExpired) and e.owner == owner):
                raise not_yours from None
            raise
        if rec.owner != owner:
            raise not_yours
        return await self.store.acquire(session_id) if lease else rec

    def runtime_of(self, rec: SessionRecord, model: str) -> ModelRuntime:
        """The runtime that made the session (`model`, where given, must name it)."""
        if model and model != rec.model:
            raise WrongModel(f"session '{rec.session_id}' was made by model {rec.model!r}, not {model!r}")
        rt = self.models.runtimes.get(rec.model)
        if rt is None:
            raise FailedPrecondition(
                f"session '{rec.session_id}' was made by model {rec.model!r}, which is not loaded"
            )
        if rt.model_hash != rec.model_hash:
            raise WrongModel(
                f"session '{rec.session_id}' was made by another version of model "
                f"{rec.model!r} (hash {rec.model_hash[:12]})"
            )
        return rt

    def fresh(self, rt: ModelRuntime, owner: str, session_id: str = "") -> SessionRecord:
        now = self.clock()
        return SessionRecord(
            session_id, rt.name, rt.model_hash, owner, np.zeros(rt.state_shape, np.float32), None, 0, now, now
        )

    async def start_state(
        self, session_id: str, snapshot: bytes, model: str, owner: str
    ) -> tuple[SessionRecord, ModelRuntime]:
        """Where a request starts: its session (leased: the caller commits or releases it), a
        snapshot (stateless: nothing leased), or a fresh state."""
        if session_id:
            rec = await self.owned(session_id, owner, lease=True)
            try:
                return rec, self.runtime_of(rec, model)
            except BaseException:
                await self.store.release(session_id)
                raise
        if snapshot:
            rec = self.unseal(snapshot, model, owner)
            return rec, self.models.runtimes[rec.model]
        rt = self.models.runtime(model)
        return self.fresh(rt, owner), rt

    def seal(self, rec: SessionRecord) -> bytes:
        snap = Snapshot(
            rec.model, rec.model_hash, rec.tokens_seen, rec.state, rec.logits, rec.created, owner=rec.owner
        )
        return seal(snap, self.snapshot_keys, self.clock())

    def unseal(self, blob: bytes, model: str, owner: str, session_id: str = "") -> SessionRecord:
        """The record in a snapshot, for the served model it names (by hash: a copy of a model
        served under another name is the same model), if it is young enough and (where snapshots
        are bound to their exporter) the caller's."""
        s = self.settings
        bound = owner if s.snapshot_bind_owner else None
        snap = open_(blob, self.snapshot_keys, self.clock(), s.snapshot_max_age_s, bound)
        if model:
            candidates = [self.models.runtime(model)]
        else:
            candidates = sorted(self.models.runtimes.values(), key=lambda r: r.name != snap.model)
        rt = next((r for r in candidates if r.model_hash == snap.model_hash), None)
        if rt is None:
            served = ", ".join(f"{r.name!r} (hash {r.model_hash[:12]})" for r in candidates)
            raise WrongModel(
                f"snapshot: made by model {snap.model!r} (hash {snap.model_hash[:12]}), not by {served}"
            )
        now = self.clock()
        state, logits = snap.state, snap.logits
        return SessionRecord(
            session_id, rt.name, rt.model_hash, owner, state, logits, snap.tokens_seen, snap.created, now
        )

    # -- the sessions API --

    async def create(self, text: str = "", model: str = "", owner: str = "") -> SessionInfo:
        rt = self.models.runtime(model)
        ids = encode(self.settings, rt, text, "text")
        rec = self.fresh(rt, owner, new_session_id())
        if ids:
            with self.models.using(rt):
                async for ev in self.jobs.events(rt, rec, ids, 0, SamplingParams(), False):  # a prefill only
                    if isinstance(ev, DoneEvent):
                        rec = rec.advanced(ev.state, ev.logits, len(ids), self.clock())
        rec = rec.checkpointed(self.clock(), self.settings.max_checkpoints)  # turn 0: as created
        await self.store.create(rec)
        return self.info(rec)

    async def get(self, session_id: str, owner: str = "") -> SessionInfo:
        return self.info(await self.owned(session_id, owner, lease=False))

    async def delete(self, session_id: str, owner: str = "") -> None:
        await self.owned(session_id, owner, lease=False)
        await self.store.delete(session_id)

    async def fork(self, session_id: str, owner: str = "") -> SessionInfo:
        src = await self.owned(session_id, owner, lease=False)
        now = self.clock()
        rec = SessionRecord(
            new_session_id(),
            src.model,
            src.model_hash,
            owner,
            src.state.copy(),
            None if src.logits is None else src.logits.copy(),
            src.tokens_seen,
            now,
            now,
        )
        # A fork's history starts at the fork: the source's present state is its turn 0.
        rec = rec.checkpointed(now, self.settings.max_checkpoints)
        await self.store.create(rec)
        return self.info(rec)

    async def rewind(self, session_id: str, turn: int, owner: str = "") -> SessionInfo:
        """Return the session to the checkpoint of `turn` (nothing is run again). The turns after
        it are forgotten, so the next commit is turn + 1, and the same seed draws the same
        tokens as the first time (sampling is seeded by position, which the checkpoint keeps)."""
        rec = await self.owned(session_id, owner, lease=True)
        leased = session_id
        try:
            kept = rec.checkpoints
            at = next((i for i, c in enumerate(kept) if c.turn == turn), None)
            if at is None:
                has = f"turns {kept[0].turn}..{kept[-1].turn}" if kept else "no turns"
                raise InvalidArgument(f"turn: session '{session_id}' keeps {has}, not turn {turn}")
            mark = kept[at]
            rec = await self.store.commit(
                replace(
                    rec,
                    state=mark.state,
                    logits=mark.logits,
                    tokens_seen=mark.tokens_seen,
                    last_used=self.clock(),
                    checkpoints=kept[: at + 1],
                )
            )
            leased = ""
        finally:
            if leased:
                await self.store.release(leased)
        return self.info(rec)

    async def export(self, session_id: str, owner: str = "") -> tuple[bytes, SessionInfo]:
        """A signed snapshot of the session as last committed, and the session."""
        require_keys(self.snapshot_keys)  # refused before the session is looked at
        rec = await self.owned(session_id, owner, lease=False)
        return self.seal(rec), self.info(rec)

    async def import_(self, blob: bytes, owner: str = "") -> SessionInfo:
        """A new session, the caller's, from a snapshot signed with one of this server's keys."""
        rec = self.unseal(blob, "", owner, new_session_id())
        # Like a fork: the imported state is the new session's turn 0.
        rec = rec.checkpointed(self.clock(), self.settings.max_checkpoints)
        await self.store.create(rec)
        return self.info(rec)
