import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from gru_serve.client import Client
from gru_serve.runtime import ModelRuntime
from gru_serve.sampling import SamplingParams, sample, uniforms
from gru_serve.server import ThreadedServer
from gru_serve.settings import Settings
from gru_serve.shipped import default_model_path

D2L = default_model_path()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition the server reaches asynchronously (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.002)


# Tokens for a stream that outlasts any test: once its reader stops, gRPC's flow control holds
# it open, so "a stream is running" does not depend on how fast the server generates.
LONG = 1_000_000


def start_server(**settings) -> ThreadedServer:
    return ThreadedServer(Settings(port=0, models=(str(D2L),), **{"max_new_tokens": LONG, **settings}))


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    srv = start_server()
    yield srv
    srv.stop()


@pytest.fixture
def client(server) -> Iterator[Client]:
    with Client(server.target) as c:
        yield c


@pytest.fixture(scope="session")
def runtime() -> ModelRuntime:
    return ModelRuntime(D2L)


def reference_generate(rt: ModelRuntime, prompt: str, n: int, params: SamplingParams | None = None) -> str:
    """The in-process onnxruntime loop, one step per token at batch 1."""
    params = params or SamplingParams()
    ids = rt.vocab.encode(prompt)
    logits, state = rt.step(np.array([ids], np.int64), rt.zero_state())
    out = []
    for i in range(n):
        u = uniforms(np.array([params.seed], np.uint64), np.array([len(ids) + i], np.uint64))
        tok = sample(
            logits[:, -1],
            np.array([params.temperature]),
            np.array([params.top_k]),
            np.array([params.top_p]),
            u,
        )
        out.append(int(tok[0]))
        logits, state = rt.step(tok[:, None].astype(np.int64), state)
    return rt.vocab.decode(out)
