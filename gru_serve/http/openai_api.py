"""PLACEHOLDER."""

from __future__ import annotations

from starlette.routing import BaseRoute

from gru_serve.http.app import HttpFront


def routes(front: HttpFront) -> list[BaseRoute]:
    return []
