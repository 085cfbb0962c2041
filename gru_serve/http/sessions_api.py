"""Native sessions over HTTP: the gru_serve.v1 session RPCs for the playground and curl.

A session belongs to the bearer token that created it, as over gRPC: another token's session
answers as an unknown one does (403 "not available to this token" for a caller with a token,
404 for an anonymous one: the service's rule), and a session made here continues over gRPC
with the same token (and back). The openai client always sends its api_key as a bearer token,
so even with authentication off its sessions belong to that key.

POST   /v1/sessions                  {"model"?, "text"?}: a new session that has read `text`
                                     (CreateSession) -> 201, the session
GET    /v1/sessions/{id}             the session (GetSession)
DELETE /v1/sessions/{id}             -> 204, no body (DeleteSession)
POST   /v1/sessions/{id}/fork        a copy whose turn 0 is the source's present (ForkSession)
                                     -> 201, the new session
POST   /v1/sessions/{id}/rewind      {"turn"}: back to that turn's checkpoint (RewindSession)
                                     -> the session

The bodies of create and fork may be empty. A session is
`{"session_id", "model", "tokens_seen", "created", "last_used", "expires",
"turns": [{"turn", "tokens_seen", "committed"}]}`, times in unix seconds (floats); `turns`
lists the checkpoints a rewind can return to, oldest first. Errors are OpenAI-shaped (see
openai_api) with the status of gru_serve.ops.errors.STATUS.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gru_serve.core.sessions import SessionInfo
from gru_serve.http.common import HttpFront, optional_body, owner, parse_body


class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = ""
    text: str = ""


class Fork(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Rewind(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    turn: int


def session_json(info: SessionInfo) -> dict[str, Any]:
    return {
        "session_id": info.session_id,
        "model": info.model,
        "tokens_seen": info.tokens_seen,
        "created": info.created,
        "last_used": info.last_used,
        "expires": info.expires,
        "turns": [
            {"turn": t.turn, "tokens_seen": t.tokens_seen, "committed": t.committed} for t in info.turns
        ],
    }


def routes(front: HttpFront) -> list[BaseRoute]:
    service = front.service

    async def create(request: Request) -> Response:
        body = await optional_body(request, CreateSession)
        info = await service.create_session(body.text, body.model, owner(request))
        return JSONResponse(session_json(info), status_code=201)

    async def get(request: Request) -> Response:
        info = await service.get_session(request.path_params["session_id"], owner(request))
        return JSONResponse(session_json(info))

    async def delete(request: Request) -> Response:
        await service.delete_session(request.path_params["session_id"], owner(request))
        return Response(status_code=204)

    async def fork(request: Request) -> Response:
        await optional_body(request, Fork)
        info = await service.fork_session(request.path_params["session_id"], owner(request))
        return JSONResponse(session_json(info), status_code=201)

    async def rewind(request: Request) -> Response:
        body = await parse_body(request, Rewind)
        info = await service.rewind_session(request.path_params["session_id"], body.turn, owner(request))
        return JSONResponse(session_json(info))

    return [
        Route("/v1/sessions", create, methods=["POST"]),
        Route("/v1/sessions/{session_id}", get, methods=["GET"]),
        Route("/v1/sessions/{session_id}", delete, methods=["DELETE"]),
        Route("/v1/sessions/{session_id}/fork", fork, methods=["POST"]),
        Route("/v1/sessions/{session_id}/rewind", rewind, methods=["POST"]),
    ]
