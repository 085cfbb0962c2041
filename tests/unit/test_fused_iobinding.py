"""The fused path with IOBinding (gru_serve.engine.device_batch.FusedBatch): the state stays where the
model runs between rounds, and the tokens, logits and states are bit for bit those of the
plain fused run and of the step path; through the scheduler, only the rows that finish come
back to the host."""

import threading

import numpy as np
import pytest

from gru_serve.engine.device_batch import FusedBatch
from gru_serve.engine.runtime import ModelRuntime
from gru_serve.engine.scheduler import Scheduler
from gru_serve.engine.work import Job
from gru_serve.outputs import DoneEvent, FailedEvent
from gru_serve.reference import step_generate
from gru_serve.sampling import SamplingParams, columns, uniforms
from gru_serve.shipped import shipped_models

PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=1.0, seed=7),
    SamplingParams(temperature=0.75, top_k=5, seed=11),
    SamplingParams(temperature=1.25, top_p=0.875, seed=3),
    SamplingParams(temperature=0.625, top_k=3, top_p=0.75, seed=2**63 + 5),
]


@pytest.fixture(scope="module", params=["timemachine-d2l", "timemachine-full"])
def rt(request):
    return ModelRuntime(shipped_models()[request.param])


def _settings(params):
    return columns(params), np.array([p.seed for p in params], np.uint64)


@pytest.mark.parametrize("rows", [1, 5])
def test_rounds_with_the_state_on_the_device_equal_plain_fused_runs(rt, rows):
    """Four rounds of K = 9 chained through the device state equal rt.fused (session.run on
    numpy arrays, today's call) fed each round's host state, bit for bit."""
    params = (PARAMS * 2)[:rows]
    cols, seeds = _settings(params)
    rng = np.random.default_rng(1)
    state = (rng.standard_normal((rows, *rt.state_shape)) * 0.5).astype(np.float32)
    tokens = rng.integers(0, rt.metadata.vocab_size, rows)
    fb = FusedBatch(rt, state, cols)
    for r in range(4):
        u = np.stack([uniforms(seeds, np.full(rows, 9 * r + j, np.uint64)) for j in range(9)], axis=1)
        want_sampled, want_logits, want_states = rt.fused(tokens, state, cols, u)
        got = fb.run(tokens, u)
        assert np.array_equal(got, want_sampled)
        pairs = [(j, i) for i in range(rows) for j in (0, 4, 8)]
        assert np.array_equal(fb.rows_logits(pairs), np.stack([want_logits[j, i] for j, i in pairs]))
        assert np.array_equal(fb.rows_states(pairs), np.stack([want_states[j, i] for j, i in pairs]))
        assert np.array_equal(fb.host_state(), want_states[-1])
        tokens, state = want_sampled[-1], want_states[-1]


def test_a_batch_rebuilt_on_the_device_equals_one_built_on_the_host(rt):
    cols, seeds = _settings(PARAMS)
    rng = np.random.default_rng(2)
    state = (rng.standard_normal((5, *rt.state_shape)) * 0.5).astype(np.float32)
    fb = FusedBatch(rt, state, cols)
    u = np.stack([uniforms(seeds, np.full(5, j, np.uint64)) for j in range(6)], axis=1)
    fb.run(np.arange(5), u)
    host = fb.host_state()
    newcomer = (rng.standard_normal((1, *rt.state_shape))).astype(np.float32)
    order = np.array([4, 0, 5, 2])  # rows 1 and 3 left; the newcomer is row 5 of Concat
    keep = [PARAMS[4], PARAMS[0], PARAMS[1], PARAMS[2]]
    cols2, seeds2 = _settings(keep)
    moved = fb.with_members(order, newcomer, cols2)
    want_state = np.concatenate([host, newcomer])[order]
    assert np.array_equal(moved.host_state(), want_state)
    u2 = np.stack([uniforms(seeds2, np.full(4, 6 + j, np.uint64)) for j in range(5)], axis=1)
    tokens = np.array([3, 1, 4, 1])
    assert np.array_equal(moved.run(tokens, u2), rt.fused(tokens, want_state, cols2, u2)[0])


def _serve(rt, spec, fused_tokens=16):
    """Jobs through a real scheduler; the second half join once the first half have tokens, so
    the batch's members change while its state is on the device."""
    sched = Scheduler(rt, fused_tokens=fused_tokens)
    results = [[] for _ in spec]
    done = threading.Semaphore(0)
    started = threading.Event()
    half = len(spec) // 2

    def submit(i):
        prompt, params, n = spec[i]

        def emit(ev, events=results[i]):
            events.append(ev)
            if not isinstance(ev, DoneEvent | FailedEvent):
                started.set()
            else:
                done.release()

        ids = np.array(rt.tokenizer.encode(prompt), np.int64)
        sched.submit(Job(ids, rt.zero_state()[0], None, n, params, len(ids), True, emit))

    sched.start()
    try:
        for i in range(half):
            submit(i)
        assert started.wait(30)
        for i in range(half, len(spec)):
            submit(i)
        for _ in spec:
            assert done.acquire(timeout=60)
    finally:
        sched.stop()
    return results, sched


def test_the_scheduler_keeps_the_state_on_the_device_and_gives_todays_tokens(rt, monkeypatch):
    fetched_whole, fetched_rows = [], []
    real_host_state, real_rows_states = FusedBatch.host_state, FusedBatch.rows_states
    monkeypatch.setattr(
        FusedBatch, "host_state", lambda self: fetched_whole.append(1) or real_host_state(self)
    )
    monkeypatch.setattr(
        FusedBatch,
        "rows_states",
        lambda self, pairs: fetched_rows.append(len(pairs)) or real_rows_states(self, pairs),
    )
    prompts = ["time traveller", "the machine", "it was", "so", "we"]
    lengths = [40, 23, 57, 40, 31, 40]
    spec = [(prompts[i % 5], PARAMS[i % 5], lengths[i]) for i in range(6)]
    results, sched = _serve(rt, spec)
    assert sched.fused_rounds > 0
    # No round brought the whole batch's state back; each finishing job's row came back once.
    assert fetched_whole == [] and sum(fetched_rows) == len(spec)
    for (prompt, params, n), events in zip(spec, results, strict=True):
        # Today's step path: the decode graph at batch 1, one numpy sample per token.
        want, want_logits, want_state = step_generate(
            rt.step, rt.tokenizer.encode(prompt), rt.zero_state(), params, n
        )
        got = [t for ev in events[:-1] for t in ev.ids]
        assert got == want, params
        done = events[-1]
        assert isinstance(done, DoneEvent) and done.generated == n
        assert np.array_equal(done.state, want_state) and np.array_equal(done.logits, want_logits)
        lps = [lp for ev in events[:-1] for lp in ev.logprobs]
        assert len(lps) == n and all(lp <= 0 for lp in lps)


def test_greedy_tokens_equal_the_exported_graph_alone(rt):
    """The plain exported graph in a bare CPU session, one token per call."""
    import onnxruntime as ort

    plain = ort.InferenceSession(str(rt.path), providers=["CPUExecutionProvider"])

    def step(ids, state):
        return tuple(plain.run(["logits", "state_out"], {"input_ids": ids, "state": state}))

    spec = [("time traveller", SamplingParams(), 45), ("the machine", SamplingParams(), 45)]
    results, _ = _serve(rt, spec)
    for (prompt, params, n), events in zip(spec, results, strict=True):
        want = step_generate(step, rt.tokenizer.encode(prompt), rt.zero_state(), params, n)[0]
        assert [t for ev in events[:-1] for t in ev.ids] == want
