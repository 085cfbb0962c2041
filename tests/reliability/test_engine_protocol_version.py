"""The engine process refuses a front end of another protocol version (--engine-address lets one
attach to an engine started separately, from another install), over the raw protocol: a Hello
is written as msgpack by hand, in this version's layout with another version number and in the
first layout (no version), and the answer read as plain msgpack."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import msgspec
import pytest
import zmq

from gru_serve.engine import protocol as proto


@pytest.fixture
def engine_address(tmp_path):
    address = f"ipc://{tmp_path}/engine.sock"
    env = {**os.environ, "GRU_SERVE_ENGINE_SETTINGS": "{}"}
    engine = subprocess.Popen([sys.executable, "-m", "gru_serve.engine.process", address], env=env)
    yield address
    engine.terminate()
    assert engine.wait(timeout=30) == 0


def answer_to(address: str, hello: list) -> list:
    """The engine's first message after `hello` (msgpack, decoded without its types)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(msgspec.msgpack.encode(hello))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sock.poll(100):
                msg = msgspec.msgpack.decode(sock.recv())
                if msg[0] != "Stats":
                    return msg
        raise TimeoutError("the engine did not answer the Hello")
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize(
    ("hello", "theirs"),
    [(["Hello", 99, {}], 99), (["Hello", {}], 1)],
    ids=["another-version", "no-version"],
)
def test_a_hello_of_another_protocol_version_is_refused_naming_both(engine_address, hello, theirs):
    tag, ours, message = answer_to(engine_address, hello)
    assert tag == "Refused"
    assert isinstance(ours, int) and ours != theirs
    assert f"front end speaks version {theirs}" in message
    assert f"engine version {ours}" in message


def test_a_front_end_refused_by_the_engine_fails_its_start_naming_both_versions(tmp_path):
    """The front end's side: an engine (here a ROUTER answering as an engine of version 99 would)
    refuses its Hello, and EngineClient.start raises with that message instead of waiting."""
    from gru_serve.engine.client import EngineClient
    from gru_serve.ops.errors import ModelLoadError

    address = f"ipc://{tmp_path}/engine.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(address)

    def engine() -> None:
        front, payload = router.recv_multipart()
        version = msgspec.msgpack.decode(payload)[1]
        why = f"the front end speaks version {version}, the engine version 99"
        router.send_multipart([front, msgspec.msgpack.encode(["Refused", 99, why])])

    async def start() -> str:
        client = EngineClient(address)
        try:
            await client.start(60)
        except ModelLoadError as e:
            return str(e)
        finally:
            await client.close()
        return ""

    answering = threading.Thread(target=engine)
    answering.start()
    try:
        message = asyncio.run(start())
    finally:
        answering.join(timeout=60)
        ctx.destroy(linger=0)
    assert "refused this front end" in message and "engine version 99" in message
    assert f"front end speaks version {proto.PROTOCOL_VERSION}" in message
