"""Bearer-token authentication, whatever the transport: which tokens are accepted and who a
token's holder is (sessions belong to a hash of the token, never the token itself)."""

from __future__ import annotations

import hashlib
import hmac


def bearer(header: str | bytes | None) -> str:
    """The token of an `authorization: Bearer <token>` value; '' for anything else."""
    if not header:
        return ""
    text = header.decode() if isinstance(header, bytes) else header
    scheme, _, token = text.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def principal_of_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:32] if token else ""


def refusal(token: str, accepted: frozenset[str]) -> str:
    """Why a call with this token is refused ('' when it is not, or authentication is off)."""
    if not accepted:
        return ""
    if not token:
        return "missing credentials: send 'authorization: Bearer <token>'"
    # Compare against every token so timing does not tell which prefix matched.
    if not any([hmac.compare_digest(token, t) for t in accepted]):
        return "invalid bearer token"
    return ""
