"""The reliability suite: results are counted here and written for docs/reliability.md."""

import json
import os
from pathlib import Path

import pytest

from gru_serve.shipped import default_model_path
from tests.support.processes import ServerProcess
from tests.support.reliability import SCENARIOS, TALLY

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("GRU_SERVE_RELIABILITY_RESULTS", REPO / "build" / "reliability.json"))


def pytest_sessionfinish(session, exitstatus):
    if not SCENARIOS:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    failed = session.testsfailed
    RESULTS.write_text(
        json.dumps(
            {
                "tally": dict(TALLY),
                "scenarios": SCENARIOS,
                "failures": failed,
                "collected": session.testscollected,
            },
            indent=2,
        )
    )


@pytest.fixture
def server_process():
    procs: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        procs.append(ServerProcess(*args))
        return procs[-1]

    yield start
    for p in procs:
        p.stop()
        p.close()


@pytest.fixture(scope="session")
def runtime():
    from gru_serve.engine.runtime import ModelRuntime

    return ModelRuntime(default_model_path())
