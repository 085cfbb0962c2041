"""The native API over real gRPC on 127.0.0.1."""

import threading

import grpc
import numpy as np
import pytest

from exporters.model import greedy_continue, load_checkpoint
from gru_serve.client import Client, sampling
from gru_serve.sampling import SamplingParams
from tests.support.paths import REPO
from tests.support.serving import LONG, reference_generate, wait_until


def test_greedy_200_equals_onnxruntime_and_pytorch_loops(client, runtime):
    text, fin = client.generate_text("time traveller", max_new_tokens=200)
    assert len(text) == 200 and fin.generated_tokens == 200
    assert text == reference_generate(runtime, "time traveller", 200)
    ck = load_checkpoint(REPO / "checkpoints" / "timemachine-d2l.pt")
    assert "time traveller" + text == greedy_continue(ck.model, ck.vocab, "time traveller", 200)


@pytest.mark.parametrize(
    "params",
    [None, sampling(temperature=1.0, seed=7), sampling(temperature=0.8, top_k=5, top_p=0.9, seed=11)],
)
def test_100_in_one_call_equals_50_plus_50(client, params):
    one = client.create_session("the time traveller")
    two = client.create_session("the time traveller")
    whole, f = client.generate_text("", session_id=one.session_id, max_new_tokens=100, params=params)
    first, _ = client.generate_text("", session_id=two.session_id, max_new_tokens=50, params=params)
    second, f2 = client.generate_text("", session_id=two.session_id, max_new_tokens=50, params=params)
    assert whole == first + second
    assert f.tokens_seen == f2.tokens_seen == 18 + 100
    assert client.get_session(two.session_id).tokens_seen == 118


def test_seeded_sampling_matches_the_in_process_reference(client, runtime):
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=42)
    text, fin = client.generate_text(
        "the machine", max_new_tokens=80, params=sampling(temperature=1.0, seed=42)
    )
    assert fin.seed == 42
    assert text == reference_generate(runtime, "the machine", 80, params)


def _state(server, session_id):
    rec = server.call(server.service.store.get(session_id))
    return rec.state.tobytes(), None if rec.logits is None else rec.logits.tobytes(), rec.tokens_seen


def test_cancel_midway_leaves_the_session_as_it_was(server, client):
    s = client.create_session("time traveller")
    before = _state(server, s.session_id)
    stream = client.generate("", session_id=s.session_id, max_new_tokens=LONG)
    got = [next(stream) for _ in range(5)]
    assert all(len(m.tokens) >= 1 for m in got)
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    wait_until(lambda: server.service.active_streams == 0)
    assert _state(server, s.session_id) == before
    # The lease is free again: the session serves the next request.
    text, _ = client.generate_text("", session_id=s.session_id, max_new_tokens=3)
    assert len(text) == 3


def test_deadline_midway_leaves_the_session_as_it_was(server, client):
    s = client.create_session("time traveller")
    before = _state(server, s.session_id)
    with pytest.raises(grpc.RpcError) as err:
        for _ in client.generate("", session_id=s.session_id, max_new_tokens=LONG, timeout=0.05):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: server.service.active_streams == 0)
    assert _state(server, s.session_id) == before


def test_64_concurrent_streams_each_equal_their_solo_run(server, client):
    prompts = [
        (f"the time traveller {'abcdefgh'[i % 8]} {i}", sampling(temperature=0.9, seed=i) if i % 2 else None)
        for i in range(64)
    ]
    # Long enough (several fused rounds each) that streams arriving a few ms apart still meet
    # in one batch; at 60 tokens a stream could end within its first round.
    n = 400
    solo = [client.generate_text(p, max_new_tokens=n, params=s)[0] for p, s in prompts]
    results: list[str | None] = [None] * 64
    barrier = threading.Barrier(64)

    def run(i: int) -> None:
        with Client(server.target) as c:
            barrier.wait()
            results[i] = c.generate_text(prompts[i][0], max_new_tokens=n, params=prompts[i][1])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == solo
    assert server.service.schedulers["timemachine-d2l"].stats().peak_batch_size > 8


def test_busy_session_is_aborted_at_once(server, client):
    s = client.create_session("time traveller")
    stream = client.generate("", session_id=s.session_id, max_new_tokens=LONG)
    next(stream)
    with pytest.raises(grpc.RpcError) as err:
        client.generate_text("x", session_id=s.session_id, max_new_tokens=1)
    assert err.value.code() == grpc.StatusCode.ABORTED and "busy" in err.value.details()
    stream.cancel()


def test_unknown_session_is_not_found(client):
    with pytest.raises(grpc.RpcError) as err:
        client.generate_text("x", session_id="no-such-session")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "unknown" in err.value.details()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"params": sampling(temperature=-1.0)}, "sampling.temperature"),
        ({"params": sampling(temperature=float("nan"))}, "sampling.temperature"),
        ({"params": sampling(top_p=0.0)}, "sampling.top_p"),
        ({"params": sampling(top_p=1.5)}, "sampling.top_p"),
        ({"params": sampling(top_k=-3)}, "sampling.top_k"),
        ({"params": sampling(stop=["x" * 65])}, "sampling.stop"),
        ({"params": sampling(stop=["a"] * 17)}, "sampling.stop"),
        ({"max_new_tokens": LONG + 1}, "max_new_tokens"),
        ({"model": "nope"}, "model"),
    ],
)
def test_invalid_fields_are_invalid_argument_naming_the_field(client, kwargs, field):
    with pytest.raises(grpc.RpcError) as err:
        client.generate_text("time", **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field), err.value.details()


def test_oversized_and_empty_prompts_are_invalid(client):
    with pytest.raises(grpc.RpcError) as err:
        client.generate_text("a" * 20_000)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_prompt_chars" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.generate_text("")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("prompt")


def test_stop_strings_end_generation(client, runtime):
    full = reference_generate(runtime, "time traveller", 100)
    stop = full[20:24]
    text, fin = client.generate_text("time traveller", max_new_tokens=100, params=sampling(stop=[stop]))
    assert fin.reason == 2 and fin.stop == stop  # FINISH_REASON_STOP
    assert text == full[: full.index(stop) + len(stop)]


def test_logprobs_and_final_message(client):
    msgs = list(client.generate("Time,  Traveller!", max_new_tokens=5, logprobs=True))
    tokens = [t for m in msgs for t in m.tokens]
    assert [t.index for t in tokens] == list(range(5))
    assert all(t.HasField("logprob") and t.logprob <= 0 for t in tokens)
    fin = msgs[-1].finished
    assert fin.normalized_prompt == "time traveller " and fin.prompt_tokens == 15
    assert fin.reason == 1 and fin.generated_tokens == 5 and fin.total_time_s >= fin.time_to_first_token_s > 0


def test_fork_branches_a_session(client):
    s = client.create_session("the time traveller")
    f = client.fork_session(s.session_id)
    assert f.session_id != s.session_id and f.tokens_seen == s.tokens_seen
    a, _ = client.generate_text("", session_id=s.session_id, max_new_tokens=30)
    b, _ = client.generate_text("", session_id=f.session_id, max_new_tokens=30)
    assert a == b
    client.delete_session(s.session_id)
    with pytest.raises(grpc.RpcError) as err:
        client.get_session(s.session_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_score_training_text_equals_exported_perplexity(client, runtime):
    from exporters.corpus import Corpus

    corpus = Corpus.time_machine()
    text = corpus.vocab.decode(corpus.ids[:10_000])
    r = client.score(text)
    assert len(r.tokens) == 9_999
    assert r.perplexity == pytest.approx(runtime.metadata.perplexity["train_stream"], rel=1e-4)
    assert np.exp(-np.mean([t.logprob for t in r.tokens])) == pytest.approx(r.perplexity, rel=1e-5)


def test_score_in_a_session_commits_only_when_asked(client):
    s = client.create_session("the time")
    client.score(" traveller", session_id=s.session_id)
    assert client.get_session(s.session_id).tokens_seen == 8
    r = client.score(" traveller", session_id=s.session_id, commit=True)
    assert len(r.tokens) == 10 and r.tokens_seen == 18
    with_text, _ = client.generate_text("", session_id=s.session_id, max_new_tokens=20)
    direct, _ = client.generate_text("the time traveller", max_new_tokens=20)
    assert with_text == direct


def test_model_info(client, runtime):
    m = client.model_info()
    assert m.name == "timemachine-d2l" and m.provider == "CPUExecutionProvider"
    assert list(m.vocab) == list(runtime.metadata.vocab) and m.hidden_size == 256
    assert m.model_hash == runtime.model_hash and m.limits.max_new_tokens == LONG


def test_converse_holds_a_conversation(client, server):
    from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb

    def requests():
        yield pb.ConverseRequest(text="time traveller", max_new_tokens=20)
        yield pb.ConverseRequest(text=" and", max_new_tokens=10)
        yield pb.ConverseRequest(text=" the")

    replies = list(client.stub.Converse(requests()))
    session_id = replies[0].session.session_id
    finished = [r.finished for r in replies if r.HasField("finished")]
    assert [f.generated_tokens for f in finished] == [20, 10, 0]
    text = "".join(t.text for r in replies for t in r.tokens)
    first, _ = client.generate_text("time traveller", max_new_tokens=20)
    assert text.startswith(first)
    assert client.get_session(session_id).tokens_seen == 14 + 20 + 4 + 10 + 4


def test_tokens_ready_together_share_a_message(client, runtime):
    """A reader slower than the model gets several tokens per message, in order."""
    stream = client.generate("time traveller", max_new_tokens=2000)
    first = next(stream)
    msgs = [first, *stream]
    tokens = [t for m in msgs for t in m.tokens]
    assert [t.index for t in tokens] == list(range(2000))
    assert "".join(t.text for t in tokens) == reference_generate(runtime, "time traveller", 2000)
    assert len(msgs) - 1 < 2000  # packed: fewer messages than tokens


def test_a_cancelled_converse_turn_reports_its_real_counts(client):
    import queue

    from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb

    sent: queue.Queue = queue.Queue()
    sent.put(pb.ConverseRequest(text="time traveller", max_new_tokens=20))
    replies = client.stub.Converse(iter(sent.get, None))
    session_id = next(replies).session.session_id
    while not next(replies).HasField("finished"):
        pass
    sent.put(pb.ConverseRequest(text=" and", max_new_tokens=LONG))
    streamed = len(next(replies).tokens)
    sent.put(pb.ConverseRequest(cancel=True))
    for r in replies:
        if r.HasField("finished"):
            finished = r.finished
            break
        streamed += len(r.tokens)
    sent.put(None)
    assert finished.reason == pb.FINISH_REASON_CANCELLED
    assert finished.session_id == session_id
    assert finished.prompt_tokens == 4 and finished.normalized_prompt == " and"
    assert finished.generated_tokens == streamed >= 1
    # A cancelled turn leaves the session as it was: its count is the first turn's.
    assert finished.tokens_seen == 14 + 20 == client.get_session(session_id).tokens_seen
    assert finished.time_to_first_token_s > 0 and finished.total_time_s >= finished.time_to_first_token_s
