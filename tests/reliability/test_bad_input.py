"""Bad input: property-based tests over every field of every native RPC. Each request gets its
documented status code (an oracle computes it independently of the server), and the server
stays up and correct."""

import math
import re

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gru_serve.client import Client
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.ops.settings import Settings
from gru_serve.server import ThreadedServer
from gru_serve.shipped import default_model_path
from tests.support.bad_input import RUN, code_of
from tests.support.reliability import TALLY, record
from tests.support.serving import reference_generate

MODEL = "timemachine-d2l"
LIMITS = {"max_prompt_chars": 512, "max_new_tokens": 64, "default_new_tokens": 4}
OK, INVALID, NOT_FOUND, PRECONDITION = "OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"


texts = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=500, max_size=700),
    st.sampled_from(["", " ", "\x00", "\n\t\r", "time traveller", "Ωμέγα 時間", "\u202e\ufeff", "a" * 512]),
)
floats = st.one_of(st.none(), st.floats(width=32), st.sampled_from([0.0, -0.0, 1.0, 100.0, 1e-45, -1.0]))
models = st.one_of(st.sampled_from(["", MODEL, "nope", MODEL.upper()]), texts)


@pytest.fixture(scope="module")
def server():
    srv = ThreadedServer(Settings(port=0, models=(str(default_model_path()),), **LIMITS))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def live(client):
    """Sessions that exist, with text (so they have pending logits)."""
    return {client.create_session("the time traveller").session_id for _ in range(4)}


def normalized(text: str) -> str:
    """The model's documented rule (its metadata): lower-case, runs of non-letters -> one space."""
    return re.sub("[^a-z]+", " ", text.lower())


def f32(x):
    return None if x is None else float(np.float32(x))


@st.composite
def sampling(draw):
    msg = pb.SamplingParams(
        stop=draw(st.one_of(st.lists(texts, max_size=3), st.lists(st.just("x"), min_size=17, max_size=18)))
    )
    for name, strategy in (
        ("temperature", floats),
        ("top_p", floats),
        ("top_k", st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1))),
        ("seed", st.one_of(st.none(), st.integers(0, 2**64 - 1))),
    ):
        value = draw(strategy)
        if value is not None:
            setattr(msg, name, value)
    return msg


def sampling_error(msg: pb.SamplingParams) -> str | None:
    t = f32(msg.temperature) if msg.HasField("temperature") else 0.0
    if not (math.isfinite(t) and 0 <= t <= 100):
        return INVALID
    if msg.HasField("top_k") and not 0 <= msg.top_k <= 2**20:
        return INVALID
    p = f32(msg.top_p) if msg.HasField("top_p") else 1.0
    if not (math.isfinite(p) and 0 < p <= 1):
        return INVALID
    if len(msg.stop) > 16 or any(not 0 < len(s) <= 64 for s in msg.stop):
        return INVALID
    return None


def session_error(session_id: str, live: set[str]) -> str | None:
    return None if session_id in live else NOT_FOUND


session_ids = lambda live: st.one_of(st.sampled_from(sorted(live)), texts, st.just(""))  # noqa: E731


@given(data=st.data())
@settings(RUN, max_examples=3500)
def test_generate(client, live, data):
    req = pb.GenerateRequest(
        session_id=data.draw(session_ids(live)),
        prompt=data.draw(texts),
        sampling=data.draw(sampling()),
        return_logprobs=data.draw(st.booleans()),
        model=data.draw(models),
    )
    max_new = data.draw(st.one_of(st.none(), st.integers(0, 80), st.integers(0, 2**32 - 1)))
    if max_new is not None:
        req.max_new_tokens = max_new
    n = LIMITS["default_new_tokens"] if max_new is None else max_new
    in_session = req.session_id in live
    want = (
        sampling_error(req.sampling)
        or (INVALID if n > LIMITS["max_new_tokens"] else None)
        or (session_error(req.session_id, live) if req.session_id else None)
        or (PRECONDITION if in_session and req.model not in ("", MODEL) else None)
        or (INVALID if not req.session_id and req.model not in ("", MODEL) else None)
        or (INVALID if len(req.prompt) > LIMITS["max_prompt_chars"] else None)
        or (INVALID if not req.prompt and not in_session and n > 0 else None)
        or OK
    )
    got = code_of(lambda: list(client.stub.Generate(req, timeout=30)))
    TALLY["bad inputs tried"] += 1
    assert got == want, req


@given(data=st.data())
@settings(RUN, max_examples=1500)
def test_score(client, live, data):
    req = pb.ScoreRequest(
        session_id=data.draw(session_ids(live)),
        text=data.draw(texts),
        commit=data.draw(st.booleans()),
        model=data.draw(models),
    )
    in_session = req.session_id in live
    want = (
        (session_error(req.session_id, live) if req.session_id else None)
        or (PRECONDITION if in_session and req.model not in ("", MODEL) else None)
        or (INVALID if not req.session_id and req.commit else None)
        or (INVALID if not req.session_id and req.model not in ("", MODEL) else None)
        or (INVALID if len(req.text) > LIMITS["max_prompt_chars"] else None)
        or (INVALID if len(normalized(req.text)) < (1 if in_session else 2) else None)
        or OK
    )
    got = code_of(lambda: client.stub.Score(req, timeout=30))
    TALLY["bad inputs tried"] += 1
    assert got == want, req


@given(text=texts, model=models)
@settings(RUN, max_examples=1500)
def test_create_session(client, text, model):
    want = INVALID if model not in ("", MODEL) or len(text) > LIMITS["max_prompt_chars"] else OK
    got = code_of(
        lambda: client.stub.CreateSession(pb.CreateSessionRequest(text=text, model=model), timeout=30)
    )
    TALLY["bad inputs tried"] += 1
    assert got == want


@given(data=st.data(), rpc=st.sampled_from(["GetSession", "ForkSession", "DeleteSession"]))
@settings(RUN, max_examples=1500)
def test_session_rpcs(client, live, data, rpc):
    session_id = data.draw(session_ids(live))
    if rpc == "DeleteSession" and session_id in live:
        session_id = client.create_session("a session to delete").session_id  # the pool stays intact
        want = OK
    else:
        want = session_error(session_id, live) or OK
    request = {
        "GetSession": pb.GetSessionRequest,
        "ForkSession": pb.ForkSessionRequest,
        "DeleteSession": pb.DeleteSessionRequest,
    }[rpc](session_id=session_id)
    got = code_of(lambda: getattr(client.stub, rpc)(request, timeout=30))
    TALLY["bad inputs tried"] += 1
    assert got == want


@given(model=models)
@settings(RUN, max_examples=500)
def test_model_info(client, model):
    want = OK if model in ("", MODEL) else INVALID
    got = code_of(lambda: client.stub.ModelInfo(pb.ModelInfoRequest(model=model), timeout=30))
    TALLY["bad inputs tried"] += 1
    assert got == want


@given(data=st.data())
@settings(RUN, max_examples=1500)
def test_converse_first_turn(client, live, data):
    msg = pb.ConverseRequest(
        session_id=data.draw(session_ids(live)),
        model=data.draw(models),
        text=data.draw(texts),
        sampling=data.draw(sampling()),
    )
    max_new = data.draw(st.one_of(st.none(), st.integers(0, 80)))
    if max_new is not None:
        msg.max_new_tokens = max_new
    n = max_new or 0
    in_session = msg.session_id in live
    want = (
        (session_error(msg.session_id, live) if msg.session_id else None)
        or (INVALID if not msg.session_id and msg.model not in ("", MODEL) else None)
        or sampling_error(msg.sampling)
        or (INVALID if n > LIMITS["max_new_tokens"] else None)
        or (INVALID if len(msg.text) > LIMITS["max_prompt_chars"] else None)
        or (INVALID if not msg.text and not in_session and n > 0 else None)
        or OK
    )
    got = code_of(lambda: list(client.stub.Converse(iter([msg]), timeout=30)))
    TALLY["bad inputs tried"] += 1
    assert got == want, msg


@pytest.mark.parametrize("size", [20_000, 1_000_000])
def test_huge_metadata_is_resource_exhausted(server, size):
    with Client(server.target, metadata=(("x-junk", "a" * size),)) as c, pytest.raises(grpc.RpcError) as err:
        c.model_info()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    TALLY["bad inputs tried"] += 1


def test_zz_server_is_up_and_correct_after_the_run(server, client, runtime):
    """The canary: runs after the properties above (file order)."""
    text, _ = client.generate_text("time traveller", max_new_tokens=60)
    assert text == reference_generate(runtime, "time traveller", 60)
    record("bad input (native API)", examples=TALLY["bad inputs tried"], canary="equal to its reference")
