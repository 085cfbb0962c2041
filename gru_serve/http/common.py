"""What the HTTP routes share: the front's parts (HttpFront), the caller Front decided, JSON
bodies read with their limits, the error shapes and server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from gru_serve.ops import errors
from gru_serve.ops.auth import Caller
from gru_serve.ops.errors import InvalidArgument

if TYPE_CHECKING:
    from gru_serve.core.service import GenerationService
    from gru_serve.oip.dataplane import DataPlane
    from gru_serve.ops.gate import Gate
    from gru_serve.ops.metrics import Metrics

M = TypeVar("M", bound=BaseModel)

CALLER = "gru_serve.caller"  # the scope key of the Caller that Front decided
MAX_JSON_DEPTH = 64  # nesting of arrays and objects in a JSON body (the API's own nest 5 deep)


@dataclass
class HttpFront:
    """What the HTTP routes share with gRPC: one engine, one sessions store, one inference
    protocol core, one auth and drain gate."""

    service: GenerationService
    dataplane: DataPlane
    metrics: Metrics
    gate: Gate  # accepted tokens, draining, in-flight count (shared with gRPC)
    max_body_bytes: int


def caller(request: Request) -> Caller:
    """Who makes this request, as Front decided it (handlers never read credentials)."""
    return request.scope[CALLER]


def owner(request: Request) -> str:
    """The principal that owns what this request creates ('' when anonymous)."""
    return caller(request).principal


def nesting(data: Any) -> int:
    """How deep JSON arrays and objects nest (0 for a scalar), level by level: no recursion."""
    depth, level = 0, [data]
    while level := [c for c in level if isinstance(c, dict | list)]:
        depth += 1
        level = [v for c in level for v in (c.values() if isinstance(c, dict) else c)]
    return depth


def load_json(raw: bytes) -> Any:
    """A JSON body, refused past MAX_JSON_DEPTH (json's C parser recurses: much deeper nesting
    exhausts the interpreter's stack)."""
    too_deep = InvalidArgument(
        f"the request body nests JSON arrays and objects deeper than {MAX_JSON_DEPTH} levels"
    )
    try:
        data = json.loads(raw)
    except RecursionError:
        raise too_deep from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"the request body is not valid JSON: {e}") from e
    if nesting(data) > MAX_JSON_DEPTH:
        raise too_deep
    return data


def openai_style(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(path: str, code: str, status: int, message: str) -> dict[str, Any]:
    """OpenAI's error shape under /v1 (what the openai client reads); Triton's elsewhere."""
    if openai_style(path):
        return {"error": {"message": message, "type": code.lower(), "code": code, "param": None}}
    return {"error": message}


def error_response(request: Request, error: BaseException) -> JSONResponse:
    code, status, message = errors.public(error)
    return JSONResponse(error_body(request.url.path, code, status, message), status_code=status)


def sse_error(path: str, error: BaseException) -> str:
    """An error inside an event stream (the status line has gone out): one `error` event."""
    code, status, message = errors.public(error)
    return sse_event(error_body(path, code, status, message))


def sse_event(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n"


def event_stream(path: str, events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events. An error after the first event is sent as an event; when the client
    goes away Starlette cancels the iterator, whose cleanup releases the session unchanged."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except Exception as e:
            yield sse_error(path, e)

    headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body as `model`; malformed JSON, a wrong type or an unknown field is
    InvalidArgument naming the field."""
    data = load_json(await request.body())
    if not isinstance(data, dict):
        raise InvalidArgument(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        message = first["msg"].removeprefix("Value error, ")  # a validator's own message
        raise InvalidArgument(f"{field}: {message}") from e


async def optional_body(request: Request, model: type[M]) -> M:
    """parse_body, except that an empty body (curl -X POST, tritonclient.http's index request)
    is the model's defaults."""
    if not (await request.body()).strip():
        return model()
    return await parse_body(request, model)


class BodyTooLarge(errors.GruServeError):
    pass
