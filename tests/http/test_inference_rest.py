"""The Open Inference Protocol over HTTP/REST (gru_serve.http.inference_api), on real sockets.

References that share no code with the server's REST layer: the unmodified tritonclient.http
in process; the unmodified tritonclient.grpc in a subprocess (tests/support/triton_client_check.py:
it cannot share a process with our generated stubs); the exported ONNX file run by a bare
onnxruntime session with its state chained by hand; and native gRPC Generate.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from gru_serve.client import Client
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as gen_pb
from gru_serve.grpc.generated.inference import grpc_service_pb2 as pb
from gru_serve.grpc.generated.inference import grpc_service_pb2_grpc as pb_grpc
from tests.support.oip import TRITON_CHECK
from tests.support.serving import D2L, plain_model

MODEL = "timemachine-d2l"
GENERATE = MODEL + "-generate"
CHUNKS = [[3, 4, 5, 1], [9, 2], [7, 7, 1, 6, 2]]
HEADER = "Inference-Header-Content-Length"
ERROR_STATUSES = {400, 404}  # what a malformed or unknown request may get


# -- references --


def plain_chained(chunks: list[list[int]]) -> list[np.ndarray]:
    """Logits of the exported file in a bare onnxruntime session, state chained by hand."""
    session, meta = plain_model(str(D2L))
    state = np.zeros((1, int(meta["gru_serve.num_layers"]), int(meta["gru_serve.hidden_size"])), np.float32)
    out = []
    for chunk in chunks:
        logits, state = session.run(
            ["logits", "state_out"], {"input_ids": np.array([chunk], np.int64), "state": state}
        )
        out.append(logits)
    return out


def plain_stateless(ids: list[list[int]]) -> np.ndarray:
    session, meta = plain_model(str(D2L))
    shape = (len(ids), int(meta["gru_serve.num_layers"]), int(meta["gru_serve.hidden_size"]))
    (logits,) = session.run(
        ["logits"], {"input_ids": np.array(ids, np.int64), "state": np.zeros(shape, np.float32)}
    )
    return logits


def vocab_size() -> int:
    _, meta = plain_model(str(D2L))
    return len(json.loads(meta["gru_serve.vocab"]))


@pytest.fixture(scope="module")
def grpc_triton(server) -> dict[str, Any]:
    """tritonclient.grpc's logits for the same sequences, against the same server's gRPC port."""
    plan = [
        {"name": "seq_int", "scenario": "sequence", "model": MODEL, "sequence_id": 4242, "chunks": CHUNKS},
        {
            "name": "seq_str",
            "scenario": "sequence",
            "model": MODEL,
            "sequence_id": "chat-7",
            "chunks": CHUNKS,
        },
    ]
    proc = subprocess.run(
        [sys.executable, str(TRITON_CHECK), server.target],
        input=json.dumps(plan),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    for name, result in results.items():
        assert "exception" not in result, f"{name}: {result.get('trace')}"
    return results


@pytest.fixture(scope="module")
def triton(server) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(url=server.http_target.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_target, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def ids_input(ids: list[list[int]], binary: bool = True) -> httpclient.InferInput:
    arr = np.array(ids, np.int64)
    inp = httpclient.InferInput("input_ids", list(arr.shape), "INT64")
    inp.set_data_from_numpy(arr, binary_data=binary)
    return inp


def assert_error(response: httpx.Response, status: int, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert fragment in body["error"]


# -- tritonclient.http, unmodified --


def test_tritonclient_http_health_metadata_and_config(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(GENERATE)
    assert triton.is_model_ready(MODEL, "1") and not triton.is_model_ready(MODEL, "2")
    assert not triton.is_model_ready("no-such-model")
    meta = triton.get_server_metadata()
    assert meta["name"] == "gru-serve" and meta["version"]
    assert {"sequence", "binary_tensor_data", "generate"} <= set(meta["extensions"])
    vocab = vocab_size()
    for version in ("", "1"):
        md = triton.get_model_metadata(MODEL, version)
        assert md["name"] == MODEL and md["versions"] == ["1"] and md["platform"] == "onnxruntime_onnx"
        assert md["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}]
        assert md["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, -1, vocab]}]
    gm = triton.get_model_metadata(GENERATE)
    assert gm["inputs"] == [{"name": "prompt", "datatype": "BYTES", "shape": [1]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in gm["outputs"]] == [
        ("text", "BYTES", [-1]),
        ("token_ids", "INT64", [-1]),
    ]
    config = triton.get_model_config(MODEL)  # the config itself, as Triton's REST returns it
    assert config["name"] == MODEL and config["platform"] == "onnxruntime_onnx"
    assert config["input"][0]["dims"] == [-1] and config["output"][0]["dims"] == [-1, vocab]
    batching = config["sequence_batching"]
    assert isinstance(batching["max_sequence_idle_microseconds"], int)
    (state,) = batching["state"]
    assert (state["input_name"], state["output_name"]) == ("state", "state_out")
    assert all(isinstance(d, int) for d in state["dims"])
    assert config["default_model_filename"] == ""  # fields with no presence are printed, as Triton does
    assert triton.get_model_config(GENERATE, "1")["model_transaction_policy"] == {"decoupled": True}
    with pytest.raises(InferenceServerException) as err:
        triton.get_model_metadata("no-such-model")
    assert err.value.status() == "404" and "no-such-model" in err.value.message()


@pytest.mark.parametrize("name, sequence_id", [("seq_int", 4242), ("seq_str", "chat-7")])
def test_tritonclient_http_sequence_equals_grpc_and_the_plain_onnx_model(
    triton, grpc_triton, name, sequence_id
):
    reference = plain_chained(CHUNKS)
    from_grpc = grpc_triton[name]["logits"]
    for i, chunk in enumerate(CHUNKS):
        result = triton.infer(
            MODEL,
            [ids_input([chunk])],
            outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)],
            request_id=f"req-{i}",
            sequence_id=sequence_id,
            sequence_start=i == 0,
            sequence_end=i == len(CHUNKS) - 1,
        )
        assert result.get_response()["id"] == f"req-{i}"
        logits = result.as_numpy("logits")
        assert logits.shape == (1, len(chunk), vocab_size())
        np.testing.assert_allclose(logits, np.array(from_grpc[i], np.float32), atol=1e-5, rtol=0)
        np.testing.assert_allclose(logits, reference[i], atol=1e-5, rtol=0)
    # sequence_end ended it: continuing without sequence_start is an unknown sequence.
    with pytest.raises(InferenceServerException) as err:
        triton.infer(MODEL, [ids_input([CHUNKS[0]])], sequence_id=sequence_id)
    assert err.value.status() == "404" and "sequence_start" in err.value.message()


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False, None])
def test_tritonclient_http_binary_and_json_tensors(triton, binary_in, binary_out):
    ids = [[1, 2, 3, 4], [5, 6, 7, 8]]
    # binary_out None: no outputs named, so tritonclient asks for binary_data_output.
    outputs = (
        None if binary_out is None else [httpclient.InferRequestedOutput("logits", binary_data=binary_out)]
    )
    result = triton.infer(MODEL, [ids_input(ids, binary_in)], outputs=outputs, request_id="b")
    (out,) = result.get_response()["outputs"]
    assert ("data" in out) == (binary_out is False)
    np.testing.assert_allclose(result.as_numpy("logits"), plain_stateless(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_tritonclient_http_compressed_requests(triton, compression):
    ids = [[4, 3, 2, 1]]
    result = triton.infer(
        MODEL,
        [ids_input(ids)],
        request_compression_algorithm=compression,
        response_compression_algorithm=compression,  # asked for; answered uncompressed
    )
    np.testing.assert_allclose(result.as_numpy("logits"), plain_stateless(ids), atol=1e-5, rtol=0)


def test_compressed_bodies_are_bounded_and_checked(http, server):
    limit = server.service.settings.max_body_bytes
    bomb = gzip.compress(b" " * (limit + 1))  # a few kB that inflate past the body limit
    headers = {"content-encoding": "gzip"}
    assert_error(http.post(f"/v2/models/{MODEL}/infer", content=bomb, headers=headers), 413, "inflated")
    assert_error(http.post(f"/v2/models/{MODEL}/infer", content=b"{}", headers=headers), 400, "gzip")
    truncated = gzip.compress(b'{"inputs": []}')[:-12]
    assert_error(http.post(f"/v2/models/{MODEL}/infer", content=truncated, headers=headers), 400, "gzip")
    brotli = {"content-encoding": "br"}
    assert_error(http.post(f"/v2/models/{MODEL}/infer", content=b"{}", headers=brotli), 400, "br")


def test_tritonclient_http_errors(triton):
    wrong = httpclient.InferInput("input_ids", [1, 3], "INT32")
    wrong.set_data_from_numpy(np.array([[1, 2, 3]], np.int32))
    with pytest.raises(InferenceServerException) as err:
        triton.infer(MODEL, [wrong])
    assert err.value.status() == "400" and "INT64" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        triton.infer("no-such-model", [ids_input([[1, 2]])])
    assert err.value.status() == "404"


# -- one sequence, two transports --


def grpc_ids_request(ids: list[int], sequence_id: int | str, start: bool = False, end: bool = False):
    tensor = pb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=[1, len(ids)])
    req = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor])
    req.raw_input_contents.append(np.array(ids, "<i8").tobytes())
    if isinstance(sequence_id, str):
        req.parameters["sequence_id"].string_param = sequence_id
    else:
        req.parameters["sequence_id"].uint64_param = sequence_id
    req.parameters["sequence_start"].bool_param = start
    req.parameters["sequence_end"].bool_param = end
    return req


def grpc_logits(resp: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(tuple(resp.outputs[0].shape))


def rest_logits(http: httpx.Client, ids: list[int], sequence_id: int | str, **flags: bool) -> np.ndarray:
    body = {
        "parameters": {"sequence_id": sequence_id, **flags},
        "inputs": [{"name": "input_ids", "shape": [1, len(ids)], "datatype": "INT64", "data": ids}],
    }
    r = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    return np.array(out["data"], np.float32).reshape(out["shape"])


@pytest.mark.parametrize("sequence_id", [77, "cross-transport"])
def test_a_sequence_goes_on_across_rest_and_grpc(http, stub, sequence_id):
    want = plain_chained(CHUNKS)
    a, b, c = CHUNKS
    got = [rest_logits(http, a, sequence_id, sequence_start=True)]
    got.append(grpc_logits(stub.ModelInfer(grpc_ids_request(b, sequence_id))))
    got.append(rest_logits(http, c, sequence_id, sequence_end=True))
    # and the other way round
    got.append(grpc_logits(stub.ModelInfer(grpc_ids_request(a, sequence_id, start=True))))
    got.append(rest_logits(http, b, sequence_id))
    got.append(grpc_logits(stub.ModelInfer(grpc_ids_request(c, sequence_id, end=True))))
    for served, reference in zip(got, want + want, strict=True):
        np.testing.assert_allclose(served, reference, atol=1e-5, rtol=0)


# -- the generate extension --


def sse_events(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: ")
                events.append(json.loads(line.removeprefix("data: ")))
    return events


@pytest.mark.parametrize(
    "sampling",
    [{}, {"temperature": 0.9, "top_k": 5, "seed": 1234}],
    ids=["greedy", "seeded"],
)
def test_generate_and_generate_stream_equal_grpc_generate(server, http, sampling):
    prompt, n = "the time traveller", 60
    with Client(server.target) as client:
        native, _ = client.generate_text(prompt, max_new_tokens=n, params=gen_pb.SamplingParams(**sampling))
    assert len(native) == n

    # parameters as top-level fields and in `parameters`, both as Triton's generate takes them
    body = {"prompt": prompt, "max_new_tokens": n, "parameters": {**sampling, "stream": False}}
    events = sse_events(http, f"/v2/models/{GENERATE}/generate_stream", body)
    *tokens, final = events
    assert tokens and all(e["model_name"] == GENERATE and e["model_version"] == "1" for e in events)
    assert all(not e["parameters"]["triton_final_response"] for e in tokens)
    assert "".join(e["text"] for e in tokens) == native
    token_ids = [t for e in tokens for t in e["token_ids"]]
    assert len(token_ids) == n
    assert final["text"] == "" and final["token_ids"] == []
    assert final["parameters"]["triton_final_response"] is True
    assert final["parameters"]["finish_reason"] == "length" and final["parameters"]["generated_tokens"] == n

    r = http.post(f"/v2/models/{GENERATE}/versions/1/generate", json={**body, "id": "g1"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    whole = r.json()
    assert (whole["model_name"], whole["id"], whole["text"]) == (GENERATE, "g1", native)
    assert whole["token_ids"] == token_ids
    assert whole["parameters"]["finish_reason"] == "length"


def test_generate_continues_a_sequence_that_infer_started(server, http):
    prompt = "the time traveller"
    _, meta = plain_model(str(D2L))
    index = {t: i for i, t in enumerate(json.loads(meta["gru_serve.vocab"]))}
    rest_logits(http, [index[c] for c in prompt], "gen-seq", sequence_start=True)
    body = {"prompt": "", "max_new_tokens": 30, "sequence_id": "gen-seq", "sequence_end": True}
    r = http.post(f"/v2/models/{GENERATE}/generate", json=body)
    assert r.status_code == 200, r.text
    with Client(server.target) as client:
        native, _ = client.generate_text(prompt, max_new_tokens=30)
    assert r.json()["text"] == native
    assert r.json()["parameters"]["tokens_seen"] == len(prompt) + 30
    # sequence_end ended it
    assert_error(http.post(f"/v2/models/{GENERATE}/generate", json=body), 404, "gen-seq")


def test_generate_errors_before_the_stream_are_json_with_their_status(http):
    for path in ("generate", "generate_stream"):
        bad = http.post(f"/v2/models/{GENERATE}/{path}", json={"prompt": "x", "max_tokens": 5})
        assert_error(bad, 400, "max_tokens")
        assert_error(http.post(f"/v2/models/{MODEL}/{path}", json={"input_ids": "x"}), 400, "infer")
        assert_error(
            http.post(f"/v2/models/no-such-model/{path}", json={"prompt": "x"}), 404, "no-such-model"
        )
        assert_error(http.post(f"/v2/models/{GENERATE}/{path}", json={"prompt": 5}), 400, "prompt")
        assert_error(http.post(f"/v2/models/{GENERATE}/{path}", content=b"{"), 400, "JSON")


# -- bad requests --


def plain(body: Any) -> tuple[bytes, dict[str, str]]:
    return json.dumps(body).encode(), {}


def binary_body(header: dict[str, Any], data: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + data, {HEADER: str(len(text))}


def ids_tensor(shape: list[int], data: Any = None, datatype: str = "INT64", **params: Any) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": "input_ids", "shape": shape, "datatype": datatype}
    if data is not None:
        tensor["data"] = data
    if params:
        tensor["parameters"] = params
    return tensor


ONE = [ids_tensor([1, 1], [1])]
IDS8 = np.arange(1, 4, dtype="<i8").tobytes()  # 3 INT64 values: 24 bytes
BINARY3 = {"inputs": [ids_tensor([1, 3], binary_data_size=24)]}
BINARY4 = {"inputs": [ids_tensor([1, 4], binary_data_size=24)]}
BAD = [
    ("unknown model", "no-such-model", plain({"inputs": []}), 404, "no-such-model"),
    ("unknown version", f"{MODEL}/versions/7", plain({"inputs": []}), 404, "version"),
    ("malformed JSON", MODEL, (b'{"inputs": [', {}), 400, "not valid JSON"),
    ("not an object", MODEL, plain([1, 2]), 400, "JSON object"),
    ("no inputs", MODEL, plain({}), 400, "inputs"),
    ("unknown field", MODEL, plain({"inputs": ONE, "input": []}), 400, "input"),
    ("wrong datatype", MODEL, plain({"inputs": [ids_tensor([1, 2], [1, 2], "INT32")]}), 400, "INT64"),
    ("shape/data mismatch", MODEL, plain({"inputs": [ids_tensor([1, 3], [1, 2])]}), 400, "needs 3"),
    ("non-integer data", MODEL, plain({"inputs": [ids_tensor([1, 2], [1, 2.5])]}), 400, "integers"),
    ("no data", MODEL, plain({"inputs": [ids_tensor([1, 2])]}), 400, "no data"),
    ("token out of vocabulary", MODEL, plain({"inputs": [ids_tensor([1, 1], [10**6])]}), 400, "token ids"),
    ("unknown output", MODEL, plain({"inputs": ONE, "outputs": [{"name": "x"}]}), 400, "output 'x'"),
    ("unknown parameter", MODEL, plain({"parameters": {"foo": 1}, "inputs": ONE}), 400, "foo"),
    (
        "null parameter",
        MODEL,
        plain({"parameters": {"sequence_id": None}, "inputs": ONE}),
        400,
        "sequence_id",
    ),
    (
        "shared memory",
        MODEL,
        plain({"inputs": [ids_tensor([1, 1], shared_memory_region="r")]}),
        400,
        "shared",
    ),
    (
        "unstarted sequence",
        MODEL,
        plain({"parameters": {"sequence_id": "never"}, "inputs": ONE}),
        404,
        "never",
    ),
    ("truncated binary data", MODEL, binary_body(BINARY3, IDS8[:16]), 400, "runs past"),
    ("binary data short of the shape", MODEL, binary_body(BINARY4, IDS8), 400, "needs 32"),
    ("extra binary data", MODEL, binary_body(BINARY3, IDS8 + b"x"), 400, "belong to no input"),
    ("header length past the body", MODEL, (b"{}", {HEADER: "99"}), 400, HEADER),
    ("header length not a count", MODEL, (b"{}", {HEADER: "-1"}), 400, HEADER),
    ("binary data without the header", MODEL, (plain(BINARY3)[0] + IDS8, {}), 400, "JSON"),
]


@pytest.mark.parametrize("model, request_, status, fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_infer_requests_get_a_json_error_with_their_status(http, model, request_, status, fragment):
    body, headers = request_
    assert_error(http.post(f"/v2/models/{model}/infer", content=body, headers=headers), status, fragment)


def test_wrong_method_and_unknown_model_routes(http):
    assert_error(http.get(f"/v2/models/{MODEL}/infer"), 405)
    assert_error(http.get("/v2/models/no-such-model/ready"), 404, "no-such-model")
    assert_error(http.get(f"/v2/models/{MODEL}/versions/2/config"), 404, "version")


def test_readiness_follows_the_servers_ready_flag(server, http, triton):
    async def set_ready(value: bool) -> None:
        server.server.dataplane.ready = value  # what start-up sets and a drain clears first

    server.call(set_ready(False))
    try:
        assert_error(http.get("/v2/health/ready"), 503, "not ready")
        assert_error(http.get(f"/v2/models/{MODEL}/ready"), 503, "not ready")
        assert not triton.is_server_ready() and not triton.is_model_ready(MODEL)
        assert http.get("/v2/health/live").status_code == 200
    finally:
        server.call(set_ready(True))
    assert triton.is_server_ready() and triton.is_model_ready(MODEL)


# -- any body: a documented status and a JSON error, never a 500 --


SCALARS = st.one_of(
    st.integers(-2, 40),
    st.floats(allow_nan=False, width=32),
    st.text(max_size=3),
    st.booleans(),
    st.none(),
    st.sampled_from([2**70, 10**400]),
)
PARAMETER_VALUES = st.one_of(
    st.integers(0, 3),
    st.booleans(),
    st.sampled_from(["s1", "", "[1]"]),
    st.just(1.5),
    st.none(),
    st.just(2**64 + 1),
)
PARAMETER_NAMES = st.sampled_from(
    [
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "binary_data_output",
        "priority",
        "max_new_tokens",
        "foo",
    ]
)


@st.composite
def infer_bodies(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """A model path, a body and headers: mostly well formed, each part sometimes wrong."""

    def wrong() -> bool:
        return draw(st.sampled_from([False, False, False, False, False, True]))

    model = MODEL
    if wrong():
        model = draw(st.sampled_from([GENERATE, "no-such-model", f"{MODEL}/versions/2"]))
    elif draw(st.booleans()):
        model = f"{MODEL}/versions/1"
    batch, seq = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    ids = draw(st.lists(st.integers(0, vocab_size() - 1), min_size=batch * seq, max_size=batch * seq))
    name = draw(st.sampled_from(["prompt", "x", ""])) if wrong() else "input_ids"
    datatype = draw(st.sampled_from(["INT32", "FP32", "BYTES", ""])) if wrong() else "INT64"
    shape: Any = [batch, seq]
    if wrong():
        shape = draw(
            st.one_of(st.lists(st.integers(-1, 3), max_size=3), st.sampled_from(["2", None, [1.0, 2]]))
        )
    tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    body: dict[str, Any] = {"inputs": [tensor]}
    binary = b""
    if draw(st.booleans()):
        raw = np.array(ids, "<i8").tobytes()
        if wrong():
            raw = raw[: len(raw) + draw(st.sampled_from([-3, -8]))] + b"\0" * draw(st.sampled_from([0, 5]))
        size: Any = len(raw)
        if wrong():
            size = draw(st.sampled_from([len(raw) + 4, -1, "8"]))
        tensor["parameters"] = {"binary_data_size": size}
        binary = raw
    elif wrong():
        tensor["data"] = draw(st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=8))
    else:
        tensor["data"] = draw(st.sampled_from([ids, np.array(ids).reshape(batch, seq).tolist()]))
    if draw(st.booleans()):
        names = PARAMETER_NAMES if wrong() else st.sampled_from(["binary_data_output", "priority"])
        values = PARAMETER_VALUES if wrong() else st.booleans()
        body["parameters"] = draw(st.dictionaries(names, values, max_size=3))
    if draw(st.booleans()):
        flags = st.sampled_from([True, False, "yes"] if wrong() else [True, False])
        requested = st.fixed_dictionaries(
            {"name": st.sampled_from(["logits", "text", "y"] if wrong() else ["logits"])},
            optional={"parameters": st.fixed_dictionaries({"binary_data": flags})},
        )
        body["outputs"] = draw(st.lists(requested, max_size=2))
    if wrong():
        body[draw(st.sampled_from(["id", "junk"]))] = draw(SCALARS)
    text = json.dumps(body).encode()
    if wrong():
        if draw(st.booleans()):
            text = text[: draw(st.integers(0, len(text) - 1))]  # malformed JSON
        else:
            text = json.dumps(draw(SCALARS)).encode()  # JSON, not an object
    headers = {HEADER: str(len(text))} if binary or wrong() else {}
    return model, text + binary, headers


def check_ok(response: httpx.Response) -> None:
    """A successful response decodes: each output's data matches its shape."""
    content = response.content
    length = response.headers.get(HEADER)
    head = json.loads(content[: int(length)] if length else content)
    at = int(length) if length else 0
    assert head["outputs"]
    for out in head["outputs"]:
        count = int(np.prod(out["shape"]))
        if "data" in out:
            assert len(out["data"]) == count
        else:
            size = out["parameters"]["binary_data_size"]
            if out["datatype"] != "BYTES":
                assert size == count * {"FP32": 4, "INT64": 8}[out["datatype"]]
            at += size
    assert at == len(content) or not length


def test_any_infer_body_gets_a_documented_status_and_a_json_error(http):
    outcomes: Counter[int] = Counter()

    @settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(infer_bodies())
    def run(case: tuple[str, bytes, dict[str, str]]) -> None:
        model, body, headers = case
        r = http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        outcomes[r.status_code] += 1
        if r.status_code == 200:
            check_ok(r)
            return
        assert r.status_code in ERROR_STATUSES, r.text
        assert r.headers["content-type"] == "application/json"
        error = r.json()
        assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"]

    run()
    # The property also saw served requests and both kinds of refusal, not only one outcome.
    assert outcomes[200] >= 100 and outcomes[400] >= 100 and outcomes[404] >= 20, outcomes
