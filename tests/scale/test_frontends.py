"""`--frontends 2`: two front-end processes on one port and one engine process, with a real
Redis store: connections spread over both, any of them continues any session exactly, and a
front end or the engine that dies is started again."""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Iterator

import grpc
import psutil
import pytest

from gru_serve import launch
from gru_serve.bench.topology import NOT_SERVING, SERVING, health, wait_for
from gru_serve.engine.runtime import load_metadata
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2_grpc as pb_grpc
from gru_serve.launch import free_port
from tests.support.serving import D2L, reference_generate

START = "the time machine"
TOKENS = load_metadata(D2L)[0].vocab


class Family:
    def __init__(self, redis_url: str) -> None:
        self.metrics_port = free_port()
        argv = launch.serve_argv(D2L, "--frontends", "2", "--session-store", redis_url)
        argv += ["--metrics-port", str(self.metrics_port), "--log-level", "ERROR"]
        self.server = launch.Server(argv, name="family").start()
        self.proc, self.target = self.server.proc, self.server.target

    def members(self) -> dict[str, list[psutil.Process]]:
        kids = psutil.Process(self.proc.pid).children()
        out: dict[str, list[psutil.Process]] = {"engine": [], "frontend": []}
        for p in kids:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue  # dead, not yet reaped
                out["engine" if "gru_serve.engine.process" in p.cmdline() else "frontend"].append(p)
            except psutil.NoSuchProcess:
                continue
        return out

    def generate_calls(self, i: int) -> float:
        """Generate calls front end i answered (from its own metrics port)."""
        url = f"http://127.0.0.1:{self.metrics_port + i}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return sum(
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith("gru_serve_requests_total{") and 'Generate"' in line
        )

    def stop(self) -> None:
        assert self.server.stop(60) == 0
        self.server.close()


@pytest.fixture(scope="module")
def family(redis_server) -> Iterator[Family]:
    f = Family(redis_server.url)
    yield f
    f.stop()


def stub(target: str) -> pb_grpc.GenerationServiceStub:
    # A channel of its own (no shared subchannel): one new connection, which the kernel gives
    # to one of the listening front ends.
    return pb_grpc.GenerationServiceStub(
        grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    )


def ids_of(stream) -> list[int]:
    return [t.id for msg in stream for t in msg.tokens]


def test_any_front_end_continues_any_session_exactly(family):
    session = stub(family.target).CreateSession(pb.CreateSessionRequest(text=START))
    ids: list[int] = []
    for _ in range(16):  # 16 connections: all on one front end has odds 2 ** -15
        ids += ids_of(
            stub(family.target).Generate(pb.GenerateRequest(session_id=session.session_id, max_new_tokens=10))
        )
    assert text_of(ids) == reference_generate(D2L, START, 160)
    calls = [family.generate_calls(i) for i in range(2)]
    assert all(c > 0 for c in calls), calls


def test_a_killed_front_end_and_a_killed_engine_are_started_again(family):
    members = family.members()
    assert len(members["frontend"]) == 2 and len(members["engine"]) == 1
    os.kill(members["frontend"][0].pid, signal.SIGKILL)
    wait_for(lambda: len(family.members()["frontend"]) == 2, 60, "a second front end again")
    engine = members["engine"][0]
    os.kill(engine.pid, signal.SIGKILL)
    wait_for(
        lambda: health(family.target) == NOT_SERVING or engine.pid not in _pids(family), 10, "engine gone"
    )
    wait_for(
        lambda: health(family.target) == SERVING and _engine_restarted(family, engine.pid), 60, "serving"
    )
    # Every front end comes back with the new engine (each reconnects by itself; one may say
    # UNAVAILABLE for a moment): fresh connections to either serve the reference text.
    want = reference_generate(D2L, START, 40)
    for _ in range(8):
        got: list[int] = []
        wait_for(lambda got=got: _try(family.target, got), 60, "a front end serving")
        assert text_of(got) == want


def _try(target: str, out: list[int]) -> bool:
    try:
        out[:] = ids_of(stub(target).Generate(pb.GenerateRequest(prompt=START, max_new_tokens=40)))
        return True
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        return False


def text_of(ids: list[int]) -> str:
    return "".join(TOKENS[i] for i in ids)


def _pids(family: Family) -> set[int]:
    return {p.pid for group in family.members().values() for p in group}


def _engine_restarted(family: Family, old: int) -> bool:
    engines = family.members()["engine"]
    return len(engines) == 1 and engines[0].pid != old
