"""The compose topology without containers (gru_serve.bench.topology): real redis-server, real
`gru-serve serve` processes and real Envoy rendered from docker/envoy.yaml, on loopback ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gru_serve.bench.topology import RedisServer, Topology
from tests.support.redis import running_redis


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


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
