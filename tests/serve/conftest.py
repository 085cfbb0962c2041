from collections.abc import Iterator

import pytest

from gru_serve.client import Client
from gru_serve.engine.runtime import ModelRuntime
from gru_serve.server import ThreadedServer
from tests.support.serving import D2L, start_server


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    srv = start_server()
    yield srv
    srv.stop()


@pytest.fixture
def client(server) -> Iterator[Client]:
    with Client(server.target) as c:
        yield c


@pytest.fixture(scope="session")
def runtime() -> ModelRuntime:
    return ModelRuntime(D2L)
