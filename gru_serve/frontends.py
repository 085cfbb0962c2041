"""`--frontends N`: one engine process and N front-end processes on the same ports.

This process is the family's parent: it starts the engine (EngineSupervisor), reserves the
ports (a socket bound with SO_REUSEPORT and never listening, so `--port 0` names one port for
all), and starts N `gru-serve serve` processes with the same flags plus `--engine-address`, the
reserved ports and `--frontends 1`. Each front end binds the ports with SO_REUSEPORT (gRPC does
by default), so the kernel spreads connections over them; all talk to the one engine, and a
Redis session store lets any of them serve any session. A front end or engine that exits is
started again. On SIGTERM the front ends drain (each its own grace) and then the engine stops.

A front end gets its settings in its environment (GRU_SERVE_*), its command line only what
differs between front ends (gru_serve.launch says why).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from gru_serve.core.models import engine_config
from gru_serve.engine.supervisor import EngineSupervisor, exit_of
from gru_serve.http.server import bind
from gru_serve.launch import SERVE, Server, ServerDidNotStart, settings_env
from gru_serve.ops.settings import Settings

log = logging.getLogger(__name__)


PER_FRONT_END = frozenset({"frontends", "engine_address", "port", "http_port", "metrics_port"})


def frontend_argv(settings: Settings, i: int, address: str, port: int, http_port: int) -> list[str]:
    argv = [
        *SERVE,
        "--frontends",
        "1",
        "--engine-address",
        address,
        "--port",
        str(port),
        "--http-port",
        str(http_port),
    ]
    if settings.metrics_port:
        argv += ["--metrics-port", str(settings.metrics_port + i)]
    return argv


async def serve_family(settings: Settings, ready_line: str, http_ready_line: str) -> int:
    s = settings
    engine = EngineSupervisor(engine_config(s))
    engine.start()
    grpc_port = bind(s.host, s.port, shared=True, listen=False)
    http_port = bind(s.host, s.http_port, shared=True, listen=False) if s.http_port else None
    port = grpc_port.getsockname()[1]
    hport = http_port.getsockname()[1] if http_port is not None else 0
    env = settings_env(s, PER_FRONT_END)
    # Their stdout after the ready lines and their logs are the family's.
    fronts = [
        Server(
            frontend_argv(s, i, engine.address, port, hport),
            name="frontend",
            http=bool(hport),
            env=env,
            inherit_stderr=True,
            echo=True,
        )
        for i in range(s.frontends)
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.gather(*(_start(f) for f in fronts))
        print(ready_line.format(name="gru-serve", host=s.host, port=port), flush=True)
        if hport:
            print(http_ready_line.format(name="gru-serve", host=s.host, port=hport), flush=True)
        log.info("%d front ends on %s:%d, one engine at %s", len(fronts), s.host, port, engine.address)
        watchers = [asyncio.create_task(_keep(f, stop)) for f in fronts]
        await stop.wait()
        for f in fronts:
            if f.proc is not None and f.proc.poll() is None:
                f.proc.terminate()  # each drains within its grace
        await asyncio.gather(*watchers)
    finally:
        for f in fronts:
            if f.proc is not None and f.proc.poll() is None:
                f.proc.kill()
        await engine.stop()
        grpc_port.close()
        if http_port is not None:
            http_port.close()
    return 0


async def _start(front: Server) -> None:
    """Start a front end; returns once it is ready (however long its model takes to load)."""
    await asyncio.to_thread(front.start, None)


async def _keep(front: Server, stop: asyncio.Event) -> None:
    """Start a front end again when it exits, until the family stops."""
    while True:
        code = await exit_of(front.proc)
        if stop.is_set():
            return
        log.error("front end %d exited with %s; starting another", front.proc.pid, code)
        try:
            await _start(front)
        except ServerDidNotStart:
            if stop.is_set():
                return  # the family stopped it while it was starting (it waited for the engine)
            raise
