"""Open Inference Protocol requests and responses in our own stubs; tritonclient.grpc in a
subprocess (its protobuf messages clash with our stubs'); tritonclient's descriptors in a pool
of their own."""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from gru_serve.core.sequences import Sequence
from gru_serve.grpc.generated.inference import grpc_service_pb2 as pb

TRITON_CHECK = Path(__file__).with_name("triton_client_check.py")
TRITON_CALLS = Path(__file__).with_name("tritonclient_calls.py")
MODEL = "timemachine-d2l"
GENERATE = MODEL + "-generate"
Tensor = pb.ModelInferRequest.InferInputTensor


def ids_request(ids, model: str = MODEL, seq: Sequence | None = None, raw: bool = True, **params):
    arr = np.asarray(ids, np.int64)
    tensor = Tensor(name="input_ids", datatype="INT64", shape=arr.shape)
    if not raw:
        tensor.contents.int64_contents.extend(arr.reshape(-1).tolist())
    req = pb.ModelInferRequest(model_name=model, inputs=[tensor])
    if raw:
        req.raw_input_contents.append(arr.astype("<i8").tobytes())
    if seq is not None:
        if isinstance(seq.id, str):
            req.parameters["sequence_id"].string_param = seq.id
        else:
            req.parameters["sequence_id"].uint64_param = seq.id
        req.parameters["sequence_start"].bool_param = seq.start
        req.parameters["sequence_end"].bool_param = seq.end
    for key, value in params.items():
        set_param(req, key, value)
    return req


def generate_request(prompt: str, request_id: str = "", seq: Sequence | None = None, **params):
    tensor = Tensor(name="prompt", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(prompt.encode())
    req = pb.ModelInferRequest(model_name=GENERATE, id=request_id, inputs=[tensor])
    if seq is not None:
        req.parameters["sequence_id"].string_param = str(seq.id)
        req.parameters["sequence_start"].bool_param = seq.start
        req.parameters["sequence_end"].bool_param = seq.end
    for key, value in params.items():
        set_param(req, key, value)
    return req


def set_param(req: pb.ModelInferRequest, key: str, value) -> None:
    p = req.parameters[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = value


def logits_of(resp: pb.ModelInferResponse) -> np.ndarray:
    (out,) = resp.outputs
    assert (out.name, out.datatype) == ("logits", "FP32")
    return np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(tuple(out.shape))


def text_of(resp: pb.ModelInferResponse) -> tuple[list[str], list[int]]:
    names = [o.name for o in resp.outputs]
    if not names:
        return [], []
    raw = resp.raw_output_contents[names.index("text")]
    texts, at = [], 0
    while at < len(raw):
        n = int.from_bytes(raw[at : at + 4], "little")
        texts.append(raw[at + 4 : at + 4 + n].decode())
        at += 4 + n
    ids = np.frombuffer(resp.raw_output_contents[names.index("token_ids")], "<i8").tolist()
    assert len(ids) == len(texts)
    return texts, ids


def tritonclient_grpc(target: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Run calls with tritonclient.grpc in its own process (see tritonclient_calls.py)."""
    proc = subprocess.run(
        [sys.executable, str(TRITON_CALLS), target],
        input=json.dumps(calls),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _serialized_file(module: str) -> bytes:
    """The FileDescriptorProto bytes a tritonclient *_pb2.py registers, read without importing it."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("tritonclient is not installed: run make install (the dev extra has it)", pytrace=False)
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / f"{module}_pb2.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
        ):
            return ast.literal_eval(node.args[0])
    raise AssertionError(f"no AddSerializedFile call in {path}")


@functools.cache
def triton_pool() -> descriptor_pool.DescriptorPool:
    """tritonclient's model_config.proto and grpc_service.proto in a pool of their own."""
    pool = descriptor_pool.DescriptorPool()
    for module in ("model_config", "service"):
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(_serialized_file(module)))
    return pool


def triton_class(full_name: str) -> type:
    """tritonclient's message class for `full_name` (from the private pool)."""
    return message_factory.GetMessageClass(triton_pool().FindMessageTypeByName(full_name))
