"""The compose topology without containers: real redis-server, real `gru-serve serve`
processes and real nginx rendered from docker/nginx.conf, all on loopback ports."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gru_serve.server import ready_target
from gru_serve.shipped import default_model_path

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
D2L = default_model_path()
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def binary(name: str, package: str) -> str:
    """A required binary; CI installs it (.ci/run), so a missing one fails rather than skips."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    exe = shutil.which(name, path=path)
    if exe is None:
        pytest.fail(
            f"{name} not found on PATH or in {', '.join(SBIN)}: the scale-out tests run a real "
            f"{name}; install it (apt-get install -y {package}, as .ci/run does)",
            pytrace=False,
        )
    return exe


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.02) -> float:
    """Poll a condition with a bound; the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(every)
    return time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(target: str, service: str = "") -> int | None:
    """The health status of a server (None: it did not answer)."""
    with grpc.insecure_channel(target) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError:
            return None
    return reply.status


class RedisServer:
    """redis-server on a fixed loopback port, stoppable and restartable on that port."""

    def __init__(self, tmp: Path) -> None:
        self.exe = binary("redis-server", "redis-server")
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def _pong(self) -> bool:
        with self.client() as c:
            try:
                return bool(c.ping())
            except redis.RedisError:
                return False

    def start(self) -> None:
        log = open(self.tmp / f"redis-{self.port}.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(lambda: self.proc.poll() is not None or self._pong(), 10, "redis-server answers PING")
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {(self.tmp / f'redis-{self.port}.log').read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Replica:
    """`gru-serve serve` as a user runs it, on a fixed port so nginx finds it after a restart."""

    def __init__(self, name: str, store_url: str, tmp: Path, *flags: str) -> None:
        self.name, self.store_url, self.tmp, self.flags = name, store_url, tmp, flags
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        log = open(self.tmp / f"{self.name}.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gru_serve.cli",
                "serve",
                "--port",
                str(self.port),
                "--model",
                str(D2L),
                "--session-store",
                self.store_url,
                *self.flags,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=ROOT,
        )
        log.close()
        line = self.proc.stdout.readline()
        if ready_target(line) is None:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"{self.name} did not start: {line!r}\n{self.log()}")

    def log(self) -> str:
        return (self.tmp / f"{self.name}.log").read_text()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=30)


def render_nginx_conf(template: str, upstreams: list[str], listen: str) -> str:
    """docker/nginx.conf with loopback addresses: the `server` lines of `upstream backends`
    point at the replicas (their parameters kept) and `listen` at a loopback port. Everything
    else (grpc_pass, http2, timeouts, retries) is the shipped configuration."""
    block = re.search(r"upstream backends \{(.*?)\}", template, re.S)
    if block is None:
        raise ValueError("docker/nginx.conf has no `upstream backends { ... }` block")
    servers = re.findall(r"^([ \t]*)server[ \t]+\S+(.*?);[ \t]*$", block.group(1), re.M)
    if len(servers) != len(upstreams):
        raise ValueError(f"docker/nginx.conf has {len(servers)} upstream servers, the test {len(upstreams)}")
    lines = iter(
        f"{indent}server {addr}{params};" for (indent, params), addr in zip(servers, upstreams, strict=True)
    )
    body = re.sub(r"^[ \t]*server[ \t]+\S+.*?;[ \t]*$", lambda m: next(lines), block.group(1), flags=re.M)
    text = template[: block.start(1)] + body + template[block.end(1) :]
    text, n = re.subn(r"^([ \t]*)listen[ \t]+\d+", rf"\g<1>listen {listen}", text, flags=re.M)
    if n != 1:
        raise ValueError("docker/nginx.conf should have exactly one `listen PORT` line")
    return text


class Nginx:
    def __init__(self, tmp: Path, upstreams: list[str]) -> None:
        self.exe = binary("nginx", "nginx")
        self.prefix = tmp / "nginx"
        (self.prefix / "logs").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(
            render_nginx_conf((DOCKER / "nginx.conf").read_text(), upstreams, f"127.0.0.1:{self.port}")
        )
        self.access_log = self.prefix / "access.log"
        self.error_log = self.prefix / "error.log"
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.access_log, "ab") as out, open(self.error_log, "ab") as err:
            self.proc = subprocess.Popen(
                [
                    self.exe,
                    "-p",
                    str(self.prefix),
                    "-c",
                    str(self.conf),
                    "-e",
                    "stderr",
                    "-g",
                    f"daemon off; pid {self.prefix / 'nginx.pid'};",
                ],
                stdout=out,
                stderr=err,
            )
        wait_for(
            lambda: self.proc.poll() is not None or health(self.target) == SERVING,
            15,
            "nginx passes gRPC health checks",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {self.error_log.read_text()}")

    def upstreams_used(self) -> list[str]:
        """Upstream addresses of the logged requests, in order."""
        return re.findall(r"upstream=(\S+)", self.access_log.read_text())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Topology:
    """docker/compose.yaml on loopback: Redis, two replicas, nginx."""

    def __init__(self, tmp: Path) -> None:
        self.redis = RedisServer(tmp)
        # Long streams for the kill scenario: a request may ask for many tokens.
        self.replicas = [
            Replica(f"gru-serve-{i}", self.redis.url, tmp, "--max-new-tokens", "1000000", "--grace-s", "2")
            for i in (1, 2)
        ]
        self.nginx = Nginx(tmp, [r.target for r in self.replicas])

    def start(self) -> None:
        self.redis.start()
        for r in self.replicas:
            r.start()
        self.nginx.start()

    def heal(self) -> None:
        """Whatever a test stopped or killed, running and SERVING again."""
        if not self.redis.alive():
            self.redis.start()
        for r in self.replicas:
            if not r.alive():
                r.start()
        for r in self.replicas:
            wait_for(lambda r=r: health(r.target) == SERVING, 10, f"{r.name} SERVING")

    def replica_of_pid(self, pid: int) -> Replica:
        for r in self.replicas:
            if r.alive() and r.pid == pid:
                return r
        raise AssertionError(f"pid {pid} is none of the replicas")

    def stop(self) -> None:
        self.nginx.stop()
        for r in self.replicas:
            if r.alive():
                r.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def topology(tmp_path_factory) -> Iterator[Topology]:
    topo = Topology(tmp_path_factory.mktemp("topology"))
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
