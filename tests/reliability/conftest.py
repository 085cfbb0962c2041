"""The reliability suite: results are counted here and written for docs/reliability.md."""

import json
import os
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from gru_serve import launch
from gru_serve.launch import free_port
from gru_serve.shipped import default_model_path

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("GRU_SERVE_RELIABILITY_RESULTS", REPO / "build" / "reliability.json"))

# Counters every test adds to: streams held, tokens served, faults injected, bad inputs tried...
TALLY: Counter = Counter()
SCENARIOS: list[dict] = []


def record(scenario: str, **facts) -> None:
    SCENARIOS.append({"scenario": scenario, **facts})


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


class ServerProcess(launch.Server):
    """`gru-serve serve` as a separate process (started through gru_serve.launch), with its
    metrics endpoint; its stderr in log_text()."""

    def __init__(self, *args: str) -> None:
        self.metrics_port = free_port()
        argv = launch.serve_argv(default_model_path(), "--metrics-port", str(self.metrics_port), *args)
        super().__init__(argv)
        self.start()

    def metrics(self) -> dict[str, float]:
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def wait_metric(self, name: str, predicate, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = self.metrics().get(name)
            if value is not None and predicate(value):
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} = {value} did not reach the condition in {timeout} s")
            time.sleep(0.05)

    def stop(self, deadline_s: float = 60.0) -> int:
        return super().stop(deadline_s)


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
