"""One error hierarchy for the serving runtime, and the one table that gives each kind of
failure its status on every transport (the gRPC code name and the HTTP status)."""

from __future__ import annotations

import logging
import uuid

log = logging.getLogger(__name__)


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
        why = (
            "was evicted (the server keeps max_sessions sessions, max_sessions_per_owner per token)"
            if evicted
            else "has expired"
        )
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


class ResponseTooLarge(ResourceExhausted):
    """A request whose answer would exceed a size limit: no retry helps, a smaller request does."""


class Unauthenticated(GruServeError):
    pass


class AmbiguousCredentials(Unauthenticated):
    """A request with more than one `authorization` value: a malformed request over HTTP."""


class UnsupportedMediaType(InvalidArgument):
    """An HTTP body of a content type the route does not take."""


class PermissionDenied(GruServeError):
    pass


class Unavailable(GruServeError):
    pass


class RequestTimeout(GruServeError):
    """An HTTP client did not send its whole request in time (HTTP's own 408; gRPC has its
    transport's keepalive for this and never sees it)."""


class Internal(GruServeError):
    """A bug; the message carries an id that is also in the log."""


class ModelLoadError(GruServeError):
    """A model file cannot be served; raised at start-up, never to a client."""


# Kind -> (gRPC status code name, HTTP status). The most specific class in an error's MRO wins;
# anything else is INTERNAL / 500. HTTP follows gRPC's own mapping (google.rpc.Code).
STATUS: dict[type[GruServeError], tuple[str, int]] = {
    InvalidArgument: ("INVALID_ARGUMENT", 400),
    NotFound: ("NOT_FOUND", 404),
    Aborted: ("ABORTED", 409),
    FailedPrecondition: ("FAILED_PRECONDITION", 400),
    ResourceExhausted: ("RESOURCE_EXHAUSTED", 429),
    ResponseTooLarge: ("RESOURCE_EXHAUSTED", 413),
    Unauthenticated: ("UNAUTHENTICATED", 401),
    AmbiguousCredentials: ("UNAUTHENTICATED", 400),
    UnsupportedMediaType: ("INVALID_ARGUMENT", 415),
    PermissionDenied: ("PERMISSION_DENIED", 403),
    Unavailable: ("UNAVAILABLE", 503),
    RequestTimeout: ("DEADLINE_EXCEEDED", 408),
    Internal: ("INTERNAL", 500),
}
INTERNAL_STATUS = ("INTERNAL", 500)


def status_of(error: BaseException) -> tuple[str, int]:
    """The (gRPC code name, HTTP status) of an error."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return INTERNAL_STATUS


def error_of(code: str, http: int, message: str) -> GruServeError:
    """The table's class for a status (gRPC code name, HTTP status) with `message`: an error that
    crossed a process boundary as its status. A status the table lacks is Internal."""
    for kind, status in STATUS.items():
        if status == (code, http):
            return kind(message)
    return Internal(message)


def public(error: BaseException) -> tuple[str, int, str]:
    """What a client is told of an error: its gRPC code name, HTTP status and message. A bug's
    details stay in the log under an incident id that the message carries."""
    if isinstance(error, GruServeError):
        return (*status_of(error), str(error))
    incident = uuid.uuid4().hex[:12]
    log.error("internal error, incident %s", incident, exc_info=error)
    return (*INTERNAL_STATUS, f"internal error (incident {incident})")
