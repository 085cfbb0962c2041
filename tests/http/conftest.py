from collections.abc import Iterator

import pytest

from gru_serve.ops.settings import Settings
from gru_serve.server import ThreadedServer
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


# -- shared by the OpenAI-compatible and sessions tests --

TOKEN = "x"  # the openai client always sends a bearer token; sessions belong to it, auth on or off


def openai_client(srv: ThreadedServer, token: str = TOKEN):
    """The unmodified openai client on a server's /v1 (no retries: a test sees every status)."""
    import openai

    return openai.OpenAI(base_url=srv.http_target + "/v1", api_key=token, max_retries=0)


@pytest.fixture
def oai(server):
    with openai_client(server) as c:
        yield c


@pytest.fixture
def grpc_client(server):
    """A gRPC client with the openai client's token, so both reach the same sessions."""
    from gru_serve.client import Client

    with Client(server.target, token=TOKEN) as c:
        yield c
