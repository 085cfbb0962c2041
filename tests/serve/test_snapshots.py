"""Session snapshots: export on one server, import on another; stateless Generate and Converse;
every refusal with its status."""

import os
import struct
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from gru_serve.client import Client, sampling
from gru_serve.core import snapshots
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.ops.errors import FailedPrecondition, InvalidArgument, ModelLoadError
from gru_serve.ops.settings import Settings
from gru_serve.sampling import SamplingParams
from gru_serve.server import ThreadedServer
from gru_serve.shipped import shipped_models
from tests.support.cli import cli, start
from tests.support.serving import D2L, reference_generate, start_server

FULL = shipped_models()["timemachine-full"]
KEY = "k1-a-long-random-secret"
PROMPT = "time traveller"
# (client params, reference params): greedy, and seeded sampling
PARAMS = {
    "greedy": (None, None),
    "seeded": (sampling(temperature=0.8, top_k=5, seed=7), SamplingParams(temperature=0.8, top_k=5, seed=7)),
}


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


# -- the format, in process --


def _snap(logits: bool = True) -> snapshots.Snapshot:
    rng = np.random.default_rng(0)
    return snapshots.Snapshot(
        "m",
        "ab" * 32,
        17,
        rng.standard_normal((2, 3)).astype(np.float32),
        rng.standard_normal(5).astype(np.float32) if logits else None,
        123.0,
    )


@pytest.mark.parametrize("logits", [True, False])
def test_seal_then_open_gives_back_the_snapshot(logits):
    snap = _snap(logits)
    got = snapshots.open_(snapshots.seal(snap, (b"new", b"old")), (b"other", b"new"))
    assert (got.model, got.model_hash, got.tokens_seen, got.created) == ("m", "ab" * 32, 17, 123.0)
    assert got.state.dtype == np.float32 and np.array_equal(got.state, snap.state)
    assert (got.logits is None) if not logits else np.array_equal(got.logits, snap.logits)
    assert got.key_id == snapshots.key_id(b"new") and got.exported > 0 and got.tokenizer is None


def test_every_defect_is_named():
    blob = snapshots.seal(_snap(), (b"k",))

    def why(b: bytes, keys=(b"k",)) -> str:
        with pytest.raises(InvalidArgument) as e:
            snapshots.open_(b, keys)
        return str(e.value)

    assert why(b"") == "snapshot: empty"
    assert "bad magic" in why(os.urandom(300))
    assert "truncated" in why(blob[:5]) and "truncated" in why(blob[:12])
    assert why(blob[:-1]).startswith(f"snapshot: truncated: {len(blob) - 1} bytes of {len(blob)}")
    assert "after its end" in why(blob + b"x")
    assert "signature matches none" in why(blob, (b"other",))
    flipped = bytearray(blob)
    flipped[-40] ^= 1  # a bit of the logits
    assert "signature matches none" in why(bytes(flipped))
    v2 = blob[:8] + struct.pack("<H", 2) + blob[10:]
    assert why(v2) == "snapshot: format version 2; this server reads 1"
    with pytest.raises(FailedPrecondition, match="--snapshot-key"):
        snapshots.open_(blob, ())


def test_keys_come_from_flags_then_the_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# rotation: the newest first\nk2\n\nk1\n")
    assert snapshots.load_keys(Settings(snapshot_keys=("k3", "k2"), snapshot_key_file=str(f))) == (
        b"k3",
        b"k2",
        b"k1",
    )
    assert snapshots.load_keys(Settings()) == ()
    with pytest.raises(ModelLoadError, match="snapshot_key_file"):
        snapshots.load_keys(Settings(snapshot_key_file=str(tmp_path / "missing")))


# -- served --


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[ThreadedServer, ThreadedServer]]:
    """Two servers, each with its own memory store: nothing shared but the key."""
    a, b = start_server(snapshot_keys=(KEY,)), start_server(snapshot_keys=(KEY,))
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def clients(servers) -> Iterator[tuple[Client, Client]]:
    with Client(servers[0].target) as a, Client(servers[1].target) as b:
        yield a, b


def _sessions(server: ThreadedServer) -> int:
    return server.call(server.service.store.count())


@pytest.mark.parametrize("mode", PARAMS)
def test_export_on_a_import_on_b_continues_exactly(clients, mode):
    a, b = clients
    params, ref_params = PARAMS[mode]
    whole = a.create_session(PROMPT)
    uninterrupted, _ = a.generate_text("", session_id=whole.session_id, max_new_tokens=100, params=params)
    assert uninterrupted == reference_generate(D2L, PROMPT, 100, ref_params)

    s = a.create_session(PROMPT)
    first, _ = a.generate_text("", session_id=s.session_id, max_new_tokens=50, params=params)
    blob = a.export_session(s.session_id)
    imported = b.import_session(blob)
    assert imported.session_id != s.session_id and imported.tokens_seen == 14 + 50
    assert imported.model == "timemachine-d2l"
    second, fin = b.generate_text("", session_id=imported.session_id, max_new_tokens=50, params=params)
    assert first + second == uninterrupted
    assert fin.tokens_seen == 114 and not fin.snapshot  # a session's Finished carries no snapshot


def test_export_response_says_what_it_holds(clients):
    a, _ = clients
    s = a.create_session(PROMPT)
    r = a.stub.ExportSession(pb.ExportSessionRequest(session_id=s.session_id))
    assert (r.model, r.tokens_seen) == ("timemachine-d2l", 14)
    assert r.snapshot.startswith(snapshots.MAGIC)


@pytest.mark.parametrize("mode", PARAMS)
def test_stateless_across_two_servers_equals_one_session(servers, clients, mode):
    a, b = clients
    params, ref_params = PARAMS[mode]
    blob = a.export_session(a.create_session(PROMPT).session_id)
    before = _sessions(servers[0]), _sessions(servers[1])
    text = ""
    for i in range(4):  # 25 tokens at a time, alternating servers
        text_i, fin = (a, b)[i % 2].generate_text("", max_new_tokens=25, params=params, snapshot=blob)
        assert fin.tokens_seen == 14 + 25 * (i + 1) and fin.session_id == ""
        text, blob = text + text_i, fin.snapshot
    assert text == reference_generate(D2L, PROMPT, 100, ref_params)
    assert (_sessions(servers[0]), _sessions(servers[1])) == before  # nothing stored


def test_stateless_prompts_are_appended(clients):
    a, b = clients
    blob = a.export_session(a.create_session("time").session_id)
    _, fin = a.generate_text(" traveller", max_new_tokens=0, snapshot=blob)
    text, _ = b.generate_text("", max_new_tokens=30, snapshot=fin.snapshot)
    assert text == reference_generate(D2L, PROMPT, 30)


def test_stateless_converse_then_generate_elsewhere(clients):
    a, b = clients
    blob = a.export_session(a.create_session(PROMPT).session_id)

    def turns():
        yield pb.ConverseRequest(snapshot=blob, max_new_tokens=20)
        yield pb.ConverseRequest(max_new_tokens=30)

    replies = list(b.stub.Converse(turns()))
    assert not any(r.HasField("session") for r in replies)
    finished = [r.finished for r in replies if r.HasField("finished")]
    assert [f.tokens_seen for f in finished] == [34, 64] and all(f.snapshot for f in finished)
    text = "".join(t.text for r in replies for t in r.tokens)
    rest, _ = a.generate_text("", max_new_tokens=30, snapshot=finished[-1].snapshot)
    assert text + rest == reference_generate(D2L, PROMPT, 80)


def test_converse_refuses_a_snapshot_after_the_first_message(clients):
    a, _ = clients
    blob = a.export_session(a.create_session(PROMPT).session_id)

    def turns():
        yield pb.ConverseRequest(text=PROMPT, max_new_tokens=2)
        yield pb.ConverseRequest(snapshot=blob, max_new_tokens=2)

    code, details = _code(lambda: list(a.stub.Converse(turns())))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("snapshot: only the first")


def test_bad_blobs_are_invalid_argument_naming_the_defect(clients):
    a, b = clients
    blob = a.export_session(a.create_session(PROMPT).session_id)
    for bad, says in [
        (blob[: len(blob) // 2], "snapshot: truncated"),
        (blob[:-1], "snapshot: truncated"),
        (os.urandom(len(blob)), "snapshot: not a gru-serve snapshot (bad magic)"),
    ]:
        for call in (
            lambda bad=bad: b.import_session(bad),
            lambda bad=bad: b.generate_text("", max_new_tokens=5, snapshot=bad),
        ):
            code, details = _code(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(says), details


def test_session_and_snapshot_together_are_refused(clients):
    a, _ = clients
    s = a.create_session(PROMPT)
    blob = a.export_session(s.session_id)
    code, details = _code(lambda: a.generate_text("", session_id=s.session_id, snapshot=blob))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "session_id and snapshot" in details


def test_rotation_and_another_key(tmp_path, clients):
    """A server whose key file lists a new key then the old one: it reads blobs signed with
    either and signs with the new one, which a server with only the old key refuses."""
    a, _ = clients
    keys = tmp_path / "keys"
    keys.write_text(f"k2-the-new-key\n{KEY}\n")
    srv = start_server(snapshot_key_file=str(keys), auth_tokens=("alice", "bob"))
    try:
        with Client(srv.target, token="alice") as alice, Client(srv.target, token="bob") as bob:
            old = a.export_session(a.create_session(PROMPT).session_id)
            mine = alice.import_session(old)
            assert mine.tokens_seen == 14
            code, _ = _code(lambda: bob.get_session(mine.session_id))
            assert code == grpc.StatusCode.PERMISSION_DENIED  # the importer owns it
            code, _ = _code(lambda: bob.export_session(mine.session_id))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            new = alice.export_session(mine.session_id)
            assert snapshots.open_(new, (b"k2-the-new-key",)).key_id == snapshots.key_id(b"k2-the-new-key")
        code, details = _code(lambda: a.import_session(new))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == "snapshot: signature matches none of this server's keys"
    finally:
        srv.stop()


def test_another_models_snapshot_is_failed_precondition(clients):
    a, _ = clients
    full = ThreadedServer(Settings(port=0, models=(str(FULL),), snapshot_keys=(KEY,)))
    try:
        with Client(full.target) as f:
            blob = f.export_session(f.create_session(PROMPT).session_id)
            # The other way round works on a server that serves it.
            assert f.generate_text("", max_new_tokens=3, snapshot=blob)[1].tokens_seen == 17
    finally:
        full.stop()
    for call in (lambda: a.import_session(blob), lambda: a.generate_text("", snapshot=blob)):
        code, details = _code(call)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "'timemachine-full'" in details and "'timemachine-d2l'" in details, details


def test_a_server_without_a_key_refuses_snapshots(clients):
    blob = clients[0].export_session(clients[0].create_session(PROMPT).session_id)
    srv = start_server()
    try:
        with Client(srv.target) as c:
            s = c.create_session(PROMPT)
            for call in (
                lambda: c.export_session(s.session_id),
                lambda: c.import_session(blob),
                lambda: c.generate_text("", snapshot=blob),
            ):
                code, details = _code(call)
                assert code == grpc.StatusCode.FAILED_PRECONDITION
                assert "--snapshot-key" in details and "GRU_SERVE_SNAPSHOT_KEYS" in details, details
    finally:
        srv.stop()


# -- the CLI --


def test_cli_export_import_and_stateless_generate(tmp_path):
    (pa, a), (pb_, b) = start("--snapshot-key", KEY), start("--snapshot-key", KEY)
    try:
        sid = cli("session", "create", PROMPT, "-q", "--target", a).stdout.strip()
        first = cli("generate", "--session", sid, "--max-tokens", "20", "--target", a).stdout.strip("\n")
        snap = tmp_path / "conversation.snap"
        r = cli("session", "export", sid, "-o", str(snap), "--target", a)
        assert r.returncode == 0, r.stderr
        exported = snap.read_bytes()

        r = cli("session", "import", str(snap), "--target", b)
        assert r.returncode == 0, r.stderr
        imported = r.stdout.strip()
        assert imported and "\n" not in imported
        on_b = cli("generate", "--session", imported, "--max-tokens", "20", "--target", b).stdout.strip("\n")

        # Stateless: each call reads the file and writes the new snapshot back, on either server.
        r = cli("generate", "--snapshot", str(snap), "--max-tokens", "20", "--target", b)
        assert r.returncode == 0, r.stderr
        second = r.stdout.strip("\n")
        assert second == on_b and snap.read_bytes() != exported
        third = cli("generate", "--snapshot", str(snap), "--max-tokens", "20", "--target", a).stdout.strip(
            "\n"
        )
        assert first + second + third == reference_generate(D2L, PROMPT, 60)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["conversation.snap"]  # no temp file left

        r = cli("session", "export", sid, "--target", a)
        assert r.returncode == 2 and "-o FILE" in r.stderr
        r = cli("generate", "--snapshot", str(tmp_path / "missing"), "--target", a)
        assert r.returncode == 1 and "snapshot" in r.stderr
        snap.write_bytes(exported[:-3])
        r = cli("generate", "--snapshot", str(snap), "--target", a)
        assert r.returncode == 1 and "INVALID_ARGUMENT: snapshot: truncated" in r.stderr
        assert snap.read_bytes() == exported[:-3]  # a refused call leaves the file alone
    finally:
        for p in (pa, pb_):
            p.terminate()
            p.wait(timeout=30)


def test_snapshot_is_small(clients):
    a, _ = clients
    blob = a.export_session(a.create_session(PROMPT).session_id)
    floats = 256 + 28  # the d2l model: 1 x 256 state, 28 logits
    assert 4 * floats < len(blob) < 4 * floats + 600
