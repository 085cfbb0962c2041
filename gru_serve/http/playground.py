"""The playground: one static page (no build step, nothing fetched from elsewhere) that uses only
the public HTTP API (/v1/models, /v1/sessions, /v1/completions) to stream generations, continue
and fork sessions. Served without a token (app.OPEN_PATHS); the page sends the one typed into it."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

from gru_serve.http.common import HttpFront

STATIC = Path(__file__).parent / "static"

# path -> (file in STATIC, content type)
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground.css": ("playground.css", "text/css; charset=utf-8"),
}

# The page loads only its own script and style and talks only to this server.
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "cache-control": "no-cache",  # revalidate (ETag / Last-Modified) so an upgrade shows at once
    "x-content-type-options": "nosniff",
    "content-security-policy": POLICY,
    "referrer-policy": "no-referrer",
}


def _serve(name: str, media_type: str):
    path = STATIC / name

    async def endpoint(request: Request) -> Response:
        return FileResponse(path, media_type=media_type, headers=HEADERS)

    return endpoint


def routes(front: HttpFront) -> list[BaseRoute]:
    return [
        Route(url, _serve(name, media), methods=["GET"], name=f"playground:{name}")
        for url, (name, media) in FILES.items()
    ]
