"""The Open Inference Protocol (KServe v2) over HTTP/REST, as Triton serves it, so that
tritonclient.http, KServe clients and curl work with gru-serve as with Triton. A codec only:
every request becomes the protocol's own message (gru_serve.http.inference_codec has the bodies)
and is answered by the same data plane as gRPC (gru_serve.oip.dataplane), so a sequence started
over one transport goes on over the other for the same owner. Models, inputs, outputs and
parameters are the data plane's (see its docstring): `M` (input_ids -> logits) and
`M-generate` (prompt -> text, token_ids).

Routes ({v} is optional everywhere: `/v2/models/{m}/versions/{v}/...`):

    GET  /v2                        server metadata {"name", "version", "extensions"}: gRPC's
                                    extensions and binary_tensor_data, generate
    GET  /v2/health/live            200
    GET  /v2/health/ready           200 when the models are loaded, else 503
    GET  /v2/models/{m}             model metadata {"name", "versions", "platform", "inputs",
                                    "outputs"}; tensors {"name", "datatype", "shape": [numbers]}
    GET  /v2/models/{m}/ready       200 when ready, 503 when the server is not, 404 unknown
    GET  /v2/models/{m}/config      the ModelConfig as Triton prints it: protobuf JSON with the
                                    proto field names and every field with no presence, 64-bit
                                    integers as JSON numbers
    POST /v2/models/{m}/infer       an inference request (gru_serve.http.inference_codec)
    POST /v2/models/{m}/generate    Triton's generate extension: one JSON response
    POST /v2/models/{m}/generate_stream   the same as server-sent events, one `data:` per response

Errors: {"error": message} with the HTTP status of gru_serve.ops.errors' table (unknown model or
version 404, a bad request 400, ...).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gru_serve.grpc.generated.inference import grpc_service_pb2 as pb
from gru_serve.http.common import HttpFront, event_stream, owner, sse_event
from gru_serve.http.inference_codec import (
    HEADER_LENGTH,
    decompressed,
    generate_json,
    generate_request,
    infer_request,
    infer_response,
    load_object,
    message_json,
)
from gru_serve.oip.tensors import EMPTY_FINAL, Endpoint
from gru_serve.ops.errors import InvalidArgument, Unavailable

REST_EXTENSIONS = ("binary_tensor_data", "generate")  # Triton's HTTP-only extensions served here


# -- routes --


def _model(request: Request) -> tuple[str, str]:
    return request.path_params["model"], request.path_params.get("version", "")


def routes(front: HttpFront) -> list[BaseRoute]:
    dataplane = front.dataplane

    async def server_metadata(request: Request) -> Response:
        metadata = dataplane.server_metadata()
        return JSONResponse({**metadata, "extensions": [*metadata["extensions"], *REST_EXTENSIONS]})

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        if not dataplane.ready:
            raise Unavailable("the server is not ready")
        return Response(status_code=200)

    async def model_metadata(request: Request) -> Response:
        return JSONResponse(message_json(dataplane.model_metadata(*_model(request))))

    async def model_ready(request: Request) -> Response:
        ep = dataplane.endpoint(*_model(request))
        if not dataplane.ready:
            raise Unavailable(f"model '{ep.name}' is not ready: the server is not ready")
        return Response(status_code=200)

    async def model_config(request: Request) -> Response:
        config = dataplane.model_config(*_model(request))
        return JSONResponse(message_json(config, every_field=True))

    async def infer(request: Request) -> Response:
        dataplane.endpoint(*_model(request))  # an unknown model is 404 whatever the body
        body = await body_of(request)
        req, binary_out, default = infer_request(*_model(request), body, request.headers.get(HEADER_LENGTH))
        resp = await dataplane.infer(req, owner(request))
        return await infer_response(resp, binary_out, default)

    async def body_of(request: Request) -> bytes:
        encoding = request.headers.get("content-encoding", "").strip().lower()
        return decompressed(await request.body(), encoding, front.max_body_bytes)

    async def generation(request: Request) -> tuple[Endpoint, pb.ModelInferRequest]:
        ep = dataplane.endpoint(*_model(request))
        data = load_object(await body_of(request))
        if not ep.generate:
            raise InvalidArgument(
                f"model '{ep.name}' does not generate (its inputs: {', '.join(ep.inputs)}); "
                f"POST /v2/models/{ep.name}/infer"
            )
        return ep, generate_request(ep, _model(request)[1], data)

    async def generate(request: Request) -> Response:
        ep, req = await generation(request)
        return JSONResponse(generate_json(ep, await dataplane.infer(req, owner(request))))

    async def generate_stream(request: Request) -> Response:
        ep, req = await generation(request)
        req.parameters[EMPTY_FINAL].bool_param = True  # the finish parameters end the stream
        responses = dataplane.generate_stream(ep, req, owner(request))
        # The first response before the status line: a request that fails before generating
        # gets its error status, as Triton does.
        try:
            first: pb.ModelInferResponse | None = await anext(responses)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await responses.aclose()
            raise

        async def events() -> AsyncIterator[str]:
            async with contextlib.aclosing(responses):
                if first is not None:
                    yield sse_event(generate_json(ep, first))
                async for resp in responses:
                    yield sse_event(generate_json(ep, resp))

        return event_stream(request.url.path, events())

    def both(path: str, endpoint: Callable[[Request], Awaitable[Response]], method: str) -> list[Route]:
        """The route with and without /versions/{version}."""
        return [
            Route(f"/v2/models/{{model}}{path}", endpoint, methods=[method]),
            Route(f"/v2/models/{{model}}/versions/{{version}}{path}", endpoint, methods=[method]),
        ]

    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        *both("", model_metadata, "GET"),
        *both("/ready", model_ready, "GET"),
        *both("/config", model_config, "GET"),
        *both("/infer", infer, "POST"),
        *both("/generate", generate, "POST"),
        *both("/generate_stream", generate_stream, "POST"),
    ]
