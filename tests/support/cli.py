"""`gru-serve` as a user runs it: the server process and the CLI client."""

import subprocess
import sys

from gru_serve.launch import ready_target
from tests.support.serving import D2L

EXE = [sys.executable, "-m", "gru_serve.cli"]


def start(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [*EXE, "serve", "--port", "0", "--model", str(D2L), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    target = ready_target(line)
    if target is None:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r} {proc.stderr.read()}")
    return proc, target


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=60)
