"""A real redis-server (the dev extra's wheel) for the tests that need one."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gru_serve.bench.topology import RedisServer


@contextmanager
def running_redis(tmp: Path) -> Iterator[RedisServer]:
    """redis-server on a loopback port, its files under tmp, stopped at the end."""
    server = RedisServer(tmp)
    server.start()
    try:
        yield server
    finally:
        server.stop()
