"""Fan-out: Generate with n continuations of one state, over real gRPC on 127.0.0.1."""

import grpc
import pytest

from gru_serve.cli import main as cli_main
from gru_serve.client import sampling
from tests.support.serving import LONG, reference_generate, wait_until


def _state(server, session_id):
    rec = server.call(server.service.store.get(session_id))
    return rec.state.tobytes(), None if rec.logits is None else rec.logits.tobytes(), rec.tokens_seen


@pytest.mark.parametrize("prompt", ["", " and the"])
def test_n8_equals_8_forks_and_commit_3_leaves_the_session_as_fork_3(server, client, prompt):
    s = client.create_session("the time traveller")
    forks = [client.fork_session(s.session_id).session_id for _ in range(8)]
    texts, fins = client.generate_choices(
        prompt,
        n=8,
        session_id=s.session_id,
        max_new_tokens=40,
        params=sampling(temperature=1.0, seed=100),
        commit=3,
    )
    for i, fork in enumerate(forks):
        text, fin = client.generate_text(
            prompt, session_id=fork, max_new_tokens=40, params=sampling(temperature=1.0, seed=100 + i)
        )
        assert texts[i] == text and fins[i].seed == fin.seed == 100 + i
    assert len(set(texts)) > 4  # the seeds differ, so (almost always) do the choices
    seen = 18 + len(prompt) + 40
    assert [(f.choice, f.committed, f.tokens_seen) for f in fins] == [(i, i == 3, seen) for i in range(8)]
    assert _state(server, s.session_id) == _state(server, forks[3])
    assert _state(server, s.session_id)[2] == seen


def test_best_of_keeps_the_choice_with_the_highest_logprob_sum(server, client):
    s = client.create_session("the time traveller")
    forks = [client.fork_session(s.session_id).session_id for _ in range(4)]
    msgs = list(
        client.generate(
            "",
            session_id=s.session_id,
            max_new_tokens=30,
            params=sampling(temperature=1.0, seed=7),
            logprobs=True,
            n=4,
            best_of=True,
        )
    )
    fins = sorted((m.finished for m in msgs if m.HasField("finished")), key=lambda f: f.choice)
    sums = [f.logprob_sum for f in fins]
    best = sums.index(max(sums))
    assert [f.committed for f in fins] == [i == best for i in range(4)]
    for i, f in enumerate(fins):
        lps = [t.logprob for m in msgs for t in m.tokens if t.choice == i]
        assert len(lps) == 30 and f.logprob_sum == pytest.approx(sum(lps), rel=1e-5)
    client.generate_text(
        "", session_id=forks[best], max_new_tokens=30, params=sampling(temperature=1.0, seed=7 + best)
    )
    assert _state(server, s.session_id) == _state(server, forks[best])


def test_without_commit_the_session_is_unchanged(server, client):
    s = client.create_session("the time traveller")
    before = _state(server, s.session_id)
    texts, fins = client.generate_choices(
        " and", n=3, session_id=s.session_id, max_new_tokens=20, params=sampling(temperature=1.0, seed=1)
    )
    assert [len(t) for t in texts] == [20] * 3
    assert not any(f.committed for f in fins) and all(f.tokens_seen == 18 for f in fins)
    assert all(f.logprob_sum < 0 for f in fins)
    assert _state(server, s.session_id) == before


def test_logprobs_go_out_only_when_asked(client):
    msgs = list(client.generate("time", max_new_tokens=10, params=sampling(temperature=1.0, seed=3), n=2))
    tokens = [t for m in msgs for t in m.tokens]
    assert len(tokens) == 20 and not any(t.HasField("logprob") for t in tokens)
    assert sorted(t.choice for t in tokens) == [0] * 10 + [1] * 10


def test_n1_behaves_as_today(server, client):
    a = client.create_session("the time traveller")
    b = client.create_session("the time traveller")
    params = sampling(temperature=0.9, seed=5)
    one = list(client.generate(" and", session_id=a.session_id, max_new_tokens=25, params=params, n=1))
    plain = list(client.generate(" and", session_id=b.session_id, max_new_tokens=25, params=params))
    assert [t for m in one for t in m.tokens] == [t for m in plain for t in m.tokens]
    fins = [one[-1].finished, plain[-1].finished]
    for f in fins:  # what differs between the two requests anyway
        f.time_to_first_token_s = f.total_time_s = 0
        f.session_id = ""
    assert fins[0] == fins[1] and not fins[0].committed
    assert _state(server, a.session_id) == _state(server, b.session_id)


def test_greedy_n4_gives_4_copies_of_the_reference(client, runtime):
    texts, fins = client.generate_choices("time traveller", n=4, max_new_tokens=50)
    assert texts == [reference_generate(runtime, "time traveller", 50)] * 4
    assert [f.choice for f in fins] == [0, 1, 2, 3] and all(f.tokens_seen == 14 + 50 for f in fins)
    # Equal to the last few bits: a choice that starts alone in a round runs on the batch-1 fused
    # session, whose kernels round differently from the batched one's (the tokens do not change).
    assert all(f.logprob_sum == pytest.approx(fins[0].logprob_sum, rel=1e-12) for f in fins)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 17}, "n"),
        ({"n": 4, "commit": 4}, "commit"),
        ({"n": 1, "commit": 1}, "commit"),
        ({"n": 4, "commit": 1}, "commit"),  # no session to keep it
        ({"n": 4, "best_of": True}, "commit and best_of"),
        ({"n": 4, "commit": 1, "best_of": True, "session": True}, "best_of"),
    ],
)
def test_bad_fan_out_fields_are_invalid_argument(client, kwargs, field):
    if kwargs.pop("session", False):
        kwargs["session_id"] = client.create_session("time").session_id
    with pytest.raises(grpc.RpcError) as err:
        client.generate_text("time", max_new_tokens=5, **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field), err.value.details()


def test_cancel_midway_leaves_the_session_and_counts_one_stream(server, client):
    s = client.create_session("time traveller")
    before = _state(server, s.session_id)
    stream = client.generate("", session_id=s.session_id, max_new_tokens=LONG, n=4, commit=0)
    choices = set()
    while len(choices) < 4:
        choices.update(t.choice for t in next(stream).tokens)
    assert server.service.active_streams == 1
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    wait_until(lambda: server.service.active_streams == 0)
    assert _state(server, s.session_id) == before
    text, _ = client.generate_text("", session_id=s.session_id, max_new_tokens=3)  # the lease is free
    assert len(text) == 3


def test_cli_prints_one_line_per_choice(server, client, runtime, capsys):
    target = ["--target", server.target]
    assert cli_main(["generate", "time traveller", "-n", "3", "--max-tokens", "20", *target]) == 0
    want = reference_generate(runtime, "time traveller", 20)
    assert capsys.readouterr().out.splitlines() == [f"[choice {i}] {want}" for i in range(3)]
    s = client.create_session("time traveller")
    args = ["generate", "--session", s.session_id, "-n", "2", "--temperature", "1", "--seed", "9"]
    assert cli_main([*args, "--max-tokens", "10", "--commit", "1", *target]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] for line in lines] == ["[choice 0", "[choice 1, committed"]
    assert client.get_session(s.session_id).tokens_seen == 14 + 10
