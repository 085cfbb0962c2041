"""Continuous batching: one thread runs every active generation of a model.

Each tick samples the next token of every active job from its pending logits (vectorised),
hands the tokens out, then feeds them all to the model in one batched step. Jobs join
between ticks (their prompt is prefilled in one call of seq = prompt length) and leave when
they finish or are cancelled, so the batch grows and shrinks. Admission is first come, first
served and every active job advances every tick: nothing starves.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gru_serve.errors import GruServeError, Internal, ResourceExhausted, Unavailable
from gru_serve.runtime import ModelRuntime
from gru_serve.sampling import MAX_STOP_CHARS, SamplingParams, sample, uniforms
from gru_serve.scoring import token_logprobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str
    index: int
    logprob: float | None


@dataclass(frozen=True)
class DoneEvent:
    reason: str  # "length" | "stop"
    state: np.ndarray
    logits: np.ndarray | None
    generated: int
    stop: str
    first_token_at: float | None


@dataclass(frozen=True)
class FailedEvent:
    error: GruServeError


Event = TokenEvent | DoneEvent | FailedEvent


@dataclass(eq=False)
class Job:
    """One generation request as the scheduler sees it. `emit` must be thread-safe."""

    prompt: np.ndarray  # int64 token ids to consume first (may be empty)
    state: np.ndarray  # [layers, hidden]
    logits: np.ndarray | None  # [vocab] pending distribution
    max_new_tokens: int
    params: SamplingParams
    position: int  # session position of the first generated token (seeds the sampler)
    want_logprobs: bool
    emit: Callable[[Event], None]
    cancelled: bool = False
    generated: int = 0
    tail: str = ""  # the last characters generated, for stop strings
    first_token_at: float | None = None
    stop_hit: str = field(default="")

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(
        self,
        runtime: ModelRuntime,
        max_batch_size: int = 256,
        max_queue: int = 1024,
        io_binding: bool = False,
    ) -> None:
        self.runtime = runtime
        self.io_binding = io_binding
        # With IOBinding the batch's state stays on the device while the batch keeps its members;
        # job.state is brought back to the host only when members change or a job finishes.
        self._dev_state = None
        self._dev_jobs: list[Job] = []
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"scheduler-{runtime.metadata.name}", daemon=True
        )
        self.last_batch_size = 0
        self.peak_batch_size = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; jobs still queued or running fail with Unavailable."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._active)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise Unavailable("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise ResourceExhausted(
                    f"scheduler queue is full ({self.max_queue} waiting requests; the limit is max_queue)"
                )
            self._pending.append(job)
            self._cond.notify()

    # -- the scheduler thread --

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not self._active:
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = []
                while self._pending and len(self._active) + len(admitted) < self.max_batch_size:
                    admitted.append(self._pending.popleft())
            for job in admitted:
                if not job.cancelled and self._prefill(job):
                    self._active.append(job)
            self._active = [j for j in self._active if not j.cancelled]
            if self._active:
                self._tick()
        with self._cond:
            leftovers = list(self._pending) + self._active
            self._pending.clear()
            self._active = []
        for job in leftovers:
            job.emit(FailedEvent(Unavailable("the server shut down before the request finished")))

    def _fail(self, jobs: list[Job], exc: BaseException) -> None:
        incident = uuid.uuid4().hex[:12]
        log.error("model step failed, incident %s, %d request(s) failed", incident, len(jobs), exc_info=exc)
        for job in jobs:
            job.emit(FailedEvent(Internal(f"model execution failed (incident {incident})")))

    def _prefill(self, job: Job) -> bool:
        """Consume the prompt in one call; finish at once if nothing is to be generated."""
        if len(job.prompt):
            try:
                logits, state = self.runtime.step(job.prompt[None, :], job.state[None])
            except Exception as e:
                self._fail([job], e)
                return False
            job.logits, job.state = logits[0, -1], state[0]
        if job.max_new_tokens == 0:
            self._finish(job, "length")
            return False
        return True

    def _finish(self, job: Job, reason: str) -> None:
        job.emit(DoneEvent(reason, job.state, job.logits, job.generated, job.stop_hit, job.first_token_at))

    def _step(self, jobs: list[Job], ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One batched step; with IOBinding the new state stays on the device (returns None)."""
        if not self.io_binding:
            return self.runtime.step(ids, np.stack([j.state for j in jobs]))
        if jobs != self._dev_jobs:
            if self._dev_jobs:
                host = self._dev_state.numpy()
                for i, job in enumerate(self._dev_jobs):
                    job.state = host[i]
            self._dev_state = self.runtime.to_device(np.stack([j.state for j in jobs]))
        logits, self._dev_state = self.runtime.bound_step(ids, self._dev_state)
        self._dev_jobs = list(jobs)
        return logits, None

    def _tick(self) -> None:
        jobs = self._active
        self.last_batch_size = len(jobs)
        self.peak_batch_size = max(self.peak_batch_size, len(jobs))
        logits = np.stack([j.logits for j in jobs])
        params = [j.params for j in jobs]
        seeds = np.array([p.seed for p in params], dtype=np.uint64)
        positions = np.array([j.position + j.generated for j in jobs], dtype=np.uint64)
        tokens = sample(
            logits,
            np.array([p.temperature for p in params]),
            np.array([p.top_k for p in params]),
            np.array([p.top_p for p in params]),
            uniforms(seeds, positions),
        )
        want = [i for i, j in enumerate(jobs) if j.want_logprobs]
        logprobs = dict(zip(want, token_logprobs(logits[want], tokens[want]), strict=True)) if want else {}
        now = time.perf_counter()
        vocab = self.runtime.vocab
        for i, job in enumerate(jobs):
            tid = int(tokens[i])
            text = vocab.token(tid)
            if job.first_token_at is None:
                job.first_token_at = now
            lp = logprobs.get(i)
            job.emit(TokenEvent(tid, text, job.generated, None if lp is None else float(lp)))
            job.generated += 1
            if job.params.stop:
                job.tail = (job.tail + text)[-MAX_STOP_CHARS:]
                job.stop_hit = next((s for s in job.params.stop if job.tail.endswith(s)), "")
        try:
            new_logits, new_state = self.runtime.step(
                tokens[:, None].astype(np.int64), np.stack([j.state for j in jobs])
            )
        except Exception as e:
            self._fail(jobs, e)
            self._active = []
            return
        still = []
        for i, job in enumerate(jobs):
            job.logits, job.state = new_logits[i, -1], new_state[i]
            if job.stop_hit:
                self._finish(job, "stop")
            elif job.generated >= job.max_new_tokens:
                self._finish(job, "length")
            elif not job.cancelled:
                still.append(job)
        self._active = still
