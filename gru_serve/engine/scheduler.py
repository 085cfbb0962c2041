"""Continuous batching: one thread runs every active generation of a model. This module holds
the queues, admission, prefill, model runs and pause/resume; the round itself is
gru_serve.engine.rounds (a mixin of Scheduler), the batch's arrays gru_serve.engine.batch.

Each round samples the next token of every active job from its pending logits (vectorised,
gru_serve.sampling), hands the tokens out at once, then runs the model for the whole batch:

- the fused path (when the runtime has it): one session.run feeds those tokens and then
  generates up to K - 1 more per job inside an ONNX Loop (decode step + the same sampler +
  feedback), returning the state and logits after every step, so a job that reaches its
  length or a stop string inside the round ends exactly there; K is capped by
  `fused_tokens` and by a time budget per round, so newcomers wait at most about one budget;
- the step path (K = 1): one batched decode step, with IOBinding and preallocated buffers
  when `io_binding` is on.

Both paths give the same tokens, bit for bit: the fused loop runs the same kernels as the
decode step and draws the same counter-based uniforms. Jobs leave when they finish or are
cancelled, so the batch grows and shrinks. The batch's state and logits live in arrays that are
rebuilt only when its members change. Admission is first come, first served and every active
job advances every round: nothing starves.

Chunked prefill: a job admitted between rounds (it holds a batch slot from then on) first has
its prompt read, interleaved with the rounds: between two rounds at most `prefill_chunk` prompt
tokens are prefilled over all the jobs being read, in passes that give each of them (first come
first) its next chunk while the budget allows, one call per chunk length (seq = that length).
The first job's chunk always fits, so every prompt is read after those admitted before it, and
the round that follows runs fewer fused steps by the time the prefill took: a long prompt costs
the running streams about one round budget per round instead of stalling them for all of it.
Plain model runs (RunJob: Score, ModelInfer) wait in the same queue and are read the same way,
up to prefill_chunk positions between two rounds. A prompt read from the zero state goes in chunks of
gru_serve.prefill.BLOCK tokens, so that its prefix states can be cached and reused bit
for bit whatever the load; any other in chunks of `prefill_chunk` tokens from where it starts
(one call for a prompt up to that long, as without chunking; splitting a longer one gave the
same logits and state bit for bit as one call with the shipped models on CPU). A job whose
prompt is read joins the batch in the round that follows; with no round to run, prefill goes on
at once.

Backpressure: a job whose consumer falls behind is paused (`Scheduler.pause`, called by its emit
callback on this thread; gru_serve.core.jobs decides when). Between rounds a paused job leaves the batch,
its state and pending logits written back to the job, and no longer holds a batch slot; once
resumed (`Scheduler.resume`, from any thread) it rejoins ahead of the waiting prompts as slots
allow, from exactly where it stopped. Sampling draws by (seed, position), so its tokens are
those of an uninterrupted run. A job paused during a fused round gets that round's tokens.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable

import numpy as np

from gru_serve.engine.batch import Batch
from gru_serve.engine.config import EngineConfig
from gru_serve.engine.rounds import DecodeRounds
from gru_serve.engine.runtime import ModelRuntime
from gru_serve.engine.work import Job, RunJob, SchedulerStats
from gru_serve.ops.errors import Internal, ResourceExhausted, Unavailable
from gru_serve.outputs import DoneEvent, FailedEvent, RunDone
from gru_serve.prefill import BLOCK, check_prefill_chunk
from gru_serve.tokenizer import PRIME_TOKENS, StopMatcher

log = logging.getLogger(__name__)

# Most tokens a job gets from one round (one fused session.run), and the time a fused round is
# sized to take: the server's defaults.
FUSED_TOKENS: int = EngineConfig().fused_tokens
ROUND_BUDGET_S: float = EngineConfig().round_budget_ms / 1000
# Most prompt tokens prefilled between two rounds: the server's default.
PREFILL_CHUNK: int = EngineConfig().prefill_chunk


class Scheduler(DecodeRounds):
    def __init__(
        self,
        runtime: ModelRuntime,
        max_batch_size: int = 256,
        max_queue: int = 1024,
        io_binding: bool = False,
        fused_tokens: int = FUSED_TOKENS,
        round_budget_s: float = ROUND_BUDGET_S,
        flush: Callable[[], None] | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        """flush: called after each round (and each failure) once its events are emitted, so a
        consumer can deliver a round's events with one wake-up instead of one per job; it must
        not raise. prefill_chunk: the most prompt tokens prefilled between two rounds, a
        multiple of BLOCK."""
        try:
            check_prefill_chunk(prefill_chunk)
        except ValueError as e:
            raise ValueError(f"prefill_chunk {e}") from None
        self.runtime = runtime
        self.flush = flush
        # A "chars" token's text is the token itself, whatever came before: looked up directly
        # (the per-token work of today's d2l models stays list indexing); other kinds go
        # through each job's stream.
        tok = runtime.tokenizer
        self._lookup: tuple[str, ...] | None = tok.tokens if tok.kind == "chars" else None
        self.io_binding = io_binding
        # 1 turns the fused path off: every round is one decode step.
        self.fused_tokens = fused_tokens
        self.round_budget_s = round_budget_s
        self.prefill_chunk = prefill_chunk
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._runs: list[RunJob] = []  # model runs waiting (their own queue: no batch slot)
        self._running: list[RunJob] = []  # model runs part done
        self._prefilling: list[Job] = []  # admitted, prompt being read (first come first)
        self._active: list[Job] = []
        self._paused: list[Job] = []  # out of the batch until resumed; state and logits on the job
        self._batch: Batch | None = None
        self._step_cost: dict[int, float] = {}  # batch size -> seconds per fused step (EMA)
        self._read_s = 0.0  # prefill and model runs before this round (its budget shrinks by it)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{runtime.name}", daemon=True)
        self.last_batch_size = 0
        self.peak_batch_size = 0
        self.rounds = 0
        self.fused_rounds = 0
        self.tokens = 0
        self.fused_tokens_generated = 0
        self.prefill_runs = 0
        self.pauses = 0  # times a job left the batch paused
        self.decoders = 0  # IOBinding decode loops made (one per batch on the step path)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; jobs still queued or running fail with Unavailable."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    @property
    def provider(self) -> str:
        return self.runtime.provider

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def prefilling(self) -> int:
        """Jobs admitted whose prompts are still being read (they hold batch slots)."""
        return len(self._prefilling)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def paused(self) -> int:
        """Jobs out of the batch because their consumers are behind."""
        return len(self._paused)

    @property
    def paused_jobs(self) -> list[Job]:
        return list(self._paused)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            self.last_batch_size,
            self.peak_batch_size,
            self.queue_depth,
            self.active,
            self.paused,
            self.pauses,
            self.decoders,
        )

    def pause(self, job: Job) -> None:
        """Its consumer is behind (any thread; the service's emit calls it on this scheduler's
        thread): the job leaves the batch between rounds, its state kept, until resumed."""
        job.paused = True

    def resume(self, job: Job) -> None:
        """Let a paused job run again (any thread); it rejoins the batch at the next round. Also
        wakes the thread for a paused job that was cancelled, so that it is let go at once."""
        with self._cond:
            job.paused = False
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job (any thread): it leaves at the next round; a paused one is let go at once."""
        job.cancel()
        if isinstance(job, Job) and job.paused:  # a RunJob is never paused: it has no reader
            self.resume(job)

    def submit_run(self, job: RunJob) -> None:
        with self._cond:
            if self._stopping:
                raise Unavailable("the server is shutting down")
            if len(self._pending) + len(self._runs) >= self.max_queue:
                raise ResourceExhausted(
                    f"scheduler queue is full ({self.max_queue} waiting requests; the limit is max_queue)"
                )
            self._runs.append(job)
            self._cond.notify()

    def submit(self, job: Job) -> None:
        if job.stream is None:
            prime = job.prompt.tolist() if job.prime is None else job.prime
            job.stream = self.runtime.tokenizer.stream(prime[-PRIME_TOKENS:])
        if job.stops is None and job.params.stop:
            job.stops = StopMatcher(job.params.stop)
        elif job.stops is not None and not job.stops:
            job.stops = None  # nothing to follow: the hot path tests for None only
        with self._cond:
            if self._stopping:
                raise Unavailable("the server is shutting down")
            if len(self._pending) + len(self._runs) >= self.max_queue:
                raise ResourceExhausted(
                    f"scheduler queue is full ({self.max_queue} waiting requests; the limit is max_queue)"
                )
            self._pending.append(job)
            self._cond.notify()

    # -- the scheduler thread --

    def _run(self) -> None:
        while True:
            admitted: list[Job] = []
            try:
                self._park()
                with self._cond:
                    while not (
                        self._stopping
                        or self._pending
                        or self._runs
                        or self._running
                        or self._prefilling
                        or self._active
                        or self._waking()
                    ):
                        self._cond.wait()
                    if self._stopping:
                        break
                    # Resumed jobs rejoin first (they came first), then newcomers, as slots allow;
                    # a job whose prompt is being read holds a slot too.
                    held = len(self._active) + len(self._prefilling)
                    resumed, kept = [], []
                    for job in self._paused:
                        if job.cancelled:
                            continue
                        room = held + len(resumed) < self.max_batch_size
                        (resumed if room and not job.paused else kept).append(job)
                    self._paused = kept
                    self._active += resumed
                    while self._pending and held + len(resumed) + len(admitted) < self.max_batch_size:
                        admitted.append(self._pending.popleft())
                self._prefilling += admitted
                t0 = time.perf_counter()
                self._model_runs()
                self._active += self._prefill()
                self._read_s = time.perf_counter() - t0
                self._active = [j for j in self._active if not j.cancelled]
                if self._active:
                    self._round()
            except Exception as e:
                # A fault outside the model call (sampling, stop strings, handing out tokens)
                # fails the requests it touched; the thread lives on for everyone else.
                touched = dict.fromkeys([*admitted, *self._prefilling, *self._active, *self._running])
                self._fail([j for j in touched if not j.ended], e)
                self._running = []
                self._active, self._prefilling, self._batch = [], [], None
            if self.flush is not None:
                self.flush()
        with self._cond:
            leftovers = [*self._pending, *self._runs, *self._prefilling, *self._active, *self._paused]
            self._pending.clear()
            self._runs.clear()
            self._active, self._prefilling, self._paused = [], [], []
        for job in leftovers:
            job.emit(FailedEvent(Unavailable("the server shut down before the request finished")))
        if self.flush is not None:
            self.flush()

    def _model_runs(self) -> None:
        """Advance the waiting model runs by up to prefill_chunk positions in all (the oldest
        always moves), one model call per run and chunk; a finished run emits RunDone."""
        with self._cond:
            self._running += self._runs
            self._runs.clear()
        budget = self.prefill_chunk
        still = []
        for job in self._running:
            if job.cancelled:
                continue
            if budget <= 0:
                still.append(job)
                continue
            n = min(job.ids.shape[1] - job.offset, max(budget, BLOCK))
            budget -= n
            if not job.start_ns:
                job.start_ns = time.perf_counter_ns()
            try:
                logits, job.state = self.runtime.step(job.ids[:, job.offset : job.offset + n], job.state)
            except Exception as e:
                self._fail([job], e)
                continue
            job.parts.append(logits)
            job.offset += n
            if job.offset < job.ids.shape[1]:
                still.append(job)
                continue
            job.ended = True
            logits = job.parts[0] if len(job.parts) == 1 else np.concatenate(job.parts, axis=1)
            job.emit(RunDone(logits, job.state, job.start_ns, time.perf_counter_ns()))
        self._running = still

    def _waking(self) -> bool:
        """A paused job was resumed or cancelled (read under the lock)."""
        return any(not j.paused or j.cancelled for j in self._paused)

    def _park(self) -> None:
        """Take the active jobs now paused out of the batch, each with its row of the batch's
        state and logits (the arrays are rebuilt without it at the next round)."""
        if not any(j.paused for j in self._active):
            return
        batch = self._batch
        rows = {id(j): i for i, j in enumerate(batch.jobs)} if batch is not None else {}
        state = batch.state() if batch is not None else None  # may fetch it from the decoder
        still, parked = [], []
        for job in self._active:
            if not job.paused or job.cancelled:
                still.append(job)
                continue
            i = rows.get(id(job))
            if i is not None:  # else it never ran in a batch: its state is on it already
                job.state, job.logits = state[i].copy(), batch.logits_rows([i])[0].copy()
            parked.append(job)
        self._active = still
        self._paused += parked
        self.pauses += len(parked)

    def _fail(self, jobs: list[Job], exc: BaseException) -> None:
        incident = uuid.uuid4().hex[:12]
        log.error("generation failed, incident %s, %d request(s) failed", incident, len(jobs), exc_info=exc)
        for job in jobs:
            job.ended = True
            job.emit(FailedEvent(Internal(f"generation failed (incident {incident})")))

    def _prefill(self) -> list[Job]:
        """Read at most prefill_chunk prompt tokens of the jobs being prefilled, in passes: each
        pass gives every job, first come first, its next chunk (a chunked prompt's next BLOCK
        tokens, any other's next prefill_chunk) if the budget left allows, the first job's
        always, and runs one call for all the chunks of a length. Returns the jobs whose prompts
        are read and go on to generate, having finished those that generate nothing; cancelled
        jobs are let go."""
        ready: list[Job] = []
        budget = self.prefill_chunk
        jobs = [j for j in self._prefilling if not j.cancelled]
        while jobs:
            by_length: dict[int, list[Job]] = collections.defaultdict(list)
            for job in jobs:
                length = min(len(job.prompt) - job.offset, BLOCK if job.chunked else self.prefill_chunk)
                if length <= budget:  # the first job's chunk is at most the whole budget
                    by_length[length].append(job)
                    budget -= length
            if not by_length:
                break
            for length, group in by_length.items():
                if length:
                    self.prefill_runs += 1
                    try:
                        logits, state = self.runtime.step(
                            np.stack([j.prompt[j.offset : j.offset + length] for j in group]),
                            np.stack([j.state for j in group]),
                        )
                    except Exception as e:
                        self._fail(group, e)
                        continue
                    for i, job in enumerate(group):
                        job.logits, job.state = logits[i, -1], state[i]
                        job.offset += length
                        if job.blocks is not None and job.offset % BLOCK == 0:
                            job.blocks.append((job.offset // BLOCK - 1, job.state.copy(), job.logits.copy()))
                for job in group:
                    if job.offset < len(job.prompt):
                        continue
                    if job.max_new_tokens == 0:
                        self._finish(job, "length")
                    else:
                        ready.append(job)
            jobs = [j for j in jobs if not (j.ended or j.cancelled or j.offset == len(j.prompt))]
        # Ready: read (a zero-length rest goes in the first pass, whatever the budget left).
        self._prefilling = [
            j for j in self._prefilling if not (j.ended or j.cancelled) and j.offset < len(j.prompt)
        ]
        return ready

    def _finish(self, job: Job, reason: str) -> None:
        job.ended = True
        job.emit(DoneEvent(reason, job.state, job.logits, job.generated, job.stop_hit, job.first_token_at))


def scheduler_for(
    runtime: ModelRuntime, config: EngineConfig, flush: Callable[[], None] | None = None
) -> Scheduler:
    """A model's scheduler as the engine's config sets it (in the engine process or a thread)."""
    c = config
    return Scheduler(
        runtime,
        c.max_batch_size,
        c.max_queue,
        c.io_binding_on(runtime.device),
        fused_tokens=c.fused_tokens,
        round_budget_s=c.round_budget_ms / 1000,
        prefill_chunk=c.prefill_chunk,
        flush=flush,
    )
