"""Bad input on the Open Inference Protocol: ModelInfer with any tensor names, dtypes, shapes and
byte lengths gets its documented status code (unknown model: NOT_FOUND, as Triton answers;
anything else wrong: INVALID_ARGUMENT), and the server stays correct."""

import math

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gru_serve.grpc.generated.inference import grpc_service_pb2 as pb
from gru_serve.grpc.generated.inference import grpc_service_pb2_grpc as pb_grpc
from gru_serve.ops.settings import Settings
from gru_serve.server import ThreadedServer
from gru_serve.shipped import default_model_path
from tests.support.bad_input import RUN, code_of
from tests.support.reliability import TALLY, record

MODEL = "timemachine-d2l"
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def stub():
    srv = ThreadedServer(Settings(port=0, models=(str(default_model_path()),), max_prompt_tokens=MAX_TOKENS))
    with grpc.insecure_channel(srv.target) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)
    srv.stop()


dims = st.one_of(st.integers(-2, 6), st.sampled_from([0, 1, 65, 2**31, 2**62]))


@st.composite
def tensors(draw):
    shape = draw(st.lists(dims, max_size=3))
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    fits = 0 <= count <= 512
    ids = (
        draw(
            st.lists(
                st.one_of(st.integers(0, 27), st.integers(-(2**63), 2**63 - 1)),
                min_size=count,
                max_size=count,
            )
        )
        if fits
        else []
    )
    raw = np.asarray(ids, "<i8").tobytes()
    raw = draw(st.one_of(st.just(raw), st.binary(max_size=64))) if fits else draw(st.binary(max_size=64))
    t = pb.ModelInferRequest.InferInputTensor(
        name=draw(st.sampled_from(["input_ids", "input_ids", "state", "x", ""])),
        datatype=draw(st.sampled_from(["INT64", "INT64", "FP32", "INT32", "BYTES", ""])),
        shape=shape,
    )
    return t, raw


def expected(model: str, inputs: list) -> str:
    if model != MODEL:
        return "NOT_FOUND"
    names = [t.name for t, _ in inputs]
    if names != ["input_ids"]:
        return "INVALID_ARGUMENT"
    t, raw = inputs[0]
    shape = list(t.shape)
    if t.datatype != "INT64" or any(d < 0 for d in shape) or len(raw) != 8 * math.prod(shape):
        return "INVALID_ARGUMENT"
    ids = np.frombuffer(raw, "<i8")
    if len(shape) != 2 or not 1 <= shape[0] <= 256 or shape[1] < 1 or ids.size > MAX_TOKENS:
        return "INVALID_ARGUMENT"
    if ids.min() < 0 or ids.max() >= 28:
        return "INVALID_ARGUMENT"
    return "OK"


@given(
    model=st.sampled_from([MODEL, MODEL, "nope", "", MODEL + "-generate2"]),
    inputs=st.lists(tensors(), max_size=2),
)
@settings(RUN, max_examples=1500)
def test_model_infer_tensors(stub, model, inputs):
    req = pb.ModelInferRequest(
        model_name=model, inputs=[t for t, _ in inputs], raw_input_contents=[raw for _, raw in inputs]
    )
    got = code_of(lambda: stub.ModelInfer(req, timeout=30))
    TALLY["bad inputs tried"] += 1
    assert got == expected(model, inputs), req


def test_zz_inference_still_correct(stub, runtime):
    ids = np.array([runtime.tokenizer.encode("time traveller")], np.int64)
    req = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=ids.shape)],
        raw_input_contents=[ids.tobytes()],
    )
    resp = stub.ModelInfer(req, timeout=30)
    logits = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(resp.outputs[0].shape)
    want, _ = runtime.step(ids, runtime.zero_state())
    np.testing.assert_allclose(logits, want, atol=1e-5)
    record(
        "bad input (Open Inference Protocol ModelInfer)", examples=1500, canary="logits equal the reference"
    )
