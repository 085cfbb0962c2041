"""Security: unguessable ids, sessions private to their token, nothing revealed, no prompts in logs."""

import base64
import json
from functools import partial

import grpc
import numpy as np
import pytest

from gru_serve.client import Client
from gru_serve.ops.settings import Settings
from gru_serve.server import ThreadedServer
from gru_serve.shipped import default_model_path
from gru_serve.stores.sessions import new_session_id
from tests.support.reliability import TALLY, record


def test_session_ids_carry_128_random_bits():
    ids = [new_session_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    raw = np.array([np.frombuffer(base64.urlsafe_b64decode(i + "=="), np.uint8) for i in ids])
    assert raw.shape == (20_000, 16)  # 128 bits >= 122
    bits = np.unpackbits(raw, axis=1).mean(axis=0)
    assert np.all(np.abs(bits - 0.5) < 0.02)  # every bit is a fair coin
    record("session ids", bits=128, sampled=len(ids), duplicates=0)


@pytest.fixture(scope="module")
def server():
    srv = ThreadedServer(Settings(port=0, models=(str(default_model_path()),), auth_tokens=("alice", "bob")))
    yield srv
    srv.stop()


def outcome(call):
    try:
        call()
        return "OK", ""
    except grpc.RpcError as e:
        return e.code().name, e.details()


def test_one_token_cannot_touch_anothers_session_nor_learn_it_exists(server):
    alice, bob, nobody = (Client(server.target, token=t) for t in ("alice", "bob", "wrong"))
    mine = alice.create_session("time traveller").session_id
    unknown = new_session_id()
    before = server.call(server.service.store.get(mine))
    ops = {
        "read": lambda c, s: c.get_session(s),
        "use": lambda c, s: c.generate_text("x", session_id=s, max_new_tokens=2),
        "score": lambda c, s: c.score("abc", session_id=s, commit=True),
        "fork": lambda c, s: c.fork_session(s),
        "delete": lambda c, s: c.delete_session(s),
    }
    for name, op in ops.items():
        theirs, missing = outcome(partial(op, bob, mine)), outcome(partial(op, bob, unknown))
        assert theirs[0] == missing[0] == "PERMISSION_DENIED", name
        assert theirs[1].replace(mine, "ID") == missing[1].replace(unknown, "ID"), name  # same words
        stranger, stranger_missing = outcome(partial(op, nobody, mine)), outcome(partial(op, nobody, unknown))
        assert stranger == stranger_missing and stranger[0] == "UNAUTHENTICATED", name
        TALLY["cross-token attempts"] += 4
    assert server.call(server.service.store.get(mine)) == before
    assert outcome(lambda: alice.get_session(mine))[0] == "OK"
    record("cross-token access", operations=sorted(ops), outcome="PERMISSION_DENIED, same message as unknown")


def test_no_prompt_text_in_logs_at_info(server_process):
    srv = server_process("--log-level", "INFO")
    secret = "zebra quartz prompt"
    with Client(srv.target) as c:
        s = c.create_session(secret)
        c.generate_text(secret, session_id=s.session_id, max_new_tokens=5)
        c.score(secret)
    srv.stop()
    err = srv.log_text()
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(x["msg"] == "rpc" for x in lines)
    assert "zebra" not in err and "quartz" not in err
    record("logs at INFO", lines=len(lines), prompt_text_found=0)
