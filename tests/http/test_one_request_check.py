"""n and max_tokens are checked once, in the core, so every transport refuses the same values with
the same message: OpenAI's /v1/completions, native gRPC Generate and the inference protocol's
generate, on one real server (gRPC and HTTP on 127.0.0.1)."""

from collections.abc import Iterator

import grpc
import httpx
import pytest

from gru_serve.client import Client
from gru_serve.server import ThreadedServer
from tests.support.serving import LONG, TOKEN, start_http_server

MODEL = "timemachine-d2l"
CHOICES = 16  # the documented fan-out limit (README: n up to 16)


@pytest.fixture(scope="module")
def srv() -> Iterator[ThreadedServer]:
    s = start_http_server()
    yield s
    s.stop()


@pytest.fixture
def http(srv: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.http_target, headers={"authorization": f"Bearer {TOKEN}"}) as c:
        yield c


def openai_error(http: httpx.Client, **body: object) -> str:
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "the time", **body})
    assert r.status_code == 400, r.text
    return r.json()["error"]["message"]


def grpc_error(srv: ThreadedServer, **kwargs: object) -> str:
    with Client(srv.target, token=TOKEN) as c, pytest.raises(grpc.RpcError) as e:
        list(c.generate("the time", **kwargs))  # type: ignore[arg-type]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return e.value.details()


def oip_error(http: httpx.Client, **body: object) -> str:
    r = http.post(f"/v2/models/{MODEL}-generate/generate", json={"prompt": "the time", **body})
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_n_has_one_range_and_one_message(srv, http):
    want = f"n must be in [1, {CHOICES}], got {CHOICES + 1}"
    assert openai_error(http, n=CHOICES + 1) == want
    assert grpc_error(srv, n=CHOICES + 1) == want
    assert openai_error(http, n=0) == f"n must be in [1, {CHOICES}], got 0"


def test_grpc_n_unset_is_one_choice(srv):
    """proto3's 0 is 'unset': one choice, with commit 0 on a session as before."""
    with Client(srv.target, token=TOKEN) as c:
        sid = c.create_session("the time ").session_id
        msgs = list(c.generate("traveller", session_id=sid, max_new_tokens=4, n=0, commit=0))
    finals = [m for m in msgs if m.HasField("finished")]
    assert len(finals) == 1 and finals[0].finished.generated_tokens == 4


def test_max_tokens_has_one_message(srv, http):
    over = LONG + 1
    want = f"must be in [0, {LONG}] (--max-new-tokens), got {over}"
    messages = {
        "openai": openai_error(http, max_tokens=over),
        "grpc": grpc_error(srv, max_new_tokens=over),
        "oip": oip_error(http, max_new_tokens=over),
    }
    assert len(set(messages.values())) == 1, messages
    (message,) = set(messages.values())
    # It names the field as each transport spells it, and the setting that limits it.
    assert message.endswith(want) and "max_new_tokens" in message and "max_tokens must be in" in message
