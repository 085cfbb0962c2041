"""Bearer-token authentication: who is calling, and the interceptor that refuses strangers."""

from __future__ import annotations

import hashlib

import grpc


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


def principal_of_token(token: str) -> str:
    """Sessions record a hash of their token, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:32] if token else ""


def owner_of(context: grpc.aio.ServicerContext) -> str:
    """The principal that owns what this call creates ('' for anonymous calls)."""
    return principal_of_token(bearer_token(context.invocation_metadata()))
