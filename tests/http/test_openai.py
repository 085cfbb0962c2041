"""The OpenAI-compatible API through the unmodified openai client, over real HTTP on 127.0.0.1.
Every text is checked against gRPC Generate on the same server and/or the plain exported graph
(reference_generate)."""

import base64

import httpx
import openai
import pytest

from gru_serve.client import sampling
from gru_serve.core.generation import MAX_CHOICES
from gru_serve.sampling import SamplingParams
from tests.support.serving import D2L, TOKEN, openai_client, reference_generate, start_http_server

PROMPT = "the time traveller"
SEEDED = {"temperature": 0.8, "seed": 7}


def collect(stream) -> dict:
    """A streamed completion, put back together: text, finish reason and extension by choice,
    and the usage chunk's usage."""
    out: dict = {"text": {}, "finish": {}, "ext": {}, "logprobs": {}, "usage": None, "chunks": 0}
    for chunk in stream:
        out["chunks"] += 1
        assert chunk.object == "text_completion" and chunk.id.startswith("cmpl-")
        if not chunk.choices:
            out["usage"] = chunk.usage
        for c in chunk.choices:
            out["text"][c.index] = out["text"].get(c.index, "") + c.text
            if c.logprobs is not None:
                out["logprobs"].setdefault(c.index, []).append(c.logprobs)
            if c.finish_reason is not None:
                out["finish"][c.index] = c.finish_reason
                out["ext"][c.index] = chunk.model_extra["gru_serve"]
    return out


def complete(oai, stream: bool, **kwargs) -> dict:
    """One completion, streamed or not, in collect's shape."""
    if stream:
        return collect(oai.completions.create(model="", stream=True, **kwargs))
    r = oai.completions.create(model="", **kwargs)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    return {
        "text": {c.index: c.text for c in r.choices},
        "finish": {c.index: c.finish_reason for c in r.choices},
        "ext": {0: r.model_extra["gru_serve"]},
        "logprobs": {c.index: [c.logprobs] for c in r.choices if c.logprobs is not None},
        "usage": r.usage,
    }


def test_models_list_and_retrieve(server, oai):
    models = oai.models.list().data
    assert [m.id for m in models] == list(server.service.runtimes) == ["timemachine-d2l"]
    assert models[0].owned_by == "gru-serve" and models[0].object == "model"
    assert isinstance(models[0].created, int) and models[0].created > 1_600_000_000
    assert oai.models.retrieve("timemachine-d2l").id == "timemachine-d2l"
    with pytest.raises(openai.NotFoundError, match="'nope' is not served"):
        oai.models.retrieve("nope")


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_equals_grpc_and_the_reference(oai, grpc_client, stream):
    got = complete(oai, stream, prompt=PROMPT, max_tokens=60, temperature=0)
    want, fin = grpc_client.generate_text(PROMPT, max_new_tokens=60)
    assert got["text"] == {0: want} and want == reference_generate(D2L, PROMPT, 60)
    assert got["finish"] == {0: "length"}
    assert got["ext"][0]["tokens_seen"] == fin.tokens_seen == 18 + 60


@pytest.mark.parametrize("stream", [False, True])
def test_seeded_sampling_equals_grpc_and_the_reference(oai, grpc_client, stream):
    got = complete(oai, stream, prompt=PROMPT, max_tokens=60, **SEEDED)
    want, fin = grpc_client.generate_text(PROMPT, max_new_tokens=60, params=sampling(**SEEDED))
    assert got["text"] == {0: want}
    assert want == reference_generate(D2L, PROMPT, 60, SamplingParams(**SEEDED))
    assert got["ext"][0]["seed"] == fin.seed == 7


def test_omitted_temperature_is_openais_default_of_1(oai, grpc_client):
    got = oai.completions.create(model="", prompt=PROMPT, max_tokens=40, seed=4)
    want, _ = grpc_client.generate_text(PROMPT, max_new_tokens=40, params=sampling(temperature=1.0, seed=4))
    assert got.choices[0].text == want == reference_generate(D2L, PROMPT, 40, SamplingParams(1.0, seed=4))
    assert want != reference_generate(D2L, PROMPT, 40)  # not greedy, as gRPC's default would be


def test_top_k_extension_equals_grpcs(oai, grpc_client):
    got = oai.completions.create(
        model="", prompt=PROMPT, max_tokens=40, temperature=1.5, seed=9, extra_body={"top_k": 3}
    )
    params = sampling(temperature=1.5, seed=9, top_k=3)
    assert got.choices[0].text == grpc_client.generate_text(PROMPT, max_new_tokens=40, params=params)[0]
    assert got.choices[0].text == reference_generate(D2L, PROMPT, 40, SamplingParams(1.5, top_k=3, seed=9))


def test_a_temperature_below_float32_is_greedy_as_over_grpc(oai):
    # Found by the property test: 1e-320 > 0 is not greedy, but logits / 1e-320 overflow, and
    # the sampler drew from NaN probabilities. gRPC's float32 field reads it as 0.
    got = oai.completions.create(model="", prompt=PROMPT, max_tokens=30, temperature=1e-320)
    assert got.choices[0].text == reference_generate(D2L, PROMPT, 30)
    with pytest.raises(openai.BadRequestError, match=r"top_p must be in \(0, 1\]"):
        oai.completions.create(model="", prompt=PROMPT, max_tokens=3, top_p=1e-320)  # 0 in float32


def test_omitted_seed_is_random_and_reported(oai, grpc_client):
    r = oai.completions.create(model="", prompt=PROMPT, max_tokens=40)
    seed = r.model_extra["gru_serve"]["seed"]
    want, _ = grpc_client.generate_text(
        PROMPT, max_new_tokens=40, params=sampling(temperature=1.0, seed=seed)
    )
    assert r.choices[0].text == want


def test_a_one_string_list_is_the_prompt_and_the_default_length_is_the_servers(server, oai):
    r = oai.completions.create(model="timemachine-d2l", prompt=[PROMPT], temperature=0)
    n = server.service.settings.default_new_tokens
    assert r.choices[0].text == reference_generate(D2L, PROMPT, n) and r.model == "timemachine-d2l"
    assert r.usage.completion_tokens == n


@pytest.mark.parametrize("params", [{"temperature": 0}, SEEDED], ids=["greedy", "seeded"])
def test_a_session_continued_50_then_50_equals_100_in_one_request(oai, grpc_client, params):
    halves, whole = grpc_client.create_session().session_id, grpc_client.create_session().session_id
    first = oai.completions.create(
        model="", prompt=PROMPT, max_tokens=50, extra_body={"session_id": halves}, **params
    )
    second = oai.completions.create(
        model="", prompt="", max_tokens=50, extra_body={"session_id": halves}, **params
    )
    one = oai.completions.create(
        model="", prompt=PROMPT, max_tokens=100, extra_body={"session_id": whole}, **params
    )
    text = first.choices[0].text + second.choices[0].text
    assert text == one.choices[0].text
    want = SamplingParams(temperature=params["temperature"], seed=params.get("seed", 0))
    assert text == reference_generate(D2L, PROMPT, 100, want)
    ext = second.model_extra["gru_serve"]
    assert (ext["session_id"], ext["tokens_seen"], ext["turn"]) == (halves, 118, 2)
    assert first.model_extra["gru_serve"]["turn"] == 1
    assert grpc_client.get_session(halves).tokens_seen == grpc_client.get_session(whole).tokens_seen == 118


def test_a_streamed_turn_continues_a_session_like_grpc(oai, grpc_client):
    a, b = (
        grpc_client.create_session("the time").session_id,
        grpc_client.create_session("the time").session_id,
    )
    got = collect(
        oai.completions.create(
            model="", prompt=" machine", max_tokens=30, stream=True, extra_body={"session_id": a}, **SEEDED
        )
    )
    want, fin = grpc_client.generate_text(
        " machine", session_id=b, max_new_tokens=30, params=sampling(**SEEDED)
    )
    assert got["text"] == {0: want}
    assert got["ext"][0]["tokens_seen"] == fin.tokens_seen == grpc_client.get_session(a).tokens_seen
    assert got["ext"][0]["turn"] == fin.turn == 1


@pytest.mark.parametrize("stream", [False, True])
def test_n3_equals_grpc_fan_out(oai, grpc_client, stream):
    got = complete(oai, stream, prompt=PROMPT, max_tokens=30, n=3, temperature=1.0, seed=100)
    texts, fins = grpc_client.generate_choices(
        PROMPT, n=3, max_new_tokens=30, params=sampling(temperature=1.0, seed=100)
    )
    assert got["text"] == dict(enumerate(texts)) and len(set(texts)) > 1
    assert got["finish"] == {0: "length", 1: "length", 2: "length"}
    if stream:  # each choice's own extension object: choice i was seeded with seed + i
        assert [got["ext"][i]["seed"] for i in range(3)] == [f.seed for f in fins] == [100, 101, 102]
    else:
        assert got["ext"][0]["seed"] == 100


def test_n_on_a_session_leaves_it_unchanged(oai, grpc_client):
    s = grpc_client.create_session("the time")
    r = oai.completions.create(
        model="", prompt="", max_tokens=10, n=2, seed=1, extra_body={"session_id": s.session_id}
    )
    assert [len(c.text) for c in r.choices] == [10, 10]
    assert grpc_client.get_session(s.session_id).tokens_seen == s.tokens_seen


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_equal_grpcs(oai, grpc_client, stream):
    got = complete(oai, stream, prompt=PROMPT, max_tokens=40, logprobs=1, **SEEDED)
    msgs = list(grpc_client.generate(PROMPT, max_new_tokens=40, params=sampling(**SEEDED), logprobs=True))
    tokens = [t for m in msgs for t in m.tokens]
    parts = got["logprobs"][0]
    flat = {k: [x for p in parts for x in getattr(p, k)] for k in ("tokens", "token_logprobs", "text_offset")}
    assert flat["tokens"] == [t.text for t in tokens]
    # gRPC carries float32; this JSON the engine's float64.
    assert flat["token_logprobs"] == pytest.approx([t.logprob for t in tokens], rel=1e-6, abs=1e-9)
    assert flat["text_offset"] == list(range(40))  # one character a token, offsets in the choice's text
    top = [d for p in parts for d in p.top_logprobs]
    assert top == [{t: lp} for t, lp in zip(flat["tokens"], flat["token_logprobs"], strict=True)]
    assert all(lp <= 0 for lp in flat["token_logprobs"])


def test_no_logprobs_unless_asked(oai):
    for stream in (False, True):
        assert complete(oai, stream, prompt=PROMPT, max_tokens=5, logprobs=0)["logprobs"] == {}


def test_more_than_1_logprob_is_refused_saying_why(oai):
    with pytest.raises(openai.BadRequestError, match="only the chosen token's log-probability"):
        oai.completions.create(model="", prompt=PROMPT, max_tokens=5, logprobs=5)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_text_as_over_grpc(oai, grpc_client, stream):
    free = reference_generate(D2L, PROMPT, 80)
    stop = free[30:33]  # greedy text from the reference, so the stop string occurs
    got = complete(oai, stream, prompt=PROMPT, max_tokens=80, temperature=0, stop=[stop, "qqqq"])
    want, fin = grpc_client.generate_text(PROMPT, max_new_tokens=80, params=sampling(stop=[stop, "qqqq"]))
    assert got["text"] == {0: want} and got["finish"] == {0: "stop"}
    assert stop in want and len(want) < 80 and free.startswith(want) and fin.stop == stop
    one = complete(oai, stream, prompt=PROMPT, max_tokens=80, temperature=0, stop=stop)
    assert one["text"] == {0: want}


@pytest.mark.parametrize("stream", [False, True])
def test_usage_counts(oai, grpc_client, stream):
    kwargs = {"stream_options": {"include_usage": True}} if stream else {}
    got = complete(oai, stream, prompt="The Time  Traveller!", max_tokens=25, n=2, seed=5, **kwargs)
    _, fin = grpc_client.generate_text("The Time  Traveller!", max_new_tokens=25)
    u = got["usage"]
    assert u.prompt_tokens == fin.prompt_tokens == len(fin.normalized_prompt) == 19
    assert u.completion_tokens == 2 * 25 and u.total_tokens == 19 + 50


def test_no_usage_chunk_unless_asked(oai):
    got = collect(oai.completions.create(model="", prompt=PROMPT, max_tokens=5, stream=True))
    assert got["usage"] is None


def test_the_sse_stream_ends_with_done(server):
    body = {"prompt": PROMPT, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(headers={"authorization": f"Bearer {TOKEN}"}) as h:
        r = h.post(server.http_target + "/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert '"choices":[]' in events[-2] and '"usage":{"prompt_tokens":18' in events[-2]


def test_snapshot_extension_continues_like_a_session():
    srv = start_http_server(snapshot_keys=("k1",))
    try:
        with openai_client(srv) as oai:
            from gru_serve.client import Client

            with Client(srv.target, token=TOKEN) as grpc_client:
                s = grpc_client.create_session("the time")
                blob = grpc_client.export_session(s.session_id)
                snap = base64.b64encode(blob).decode()
                a = oai.completions.create(
                    model="", prompt=" machine", max_tokens=30, extra_body={"snapshot": snap}, **SEEDED
                )
                want = grpc_client.generate_text(
                    " machine", max_new_tokens=30, snapshot=blob, params=sampling(**SEEDED)
                )[0]
                assert a.choices[0].text == want
                after = a.model_extra["gru_serve"]["snapshot"]
                b = oai.completions.create(
                    model="", prompt="", max_tokens=30, extra_body={"snapshot": after}, **SEEDED
                )
                # The two stateless turns equal the same two turns on the session.
                one = grpc_client.generate_text(
                    " machine", session_id=s.session_id, max_new_tokens=30, params=sampling(**SEEDED)
                )[0]
                two = grpc_client.generate_text(
                    "", session_id=s.session_id, max_new_tokens=30, params=sampling(**SEEDED)
                )[0]
                assert (a.choices[0].text, b.choices[0].text) == (one, two)
                with pytest.raises(openai.BadRequestError, match="snapshot: not base64"):
                    oai.completions.create(model="", prompt="x", extra_body={"snapshot": "@@"})
    finally:
        srv.stop()


def test_chat_completions_say_the_model_has_no_chat_template(oai):
    with pytest.raises(openai.NotFoundError, match="declares no chat template"):
        oai.chat.completions.create(model="timemachine-d2l", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("echo", True, "echo: only false"),
        ("best_of", 2, "best_of: only 1"),
        ("suffix", "end", "suffix: not supported"),
        ("logit_bias", {"5": 1.0}, "logit_bias: not supported"),
        ("presence_penalty", 0.5, "presence_penalty: only 0"),
        ("frequency_penalty", -1, "frequency_penalty: only 0"),
        ("n", 0, "n must be in"),
        ("n", MAX_CHOICES + 1, "n must be in"),
        ("max_tokens", -1, "max_tokens must be in"),
        ("logprobs", -1, "logprobs must be"),
        ("temperature", -0.5, "temperature must be"),
        ("top_p", 0, "top_p must be"),
        ("top_k", -1, "top_k must be"),
        ("seed", -1, "seed must be"),
        ("stop", ["a", "b", "c", "d", "e"], "stop: has 5 strings; at most 4"),
        ("stop", "", "stop strings must have"),
        ("prompt", ["a", "b"], "prompt: must be a string or a list holding exactly one string"),
        ("prompt", [1, 2], "prompt: must be"),
        ("model", "nope", "unknown model 'nope'"),
    ],
)
def test_unsupported_or_bad_values_are_400_naming_the_field(oai, field, value, why):
    args = {"prompt": PROMPT, "max_tokens": 5, field: value}
    known = {"prompt", "max_tokens", "n", "echo", "best_of", "suffix", "logit_bias", "seed", "stop"}
    known |= {"presence_penalty", "frequency_penalty", "logprobs", "temperature", "top_p", "model"}
    extra = {k: args.pop(k) for k in list(args) if k not in known}
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=args.pop("model", ""), extra_body=extra, **args)
    assert why in err.value.message and err.value.status_code == 400


def test_stream_options_need_stream(oai):
    with pytest.raises(openai.BadRequestError, match="stream_options: only allowed when stream is true"):
        oai.completions.create(model="", prompt=PROMPT, stream_options={"include_usage": True})


@pytest.mark.parametrize("stream", [False, True])
def test_an_unknown_session_is_the_replys_status_even_when_streaming(oai, stream):
    # Found before the first token, so it is the reply's status, not an error event after a
    # 200. As over gRPC, a caller with a token hears "not available to this token" (403) for
    # an unknown session and for another token's alike (test_http_front checks the latter).
    with pytest.raises(openai.PermissionDeniedError, match="session 'nope' is not available to this token"):
        r = oai.completions.create(model="", prompt="x", stream=stream, extra_body={"session_id": "nope"})
        if stream:
            list(r)


def test_a_busy_session_is_409(server, oai, grpc_client):
    s = grpc_client.create_session("the time").session_id
    body = {"prompt": " machine", "max_tokens": 1_000_000, "stream": True, "session_id": s}
    with (
        httpx.Client(headers={"authorization": f"Bearer {TOKEN}"}) as h,
        h.stream("POST", server.http_target + "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: closing this iterator would close the response
        next(lines)  # the first token is out: the session is leased
        with pytest.raises(openai.ConflictError, match="busy"):
            oai.completions.create(model="", prompt="x", max_tokens=1, extra_body={"session_id": s})
