"""Bearer-token authentication, whatever the transport: which tokens are accepted, who a call's
caller is (sessions belong to a hash of the token, never the token itself) and whether it may
load and unload models. The gate of each transport decides the Caller once per call; handlers
read it and never parse credentials again."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from gru_serve.ops.errors import AmbiguousCredentials, PermissionDenied, Unauthenticated
from gru_serve.ops.settings import Settings, read_secrets


@dataclass(frozen=True)
class Tokens:
    """The accepted bearer tokens. Admin tokens may also load and unload models, and are
    accepted wherever an ordinary token is."""

    user: frozenset[str] = frozenset()
    admin: frozenset[str] = frozenset()

    @property
    def accepted(self) -> frozenset[str]:
        return self.user | self.admin

    @property
    def on(self) -> bool:
        """Authentication is on once any token is configured."""
        return bool(self.user or self.admin)


@dataclass(frozen=True)
class Caller:
    """Who makes a call, as the transport's gate decided it."""

    principal: str = ""  # owns what the call creates ('' for anonymous calls)
    admin_refusal: str = ""  # why it may not load or unload models ('' when it may)

    def require_admin(self, action: str) -> None:
        if self.admin_refusal:
            raise PermissionDenied(f"{action}: {self.admin_refusal}")


ANONYMOUS = Caller()
NEEDS_ADMIN = (
    "loading and unloading models needs an admin token, and this server has none: start it with "
    "--admin-token TOKEN (or --admin-tokens-file FILE) and send that token as the bearer token"
)
NOT_ADMIN = "loading and unloading models needs an admin token (--admin-token); this bearer token is not one"


def load_tokens(settings: Settings) -> Tokens:
    """The tokens of the settings (flags/env, then files); none means authentication is off."""
    return Tokens(
        frozenset(read_secrets(settings.auth_tokens, settings.auth_tokens_file, "auth_tokens_file")),
        frozenset(read_secrets(settings.admin_tokens, settings.admin_tokens_file, "admin_tokens_file")),
    )


def bearer(header: str | bytes | None) -> str:
    """The token of an `authorization: Bearer <token>` value; '' for anything else."""
    if not header:
        return ""
    # latin-1 never fails: any byte is a character, and a non-ASCII token is then refused.
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    scheme, _, token = text.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def principal_of_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:32] if token else ""


def _one_of(token: str, tokens: frozenset[str]) -> bool:
    # RFC 6750 tokens are ASCII; compare_digest raises on non-ASCII str, so compare bytes.
    # Compare against every token so timing does not tell which prefix matched.
    given = token.encode("utf-8", "surrogatepass")
    return any([hmac.compare_digest(given, t.encode("utf-8", "surrogatepass")) for t in tokens])


def refusal(token: str, accepted: frozenset[str]) -> str:
    """Why a call with this token is refused ('' when it is not, or authentication is off)."""
    if not accepted:
        return ""
    if not token:
        return "missing credentials: send 'authorization: Bearer <token>'"
    if not token.isascii() or not _one_of(token, accepted):
        return "invalid bearer token"
    return ""


def authenticate(values: Sequence[str | bytes], tokens: Tokens) -> Caller:
    """The caller of a request with these `authorization` values (every one it sent). Raises
    Unauthenticated, or AmbiguousCredentials for more than one value: parts of a server reading
    different ones would each see another caller."""
    if len(values) > 1:
        raise AmbiguousCredentials(
            f"{len(values)} authorization headers: send exactly one 'authorization: Bearer <token>'"
        )
    token = bearer(values[0]) if values else ""
    why = refusal(token, tokens.accepted)
    if why:
        raise Unauthenticated(why)
    if not tokens.on:
        # Auth off (the local default): whoever reaches the port may load and unload models,
        # as with Triton's explicit model control; the HTTP gate keeps web pages out.
        return Caller(principal_of_token(token))
    if not tokens.admin:
        return Caller(principal_of_token(token), NEEDS_ADMIN)
    return Caller(principal_of_token(token), "" if _one_of(token, tokens.admin) else NOT_ADMIN)
