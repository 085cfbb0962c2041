"""Snapshots expire (snapshot_max_age_s, from the blob's signed export time) and, where the
server binds them (snapshot_bind_owner), serve only the token that exported them: on
ImportSession, stateless Generate and stateless Converse.

Old or re-owned blobs are made here by the format's documented layout (README, core/snapshots'
docstring) with a plain HMAC-SHA256, not by the server's codec: a real exported blob's header is
rewritten and signed again with the key the test gave the server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import time
from collections.abc import Iterator

import grpc
import pytest

from gru_serve.client import Client
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.server import ThreadedServer
from tests.support.serving import D2L, reference_generate, start_server

KEY = "k1-a-long-random-secret"
PROMPT = "time traveller"
PREFIX = struct.Struct("<8sHII")  # magic, version, header bytes, body bytes
DAY = 86_400


def header(blob: bytes) -> dict:
    _, _, n, _ = PREFIX.unpack_from(blob)
    return json.loads(blob[PREFIX.size : PREFIX.size + n])


def resealed(blob: bytes, change) -> bytes:
    """The blob with change(header) applied, signed again with KEY."""
    magic, version, n, body_len = PREFIX.unpack_from(blob)
    head = json.loads(blob[PREFIX.size : PREFIX.size + n])
    change(head)
    new = json.dumps(head, separators=(",", ":")).encode()
    body = blob[PREFIX.size + n : -32]
    data = PREFIX.pack(magic, version, len(new), body_len) + new + body
    return data + hmac.new(KEY.encode(), data, hashlib.sha256).digest()


def aged(blob: bytes, seconds: float) -> bytes:
    def change(h: dict) -> None:
        h["exported"] = time.time() - seconds

    return resealed(blob, change)


def ownerless(blob: bytes) -> bytes:
    """As a server before owner binding sealed it: no owner in the header."""
    return resealed(blob, lambda h: h.pop("owner", None))


def refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def uses(c: Client, blob: bytes) -> list:
    """Every way a blob is used: import, stateless Generate, stateless Converse."""

    def converse():
        turn = pb.ConverseRequest(snapshot=blob, max_new_tokens=5)
        return list(c.stub.Converse(iter([turn]), metadata=c.metadata))

    return [
        lambda: c.import_session(blob),
        lambda: c.generate_text("", max_new_tokens=5, snapshot=blob),
        converse,
    ]


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    srv = start_server(snapshot_keys=(KEY,))  # the default max age: a day
    yield srv
    srv.stop()


@pytest.fixture
def client(server) -> Iterator[Client]:
    with Client(server.target) as c:
        yield c


def test_a_blob_older_than_the_max_age_is_refused_everywhere(client):
    blob = client.export_session(client.create_session(PROMPT).session_id)
    old = aged(blob, DAY + 60)
    for use in uses(client, old):
        code, details = refused(use)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "expired" in details and "snapshot_max_age_s=86400" in details


def test_a_blob_within_the_max_age_continues_exactly(client):
    blob = client.export_session(client.create_session(PROMPT).session_id)
    text, fin = client.generate_text("", max_new_tokens=30, snapshot=aged(blob, DAY - 60))
    assert text == reference_generate(D2L, PROMPT, 30)
    # The snapshot a stateless request returns is sealed now: it starts a new day.
    assert abs(header(fin.snapshot)["exported"] - time.time()) < 60
    assert client.import_session(aged(blob, DAY - 60)).tokens_seen == 14


def test_max_age_zero_means_no_expiry():
    srv = start_server(snapshot_keys=(KEY,), snapshot_max_age_s=0)
    try:
        with Client(srv.target) as c:
            blob = c.export_session(c.create_session(PROMPT).session_id)
            assert c.import_session(aged(blob, 365 * DAY)).tokens_seen == 14
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def bound() -> Iterator[ThreadedServer]:
    srv = start_server(snapshot_keys=(KEY,), auth_tokens=("alice", "bob"), snapshot_bind_owner=True)
    yield srv
    srv.stop()


def test_a_bound_blob_serves_its_exporter_only(bound):
    with Client(bound.target, token="alice") as alice, Client(bound.target, token="bob") as bob:
        blob = alice.export_session(alice.create_session(PROMPT).session_id)
        assert "alice" not in json.dumps(header(blob))  # the owner is named by a keyed hash
        for use in uses(bob, blob):
            code, details = refused(use)
            assert code == grpc.StatusCode.PERMISSION_DENIED, details
            assert "snapshot_bind_owner" in details
        assert alice.import_session(blob).tokens_seen == 14
        text, fin = alice.generate_text("", max_new_tokens=30, snapshot=blob)
        assert text == reference_generate(D2L, PROMPT, 30)
        # What a stateless request returns is bound to its caller too.
        code, _ = refused(lambda: bob.import_session(fin.snapshot))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert alice.import_session(fin.snapshot).tokens_seen == 44


def test_a_blob_naming_no_owner_is_refused_where_owners_are_bound(bound):
    with Client(bound.target, token="alice") as alice:
        blob = ownerless(alice.export_session(alice.create_session(PROMPT).session_id))
        for use in uses(alice, blob):
            code, details = refused(use)
            assert code == grpc.StatusCode.FAILED_PRECONDITION, details
            assert "names no owner" in details and "export the session again" in details


def test_unbound_servers_take_any_tokens_blob_and_old_blobs():
    srv = start_server(snapshot_keys=(KEY,), auth_tokens=("alice", "bob"))
    try:
        with Client(srv.target, token="alice") as alice, Client(srv.target, token="bob") as bob:
            blob = alice.export_session(alice.create_session(PROMPT).session_id)
            assert bob.import_session(blob).tokens_seen == 14
            assert bob.import_session(ownerless(blob)).tokens_seen == 14
    finally:
        srv.stop()
