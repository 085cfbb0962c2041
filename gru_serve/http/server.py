"""The HTTP front end's server: uvicorn on the gRPC server's event loop, so both transports
share one engine and one sessions store in one process."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import uvicorn

from gru_serve.http.app import HttpFront, build_app
from gru_serve.ops.settings import Settings

log = logging.getLogger(__name__)


def bind(host: str, port: int, shared: bool = False, listen: bool = True) -> socket.socket:
    """shared: other processes may bind the port too (SO_REUSEPORT: the kernel spreads the
    connections over the listeners of a --frontends family)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when the listening
    # socket says TCP, and uvicorn writes headers and body apart, so without it Nagle and the
    # client's delayed ACK add ~40 ms to every response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for HTTP: {e.strerror}") from e
    if not listen:
        return sock
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class HttpServer:
    def __init__(self, front: HttpFront, settings: Settings, sock: socket.socket | None = None) -> None:
        s = settings
        self.sock = sock or bind(s.host, s.http_port, shared=bool(s.engine_address))
        config = uvicorn.Config(
            build_app(front),
            log_config=None,  # our JSON logs; the access log is written by the app
            access_log=False,
            lifespan="off",
            server_header=False,
            ssl_certfile=s.tls_cert or None,
            ssl_keyfile=s.tls_key or None,
            ssl_ca_certs=s.tls_client_ca or None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if s.tls_client_ca else ssl.CERT_NONE,
            timeout_graceful_shutdown=1.0,  # GruServer.stop has already waited out the grace period
        )
        config.load()
        self.server = uvicorn.Server(config)
        self.server.lifespan = config.lifespan_class(config)
        self._loop: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    async def start(self) -> int:
        # uvicorn's serve() would also take over the process's signals; the gRPC server owns them.
        await self.server.startup(sockets=[self.sock])
        self._loop = asyncio.create_task(self.server.main_loop())
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let responses in flight end (streams up to the grace period)."""
        self.server.should_exit = True
        if self._loop is not None:
            await self._loop
        await self.server.shutdown(sockets=[self.sock])
