import os
from pathlib import Path

import pytest

# Servers the tests start serve HTTP only where a test asks (on an ephemeral port); the default
# 8000 would collide between servers running at once.
os.environ.setdefault("GRU_SERVE_HTTP_PORT", "0")

TESTS = Path(__file__).parent
# A test's tier is its folder's: unit runs no server, subprocess or Redis; serve starts one
# server (in process or a subprocess); system runs several processes (Redis, Envoy, families,
# reliability runs, the exporters' training, the bench).
TIERS = {
    "unit": "unit",
    "serve": "serve",
    "http": "serve",
    "scale": "system",
    "reliability": "system",
    "exporters": "system",
    "bench": "system",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: no server, subprocess or Redis (make test-unit)")
    config.addinivalue_line("markers", "serve: one server, in process or a subprocess")
    config.addinivalue_line("markers", "system: several processes (Redis, Envoy, families, training)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.relative_to(TESTS).parts
        # Files at the top (packaging, repository checks) run subprocesses over the whole tree;
        # a folder not in TIERS counts as system until it is sorted.
        item.add_marker(TIERS.get(parts[0], "system") if len(parts) > 1 else "system")
