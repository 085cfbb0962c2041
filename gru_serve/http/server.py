"""The HTTP front end's server: uvicorn on the gRPC server's event loop, so both transports
share one engine and one sessions store in one process. uvicorn's h11 protocol gets the two
deadlines it lacks: for reading a request and for writing to a client that does not read."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gru_serve.http.app import build_app
from gru_serve.http.common import HttpFront, error_body
from gru_serve.ops import errors
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


class TimedH11Protocol(H11Protocol):
    """A connection with deadlines. Reading: a request's head must arrive within read_timeout_s
    of the connection (or of its first byte, on a kept-alive connection), then its body within
    read_timeout_s more, else 408 and close; so a slowloris connection cannot stay. Writing:
    the transport pauses writing while its buffer is past the high-water mark (the client's
    socket and ours are full), and a pause that lasts write_timeout_s drops the connection, so
    that a stream to a client that stopped reading ends (uvicorn then reports the disconnect to
    the app, which cancels the stream as if the client had closed it)."""

    read_timeout_s = 10.0  # set per server by protocol_class
    write_timeout_s = 30.0
    _read_timer: asyncio.TimerHandle | None = None
    _reading = ""  # what the read timer waits for: "connection" (a first byte), "head", "body", ""
    _write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read("connection")

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._reading != "head":
            if self._reading:
                self._reading = "head"  # a new connection's first bytes: its deadline stands
            else:
                self._arm_read("head")  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_request()  # a pipelined request may have begun

    def _follow_request(self) -> None:
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._reading != "body":
            self._arm_read("body")  # the head is in: the body gets its own deadline
        elif state is not h11.IDLE and state is not h11.SEND_BODY:
            self._disarm_read()  # read whole (or the connection is ending)

    def _arm_read(self, part: str) -> None:
        self._disarm_read()
        self._reading = part
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm_read(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer, self._reading = None, ""

    def _read_timed_out(self) -> None:
        part = self._reading
        self._read_timer, self._reading = None, ""
        if self.transport.is_closing():
            return
        log.debug("closing %s: request %s not read within %s s", self.client, part, self.read_timeout_s)
        # Nothing sent, nothing to answer (as nginx: a browser's unused preconnect); a request
        # begun gets 408, unless the app has already answered it.
        answered = part == "body" and self.cycle is not None and self.cycle.response_started
        if part != "connection" and not answered:
            self.transport.write(self._timeout_response(self.scope["path"] if part == "body" else ""))
        # The app, if it was reading the body, sees the disconnect; h11's state no longer matters.
        self.transport.close()

    def _timeout_response(self, path: str) -> bytes:
        # Written raw: before a complete head h11 has no request to answer.
        error = errors.RequestTimeout(
            f"the request was not received within http_read_timeout_s={self.read_timeout_s:g} "
            "(the head, then the body, each get that long)"
        )
        code, status, message = errors.public(error)
        body = json.dumps(error_body(path, code, status, message)).encode()
        head = (
            f"HTTP/1.1 {status} Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        return head.encode() + body

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        log.info(
            "dropping %s: it read nothing for %s s (http_write_timeout_s)", self.client, self.write_timeout_s
        )
        # abort, not close: close would wait for the full buffer to drain, which it never will.
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server stops: a request still arriving has done no work and will do none, so its
        connection closes now instead of holding the shutdown."""
        if self._reading and not self.transport.is_closing():
            self._disarm_read()
            self.transport.close()
            return
        super().shutdown()


def protocol_class(settings: Settings) -> type[TimedH11Protocol]:
    """TimedH11Protocol with this server's deadlines (uvicorn makes one per connection)."""
    deadlines = {
        "read_timeout_s": settings.http_read_timeout_s,
        "write_timeout_s": settings.http_write_timeout_s,
    }
    return type("TimedH11Protocol", (TimedH11Protocol,), deadlines)


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
            http=protocol_class(s),
            timeout_keep_alive=s.http_idle_timeout_s,  # type: ignore[arg-type]  # uvicorn takes a float
            # Over it a request gets 503 (its connection is accepted and answered, then closed).
            limit_concurrency=s.http_max_connections,
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
