"""The transport-free generation core: requests in, token events out.

It owns the models' schedulers and the session store, checks every field, and keeps the
session semantics of docs/architecture.md (lease, transactional commit, TTL, ownership). It knows
nothing of gRPC; gru_serve.grpc turns it into services.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from gru_serve.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SessionExpired,
    SessionNotFound,
    WrongModel,
)
from gru_serve.metrics import Metrics
from gru_serve.runtime import ModelRuntime
from gru_serve.sampling import SamplingParams
from gru_serve.scheduler import DoneEvent, FailedEvent, Job, Scheduler, Tokens
from gru_serve.scoring import perplexity, stream_logprobs
from gru_serve.sessions import SessionRecord, SessionStore, new_session_id
from gru_serve.settings import Settings

log = logging.getLogger(__name__)

MAX_SESSION_ID_CHARS = 128


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    model: str
    tokens_seen: int
    created: float
    last_used: float
    expires: float


@dataclass(frozen=True)
class GenerateRequest:
    session_id: str = ""
    prompt: str = ""
    max_new_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_logprobs: bool = False
    model: str = ""


@dataclass(frozen=True)
class Finished:
    reason: str  # length | stop | cancelled
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float
    total_time_s: float
    normalized_prompt: str
    session_id: str
    tokens_seen: int
    stop: str
    seed: int


@dataclass
class Progress:
    """What a generation has done so far, kept up to date by GenerationService.generate, so
    that a front end that cancels a request (a Converse turn) can still report its counts."""

    session_id: str = ""
    seed: int = 0
    started: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    normalized_prompt: str = ""
    generated_tokens: int = 0
    first_token_at: float | None = None
    tokens_seen: int = 0  # the session's count before the request: a cancel leaves it so

    def cancelled(self) -> Finished:
        now = time.perf_counter()
        ttft = self.first_token_at - self.started if self.first_token_at is not None else 0.0
        return Finished(
            "cancelled",
            self.prompt_tokens,
            self.generated_tokens,
            ttft,
            now - self.started,
            self.normalized_prompt,
            self.session_id,
            self.tokens_seen,
            "",
            self.seed,
        )


@dataclass(frozen=True)
class ScoreResult:
    perplexity: float
    token_ids: list[int]
    token_texts: list[str]
    logprobs: list[float]
    normalized_text: str
    tokens_seen: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    vocab: tuple[str, ...]
    hidden_size: int
    num_layers: int
    model_hash: str
    provider: str
    perplexity: dict[str, float]


class GenerationService:
    def __init__(
        self,
        runtimes: dict[str, ModelRuntime],
        store: SessionStore,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        if not runtimes:
            raise ValueError("at least one model is needed")
        if any(name != rt.name for name, rt in runtimes.items()):
            raise ValueError("runtimes must be keyed by their names")
        self.runtimes = runtimes
        self.default_model = next(iter(runtimes))
        self.store = store
        self.settings = settings
        self.clock = clock
        self.schedulers = {
            name: Scheduler(
                rt,
                settings.max_batch_size,
                settings.max_queue,
                self._io_binding(rt),
                fused_tokens=settings.fused_tokens,
                round_budget_s=settings.round_budget_ms / 1000,
            )
            for name, rt in runtimes.items()
        }
        self.active_streams = 0
        self.streams_by_owner: collections.Counter[str] = collections.Counter()
        self.metrics = metrics or Metrics()

    def start(self) -> None:
        for s in self.schedulers.values():
            s.start()

    def stop(self) -> None:
        for s in self.schedulers.values():
            s.stop()

    # -- helpers --

    def _io_binding(self, rt: ModelRuntime) -> bool:
        mode = self.settings.io_binding
        return mode == "on" or (mode == "auto" and rt.device == "cuda")

    def runtime(self, model: str) -> ModelRuntime:
        name = model or self.default_model
        rt = self.runtimes.get(name)
        if rt is None:
            raise InvalidArgument(
                f"model: unknown model {name!r}; this server serves {', '.join(self.runtimes)}"
            )
        return rt

    def _check_session_id(self, session_id: str) -> None:
        if len(session_id) > MAX_SESSION_ID_CHARS or not session_id.isprintable():
            raise SessionNotFound(session_id[:MAX_SESSION_ID_CHARS].encode("unicode_escape").decode())

    def _encode(self, rt: ModelRuntime, text: str, name: str) -> list[int]:
        limit = self.settings.max_prompt_chars
        if len(text) > limit:
            raise InvalidArgument(
                f"{name} has {len(text)} characters; the limit is {limit} (max_prompt_chars)"
            )
        return rt.vocab.encode(text)

    def _info(self, rec: SessionRecord) -> SessionInfo:
        return SessionInfo(
            rec.session_id, rec.model, rec.tokens_seen, rec.created, rec.last_used, self.store.expires(rec)
        )

    async def _owned(self, session_id: str, owner: str, lease: bool) -> SessionRecord:
        """The caller's session, leased if asked. Ownership is checked before the lease, so a
        stranger never blocks the owner; with authentication on, an unknown session and someone
        else's look the same, so a token learns nothing about sessions it does not own."""
        self._check_session_id(session_id)
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

    def _session_runtime(self, rec: SessionRecord, model: str) -> ModelRuntime:
        if model and model != rec.model:
            raise WrongModel(f"session '{rec.session_id}' was made by model {rec.model!r}, not {model!r}")
        rt = self.runtime(rec.model)
        if rt.model_hash != rec.model_hash:
            raise WrongModel(
                f"session '{rec.session_id}' was made by another version of model "
                f"{rec.model!r} (hash {rec.model_hash[:12]})"
            )
        return rt

    def _fresh(self, rt: ModelRuntime, owner: str, session_id: str = "") -> SessionRecord:
        now = self.clock()
        return SessionRecord(
            session_id, rt.name, rt.model_hash, owner, np.zeros(rt.state_shape, np.float32), None, 0, now, now
        )

    # -- sessions --

    async def create_session(self, text: str = "", model: str = "", owner: str = "") -> SessionInfo:
        rt = self.runtime(model)
        ids = self._encode(rt, text, "text")
        rec = self._fresh(rt, owner, new_session_id())
        if ids:
            async for ev in self._events(rt, rec, ids, 0, SamplingParams(), False):  # a prefill only
                if isinstance(ev, DoneEvent):
                    rec = rec.advanced(ev.state, ev.logits, len(ids), self.clock())
        await self.store.create(rec)
        return self._info(rec)

    async def get_session(self, session_id: str, owner: str = "") -> SessionInfo:
        return self._info(await self._owned(session_id, owner, lease=False))

    async def delete_session(self, session_id: str, owner: str = "") -> None:
        await self._owned(session_id, owner, lease=False)
        await self.store.delete(session_id)

    async def fork_session(self, session_id: str, owner: str = "") -> SessionInfo:
        src = await self._owned(session_id, owner, lease=False)
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
        await self.store.create(rec)
        return self._info(rec)

    # -- generation --

    async def _events(
        self,
        rt: ModelRuntime,
        rec: SessionRecord,
        ids: list[int],
        max_new: int,
        params: SamplingParams,
        logprobs: bool,
    ) -> AsyncIterator[Tokens | DoneEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(ev: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        job = Job(
            np.asarray(ids, dtype=np.int64),
            rec.state.copy(),
            rec.logits,
            max_new,
            params,
            rec.tokens_seen + len(ids),
            logprobs,
            emit,
        )
        self.schedulers[rt.name].submit(job)
        try:
            ev = await queue.get()
            while True:
                if isinstance(ev, FailedEvent):
                    raise ev.error
                if isinstance(ev, DoneEvent):
                    yield ev
                    return
                # Token packing: the chunks already queued go out together, so a slow reader
                # gets more tokens per message while the first is never held back.
                tokens, ev = ev, None
                while ev is None and not queue.empty():
                    more = queue.get_nowait()
                    if isinstance(more, Tokens):
                        tokens.extend(more)
                    else:
                        ev = more
                yield tokens
                if ev is None:
                    ev = await queue.get()
        finally:
            job.cancel()

    async def generate(
        self, req: GenerateRequest, owner: str = "", progress: Progress | None = None
    ) -> AsyncIterator[Tokens | Finished]:
        """The tokens of a request, in chunks of those ready together, then Finished."""
        p = progress or Progress()
        p.session_id, p.seed = req.session_id, req.sampling.seed
        t0 = p.started
        s = self.settings
        max_new = s.default_new_tokens if req.max_new_tokens is None else req.max_new_tokens
        if not 0 <= max_new <= s.max_new_tokens:
            raise InvalidArgument(f"max_new_tokens must be in [0, {s.max_new_tokens}], got {max_new}")
        if self.active_streams >= s.max_streams:
            raise ResourceExhausted(f"too many concurrent streams (the limit is max_streams={s.max_streams})")
        if owner and self.streams_by_owner[owner] >= s.max_streams_per_token:
            raise ResourceExhausted(
                f"too many concurrent streams for this token (the limit is "
                f"max_streams_per_token={s.max_streams_per_token})"
            )
        self.active_streams += 1
        self.streams_by_owner[owner] += 1
        leased = ""
        last_sent: float | None = None
        try:
            if req.session_id:
                rec = await self._owned(req.session_id, owner, lease=True)
                leased = req.session_id
                rt = self._session_runtime(rec, req.model)
            else:
                rt = self.runtime(req.model)
                rec = self._fresh(rt, owner)
            ids = self._encode(rt, req.prompt, "prompt")
            p.prompt_tokens, p.normalized_prompt = len(ids), rt.vocab.decode(ids)
            p.tokens_seen = rec.tokens_seen
            if not ids and rec.logits is None and max_new > 0:
                raise InvalidArgument(
                    "prompt is empty and the session has seen no text yet: "
                    "give a prompt of at least 1 character"
                )
            async for ev in self._events(rt, rec, ids, max_new, req.sampling, req.return_logprobs):
                if not isinstance(ev, DoneEvent):
                    now = time.perf_counter()
                    gap = None if last_sent is None else now - last_sent
                    if gap is None:
                        self.metrics.observe_first_token(rt.name, now - t0)
                        p.first_token_at = now
                    self.metrics.observe_tokens(rt.name, len(ev), gap)
                    p.generated_tokens += len(ev)
                    last_sent = now
                    yield ev
                    continue
                new = rec.advanced(ev.state, ev.logits, len(ids) + ev.generated, self.clock())
                if leased:
                    new = await self.store.commit(new)
                    leased = ""
                ttft = (ev.first_token_at - t0) if ev.first_token_at else 0.0
                yield Finished(
                    ev.reason,
                    len(ids),
                    ev.generated,
                    ttft,
                    time.perf_counter() - t0,
                    p.normalized_prompt,
                    req.session_id,
                    new.tokens_seen,
                    ev.stop,
                    req.sampling.seed,
                )
        finally:
            self.active_streams -= 1
            self.streams_by_owner[owner] -= 1
            if not self.streams_by_owner[owner]:
                del self.streams_by_owner[owner]
            if leased:
                await self.store.release(leased)

    # -- scoring and info --

    async def score(
        self, text: str, session_id: str = "", commit: bool = False, model: str = "", owner: str = ""
    ) -> ScoreResult:
        leased = ""
        try:
            if session_id:
                rec = await self._owned(session_id, owner, lease=commit)
                leased = session_id if commit else ""
                rt = self._session_runtime(rec, model)
            else:
                if commit:
                    raise InvalidArgument("commit needs a session_id")
                rt = self.runtime(model)
                rec = self._fresh(rt, owner)
            ids = self._encode(rt, text, "text")
            if len(ids) < (1 if rec.logits is not None else 2):
                raise InvalidArgument(
                    "text must have at least 2 characters from a fresh state "
                    "(the first is context), or 1 in a session with text"
                )
            lp, state, last = await asyncio.to_thread(
                stream_logprobs, rt.step, ids, rec.state[None], rec.logits
            )
            scored = ids if rec.logits is not None else ids[1:]
            tokens_seen = rec.tokens_seen
            if leased:
                new = await self.store.commit(rec.advanced(state[0], last, len(ids), self.clock()))
                leased = ""
                tokens_seen = new.tokens_seen
            return ScoreResult(
                perplexity(lp),
                scored,
                [rt.vocab.token(t) for t in scored],
                [float(x) for x in lp],
                rt.vocab.decode(ids),
                tokens_seen,
            )
        finally:
            if leased:
                await self.store.release(leased)

    def model_info(self, model: str = "") -> ModelInfo:
        rt = self.runtime(model)
        m = rt.metadata
        return ModelInfo(
            rt.name, m.vocab, m.hidden_size, m.num_layers, rt.model_hash, rt.provider, dict(m.perplexity)
        )
