"""Who is calling over gRPC: the bearer token in a call's metadata (gru_serve.ops.auth decides)."""

from __future__ import annotations

import grpc

from gru_serve.ops.auth import bearer, principal_of_token


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    return next((bearer(value) for key, value in metadata or () if key == "authorization"), "")


def owner_of(context: grpc.aio.ServicerContext) -> str:
    """The principal that owns what this call creates ('' for anonymous calls)."""
    return principal_of_token(bearer_token(context.invocation_metadata()))
