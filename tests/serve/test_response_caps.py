"""What one inference request may cost: ModelInfer's logits are capped (max_response_logits) on
gRPC and REST, JSON and binary, refused before the model runs; Score runs a long text in pieces
of at most that many logits; ModelInfer and Score count against max_streams and
max_streams_per_token like a generation stream.

References: the exported file in a bare onnxruntime session (logits, log-probabilities), the
unmodified tritonclient.http, httpx and the generated gRPC stubs on real sockets.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient

from gru_serve.client import Client
from gru_serve.grpc.generated.inference import grpc_service_pb2 as ipb
from gru_serve.grpc.generated.inference import grpc_service_pb2_grpc as ipb_grpc
from gru_serve.ops.settings import Settings
from gru_serve.server import ThreadedServer
from gru_serve.shipped import shipped_models
from tests.support.serving import D2L, LONG, plain_model, wait_until

MODEL = "timemachine-d2l"
VOCAB = 28  # the d2l model's vocabulary (checked against the file below)
CAP_IDS = 10  # the cap of the capped server, in ids of this model
TEXT = "the time traveller for so it will be convenient to speak of him was expounding"


def plain_logits(ids: list[int], path: Path = D2L) -> np.ndarray:
    """Logits [1, len, vocab] of the exported file from the zero state, in one bare run."""
    session, meta = plain_model(str(path))
    state = np.zeros((1, int(meta["gru_serve.num_layers"]), int(meta["gru_serve.hidden_size"])), np.float32)
    (logits,) = session.run(["logits"], {"input_ids": np.array([ids], np.int64), "state": state})
    return logits


def plain_ids(text: str) -> list[int]:
    _, meta = plain_model(str(D2L))
    index = {t: i for i, t in enumerate(json.loads(meta["gru_serve.vocab"]))}
    return [index[c] for c in text]


def ids_of(n: int) -> list[int]:
    return [(7 * i + 3) % VOCAB for i in range(n)]


def start(http: bool = True, **settings) -> ThreadedServer:
    return ThreadedServer(
        Settings(port=0, models=(str(D2L),), **{"max_new_tokens": LONG, **settings}), http=http
    )


@pytest.fixture(scope="module")
def capped() -> Iterator[ThreadedServer]:
    srv = start(max_response_logits=VOCAB * CAP_IDS)
    yield srv
    srv.stop()


def model_infer(target: str, ids: list[int], token: str = "", model: str = MODEL) -> ipb.ModelInferResponse:
    req = ipb.ModelInferRequest(model_name=model)
    t = req.inputs.add(name="input_ids", datatype="INT64", shape=[1, len(ids)])
    t.contents.int64_contents.extend(ids)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(target) as ch:
        return ipb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, metadata=metadata, timeout=60)


def grpc_error(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def rest_body(ids: list[int], binary: bool) -> tuple[bytes, dict[str, str]]:
    """A REST infer request: JSON ids and JSON logits, or binary ids and binary logits."""
    if not binary:
        body = {"inputs": [{"name": "input_ids", "shape": [1, len(ids)], "datatype": "INT64", "data": ids}]}
        return json.dumps(body).encode(), {}
    raw = np.array(ids, "<i8").tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input_ids",
                    "shape": [1, len(ids)],
                    "datatype": "INT64",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def rest_logits(resp: httpx.Response) -> np.ndarray:
    """The logits of a REST response, read by the protocol's rules (not the server's code)."""
    if "Inference-Header-Content-Length" in resp.headers:
        n = int(resp.headers["Inference-Header-Content-Length"])
        (out,) = json.loads(resp.content[:n])["outputs"]
        return np.frombuffer(resp.content[n:], "<f4").reshape(out["shape"])
    (out,) = resp.json()["outputs"]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def test_the_model_has_the_vocabulary_assumed_here():
    _, meta = plain_model(str(D2L))
    assert len(json.loads(meta["gru_serve.vocab"])) == VOCAB


# -- the cap --


def test_grpc_model_infer_over_the_cap_is_refused_naming_it(capped):
    code, details = grpc_error(lambda: model_infer(capped.target, ids_of(CAP_IDS + 1)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"max_response_logits={VOCAB * CAP_IDS}" in details
    assert f"{(CAP_IDS + 1) * VOCAB} logits" in details
    # At the cap it is answered, with the model's logits.
    resp = model_infer(capped.target, ids_of(CAP_IDS))
    got = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(resp.outputs[0].shape)
    np.testing.assert_allclose(got, plain_logits(ids_of(CAP_IDS)), rtol=1e-5, atol=1e-5)


def test_the_default_cap_answers_1000_ids_of_the_bpe_model_and_refuses_1001():
    """The default (1,000,000 logits) on the 1,000-token BPE model, over gRPC."""
    bpe = shipped_models()["timemachine-bpe"]
    srv = ThreadedServer(Settings(port=0, models=(str(bpe),)))
    try:
        ids = [(7 * i + 3) % 1000 for i in range(1001)]
        code, details = grpc_error(lambda: model_infer(srv.target, ids, model="timemachine-bpe"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_response_logits=1000000" in details
        resp = model_infer(srv.target, ids[:1000], model="timemachine-bpe")
    finally:
        srv.stop()
    got = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(resp.outputs[0].shape)
    np.testing.assert_allclose(got, plain_logits(ids[:1000], bpe), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_rest_model_infer_over_the_cap_is_413_naming_it(capped, binary):
    url = f"{capped.http_target}/v2/models/{MODEL}/infer"
    body, headers = rest_body(ids_of(CAP_IDS + 1), binary)
    r = httpx.post(url, content=body, headers=headers, timeout=60)
    assert r.status_code == 413, r.text
    assert f"max_response_logits={VOCAB * CAP_IDS}" in r.json()["error"]
    body, headers = rest_body(ids_of(CAP_IDS), binary)
    r = httpx.post(url, content=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(rest_logits(r), plain_logits(ids_of(CAP_IDS)), rtol=1e-5, atol=1e-5)


def test_a_large_json_response_is_whole_and_exact_for_tritonclient():
    """1,000 ids of JSON logits (28,000 values: encoded in pieces as they are sent), read by the
    unmodified tritonclient.http."""
    srv = start()
    try:
        ids = ids_of(1000)
        with httpclient.InferenceServerClient(srv.http_target.removeprefix("http://")) as c:
            inp = httpclient.InferInput("input_ids", [1, len(ids)], "INT64")
            inp.set_data_from_numpy(np.array([ids], np.int64), binary_data=False)
            out = httpclient.InferRequestedOutput("logits", binary_data=False)
            got = c.infer(MODEL, [inp], outputs=[out]).as_numpy("logits")
    finally:
        srv.stop()
    np.testing.assert_allclose(got, plain_logits(ids), rtol=1e-5, atol=1e-5)


def test_score_runs_a_long_text_in_pieces_within_the_cap(capped):
    """Score returns log-probabilities only: its model runs stay within max_response_logits
    (pieces of CAP_IDS tokens here) and give the bare model's log-probabilities."""
    runs: list[tuple[int, ...]] = []
    jobs = capped.service.jobs
    run_model = jobs.run

    async def counted(rt, ids, state):
        runs.append(ids.shape)
        return await run_model(rt, ids, state)

    jobs.run = counted
    try:
        with Client(capped.target) as c:
            r = c.score(TEXT)
    finally:
        del jobs.run
    ids = plain_ids(TEXT)
    assert len(ids) > 5 * CAP_IDS
    assert runs and max(shape[1] for shape in runs) <= CAP_IDS, runs
    assert sum(shape[1] for shape in runs) == len(ids)
    logits = plain_logits(ids)[0].astype(np.float64)
    lsm = logits - logits.max(-1, keepdims=True)
    lsm -= np.log(np.exp(lsm).sum(-1, keepdims=True))
    want = lsm[np.arange(len(ids) - 1), ids[1:]]
    assert [t.id for t in r.tokens] == ids[1:]
    np.testing.assert_allclose([t.logprob for t in r.tokens], want, atol=1e-4)
    assert r.perplexity == pytest.approx(np.exp(-want.mean()), rel=1e-4)


# -- concurrency --


@pytest.fixture
def one_stream() -> Iterator[ThreadedServer]:
    srv = start(max_streams=1)
    yield srv
    srv.stop()


def _hold_a_stream(c: Client):
    """A generation stream that stays open (its reader stops; flow control holds it)."""
    stream = c.generate("time traveller", max_new_tokens=LONG)
    next(stream)
    return stream


def test_model_infer_and_score_count_against_max_streams(one_stream):
    srv = one_stream
    with Client(srv.target) as c:
        stream = _hold_a_stream(c)
        code, details = grpc_error(lambda: model_infer(srv.target, ids_of(3)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams=1" in details
        body, _ = rest_body(ids_of(3), binary=False)
        r = httpx.post(f"{srv.http_target}/v2/models/{MODEL}/infer", content=body, timeout=60)
        assert r.status_code == 429 and "max_streams=1" in r.json()["error"]
        code, details = grpc_error(lambda: c.score(TEXT))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams=1" in details
        stream.cancel()
        wait_until(lambda: srv.service.active_streams == 0)
        # The slot is free again: both are served (and give theirs back).
        assert model_infer(srv.target, ids_of(3)).outputs[0].shape == [1, 3, VOCAB]
        assert len(c.score(TEXT).tokens) == len(TEXT) - 1
        assert srv.service.active_streams == 0


def test_model_infer_and_score_count_against_max_streams_per_token():
    srv = start(auth_tokens=("alice", "bob"), max_streams_per_token=1)
    try:
        with Client(srv.target, token="alice") as alice, Client(srv.target, token="bob") as bob:
            stream = _hold_a_stream(alice)
            code, details = grpc_error(lambda: model_infer(srv.target, ids_of(3), token="alice"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams_per_token=1" in details
            code, details = grpc_error(lambda: alice.score(TEXT))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams_per_token=1" in details
            body, _ = rest_body(ids_of(3), binary=False)
            r = httpx.post(
                f"{srv.http_target}/v2/models/{MODEL}/infer",
                content=body,
                headers={"authorization": "Bearer alice"},
                timeout=60,
            )
            assert r.status_code == 429 and "max_streams_per_token=1" in r.json()["error"]
            # Another token is not held back by alice's stream.
            assert model_infer(srv.target, ids_of(3), token="bob").outputs[0].shape == [1, 3, VOCAB]
            assert len(bob.score(TEXT).tokens) == len(TEXT) - 1
            stream.cancel()
    finally:
        srv.stop()
