"""The inference protocol's REST bodies: JSON (and Triton's binary tensors) into the protocol's
own messages (grpc_service_pb2), and responses back into JSON, as Triton's HTTP/REST API has them.

Infer request: {"id"?, "parameters"?: {name: bool|number|string}, "inputs": [{"name", "shape",
"datatype", "data"?, "parameters"?}], "outputs"?: [{"name", "parameters"?: {"binary_data"}}]}.
`data` is flat or nested row-major JSON (numbers, or strings for BYTES). Triton's binary tensor
extension: with the header Inference-Header-Content-Length: N the first N bytes of the body are
the JSON and the rest the inputs' bytes, in input order, each input that has
`parameters.binary_data_size` taking that many bytes (little-endian; BYTES elements each a 4-byte
length then the bytes). Request parameters become InferParameters (an integer above int64's range
a uint64; a list of strings, for `stop`, a JSON string). A body may be compressed
(Content-Encoding gzip or deflate, as tritonclient's request_compression_algorithm sends it; at
most max_body_bytes once inflated). Shared memory and classification are not supported.

Infer response: {"model_name", "model_version", "id"? (when given), "parameters"? (when any),
"outputs": [{"name", "datatype", "shape", "data"}]}, `data` flat row-major. An output asked for
with `parameters.binary_data: true` (or every output, with the request parameter
`binary_data_output: true`, which tritonclient sends when no outputs are named) has
`"parameters": {"binary_data_size": n}` instead of `data`; its bytes follow the JSON in output
order and the response header Inference-Header-Content-Length gives the JSON's length. Large
JSON data is encoded in pieces off the event loop and sent as it is encoded (chunked, no
Content-Length). The logits one request may produce are capped (max_response_logits: 413).

Generate request: a JSON object whose fields named like the model's inputs are inputs (`prompt`:
a string), `parameters` an object of parameters, `id` the request id, `stream` (there or in
`parameters`) ignored as the URL decides, and every other field a parameter (`max_new_tokens`,
the sampling options by their SamplingParams names, `sequence_id`, `sequence_start`,
`sequence_end`). Only generation models (`M-generate`) generate. Response: {"model_name",
"model_version", "id"?, "text" (the tokens' text joined), "token_ids" [numbers], "parameters"
(finish_reason, prompt_tokens, generated_tokens, tokens_seen)}; each stream event has the same
shape with that response's tokens, `parameters.triton_final_response` telling the last one
(which carries no tokens and the finish parameters). An error before the first event is a JSON
error response with its status; one after is an event {"error": message}.
"""

from __future__ import annotations

import asyncio
import json
import math
import zlib
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from starlette.responses import Response, StreamingResponse

from gru_serve.grpc.generated.inference import grpc_service_pb2 as pb
from gru_serve.http.common import BodyTooLarge, load_json
from gru_serve.oip.tensors import WIRE_DTYPES, Endpoint, deserialize_bytes
from gru_serve.ops.errors import InvalidArgument

HEADER_LENGTH = "Inference-Header-Content-Length"
REST_EXTENSIONS = ("binary_tensor_data", "generate")  # Triton's HTTP-only extensions served here
INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
_64_BIT = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)
REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs"})
INPUT_FIELDS = frozenset({"name", "shape", "datatype", "data", "parameters"})
OUTPUT_FIELDS = frozenset({"name", "parameters"})
_JSON = msgspec.json.Encoder()  # the same text as json.dumps for these values, several times faster
# Values of a JSON tensor encoded at a time (about a millisecond, a few hundred KB of text), so a
# large output never exists whole as Python numbers or as one string.
DATA_CHUNK = 16_384
# Tensor bytes up to which a JSON response is encoded at once on the event loop.
INLINE_BYTES = 64 * 1024


# -- JSON of protobuf messages --


def _numbers(d: dict[str, Any], desc: Descriptor) -> dict[str, Any]:
    """Protobuf's JSON writes 64-bit integers as strings; Triton's REST (and tritonclient)
    has them as numbers."""
    for key, value in d.items():
        field = desc.fields_by_name.get(key)
        if field is None:
            continue
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                if value_field.message_type is not None:
                    for v in value.values():
                        _numbers(v, value_field.message_type)
                elif value_field.cpp_type in _64_BIT:
                    d[key] = {k: int(v) for k, v in value.items()}
            else:
                for v in value if isinstance(value, list) else [value]:
                    _numbers(v, field.message_type)
        elif field.cpp_type in _64_BIT:
            d[key] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return d


def message_json(message: Message, every_field: bool = False) -> dict[str, Any]:
    d = MessageToDict(
        message, always_print_fields_with_no_presence=every_field, preserving_proto_field_name=True
    )
    return _numbers(d, message.DESCRIPTOR)


# -- request decoding --


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def load_object(raw: bytes) -> dict[str, Any]:
    return _object(load_json(raw), "the request body")


def decompressed(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent before Content-Encoding, bounded: the body limit holds once inflated."""
    if encoding in ("", "identity"):
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise InvalidArgument(f"Content-Encoding '{encoding:.40}' is not supported; use gzip or deflate")
    inflate = zlib.decompressobj(wbits)
    try:
        out = inflate.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidArgument(f"the request body is not valid {encoding}: {e}") from e
    if len(out) > limit:
        raise BodyTooLarge(f"the request body is over max_body_bytes={limit} once inflated")
    if not inflate.eof:
        raise InvalidArgument(f"the request body ends inside its {encoding} stream")
    return out


def set_parameter(params: Any, name: str, value: Any) -> None:
    """One JSON parameter into a protobuf map of InferParameter."""
    if isinstance(value, bool):
        params[name].bool_param = value
    elif isinstance(value, int) and INT64_MIN <= value <= INT64_MAX:
        params[name].int64_param = value
    elif isinstance(value, int) and 0 <= value <= UINT64_MAX:
        params[name].uint64_param = value  # a sequence_id above int64's range
    elif isinstance(value, float):
        params[name].double_param = value
    elif isinstance(value, str):
        params[name].string_param = value
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        params[name].string_param = json.dumps(value)  # `stop` as a list: the core reads a JSON list
    else:
        raise InvalidArgument(
            f"parameter '{name}' must be a bool, a 64-bit integer, a number or a string, "
            f"got {json.dumps(value)[:80]}"
        )


def _flat(name: str, data: Any) -> list[Any]:
    """Flat or nested JSON arrays, row-major (iterative: nesting depth is the client's)."""
    if not isinstance(data, list):
        raise InvalidArgument(f"input '{name}': data must be a JSON array, got {type(data).__name__}")
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], stack)  # the stack itself marks the end of a list
        if item is stack:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
    return out


def _contents(t: pb.ModelInferRequest.InferInputTensor, data: Any) -> None:
    """JSON data into the tensor's typed contents. Datatypes no model here takes are left
    empty: the core refuses them by the model's inputs."""
    values = _flat(t.name, data)
    if t.datatype == "INT64":
        if not all(type(v) is int and INT64_MIN <= v <= INT64_MAX for v in values):
            raise InvalidArgument(f"input '{t.name}': INT64 data must be integers in the int64 range")
        t.contents.int64_contents.extend(values)
    elif t.datatype == "FP32":
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise InvalidArgument(f"input '{t.name}': FP32 data must be numbers")
        try:
            with np.errstate(over="ignore"):  # beyond float32: inf, as a C cast would give
                t.contents.fp32_contents.extend(np.asarray(values, np.float64).astype(np.float32).tolist())
        except OverflowError as e:  # an integer beyond even float64
            raise InvalidArgument(f"input '{t.name}': FP32 data out of range: {e}") from e
    elif t.datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise InvalidArgument(f"input '{t.name}': BYTES data must be strings")
        t.contents.bytes_contents.extend(v.encode() for v in values)
    else:
        t.contents.SetInParent()


def _shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidArgument(f"input '{name}': shape must be an array of integers, got {shape!r:.80}")
    if any(not INT64_MIN <= d <= INT64_MAX for d in shape):
        raise InvalidArgument(f"input '{name}': shape {shape} has a dimension outside int64")
    return shape


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    return value


def _unknown(d: dict[str, Any], known: frozenset[str], what: str) -> None:
    extra = sorted(set(d) - known)
    if extra:
        raise InvalidArgument(f"{what} has unknown fields: {', '.join(extra)}")


def _only_binary_data(params: dict[str, Any], what: str, allowed: str) -> None:
    for key in params:
        if key != allowed:
            why = "shared memory is not supported" if key.startswith("shared_memory") else "unknown"
            raise InvalidArgument(f"{what}: parameter '{key}': {why}")


def infer_request(
    model: str, version: str, body: bytes, header_length: str | None
) -> tuple[pb.ModelInferRequest, dict[str, bool], bool]:
    """The protocol message of a REST infer request, which outputs go back as binary data
    (by name), and the default for the others."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH} must be a byte count within the body's {len(body)} bytes, "
                f"got {header_length!r:.40}"
            )
        body, binary = body[: int(header_length)], body[int(header_length) :]
    data = load_object(body)
    _unknown(data, REQUEST_FIELDS, "the request")
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in data:
        req.id = _string(data["id"], "id")
    params = _object(data.get("parameters", {}), "parameters")
    for key, value in params.items():
        set_parameter(req.parameters, key, value)
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidArgument("parameter 'binary_data_output' must be a bool")

    inputs = data.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument("inputs must be a JSON array of tensors")
    at = 0
    raw: list[bytes] = []
    for i, item in enumerate(inputs):
        item = _object(item, f"inputs[{i}]")
        _unknown(item, INPUT_FIELDS, f"inputs[{i}]")
        name = _string(item.get("name"), f"inputs[{i}].name")
        t = req.inputs.add(
            name=name,
            datatype=_string(item.get("datatype"), f"input '{name}': datatype"),
            shape=_shape(name, item.get("shape")),
        )
        tensor_params = _object(item.get("parameters", {}), f"input '{name}': parameters")
        _only_binary_data(tensor_params, f"input '{name}'", "binary_data_size")
        if "binary_data_size" in tensor_params:
            size = tensor_params["binary_data_size"]
            if type(size) is not int or size < 0:
                raise InvalidArgument(f"input '{name}': binary_data_size must be a byte count")
            if "data" in item:
                raise InvalidArgument(f"input '{name}': both data and binary_data_size")
            if at + size > len(binary):
                raise InvalidArgument(
                    f"input '{name}': binary_data_size {size} runs past the binary data "
                    f"({len(binary) - at} bytes left)"
                )
            raw.append(binary[at : at + size])
            at += size
        elif "data" in item:
            _contents(t, item["data"])
        else:
            raise InvalidArgument(f"input '{name}' has no data (data or binary_data_size)")
    if at != len(binary):
        raise InvalidArgument(f"{len(binary) - at} bytes of binary data belong to no input")
    if raw and len(raw) != len(req.inputs):
        raise InvalidArgument("give every input's data as binary data, or every input's as JSON")
    req.raw_input_contents.extend(raw)

    outputs = data.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument("outputs must be a JSON array")
    binary_out: dict[str, bool] = {}
    for i, item in enumerate(outputs):
        item = _object(item, f"outputs[{i}]")
        _unknown(item, OUTPUT_FIELDS, f"outputs[{i}]")
        name = _string(item.get("name"), f"outputs[{i}].name")
        out_params = _object(item.get("parameters", {}), f"output '{name}': parameters")
        _only_binary_data(out_params, f"output '{name}'", "binary_data")
        flag = out_params.get("binary_data", default_binary)
        if not isinstance(flag, bool):
            raise InvalidArgument(f"output '{name}': binary_data must be a bool")
        binary_out[name] = flag
        req.outputs.add(name=name)
    return req, binary_out, default_binary


def generate_request(ep: Endpoint, version: str, data: dict[str, Any]) -> pb.ModelInferRequest:
    """The protocol message of a generate request's body: fields named like the model's inputs
    are inputs, `parameters` and every other field parameters."""
    req = pb.ModelInferRequest(model_name=ep.name, model_version=version)
    nested = _object(data.pop("parameters", {}), "parameters")
    if "id" in data:
        req.id = _string(data.pop("id"), "id")
    data.pop("stream", None)  # the URL says whether to stream (Triton's examples send it)
    nested.pop("stream", None)
    for key, value in nested.items():
        if key in data:
            raise InvalidArgument(f"'{key}' is given both as a field and in parameters")
        set_parameter(req.parameters, key, value)
    for key, value in data.items():
        if key not in ep.inputs:
            set_parameter(req.parameters, key, value)
        elif isinstance(value, str):
            req.inputs.add(name=key, datatype="BYTES", shape=[1]).contents.bytes_contents.append(
                value.encode()
            )
        else:
            raise InvalidArgument(f"input '{key}' must be a string")
    return req


# -- response encoding --


def parameters_json(params: Any) -> dict[str, Any]:
    return {k: getattr(p, p.WhichOneof("parameter_choice") or "string_param") for k, p in params.items()}


def _values(tensor: pb.ModelInferResponse.InferOutputTensor, raw: bytes) -> list[Any]:
    if tensor.datatype == "BYTES":
        items = deserialize_bytes(tensor.name, raw, math.prod(tensor.shape))
        return [b.decode(errors="replace") for b in items]
    return np.frombuffer(raw, WIRE_DTYPES[tensor.datatype]).tolist()


def _json_data(tensor: pb.ModelInferResponse.InferOutputTensor, raw: bytes) -> Iterator[bytes]:
    """A tensor's data as the inside of a JSON array, DATA_CHUNK values at a time."""
    if tensor.datatype == "BYTES":
        yield _JSON.encode(_values(tensor, raw))[1:-1]
        return
    values = np.frombuffer(raw, WIRE_DTYPES[tensor.datatype])
    for start in range(0, len(values), DATA_CHUNK):
        piece = _JSON.encode(values[start : start + DATA_CHUNK].tolist())[1:-1]
        yield b"," + piece if start else piece


def _json_body(
    head: dict[str, Any], outputs: list[dict[str, Any]], data: dict[int, tuple[Any, bytes]]
) -> Iterator[bytes]:
    """The response's JSON in pieces: outputs[i]'s values (data[i]) are encoded as they are sent."""
    yield _JSON.encode(head)[:-1] + b',"outputs":['
    for i, out in enumerate(outputs):
        sep = b"," if i else b""
        if i not in data:
            yield sep + _JSON.encode(out)
            continue
        yield sep + _JSON.encode(out)[:-1] + b',"data":['
        yield from _json_data(*data[i])
        yield b"]}"
    yield b"]}"


async def infer_response(resp: pb.ModelInferResponse, binary_out: dict[str, bool], default: bool) -> Response:
    head: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id:
        head["id"] = resp.id
    if resp.parameters:
        head["parameters"] = parameters_json(resp.parameters)
    outputs, tail, data = [], [], {}
    for i, (tensor, raw) in enumerate(zip(resp.outputs, resp.raw_output_contents, strict=True)):
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary_out.get(tensor.name, default):
            out["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            data[i] = (tensor, raw)
        outputs.append(out)
    body = _json_body(head, outputs, data)
    big = sum(len(raw) for _, raw in data.values()) > INLINE_BYTES
    if big and not tail:
        # Starlette iterates a plain iterator in its thread pool: encoded off the event loop,
        # piece by piece as the client reads.
        return StreamingResponse(body, media_type="application/json")
    text = b"".join(await asyncio.to_thread(list, body) if big else body)
    if not tail:
        return Response(text, media_type="application/json")
    return Response(
        b"".join([text, *tail]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(text))},
    )


def generate_json(ep: Endpoint, resp: pb.ModelInferResponse) -> dict[str, Any]:
    """A generation response: each output by name, a BYTES output (one string per token) as
    its text joined."""
    out: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id:
        out["id"] = resp.id
    for name, datatype in ep.outputs.items():
        out[name] = "" if datatype == "BYTES" else []
    for tensor, raw in zip(resp.outputs, resp.raw_output_contents, strict=True):
        values = _values(tensor, raw)
        out[tensor.name] = "".join(values) if tensor.datatype == "BYTES" else values
    out["parameters"] = parameters_json(resp.parameters)
    return out
