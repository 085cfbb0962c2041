"""Native sessions over HTTP (/v1/sessions), over real HTTP on 127.0.0.1, checked against the
same sessions read and continued over gRPC, and against the plain exported graph. Anonymous
calls here (no token): an unknown session is then 404, as over gRPC."""

from collections.abc import Iterator

import grpc
import httpx
import pytest

from gru_serve.client import Client, sampling
from gru_serve.sampling import SamplingParams
from tests.support.serving import D2L, reference_generate

SEEDED = {"temperature": 0.8, "seed": 11}


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_target) as h:
        yield h


@pytest.fixture
def rpc(server) -> Iterator[Client]:
    with Client(server.target) as c:
        yield c


def complete(http: httpx.Client, session_id: str, prompt: str, n: int, **params) -> dict:
    body = {"prompt": prompt, "max_tokens": n, "session_id": session_id, **params}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_create_get_and_the_session_json(server, http, rpc):
    r = http.post("/v1/sessions", json={"text": "the time", "model": "timemachine-d2l"})
    assert r.status_code == 201
    s = r.json()
    assert set(s) == {"session_id", "model", "tokens_seen", "created", "last_used", "expires", "turns"}
    assert (s["model"], s["tokens_seen"]) == ("timemachine-d2l", 8)
    assert [(t["turn"], t["tokens_seen"]) for t in s["turns"]] == [(0, 8)]
    assert all(isinstance(s[k], float) for k in ("created", "last_used", "expires"))
    assert s["expires"] == pytest.approx(s["last_used"] + server.service.settings.session_ttl_s)
    g = rpc.get_session(s["session_id"])
    assert (g.session_id, g.model, g.tokens_seen) == (s["session_id"], s["model"], s["tokens_seen"])
    assert g.created.ToNanoseconds() / 1e9 == pytest.approx(s["created"], abs=1e-6)
    assert g.turns[0].committed.ToNanoseconds() / 1e9 == pytest.approx(s["turns"][0]["committed"], abs=1e-6)
    got = http.get(f"/v1/sessions/{s['session_id']}")
    assert got.status_code == 200 and got.json() == s  # reading does not touch the session


def test_empty_bodies_create_a_fresh_session_and_fork(http, rpc):
    r = http.post("/v1/sessions")
    assert r.status_code == 201 and r.json()["tokens_seen"] == 0 and r.json()["model"] == "timemachine-d2l"
    fork = http.post(f"/v1/sessions/{r.json()['session_id']}/fork")
    assert fork.status_code == 201 and fork.json()["session_id"] != r.json()["session_id"]
    assert http.post("/v1/sessions", json={}).status_code == 201


def test_a_fork_continues_as_its_source_and_rewind_returns_to_a_turn(http, rpc):
    sid = http.post("/v1/sessions", json={"text": "the time traveller"}).json()["session_id"]
    first = complete(http, sid, " said", 20, **SEEDED)
    assert first["gru_serve"]["turn"] == 1
    fork = http.post(f"/v1/sessions/{sid}/fork", json={})
    assert fork.status_code == 201
    f = fork.json()
    assert f["tokens_seen"] == 18 + 5 + 20 and [t["turn"] for t in f["turns"]] == [0]
    a = complete(http, sid, "", 30, **SEEDED)["choices"][0]["text"]
    b = complete(http, f["session_id"], "", 30, **SEEDED)["choices"][0]["text"]
    assert a == b
    want = reference_generate(D2L, "the time traveller said", 50, SamplingParams(**SEEDED))
    assert first["choices"][0]["text"] + a == want
    s = http.get(f"/v1/sessions/{sid}").json()
    assert [(t["turn"], t["tokens_seen"]) for t in s["turns"]] == [(0, 18), (1, 43), (2, 73)]
    back = http.post(f"/v1/sessions/{sid}/rewind", json={"turn": 1})
    assert back.status_code == 200 and back.json()["tokens_seen"] == 43
    assert [t["turn"] for t in back.json()["turns"]] == [0, 1]
    assert rpc.get_session(sid).tokens_seen == 43
    # Sampling is seeded by position, which the checkpoint keeps: the same seed draws the same.
    assert complete(http, sid, "", 30, **SEEDED)["choices"][0]["text"] == a


def test_delete_is_204_and_the_session_is_gone_everywhere(http, rpc):
    sid = http.post("/v1/sessions", json={"text": "the"}).json()["session_id"]
    r = http.delete(f"/v1/sessions/{sid}")
    assert r.status_code == 204 and r.content == b""
    gone = http.get(f"/v1/sessions/{sid}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "NOT_FOUND"
    with pytest.raises(grpc.RpcError) as err:
        rpc.get_session(sid)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/sessions/nope", None),
        ("DELETE", "/v1/sessions/nope", None),
        ("POST", "/v1/sessions/nope/fork", None),
        ("POST", "/v1/sessions/nope/rewind", {"turn": 0}),
    ],
)
def test_an_unknown_session_is_404_on_every_route(http, method, path, body):
    r = http.request(method, path, json=body)
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["message"] == "session 'nope' is unknown" and err["code"] == "NOT_FOUND"
    assert set(err) == {"message", "type", "code", "param"}


@pytest.mark.parametrize(
    ("path", "body", "why"),
    [
        ("/v1/sessions", {"text": 5}, "text: Input should be a valid string"),
        ("/v1/sessions", {"foo": 1}, "foo: Extra inputs are not permitted"),
        ("/v1/sessions", {"model": "nope"}, "unknown model 'nope'"),
        ("/v1/sessions/{sid}/rewind", {}, "turn: Field required"),
        ("/v1/sessions/{sid}/rewind", {"turn": "0"}, "turn: Input should be a valid integer"),
        ("/v1/sessions/{sid}/rewind", {"turn": 7}, "keeps turns 0..0, not turn 7"),
        ("/v1/sessions/{sid}/fork", {"x": 1}, "x: Extra inputs are not permitted"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(http, path, body, why):
    sid = http.post("/v1/sessions").json()["session_id"]
    r = http.post(path.format(sid=sid), json=body)
    assert r.status_code == 400 and why in r.json()["error"]["message"]


def test_a_session_made_over_http_continues_over_grpc_and_back(http, rpc):
    sid = http.post("/v1/sessions", json={"text": "the time machine"}).json()["session_id"]
    one = complete(http, sid, "", 25, **SEEDED)["choices"][0]["text"]
    two, fin = rpc.generate_text("", session_id=sid, max_new_tokens=25, params=sampling(**SEEDED))
    three = complete(http, sid, "", 25, **SEEDED)
    assert one + two + three["choices"][0]["text"] == reference_generate(
        D2L, "the time machine", 75, SamplingParams(**SEEDED)
    )
    assert (fin.turn, three["gru_serve"]["turn"]) == (2, 3)
    assert (
        http.get(f"/v1/sessions/{sid}").json()["tokens_seen"] == rpc.get_session(sid).tokens_seen == 16 + 75
    )


def test_a_session_made_over_grpc_is_read_and_forked_over_http(http, rpc):
    s = rpc.create_session("the time")
    got = http.get(f"/v1/sessions/{s.session_id}").json()
    assert (got["session_id"], got["tokens_seen"]) == (s.session_id, 8)
    fork = http.post(f"/v1/sessions/{s.session_id}/fork").json()
    assert rpc.get_session(fork["session_id"]).tokens_seen == 8
