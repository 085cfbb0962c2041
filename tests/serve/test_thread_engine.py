"""With the engine in the front end's process (--engine thread), model runs (Score, the
inference protocol's ModelInfer) end as they do with the engine process: their log-probabilities
are the plain exported graph's, and a cancelled run leaves the scheduler serving."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gru_serve.client import Client
from tests.support.serving import D2L, plain_model, reference_generate, start_server

TEXT = "the time traveller"


@pytest.fixture(scope="module")
def server():
    srv = start_server(engine="thread")
    yield srv
    srv.stop()


def plain_logprobs(text: str) -> np.ndarray:
    """log p(token i+1 | tokens ..i) from the exported graph in a bare session, one call."""
    session, meta = plain_model(str(D2L))
    index = {t: i for i, t in enumerate(json.loads(meta["gru_serve.vocab"]))}
    ids = np.array([[index[c] for c in text]], np.int64)
    state = np.zeros((1, int(meta["gru_serve.num_layers"]), int(meta["gru_serve.hidden_size"])), np.float32)
    logits = session.run(["logits"], {"input_ids": ids, "state": state})[0][0].astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return logp[np.arange(len(text) - 1), ids[0, 1:]]


def test_score_in_thread_mode_equals_the_plain_graph_and_the_scheduler_serves_on(server):
    with Client(server.target) as c:
        for _ in range(3):  # each run ends (its job is let go) and the next is served
            got = np.array([t.logprob for t in c.score(TEXT).tokens])
            np.testing.assert_allclose(got, plain_logprobs(TEXT), rtol=0, atol=1e-5)
        assert c.generate_text("time", max_new_tokens=20)[0] == reference_generate(D2L, "time", 20)
