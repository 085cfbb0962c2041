"""The shipped byte-level BPE model over gRPC: its tokens are the plain exported graph's, a
session continues exactly, and the streamed texts are the tokenizer's own decoding."""

from collections.abc import Iterator

import pytest
import tokenizers

from gru_serve.client import Client, sampling
from gru_serve.engine.runtime import ModelRuntime
from gru_serve.ops.settings import Settings
from gru_serve.sampling import SamplingParams
from gru_serve.server import ThreadedServer
from gru_serve.shipped import shipped_models
from tests.support.own_tokenizers import reference_ids, stream

BPE = shipped_models()["timemachine-bpe"]
PROMPT = "The Time Traveller — café, 東京 and 😀 — said"


@pytest.fixture(scope="module")
def backend() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_str(ModelRuntime(BPE).metadata.tokenizer_json)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    srv = ThreadedServer(Settings(port=0, models=(str(BPE),)))
    with Client(srv.target) as c:
        yield c
    srv.stop()


def test_the_fast_path_serves_the_bpe_model():
    assert ModelRuntime(BPE).fast_path_note.startswith("on")


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_fifty_and_fifty_on_a_session_are_the_hundred_of_the_plain_graph(client, backend, temperature):
    params = SamplingParams(temperature=temperature, seed=5)
    msg = sampling(temperature, seed=5)
    want = reference_ids(BPE, backend, PROMPT, 100, params)
    one_call, texts, _ = stream(client, PROMPT, max_new_tokens=100, params=msg)
    assert one_call == want
    assert "".join(texts) == backend.decode(want, skip_special_tokens=False)
    s = client.create_session(PROMPT)
    first, _, _ = stream(client, "", session_id=s.session_id, max_new_tokens=50, params=msg)
    second, _, fin = stream(client, "", session_id=s.session_id, max_new_tokens=50, params=msg)
    assert first + second == want
    assert fin.tokens_seen == len(backend.encode(PROMPT, add_special_tokens=False).ids) + 100
