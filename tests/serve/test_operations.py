"""Operations: health, metrics, authentication, TLS, access logs, several models."""

import json
import socket
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gru_serve.client import Client, make_channel
from gru_serve.ops.auth import principal_of_token
from gru_serve.ops.settings import Settings
from gru_serve.server import ThreadedServer
from tests.support.certs import make_certs
from tests.support.cli import start
from tests.support.serving import D2L, LONG, start_server, wait_until


def health_status(target: str, service: str = "", channel=None) -> int:
    with channel or grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service)).status


def test_health_serving_then_not_serving_on_drain():
    srv = start_server()
    assert health_status(srv.target) == health_pb2.HealthCheckResponse.SERVING
    assert (
        health_status(srv.target, "gru_serve.v1.GenerationService") == health_pb2.HealthCheckResponse.SERVING
    )
    with grpc.insecure_channel(srv.target) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        srv.call(srv.server.health.enter_graceful_shutdown())  # what stop() does first
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    srv.stop()


def test_metrics_endpoint_shows_histograms_after_a_run():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = start_server(metrics_port=port)
    try:
        with Client(srv.target) as c:
            c.generate_text("time traveller", max_new_tokens=30)
            c.create_session("x")
            with pytest.raises(grpc.RpcError):
                c.get_session("nope")
        values: dict[str, float] = {}

        def scraped() -> dict[str, float]:
            text = urllib.request.urlopen(
                f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=10
            ).read()
            values.clear()
            for line in text.decode().splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    values[name] = float(value)
            return values

        # A call is counted once its status has gone out, so the client can be first to look.
        failed = (
            'gru_serve_requests_total{code="NOT_FOUND",method="/gru_serve.v1.GenerationService/GetSession"}'
        )
        wait_until(lambda: failed in scraped())
    finally:
        srv.stop()
    model = 'model="timemachine-d2l"'
    assert values[f"gru_serve_time_to_first_token_seconds_count{{{model}}}"] == 1
    assert values[f"gru_serve_inter_token_latency_seconds_count{{{model}}}"] == 29
    assert values[f'gru_serve_inter_token_latency_seconds_bucket{{le="+Inf",{model}}}'] == 29
    assert values[f"gru_serve_generated_tokens_total{{{model}}}"] == 30
    generate = 'code="OK",method="/gru_serve.v1.GenerationService/Generate"'
    assert values[f"gru_serve_requests_total{{{generate}}}"] == 1
    assert (
        values[
            'gru_serve_requests_total{code="NOT_FOUND",method="/gru_serve.v1.GenerationService/GetSession"}'
        ]
        == 1
    )
    assert values[f'gru_serve_execution_provider{{{model},provider="CPUExecutionProvider"}}'] == 1
    for name in (
        "gru_serve_active_streams",
        "gru_serve_session_evictions_total",
        "gru_serve_session_expiries_total",
        f"gru_serve_scheduler_batch_size{{{model}}}",
        f"gru_serve_scheduler_queue_depth{{{model}}}",
        f"gru_serve_scheduler_paused_streams{{{model}}}",
        "gru_serve_active_sessions",
    ):
        assert name in values


@pytest.fixture(scope="module")
def authed():
    srv = start_server(auth_tokens=("alice-token", "bob-token"), max_streams_per_token=1)
    yield srv
    srv.stop()


def test_no_valid_token_is_unauthenticated(authed):
    for token in ("", "mallory"):
        with Client(authed.target, token=token) as c, pytest.raises(grpc.RpcError) as err:
            c.create_session("time")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert health_status(authed.target) == health_pb2.HealthCheckResponse.SERVING  # health stays open


def test_another_tokens_session_is_permission_denied(authed):
    with Client(authed.target, token="alice-token") as alice, Client(authed.target, token="bob-token") as bob:
        s = alice.create_session("time traveller")
        calls = [
            lambda: bob.get_session(s.session_id),
            lambda: bob.fork_session(s.session_id),
            lambda: bob.delete_session(s.session_id),
            lambda: bob.score("x", session_id=s.session_id),
            lambda: bob.generate_text("x", session_id=s.session_id),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert alice.generate_text("", session_id=s.session_id, max_new_tokens=5)[1].generated_tokens == 5
        rec = authed.call(authed.service.store.get(s.session_id))
        assert rec.owner == principal_of_token("alice-token") and "alice" not in rec.owner


def test_streams_per_token_limit(authed):
    with Client(authed.target, token="alice-token") as alice:
        stream = alice.generate("time", max_new_tokens=LONG)
        next(stream)
        with pytest.raises(grpc.RpcError) as err:
            alice.generate_text("time", max_new_tokens=1)
        assert (
            err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "max_streams_per_token" in err.value.details()
        )
        with Client(authed.target, token="bob-token") as bob:  # another token is not limited by alice
            assert bob.generate_text("time", max_new_tokens=3)[1].generated_tokens == 3
        stream.cancel()


def test_tls_and_mtls(tmp_path):
    certs = make_certs(tmp_path)
    ca = certs["ca.pem"].read_bytes()
    srv = start_server(tls_cert=str(certs["server.pem"]), tls_key=str(certs["server.key"]))
    try:
        with Client(srv.target, make_channel(srv.target, ca)) as c:
            assert c.generate_text("time traveller", max_new_tokens=10)[1].generated_tokens == 10
        with Client(srv.target) as plain, pytest.raises(grpc.RpcError) as err:
            plain.model_info()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()
    srv = start_server(
        tls_cert=str(certs["server.pem"]),
        tls_key=str(certs["server.key"]),
        tls_client_ca=str(certs["ca.pem"]),
    )
    try:
        with (
            Client(srv.target, make_channel(srv.target, ca)) as anonymous,
            pytest.raises(grpc.RpcError) as err,
        ):
            anonymous.model_info()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        mutual = make_channel(
            srv.target, ca, certs["client.pem"].read_bytes(), certs["client.key"].read_bytes()
        )
        with Client(srv.target, mutual) as c:
            assert c.model_info().name == "timemachine-d2l"
    finally:
        srv.stop()


def test_access_log_has_one_line_per_rpc_with_request_id_and_no_prompt(tmp_path):
    proc, target = start("--log-level", "INFO")
    secret = "the secret prompt"
    with Client(target, metadata=(("x-request-id", "req-123"),)) as c:
        c.generate_text(secret, max_new_tokens=3)
        with pytest.raises(grpc.RpcError):
            c.get_session("missing")
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    rpcs = [x for x in lines if x["msg"] == "rpc"]
    assert [(x["method"].rsplit("/", 1)[1], x["code"]) for x in rpcs] == [
        ("Generate", "OK"),
        ("GetSession", "NOT_FOUND"),
    ]
    assert all(x["request_id"] == "req-123" and x["duration_ms"] >= 0 for x in rpcs)
    assert secret not in err


def test_several_models_by_name(tmp_path):
    other = tmp_path / "copy.onnx"
    other.write_bytes(D2L.read_bytes())
    srv = ThreadedServer(Settings(port=0, models=(f"main={D2L}", f"second={other}")))
    try:
        with Client(srv.target) as c:
            info = c.model_info()
            assert (info.name, list(info.models), info.default_model) == ("main", ["main", "second"], "main")
            assert c.model_info("second").name == "second"
            s = c.create_session("time", model="second")
            assert c.get_session(s.session_id).model == "second"
            with pytest.raises(grpc.RpcError) as err:
                c.generate_text("x", session_id=s.session_id, model="main")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            a = c.generate_text("time traveller", max_new_tokens=20, model="second")[0]
            assert a == c.generate_text("time traveller", max_new_tokens=20)[0]
    finally:
        srv.stop()
