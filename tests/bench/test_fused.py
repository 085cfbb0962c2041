"""The fused K-token path gives what the step path gives: in process, through the scheduler,
and over real gRPC."""

import threading

import numpy as np
import pytest

from gru_serve.client import Client, sampling
from gru_serve.engine.runtime import ModelRuntime, RuntimeOptions
from gru_serve.engine.scheduler import Scheduler
from gru_serve.engine.work import Job
from gru_serve.outputs import DoneEvent, FailedEvent
from gru_serve.reference import fused_generate, step_generate
from gru_serve.sampling import SamplingParams
from gru_serve.shipped import shipped_models
from tests.support.serving import D2L, reference_generate, start_server

# Values exact in float32, as they arrive over gRPC.
PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=1.0, seed=7),
    SamplingParams(temperature=0.75, top_k=5, seed=11),
    SamplingParams(temperature=1.25, top_p=0.875, seed=3),
    SamplingParams(temperature=0.625, top_k=3, top_p=0.75, seed=2**63 + 5),
]
PROMPTS = ["time traveller", "the machine", "it was", "so", "we"]


def step_path(rt, prompt, params, n):
    return step_generate(rt.step, rt.tokenizer.encode(prompt), rt.zero_state(), params, n)


def fused_path(rt, prompts, params, n, k):
    return fused_generate(rt, [rt.tokenizer.encode(p) for p in prompts], params, n, k)


@pytest.fixture(scope="module")
def rt():
    return ModelRuntime(D2L)


def test_the_runtime_derives_the_fast_path(rt):
    assert rt.has_fused and rt.decode_session is not None and rt.fast_path_note.startswith("on")
    assert not ModelRuntime(D2L, RuntimeOptions(fast_path=False)).has_fused


@pytest.mark.parametrize("k", [2, 16, 33])
def test_fused_equals_the_step_path_bit_for_bit(rt, k):
    n = 150
    got, logits, state = fused_path(rt, PROMPTS, PARAMS, n, k)
    for r, (prompt, params) in enumerate(zip(PROMPTS, PARAMS, strict=True)):
        want, want_logits, want_state = step_path(rt, prompt, params, n)
        assert got[r] == want, f"row {r} {params}"
        assert np.array_equal(logits[r], want_logits) and np.array_equal(state[r], want_state)


@pytest.mark.parametrize("model", ["timemachine-d2l", "timemachine-full"])
def test_batch_one_and_two_layers_equal_the_step_path(model):
    """Batch 1 runs a fused session of its own; timemachine-full has two GRU layers."""
    rt = ModelRuntime(shipped_models()[model])
    n = 70
    for prompt, params in zip(PROMPTS, PARAMS, strict=True):
        got, logits, state = fused_path(rt, [prompt], [params], n, 32)
        want, want_logits, want_state = step_path(rt, prompt, params, n)
        assert got[0] == want, f"{model} {params}"
        assert np.array_equal(logits[0], want_logits) and np.array_equal(state[0], want_state)
    rows = len(PROMPTS)
    got, logits, state = fused_path(rt, PROMPTS, PARAMS, n, 32)
    want = step_path(rt, PROMPTS[-1], PARAMS[-1], n)
    assert got[rows - 1] == want[0] and np.array_equal(state[rows - 1], want[2])


@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams()] * 2,  # the greedy loop
        [SamplingParams(), SamplingParams(temperature=1.0, seed=4), SamplingParams(temperature=0.5, seed=8)],
    ],
    ids=["greedy branch", "temperature-only branch"],
)
def test_every_branch_of_the_fused_graph_agrees(rt, params):
    prompts = PROMPTS[: len(params)]
    got, logits, state = fused_path(rt, prompts, params, 120, 32)
    for r, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        want, want_logits, want_state = step_path(rt, prompt, p, 120)
        assert (
            got[r] == want and np.array_equal(logits[r], want_logits) and np.array_equal(state[r], want_state)
        )


def _run_scheduler(rt, jobs_spec, fused_tokens):
    sched = Scheduler(rt, io_binding=True, fused_tokens=fused_tokens)
    results = {}
    done = threading.Semaphore(0)
    sched.start()
    try:
        for i, (prompt, params, n, logprobs) in enumerate(jobs_spec):
            events = results.setdefault(i, [])

            def emit(ev, events=events):
                events.append(ev)
                if isinstance(ev, DoneEvent | FailedEvent):
                    done.release()

            ids = np.array(rt.tokenizer.encode(prompt), np.int64)
            sched.submit(Job(ids, rt.zero_state()[0], None, n, params, len(ids), logprobs, emit))
        for _ in jobs_spec:
            assert done.acquire(timeout=30)
    finally:
        sched.stop()
    return results, sched


def _tokens(chunks) -> list[tuple]:
    """(id, index, logprob) of every token in a job's chunks."""
    out = []
    for c in chunks:
        lps = c.logprobs if c.logprobs is not None else [None] * len(c)
        out += [(t, c.index + n, lp) for n, (t, lp) in enumerate(zip(c.ids, lps, strict=True))]
    return out


def test_scheduler_fused_rounds_equal_step_rounds_with_stops_and_logprobs(rt):
    spec = [
        ("time traveller", SamplingParams(stop=("the",)), 300, True),
        ("the machine", SamplingParams(temperature=1.0, seed=5, stop=("ing", "qq")), 200, True),
        ("it was", SamplingParams(temperature=0.875, top_k=4, top_p=0.9375, seed=9), 77, False),
        ("so", SamplingParams(), 1, True),
        ("we", SamplingParams(temperature=1.0, seed=1), 40, False),
    ]
    fused, sched = _run_scheduler(rt, spec, fused_tokens=32)
    steps, _ = _run_scheduler(rt, spec, fused_tokens=1)
    assert sched.fused_rounds > 0 and sched.fused_tokens_generated > 0
    for i in range(len(spec)):
        a, b = fused[i], steps[i]
        assert _tokens(a[:-1]) == _tokens(b[:-1])
        da, db = a[-1], b[-1]
        assert (da.reason, da.generated, da.stop) == (db.reason, db.generated, db.stop)
        assert np.array_equal(da.state, db.state) and np.array_equal(da.logits, db.logits)
    assert fused[0][-1].reason == "stop" and fused[0][-1].stop == "the"


def test_newcomers_prompts_of_one_length_are_prefilled_together(rt):
    """Jobs waiting together are prefilled in one call per prompt length; each still gets what
    it gets alone (the step path at batch 1)."""
    prompts = ["time", "said", "the machine", "traveller", "at once"]
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=3)]
    sched = Scheduler(rt, io_binding=True)
    results: dict[int, list] = {}
    done = threading.Semaphore(0)
    for i, prompt in enumerate(prompts * 2):
        results[i] = []

        def emit(ev, events=results[i]):
            events.append(ev)
            if isinstance(ev, DoneEvent | FailedEvent):
                done.release()

        ids = np.array(rt.tokenizer.encode(prompt), np.int64)
        sched.submit(Job(ids, rt.zero_state()[0], None, 40, params[i % 2], len(ids), False, emit))
    sched.start()
    try:
        for _ in results:
            assert done.acquire(timeout=30)
    finally:
        sched.stop()
    assert sched.prefill_runs == 4  # ten prompts of lengths 4, 11, 9 and 7
    for i, prompt in enumerate(prompts * 2):
        want, _, want_state = step_path(rt, prompt, params[i % 2], 40)
        assert [t for t, _, _ in _tokens(results[i][:-1])] == want
        assert np.array_equal(results[i][-1].state, want_state)


def test_over_grpc_the_fused_server_equals_the_step_path_reference(rt):
    srv = start_server(engine="thread")  # reads the scheduler's counters
    try:
        sched = srv.service.schedulers["timemachine-d2l"]
        with Client(srv.target) as c:
            text, fin = c.generate_text("time traveller", max_new_tokens=200)
            assert text == reference_generate(rt, "time traveller", 200) and fin.generated_tokens == 200
            for params in PARAMS[1:]:
                msg = sampling(params.temperature, params.top_k, params.top_p, params.seed)
                got, _ = c.generate_text("the machine", max_new_tokens=150, params=msg)
                assert got == reference_generate(rt, "the machine", 150, params)
            # 100 in one call equals 30 + 70 on a session, through fused rounds of any length.
            s1, s2 = c.create_session("the time"), c.create_session("the time")
            msg = sampling(1.0, None, None, 17)
            whole = c.generate_text("", session_id=s1.session_id, max_new_tokens=100, params=msg)[0]
            parts = [
                c.generate_text("", session_id=s2.session_id, max_new_tokens=n, params=msg)[0]
                for n in (30, 70)
            ]
            assert whole == "".join(parts)
        assert sched.fused_rounds > 0
    finally:
        srv.stop()
