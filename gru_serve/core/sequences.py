"""Triton-style stateful sequences over the session store (transport-free).

A Triton client names a sequence with a `sequence_id` (an unsigned integer or a string) and
marks its first and last requests with `sequence_start` / `sequence_end`; the server keeps the
model's state between the requests (implicit state). Here a sequence *is* a session of the
native API, in the same store, so it has the same lease, TTL, eviction and ownership rules:

- its session id is derived from (owner, model, kind and value of the sequence id), so two
  clients, two models, or the integer 7 and the string "7" never share a sequence, and a
  derived id ("seq-" + 32 hex digits) never equals a native one (22 URL-safe characters);
- a start on an existing sequence resets it to the zero state; a request without start for a
  sequence that does not exist is NOT_FOUND ("unknown" or "expired");
- a request commits the new state or leaves the sequence as it was; `sequence_end` commits and
  then deletes the session.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, replace

import numpy as np

from gru_serve.core.service import GenerationService
from gru_serve.engine.api import ModelRuntime
from gru_serve.ops.errors import InvalidArgument, NotFound, PermissionDenied, SessionExpired, SessionNotFound
from gru_serve.stores.sessions import SessionRecord

SEQUENCE_PREFIX = "seq-"
MAX_SEQUENCE_ID_CHARS = 256


@dataclass(frozen=True)
class Sequence:
    """A request's place in a sequence: its id (int or str), and whether it starts/ends it."""

    id: int | str
    start: bool = False
    end: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.id, bool) or not isinstance(self.id, int | str):
            raise InvalidArgument(f"sequence_id must be an unsigned integer or a string, got {self.id!r}")
        if isinstance(self.id, int) and not 0 < self.id < 1 << 64:
            raise InvalidArgument(f"sequence_id must be in [1, 2^64) (0 means no sequence), got {self.id}")
        if isinstance(self.id, str) and not 0 < len(self.id) <= MAX_SEQUENCE_ID_CHARS:
            raise InvalidArgument(
                f"sequence_id must have 1 to {MAX_SEQUENCE_ID_CHARS} characters, got {len(self.id)}"
            )

    def describe(self, model: str) -> str:
        return f"sequence_id {self.id!r} of model {model!r}"


@dataclass
class RunTimes:
    """When a request's model run began and ended (time.perf_counter_ns, one clock for every
    process of a host, taken by the scheduler), for the inference protocol's statistics."""

    start: int = 0
    end: int = 0


def sequence_session_id(owner: str, model: str, sequence_id: int | str) -> str:
    """The session that holds a sequence's state: private to its owner and model."""
    kind = "uint" if isinstance(sequence_id, int) else "string"
    key = json.dumps([owner, model, kind, str(sequence_id)])
    return SEQUENCE_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]


class Sequences:
    """Sequence inference on a GenerationService's models and session store."""

    def __init__(self, service: GenerationService) -> None:
        self.service = service

    async def _run(
        self, rt: ModelRuntime, ids: np.ndarray, state: np.ndarray, times: RunTimes | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The model over ids from state, through the engine's queue; `times` gets the run's
        start and end as the engine timed them."""
        done = await self.service.run_model(rt, ids, state)
        if times is not None:
            times.start, times.end = done.start_ns, done.end_ns
        return done.logits, done.state

    def check_ids(self, rt: ModelRuntime, ids: np.ndarray, name: str = "input_ids") -> None:
        """ids must be int64 [batch, seq], batch <= max_batch_size, 1 to max_prompt_tokens tokens
        in all (which also bounds the logits' size), and ids in the vocabulary."""
        s = self.service.settings
        if ids.dtype != np.int64 or ids.ndim != 2:
            raise InvalidArgument(f"{name} must be INT64 [batch, seq], got {ids.dtype} {list(ids.shape)}")
        batch, seq = ids.shape
        if not 1 <= batch <= s.max_batch_size:
            raise InvalidArgument(f"{name}: batch must be in [1, {s.max_batch_size}], got {batch}")
        if seq < 1:
            raise InvalidArgument(f"{name}: shape {list(ids.shape)} has no tokens; give at least 1")
        if ids.size > s.max_prompt_tokens:
            raise InvalidArgument(
                f"{name} has {ids.size} tokens; the limit is {s.max_prompt_tokens} (max_prompt_tokens)"
            )
        vocab = rt.metadata.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise InvalidArgument(f"{name}: token ids must be in [0, {vocab}), got {bad}")

    def _session_id(self, rt: ModelRuntime, seq: Sequence, owner: str) -> str:
        return sequence_session_id(owner, rt.name, seq.id)

    async def _acquire(self, rt: ModelRuntime, seq: Sequence, owner: str) -> SessionRecord:
        """Lease an existing sequence, with messages that speak of sequences, not sessions."""
        sid = self._session_id(rt, seq, owner)
        try:
            rec = await self.service.store.acquire(sid)
        except SessionNotFound as e:
            raise NotFound(
                f"{seq.describe(rt.name)} is unknown: its first request must set sequence_start=true"
            ) from e
        except SessionExpired as e:
            raise NotFound(f"{seq.describe(rt.name)}: {e}") from e
        try:
            if rec.owner != owner:  # cannot happen (the id hashes the owner); kept as a guard
                raise PermissionDenied(f"{seq.describe(rt.name)} belongs to another client")
            self.service.sessions.runtime_of(rec, rt.name)
        except Exception:
            await self.service.store.release(sid)
            raise
        return rec

    async def _lease(self, rt: ModelRuntime, seq: Sequence, owner: str) -> tuple[SessionRecord, bool]:
        """The leased record to run on and whether it was created for this request. With
        sequence_start it is a fresh zero state (replacing an existing sequence on commit)."""
        if not seq.start:
            return await self._acquire(rt, seq, owner), False
        store = self.service.store
        sid = self._session_id(rt, seq, owner)
        fresh = self.service.sessions.fresh(rt, owner, sid)
        try:
            old = await store.acquire(sid)
        except (SessionNotFound, SessionExpired):
            await store.create(fresh)
            return await store.acquire(sid), True
        return replace(fresh, version=old.version), False

    async def reset(self, rt: ModelRuntime, seq: Sequence, owner: str) -> str:
        """Make the sequence exist with a zero state (sequence_start); returns its session id."""
        rec, created = await self._lease(rt, seq, owner)
        if created:
            await self.service.store.release(rec.session_id)
        else:
            await self.service.store.commit(rec)
        return rec.session_id

    async def session_for(self, rt: ModelRuntime, seq: Sequence, owner: str) -> str:
        """The session id of a sequence to continue: reset on start, else it must exist."""
        if seq.start:
            return await self.reset(rt, seq, owner)
        rec = await self._acquire(rt, seq, owner)
        await self.service.store.release(rec.session_id)
        return rec.session_id

    async def end(self, session_id: str) -> None:
        """sequence_end: the session goes (already gone is fine)."""
        with contextlib.suppress(SessionNotFound, SessionExpired):
            await self.service.store.delete(session_id)

    async def infer(
        self,
        model: str,
        ids: np.ndarray,
        seq: Sequence | None = None,
        owner: str = "",
        times: RunTimes | None = None,
    ) -> np.ndarray:
        """Logits [batch, seq, vocab] for `ids` [batch, seq]. Without a sequence the request is
        stateless, from a zero state; with one (batch 1) it runs from the sequence's state and
        advances it. `times` gets the model run's start and end."""
        rt = self.service.runtime(model)
        self.check_ids(rt, ids)
        if seq is None:
            return (await self._run(rt, ids, rt.zero_state(ids.shape[0]), times))[0]
        if ids.shape[0] != 1:
            raise InvalidArgument(f"input_ids: a sequence request has batch 1, got {ids.shape[0]}")
        store = self.service.store
        rec, created = await self._lease(rt, seq, owner)
        leased = True
        try:
            logits, state = await self._run(rt, ids, rec.state[None], times)
            await store.commit(rec.advanced(state[0], logits[0, -1], ids.shape[1], self.service.clock()))
            leased = False
        finally:
            if leased:
                await store.release(rec.session_id)
                if created:
                    await self.end(rec.session_id)
        if seq.end:
            await self.end(rec.session_id)
        return logits
