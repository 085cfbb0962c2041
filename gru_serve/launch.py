"""Starting a server as a child process: the `gru-serve serve` command line and environment,
waiting for its ready lines, stopping it with SIGTERM and a deadline. `--frontends`, the bench
and the tests start their servers here.

A child gets settings it must not show in its environment (GRU_SERVE_*), never on its command
line: anyone on the host can read a process's command line (/proc/PID/cmdline), only its user
its environment, so tokens, snapshot keys and a Redis URL's password never show there.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gru_serve.ops.settings import Settings, env_var

# A server's first line on stdout once it serves (gru-serve's, and the benchmark's baseline's).
READY_LINE = "{name} listening on {host}:{port}"
# The next line, when the HTTP front end is on.
HTTP_READY_LINE = "{name} http listening on {host}:{port}"
SERVE = (sys.executable, "-m", "gru_serve.cli", "serve")


def _target(template: str, line: str) -> str | None:
    m = re.fullmatch(template.format(name=r"\S+", host=r"(\S+)", port=r"(\d+)") + r"\s*", line)
    if m is None:
        return None
    host = "127.0.0.1" if m.group(1) in ("0.0.0.0", "[::]") else m.group(1)
    return f"{host}:{m.group(2)}"


def ready_target(line: str) -> str | None:
    """The address in a READY_LINE, as a client on this machine reaches it; None otherwise."""
    return _target(READY_LINE, line)


def serve_argv(model: Path | None = None, *flags: str) -> list[str]:
    """`gru-serve serve` on a free gRPC port, HTTP off, logging warnings only, then `flags`
    (a flag given again there wins)."""
    argv = [*SERVE, "--port", "0", "--http-port", "0"]
    argv += ["--model", str(model)] if model is not None else []
    return [*argv, "--log-level", "WARNING", *flags]


def settings_env(settings: Settings, leave_out: frozenset[str] = frozenset()) -> dict[str, str]:
    """This process's environment with every setting's value as `settings` has it (flags,
    variables and defaults resolved), overriding any variable there."""
    values = {
        env_var(name): ",".join(value) if isinstance(value, tuple) else str(value)
        for name, value in settings.model_dump().items()
        if name not in leave_out
    }
    return {**os.environ, **values}


def free_port() -> int:
    """A loopback port free now, for a server that must be told its port (a metrics port, an
    upstream Envoy finds again after a restart); a port 0 flag is better where it will do."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerDidNotStart(RuntimeError):
    pass


class Server:
    """One server process: started, its ready lines read (with a deadline), stopped.

    Its stderr goes to `log` (appended), to a temporary file removed at close when `log` is
    None, or to this process's stderr with `inherit_stderr`. Its stdout after the ready lines
    is passed on to this process's with `echo`, else read and dropped (a full pipe would
    block it)."""

    def __init__(
        self,
        argv: list[str],
        *,
        name: str = "gru-serve",
        http: bool = False,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        log: Path | None = None,
        inherit_stderr: bool = False,
        echo: bool = False,
    ) -> None:
        self.argv, self.name, self.http, self.env, self.cwd = argv, name, http, env, cwd
        self.inherit_stderr, self.echo = inherit_stderr, echo
        self.temp_log = log is None and not inherit_stderr
        if self.temp_log:
            fd, path = tempfile.mkstemp(prefix=f"gru-{name}-", suffix=".log")
            os.close(fd)
            log = Path(path)
        self.log_path = log
        self.proc: subprocess.Popen | None = None
        self.target = self.http_target = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float | None = 120.0) -> Server:
        """Start it; returns once it has printed its ready lines."""
        env = {**(self.env if self.env is not None else os.environ), "PYTHONUNBUFFERED": "1"}
        with contextlib.ExitStack() as stack:
            err = None if self.inherit_stderr else stack.enter_context(open(self.log_path, "ab"))
            self.proc = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=self.cwd
            )
        lines = self._ready_lines(2 if self.http else 1, timeout_s)
        target = ready_target(lines[0]) if lines else None
        http = _target(HTTP_READY_LINE, lines[1]) if self.http and len(lines) > 1 else ""
        if target is None or http is None:
            self.kill()
            what = f"{self.name} server did not start ({' '.join(self.argv)}): {lines!r}"
            raise ServerDidNotStart(f"{what}\n{self.log_text()[-2000:]}")
        self.target, self.http_target = target, http or ""
        return self

    def _ready_lines(self, n: int, timeout_s: float | None) -> list[str]:
        """Its first n stdout lines (fewer: it exited or ran out of time), read on a thread that
        then drains or echoes the rest, so a readline never outlives the deadline."""
        got: queue.Queue[str | None] = queue.Queue()
        proc = self.proc
        assert proc is not None and proc.stdout is not None

        def read() -> None:
            for i, line in enumerate(proc.stdout):
                if i < n:
                    got.put(line.rstrip("\n"))
                elif self.echo:
                    sys.stdout.write(line)
            got.put(None)

        threading.Thread(target=read, daemon=True, name=f"{self.name}-{proc.pid}-out").start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        lines: list[str] = []
        while len(lines) < n:
            try:
                line = got.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            lines.append(line)
        return lines

    def log_text(self) -> str:
        if self.inherit_stderr or self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, deadline_s: float = 30.0) -> int:
        """SIGTERM (it drains), SIGKILL past the deadline; its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(deadline_s)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()

    def close(self) -> None:
        """Stopped if still running, its temporary log removed."""
        if self.alive():
            self.stop(10)
        if self.temp_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
