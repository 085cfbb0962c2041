"""Continuous batching: one thread runs every active generation of a model.

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
gru_serve.engine.prefix_cache.BLOCK tokens, so that its prefix states can be cached and reused bit
for bit whatever the load; any other in chunks of `prefill_chunk` tokens from where it starts
(one call for a prompt up to that long, as without chunking; splitting a longer one gave the
same logits and state bit for bit as one call with the shipped models on CPU). A job whose
prompt is read joins the batch in the round that follows; with no round to run, prefill goes on
at once.

Backpressure: a job whose consumer falls behind is marked `paused` (by its emit callback, on
this thread; gru_serve.core.service decides when). Between rounds a paused job leaves the batch,
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
from dataclasses import dataclass, field

import numpy as np

from gru_serve.engine.prefix_cache import BLOCK
from gru_serve.engine.runtime import Decoder, FusedBatch, ModelRuntime
from gru_serve.ops.errors import Internal, ResourceExhausted, Unavailable
from gru_serve.ops.settings import Settings
from gru_serve.outputs import DoneEvent, Event, FailedEvent, RunDone, Tokens
from gru_serve.sampling import SamplingParams, sample, uniforms
from gru_serve.scoring import token_logprobs
from gru_serve.tokenizer import PRIME_TOKENS, StopMatcher, TextStream

log = logging.getLogger(__name__)

# Most tokens a job gets from one round (one fused session.run), and the time a fused round is
# sized to take: the server's defaults.
FUSED_TOKENS: int = Settings.model_fields["fused_tokens"].default
ROUND_BUDGET_S: float = Settings.model_fields["round_budget_ms"].default / 1000
# Most prompt tokens prefilled between two rounds: the server's default.
PREFILL_CHUNK: int = Settings.model_fields["prefill_chunk"].default


@dataclass(eq=False)
class RunJob:
    """A plain model run (Score, the inference protocol's ModelInfer): the exported graph over
    `ids` [batch, seq] from `state`, in chunks of at most prefill_chunk positions between
    decode rounds, queued and bounded with the generations."""

    ids: np.ndarray
    state: np.ndarray
    emit: Callable[[Event], None]
    cancelled: bool = False
    ended: bool = False
    paused: bool = False  # never: a run has no consumer to wait for
    key: int = 0
    offset: int = 0
    parts: list[np.ndarray] = field(default_factory=list)
    start_ns: int = 0

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class Job:
    """One generation request as the scheduler sees it. `emit` must be thread-safe; it gets at
    most one Tokens per round."""

    prompt: np.ndarray  # int64 token ids to consume first (may be empty)
    state: np.ndarray  # [layers, hidden]
    logits: np.ndarray | None  # [vocab] pending distribution
    max_new_tokens: int
    params: SamplingParams
    position: int  # session position of the first generated token (seeds the sampler)
    want_logprobs: bool
    emit: Callable[[Event], None]
    cancelled: bool = False
    ended: bool = False  # its last event (done or failed) is out
    generated: int = 0
    # The generation's text, token by token (Scheduler.submit makes it from the runtime's
    # tokenizer, primed with the prompt, when none is given), and its stop strings (None when
    # it has none; made from params.stop when not given).
    stream: TextStream | None = None
    stops: StopMatcher | None = None
    prime: list[int] | None = None  # the ids its text stream reads first (default: the prompt's)
    first_token_at: float | None = None
    stop_hit: str = field(default="")
    # A prompt read from the zero state is prefilled in BLOCK-token chunks from its first token
    # (gru_serve.engine.prefix_cache), whether or not a prefix came from the cache, so that a cached
    # state is bit for bit what the skipped chunks would have made.
    chunked: bool = False
    offset: int = 0  # prompt tokens consumed so far (a cached prefix, then each chunk)
    # With the prefix cache on: (block index, state, logits) after each whole block prefilled.
    blocks: list[tuple[int, np.ndarray, np.ndarray]] | None = None
    # Its consumer is behind: set by its emit callback (on the scheduler thread), cleared through
    # Scheduler.resume. A paused job sits out the rounds with its state kept on the job.
    paused: bool = False
    key: int = 0  # its id between a front end and the engine process (gru_serve.engine.client)

    def cancel(self) -> None:
        self.cancelled = True


class _Batch:
    """The active jobs' state [B, L, H], pending logits [B, V] and sampling settings, in one
    order; rebuilt when the members change. With a Decoder the state may live in its
    buffers (on the GPU under CUDA) and is fetched only when needed. After a fused round the
    state stays in its FusedBatch (on the device) with the logits, and the next round's tokens
    are those the loop already drew from them (`next_tokens`): host copies of the state and
    logits are made only for the rows that need them."""

    def __init__(self, jobs: list[Job], state: np.ndarray | None, logits: np.ndarray | None) -> None:
        self.jobs = jobs
        self.host_state: np.ndarray | None = state
        self.logits = logits  # [B, V] on the host, or None while they are on the device
        self.fused: FusedBatch | None = None  # holds the state after a fused round
        self.next_tokens: np.ndarray | None = None  # the tokens drawn from the pending logits
        # Where pending logits on the device are: (the FusedBatch, its step), and per row the
        # row there (-1: a newcomer, whose logits are on its job).
        self.device_logits: tuple[FusedBatch, int] | None = None
        self.origin = np.arange(len(jobs))
        self.decoder: Decoder | None = None
        self.decoder_current = False  # the decoder holds the batch's current state
        params = [j.params for j in jobs]
        self.temperature = np.array([p.temperature for p in params], np.float64)
        self.top_k = np.array([p.top_k for p in params], np.int64)
        self.top_p = np.array([p.top_p for p in params], np.float64)
        self.seeds = np.array([p.seed for p in params], np.uint64)
        self.any_sampled = bool((self.temperature > 0).any())
        self.logprobs = [i for i, j in enumerate(jobs) if j.want_logprobs]

    def state(self) -> np.ndarray:
        if self.host_state is None:
            if self.fused is not None:
                self.host_state = self.fused.host_state()
            else:
                assert self.decoder is not None
                self.host_state = self.decoder.state()
        return self.host_state

    def logits_rows(self, rows: list[int]) -> np.ndarray:
        """The pending logits of these rows [len(rows), V], fetched from the device if there."""
        if self.logits is not None:
            return self.logits[rows]
        assert self.device_logits is not None
        fused, step = self.device_logits
        on_device = [r for r in rows if self.origin[r] >= 0]
        got = fused.rows_logits([(step, int(self.origin[r])) for r in on_device]) if on_device else None
        where = {r: i for i, r in enumerate(on_device)}
        return np.stack([got[where[r]] if r in where else self.jobs[r].logits for r in rows])

    def positions(self) -> np.ndarray:
        return np.array([j.position + j.generated for j in self.jobs], np.uint64)


class Scheduler:
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
        if prefill_chunk < BLOCK or prefill_chunk % BLOCK:
            raise ValueError(f"prefill_chunk must be a positive multiple of {BLOCK}, got {prefill_chunk}")
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
        self._batch: _Batch | None = None
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

    def resume(self, job: Job) -> None:
        """Let a paused job run again (any thread); it rejoins the batch at the next round. Also
        wakes the thread for a paused job that was cancelled, so that it is let go at once."""
        with self._cond:
            job.paused = False
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job (any thread): it leaves at the next round; a paused one is let go at once."""
        job.cancel()
        if job.paused:
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

    def _members(self, jobs: list[Job]) -> _Batch:
        """The batch arrays for `jobs`: reused while the members stay, else rebuilt with the
        rows of staying jobs taken from the old arrays and the newcomers' from the jobs."""
        old = self._batch
        if old is not None and old.jobs == jobs:
            return old
        if old is not None and old.fused is not None:
            return self._members_on_device(old, jobs)
        if old is None:
            state = np.stack([j.state for j in jobs])
            logits = np.stack([j.logits for j in jobs])
        else:
            rows = {id(j): i for i, j in enumerate(old.jobs)}
            old_state = old.state()
            state = np.stack([old_state[rows[id(j)]] if id(j) in rows else j.state for j in jobs])
            logits = np.stack([old.logits[rows[id(j)]] if id(j) in rows else j.logits for j in jobs])
        self._batch = _Batch(list(jobs), state, logits)
        return self._batch

    def _members_on_device(self, old: _Batch, jobs: list[Job]) -> _Batch:
        """The batch for `jobs` from one whose state is on the device: the staying rows' state,
        next tokens and logits stay there; the newcomers' come from their jobs."""
        assert old.fused is not None and old.next_tokens is not None
        rows = {id(j): i for i, j in enumerate(old.jobs)}
        new = [r for r, j in enumerate(jobs) if id(j) not in rows]
        origin = np.array([rows.get(id(j), -1) for j in jobs], np.int64)
        order, extra = origin.copy(), np.arange(len(old.jobs), len(old.jobs) + len(new))
        order[new] = extra
        shape = (0, *self.runtime.state_shape)
        new_rows = np.stack([jobs[r].state for r in new]) if new else np.zeros(shape, np.float32)
        batch = _Batch(list(jobs), None, None)
        batch.fused = old.fused.with_members(order, new_rows, batch.temperature, batch.top_k, batch.top_p)
        batch.device_logits, batch.origin = old.device_logits, origin
        tokens = np.zeros(len(jobs), np.int64)
        kept = origin >= 0
        tokens[kept] = old.next_tokens[origin[kept]]
        if new:
            # Sampling is per row (counter-based uniforms): the newcomers alone draw what they
            # would draw in the whole batch.
            logits = np.stack([jobs[r].logits for r in new])
            u = uniforms(batch.seeds[new], batch.positions()[new])
            tokens[new] = (
                sample(logits, batch.temperature[new], batch.top_k[new], batch.top_p[new], u)
                if batch.any_sampled
                else logits.argmax(axis=1)
            )
        batch.next_tokens = tokens
        self._batch = batch
        return batch

    def _round(self) -> None:
        jobs = self._active
        n = len(jobs)
        self.last_batch_size = n
        self.peak_batch_size = max(self.peak_batch_size, n)
        batch = self._members(jobs)
        positions = batch.positions()
        if batch.next_tokens is not None:  # drawn on the device by the last fused round
            tokens = batch.next_tokens
        elif batch.any_sampled:
            tokens = sample(
                batch.logits, batch.temperature, batch.top_k, batch.top_p, uniforms(batch.seeds, positions)
            )
        else:
            tokens = batch.logits.argmax(axis=1)
        lp_rows = batch.logprobs
        first_lp = token_logprobs(batch.logits_rows(lp_rows), tokens[lp_rows]) if lp_rows else ()
        lps = dict(zip(batch.logprobs, first_lp, strict=True))
        now = time.perf_counter()
        lookup = self._lookup
        left = np.empty(n, np.int64)  # tokens each job may still take in this round
        firsts: list[Tokens] = []
        fresh: list[bool] = []
        for i, job in enumerate(jobs):
            tid = int(tokens[i])
            text = lookup[tid] if lookup is not None else job.stream.push((tid,))[0]
            fresh.append(job.first_token_at is None)
            if job.first_token_at is None:
                job.first_token_at = now
            job.generated += 1
            stops = job.stops
            if stops is not None and (hit := stops.feed((text,))) is not None:
                job.stop_hit = hit.stop
                left[i] = 0
            else:
                left[i] = rest = job.max_new_tokens - job.generated
                if not rest and lookup is None:
                    text += job.stream.flush()  # its last token: the text held back goes too
            lp = lps.get(i)
            firsts.append(Tokens([tid], [text], job.generated - 1, None if lp is None else [float(lp)]))
        self.tokens += n
        k = self._fused_steps(n, int(left.max()), self._read_s)
        # A newcomer's first token goes out now, before the model runs; in a fused round the
        # others' goes out with the tokens the loop makes (one message instead of two).
        for i, job in enumerate(jobs):
            if k == 1 or fresh[i]:
                job.emit(firsts[i])
        if self.flush is not None:
            self.flush()  # before the model runs, as the comment above says
        try:
            if k > 1:
                held = [None if fresh[i] else firsts[i] for i in range(n)]
                self._fused_round(batch, tokens, positions, left, k, held)
            else:
                self._step_round(batch, tokens)
        except Exception as e:
            self._fail(jobs, e)
            self._active = []
            self._batch = None
            return
        self.rounds += 1

    def _fused_steps(self, n: int, most_left: int, spent_s: float = 0.0) -> int:
        """Steps for this round: 1 (a decode step) or K for the fused loop, K - 1 being the
        tokens the longest-running job still takes, within fused_tokens and the time budget
        less `spent_s` (the prompts and model runs read before it: the streams wait for both)."""
        if self.fused_tokens <= 1 or most_left < 1 or not self.runtime.has_fused:
            return 1
        # Measured on this batch size's rounds, else the runtime's measure at load (its device).
        cost = self._step_cost.get(n) or self.runtime.fused_step_cost(n)
        budget = max(2, int((self.round_budget_s - spent_s) / cost))
        return min(self.fused_tokens, most_left + 1, budget)

    def _step_round(self, batch: _Batch, tokens: np.ndarray) -> None:
        """Feed this round's tokens in one batched decode step. IOBinding pays off over many
        steps of one batch: with the fused path on, a step round is a batch's last, so it runs
        plainly."""
        if self.io_binding and (self.fused_tokens <= 1 or not self.runtime.has_fused):
            if batch.decoder is None:
                batch.decoder = self.runtime.decoder(batch.state())
                self.decoders += 1
                batch.decoder_current = True
            elif not batch.decoder_current:
                batch.decoder.load(batch.state())
                batch.decoder_current = True
            batch.logits = batch.decoder.step(tokens).copy()
            batch.host_state = batch.decoder.state() if self.runtime.device == "cpu" else None
        else:
            logits, batch.host_state = self.runtime.step(tokens[:, None].astype(np.int64), batch.state())
            batch.logits = logits[:, 0]
        batch.fused, batch.next_tokens, batch.device_logits = None, None, None
        still = []
        for i, job in enumerate(batch.jobs):
            if job.stop_hit or job.generated >= job.max_new_tokens:
                job.logits, job.state = batch.logits[i].copy(), batch.state()[i].copy()
                self._finish(job, "stop" if job.stop_hit else "length")
            elif not job.cancelled:
                still.append(job)
        self._active = still

    def _fused_round(
        self,
        batch: _Batch,
        tokens: np.ndarray,
        positions: np.ndarray,
        left: np.ndarray,
        k: int,
        held: list[Tokens | None],
    ) -> None:
        """Feed this round's tokens, then generate up to k - 1 more per job in one run; `held`
        are first tokens not handed out yet."""
        n = len(batch.jobs)
        u = (
            uniforms(
                np.repeat(batch.seeds, k), (positions[:, None] + np.arange(1, k + 1, dtype=np.uint64)).ravel()
            )
            if batch.any_sampled
            else np.zeros(n * k)
        ).reshape(n, k)
        t0 = time.perf_counter()
        if batch.fused is None:
            batch.fused = self.runtime.fused_batch(batch.state(), batch.temperature, batch.top_k, batch.top_p)
        fused = batch.fused
        sampled = fused.run(tokens, u)
        self.fused_rounds += 1
        lookup = self._lookup
        lp_rows = set(batch.logprobs)
        chunks, ends, finished = [], [], []
        for i, job in enumerate(batch.jobs):
            take = int(min(left[i], k - 1))  # tokens from the loop: sampled[0 .. take - 1]
            ids = sampled[:take, i].tolist()
            texts = [lookup[t] for t in ids] if lookup is not None else job.stream.push(ids)
            end = take  # the job's last fed token is step index `end`
            stops = job.stops
            if stops is not None and take and (hit := stops.feed(texts)) is not None:
                job.stop_hit = hit.stop
                end = hit.index + 1
                del ids[end:], texts[end:]
            elif take and lookup is None and job.generated + take >= job.max_new_tokens:
                texts[-1] += job.stream.flush()  # its last token: the text held back goes too
            chunks.append((ids, texts))
            ends.append(end)
            if job.stop_hit or job.generated + end >= job.max_new_tokens:
                finished.append(i)
        # Only these rows come back from the device: the logprob rows' logits, and the logits
        # and state of the rows that finish (one fetch each).
        lp_pairs = [(j, i) for i in sorted(lp_rows) for j in range(ends[i])]
        lp_logits = fused.rows_logits(lp_pairs) if lp_pairs else None
        lp_at = {pair: r for r, pair in enumerate(lp_pairs)}
        done_pairs = [(ends[i], i) for i in finished]
        done_logits = fused.rows_logits(done_pairs) if done_pairs else None
        done_states = fused.rows_states(done_pairs) if done_pairs else None
        done_at = {i: r for r, i in enumerate(finished)}
        still = []
        for i, job in enumerate(batch.jobs):
            (ids, texts), end = chunks[i], ends[i]
            lps = None
            if i in lp_rows:
                rows = lp_logits[[lp_at[(j, i)] for j in range(end)]] if end else np.zeros((0, 1), np.float32)
                lps = token_logprobs(rows, sampled[:end, i]).tolist()
            chunk = Tokens(ids, texts, job.generated, lps)
            job.generated += end
            first = held[i]
            if first is not None:
                first.extend(chunk)
                chunk = first
            if chunk.ids:
                job.emit(chunk)
            self.tokens += end
            self.fused_tokens_generated += end
            if i in done_at:
                job.logits, job.state = done_logits[done_at[i]].copy(), done_states[done_at[i]].copy()
                self._finish(job, "stop" if job.stop_hit else "length")
            elif not job.cancelled:
                still.append(job)
        batch.logits, batch.host_state = None, None
        batch.next_tokens = sampled[k - 1]
        batch.device_logits, batch.origin = (fused, k - 1), np.arange(n)
        batch.decoder_current = False
        self._active = still
        cost = (time.perf_counter() - t0) / k  # the run and handing out its tokens, per step
        self._step_cost[n] = 0.8 * self._step_cost.get(n, cost) + 0.2 * cost


def scheduler_for(
    runtime: ModelRuntime, settings: Settings, flush: Callable[[], None] | None = None
) -> Scheduler:
    """A model's scheduler as the settings configure it (in the engine process or a thread)."""
    s = settings
    return Scheduler(
        runtime,
        s.max_batch_size,
        s.max_queue,
        s.io_binding == "on" or (s.io_binding == "auto" and runtime.device == "cuda"),
        fused_tokens=s.fused_tokens,
        round_budget_s=s.round_budget_ms / 1000,
        prefill_chunk=s.prefill_chunk,
        flush=flush,
    )
