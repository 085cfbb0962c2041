"""Faults with the Redis session store: SIGTERM mid-stream and a Redis restart lose no
committed session."""

import grpc
import pytest

from gru_serve.bench.topology import RedisServer, wait_for
from gru_serve.client import Client
from tests.support.reliability import TALLY, record
from tests.support.serving import reference_generate


class DurableRedis(RedisServer):
    """redis-server with an append-only file, so a restart keeps what was committed."""

    def start(self) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self._pong(), 10, "redis-server answers PING")


@pytest.fixture
def redis_server(tmp_path):
    r = DurableRedis(tmp_path)
    r.start()
    yield r
    r.stop()


def test_sigterm_mid_stream_keeps_committed_sessions(redis_server, server_process, runtime):
    store = ("--session-store", redis_server.url)
    srv = server_process(*store, "--grace-s", "0.5", "--max-new-tokens", "1000000")
    with Client(srv.target) as c:
        sid = c.create_session("time traveller").session_id
        first, _ = c.generate_text("", session_id=sid, max_new_tokens=20)
        stream = c.generate("", session_id=sid, max_new_tokens=1_000_000)
        next(stream)
        srv.proc.terminate()
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert srv.proc.wait(timeout=60) == 0
    again = server_process(*store)
    with Client(again.target) as c:
        assert c.get_session(sid).tokens_seen == 14 + 20
        rest, _ = wait_for_free(c, sid, 30)
    assert first + rest == reference_generate(runtime, "time traveller", 50)
    TALLY["faults injected"] += 1
    record(
        "SIGTERM mid-stream with Redis",
        in_flight="UNAVAILABLE",
        committed_session="continued exactly on a new process",
    )


def wait_for_free(c: Client, sid: str, n: int):
    """The killed request's lease may outlive it by a few seconds; wait for it (bounded)."""
    result = []

    def attempt() -> bool:
        try:
            result.append(c.generate_text("", session_id=sid, max_new_tokens=n))
            return True
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ABORTED:
                raise
            return False

    wait_for(attempt, 10, "the session's lease is free", every=0.1)
    return result[0]


def test_redis_restart_loses_nothing_committed(redis_server, server_process, runtime):
    srv = server_process("--session-store", redis_server.url)
    with Client(srv.target) as c:
        sessions = [c.create_session("time traveller").session_id for _ in range(8)]
        firsts = [c.generate_text("", session_id=s, max_new_tokens=10)[0] for s in sessions]
        redis_server.stop()
        with pytest.raises(grpc.RpcError) as err:
            c.generate_text("", session_id=sessions[0], max_new_tokens=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "unreachable" in err.value.details()
        redis_server.start()
        rests = [wait_for_free(c, s, 10)[0] for s in sessions]
    want = reference_generate(runtime, "time traveller", 20)
    assert all(a + b == want for a, b in zip(firsts, rests, strict=True))
    TALLY["faults injected"] += 1
    record("Redis restart", sessions=8, during_outage="UNAVAILABLE", after="every session continued exactly")
