from collections.abc import Iterator

import pytest

from gru_serve.server import ThreadedServer
from gru_serve.settings import Settings
from tests.serve.conftest import D2L, LONG


def start_http_server(**settings) -> ThreadedServer:
    """A server with gRPC and HTTP, each on an ephemeral port (target, http_target)."""
    return ThreadedServer(
        Settings(port=0, models=(str(D2L),), **{"max_new_tokens": LONG, **settings}), http=True
    )


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    srv = start_http_server()
    yield srv
    srv.stop()
