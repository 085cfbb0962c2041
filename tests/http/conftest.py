from collections.abc import Iterator

import pytest

from gru_serve.server import ThreadedServer
from tests.support.serving import TOKEN, openai_client, start_http_server


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    srv = start_http_server()
    yield srv
    srv.stop()


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
