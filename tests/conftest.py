import os

import pytest

# Servers the tests start serve HTTP only where a test asks (on an ephemeral port); the default
# 8000 would collide between servers running at once.
os.environ.setdefault("GRU_SERVE_HTTP_PORT", "0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
