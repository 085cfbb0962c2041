"""Who is calling over gRPC: the server interceptor decides it once per call, from the call's
metadata (gru_serve.ops.auth decides), and handlers read it here."""

from __future__ import annotations

from contextvars import ContextVar

import grpc

from gru_serve.ops.auth import Caller, Tokens, authenticate

# Set by the interceptor in the call's own task, before the handler runs. No default: a handler
# reached without the gate fails loudly instead of acting for the anonymous owner.
_caller: ContextVar[Caller] = ContextVar("gru_serve_caller")


def authorization_values(metadata: tuple[tuple[str, str | bytes], ...] | None) -> list[str | bytes]:
    return [value for key, value in metadata or () if key == "authorization"]


def decide_caller(metadata: tuple[tuple[str, str | bytes], ...] | None, tokens: Tokens) -> Caller:
    """The caller of a call with this metadata; raises Unauthenticated (the interceptor's work)."""
    return authenticate(authorization_values(metadata), tokens)


def set_caller(caller: Caller) -> None:
    _caller.set(caller)


def caller_of(context: grpc.aio.ServicerContext) -> Caller:
    """The caller the interceptor decided for this call."""
    return _caller.get()


def owner_of(context: grpc.aio.ServicerContext) -> str:
    """The principal that owns what this call creates ('' for anonymous calls)."""
    return caller_of(context).principal
