"""The gRPC server: models, scheduler, session store and services, with health, reflection
and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gru_serve.core.metrics import bind as bind_metrics
from gru_serve.core.metrics import refresh_sessions
from gru_serve.core.models import engine_config
from gru_serve.core.service import GenerationService
from gru_serve.engine.api import EngineClient, ModelRuntime, load_runtime
from gru_serve.engine.supervisor import EngineSupervisor
from gru_serve.frontends import serve_family
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2, generation_pb2_grpc
from gru_serve.grpc.generated.inference import grpc_service_pb2, grpc_service_pb2_grpc
from gru_serve.grpc.generation import GenerationServicer
from gru_serve.grpc.inference import InferenceServicer
from gru_serve.grpc.interceptors import ServerInterceptor
from gru_serve.http.common import HttpFront
from gru_serve.http.server import HttpServer
from gru_serve.http.server import bind as bind_http
from gru_serve.launch import HTTP_READY_LINE, READY_LINE
from gru_serve.oip.dataplane import DataPlane
from gru_serve.ops.auth import load_tokens
from gru_serve.ops.errors import ModelLoadError
from gru_serve.ops.gate import Gate
from gru_serve.ops.metrics import Metrics
from gru_serve.ops.settings import Settings
from gru_serve.shipped import shipped_models
from gru_serve.stores.factory import build_store
from gru_serve.stores.sessions import SessionStore

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# The engine process loads every model before it says Ready (with CUDA: device set-up as well).
ENGINE_START_TIMEOUT_S = 300.0
LIVENESS = "liveness"  # a health service name that is SERVING while the process answers


def model_specs(specs: tuple[str, ...]) -> list[tuple[str, Path]]:
    """`--model` values (PATH or NAME=PATH) as (name or '', path); none means every shipped model."""
    if not specs:
        return list(shipped_models().items())
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        out.append((name, Path(path)) if sep else ("", Path(spec)))
    return out


def load_runtimes(settings: Settings) -> dict[str, ModelRuntime]:
    """The models served at start, loaded and warmed up before the server reports SERVING (the
    model repository loads later ones through the same load_runtime)."""
    runtimes: dict[str, ModelRuntime] = {}
    for name, path in model_specs(settings.models):
        rt = load_runtime(path, engine_config(settings), name, front_end=settings.engine == "process")
        if rt.name in runtimes:
            raise ModelLoadError(f"model name {rt.name!r} is given twice; use NAME=PATH to rename one")
        runtimes[rt.name] = rt
    return runtimes


def _read(path: str, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ModelLoadError(f"{name} {path}: {e.strerror}") from e


def listen(server: grpc.aio.Server, s: Settings) -> int:
    """Bind the port, with TLS when a certificate is given (mTLS with a client CA)."""
    address = f"{s.host}:{s.port}"
    if not s.tls_cert:  # Settings checked that cert, key and client CA come together
        port = server.add_insecure_port(address)
    else:
        ca = _read(s.tls_client_ca, "tls_client_ca") if s.tls_client_ca else None
        creds = grpc.ssl_server_credentials(
            [(_read(s.tls_key, "tls_key"), _read(s.tls_cert, "tls_cert"))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )
        port = server.add_secure_port(address, creds)
    if not port:
        raise OSError(f"cannot listen on {address}")
    return port


@dataclass
class GruServer:
    settings: Settings
    store: SessionStore | None = None
    clock: Callable[[], float] | None = None
    http_socket: socket.socket | None = None  # serve HTTP on this bound socket (tests)
    service: GenerationService = field(init=False)
    health: health.aio.HealthServicer = field(init=False)
    port: int = field(init=False, default=0)
    http_port: int = field(init=False, default=0)  # 0: HTTP is off
    metrics_port: int = field(init=False, default=0)

    async def start(self) -> int:
        s = self.settings
        runtimes = load_runtimes(s)
        store = self.store or build_store(s)
        kwargs = {"clock": self.clock} if self.clock else {}
        self.metrics = Metrics()
        self.supervisor: EngineSupervisor | None = None
        self._serving = {"store": True, "engine": True}
        self._store_health: tuple[str, ...] = ()  # named below, once the services are
        self._background: list[asyncio.Task] = []
        self._changes: set[asyncio.Task] = set()
        engine = None
        if s.engine == "process":
            address = s.engine_address
            if not address:
                self.supervisor = EngineSupervisor(engine_config(s))
                self.supervisor.start()
                address = self.supervisor.address
            engine = EngineClient(address, self._engine_changed)
        self.service = GenerationService(runtimes, store, s, metrics=self.metrics, engine=engine, **kwargs)
        bind_metrics(self.metrics, self.service)
        # Open Inference Protocol (KServe v2 / Triton) data plane, with the model repository: made
        # before the schedulers start, so that a bad --model-repository stops the start cleanly.
        self.dataplane = DataPlane(self.service)
        self.service.start()
        if engine is not None:
            try:
                await engine.start(ENGINE_START_TIMEOUT_S)
            except BaseException:
                await engine.close()
                if self.supervisor is not None:
                    await self.supervisor.stop()
                raise
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self.gate = Gate(load_tokens(s))  # auth, drain and calls in flight, for both transports
        interceptor = ServerInterceptor(self.metrics, self.gate)
        self._server = grpc.aio.server(options=options, interceptors=[interceptor])
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(self.service), self._server
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.dataplane), self._server
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = [
            generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
            grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, self._server)
        self.port = listen(self._server, s)
        self.http: HttpServer | None = None
        if s.http_port or self.http_socket is not None:
            front = HttpFront(self.service, self.dataplane, self.metrics, self.gate, s.max_body_bytes)
            self.http = HttpServer(front, s, self.http_socket)
        await self._server.start()
        if self.http is not None:
            self.http_port = await self.http.start()
        # "" and the service follow the session store (readiness); LIVENESS only says the
        # process answers, so an orchestrator does not restart replicas while Redis is down.
        self._store_health = ("", *names[:2])
        for name in (*self._store_health, LIVENESS):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.dataplane.ready = True  # ServerReady / ModelReady of the inference protocol
        if s.metrics_port:
            self.metrics_port = self.metrics.serve_http(s.host, s.metrics_port)
        self._background += [
            asyncio.create_task(refresh_sessions(self.metrics, self.service)),
            asyncio.create_task(self._watch_store()),
        ]
        providers = ", ".join(f"{n} on {self.service.provider(rt)}" for n, rt in runtimes.items())
        log.info(
            "listening on %s:%d (HTTP %s); models: %s", s.host, self.port, self.http_port or "off", providers
        )
        return self.port

    async def _watch_store(self, every_s: float = 1.0) -> None:
        """Health follows the session store: NOT_SERVING while it is unreachable, SERVING again
        when it is back (and the engine is up)."""
        while True:
            try:
                await asyncio.wait_for(self.service.store.ping(), timeout=2 * every_s)
                ok, why = True, ""
            except Exception as e:
                ok, why = False, str(e) or type(e).__name__
            if ok != self._serving["store"]:
                if ok:
                    log.info("session store reachable again")
                else:
                    log.warning("session store unreachable (%s); health NOT_SERVING", why)
                await self._set_serving("store", ok)
            await asyncio.sleep(every_s)

    def _engine_changed(self, up: bool) -> None:
        """The engine process went away (its requests failed) or a new one is ready."""
        task = asyncio.create_task(self._set_serving("engine", up))
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)

    async def _set_serving(self, part: str, ok: bool) -> None:
        self._serving[part] = ok
        state = health_pb2.HealthCheckResponse.SERVING
        if not all(self._serving.values()):
            state = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._store_health:
            await self.health.set(name, state)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING and refuse new calls (UNAVAILABLE, marked as safe to retry
        elsewhere) with the port still open, so probes and load balancers see the drain rather
        than a refused connection; let calls in flight finish within the grace period. Streams
        still running near its end fail with UNAVAILABLE (a status the client can act on)
        rather than being cut off; then the port closes."""
        grace = self.settings.grace_s if grace is None else grace
        self.dataplane.ready = False
        self.gate.draining = True
        await self.health.enter_graceful_shutdown()
        margin = min(0.5, grace / 2)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.gate.idle.wait(), timeout=grace - margin)
        if self.gate.in_flight:
            await asyncio.to_thread(self.service.stop)
        if self.http is not None:
            await self.http.stop()
        await self._server.stop(margin)
        for task in self._background:
            task.cancel()
        self.metrics.close()
        await asyncio.to_thread(self.service.stop)
        if self.service.engine is not None:
            await self.service.engine.close()
        if self.supervisor is not None:
            await self.supervisor.stop()
        await self.service.store.close()


async def serve(settings: Settings) -> int:
    # The scheduler thread gives up the GIL inside every session.run and must win it back from
    # the event loop; at Python's default 5 ms switch interval that wait was most of a prompt's
    # prefill under load. 0.5 ms: about 5-10% more tokens/s at 64 streams (gru-serve bench).
    sys.setswitchinterval(0.0005)
    if settings.frontends > 1:
        return await serve_family(settings, READY_LINE, HTTP_READY_LINE)
    server = GruServer(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(READY_LINE.format(name="gru-serve", host=settings.host, port=server.port), flush=True)
    if server.http_port:
        print(HTTP_READY_LINE.format(name="gru-serve", host=settings.host, port=server.http_port), flush=True)
    await stop.wait()
    log.info("shutting down (grace %.1f s)", settings.grace_s)
    await server.stop()
    log.info("stopped")
    return 0


class ThreadedServer:
    """A server on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(
        self,
        settings: Settings,
        store: SessionStore | None = None,
        clock: Callable[[], float] | None = None,
        http: bool = False,
    ) -> None:
        """http: serve the HTTP front end too, on an ephemeral port (http_target)."""
        sock = bind_http(settings.host, 0) if http else None
        self.server = GruServer(settings, store, clock, sock)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="gru-serve")
        self._thread.start()
        self._ready.wait()
        if self._error:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def http_target(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def service(self) -> GenerationService:
        return self.server.service

    def call(self, coro) -> object:
        """Run a coroutine on the server's loop (e.g. to read the session store)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self, grace: float = 1.0) -> None:
        if not self.loop.is_running():
            return
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
