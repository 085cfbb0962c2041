"""The HTTP application: routes from each API module, and what every request goes through
(request id, authentication, drain, body limit, access log, metrics, the error table)."""

from __future__ import annotations

import ipaddress
import json
import logging
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

from gru_serve.http import inference_api, openai_api, playground, repository_api, sessions_api
from gru_serve.http.common import CALLER, BodyTooLarge, HttpFront, error_body, error_response
from gru_serve.ops import errors
from gru_serve.ops.auth import ANONYMOUS, authenticate
from gru_serve.ops.errors import PermissionDenied, UnsupportedMediaType
from gru_serve.ops.gate import DRAINING, REFUSED_HEADER  # a drain refused this before any work
from gru_serve.ops.logs import request_id

log = logging.getLogger("gru_serve.access")

# Probes and the playground page itself need no token (the page sends the one typed into it).
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/", "/playground.js", "/playground.css")
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # else OTHER
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# What a POST body may be with authentication off. A web page can post the CORS-safelisted
# types (text/plain, forms) to any origin without asking; no type at all (tritonclient.http,
# curl -X POST) stays accepted, as the Origin check refuses pages that send a body without one.
POST_TYPES = ("application/json", "application/octet-stream")


def allowed_hosts(host: str, configured: tuple[str, ...]) -> list[str]:
    """The Host header values answered: the configured ones, else the loopback names when the
    server listens on loopback only (a page cannot rebind a name to it), else any."""
    if configured:
        return list(configured)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    return list(LOOPBACK_HOSTS) if loopback else ["*"]


def browser_refusal(headers: dict[str, str]) -> errors.GruServeError | None:
    """Why a POST that a web page of another site could have sent is refused (CSRF): by its
    Origin when a browser sent one, else by a content type a form or text/plain post has."""
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != headers.get("host", "").lower():
        return PermissionDenied(
            f"origin {origin[:100]!r} is another site than this server: with authentication off "
            "only the server's own pages and clients that send no Origin may POST"
        )
    kind = headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind and kind not in POST_TYPES:
        return UnsupportedMediaType(
            f"content-type {kind[:100]!r}: a POST body must be {' or '.join(POST_TYPES)} "
            "(any page a browser shows can post this type to the server)"
        )
    return None


class Front:
    """ASGI middleware for every HTTP request: request id, authentication, drain refusal,
    body limit, in-flight count, access log and metrics."""

    def __init__(self, app: Starlette, front: HttpFront) -> None:
        self.app = app
        self.front = front
        s = front.service.settings
        # DNS rebinding: a page whose name now points at this server sends its own name as Host.
        self.hosts = TrustedHostMiddleware(app, allowed_hosts(s.host, s.allowed_hosts), www_redirect=False)

    def authenticate(self, scope: dict, path: str) -> errors.GruServeError | None:
        """Decide the request's caller, once (into the scope); why it is refused, if it is."""
        values = [v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"]
        scope[CALLER] = ANONYMOUS
        try:
            scope[CALLER] = authenticate(values, self.front.gate.tokens)
        except errors.Unauthenticated as e:
            return None if path in OPEN_PATHS else e
        return None

    def route_of(self, scope: dict) -> str:
        """Method and path template of the route a request went to (or would have, when it was
        answered before routing); "(no route)" for a path no route has."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.app.routes if r.matches(scope)[0] != Match.NONE), None)
        method = scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER"
        return f"{method} {getattr(route, 'path', '(no route)')}"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        front, gate = self.front, self.front.gate
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        rid = (headers.get("x-request-id") or uuid.uuid4().hex)[:64]
        request_id.set(rid)
        path, method = scope["path"], scope["method"]
        t0 = time.perf_counter()
        status = 0  # no response started yet

        async def send_logged(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        async def reply(code: str, http: int, text: str, extra: tuple = ()) -> None:
            body = json.dumps(error_body(path, code, http, text)).encode()
            hdrs = [(b"content-type", b"application/json"), *extra]
            await send_logged({"type": "http.response.start", "status": http, "headers": hdrs})
            await send_logged({"type": "http.response.body", "body": body})

        limit = front.max_body_bytes
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(f"the request body is over max_body_bytes={limit}")
            return message

        counted = False

        def count() -> None:
            # A drain waits for a request from when its body is in, not while a client is still
            # sending it (http_read_timeout_s ends that).
            nonlocal counted
            if not counted:
                counted = True
                gate.enter()

        async def counted_receive() -> dict:
            message = await limited_receive()
            if message["type"] == "http.request" and not message.get("more_body", False) and not counted:
                if gate.draining:  # the drain began while the body arrived: no work done yet
                    raise errors.Unavailable(DRAINING)
                count()
            return message

        try:
            refused = self.authenticate(scope, path)
            csrf = None if gate.tokens.on or method != "POST" else browser_refusal(headers)
            declared = headers.get("content-length", "")
            if gate.draining and not path.startswith("/v2/health"):
                await reply("UNAVAILABLE", 503, DRAINING, ((REFUSED_HEADER.encode(), b"draining"),))
            elif refused is not None:
                code, http, text = errors.public(refused)
                await reply(code, http, text, ((b"www-authenticate", b"Bearer"),) if http == 401 else ())
            elif csrf is not None:
                await reply(*errors.public(csrf))
            elif declared.isdigit() and int(declared) > limit:
                await reply("RESOURCE_EXHAUSTED", 413, f"the request body is over max_body_bytes={limit}")
            else:
                if declared in ("", "0") and "transfer-encoding" not in headers:
                    count()  # no body to wait for
                try:
                    # Probes come with whatever Host a prober sends; they reveal nothing.
                    app = self.app if path.startswith("/v2/health") else self.hosts
                    await app(scope, counted_receive, send_logged)
                except BodyTooLarge as e:
                    await reply("RESOURCE_EXHAUSTED", 413, str(e))
                except Exception as e:
                    # Starlette has answered with the error table (and re-raises); a failure
                    # before any response gets its answer here.
                    if not status:
                        await reply(*errors.public(e))
        finally:
            if counted:
                gate.leave()
            seconds = time.perf_counter() - t0
            name = f"{method} {path}"
            # Labelled by route template: a label per session id or unknown path would grow
            # the registry without bound.
            label = self.route_of(scope)
            front.metrics.requests.labels(label, str(status or 500)).inc()
            front.metrics.request_seconds.labels(label).observe(seconds)
            log.info(
                "http",
                extra={
                    "method": name,
                    "code": status or 500,
                    "duration_ms": round(seconds * 1000, 3),
                    "peer": "{}:{}".format(*scope["client"]) if scope.get("client") else "",
                },
            )


def build_app(front: HttpFront) -> Callable:
    routes = [
        *openai_api.routes(front),
        *sessions_api.routes(front),
        *repository_api.routes(front),  # before /v2/models/{name}: it has /v2/models/stats
        *inference_api.routes(front),
        *playground.routes(front),
    ]

    async def on_error(request: Request, exc: Exception) -> Response:
        return error_response(request, exc)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        code = "NOT_FOUND" if exc.status_code == 404 else "INVALID_ARGUMENT"
        message = (
            f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        )
        body = error_body(request.url.path, code, exc.status_code, message)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def on_too_large(request: Request, exc: Exception) -> Response:
        # Raised by Front's receive while a route reads a body sent without a content-length;
        # 413 is HTTP's own status, which the error table (shared with gRPC) has no class for.
        body = error_body(request.url.path, "RESOURCE_EXHAUSTED", 413, str(exc))
        return JSONResponse(body, status_code=413)

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        # The client went away (or http_read_timeout_s closed it) before its body was in: no one
        # reads this, and it is no server error to log with a trace (a slowloris would flood it).
        return Response(status_code=499)  # nginx's "client closed request", for the access log

    # GruServeError is answered in place; any other exception also reaches the server error
    # middleware, which answers with the same handler (an incident id) and re-raises to Front.
    handlers = {
        BodyTooLarge: on_too_large,
        ClientDisconnect: on_disconnect,
        errors.GruServeError: on_error,
        HTTPException: on_http_error,
        Exception: on_error,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    return Front(app, front)
