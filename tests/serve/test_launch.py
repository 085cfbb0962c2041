"""gru_serve.launch: a server child is ready once it prints its ready lines (both ports then
answer), a silent one is killed at the deadline, one that exits says why, and SIGTERM stops
it with exit status 0."""

from __future__ import annotations

import sys

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gru_serve import launch
from tests.support.serving import D2L


def test_a_server_that_never_says_ready_is_killed_at_the_deadline():
    # It prints something else and then waits on stdin, which never closes (a hung start).
    code = "import sys; print('warming up', flush=True); sys.stdin.read()"
    srv = launch.Server([sys.executable, "-c", code], name="mute")
    with pytest.raises(launch.ServerDidNotStart, match="'warming up'"):
        srv.start(timeout_s=2)
    assert srv.proc is not None and srv.proc.poll() is not None  # killed, not left running
    srv.close()


def test_a_server_that_exits_says_why_from_its_stderr():
    code = "import sys; sys.exit('no model at /nowhere.onnx')"
    srv = launch.Server([sys.executable, "-c", code], name="broken")
    with pytest.raises(launch.ServerDidNotStart, match=r"no model at /nowhere\.onnx"):
        srv.start(timeout_s=60)
    assert srv.proc.returncode == 1
    srv.close()
    assert not srv.log_path.exists()  # its temporary log goes with it


def test_gru_serve_serve_ready_on_both_ports_and_stopped_by_sigterm():
    http_port = launch.free_port()
    argv = launch.serve_argv(D2L, "--http-port", str(http_port))
    with launch.Server(argv, http=True).start() as srv:
        assert srv.http_target == f"127.0.0.1:{http_port}"
        with grpc.insecure_channel(srv.target) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert httpx.get(f"http://{srv.http_target}/v2/health/ready", timeout=10).status_code == 200
        assert srv.stop() == 0  # it drains and exits cleanly on SIGTERM
        assert not srv.alive()
