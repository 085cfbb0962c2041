"""Faults: disconnects, deadlines, SIGTERM, a failing model step; nothing is lost."""

import signal
import threading
import time

import grpc
import pytest

from gru_serve.client import Client, sampling
from gru_serve.engine.device_batch import FusedBatch
from tests.support.reliability import TALLY, record
from tests.support.serving import LONG, reference_generate, start_server


@pytest.fixture(scope="module")
def server():
    srv = start_server(engine="thread")  # faults are injected into this process
    yield srv
    srv.stop()


def state_of(srv, session_id):
    rec = srv.call(srv.service.store.get(session_id))
    return rec.state.tobytes(), rec.logits.tobytes(), rec.tokens_seen, rec.version


def freed_within(srv, seconds: float) -> float:
    """Seconds until no stream is active and the scheduler holds no job (bounded)."""
    t0 = time.monotonic()
    sched = srv.service.schedulers["timemachine-d2l"]
    while srv.service.active_streams or sched.active or sched.queue_depth:
        if time.monotonic() - t0 > seconds:
            raise AssertionError(f"resources still held after {seconds} s")
        time.sleep(0.001)
    return time.monotonic() - t0


def test_client_disconnect_mid_stream(server):
    with Client(server.target) as c:
        s = c.create_session("time traveller")
    before = state_of(server, s.session_id)
    for _ in range(5):
        channel = grpc.insecure_channel(server.target)
        stream = Client(server.target, channel).generate("", session_id=s.session_id, max_new_tokens=LONG)
        next(stream)
        channel.close()  # the client goes away without cancelling
        freed = freed_within(server, 1.0)
        assert state_of(server, s.session_id) == before
    TALLY["faults injected"] += 5
    record("client disconnect mid-stream", times=5, session_unchanged=True, freed_ms=round(freed * 1000, 1))


def test_deadline_exceeded_mid_stream(server):
    with Client(server.target) as c:
        s = c.create_session("time traveller")
        before = state_of(server, s.session_id)
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as err:
                for _ in c.generate("", session_id=s.session_id, max_new_tokens=LONG, timeout=0.02):
                    pass
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            freed_within(server, 1.0)
            assert state_of(server, s.session_id) == before
    TALLY["faults injected"] += 5
    record("deadline exceeded", times=5, session_unchanged=True)


class FailingRuntime:
    """Test-only wrapper: the next model step raises, as an onnxruntime error would."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.armed = threading.Event()
        self.fired = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _maybe_fail(self) -> None:
        if self.armed.is_set():
            self.armed.clear()
            self.fired.set()
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : injected by the test")

    def step(self, *args):
        self._maybe_fail()
        return self.inner.step(*args)

    def fused(self, *args):
        self._maybe_fail()
        return self.inner.fused(*args)



def test_a_failing_batch_fails_only_its_requests(server, runtime, monkeypatch):
    sched = server.service.schedulers["timemachine-d2l"]
    wrapper = FailingRuntime(sched.runtime)
    sched.runtime = wrapper
    # A fused round runs in the batch's FusedBatch (made anew when members change), not
    # through the runtime: its run fails the same way.
    run = FusedBatch.run

    def failing_run(batch, *args):
        wrapper._maybe_fail()
        return run(batch, *args)

    monkeypatch.setattr(FusedBatch, "run", failing_run)
    try:
        with Client(server.target) as c:
            sessions = [c.create_session("time traveller") for _ in range(8)]
            before = [state_of(server, s.session_id) for s in sessions]
            streams = [c.generate("", session_id=s.session_id, max_new_tokens=LONG) for s in sessions]
            for st in streams:
                next(st)
            wrapper.armed.set()
            codes = []
            for st in streams:
                with pytest.raises(grpc.RpcError) as err:
                    for _ in st:
                        pass
                codes.append((err.value.code(), err.value.details()))
            assert wrapper.fired.is_set()
            assert all(code == grpc.StatusCode.INTERNAL and "incident" in d for code, d in codes)
            assert [state_of(server, s.session_id) for s in sessions] == before
            # The scheduler keeps serving: new requests and the failed sessions work, and are right.
            text, _ = c.generate_text("time traveller", max_new_tokens=100)
            assert text == reference_generate(runtime, "time traveller", 100)
            assert (
                c.generate_text("", session_id=sessions[0].session_id, max_new_tokens=5)[1].generated_tokens
                == 5
            )
    finally:
        sched.runtime = wrapper.inner
    TALLY["faults injected"] += 1
    record(
        "onnxruntime error in one batch",
        failed_requests=8,
        status="INTERNAL",
        sessions_unchanged=True,
        scheduler_kept_serving=True,
    )


@pytest.mark.parametrize("stage", ["sampling", "stop strings"])
def test_a_fault_outside_the_model_call_fails_its_round_and_the_scheduler_serves_on(
    server, runtime, monkeypatch, stage
):
    import gru_serve.engine.rounds as rounds
    from gru_serve.tokenizer import StopMatcher

    fired = threading.Event()

    def broken(*args, **kwargs):
        fired.set()
        raise RuntimeError(f"injected fault in {stage}")

    if stage == "sampling":
        monkeypatch.setattr(rounds, "sample", broken)
    else:
        monkeypatch.setattr(StopMatcher, "feed", broken)
    with Client(server.target) as c:
        s = c.create_session("time traveller")
        before = state_of(server, s.session_id)
        with pytest.raises(grpc.RpcError) as err:
            # temperature > 0 samples, and a stop string is followed: both stages run.
            c.generate_text(
                "", session_id=s.session_id, params=sampling(0.8, None, None, 3, ["zz"]), timeout=10
            )
        assert fired.is_set()
        assert err.value.code() == grpc.StatusCode.INTERNAL and "incident" in err.value.details()
        assert state_of(server, s.session_id) == before
        monkeypatch.undo()
        text, _ = c.generate_text("time traveller", max_new_tokens=50)
        assert text == reference_generate(runtime, "time traveller", 50)
    TALLY["faults injected"] += 1
    record(f"fault in {stage} (outside the model call)", status="INTERNAL", scheduler_kept_serving=True)


def test_sigterm_mid_stream(server_process, runtime):
    # A long grace: the in-flight stream finishes.
    srv = server_process("--grace-s", "30")
    with Client(srv.target) as c:
        stream = c.generate("time traveller", max_new_tokens=3000)
        first = next(stream)
        srv.proc.send_signal(signal.SIGTERM)
        text = "".join(t.text for m in [first, *stream] for t in m.tokens)
    assert srv.proc.wait(timeout=60) == 0
    assert text == reference_generate(runtime, "time traveller", 3000)
    # A short grace: the stream that cannot finish ends with UNAVAILABLE, and the server exits 0.
    srv = server_process("--grace-s", "0.5", "--max-new-tokens", "1000000")
    with Client(srv.target) as c:
        stream = c.generate("time traveller", max_new_tokens=1_000_000)
        next(stream)
        srv.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert srv.proc.wait(timeout=60) == 0
    TALLY["faults injected"] += 2
    record("SIGTERM mid-stream", finished_within_grace=True, beyond_grace="UNAVAILABLE", exit_code=0)
