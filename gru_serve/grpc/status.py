"""The one table from error kinds to gRPC status codes, and the decorator that applies it to
unary and streaming handlers alike."""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import Callable
from typing import Any

import grpc

from gru_serve import errors

log = logging.getLogger(__name__)

STATUS: dict[type[errors.GruServeError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


def status_of(error: errors.GruServeError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


def _mapped(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, errors.GruServeError):
        return status_of(error), str(error)
    incident = uuid.uuid4().hex[:12]
    log.error("internal error, incident %s", incident, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident})"


def grpc_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Turn GruServeError (and bugs) raised by a servicer method into gRPC statuses."""
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in handler(self, request, context):
                    yield item
            except Exception as e:
                if isinstance(e, grpc.aio.AbortError):
                    raise
                await context.abort(*_mapped(e))

        return stream

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            await context.abort(*_mapped(e))

    return unary
