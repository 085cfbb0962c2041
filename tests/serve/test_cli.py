"""gru-serve as a user runs it: the server process, the CLI client, signals."""

import os
import signal
import subprocess
import threading
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gru_serve.client import Client
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2_grpc as pb_grpc
from tests.support.cli import EXE, cli, start
from tests.support.serving import reference_generate


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    proc, target = start()
    yield target
    proc.terminate()
    proc.wait(timeout=30)


def test_generate_prints_the_stream(served, runtime):
    r = cli("generate", "time traveller", "--max-tokens", "40", "--target", served)
    assert r.returncode == 0, r.stderr
    assert r.stdout == reference_generate(runtime, "time traveller", 40) + "\n"


def test_sessions_continue_across_cli_calls(served, runtime):
    sid = cli("session", "create", "time traveller", "-q", "--target", served).stdout.strip()
    a = cli("generate", "--session", sid, "--max-tokens", "20", "--target", served).stdout.strip("\n")
    b = cli("generate", "--session", sid, "--max-tokens", "20", "--target", served).stdout.strip("\n")
    assert a + b == reference_generate(runtime, "time traveller", 40)
    shown = cli("session", "show", sid, "--target", served).stdout
    assert "tokens_seen 54" in shown
    fork = cli("session", "fork", sid, "-q", "--target", served).stdout.strip()
    assert fork and fork != sid
    assert cli("session", "delete", sid, "--target", served).returncode == 0
    gone = cli("session", "show", sid, "--target", served)
    assert gone.returncode == 1 and gone.stderr.startswith("gru-serve: error: NOT_FOUND")


def test_score_and_info(served):
    r = cli("score", "the time traveller", "--target", served)
    assert r.returncode == 0 and r.stdout.startswith("perplexity ")
    info = cli("info", "--target", served).stdout
    assert "timemachine-d2l" in info and "CPUExecutionProvider" in info


def test_bad_sampling_flag_is_reported(served):
    r = cli("generate", "x", "--temperature", "-1", "--target", served)
    assert r.returncode == 1 and "INVALID_ARGUMENT: sampling.temperature" in r.stderr


def test_sigterm_drains_in_flight_streams_and_exits_0(runtime):
    proc, target = start("--grace-s", "20")
    got: dict[str, object] = {}
    first = threading.Event()

    def stream() -> None:
        with Client(target) as c:
            text = []
            for msg in c.generate("time traveller", max_new_tokens=3000):
                text.extend(t.text for t in msg.tokens)
                first.set()
                if msg.HasField("finished"):
                    got["finished"] = msg.finished
            got["text"] = "".join(text)

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(30)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    t.join()
    assert got["finished"].generated_tokens == 3000
    assert got["text"] == reference_generate(runtime, "time traveller", 3000)


def test_a_draining_server_keeps_its_port_answers_not_serving_and_refuses_new_calls_as_retryable():
    proc, target = start("--grace-s", "3", "--max-new-tokens", "1000000")
    health = health_pb2_grpc.HealthStub
    with Client(target) as c:
        held = c.generate("time traveller", max_new_tokens=1_000_000)
        next(held)  # in flight; unread, so gRPC's flow control keeps it so
        proc.send_signal(signal.SIGTERM)
        statuses = []
        while not statuses or statuses[-1] != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert len(statuses) < 500, "health never turned NOT_SERVING"
            with grpc.insecure_channel(target) as ch:  # a new connection each time
                statuses.append(health(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)
        with grpc.insecure_channel(target) as ch:
            call = pb_grpc.GenerationServiceStub(ch).Generate(pb.GenerateRequest(prompt="time"), timeout=5)
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
            assert ("x-gru-serve-refused", "draining") in call.initial_metadata()
        # The stream in flight ends with a status a client can act on when the grace runs out.
        with pytest.raises(grpc.RpcError) as err:
            for _ in held:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("model", ["/nonexistent/model.onnx", os.devnull])
def test_bad_model_refuses_to_start_with_one_line(model):
    r = subprocess.run(
        [*EXE, "serve", "--port", "0", "--model", model], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if "gru-serve: error" in line]
    assert len(lines) == 1 and model in lines[0] and "Traceback" not in r.stderr


def test_help_explains_every_setting():
    out = cli("serve", "--help").stdout
    for flag in ("--model", "--device", "--max-batch-size", "--session-ttl-s", "--grace-s", "GRU_SERVE_PORT"):
        assert flag in out
