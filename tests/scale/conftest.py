"""The compose topology without containers (gru_serve.bench.topology): real redis-server, real
`gru-serve serve` processes and real Envoy rendered from docker/envoy.yaml, on loopback ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gru_serve.bench import topology as topo
from gru_serve.bench.topology import (  # noqa: F401 (the tests import them from here)
    D2L,
    DOCKER,
    NOT_SERVING,
    ROOT,
    SERVING,
    Envoy,
    RedisServer,
    Replica,
    Topology,
    health,
    render_envoy_config,
    wait_for,
)
from gru_serve.launch import free_port  # noqa: F401 (the tests import it from here)


def installed_binary(name: str) -> str:
    """A missing server binary fails the test (never skips it)."""
    try:
        return topo.installed_binary(name)
    except topo.MissingBinary as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def topology(tmp_path_factory) -> Iterator[Topology]:
    # Long streams for the kill scenario: a request may ask for many tokens.
    topo = Topology(tmp_path_factory.mktemp("topology"), 3, ("--max-new-tokens", "1000000", "--grace-s", "2"))
    try:
        topo.start()
        yield topo
    finally:
        topo.stop()


@pytest.fixture
def cluster(topology) -> Topology:
    """The topology with every process up and SERVING (tests kill and stop parts of it)."""
    topology.heal()
    return topology
