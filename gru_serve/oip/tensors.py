"""The Open Inference Protocol's tensor codec: reading a ModelInferRequest's inputs and building
its ModelInferResponse, for a model as the protocol sees it (Endpoint). Stateless: the protocol's
state lives in gru_serve.oip.dataplane, its parameters are read by gru_serve.oip.parameters.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from gru_serve.contract import INPUT_IDS, LOGITS
from gru_serve.grpc.generated.inference import grpc_service_pb2 as pb
from gru_serve.ops.errors import InvalidArgument
from gru_serve.sampling import OPTIONS
from gru_serve.served import ServedModel

MODEL_VERSION = "1"
PROMPT, TEXT, TOKEN_IDS = "prompt", "text", "token_ids"
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
SAMPLING_PARAMETERS = ("max_new_tokens", *OPTIONS)  # every SamplingParams field by name
EMPTY_FINAL = "triton_enable_empty_final_response"
FINAL = "triton_final_response"
# Wire (little-endian) and in-memory types of the numeric datatypes the models use.
WIRE_DTYPES = {"INT64": np.dtype("<i8"), "FP32": np.dtype("<f4")}
_NATIVE = {"INT64": np.dtype(np.int64), "FP32": np.dtype(np.float32)}


@dataclass(frozen=True)
class Endpoint:
    """A model name of this protocol: a runtime's raw model, or its generation model."""

    name: str
    runtime: ServedModel
    generate: bool

    @property
    def inputs(self) -> dict[str, str]:
        return {PROMPT: "BYTES"} if self.generate else {INPUT_IDS: "INT64"}

    @property
    def outputs(self) -> dict[str, str]:
        return {TEXT: "BYTES", TOKEN_IDS: "INT64"} if self.generate else {LOGITS: "FP32"}

    @property
    def parameters(self) -> tuple[str, ...]:
        return SEQUENCE_PARAMETERS + (SAMPLING_PARAMETERS if self.generate else ())


# -- tensors --


def serialize_bytes(items: list[bytes]) -> bytes:
    """BYTES tensor data: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def deserialize_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    items, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidArgument(f"input '{name}': BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise InvalidArgument(f"input '{name}': BYTES element {len(items)} has length {n} past the data")
        items.append(raw[at + 4 : at + 4 + n])
        at += 4 + n
    if len(items) != count:
        raise InvalidArgument(
            f"input '{name}': BYTES data has {len(items)} elements; the shape needs {count}"
        )
    return items


MAX_DIMENSION = 1 << 24  # far beyond any real request; numpy cannot even describe some shapes


def _input_array(t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    shape = tuple(t.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input '{t.name}': shape {list(shape)} has a negative dimension")
    if any(d > MAX_DIMENSION for d in shape):
        raise InvalidArgument(f"input '{t.name}': shape {list(shape)} has a dimension above {MAX_DIMENSION}")
    count = math.prod(shape)
    if t.datatype == "BYTES":
        if raw is not None:
            items = deserialize_bytes(t.name, raw, count)
        else:
            items = list(t.contents.bytes_contents)
            if len(items) != count:
                raise InvalidArgument(
                    f"input '{t.name}': contents.bytes_contents has {len(items)} elements; "
                    f"shape {list(shape)} needs {count}"
                )
        arr = np.empty(count, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    wire, native = WIRE_DTYPES[t.datatype], _NATIVE[t.datatype]
    if raw is not None:
        need = count * wire.itemsize
        if len(raw) != need:
            raise InvalidArgument(
                f"input '{t.name}': raw_input_contents has {len(raw)} bytes; "
                f"shape {list(shape)} of {t.datatype} needs {need}"
            )
        return np.frombuffer(raw, wire).astype(native).reshape(shape)
    values = t.contents.int64_contents if t.datatype == "INT64" else t.contents.fp32_contents
    field_name = "int64_contents" if t.datatype == "INT64" else "fp32_contents"
    if len(values) != count:
        raise InvalidArgument(
            f"input '{t.name}': contents.{field_name} has {len(values)} values; "
            f"shape {list(shape)} needs {count}"
        )
    return np.asarray(values, native).reshape(shape)


def read_inputs(request: pb.ModelInferRequest, ep: Endpoint) -> dict[str, np.ndarray]:
    """The request's inputs by name, checked against the model's: names, datatypes, and that
    the data matches the shape (raw bytes or typed contents)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "give every input's data there, or none"
        )
    expected = ep.inputs
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        if t.name not in expected:
            raise InvalidArgument(
                f"input '{t.name}' is not an input of model '{ep.name}'; its inputs: {', '.join(expected)}"
            )
        if t.name in out:
            raise InvalidArgument(f"input '{t.name}' is given twice")
        if t.datatype != expected[t.name]:
            raise InvalidArgument(
                f"input '{t.name}': datatype must be {expected[t.name]}, got {t.datatype or 'none'}"
            )
        if raw and t.HasField("contents"):
            raise InvalidArgument(f"input '{t.name}': data in both contents and raw_input_contents")
        out[t.name] = _input_array(t, raw[i] if raw else None)
    for name in expected:
        if name not in out:
            raise InvalidArgument(f"input '{name}' is missing (model '{ep.name}')")
    return out


def _output(
    name: str, datatype: str, arr: np.ndarray
) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    if datatype == "BYTES":
        data = serialize_bytes([bytes(x) for x in arr.reshape(-1)])
    else:
        data = np.ascontiguousarray(arr, WIRE_DTYPES[datatype]).tobytes()
    return pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=arr.shape), data


def requested_outputs(request: pb.ModelInferRequest, ep: Endpoint) -> list[str]:
    names = [o.name for o in request.outputs] or list(ep.outputs)
    for name in names:
        if name not in ep.outputs:
            raise InvalidArgument(
                f"output '{name}' is not an output of model '{ep.name}'; its outputs: {', '.join(ep.outputs)}"
            )
    return names


def response(
    request: pb.ModelInferRequest,
    ep: Endpoint,
    tensors: dict[str, np.ndarray],
    parameters: dict[str, bool | int | str] | None = None,
) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=ep.name, model_version=MODEL_VERSION, id=request.id)
    for name in requested_outputs(request, ep) if tensors else []:
        tensor, data = _output(name, ep.outputs[name], tensors[name])
        resp.outputs.append(tensor)
        resp.raw_output_contents.append(data)
    for key, value in (parameters or {}).items():
        p = resp.parameters[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        else:
            p.string_param = value
    return resp
