"""One job's stream: events from the scheduler thread to the job's event loop, backpressure,
and the events of a job (or a model run) as the request's coroutine sees them."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable

import numpy as np

from gru_serve.core.prefix import Prefixes
from gru_serve.engine.api import Job, ModelEngine, ModelRuntime, RunJob
from gru_serve.outputs import DoneEvent, FailedEvent, RunDone, Tokens
from gru_serve.sampling import SamplingParams
from gru_serve.stores.sessions import SessionRecord
from gru_serve.tokenizer import PRIME_TOKENS

# Backpressure: the most generated tokens a stream may have waiting for its consumer before its
# job is paused (it leaves the batch with its state kept and resumes once the consumer takes
# them). 256 is four full chunks at the default fused_tokens (64): about four rounds of slack,
# so an event loop a round or two behind under load never pauses a reader that keeps up, while
# an unread stream holds a few KiB. On the step path (one token a chunk) it is 256 rounds.
BACKLOG_TOKENS = 256


class Delivery:
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


class Backlog:
    """A stream's tokens emitted by the scheduler thread less those its consumer (on the event
    loop) has taken. At BACKLOG_TOKENS the job is paused (ModelEngine.pause); when the consumer
    takes tokens and the backlog falls below that, it is resumed. One lock orders the two sides,
    so a job is never left paused with nothing waiting. (Lock order: this one, then the
    scheduler's; the scheduler thread calls emit without holding its own.)"""

    __slots__ = ("job", "lock", "paused", "scheduler", "sent", "taken")

    def __init__(self, scheduler: ModelEngine) -> None:
        self.job: Job | None = None
        self.scheduler = scheduler
        self.lock = threading.Lock()
        self.sent = 0
        self.taken = 0
        self.paused = False

    def emitted(self, n: int) -> None:
        """On the scheduler thread (the event loop with the engine process), as a chunk of n
        tokens goes out."""
        with self.lock:
            self.sent += n
            if not self.paused and self.sent - self.taken >= BACKLOG_TOKENS:
                self.paused = True
                self.scheduler.pause(self.job)

    def took(self, n: int) -> None:
        """On the event loop, as the consumer takes n tokens from the queue."""
        with self.lock:  # held while resuming, so that a pause that follows is not undone
            self.taken += n
            if self.paused and self.sent - self.taken < BACKLOG_TOKENS:
                self.paused = False
                self.scheduler.resume(self.job)


class Jobs:
    """Runs jobs on the models' schedulers and streams their events back."""

    def __init__(
        self, delivery: Delivery, scheduler: Callable[[ModelRuntime], ModelEngine], prefixes: Prefixes
    ) -> None:
        """scheduler: the scheduler running a runtime (the model set's lookup)."""
        self.delivery = delivery
        self.scheduler = scheduler
        self.prefixes = prefixes

    async def events(
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
        queue: asyncio.Queue = asyncio.Queue()  # bounded by the backlog: see Backlog
        scheduler = self.scheduler(rt)
        backlog = Backlog(scheduler)

        def emit(ev: object) -> None:
            if isinstance(ev, Tokens):
                backlog.emitted(len(ev))
            self.delivery.put(loop, queue, ev)

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
        keys = await self.prefixes.start(rt, rec, ids, job)
        scheduler.submit(job)
        try:
            ev = await queue.get()
            if job.blocks:  # complete once any event is out: the prefill is over
                self.prefixes.keep(job.blocks, keys)
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

    async def run(self, rt: ModelRuntime, ids: np.ndarray, state: np.ndarray) -> RunDone:
        """The exported graph over ids [batch, seq] from state, through the model's scheduler
        (queued and bounded with the generations, in chunks between their rounds)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        scheduler = self.scheduler(rt)
        job = RunJob(ids, state, lambda ev: self.delivery.put(loop, queue, ev))
        scheduler.submit_run(job)
        try:
            ev = await queue.get()
        finally:
            scheduler.cancel(job)
        if isinstance(ev, FailedEvent):
            raise ev.error
        return ev
