"""Triton's statistics and model repository extensions over HTTP/REST, answered by the same
data plane as gRPC (gru_serve.oip.dataplane, gru_serve.core.repository).

    GET  /v2/models/stats                        every model's statistics
    GET  /v2/models/{m}[/versions/{v}]/stats     one model's: {"model_stats": [$model_stat]}, in
                                                 Triton's shape, counts and ns as JSON numbers
    POST /v2/repository/index                    body optional {"ready": bool}; answers
                                                 [{"name", "version", "state", "reason"}]
    POST /v2/repository/models/{m}/load          body optional {"parameters": {...}}; 200 {}
                                                 once M and M-generate serve
    POST /v2/repository/models/{m}/unload        body optional {"parameters": {...}}; 200 {}
                                                 once M is gone (503 for M's requests meanwhile)

Load and unload need an admin token when authentication is on (gru_serve.ops.auth: 403
otherwise). Registered before the inference routes, so /v2/models/stats is not read as a model named
"stats". Errors: {"error": message} with the status of gru_serve.ops.errors' table (no repository
configured: 400 FAILED_PRECONDITION; a model not in the repository: 404).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gru_serve.http.common import HttpFront, caller, optional_body


class IndexBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ready: bool = False


class ModelBody(BaseModel):
    """A load or unload request: parameters as Triton's clients send them (tritonclient.http
    sends {"parameters": {"unload_dependents": false}} with an unload)."""

    model_config = ConfigDict(extra="forbid")
    parameters: dict[str, Any] = {}


def routes(front: HttpFront) -> list[BaseRoute]:
    dataplane = front.dataplane

    async def stats(request: Request) -> Response:
        p = request.path_params
        return JSONResponse(dataplane.statistics_json(p.get("model", ""), p.get("version", "")))

    async def index(request: Request) -> Response:
        body = await optional_body(request, IndexBody)
        listed = dataplane.repository_index(body.ready).models
        fields = ("name", "version", "state", "reason")
        return JSONResponse([{f: getattr(m, f) for f in fields} for m in listed])

    async def load(request: Request) -> Response:
        body = await optional_body(request, ModelBody)
        await dataplane.load_model(caller(request), request.path_params["model"], list(body.parameters))
        return JSONResponse({})

    async def unload(request: Request) -> Response:
        await optional_body(request, ModelBody)  # unload_dependents means nothing here: no dependents
        await dataplane.unload_model(caller(request), request.path_params["model"])
        return JSONResponse({})

    return [
        Route("/v2/models/stats", stats, methods=["GET"]),
        Route("/v2/models/{model}/stats", stats, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/stats", stats, methods=["GET"]),
        Route("/v2/repository/index", index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", unload, methods=["POST"]),
    ]
