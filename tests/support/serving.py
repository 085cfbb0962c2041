"""Servers in process, the model the tests serve, and the independent text reference."""

import functools
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gru_serve.engine.runtime import ModelRuntime
from gru_serve.ops.settings import Settings
from gru_serve.reference import step_generate
from gru_serve.sampling import SamplingParams
from gru_serve.server import ThreadedServer
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


def start_http_server(**settings) -> ThreadedServer:
    """A server with gRPC and HTTP, each on an ephemeral port (target, http_target)."""
    return ThreadedServer(
        Settings(port=0, models=(str(D2L),), **{"max_new_tokens": LONG, **settings}), http=True
    )


TOKEN = "x"  # the openai client always sends a bearer token; sessions belong to it, auth on or off


def openai_client(srv: ThreadedServer, token: str = TOKEN):
    """The unmodified openai client on a server's /v1 (no retries: a test sees every status)."""
    import openai

    return openai.OpenAI(base_url=srv.http_target + "/v1", api_key=token, max_retries=0)


@functools.cache
def plain_model(path: str) -> tuple[ort.InferenceSession, dict[str, str]]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session, session.get_modelmeta().custom_metadata_map


def reference_generate(
    rt_or_model_path: ModelRuntime | Path | str, prompt: str, n: int, params: SamplingParams | None = None
) -> str:
    """What the model file says the text is, without the server's graphs, vocabulary or loops:
    the exported graph as written (input_ids, state -> logits, state_out) in a bare onnxruntime
    CPU session, the prompt prefilled in one call, then one token per call at batch 1; text
    mapped with the vocabulary and normalisation read from the file's metadata. Only the
    sampling contract (gru_serve.sampling, tested on its own) is shared with the server. A
    ModelRuntime stands for its file: its derived graphs are what the tests check."""
    path = str(getattr(rt_or_model_path, "path", rt_or_model_path))
    session, meta = plain_model(path)
    vocab = json.loads(meta["gru_serve.vocab"])
    norm = json.loads(meta["gru_serve.normalization"])
    text = re.sub(norm["pattern"], norm["replacement"], prompt.lower() if norm["lowercase"] else prompt)
    index = {t: i for i, t in enumerate(vocab)}
    ids = [index.get(c, index.get("<unk>", 0)) for c in text]
    state = np.zeros((1, int(meta["gru_serve.num_layers"]), int(meta["gru_serve.hidden_size"])), np.float32)

    def step(ids: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, state = session.run(["logits", "state_out"], {"input_ids": ids, "state": state})
        return logits, state

    tokens, _, _ = step_generate(step, ids, state, params or SamplingParams(), n)
    return "".join(vocab[t] for t in tokens)
