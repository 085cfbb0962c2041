"""The Open Inference Protocol's request parameters: the typed values of a ModelInferRequest's
parameters map, read as the sequence, sampling and flag parameters gru-serve's models take
(a number may come as a string: Triton's C++ client has no double parameters)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import fields

from gru_serve.core.sequences import Sequence
from gru_serve.grpc.generated.inference import grpc_service_pb2 as pb
from gru_serve.oip.tensors import EMPTY_FINAL, Endpoint
from gru_serve.ops.errors import InvalidArgument
from gru_serve.sampling import SamplingParams

# Parameters Triton's clients may send that mean nothing here: accepted and ignored.
IGNORED_PARAMETERS = frozenset({"priority", "timeout", "headers", "binary_data_output", EMPTY_FINAL})


def _value(request: pb.ModelInferRequest, name: str) -> bool | int | float | str | None:
    if name not in request.parameters:
        return None
    p = request.parameters[name]
    which = p.WhichOneof("parameter_choice")
    if which is None:
        raise InvalidArgument(f"parameter '{name}' has no value")
    return getattr(p, which)


def flag(request: pb.ModelInferRequest, name: str) -> bool:
    v = _value(request, name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise InvalidArgument(f"parameter '{name}' must be a bool (bool_param), got {v!r}")
    return v


def _numeric_string(name: str, v: str, kind: type[int] | type[float]) -> int | float:
    """A number sent as a string (Triton's C++ client has no double parameters, and some
    clients send every parameter as a string)."""
    try:
        return kind(v.strip())
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise InvalidArgument(f"parameter '{name}' must be {what}; the string {v!r} is not one") from None


def _int(request: pb.ModelInferRequest, name: str) -> int | None:
    v = _value(request, name)
    if isinstance(v, str):
        return int(_numeric_string(name, v, int))
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise InvalidArgument(
            f"parameter '{name}' must be an integer (int64_param, uint64_param or a numeric "
            f"string_param), got {v!r}"
        )
    return v


def _float(request: pb.ModelInferRequest, name: str) -> float | None:
    v = _value(request, name)
    if isinstance(v, str):
        return float(_numeric_string(name, v, float))
    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
        raise InvalidArgument(
            f"parameter '{name}' must be a number (double_param, int64_param or a numeric "
            f"string_param), got {v!r}"
        )
    return None if v is None else float(v)


def _stop(request: pb.ModelInferRequest) -> tuple[str, ...]:
    v = _value(request, "stop")
    if v is None:
        return ()
    if not isinstance(v, str):
        raise InvalidArgument(f"parameter 'stop' must be a string or a JSON list of strings, got {v!r}")
    if v.startswith("["):
        with contextlib.suppress(ValueError):
            items = json.loads(v)
            if isinstance(items, list) and all(isinstance(s, str) for s in items):
                return tuple(items)
    return (v,)


def check_parameters(request: pb.ModelInferRequest, ep: Endpoint) -> None:
    for name in request.parameters:
        if name not in ep.parameters and name not in IGNORED_PARAMETERS:
            raise InvalidArgument(
                f"parameter '{name}' is not a parameter of model '{ep.name}'; "
                f"it takes: {', '.join(ep.parameters)}"
            )


def sequence_of(request: pb.ModelInferRequest) -> Sequence | None:
    """The request's sequence; None when it has none (sequence_id absent, 0 or "")."""
    seq_id = _value(request, "sequence_id")
    start, end = flag(request, "sequence_start"), flag(request, "sequence_end")
    if isinstance(seq_id, bool | float):
        raise InvalidArgument(
            f"parameter 'sequence_id' must be an unsigned integer or a string, got {seq_id!r}"
        )
    if seq_id is None or seq_id == 0 or seq_id == "":
        if start or end:
            raise InvalidArgument("sequence_start and sequence_end need a sequence_id")
        return None
    return Sequence(seq_id, start, end)


def sampling_of(request: pb.ModelInferRequest) -> tuple[int | None, SamplingParams]:
    # Every SamplingParams field is a parameter of its name, read by the field's type.
    readers = {"float": _float, "int": _int}
    given = {
        f.name: _stop(request) if f.name == "stop" else readers[f.type](request, f.name)
        for f in fields(SamplingParams)
    }
    return _int(request, "max_new_tokens"), SamplingParams.checked(**given)
