"""The server interceptor: bearer-token authentication and the drain (gru_serve.ops.gate), request
ids, access log, metrics."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Callable

import grpc

from gru_serve.grpc.auth import decide_caller, set_caller
from gru_serve.ops import errors
from gru_serve.ops.auth import ANONYMOUS, Caller
from gru_serve.ops.gate import DRAINING, REFUSED_HEADER, Gate
from gru_serve.ops.logs import request_id
from gru_serve.ops.metrics import Metrics

log = logging.getLogger("gru_serve.access")

HEALTH = "/grpc.health.v1.Health/"
# Probes never need a token (they reveal nothing but liveness and readiness).
OPEN_METHODS = (
    HEALTH,
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, gate: Gate) -> None:
        self.metrics = metrics
        self.gate = gate  # shared with the HTTP front end

    def _caller(self, method: str, metadata) -> tuple[Caller, str]:
        """Who calls, or why the call is refused (probes are never refused)."""
        try:
            return decide_caller(metadata, self.gate.tokens), ""
        except errors.Unauthenticated as e:
            return ANONYMOUS, "" if method.startswith(OPEN_METHODS) else str(e)

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        caller, refusal = self._caller(method, details.invocation_metadata)
        rid = (
            next((v for k, v in details.invocation_metadata or () if k == "x-request-id"), "")
            or uuid.uuid4().hex
        )
        rid = str(rid)[:64]
        kind = (
            ("stream" if handler.request_streaming else "unary")
            + "_"
            + ("stream" if handler.response_streaming else "unary")
        )
        behavior = getattr(handler, kind)

        peer = ""
        counted = False

        async def begin(context: grpc.aio.ServicerContext) -> float:
            nonlocal peer, counted
            peer = context.peer()  # not after the call ends: a finished call's context may be gone
            request_id.set(rid)
            set_caller(caller)  # in this call's task: its handler reads it (gru_serve.grpc.auth)
            if self.gate.draining and not method.startswith(HEALTH):
                await context.send_initial_metadata((("x-request-id", rid), (REFUSED_HEADER, "draining")))
                await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
            await context.send_initial_metadata((("x-request-id", rid),))
            if refusal:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
            if not method.startswith(HEALTH):
                counted = True
                self.gate.enter()
            return time.perf_counter()

        def end(context: grpc.aio.ServicerContext, t0: float, error: BaseException | None) -> None:
            if counted:
                self.gate.leave()
            if isinstance(error, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            elif error is not None and not isinstance(error, grpc.aio.AbortError):
                code = grpc.StatusCode.UNKNOWN
            else:
                code = context.code() or grpc.StatusCode.OK
            if not isinstance(code, grpc.StatusCode):
                code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
            seconds = time.perf_counter() - t0
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.request_seconds.labels(method).observe(seconds)
            log.info(
                "rpc",
                extra={
                    "method": method,
                    "code": code.name,
                    "duration_ms": round(seconds * 1000, 3),
                    "peer": peer,
                },
            )

        if handler.response_streaming and inspect.isasyncgenfunction(behavior):

            async def wrapped_stream(request, context):
                t0 = time.perf_counter()
                error = None
                try:
                    t0 = await begin(context)
                    async for item in behavior(request, context):
                        yield item
                except BaseException as e:
                    error = e
                    raise
                finally:
                    end(context, t0, error)

            wrapped = wrapped_stream
        else:

            async def wrapped_call(request, context):
                t0 = time.perf_counter()
                error = None
                try:
                    t0 = await begin(context)
                    return await behavior(request, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    end(context, t0, error)

            wrapped = wrapped_call

        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
