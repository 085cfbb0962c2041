"""Triton's model repository extension: index, load and unload over gRPC (an unmodified
tritonclient.grpc, in a subprocess) and HTTP (tritonclient.http), with what a loaded model
serves checked against the independent reference, and an unload that lets a stream in flight
finish while new requests are refused."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from prometheus_client import generate_latest
from tritonclient.utils import InferenceServerException

from gru_serve.client import Client
from gru_serve.core.sequences import Sequence
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as gpb
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2_grpc as gpb_grpc
from gru_serve.grpc.generated.inference import grpc_service_pb2 as pb
from gru_serve.grpc.generated.inference import grpc_service_pb2_grpc as pb_grpc
from gru_serve.ops.errors import ModelLoadError
from gru_serve.ops.settings import Settings
from gru_serve.server import ThreadedServer
from tests.support.oip import generate_request, ids_request, logits_of, tritonclient_grpc
from tests.support.serving import D2L, LONG, reference_generate, wait_until

EXTRA = "extra"
PROMPT = "time traveller"
# A stream long enough that, once its reader stops, flow control and backpressure hold it open
# on the server (about 8,000 tokens go out before it stalls on a 64 KiB window), short enough for
# the reference to generate in a few seconds.
IN_FLIGHT_TOKENS = 30_000
NO_BDP = [("grpc.http2.bdp_probe", 0)]  # the window stays 64 KiB: the stall above holds


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    (root / EXTRA / "1").mkdir(parents=True)
    shutil.copy(D2L, root / EXTRA / "1" / "model.onnx")
    (root / "broken").mkdir()
    (root / "broken" / "model.onnx").write_bytes(b"not an onnx model")
    (root / "not-a-model").mkdir()  # no model file: not listed
    return root


@pytest.fixture(scope="module")
def server(repo) -> Iterator[ThreadedServer]:
    srv = ThreadedServer(
        Settings(port=0, models=(str(D2L),), model_repository=str(repo), max_new_tokens=LONG), http=True
    )
    yield srv
    srv.stop()


@pytest.fixture
def http(server) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(server.http_target.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture
def stub(server) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def states(index: list[dict]) -> dict[str, tuple[str, str]]:
    return {m["name"]: (m["state"], m.get("reason", "")) for m in index}


def http_state(server: ThreadedServer, name: str) -> str:
    index = httpx.post(f"{server.http_target}/v2/repository/index", timeout=30).json()
    return states(index)[name][0]


def http_generate(server: ThreadedServer, model: str, n: int) -> httpx.Response:
    return httpx.post(
        f"{server.http_target}/v2/models/{model}-generate/generate",
        json={"prompt": PROMPT, "max_new_tokens": n},
        timeout=60,
    )


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_load_serves_the_model_on_every_api(server, http, stub, runtime):
    before = http.get_model_repository_index()
    assert states(before)[EXTRA] == ("UNAVAILABLE", "not loaded")
    assert states(before)["timemachine-d2l"] == ("READY", "")
    assert "not-a-model" not in states(before)
    got = tritonclient_grpc(
        server.target,
        [
            {"name": "index_before", "method": "get_model_repository_index"},
            {"name": "load", "method": "load_model", "args": [EXTRA]},
            {"name": "index_after", "method": "get_model_repository_index"},
            {"name": "model_ready", "method": "is_model_ready", "args": [EXTRA]},
            {"name": "generate_ready", "method": "is_model_ready", "args": [EXTRA + "-generate"]},
            {
                "name": "generate",
                "method": "generate",
                "args": [EXTRA + "-generate", PROMPT, {"max_new_tokens": 60}],
            },
        ],
    )
    assert got["load"] is None
    after = states(got["index_after"]["models"])
    assert after[EXTRA] == ("READY", "") and after["timemachine-d2l"] == ("READY", "")
    assert after["broken"][0] == "UNAVAILABLE"
    assert all(m["version"] == "1" for m in got["index_after"]["models"])
    assert got["model_ready"] is True and got["generate_ready"] is True
    want = reference_generate(D2L, PROMPT, 60)
    assert got["generate"]["text"] == want
    assert states(http.get_model_repository_index())[EXTRA] == ("READY", "")
    # The native API, the REST generate extension and the logits model serve it too.
    with Client(server.target) as client:
        text, finished = client.generate_text(PROMPT, max_new_tokens=60, model=EXTRA)
    assert text == want and finished.generated_tokens == 60
    resp = http_generate(server, EXTRA, 60)
    assert resp.status_code == 200 and resp.json()["text"] == want
    logits = logits_of(stub.ModelInfer(ids_request([[3, 4, 5]], model=EXTRA)))
    want_logits, _ = runtime.step(np.array([[3, 4, 5]], np.int64), runtime.zero_state())
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=0)
    # Statistics start with the model and count its endpoints apart.
    (stat,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name=EXTRA)).model_stats
    assert stat.inference_stats.success.count >= 1


def test_ready_only_index_and_reload(server, http, stub):
    http.load_model(EXTRA)
    http.load_model(EXTRA)  # a reload: the new copy serves at once
    ready = http.get_model_repository_index(query_params=None)
    assert states(ready)[EXTRA][0] == "READY"
    only = httpx.post(f"{server.http_target}/v2/repository/index", json={"ready": True}, timeout=30).json()
    assert {m["name"] for m in only} == {EXTRA, "timemachine-d2l"}
    listed = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
    assert {m.name for m in listed} == {EXTRA, "timemachine-d2l"}
    with Client(server.target) as client:
        text, _ = client.generate_text(PROMPT, max_new_tokens=30, model=EXTRA)
    assert text == reference_generate(D2L, PROMPT, 30)


def test_unload_refuses_new_work_and_lets_a_stream_in_flight_finish(server, http, stub):
    http.load_model(EXTRA)
    metrics = server.server.metrics.registry
    assert 'gru_serve_scheduler_batch_size{model="extra"}' in generate_latest(metrics).decode()
    with Client(server.target) as client:
        session = client.create_session("the time ", model=EXTRA).session_id
    stub.ModelInfer(ids_request([[3, 4]], model=EXTRA, seq=Sequence("kept", start=True)))

    channel = grpc.insecure_channel(server.target, options=NO_BDP)
    native = gpb_grpc.GenerationServiceStub(channel)
    stream = native.Generate(gpb.GenerateRequest(prompt=PROMPT, max_new_tokens=IN_FLIGHT_TOKENS, model=EXTRA))
    pieces = [t.text for t in next(stream).tokens]  # the request is in flight on the model
    unloaded: list[BaseException | None] = []

    def unload() -> None:
        client = httpclient.InferenceServerClient(server.http_target.removeprefix("http://"))
        try:
            client.unload_model(EXTRA)
            unloaded.append(None)
        except BaseException as e:
            unloaded.append(e)
        finally:
            client.close()

    unloader = threading.Thread(target=unload)
    unloader.start()
    try:
        wait_until(lambda: http_state(server, EXTRA) == "UNLOADING", timeout=30)
        # New work is refused at once, on every API; the stream goes on.
        with Client(server.target) as client:
            code, details = code_of(lambda: client.generate_text(PROMPT, max_new_tokens=5, model=EXTRA))
            assert code == grpc.StatusCode.UNAVAILABLE and "unloading" in details
            code, details = code_of(lambda: client.generate_text("x", session_id=session, max_new_tokens=5))
            assert code == grpc.StatusCode.UNAVAILABLE and "unloading" in details
        code, details = code_of(lambda: stub.ModelInfer(ids_request([[3]], model=EXTRA)))
        assert code == grpc.StatusCode.UNAVAILABLE and "unloading" in details
        req = generate_request(PROMPT, max_new_tokens=5)
        req.model_name = EXTRA + "-generate"
        code, details = code_of(lambda: stub.ModelInfer(req))
        assert code == grpc.StatusCode.UNAVAILABLE and "unloading" in details
        assert not stub.ModelReady(pb.ModelReadyRequest(name=EXTRA)).ready
        resp = http_generate(server, EXTRA, 5)
        assert resp.status_code == 503 and "unloading" in resp.json()["error"]
        assert unloader.is_alive()  # it waits for the stream
        finished = None
        for msg in stream:
            pieces.extend(t.text for t in msg.tokens)
            if msg.HasField("finished"):
                finished = msg.finished
    finally:
        channel.close()
        unloader.join(timeout=60)
    assert unloaded == [None]
    assert finished is not None and finished.reason == gpb.FINISH_REASON_LENGTH
    assert "".join(pieces) == reference_generate(D2L, PROMPT, IN_FLIGHT_TOKENS)

    # Gone: the index says so, every API says NOT_FOUND, its sessions name it.
    assert states(http.get_model_repository_index())[EXTRA] == ("UNAVAILABLE", "unloaded")
    index = states(
        tritonclient_grpc(server.target, [{"name": "i", "method": "get_model_repository_index"}])["i"][
            "models"
        ]
    )
    assert index[EXTRA] == ("UNAVAILABLE", "unloaded")
    with Client(server.target) as client:
        code, details = code_of(lambda: client.generate_text(PROMPT, max_new_tokens=5, model=EXTRA))
        assert code == grpc.StatusCode.NOT_FOUND and EXTRA in details
        code, details = code_of(lambda: client.generate_text("x", session_id=session, max_new_tokens=5))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and f"'{EXTRA}'" in details
        code, details = code_of(lambda: client.score("the time", session_id=session))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and f"'{EXTRA}'" in details
    code, details = code_of(lambda: stub.ModelInfer(ids_request([[3]], model=EXTRA, seq=Sequence("kept"))))
    assert code == grpc.StatusCode.NOT_FOUND and EXTRA in details
    assert http_generate(server, EXTRA, 5).status_code == 404
    assert not stub.ModelReady(pb.ModelReadyRequest(name=EXTRA)).ready
    scheduler_lines = [line for line in generate_latest(metrics).decode().splitlines() if "scheduler" in line]
    assert scheduler_lines and not any('model="extra"' in line for line in scheduler_lines)
    assert not any(t.name == "scheduler-extra" and t.is_alive() for t in threading.enumerate())

    # Loaded again, the same file: its session and sequence go on where they were.
    http.load_model(EXTRA)
    with Client(server.target) as client:
        text, _ = client.generate_text("", session_id=session, max_new_tokens=20)
    assert text == reference_generate(D2L, "the time ", 20)
    stub.ModelInfer(ids_request([[5]], model=EXTRA, seq=Sequence("kept", end=True)))


def test_unloading_a_model_that_is_not_loaded_is_a_no_op(server, http):
    http.unload_model("broken")
    http.unload_model("broken")
    assert states(http.get_model_repository_index())["broken"][0] == "UNAVAILABLE"


def test_load_refusals(server, http, stub):
    got = tritonclient_grpc(
        server.target,
        [
            {"name": "unknown", "method": "load_model", "args": ["no-such-model"]},
            {"name": "unload_unknown", "method": "unload_model", "args": ["no-such-model"]},
            {"name": "config", "method": "load_model", "args": [EXTRA], "kwargs": {"config": "{}"}},
            {"name": "broken", "method": "load_model", "args": ["broken"]},
            {"name": "index", "method": "get_model_repository_index"},
        ],
    )
    assert got["unknown"]["error"]["status"] == "StatusCode.NOT_FOUND"
    assert "no-such-model" in got["unknown"]["error"]["message"]
    assert got["unload_unknown"]["error"]["status"] == "StatusCode.NOT_FOUND"
    assert got["config"]["error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "config" in got["config"]["error"]["message"]
    assert got["broken"]["error"]["status"] == "StatusCode.FAILED_PRECONDITION"
    assert "not an ONNX model" in got["broken"]["error"]["message"]
    state, reason = states(got["index"]["models"])["broken"]
    assert state == "UNAVAILABLE" and "load failed" in reason and "not an ONNX model" in reason
    with pytest.raises(InferenceServerException) as err:
        http.load_model("no-such-model")
    assert err.value.status() == "404" and "no-such-model" in err.value.message()
    code, details = code_of(
        lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="../extra"))
    )
    assert code == grpc.StatusCode.NOT_FOUND and "../extra" in details


def test_without_a_repository_load_and_unload_are_refused():
    srv = ThreadedServer(Settings(port=0, models=(str(D2L),)), http=True)
    try:
        got = tritonclient_grpc(
            srv.target,
            [
                {"name": "index", "method": "get_model_repository_index"},
                {"name": "load", "method": "load_model", "args": ["timemachine-d2l"]},
                {"name": "unload", "method": "unload_model", "args": ["timemachine-d2l"]},
            ],
        )
        assert states(got["index"]["models"]) == {"timemachine-d2l": ("READY", "")}
        for name in ("load", "unload"):
            error = got[name]["error"]
            assert error["status"] == "StatusCode.FAILED_PRECONDITION"
            assert "no model repository" in error["message"] and "--model-repository" in error["message"]
        http = httpclient.InferenceServerClient(srv.http_target.removeprefix("http://"))
        try:
            with pytest.raises(InferenceServerException) as err:
                http.unload_model("timemachine-d2l")
            assert err.value.status() == "400" and "no model repository" in err.value.message()
            assert http.is_model_ready("timemachine-d2l")
        finally:
            http.close()
    finally:
        srv.stop()


def test_a_repository_that_is_not_a_folder_stops_the_start(tmp_path):
    with pytest.raises(ModelLoadError, match="model_repository"):
        ThreadedServer(Settings(port=0, models=(str(D2L),), model_repository=str(tmp_path / "missing")))
