"""The Open Inference Protocol service (inference.GRPCInferenceService) over real gRPC.

tritonclient.grpc is never imported here: it and our generated stubs both register
`inference.*` in protobuf's default pool. The unmodified tritonclient runs in a subprocess
(tests/support/triton_client_check.py) and prints what it saw; everything else uses our own stubs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from gru_serve.client import Client
from gru_serve.core.sequences import Sequence, sequence_session_id
from gru_serve.grpc.generated.inference import grpc_service_pb2 as pb
from gru_serve.grpc.generated.inference import grpc_service_pb2_grpc as pb_grpc
from gru_serve.ops.errors import SessionNotFound
from tests.support.oip import (
    GENERATE,
    MODEL,
    TRITON_CHECK,
    Tensor,
    generate_request,
    ids_request,
    logits_of,
    text_of,
)
from tests.support.serving import LONG, reference_generate, start_server, wait_until


@pytest.fixture(scope="module")
def server():
    srv = start_server()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def chained(runtime, chunks: list[list[int]]) -> list[np.ndarray]:
    """The in-process reference: ModelRuntime.step chained from a zero state."""
    state, out = runtime.zero_state(), []
    for chunk in chunks:
        logits, state = runtime.step(np.array([chunk], np.int64), state)
        out.append(logits)
    return out


def gone(server, session_id: str) -> bool:
    try:
        server.call(server.service.store.get(session_id))
    except SessionNotFound:
        return True
    return False


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


# -- tritonclient.grpc, unmodified, in a subprocess --


CHUNKS = [[3, 4, 5, 1], [9, 2], [7, 7, 1, 6, 2]]


@pytest.fixture(scope="module")
def triton(server, runtime) -> dict:
    plan = [
        {"name": "metadata", "scenario": "metadata", "model": MODEL, "generate": GENERATE},
        {"name": "seq_int", "scenario": "sequence", "model": MODEL, "sequence_id": 4242, "chunks": CHUNKS},
        {
            "name": "seq_str",
            "scenario": "sequence",
            "model": MODEL,
            "sequence_id": "chat-7",
            "chunks": CHUNKS,
        },
        {
            "name": "stream",
            "scenario": "stream",
            "model": GENERATE,
            "prompt": "time traveller",
            "max_new_tokens": 100,
        },
        {"name": "bad", "scenario": "bad_inputs", "model": MODEL},
    ]
    proc = subprocess.run(
        [sys.executable, str(TRITON_CHECK), server.target],
        input=json.dumps(plan),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    for name, result in results.items():
        assert "exception" not in result, f"{name}: {result.get('trace')}"
    return results


def test_tritonclient_liveness_readiness_and_metadata(triton, runtime):
    m = triton["metadata"]
    assert m["live"] and m["ready"] and m["model_ready"] and m["generate_ready"]
    assert not m["unknown_ready"]
    assert m["server_metadata"]["name"] == "gru-serve"
    assert "sequence" in m["server_metadata"]["extensions"]
    vocab = runtime.metadata.vocab_size
    md = m["model_metadata"]
    assert md["name"] == MODEL and md["versions"] == ["1"]
    assert md["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": ["-1", "-1"]}]
    assert md["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "-1", str(vocab)]}]
    gm = m["generate_metadata"]
    assert gm["inputs"] == [{"name": "prompt", "datatype": "BYTES", "shape": ["1"]}]
    assert [(o["name"], o["datatype"]) for o in gm["outputs"]] == [("text", "BYTES"), ("token_ids", "INT64")]
    config = m["model_config"]["config"]
    assert config["name"] == MODEL and config["platform"] == "onnxruntime_onnx"
    (state,) = config["sequence_batching"]["state"]
    assert (state["input_name"], state["output_name"]) == ("state", "state_out")
    assert [i["name"] for i in config["input"]] == ["input_ids"]
    assert m["generate_config"]["config"]["model_transaction_policy"] == {"decoupled": True}
    assert m["statistics"]["model_stats"][0]["name"] == MODEL
    assert m["unknown_metadata"]["status"] == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("name, sequence_id", [("seq_int", 4242), ("seq_str", "chat-7")])
def test_tritonclient_sequence_matches_the_chained_in_process_run(triton, server, runtime, name, sequence_id):
    got = triton[name]
    for served, want in zip(got["logits"], chained(runtime, CHUNKS), strict=True):
        np.testing.assert_allclose(np.array(served, np.float32), want, atol=1e-5, rtol=0)
    # sequence_end deleted the session: the sequence is unknown again.
    assert gone(server, sequence_session_id("", MODEL, sequence_id))
    assert got["after_end"]["status"] == "StatusCode.NOT_FOUND"
    assert "sequence_start" in got["after_end"]["message"]


def test_tritonclient_stream_text_equals_native_generate(triton, server):
    got = triton["stream"]
    with Client(server.target) as client:
        native, _ = client.generate_text("time traveller", max_new_tokens=100)
    assert len(native) == 100 and got["text"] == native
    assert len(got["token_ids"]) == 100
    assert got["final"] == {"outputs": 0, "finish_reason": "length", "generated_tokens": 100}
    # The bad request (an unknown parameter) came back as a message; the stream went on.
    assert len(got["errors"]) == 1 and "max_tokens" in got["errors"][0]
    assert "INVALID_ARGUMENT" in got["errors"][0]


def test_tritonclient_bad_inputs(triton):
    bad = triton["bad"]
    assert bad["wrong_dtype"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "input_ids" in bad["wrong_dtype"]["message"] and "INT64" in bad["wrong_dtype"]["message"]
    assert bad["wrong_shape"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "input_ids" in bad["wrong_shape"]["message"] and "[3]" in bad["wrong_shape"]["message"]
    assert bad["byte_length"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "32 bytes" in bad["byte_length"]["message"] and "40" in bad["byte_length"]["message"]
    assert bad["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "no-such-model" in bad["unknown_model"]["message"]
    assert bad["unknown_sequence"]["status"] == "StatusCode.NOT_FOUND"
    assert "never-started" in bad["unknown_sequence"]["message"]


# -- our stubs: the same protocol, in process --


def test_stateless_infer_from_zero_state_raw_and_typed_contents(stub, runtime):
    ids = [[1, 2, 3, 4], [5, 6, 7, 8]]
    want, _ = runtime.step(np.array(ids, np.int64), runtime.zero_state(2))
    for raw in (True, False):
        resp = stub.ModelInfer(ids_request(ids, raw=raw))
        np.testing.assert_allclose(logits_of(resp), want, atol=1e-5, rtol=0)
        assert resp.model_name == MODEL and resp.model_version == "1"


def test_sequence_lives_in_the_native_store_and_native_generate_continues_it(server, stub, runtime):
    ids = runtime.tokenizer.encode("time traveller")
    stub.ModelInfer(ids_request([ids[:5]], seq=Sequence(11, start=True)))
    second = logits_of(stub.ModelInfer(ids_request([ids[5:]], seq=Sequence(11))))
    np.testing.assert_allclose(second, chained(runtime, [ids[:5], ids[5:]])[1], atol=1e-5, rtol=0)
    sid = sequence_session_id("", MODEL, 11)
    assert server.call(server.service.store.get(sid)).tokens_seen == len(ids)
    with Client(server.target) as client:
        text, fin = client.generate_text("", session_id=sid, max_new_tokens=30)
    assert text == reference_generate(runtime, "time traveller", 30)
    assert fin.tokens_seen == len(ids) + 30


def test_start_on_an_existing_sequence_resets_it(stub, runtime):
    first = logits_of(stub.ModelInfer(ids_request([[3, 4, 5]], seq=Sequence("r", start=True))))
    stub.ModelInfer(ids_request([[6, 7]], seq=Sequence("r")))
    again = logits_of(stub.ModelInfer(ids_request([[3, 4, 5]], seq=Sequence("r", start=True))))
    np.testing.assert_array_equal(first, again)


def test_integer_and_string_ids_are_different_sequences(stub, runtime):
    stub.ModelInfer(ids_request([[3]], seq=Sequence(77, start=True)))
    code, details = code_of(lambda: stub.ModelInfer(ids_request([[3]], seq=Sequence("77"))))
    assert code == grpc.StatusCode.NOT_FOUND and "'77'" in details


def test_sequence_ids_are_private_to_owner_and_model():
    ids = {
        sequence_session_id(owner, model, seq_id)
        for owner in ("", "alice")
        for model in ("a", "b")
        for seq_id in (1, "1", 2)
    }
    assert len(ids) == 12
    assert all(i.startswith("seq-") and len(i) == 36 for i in ids)


def test_a_failed_start_leaves_no_sequence_behind(server, stub):
    code, _ = code_of(lambda: stub.ModelInfer(ids_request([[3, 999]], seq=Sequence("bad", start=True))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert gone(server, sequence_session_id("", MODEL, "bad"))


@pytest.mark.parametrize(
    "request_, code, words",
    [
        (ids_request([[1, 2, 99]]), grpc.StatusCode.INVALID_ARGUMENT, ["input_ids", "[0, 28)", "99"]),
        (ids_request([[]]), grpc.StatusCode.INVALID_ARGUMENT, ["input_ids", "no tokens"]),
        (ids_request([[1, 2]], model="nope"), grpc.StatusCode.NOT_FOUND, ["nope", MODEL]),
        (ids_request([[1, 2]], max_tokens=3), grpc.StatusCode.INVALID_ARGUMENT, ["max_tokens"]),
        (ids_request([[1], [2]], seq=Sequence(5, start=True)), grpc.StatusCode.INVALID_ARGUMENT, ["batch 1"]),
        (
            pb.ModelInferRequest(model_name=MODEL, model_version="2"),
            grpc.StatusCode.NOT_FOUND,
            ["version '2'"],
        ),
        (
            pb.ModelInferRequest(model_name=MODEL),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["input 'input_ids' is missing"],
        ),
        (
            pb.ModelInferRequest(
                model_name=MODEL,
                inputs=[Tensor(name="input_ids", datatype="INT64", shape=[1, 3])],
                raw_input_contents=[b"x" * 24, b"y"],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["raw_input_contents has 2 entries for 1 inputs"],
        ),
        (
            pb.ModelInferRequest(
                model_name=MODEL,
                inputs=[
                    Tensor(
                        name="input_ids",
                        datatype="INT64",
                        shape=[1, 3],
                        contents=pb.InferTensorContents(int64_contents=[1, 2]),
                    )
                ],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["int64_contents has 2 values", "needs 3"],
        ),
    ],
    ids=[
        "token-range",
        "empty",
        "unknown-model",
        "unknown-parameter",
        "sequence-batch",
        "version",
        "missing",
        "raw-count",
        "contents-count",
    ],
)
def test_bad_requests_name_what_is_wrong(stub, request_, code, words):
    got, details = code_of(lambda: stub.ModelInfer(request_))
    assert got == code, details
    for word in words:
        assert word in details


def test_bad_parameter_types(stub):
    req = ids_request([[1]])
    req.parameters["sequence_id"].double_param = 1.5
    code, details = code_of(lambda: stub.ModelInfer(req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sequence_id" in details
    req = generate_request("time", max_new_tokens=5)
    req.parameters["temperature"].string_param = "hot"
    code, details = code_of(lambda: stub.ModelInfer(req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in details
    code, details = code_of(lambda: stub.ModelInfer(generate_request("time", temperature=1000.0)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in details


def test_unary_generate_returns_everything_in_one_response(server, stub):
    resp = stub.ModelInfer(generate_request("time traveller", "u1", max_new_tokens=40, top_k=1, seed=3))
    texts, ids = text_of(resp)
    with Client(server.target) as client:
        native, _ = client.generate_text("time traveller", max_new_tokens=40)
    assert "".join(texts) == native and len(ids) == 40
    assert resp.id == "u1" and resp.parameters["finish_reason"].string_param == "length"
    assert "triton_final_response" not in resp.parameters


def test_generate_stop_parameter_one_string_or_a_json_list(stub, runtime):
    full = reference_generate(runtime, "time traveller", 100)
    stop = full[20:24]
    for value in (stop, json.dumps(["qqqq", stop])):
        resp = stub.ModelInfer(generate_request("time traveller", max_new_tokens=100, stop=value))
        texts, _ = text_of(resp)
        assert "".join(texts) == full[: full.index(stop) + len(stop)]
        assert resp.parameters["finish_reason"].string_param == "stop"


def test_stream_runs_a_sequence_in_order_and_reports_errors_in_band(stub, runtime):
    reqs = [
        ids_request([CHUNKS[0]], seq=Sequence("s1", start=True)),
        ids_request([CHUNKS[1]], seq=Sequence("s1")),
        ids_request([[1, 2]], model="nope"),
        ids_request([CHUNKS[2]], seq=Sequence("s1", end=True)),
    ]
    for i, r in enumerate(reqs):
        r.id = f"r{i}"
    got = list(stub.ModelStreamInfer(iter(reqs)))
    assert [m.infer_response.id for m in got] == ["r0", "r1", "r2", "r3"]
    assert got[2].error_message.startswith("[NOT_FOUND]") and "nope" in got[2].error_message
    want = chained(runtime, CHUNKS)
    for msg, logits in zip([got[0], got[1], got[3]], want, strict=True):
        assert not msg.error_message
        assert msg.infer_response.parameters["triton_final_response"].bool_param
        np.testing.assert_allclose(logits_of(msg.infer_response), logits, atol=1e-5, rtol=0)


def test_stream_generation_continues_a_sequence(server, stub, runtime):
    """10 + 10 tokens on one sequence, over a stream, equal 20 in one go."""
    reqs = [
        generate_request("time traveller", "a", Sequence("g", start=True), max_new_tokens=10),
        generate_request("", "b", Sequence("g", end=True), max_new_tokens=10),
    ]
    for r in reqs:
        r.parameters["triton_enable_empty_final_response"].bool_param = True
    texts: dict[str, str] = {"a": "", "b": ""}
    finals = []
    for msg in stub.ModelStreamInfer(iter(reqs)):
        assert not msg.error_message, msg.error_message
        resp = msg.infer_response
        pieces, _ = text_of(resp)
        texts[resp.id] += "".join(pieces)
        if resp.parameters["triton_final_response"].bool_param:
            assert not resp.outputs
            finals.append((resp.id, resp.parameters["tokens_seen"].int64_param))
    assert texts["a"] + texts["b"] == reference_generate(runtime, "time traveller", 20)
    assert finals == [("a", 24), ("b", 34)]
    assert gone(server, sequence_session_id("", MODEL, "g"))


def test_stream_without_empty_final_sends_only_token_responses(stub):
    msgs = list(stub.ModelStreamInfer(iter([generate_request("time", max_new_tokens=5)])))
    assert msgs and all(m.infer_response.outputs for m in msgs)
    assert not any(m.infer_response.parameters["triton_final_response"].bool_param for m in msgs)
    assert sum(len(text_of(m.infer_response)[1]) for m in msgs) == 5


def test_statistics_count_requests(stub):
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL)).model_stats[0]
    stub.ModelInfer(ids_request([[1, 2], [3, 4]]))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(ids_request([[1, 99]]))
    after = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL)).model_stats[0]
    assert after.inference_count - before.inference_count == 2
    assert after.execution_count - before.execution_count == 1
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    names = [s.name for s in stub.ModelStatistics(pb.ModelStatisticsRequest()).model_stats]
    assert sorted(names) == sorted([MODEL, GENERATE])


def test_sequences_belong_to_their_token_and_ready_turns_off_on_drain():
    srv = start_server(auth_tokens=("tok-a", "tok-b"))
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            a = (("authorization", "Bearer tok-a"),)
            b = (("authorization", "Bearer tok-b"),)
            code, _ = code_of(lambda: stub.ModelInfer(ids_request([[1]]), metadata=()))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            stub.ModelInfer(ids_request([[1, 2]], seq=Sequence(9, start=True)), metadata=a)
            # The same id under another token is another (unknown) sequence.
            code, _ = code_of(lambda: stub.ModelInfer(ids_request([[3]], seq=Sequence(9)), metadata=b))
            assert code == grpc.StatusCode.NOT_FOUND
            stub.ModelInfer(ids_request([[3]], seq=Sequence(9)), metadata=a)
            assert stub.ServerReady(pb.ServerReadyRequest(), metadata=a).ready
    finally:
        srv.stop()
    assert not srv.server.dataplane.ready


def test_cancelling_a_stream_leaves_the_sequence_as_it_was(server, stub, runtime):
    stub.ModelInfer(ids_request([runtime.tokenizer.encode("time traveller")], seq=Sequence("c", start=True)))
    sid = sequence_session_id("", MODEL, "c")

    def snapshot():
        rec = server.call(server.service.store.get(sid))
        return rec.state.tobytes(), rec.logits.tobytes(), rec.tokens_seen

    before = snapshot()
    call = stub.ModelStreamInfer(iter([generate_request("", "long", Sequence("c"), max_new_tokens=LONG)]))
    first = next(call)
    assert not first.error_message and first.infer_response.outputs
    call.cancel()
    wait_until(lambda: server.service.active_streams == 0)
    assert snapshot() == before
    # The lease is free: the sequence takes the next request.
    resp = stub.ModelInfer(ids_request([[1]], seq=Sequence("c", end=True)))
    assert logits_of(resp).shape == (1, 1, runtime.metadata.vocab_size)
