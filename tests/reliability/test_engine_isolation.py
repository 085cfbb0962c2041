"""The engine process and the --frontends family keep secrets to themselves: the engine's
environment is an allow-list (TF32 off always), no child of a family has a token or key on its
command line, the engine is reachable over ipc:// only, and its socket folder goes even when
the server is killed with SIGKILL."""

from __future__ import annotations

import os
import re
import secrets
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from gru_serve.bench.topology import RedisServer
from gru_serve.client import Client
from gru_serve.ops.settings import Settings
from gru_serve.server import ThreadedServer
from gru_serve.shipped import default_model_path
from tests.support.reliability import record

# The brief's allow-list, written out here rather than read from the code under test.
ALLOWED = re.compile(r"PATH|HOME|LANG|TMPDIR|LD_LIBRARY_PATH|(LC_|PYTHON|OMP_|MKL_|CUDA_|NVIDIA_).*")
SETTINGS_VAR = "GRU_SERVE_ENGINE_SETTINGS"


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_the_engine_sees_only_allow_listed_variables_and_tf32_off(monkeypatch):
    secret = "s3cr3t-" + secrets.token_hex(8)
    monkeypatch.setenv("GRU_SERVE_SNAPSHOT_KEYS", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "1")  # the engine gets 0 whatever this says
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    srv = ThreadedServer(Settings(port=0, models=(str(default_model_path()),)))
    try:
        assert srv.server.settings.snapshot_keys == (secret,)  # the server itself has the key
        env = environ_of(srv.server.supervisor.proc.pid)
    finally:
        srv.stop()
    assert secret not in "\0".join(f"{k}={v}" for k, v in env.items())
    strays = sorted(k for k in env if k != SETTINGS_VAR and not ALLOWED.fullmatch(k))
    assert strays == []
    assert env["NVIDIA_TF32_OVERRIDE"] == "0" and env["OMP_NUM_THREADS"] == "1"
    assert env["PATH"] == os.environ["PATH"]
    record("engine environment", variables=len(env), strays=len(strays))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def test_a_family_passes_no_secret_on_a_command_line(server_process, redis_server):
    token, key = "tok-" + secrets.token_hex(16), "key-" + secrets.token_hex(16)
    family = server_process(
        "--frontends", "2", "--session-store", redis_server.url, "--auth-token", token, "--snapshot-key", key
    )
    children = psutil.Process(family.proc.pid).children(recursive=True)
    assert len(children) == 3  # two front ends and the engine
    for child in children:
        cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes().decode()
        assert token not in cmdline and key not in cmdline, cmdline.replace("\0", " ")
        # What the secrets travel in instead: readable by the user alone.
        assert stat.S_IMODE(os.stat(f"/proc/{child.pid}/environ").st_mode) & 0o077 == 0
    # The front ends got the token all the same: without it a call is refused, with it served.
    with Client(family.target) as client, pytest.raises(grpc.RpcError) as err:
        client.generate_text("time", max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(family.target, token=token) as client:
        _, finished = client.generate_text("time", max_new_tokens=2)
    assert finished.generated_tokens == 2
    record("family command lines", children=len(children), secrets_on_command_lines=0)


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:5555", "tcp://*:5555", "inproc://x", "ipc://"])
def test_the_engine_address_must_be_ipc(address):
    with pytest.raises(ValueError, match=r"--engine-address .*must be ipc://PATH"):
        Settings.load(engine_address=address)
    assert Settings.load(engine_address="ipc:///run/gru/engine.sock").engine_address


def test_the_engine_socket_folder_goes_after_a_sigkill_of_the_server(server_process):
    server = server_process()
    (engine,) = psutil.Process(server.proc.pid).children()
    address = next(a for a in engine.cmdline() if a.startswith("ipc://"))
    folder = Path(address.removeprefix("ipc://")).parent
    assert folder.is_dir() and (folder / "engine.sock").exists()
    start = time.monotonic()
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    engine.wait(timeout=30)  # the engine stops once its parent is gone
    deadline = time.monotonic() + 10
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a directory another process removes, with a bound
    assert not folder.exists(), f"{folder} outlived the server: {list(folder.iterdir())}"
    record("engine folder after SIGKILL", removed_within_s=round(time.monotonic() - start, 2))
