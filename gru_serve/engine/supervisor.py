"""Starts the engine process and starts it again whenever it exits while the server runs.

The engine listens on a Unix socket in a private temporary folder (ZeroMQ's ipc transport),
the same path across restarts, so front ends reconnect by themselves. It gets only its
EngineConfig (the settings it uses: no tokens, keys or certificates), as JSON in its
environment, and of this process's environment only the allow-listed variables (engine_env):
a GRU_SERVE_* token or key, or any other secret the server was given, never reaches it. If
this process is killed (SIGKILL) the engine removes the folder as it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import msgspec

from gru_serve.engine.config import EngineConfig
from gru_serve.engine.cuda import TF32_ENV
from gru_serve.engine.process import SETTINGS_ENV

log = logging.getLogger(__name__)

RESTART_DELAY_S = 0.2  # between an exit and the next start: a crash loop does not spin
# What the engine may see of this process's environment: what Python, onnxruntime, CUDA and the
# locale read. Everything else (GRU_SERVE_* tokens and keys, cloud credentials) stays here.
ENGINE_ENV_NAMES = frozenset({"PATH", "HOME", "LANG", "TMPDIR", "LD_LIBRARY_PATH"})
ENGINE_ENV_PREFIXES = ("LC_", "PYTHON", "OMP_", "MKL_", "CUDA_", "NVIDIA_")


def engine_env(config: EngineConfig, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The engine process's whole environment: the allow-list of `environ` (default: this
    process's), TF32 off whatever this process has (cuDNN's GRU kernels in full float32: the
    fast path's load-time check and the served tokens rely on it), and the engine's config."""
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if k in ENGINE_ENV_NAMES or k.startswith(ENGINE_ENV_PREFIXES)}
    env.update(TF32_ENV)
    env[SETTINGS_ENV] = msgspec.json.encode(config).decode()
    return env


class EngineSupervisor:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.folder = tempfile.mkdtemp(prefix="gru-serve-engine-")
        self.address = f"ipc://{self.folder}/engine.sock"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._stopping = False
        self._task: asyncio.Task | None = None

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gru_serve.engine.process", self.address, self.folder],
            env=engine_env(self.config),
            stdout=subprocess.DEVNULL,
        )
        self.starts += 1
        log.info("engine process %d started (%s)", self.proc.pid, self.address)

    def start(self) -> None:
        self._spawn()
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            proc = self.proc
            code = await exit_of(proc)
            if self._stopping:
                return
            log.error("engine process %d exited with %s; starting another", proc.pid, code)
            await asyncio.sleep(RESTART_DELAY_S)
            if self._stopping:
                return
            self._spawn()

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.wait_for(exit_of(proc), timeout)
            except TimeoutError:
                proc.kill()
                await exit_of(proc)
        if self._task is not None:
            await self._task
        shutil.rmtree(self.folder, ignore_errors=True)


def exit_of(proc: subprocess.Popen) -> asyncio.Future[int]:
    """The process's exit code, awaited on a daemon thread: a server left running when the
    interpreter exits must not keep it waiting for an engine that waits for it to go."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()

    def wait() -> None:
        code = proc.wait()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(code))

    threading.Thread(target=wait, daemon=True, name=f"engine-{proc.pid}-exit").start()
    return fut
