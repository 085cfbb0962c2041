"""The transport-free generation core: requests in, token events out.

It owns the models' schedulers and the session store, checks every field, and keeps the
session semantics of docs/architecture.md (lease, transactional commit, TTL, ownership). It knows
nothing of gRPC; gru_serve.grpc turns it into services.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from gru_serve.core.snapshots import Snapshot, load_keys, open_, require_keys, seal
from gru_serve.engine.client import EngineClient, RemoteScheduler
from gru_serve.engine.prefix_cache import BLOCK, Entry, PrefixCache, SharedBlocks, block_keys
from gru_serve.engine.runtime import ModelRuntime
from gru_serve.engine.sampling import SamplingParams
from gru_serve.engine.scheduler import (
    DoneEvent,
    FailedEvent,
    Job,
    RunDone,
    RunJob,
    Scheduler,
    Tokens,
    scheduler_for,
)
from gru_serve.engine.scoring import perplexity, piece_logprobs
from gru_serve.engine.tokenizer import PRIME_TOKENS
from gru_serve.ops.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SessionExpired,
    SessionNotFound,
    Unavailable,
    WrongModel,
)
from gru_serve.ops.metrics import Metrics
from gru_serve.ops.settings import Settings
from gru_serve.stores.sessions import SessionRecord, SessionStore, new_session_id

log = logging.getLogger(__name__)

MAX_SESSION_ID_CHARS = 128

# Backpressure: the most generated tokens a stream may have waiting for its consumer before its
# job is paused (it leaves the batch with its state kept and resumes once the consumer takes
# them). 256 is four full chunks at the default fused_tokens (64): about four rounds of slack,
# so an event loop a round or two behind under load never pauses a reader that keeps up, while
# an unread stream holds a few KiB. On the step path (one token a chunk) it is 256 rounds.
BACKLOG_TOKENS = 256


class _Delivery:
    """Events on their way from the schedulers to the streams' queues on their event loops:
    collected as a round emits them, handed over at the round's flush with one wake-up per loop
    (not one per stream and round)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, object]] = []

    def put(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, ev: object) -> None:
        with self.lock:
            self.items.append((loop, queue, ev))

    def flush(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for loop, queue, ev in items:
            by_loop.setdefault(loop, []).append((queue, ev))
        try:
            here = asyncio.get_running_loop()  # the engine client flushes on the loop itself
        except RuntimeError:
            here = None  # a scheduler thread
        for loop, group in by_loop.items():
            if loop is here:
                _deliver(group)
                continue
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                loop.call_soon_threadsafe(_deliver, group)


def _deliver(group: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, ev in group:
        queue.put_nowait(ev)


class _Backlog:
    """A stream's tokens emitted by the scheduler thread less those its consumer (on the event
    loop) has taken. At BACKLOG_TOKENS the job is paused; when the consumer takes tokens and the
    backlog falls below that, it is resumed. One lock orders the two sides, so a job is never
    left paused with nothing waiting. (Lock order: this one, then the scheduler's; the scheduler
    thread calls emit without holding its own.)"""

    __slots__ = ("job", "lock", "scheduler", "sent", "taken")

    def __init__(self, scheduler: Scheduler) -> None:
        self.job: Job | None = None
        self.scheduler = scheduler
        self.lock = threading.Lock()
        self.sent = 0
        self.taken = 0

    def emitted(self, n: int) -> None:
        """On the scheduler thread, as a chunk of n tokens goes out."""
        with self.lock:
            self.sent += n
            if self.sent - self.taken >= BACKLOG_TOKENS:
                self.job.paused = True

    def took(self, n: int) -> None:
        """On the event loop, as the consumer takes n tokens from the queue."""
        with self.lock:  # held while resuming, so that a pause that follows is not undone
            self.taken += n
            if self.job.paused and self.sent - self.taken < BACKLOG_TOKENS:
                self.scheduler.resume(self.job)


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


@dataclass(frozen=True)
class GenerateRequest:
    session_id: str = ""
    prompt: str = ""
    max_new_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_logprobs: bool = False
    model: str = ""
    snapshot: bytes = b""  # stateless mode: continue from this instead of a session


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
    turn: int = 0  # the session's turn after the request (0 for a one-off)
    snapshot: bytes = b""  # stateless mode: the snapshot after the request


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
    turn: int = 0  # likewise the session's turn

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
            self.turn,
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


MAX_CHOICES = 16  # fan-out: most continuations one Generate samples


@dataclass(frozen=True)
class ChoiceFinished(Finished):
    """The end of one fan-out choice."""

    committed: bool = False  # the session kept this choice
    logprob_sum: float = 0.0  # total log-probability of its generated tokens


async def _merged(
    streams: list[AsyncIterator[Tokens | DoneEvent]],
) -> AsyncIterator[tuple[int, Tokens | DoneEvent]]:
    """The events of several streams as they come, each with its stream's index; the first
    error ends it. One task per stream, so a stream with nothing ready never holds the others.
    The queue is bounded, so a reader that stops stops the pumps, and backpressure pauses the
    streams' jobs as it does a single stream's."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))
    end = object()

    async def pump(i: int, events: AsyncIterator[Tokens | DoneEvent]) -> None:
        try:
            async for ev in events:
                await queue.put((i, ev))
            await queue.put((i, end))
        except Exception as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, events)) for i, events in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, ev = await queue.get()
            if ev is end:
                running -= 1
            elif isinstance(ev, Exception):
                raise ev
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()  # each stream's own cleanup then cancels its job


class GenerationService:
    def __init__(
        self,
        runtimes: dict[str, ModelRuntime],
        store: SessionStore,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        engine: EngineClient | None = None,
    ) -> None:
        """engine: the engine process's connection (settings.engine == "process"); None runs
        every model's scheduler in a thread of this process."""
        if not runtimes:
            raise ValueError("at least one model is needed")
        if any(name != rt.name for name, rt in runtimes.items()):
            raise ValueError("runtimes must be keyed by their names")
        self.store = store
        self.settings = settings
        self.clock = clock
        # Models come and go (add_model, remove_model). Both dicts are replaced, never changed
        # in place, so a reader on another thread (a metrics scrape) iterates a stable copy.
        self.runtimes = dict(runtimes)
        self.engine = engine
        self._delivery = _Delivery()
        self.schedulers = {name: self._scheduler_for(rt) for name, rt in runtimes.items()}
        self._first_model = next(iter(runtimes))
        self.unloaded: set[str] = set()  # names removed and not loaded again
        # Requests using each runtime (see `using`); an unload or a reload waits for them.
        self._holds: collections.Counter[ModelRuntime] = collections.Counter()
        self._unloading: set[ModelRuntime] = set()
        self._idle: dict[ModelRuntime, asyncio.Event] = {}  # set when a draining runtime's holds end
        self._retiring: dict[ModelRuntime, Scheduler] = {}  # replaced by a reload, draining
        self._retirements: set[asyncio.Task] = set()
        self.active_streams = 0
        self.streams_by_owner: collections.Counter[str] = collections.Counter()
        self.metrics = metrics or Metrics()
        self.snapshot_keys = load_keys(settings)
        self.prefix_cache = PrefixCache(int(settings.prefix_cache_mb * 2**20))
        # With the Redis store, replicas share prefix states through it as well.
        shared = self.prefix_cache.on and settings.prefix_redis_mb > 0 and isinstance(store, SharedBlocks)
        self.shared_prefix = store if shared else None
        self._sharing: set[asyncio.Task] = set()

    def start(self) -> None:
        for s in self.schedulers.values():
            s.start()

    def stop(self) -> None:
        for s in [*self.schedulers.values(), *self._retiring.values()]:
            s.stop()

    # -- models that come and go --

    @property
    def default_model(self) -> str:
        """The model of requests that name none: the first model served at start while it is
        loaded, else the first one loaded ('' when none is)."""
        if self._first_model in self.runtimes:
            return self._first_model
        return next(iter(self.runtimes), "")

    def _scheduler_for(self, rt: ModelRuntime) -> Scheduler | RemoteScheduler:
        if self.engine is not None:
            return RemoteScheduler(self.engine, rt, self._delivery.flush)
        return scheduler_for(rt, self.settings, self._delivery.flush)

    def _scheduler(self, rt: ModelRuntime) -> Scheduler:
        """The scheduler running `rt`: a retiring one's (replaced by a reload), else its name's."""
        retiring = self._retiring.get(rt)
        return retiring if retiring is not None else self.schedulers[rt.name]

    def unloading(self, name: str) -> bool:
        rt = self.runtimes.get(name)
        return rt is not None and rt in self._unloading

    def in_use(self, name: str) -> int:
        """Requests holding the model served under `name`."""
        rt = self.runtimes.get(name)
        return self._holds[rt] if rt is not None else 0

    def check_available(self, rt: ModelRuntime) -> None:
        """Unavailable unless `rt` is served and takes new requests (not unloading, not replaced)."""
        if rt in self._unloading:
            raise Unavailable(f"model {rt.name!r} is unloading: it takes no new requests")
        if self.runtimes.get(rt.name) is not rt:
            raise Unavailable(f"model {rt.name!r} was unloaded or reloaded while the request waited")

    @contextlib.contextmanager
    def using(self, rt: ModelRuntime) -> Iterator[None]:
        """Hold a model while a request runs on it: an unload or a reload lets the requests
        that hold it finish before its scheduler stops. Taken once per request, at once after
        the model is looked up (no await between, so an unload cannot slip in); a model that is
        unloading takes no new holds (Unavailable)."""
        self.check_available(rt)
        self._holds[rt] += 1
        try:
            yield
        finally:
            self._holds[rt] -= 1
            if not self._holds[rt]:
                del self._holds[rt]
                if rt in self._idle:
                    self._idle[rt].set()

    async def _drained(self, rt: ModelRuntime) -> None:
        """Wait until no request holds `rt`."""
        idle = self._idle.setdefault(rt, asyncio.Event())
        try:
            if self._holds[rt]:
                await idle.wait()
        finally:
            self._idle.pop(rt, None)

    def add_model(self, rt: ModelRuntime) -> None:
        """Serve a loaded runtime under its name, with a scheduler of its own. A model already
        served under that name is replaced at once: new requests go to `rt`, those holding the
        old one finish on it, then its scheduler stops."""
        sched = self._scheduler_for(rt)
        sched.start()
        old, old_sched = self.runtimes.get(rt.name), self.schedulers.get(rt.name)
        self.runtimes = {**self.runtimes, rt.name: rt}
        self.schedulers = {**self.schedulers, rt.name: sched}
        self.unloaded.discard(rt.name)
        if old is not None and old_sched is not None:
            self._retiring[old] = old_sched
            task = asyncio.create_task(self._retire(old))
            self._retirements.add(task)
            task.add_done_callback(self._retirements.discard)

    async def _retire(self, rt: ModelRuntime) -> None:
        await self._drained(rt)
        sched = self._retiring[rt]
        await asyncio.to_thread(sched.stop)
        del self._retiring[rt]

    async def remove_model(self, name: str) -> None:
        """Unload: the model refuses new requests at once (Unavailable), the requests holding
        it finish, then it goes (its name is then NotFound) and its scheduler stops. Returns
        once it is gone; cancelling the wait does not stop the unload (the caller shields it)."""
        rt = self.runtimes.get(name)
        if rt is None:
            return
        self._unloading.add(rt)
        try:
            await self._drained(rt)
        finally:
            # Gone even when the wait was cancelled (the server is stopping): a model marked
            # unloading would otherwise refuse requests forever.
            sched = self.schedulers[name]
            self.runtimes = {k: v for k, v in self.runtimes.items() if k != name}
            self.schedulers = {k: v for k, v in self.schedulers.items() if k != name}
            self.unloaded.add(name)
            self._unloading.discard(rt)
            if self._holds[rt]:
                self._retiring[rt] = sched  # still in use: stopped when the server stops
            else:
                await asyncio.to_thread(sched.stop)

    # -- helpers --

    def provider(self, rt: ModelRuntime) -> str:
        """The onnxruntime provider that runs `rt` (in the engine process: as it reported)."""
        return self._scheduler(rt).provider

    def runtime(self, model: str) -> ModelRuntime:
        name = model or self.default_model
        rt = self.runtimes.get(name)
        if rt is None:
            if not name:
                raise Unavailable("no model is loaded")
            if name in self.unloaded:
                raise NotFound(f"model {name!r} is not loaded (it was unloaded)")
            raise InvalidArgument(
                f"model: unknown model {name!r}; this server serves {', '.join(self.runtimes)}"
            )
        return rt

    def _check_session_id(self, session_id: str) -> None:
        if len(session_id) > MAX_SESSION_ID_CHARS or not session_id.isprintable():
            raise SessionNotFound(session_id[:MAX_SESSION_ID_CHARS].encode("unicode_escape").decode())

    def _encode(self, rt: ModelRuntime, text: str, name: str) -> list[int]:
        """The ids of a request's text, by the model's tokenizer (unknown input per its policy:
        InvalidArgument naming `name` where it has no unknown token), within both limits:
        max_prompt_chars on the text as sent, max_prompt_tokens on its ids."""
        s = self.settings
        if len(text) > s.max_prompt_chars:
            raise InvalidArgument(
                f"{name} has {len(text)} characters; the limit is {s.max_prompt_chars} (max_prompt_chars)"
            )
        ids = rt.tokenizer.encode(text, field=name)
        if len(ids) > s.max_prompt_tokens:
            raise InvalidArgument(
                f"{name} has {len(ids)} tokens; the limit is {s.max_prompt_tokens} (max_prompt_tokens)"
            )
        return ids

    def _info(self, rec: SessionRecord) -> SessionInfo:
        turns = tuple(TurnInfo(c.turn, c.tokens_seen, c.committed) for c in rec.checkpoints)
        expires = self.store.expires(rec)
        return SessionInfo(
            rec.session_id, rec.model, rec.tokens_seen, rec.created, rec.last_used, expires, turns
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
        rt = self.runtimes.get(rec.model)
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

    def _fresh(self, rt: ModelRuntime, owner: str, session_id: str = "") -> SessionRecord:
        now = self.clock()
        return SessionRecord(
            session_id, rt.name, rt.model_hash, owner, np.zeros(rt.state_shape, np.float32), None, 0, now, now
        )

    def _seal(self, rec: SessionRecord) -> bytes:
        snap = Snapshot(
            rec.model, rec.model_hash, rec.tokens_seen, rec.state, rec.logits, rec.created, owner=rec.owner
        )
        return seal(snap, self.snapshot_keys, self.clock())

    def _unseal(self, blob: bytes, model: str, owner: str, session_id: str = "") -> SessionRecord:
        """The record in a snapshot, for the served model it names (by hash: a copy of a model
        served under another name is the same model), if it is young enough and (where snapshots
        are bound to their exporter) the caller's."""
        s = self.settings
        bound = owner if s.snapshot_bind_owner else None
        snap = open_(blob, self.snapshot_keys, self.clock(), s.snapshot_max_age_s, bound)
        if model:
            candidates = [self.runtime(model)]
        else:
            candidates = sorted(self.runtimes.values(), key=lambda r: r.name != snap.model)
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

    # -- sessions --

    async def create_session(self, text: str = "", model: str = "", owner: str = "") -> SessionInfo:
        rt = self.runtime(model)
        ids = self._encode(rt, text, "text")
        rec = self._fresh(rt, owner, new_session_id())
        if ids:
            with self.using(rt):
                async for ev in self._events(rt, rec, ids, 0, SamplingParams(), False):  # a prefill only
                    if isinstance(ev, DoneEvent):
                        rec = rec.advanced(ev.state, ev.logits, len(ids), self.clock())
        rec = rec.checkpointed(self.clock(), self.settings.max_checkpoints)  # turn 0: as created
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
        # A fork's history starts at the fork: the source's present state is its turn 0.
        rec = rec.checkpointed(now, self.settings.max_checkpoints)
        await self.store.create(rec)
        return self._info(rec)

    async def rewind_session(self, session_id: str, turn: int, owner: str = "") -> SessionInfo:
        """Return the session to the checkpoint of `turn` (nothing is run again). The turns after
        it are forgotten, so the next commit is turn + 1, and the same seed draws the same
        tokens as the first time (sampling is seeded by position, which the checkpoint keeps)."""
        rec = await self._owned(session_id, owner, lease=True)
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
        return self._info(rec)

    async def export_session(self, session_id: str, owner: str = "") -> tuple[bytes, SessionInfo]:
        """A signed snapshot of the session as last committed, and the session."""
        require_keys(self.snapshot_keys)  # refused before the session is looked at
        rec = await self._owned(session_id, owner, lease=False)
        return self._seal(rec), self._info(rec)

    async def import_session(self, blob: bytes, owner: str = "") -> SessionInfo:
        """A new session, the caller's, from a snapshot signed with one of this server's keys."""
        rec = self._unseal(blob, "", owner, new_session_id())
        # Like a fork: the imported state is the new session's turn 0.
        rec = rec.checkpointed(self.clock(), self.settings.max_checkpoints)
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
        prime: list[int] | None = None,
    ) -> AsyncIterator[Tokens | DoneEvent]:
        """The events of one job: `ids` prefilled from the record's state, then up to max_new
        tokens. Its text stream is primed with the ids before the generation (`prime`, by
        default `ids`), so the first tokens' texts read as they do after them."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()  # bounded by the backlog: see _Backlog
        scheduler = self._scheduler(rt)
        backlog = _Backlog(scheduler)

        def emit(ev: object) -> None:
            if isinstance(ev, Tokens):
                backlog.emitted(len(ev))
            self._delivery.put(loop, queue, ev)

        job = Job(
            np.asarray(ids, dtype=np.int64),
            rec.state.copy(),
            rec.logits,
            max_new,
            params,
            rec.tokens_seen + len(ids),
            logprobs,
            emit,
            prime=(ids if prime is None else prime)[-PRIME_TOKENS:],
        )
        backlog.job = job
        keys: list[str] = []
        if ids and rec.tokens_seen == 0 and rec.logits is None and not rec.state.any():
            job.chunked = True  # with the cache off too: both must run the same chunks
            if self.prefix_cache.on:
                # Scoped to the owner, one token's hits never tell it what another sent.
                scope = rec.owner if self.settings.prefix_cache_scope == "owner" else ""
                keys = block_keys(rt.model_hash, ids, scope)
                job.blocks = []
                await self._reuse_prefix(rt, job, keys)
        scheduler.submit(job)
        try:
            ev = await queue.get()
            if job.blocks:  # complete once any event is out: the prefill is over
                self._keep_prefix(job.blocks, keys)
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
                # Taken: a paused job resumes now, and runs while this message is being sent.
                backlog.took(len(tokens))
                yield tokens
                if ev is None:
                    ev = await queue.get()
        finally:
            scheduler.cancel(job)  # a paused job is let go at once

    async def _reuse_prefix(self, rt: ModelRuntime, job: Job, keys: list[str]) -> None:
        """Start the job after the longest cached prefix of its prompt: this replica's, or a
        longer one from the shared tier."""
        if not keys:
            return  # under one block: nothing to look up, and not counted
        cache = self.prefix_cache
        n, entry = cache.longest(keys)
        if n < len(keys) and self.shared_prefix is not None:
            try:
                found = await self.shared_prefix.get_prefix_blocks(keys[n:])
            except Unavailable as e:
                # Readiness already reports an unreachable store; the request goes on without it.
                log.debug("prefix cache: shared tier not read: %s", e)
                found = []
            for i in reversed(range(len(found))):
                got = Entry.from_bytes(found[i], rt.state_shape, rt.metadata.vocab_size) if found[i] else None
                if got is not None:
                    n, entry = n + i + 1, got
                    cache.put(keys[n - 1], got)
                    break
        cache.count(n)
        if entry is not None:
            job.offset = n * BLOCK
            job.state, job.logits = entry.state.copy(), entry.logits.copy()

    def _keep_prefix(self, blocks: list[tuple[int, np.ndarray, np.ndarray]], keys: list[str]) -> None:
        """Cache the block states a prefill made; share them in the background (the request
        does not wait for Redis)."""
        entries = {keys[i]: Entry(state, logits) for i, state, logits in blocks}
        for key, entry in entries.items():
            self.prefix_cache.put(key, entry)
        if self.shared_prefix is not None:
            data = {key: entry.to_bytes() for key, entry in entries.items()}
            task = asyncio.create_task(self._share_prefix(self.shared_prefix, data))
            self._sharing.add(task)
            task.add_done_callback(self._sharing.discard)

    @staticmethod
    async def _share_prefix(shared: SharedBlocks, data: dict[str, bytes]) -> None:
        try:
            await shared.put_prefix_blocks(data)
        except Unavailable as e:
            log.debug("prefix cache: shared tier not written: %s", e)

    def _max_new(self, req: GenerateRequest) -> int:
        s = self.settings
        max_new = s.default_new_tokens if req.max_new_tokens is None else req.max_new_tokens
        if not 0 <= max_new <= s.max_new_tokens:
            raise InvalidArgument(f"max_new_tokens must be in [0, {s.max_new_tokens}], got {max_new}")
        return max_new

    async def _request_state(self, req: GenerateRequest, owner: str) -> tuple[SessionRecord, ModelRuntime]:
        """Where a request starts: its session (leased: the caller commits or releases it), a
        snapshot (stateless: nothing leased), or a fresh state."""
        if req.session_id:
            rec = await self._owned(req.session_id, owner, lease=True)
            try:
                return rec, self._session_runtime(rec, req.model)
            except BaseException:
                await self.store.release(req.session_id)
                raise
        if req.snapshot:
            rec = self._unseal(req.snapshot, req.model, owner)
            return rec, self.runtimes[rec.model]
        rt = self.runtime(req.model)
        return self._fresh(rt, owner), rt

    def _prompt_ids(self, rt: ModelRuntime, rec: SessionRecord, prompt: str, max_new: int) -> list[int]:
        ids = self._encode(rt, prompt, "prompt")
        if not ids and rec.logits is None and max_new > 0:
            raise InvalidArgument(
                "prompt has no tokens and the session has seen no text yet: give a prompt of at least 1 token"
            )
        return ids

    def _observe(self, model: str, n: int, t0: float, last_sent: float | None) -> float:
        """Metrics for n tokens sent now (the first message's time is the TTFT); now."""
        now = time.perf_counter()
        if last_sent is None:
            self.metrics.observe_first_token(model, now - t0)
        self.metrics.observe_tokens(model, n, None if last_sent is None else now - last_sent)
        return now

    async def generate(
        self, req: GenerateRequest, owner: str = "", progress: Progress | None = None
    ) -> AsyncIterator[Tokens | Finished]:
        """The tokens of a request, in chunks of those ready together, then Finished."""
        p = progress or Progress()
        p.session_id, p.seed = req.session_id, req.sampling.seed
        t0 = p.started
        s = self.settings
        max_new = self._max_new(req)
        if req.session_id and req.snapshot:
            raise InvalidArgument("session_id and snapshot: give one or the other, not both")
        leased = ""
        last_sent: float | None = None
        with self._stream_slot(owner), contextlib.ExitStack() as held:
            try:
                rec, rt = await self._request_state(req, owner)
                leased = req.session_id
                held.enter_context(self.using(rt))
                ids = self._prompt_ids(rt, rec, req.prompt, max_new)
                p.prompt_tokens, p.normalized_prompt = len(ids), rt.tokenizer.decode(ids)
                p.tokens_seen, p.turn = rec.tokens_seen, rec.turn
                async for ev in self._events(rt, rec, ids, max_new, req.sampling, req.return_logprobs):
                    if not isinstance(ev, DoneEvent):
                        last_sent = self._observe(rt.name, len(ev), t0, last_sent)
                        p.first_token_at = p.first_token_at or last_sent
                        p.generated_tokens += len(ev)
                        yield ev
                        continue
                    new = rec.advanced(
                        ev.state, ev.logits, len(ids) + ev.generated, self.clock(), s.max_checkpoints
                    )
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
                        new.turn,
                        self._seal(new) if req.snapshot else b"",
                    )
            finally:
                if leased:
                    await self.store.release(leased)

    @contextlib.contextmanager
    def _stream_slot(self, owner: str) -> Iterator[None]:
        """Count a request against max_streams and max_streams_per_token while it runs."""
        s = self.settings
        if self.active_streams >= s.max_streams:
            raise ResourceExhausted(f"too many concurrent streams (the limit is max_streams={s.max_streams})")
        if owner and self.streams_by_owner[owner] >= s.max_streams_per_token:
            raise ResourceExhausted(
                f"too many concurrent streams for this token (the limit is "
                f"max_streams_per_token={s.max_streams_per_token})"
            )
        self.active_streams += 1
        self.streams_by_owner[owner] += 1
        try:
            yield
        finally:
            self.active_streams -= 1
            self.streams_by_owner[owner] -= 1
            if not self.streams_by_owner[owner]:
                del self.streams_by_owner[owner]

    async def fan_out(
        self, req: GenerateRequest, n: int, commit: int | None = None, best_of: bool = False, owner: str = ""
    ) -> AsyncIterator[tuple[int, Tokens | ChoiceFinished]]:
        """n continuations of one state, batched together, choice i sampled with seed + i, so
        each equals a fork of the session generating with that seed. Yields (choice, chunk) as
        chunks come, then, once every choice has ended and the kept one is committed, each
        choice's ChoiceFinished in choice order. The session keeps choice `commit`, or with
        `best_of` the one with the highest total log-probability, or else nothing. The request
        counts once against max_streams."""
        n = max(n, 1)
        if n > MAX_CHOICES:
            raise InvalidArgument(f"n must be in [0, {MAX_CHOICES}], got {n}")
        if commit is not None and commit >= n:
            raise InvalidArgument(f"commit must be in [0, n) = [0, {n}), got {commit}")
        if commit is not None and best_of:
            raise InvalidArgument("best_of: give commit or best_of, not both")
        if (commit is not None or best_of) and not req.session_id:
            raise InvalidArgument("commit and best_of need a session_id (the session that keeps a choice)")
        if req.snapshot:
            raise InvalidArgument("snapshot: fan-out (n > 1) runs on a session or a one-off state")
        s = self.settings
        max_new = self._max_new(req)
        t0 = time.perf_counter()
        with self._stream_slot(owner), contextlib.ExitStack() as held:
            leased = ""
            try:
                rec, rt = await self._request_state(req, owner)
                leased = req.session_id
                held.enter_context(self.using(rt))
                ids = self._prompt_ids(rt, rec, req.prompt, max_new)
                # The prompt is consumed once; every choice starts where it leaves the state, at
                # the same session position, so choice i draws what a fork would with seed + i.
                start = rec
                if ids:
                    async for ev in self._events(rt, rec, ids, 0, SamplingParams(), False):
                        seen = rec.tokens_seen + len(ids)
                        start = replace(rec, state=ev.state, logits=ev.logits, tokens_seen=seen)
                seeds = [(req.sampling.seed + i) % (1 << 64) for i in range(n)]
                # Log-probabilities are always computed: best_of and logprob_sum need them.
                streams = [
                    self._events(rt, start, [], max_new, replace(req.sampling, seed=seed), True, prime=ids)
                    for seed in seeds
                ]
                sums = [0.0] * n
                ends: dict[int, DoneEvent] = {}
                last_sent: float | None = None
                async with contextlib.aclosing(_merged(streams)) as events:
                    async for i, ev in events:
                        if isinstance(ev, DoneEvent):
                            ends[i] = ev
                            continue
                        last_sent = self._observe(rt.name, len(ev), t0, last_sent)
                        for lp in ev.logprobs or ():  # token by token: the same sum however packed
                            sums[i] += lp
                        if not req.return_logprobs:
                            ev.logprobs = None
                        yield i, ev
                if commit is None and best_of:
                    commit = max(range(n), key=sums.__getitem__)
                after = rec  # the session as this request leaves it
                if commit is not None:  # only with a session: checked above
                    kept = ends[commit]
                    new = rec.advanced(
                        kept.state, kept.logits, len(ids) + kept.generated, self.clock(), s.max_checkpoints
                    )
                    after = await self.store.commit(new)
                    leased = ""
                now, normalized = time.perf_counter(), rt.tokenizer.decode(ids)
                for i in range(n):
                    ev = ends[i]
                    # A one-off's "session" is the choice's own state, as in generate.
                    seen = after.tokens_seen if req.session_id else len(ids) + ev.generated
                    fin = ChoiceFinished(
                        ev.reason,
                        len(ids),
                        ev.generated,
                        (ev.first_token_at - t0) if ev.first_token_at else 0.0,
                        now - t0,
                        normalized,
                        req.session_id,
                        seen,
                        ev.stop,
                        seeds[i],
                        after.turn,
                        committed=i == commit,
                        logprob_sum=sums[i],
                    )
                    yield i, fin
            finally:
                if leased:
                    await self.store.release(leased)

    # -- scoring and info --

    async def run_model(self, rt: ModelRuntime, ids: np.ndarray, state: np.ndarray) -> RunDone:
        """The exported graph over ids [batch, seq] from state, through the model's scheduler
        (queued and bounded with the generations, in chunks between their rounds)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        scheduler = self._scheduler(rt)
        job = RunJob(ids, state, lambda ev: self._delivery.put(loop, queue, ev))
        scheduler.submit_run(job)
        try:
            ev = await queue.get()
        finally:
            scheduler.cancel(job)
        if isinstance(ev, FailedEvent):
            raise ev.error
        return ev

    async def _logprobs(
        self, rt: ModelRuntime, ids: list[int], rec: SessionRecord
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log-probabilities of `ids` from the record's state, the state after them and the
        logits after the last, in model runs of at most max_response_logits logits: a long text
        never holds [tokens x vocab] at once, only the log-probabilities are kept."""
        step = max(1, self.settings.max_response_logits // rt.metadata.vocab_size)
        state, last, scored = rec.state[None], rec.logits, []
        for start in range(0, len(ids), step):
            piece = ids[start : start + step]
            run = await self.run_model(rt, np.asarray([piece], np.int64), state)
            lp, last = piece_logprobs(last, piece, run.logits[0])
            scored.append(lp)
            state = run.state
        return np.concatenate(scored), state, last

    async def score(
        self, text: str, session_id: str = "", commit: bool = False, model: str = "", owner: str = ""
    ) -> ScoreResult:
        """Perplexity and per-token log-probabilities; counts against max_streams and
        max_streams_per_token as a generation stream does."""
        leased = ""
        with self._stream_slot(owner), contextlib.ExitStack() as held:
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
                held.enter_context(self.using(rt))
                ids = self._encode(rt, text, "text")
                if len(ids) < (1 if rec.logits is not None else 2):
                    raise InvalidArgument(
                        f"text has {len(ids)} token(s): it must have at least 2 tokens from a fresh "
                        "state (the first is context), or 1 in a session with text"
                    )
                lp, state, last = await self._logprobs(rt, ids, rec)
                context = 0 if rec.logits is not None else 1
                scored = ids[context:]
                # Each scored token's text as it reads after the ones before (as streamed).
                stream = rt.tokenizer.stream(ids[:context])
                texts = stream.push(scored)
                texts[-1] += stream.flush()
                tokens_seen = rec.tokens_seen
                if leased:
                    keep = self.settings.max_checkpoints
                    new = await self.store.commit(rec.advanced(state[0], last, len(ids), self.clock(), keep))
                    leased = ""
                    tokens_seen = new.tokens_seen
                return ScoreResult(
                    perplexity(lp),
                    scored,
                    texts,
                    [float(x) for x in lp],
                    rt.tokenizer.decode(ids),
                    tokens_seen,
                )
            finally:
                if leased:
                    await self.store.release(leased)

    def model_info(self, model: str = "") -> ModelInfo:
        rt = self.runtime(model)
        m = rt.metadata
        return ModelInfo(
            rt.name,
            rt.tokenizer.tokens,
            m.hidden_size,
            m.num_layers,
            rt.model_hash,
            self.provider(rt),
            dict(m.perplexity),
        )
