"""Chunked prefill (--prefill-chunk): a long prompt is read a budget of tokens at a time between
decode rounds, so the streams already running go on meanwhile, and the tokens are those of one
prefill call."""

import threading
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import pytest

from gru_serve.client import Client
from gru_serve.core.models import engine_config
from gru_serve.engine.scheduler import Scheduler, scheduler_for
from gru_serve.engine.work import Job, RunJob
from gru_serve.ops.settings import Settings
from gru_serve.outputs import DoneEvent, Event, FailedEvent, RunDone, Tokens
from gru_serve.prefill import BLOCK
from gru_serve.sampling import SamplingParams
from tests.support.serving import reference_generate, start_server

WORDS = ("the", "time", "traveller", "said", "that", "it", "was", "a", "machine", "for", "moving", "in")


def long_text(chars: int, seed: int = 0) -> str:
    """`chars` characters of words (the d2l model reads a character per token)."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, chars // 3))[:chars]


class Run:
    """One job given to a scheduler directly; its events, and `log`, shared by the runs of a test,
    with every run's events in the order the scheduler emitted them (all on its thread)."""

    def __init__(
        self,
        rt,
        prompt: str,
        n: int,
        log: list,
        params: SamplingParams | None = None,
        chunked: bool = False,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()
        self.log = log
        self.on_event = on_event
        ids = np.array(rt.tokenizer.encode(prompt), np.int64)
        params = params or SamplingParams()
        self.job = Job(ids, rt.zero_state()[0], None, n, params, len(ids), False, self.emit, chunked=chunked)

    def emit(self, ev: Event) -> None:
        self.events.append(ev)
        self.log.append((self, ev))
        if self.on_event is not None:
            self.on_event(ev)
        if isinstance(ev, DoneEvent | FailedEvent):
            self.done.set()

    def wait(self) -> DoneEvent:
        assert self.done.wait(timeout=120)
        last = self.events[-1]
        assert isinstance(last, DoneEvent), last
        return last

    @property
    def ids(self) -> list[int]:
        return [t for ev in self.events if isinstance(ev, Tokens) for t in ev.ids]

    @property
    def text(self) -> str:
        return "".join(t for ev in self.events if isinstance(ev, Tokens) for t in ev.texts)


def generate(rt, prompt: str, n: int, prefill_chunk: int, chunked: bool, params=None):
    """Generate n tokens for one job on a scheduler of its own; the run and the scheduler."""
    sched = Scheduler(rt, prefill_chunk=prefill_chunk)
    run = Run(rt, prompt, n, [], params, chunked)
    sched.start()
    try:
        sched.submit(run.job)
        run.wait()
    finally:
        sched.stop()
    assert sched.prefilling == sched.active == sched.queue_depth == 0
    return run, sched


@pytest.mark.parametrize("chunked", [False, True], ids=["any-state", "zero-state"])
@pytest.mark.parametrize("prefill_chunk", [64, 512])
def test_a_long_prompt_read_in_chunks_gives_the_reference_tokens(runtime, prefill_chunk, chunked):
    prompt = long_text(3000)
    run, sched = generate(runtime, prompt, 100, prefill_chunk, chunked)
    assert run.text == reference_generate(runtime, prompt, 100)
    # One call per chunk: BLOCK tokens from the zero state, else prefill_chunk tokens.
    assert sched.prefill_runs == -(-3000 // (BLOCK if chunked else prefill_chunk))


def test_a_prompt_up_to_the_budget_is_read_in_one_call(runtime):
    run, sched = generate(runtime, long_text(512), 20, 512, chunked=False)
    assert sched.prefill_runs == 1 and run.text == reference_generate(runtime, long_text(512), 20)


def test_seeded_sampling_is_the_same_whatever_the_budget(runtime):
    prompt, params = long_text(3000, seed=1), SamplingParams(temperature=1.0, top_k=8, seed=11)
    small, _ = generate(runtime, prompt, 120, 64, chunked=False, params=params)
    whole, sched = generate(runtime, prompt, 120, 4096, chunked=False, params=params)
    assert sched.prefill_runs == 1
    assert small.ids == whole.ids and len(small.ids) == 120
    a, b = small.events[-1], whole.events[-1]
    assert np.array_equal(a.state, b.state) and np.array_equal(a.logits, b.logits)
    assert small.text == reference_generate(runtime, prompt, 120, params)


@pytest.mark.parametrize(("prefill_chunk", "interleaved"), [(64, True), (16_384, False)])
def test_running_streams_go_on_while_a_long_prompt_is_read(runtime, prefill_chunk, interleaved):
    """A stream is generating; a 16,000-character prompt comes. Counted in the order the
    scheduler emits (no timing): the chunks the running stream gets after the long job's
    submit and before the long job's first token."""
    log: list = []
    sched = Scheduler(runtime, prefill_chunk=prefill_chunk)
    streaming, submitted = threading.Event(), threading.Event()

    def handshake(ev: Event) -> None:
        # The first chunk is out: hold the scheduler until the long prompt is submitted.
        if not streaming.is_set():
            streaming.set()
            assert submitted.wait(timeout=30)

    running = Run(runtime, "time traveller", 2000, log, on_event=handshake)
    prompt = long_text(16_000, seed=2)
    long = Run(runtime, prompt, 20, log, chunked=True)
    sched.start()
    try:
        sched.submit(running.job)
        assert streaming.wait(timeout=30)
        log.append(("submit", None))
        sched.submit(long.job)
        submitted.set()
        long.wait()
        running.wait()
    finally:
        sched.stop()
    start = log.index(("submit", None))
    first = next(i for i, (run, ev) in enumerate(log) if run is long and isinstance(ev, Tokens))
    between = sum(1 for run, ev in log[start:first] if run is running and isinstance(ev, Tokens))
    if interleaved:
        assert between >= 10
    else:
        assert between <= 2
    # Interleaving changes neither stream's tokens.
    assert long.text == reference_generate(runtime, prompt, 20)
    assert running.text == reference_generate(runtime, "time traveller", 2000)


def test_a_job_being_prefilled_holds_a_slot_and_can_be_cancelled(runtime):
    """max_batch_size 2: a running stream and a long prompt being read fill the batch, so a third
    job waits; the long job cancelled mid-prefill is let go (no event) and the third runs."""
    log: list = []
    sched = Scheduler(runtime, max_batch_size=2, prefill_chunk=64)
    long = Run(runtime, long_text(16_000, seed=3), 20, log, chunked=True)
    third = Run(runtime, "the machine", 30, log)
    seen: list[tuple[int, int, int]] = []

    def watch(ev: Event) -> None:
        # On the scheduler thread, between rounds' work: what it holds now.
        if not isinstance(ev, Tokens):
            return
        if ev.index == 0:
            sched.submit(long.job)
        elif long.job.offset > 0 and not seen:
            sched.submit(third.job)
            seen.append((sched.prefilling, sched.active, sched.queue_depth))
        elif seen and len(seen) < 5:
            seen.append((sched.prefilling, sched.active, sched.queue_depth))
            if len(seen) == 5:
                long.job.cancel()

    running = Run(runtime, "time traveller", 2000, log, on_event=watch)
    sched.start()
    try:
        sched.submit(running.job)
        third.wait()
        running.wait()
    finally:
        sched.stop()
    assert seen == [(1, 1, 1)] * 5  # the third job waited while the long one was being read
    assert 0 < long.job.offset < len(long.job.prompt) and long.events == []
    assert third.text == reference_generate(runtime, "the machine", 30)
    assert sched.prefilling == 0


@pytest.mark.parametrize("prefix_cache_mb", [64.0, 0.0], ids=["cache-on", "cache-off"])
def test_the_server_reads_prompts_in_its_budget(runtime, prefix_cache_mb):
    """Through the service: a fresh prompt (64-token chunks, its prefix cached when the cache is
    on, then reused) and a session's next prompt (chunks of the budget) give the reference's
    tokens, with the cache on or off."""
    assert scheduler_for(runtime, engine_config(Settings(prefill_chunk=128))).prefill_chunk == 128
    srv = start_server(prefill_chunk=128, prefix_cache_mb=prefix_cache_mb)
    try:
        prompt, more = long_text(3000, seed=4), long_text(700, seed=5)
        with Client(srv.target) as c:
            text, _ = c.generate_text(prompt, max_new_tokens=60)
            again, _ = c.generate_text(prompt, max_new_tokens=60)  # its prefix from the cache
            s = c.create_session(prompt)
            turn, _ = c.generate_text(more, session_id=s.session_id, max_new_tokens=60)
            whole, _ = c.generate_text(prompt + more, max_new_tokens=60)
        assert text == again == reference_generate(runtime, prompt, 60)
        assert turn == whole == reference_generate(runtime, prompt + more, 60)
        assert (srv.service.prefix_cache.hits > 0) == (prefix_cache_mb > 0)
    finally:
        srv.stop()


def test_a_long_model_run_is_read_in_chunks_between_the_rounds(runtime):
    """Score and ModelInfer are RunJobs in the same queue: a 16,000-position run while a stream
    generates lets the stream go on (counted in emit order, as above), and its logits and state
    are those of the exported graph in one plain onnxruntime call."""
    log: list = []
    sched = Scheduler(runtime, prefill_chunk=64)
    streaming, submitted, ran = threading.Event(), threading.Event(), threading.Event()

    def handshake(ev: Event) -> None:
        if not streaming.is_set():
            streaming.set()
            assert submitted.wait(timeout=30)

    running = Run(runtime, "time traveller", 2000, log, on_event=handshake)
    ids = np.array([runtime.tokenizer.encode(long_text(16_000, seed=3))], np.int64)
    done: list[Event] = []

    def emit(ev: Event) -> None:
        done.append(ev)
        log.append(("run", ev))
        ran.set()

    sched.start()
    try:
        sched.submit(running.job)
        assert streaming.wait(timeout=30)
        log.append(("submit", None))
        sched.submit_run(RunJob(ids, runtime.zero_state(), emit))
        submitted.set()
        assert ran.wait(timeout=120)
        running.wait()
    finally:
        sched.stop()
    (ev,) = done
    assert isinstance(ev, RunDone), ev
    start, end = log.index(("submit", None)), log.index(("run", ev))
    assert sum(1 for run, e in log[start:end] if run is running and isinstance(e, Tokens)) >= 10
    session = ort.InferenceSession(str(runtime.path), providers=["CPUExecutionProvider"])
    logits, state = session.run(None, {"input_ids": ids, "state": runtime.zero_state()})
    np.testing.assert_allclose(ev.logits, logits, atol=1e-5)
    np.testing.assert_allclose(ev.state, state, atol=1e-6)
    assert running.text == reference_generate(runtime, "time traveller", 2000)
