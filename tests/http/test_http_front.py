"""What every HTTP request goes through, checked on /v1 over real HTTP on 127.0.0.1: body
parsing and its errors, the body limit, a client that goes away mid-stream, authentication and
session ownership shared with gRPC, request ids, TLS and metrics; and a property test over
/v1/completions bodies."""

import json
import math
import re
import ssl
from collections.abc import Iterator

import grpc
import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gru_serve.client import Client, sampling
from gru_serve.sampling import SamplingParams
from gru_serve.server import ThreadedServer
from tests.support.certs import make_certs
from tests.support.serving import D2L, LONG, openai_client, reference_generate, start_http_server, wait_until

PROMPT = "the time traveller"
ERROR_STATUSES = {400, 404, 409, 413, 429}  # what a /v1/completions body can get (no auth here)


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_target) as h:
        yield h


def error_of(r: httpx.Response, status: int) -> dict:
    """The OpenAI-shaped error of a reply with this status."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"} and err["message"]
    return err


# -- body parsing --


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{", "the request body is not valid JSON: Expecting property name"),
        (b'{"prompt": "x",}', "the request body is not valid JSON"),
        (b"\xff\xfe", "the request body is not valid JSON"),
        (b"", "the request body is not valid JSON"),
        (b"[1, 2]", "the request body must be a JSON object, got list"),
        (b'"x"', "the request body must be a JSON object, got str"),
    ],
)
def test_malformed_json_is_400_naming_the_problem(http, content, why):
    err = error_of(http.post("/v1/completions", content=content), 400)
    assert why in err["message"] and err["code"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"max_tokens": "5"}, "max_tokens: Input should be a valid integer"),
        ({"max_tokens": 5.0}, "max_tokens: Input should be a valid integer"),
        ({"temperature": "hot"}, "temperature: Input should be a valid number"),
        ({"stream": 1}, "stream: Input should be a valid boolean"),
        ({"n": True}, "n: Input should be a valid integer"),
        ({"prompt": 5}, "prompt: must be a string or a list holding exactly one string"),
        ({"stop": [1]}, "stop: must be a string or a list of strings"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage:"),
        ({"logit_bias": {"1": "x"}}, "logit_bias.1: Input should be a valid number"),
        ({"session_id": 3}, "session_id: Input should be a valid string"),
    ],
)
def test_wrong_types_are_400_naming_the_field(http, body, why):
    err = error_of(http.post("/v1/completions", json={"prompt": PROMPT, **body}), 400)
    assert err["message"].startswith(why)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"prompt": PROMPT, "foo": 1}, "foo: Extra inputs are not permitted"),
        ({"prompt": PROMPT, "stream": True, "stream_options": {"bar": 1}}, "stream_options.bar: Extra"),
        ({"prompt": PROMPT, "\ud800": 1}, "Input should be a valid string"),  # a lone surrogate key
    ],
)
def test_an_unknown_field_is_400_naming_it(http, body, why):
    err = error_of(http.post("/v1/completions", content=json.dumps(body)), 400)
    assert why in err["message"]


def test_a_body_over_max_body_bytes_is_413_declared_or_not():
    srv = start_http_server(max_body_bytes=1024)
    try:
        with httpx.Client(base_url=srv.http_target) as h:
            big = json.dumps({"prompt": "a" * 2000}).encode()
            err = error_of(h.post("/v1/completions", content=big), 413)
            assert "over max_body_bytes=1024" in err["message"]

            def chunked() -> Iterator[bytes]:  # no content-length: counted as it arrives
                yield big[:600]
                yield big[600:]

            err = error_of(h.post("/v1/completions", content=chunked()), 413)
            assert "over max_body_bytes=1024" in err["message"]
            ok = h.post("/v1/completions", json={"prompt": "a" * 900, "max_tokens": 3, "temperature": 0})
            assert ok.status_code == 200
            assert ok.json()["choices"][0]["text"] == reference_generate(D2L, "a" * 900, 3)
    finally:
        srv.stop()


# -- a client that goes away --


def test_closing_the_stream_cancels_it_and_leaves_the_session_unchanged(server, http):
    with Client(server.target) as rpc:
        sid = rpc.create_session(PROMPT).session_id
        control = rpc.fork_session(sid).session_id
        before = rpc.get_session(sid)
        body = {"prompt": " and", "max_tokens": LONG, "temperature": 0, "stream": True, "session_id": sid}
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")  # generating: the session is leased
            assert server.service.active_streams >= 1
        # The response is closed: the server sees the disconnect and cancels the job.
        wait_until(lambda: server.service.active_streams == 0)
        assert_not_busy(server, sid)
        after = rpc.get_session(sid)
        assert (after.tokens_seen, after.turns) == (before.tokens_seen, before.turns)
        text = rpc.generate_text(" and", session_id=sid, max_new_tokens=40)[0]
        assert text == rpc.generate_text(" and", session_id=control, max_new_tokens=40)[0]
        assert text == reference_generate(D2L, PROMPT + " and", 40)


def test_closing_a_fan_out_stream_leaves_the_session_unchanged(server, http):
    with Client(server.target) as rpc:
        sid = rpc.create_session(PROMPT).session_id
        before = rpc.get_session(sid)
        body = {"prompt": "", "max_tokens": LONG, "n": 3, "stream": True, "session_id": sid}
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
        wait_until(lambda: server.service.active_streams == 0)
        assert_not_busy(server, sid)
        assert rpc.get_session(sid).tokens_seen == before.tokens_seen


def assert_not_busy(server: ThreadedServer, sid: str) -> None:
    """The session can be leased: no request holds it (SessionBusy otherwise)."""
    store = server.service.store
    server.call(store.acquire(sid))
    server.call(store.release(sid))


# -- authentication and ownership, shared with gRPC --


@pytest.fixture(scope="module")
def auth_server() -> Iterator[ThreadedServer]:
    srv = start_http_server(auth_tokens=("alice", "bob"))
    yield srv
    srv.stop()


def as_(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.mark.parametrize("path", ["/v1/models", "/v1/completions", "/v1/sessions"])
def test_no_token_or_a_wrong_one_is_401(auth_server, path):
    with httpx.Client(base_url=auth_server.http_target) as h:
        method = "GET" if path == "/v1/models" else "POST"
        r = h.request(method, path, json={})
        err = error_of(r, 401)
        assert err["code"] == "UNAUTHENTICATED" and "missing credentials" in err["message"]
        assert r.headers["www-authenticate"] == "Bearer"
        err = error_of(h.request(method, path, json={}, headers=as_("mallory")), 401)
        assert err["message"] == "invalid bearer token"
    with pytest.raises(openai.AuthenticationError):
        openai_client(auth_server, "mallory").models.list()


def test_alices_session_is_hers_over_http_and_grpc(auth_server):
    with (
        httpx.Client(base_url=auth_server.http_target) as h,
        Client(auth_server.target, token="alice") as alice,
        Client(auth_server.target, token="bob") as bob,
    ):
        r = h.post("/v1/sessions", json={"text": PROMPT}, headers=as_("alice"))
        assert r.status_code == 201
        sid = r.json()["session_id"]
        # To bob it is what an unknown session is (the error table's status and message).
        unknown = error_of(h.get("/v1/sessions/nope", headers=as_("bob")), 403)
        theirs = error_of(h.get(f"/v1/sessions/{sid}", headers=as_("bob")), 403)
        assert theirs["message"] == unknown["message"].replace("nope", sid)
        assert theirs["code"] == "PERMISSION_DENIED"
        for method, path, body in [
            ("DELETE", "", None),
            ("POST", "/fork", {}),
            ("POST", "/rewind", {"turn": 0}),
        ]:
            r = h.request(method, f"/v1/sessions/{sid}{path}", json=body, headers=as_("bob"))
            assert error_of(r, 403)["message"] == theirs["message"]
        with pytest.raises(openai.PermissionDeniedError, match="not available to this token"):
            openai_client(auth_server, "bob").completions.create(
                model="", prompt="x", extra_body={"session_id": sid}
            )
        with pytest.raises(grpc.RpcError) as err:
            bob.generate_text("", session_id=sid, max_new_tokens=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Alice goes on over gRPC, then over HTTP with the openai client.
        one = alice.generate_text("", session_id=sid, max_new_tokens=20, params=sampling(temperature=0))[0]
        two = (
            openai_client(auth_server, "alice")
            .completions.create(
                model="", prompt="", max_tokens=20, temperature=0, extra_body={"session_id": sid}
            )
            .choices[0]
            .text
        )
        assert one + two == reference_generate(D2L, PROMPT, 40)
        assert alice.get_session(sid).tokens_seen == 18 + 40


def test_a_session_made_over_grpc_by_alice_is_hers_over_http(auth_server):
    with (
        httpx.Client(base_url=auth_server.http_target) as h,
        Client(auth_server.target, token="alice") as alice,
    ):
        sid = alice.create_session("the").session_id
        assert h.get(f"/v1/sessions/{sid}", headers=as_("alice")).json()["tokens_seen"] == 3
        assert h.get(f"/v1/sessions/{sid}", headers=as_("bob")).status_code == 403
        assert h.delete(f"/v1/sessions/{sid}", headers=as_("alice")).status_code == 204


# -- request ids, TLS, metrics --


def test_the_request_id_is_echoed_or_made(http):
    r = http.get("/v1/models", headers={"x-request-id": "req-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    assert re.fullmatch("[0-9a-f]{32}", http.get("/v1/models").headers["x-request-id"])
    bad = http.post("/v1/completions", json={"nope": 1}, headers={"x-request-id": "req-43"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "req-43"
    body = {"prompt": PROMPT, "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers={"x-request-id": "req-44"}) as r:
        assert r.headers["x-request-id"] == "req-44"


def test_tls_serves_https_with_the_same_answers(tmp_path):
    certs = make_certs(tmp_path)
    srv = start_http_server(tls_cert=str(certs["server.pem"]), tls_key=str(certs["server.key"]))
    try:
        base = srv.http_target.replace("http://", "https://")
        ctx = ssl.create_default_context(cafile=str(certs["ca.pem"]))
        with httpx.Client(base_url=base, verify=ctx) as h:
            r = h.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 30, "temperature": 0})
            assert r.status_code == 200
            assert r.json()["choices"][0]["text"] == reference_generate(D2L, PROMPT, 30)
            assert h.post("/v1/sessions", json={"text": "the"}).status_code == 201
        with httpx.Client(base_url=base) as untrusting, pytest.raises(httpx.ConnectError):
            untrusting.get("/v1/models")  # the test CA is not the system's
        with httpx.Client(base_url=srv.http_target) as plain, pytest.raises(httpx.HTTPError):
            plain.get("/v1/models")  # no plaintext beside TLS
    finally:
        srv.stop()


def requests_count(srv: ThreadedServer, method: str, code: str) -> float:
    labels = {"method": method, "code": code}
    return srv.server.metrics.registry.get_sample_value("gru_serve_requests_total", labels) or 0.0


def counted(srv: ThreadedServer, method: str, code: str, want: float) -> None:
    """Wait for the count: a call is counted once its reply has gone out, so just after the
    client has read it."""
    wait_until(lambda: requests_count(srv, method, code) == want)


def test_metrics_count_http_calls_by_route(server, http):
    ok = requests_count(server, "POST /v1/completions", "200")
    bad = requests_count(server, "POST /v1/completions", "400")
    for _ in range(3):
        assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200
    assert http.post("/v1/completions", json={"max_tokens": "x"}).status_code == 400
    counted(server, "POST /v1/completions", "200", ok + 3)
    counted(server, "POST /v1/completions", "400", bad + 1)
    # Labelled by route, not by path: one label for every session id.
    got = requests_count(server, "GET /v1/sessions/{session_id}", "404")
    for sid in ("a", "b"):
        assert http.get(f"/v1/sessions/{sid}").status_code == 404
    counted(server, "GET /v1/sessions/{session_id}", "404", got + 2)
    assert requests_count(server, "GET /v1/sessions/a", "404") == 0


def test_metrics_count_refused_calls_under_their_route(auth_server):
    before = requests_count(auth_server, "POST /v1/completions", "401")
    unrouted = requests_count(auth_server, "GET (no route)", "401")
    with httpx.Client(base_url=auth_server.http_target) as h:
        assert h.post("/v1/completions", json={}).status_code == 401
        assert h.get("/no/such/path").status_code == 401
    counted(auth_server, "POST /v1/completions", "401", before + 1)
    counted(auth_server, "GET (no route)", "401", unrouted + 1)


# -- a property test over /v1/completions bodies --

LIMITS = {"max_new_tokens": 12, "default_new_tokens": 3}

jsonish = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
# Each field within its documented range (a body of these alone is answered 200)...
VALID = {
    "model": st.sampled_from(["", "timemachine-d2l"]) | st.none(),
    "prompt": st.text(min_size=1, max_size=12)
    | st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=1),
    "max_tokens": st.integers(0, LIMITS["max_new_tokens"]) | st.none(),
    "temperature": st.floats(0, 2) | st.none(),
    "top_p": st.floats(0.01, 1) | st.none(),
    "top_k": st.integers(0, 30),
    "n": st.integers(1, 3) | st.none(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "logprobs": st.sampled_from([0, 1, None]),
    "echo": st.sampled_from([False, None]),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "presence_penalty": st.sampled_from([0, 0.0, None]),
    "frequency_penalty": st.sampled_from([0, 0.0, None]),
    "best_of": st.sampled_from([1, None]),
    "logit_bias": st.sampled_from([{}, None]),
    "user": st.text(max_size=4),
    "seed": st.integers(0, 2**64 - 1) | st.none(),
    "suffix": st.none(),
    "session_id": st.just("LIVE"),
}
# ... and each field's kind, in range or out of it.
small_floats = st.floats(-1.5, 3.0) | st.sampled_from([math.nan, math.inf, -math.inf, 0, 1, 1e308])
WILD = {
    "model": st.sampled_from(["", "timemachine-d2l", "nope"]) | st.text(max_size=5),
    "prompt": st.text(max_size=12) | st.lists(st.text(max_size=6), max_size=2),
    "max_tokens": st.integers(-2, 14) | st.integers(),
    "temperature": small_floats,
    "top_p": small_floats,
    "top_k": st.integers(-1, 30) | st.integers(),
    "n": st.integers(-1, 4) | st.just(17),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "logprobs": st.integers(-1, 3),
    "echo": st.booleans(),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
    "presence_penalty": small_floats,
    "frequency_penalty": small_floats,
    "best_of": st.integers(0, 3),
    "logit_bias": st.dictionaries(st.text(max_size=3), small_floats, max_size=2),
    "user": st.text(max_size=4),
    "seed": st.integers(-3, 10) | st.integers(2**64 - 2, 2**64 + 2),
    "suffix": st.text(max_size=3),
    "session_id": st.sampled_from(["", "nope", "LIVE"]) | st.text(max_size=6),
    "snapshot": st.text(max_size=8) | st.sampled_from(["", "R1JVU05BUAA=", "@@"]),
}
valid = st.fixed_dictionaries(
    {"prompt": VALID["prompt"]}, optional={k: v for k, v in VALID.items() if k != "prompt"}
).map(lambda b: b if b.get("stream") else {k: v for k, v in b.items() if k != "stream_options"})
one_wild = st.sampled_from(sorted(WILD)).flatmap(lambda k: (WILD[k] | jsonish).map(lambda v: {k: v}))
strangers = st.dictionaries(
    st.text(alphabet=st.characters(exclude_categories=()), min_size=1, max_size=4),
    jsonish,
    min_size=1,
    max_size=2,
)
mutation = st.one_of(st.just({}), st.just({}), one_wild, strangers)
everything_wild = st.fixed_dictionaries({}, optional={k: v | jsonish for k, v in WILD.items()})
mostly_valid = st.builds(lambda b, m: {**b, **m}, valid, mutation).map(lambda b: json.dumps(b).encode())
bodies = st.one_of(
    mostly_valid,
    mostly_valid,  # twice: half the bodies reach the engine
    everything_wild.map(lambda b: json.dumps(b).encode()),
    jsonish.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=12),
)


@pytest.fixture(scope="module")
def small_server() -> Iterator[ThreadedServer]:
    srv = start_http_server(**LIMITS)
    yield srv
    srv.stop()


def check_reply(r: httpx.Response, body: bytes) -> None:
    if r.status_code != 200:
        assert r.status_code in ERROR_STATUSES, (r.status_code, r.text, body)
        error_of(r, r.status_code)
        return
    sent = json.loads(body)
    n, max_tokens = sent.get("n") or 1, sent.get("max_tokens")
    max_tokens = LIMITS["default_new_tokens"] if max_tokens is None else max_tokens
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]", (events, body)
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert not any("error" in c for c in chunks), (chunks, body)
        ends = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert sorted(c["choices"][0]["index"] for c in ends) == list(range(n))
        return
    reply = r.json()
    assert reply["object"] == "text_completion" and len(reply["choices"]) == n, (reply, body)
    assert all(c["finish_reason"] in ("stop", "length") for c in reply["choices"])
    assert reply["usage"]["completion_tokens"] <= n * max_tokens


def test_any_completions_body_gets_a_documented_status(small_server):
    with Client(small_server.target) as rpc:
        live = rpc.create_session("the time").session_id
    statuses: dict[int, int] = {}
    # A connection per request: on a kept-alive one each reply waits ~40 ms for a delayed ACK
    # (the listening socket lacks TCP_NODELAY, see gru_serve/http/server.py bind), which would
    # make 2000 examples take minutes.
    close = {"connection": "close"}
    with httpx.Client(base_url=small_server.http_target, timeout=30, headers=close) as h:

        @settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
        @given(body=bodies)
        def one(body: bytes) -> None:
            body = body.replace(b'"LIVE"', json.dumps(live).encode())
            r = h.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            check_reply(r, body)

        one()
    # The bodies reached the engine, not only the validation.
    assert statuses.get(200, 0) > 300, statuses
    # Still up, and still right.
    with Client(small_server.target) as rpc:
        assert rpc.get_session(live).session_id == live
    ok = httpx.post(
        small_server.http_target + "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0.5, "seed": 3},
    )
    assert ok.json()["choices"][0]["text"] == reference_generate(
        D2L, PROMPT, 12, SamplingParams(temperature=0.5, seed=3)
    )


def test_a_draining_server_refuses_new_http_calls_while_a_stream_finishes():
    """Drain over HTTP as over gRPC: new calls get 503 with x-gru-serve-refused (safe to replay
    elsewhere) and readiness turns 503, while a stream already running goes on."""
    import threading

    srv = start_http_server()
    body = {"prompt": "time traveller", "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.Client(base_url=srv.http_target, timeout=30) as http:
        assert http.get("/v2/health/ready").status_code == 200
        with http.stream("POST", "/v1/completions", json=body) as running:
            events = running.iter_lines()
            assert next(line for line in events if line.startswith("data: "))
            stopper = threading.Thread(target=srv.stop, kwargs={"grace": 20.0})
            stopper.start()
            wait_until(lambda: srv.server.gate.draining)
            with httpx.Client(base_url=srv.http_target, timeout=10) as fresh:
                refused = fresh.get("/v1/models")
                assert refused.status_code == 503 and refused.headers["x-gru-serve-refused"] == "draining"
                assert "draining" in refused.json()["error"]["message"]
                assert fresh.get("/v2/health/ready").status_code == 503
            assert next(line for line in events if line.startswith("data: "))  # still streaming
        stopper.join(30)
    assert not stopper.is_alive()
