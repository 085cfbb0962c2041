"""One error hierarchy for the serving runtime. Each class names its kind of failure; the
gRPC layer maps kinds to status codes in one table (gru_serve.grpc.status)."""

from __future__ import annotations


class GruServeError(Exception):
    """Base of every error the service reports to a client or an operator."""


class InvalidArgument(GruServeError):
    """A request field is out of its range; the message names the field and the limit."""


class NotFound(GruServeError):
    pass


class SessionNotFound(NotFound):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session '{session_id}' is unknown")


class SessionExpired(NotFound):
    def __init__(self, session_id: str, evicted: bool = False, owner: str | None = None) -> None:
        why = "was evicted (the server keeps max_sessions sessions)" if evicted else "has expired"
        super().__init__(f"session '{session_id}' {why}")
        self.owner = owner  # who owned it, where the store remembers


class Aborted(GruServeError):
    pass


class SessionBusy(Aborted):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session '{session_id}' is busy with another request; retry when it ends")


class VersionConflict(Aborted):
    pass


class FailedPrecondition(GruServeError):
    """The request is well formed, but the server or the session is not set up to serve it
    (a setting that is off, another model's state)."""


class WrongModel(FailedPrecondition):
    """The session (or snapshot) belongs to another model."""


class ResourceExhausted(GruServeError):
    pass


class Unauthenticated(GruServeError):
    pass


class PermissionDenied(GruServeError):
    pass


class Unavailable(GruServeError):
    pass


class Internal(GruServeError):
    """A bug; the message carries an id that is also in the log."""


class ModelLoadError(GruServeError):
    """A model file cannot be served; raised at start-up, never to a client."""
