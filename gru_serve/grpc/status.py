"""gru_serve.ops.errors' status table applied to gRPC: the decorator that turns errors into
statuses for unary and streaming handlers alike."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc

from gru_serve.ops import errors

log = logging.getLogger(__name__)


def status_of(error: errors.GruServeError) -> grpc.StatusCode:
    return grpc.StatusCode[errors.status_of(error)[0]]


def _mapped(error: BaseException) -> tuple[grpc.StatusCode, str]:
    code, _, message = errors.public(error)
    return grpc.StatusCode[code], message


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
