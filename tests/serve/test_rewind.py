"""Turns and rewind over real gRPC: every commit is a checkpoint a session can return to."""

from collections.abc import Iterator

import grpc
import pytest

from gru_serve.cli import main as cli
from gru_serve.client import Client, sampling
from gru_serve.sampling import SamplingParams
from gru_serve.server import ThreadedServer
from tests.support.serving import LONG, reference_generate, start_server

# No leading spaces: the reference normalises the whole text, where runs of spaces become one.
PROMPTS = ("the time traveller", "said the", "and then")
N = 30


def turns(session) -> list[tuple[int, int]]:
    return [(t.turn, t.tokens_seen) for t in session.turns]


@pytest.mark.parametrize(
    ("params", "reference"),
    [
        (None, None),
        (sampling(temperature=0.8, top_k=5, seed=11), SamplingParams(0.8, 5, 1.0, 11)),
    ],
    ids=["greedy", "seeded"],
)
def test_rewind_to_turn_1_after_three_then_generate_equals_the_first_time(client, runtime, params, reference):
    sid = client.create_session("").session_id
    first = []
    for n, prompt in enumerate(PROMPTS, 1):
        text, fin = client.generate_text(prompt, session_id=sid, max_new_tokens=N, params=params)
        assert fin.turn == n
        first.append(text)
    after_1 = len(PROMPTS[0]) + N

    s = client.rewind_session(sid, 1)
    assert s.tokens_seen == after_1 and turns(s) == [(0, 0), (1, after_1)]
    again, fin = client.generate_text(PROMPTS[1], session_id=sid, max_new_tokens=N, params=params)
    assert again == first[1] and fin.turn == 2  # "regenerate" with the same seed
    # The independent reference: the exported graph run plainly over the whole text of turn 1.
    assert again == reference_generate(runtime, PROMPTS[0] + first[0] + PROMPTS[1], N, reference)

    # "Edit the last message": another prompt from the same turn, nothing prefilled again.
    client.rewind_session(sid, 1)
    edited, fin = client.generate_text("who", session_id=sid, max_new_tokens=N, params=params)
    assert edited == reference_generate(runtime, PROMPTS[0] + first[0] + "who", N, reference)
    assert fin.turn == 2 and fin.tokens_seen == after_1 + 3 + N


def test_get_session_lists_turns_with_tokens_seen(client):
    s = client.create_session("time traveller")
    assert turns(s) == [(0, 14)]
    _, fin = client.generate_text("", session_id=s.session_id, max_new_tokens=10)
    assert (fin.turn, fin.tokens_seen) == (1, 24)
    client.score("abc", session_id=s.session_id, commit=True)
    client.score("abc", session_id=s.session_id)  # no commit, no turn
    got = client.get_session(s.session_id)
    assert turns(got) == [(0, 14), (1, 24), (2, 27)]
    stamps = [t.committed.ToNanoseconds() for t in got.turns]
    assert 0 < stamps[0] <= stamps[1] <= stamps[2]

    fork = client.fork_session(s.session_id)  # a fork's history starts at the fork
    assert turns(fork) == [(0, 27)]
    back = client.rewind_session(s.session_id, 0)
    assert back.tokens_seen == 14 and turns(back) == [(0, 14)]
    assert turns(client.get_session(s.session_id)) == [(0, 14)]
    assert client.generate_text("", session_id=s.session_id, max_new_tokens=1)[1].turn == 1


@pytest.fixture(scope="module")
def bounded() -> Iterator[ThreadedServer]:
    srv = start_server(max_checkpoints=3)
    yield srv
    srv.stop()


def test_a_session_keeps_the_newest_turns_and_a_dropped_one_is_invalid(bounded):
    with Client(bounded.target) as c:
        sid = c.create_session("time traveller").session_id
        for _ in range(4):
            c.generate_text("", session_id=sid, max_new_tokens=5)
        assert turns(c.get_session(sid)) == [(2, 24), (3, 29), (4, 34)]
        for turn in (1, 5):
            with pytest.raises(grpc.RpcError) as err:
                c.rewind_session(sid, turn)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == f"turn: session '{sid}' keeps turns 2..4, not turn {turn}"
        assert c.get_session(sid).tokens_seen == 34  # refused: unchanged, and not left leased
        assert turns(c.rewind_session(sid, 2)) == [(2, 24)]
        assert c.generate_text("", session_id=sid, max_new_tokens=5)[1].turn == 3


def test_rewinding_a_busy_session_is_aborted(client):
    s = client.create_session("time traveller")
    stream = client.generate("", session_id=s.session_id, max_new_tokens=LONG)
    next(stream)
    with pytest.raises(grpc.RpcError) as err:
        client.rewind_session(s.session_id, 0)
    assert err.value.code() == grpc.StatusCode.ABORTED and "busy" in err.value.details()
    stream.cancel()


def test_another_tokens_session_is_refused_like_get_session():
    srv = start_server(auth_tokens=("alice-token", "bob-token"))
    try:
        with Client(srv.target, token="alice-token") as alice, Client(srv.target, token="bob-token") as bob:
            sid = alice.create_session("time traveller").session_id
            alice.generate_text("", session_id=sid, max_new_tokens=5)
            for target in (sid, "no-such-session"):
                errors = []
                for call in (bob.get_session, lambda t: bob.rewind_session(t, 0)):
                    with pytest.raises(grpc.RpcError) as err:
                        call(target)
                    errors.append((err.value.code(), err.value.details()))
                assert errors[0] == errors[1] and errors[0][0] == grpc.StatusCode.PERMISSION_DENIED
            assert alice.get_session(sid).tokens_seen == 19
    finally:
        srv.stop()


def test_cli_lists_turns_and_rewinds(server, client, capsys):
    sid = client.create_session("time traveller").session_id
    client.generate_text("", session_id=sid, max_new_tokens=6)
    assert cli(["session", "turns", sid, "--target", server.target]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["turn", "tokens_seen", "committed"]
    assert [r[:2] for r in rows[1:]] == [["0", "14"], ["1", "20"]]
    assert cli(["session", "rewind", sid, "0", "--target", server.target]) == 0
    shown = capsys.readouterr().out
    assert f"session_id  {sid}" in shown and "tokens_seen 14" in shown and "turns       0..0" in shown
    assert cli(["session", "rewind", sid, "3", "--target", server.target]) == 1
    assert "INVALID_ARGUMENT: turn:" in capsys.readouterr().err
