"""gru_serve.state, the one state codec: random StateSpecs (one to three tensors, two-tensor
states such as an LSTM's h and c included) round-trip bit for bit through the codec and through
every user's own wrapper (Redis and SQLite records, checkpoints, snapshots, prefix-cache
entries, engine messages); a one-tensor state keeps the byte layout earlier versions wrote, so
their stored data still reads; a wrong length is an error naming both lengths."""

from __future__ import annotations

import json
import math
import sqlite3
import struct
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gru_serve.contract import ModelMetadata
from gru_serve.core.snapshots import Snapshot, open_, seal
from gru_serve.engine import protocol as proto
from gru_serve.engine.prefix_cache import ENTRY_OVERHEAD, Entry
from gru_serve.engine.work import Job, RunJob
from gru_serve.ops.errors import status_of
from gru_serve.outputs import DoneEvent, RunDone
from gru_serve.sampling import SamplingParams
from gru_serve.state import (
    StateSizeError,
    StateSpec,
    Tensor,
    array_from_bytes,
    logits_from_bytes,
    to_bytes,
)
from gru_serve.stores import redis_store, sqlite_store
from gru_serve.stores.sessions import SessionRecord, pack_checkpoints, unpack_checkpoints

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = (b"snapshot-key",)


@dataclass(frozen=True)
class Case:
    spec: StateSpec
    state: np.ndarray | tuple[np.ndarray, ...]  # one state
    earlier: np.ndarray | tuple[np.ndarray, ...]  # another, for a second checkpoint
    batch: np.ndarray | tuple[np.ndarray, ...]  # states with a batch axis first
    logits: np.ndarray  # [vocab]
    run_logits: np.ndarray  # [batch, seq, vocab]

    @property
    def vocab(self) -> int:
        return len(self.logits)


def arrays_of(state: np.ndarray | tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    return state if isinstance(state, tuple) else (state,)


def assert_same(got, want) -> None:
    """Bit for bit (NaN payloads, -0 and subnormals included), as native writable float32."""
    got, want = arrays_of(got), arrays_of(want)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.dtype(np.float32) and g.flags.writeable
        assert g.shape == w.shape, (g.shape, w.shape)
        assert np.array_equal(g.view(np.uint32), w.view(np.uint32))


def bits(draw, shape: tuple[int, ...]) -> np.ndarray:
    # Any 32 bits are a float32 the state may hold: NaNs with payloads, infinities, -0, subnormals.
    return draw(arrays(np.uint32, shape)).view(np.float32)


def state_of(draw, spec: StateSpec, lead: tuple[int, ...] = ()):
    got = tuple(bits(draw, (*lead, *t.shape)) for t in spec.tensors)
    return got[0] if len(got) == 1 else got


@st.composite
def cases(draw) -> Case:
    shapes = draw(st.lists(st.lists(st.integers(1, 4), max_size=3).map(tuple), min_size=1, max_size=3))
    names = draw(st.lists(st.sampled_from("hcxyz"), min_size=len(shapes), max_size=len(shapes), unique=True))
    spec = StateSpec(tuple(Tensor(n, s) for n, s in zip(names, shapes, strict=True)))
    vocab, batch, seq = draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return Case(
        spec,
        state_of(draw, spec),
        state_of(draw, spec),
        state_of(draw, spec, (batch,)),
        bits(draw, (vocab,)),
        bits(draw, (batch, seq, vocab)),
    )


def lstm_case() -> Case:
    """An LSTM's state: h and c, each [layers, hidden]."""
    rng = np.random.default_rng(3)

    def f(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    spec = StateSpec((Tensor("h", (2, 5)), Tensor("c", (2, 5))))
    return Case(spec, (f(2, 5), f(2, 5)), (f(2, 5), f(2, 5)), (f(3, 2, 5), f(3, 2, 5)), f(7), f(3, 4, 7))


LSTM = lstm_case()


def record(c: Case) -> SessionRecord:
    rec = SessionRecord("sid", "m", "ab" * 32, "alice", c.earlier, None, 0, 1_700_000_000.5, 1_700_000_001.25)
    rec = rec.checkpointed(1_700_000_001.25, 8)  # turn 0: no logits yet
    return rec.advanced(c.state, c.logits, 5, 1_700_000_002.75, 8)


def assert_same_record(got: SessionRecord, want: SessionRecord) -> None:
    assert_same(got.state, want.state)
    assert_same(got.logits, want.logits)
    assert len(got.checkpoints) == len(want.checkpoints) == 2
    for g, w in zip(got.checkpoints, want.checkpoints, strict=True):
        assert (g.turn, g.tokens_seen, g.committed) == (w.turn, w.tokens_seen, w.committed)
        assert_same(g.state, w.state)
        assert (g.logits is None) == (w.logits is None)
        if w.logits is not None:
            assert_same(g.logits, w.logits)


# -- the codec itself --


@PROPERTY
@given(cases())
@example(LSTM)
def test_codec_round_trip(c: Case):
    data = to_bytes(c.state)
    # Tensor after tensor, each raw little-endian float32 in C order.
    assert data == b"".join(np.asarray(a, "<f4").tobytes() for a in arrays_of(c.state))
    assert len(data) == c.spec.nbytes == 4 * sum(math.prod(s) for s in c.spec.shapes)
    assert_same(c.spec.from_bytes(data), c.state)
    assert_same(logits_from_bytes(to_bytes(c.logits), c.vocab), c.logits)
    batch = len(arrays_of(c.batch)[0])
    assert_same(c.spec.batch_from_bytes(to_bytes(c.batch)), c.batch)
    assert_same(c.spec.batch_from_bytes(to_bytes(c.batch), batch), c.batch)
    assert_same(array_from_bytes(to_bytes(c.run_logits), (batch, -1, c.vocab), "logits"), c.run_logits)
    # The spec's own forms, as stores and snapshot headers keep it.
    assert StateSpec.parse(c.spec.describe()).shapes == c.spec.shapes
    assert StateSpec.from_json(json.loads(json.dumps(c.spec.to_json()))).shapes == c.spec.shapes


@PROPERTY
@given(cases(), st.integers(1, 8))
@example(LSTM, 4)
def test_a_wrong_length_names_both(c: Case, off: int):
    data = to_bytes(c.state)
    for bad in (data + b"\0" * off, data[:-off]):
        with pytest.raises(StateSizeError) as e:
            c.spec.from_bytes(bad)
        assert f"{len(bad)} bytes" in str(e.value) and f"{c.spec.nbytes} were expected" in str(e.value)
        assert status_of(e.value) == ("INTERNAL", 500)
    with pytest.raises(StateSizeError, match=f"{4 * c.vocab + 4} bytes where {4 * c.vocab}"):
        logits_from_bytes(to_bytes(c.logits) + b"\0" * 4, c.vocab)


# -- every user's own wrapper --


@PROPERTY
@given(cases())
@example(LSTM)
def test_checkpoints_round_trip(c: Case):
    rec = record(c)
    data = pack_checkpoints(rec.checkpoints, c.spec)
    got = unpack_checkpoints(data, c.spec, c.vocab)
    assert_same_record(replace(rec, checkpoints=got), rec)


@PROPERTY
@given(cases())
@example(LSTM)
def test_redis_record_round_trip(c: Case):
    rec = record(c)
    # As Redis gives a hash back: every field name and value as bytes.
    flat = [x.encode() if isinstance(x, str) else x for x in redis_store.encode(rec)]
    assert_same_record(redis_store.decode(rec.session_id, flat), rec)


@PROPERTY
@given(cases())
@example(LSTM)
def test_sqlite_record_round_trip(c: Case):
    rec = record(c)
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(sqlite_store.SCHEMA)
        db.execute(sqlite_store.INSERT, sqlite_store.encode(rec, 60.0))
        row = db.execute(sqlite_store.SELECT, (rec.session_id,)).fetchone()
    finally:
        db.close()
    assert_same_record(sqlite_store.decode(row), rec)


@PROPERTY
@given(cases(), st.booleans())
@example(LSTM, True)
def test_snapshot_round_trip(c: Case, with_logits: bool):
    logits = c.logits if with_logits else None
    snap = Snapshot("m", "ab" * 32, 9, c.state, logits, 1_700_000_000.5)
    got = open_(seal(snap, KEYS, now=1_700_000_001.0), KEYS, now=1_700_000_002.0)
    assert_same(got.state, c.state)
    assert (got.logits is None) == (logits is None)
    if logits is not None:
        assert_same(got.logits, logits)


@PROPERTY
@given(cases())
@example(LSTM)
def test_prefix_entry_round_trip(c: Case):
    entry = Entry(c.state, c.logits)
    assert entry.nbytes == c.spec.nbytes + 4 * c.vocab + ENTRY_OVERHEAD
    got = Entry.from_bytes(entry.to_bytes(), c.spec, c.vocab)
    assert got is not None
    assert_same(got.state, c.state)
    assert_same(got.logits, c.logits)
    assert Entry.from_bytes(entry.to_bytes(), c.spec, c.vocab + 1) is None  # another model's layout


@PROPERTY
@given(cases())
@example(LSTM)
def test_engine_messages_round_trip(c: Case):
    """Each message through msgpack as it crosses the socket, and back into the engine's types."""

    def wire(msg, decoder):
        return decoder.decode(proto.encoder.encode(msg))

    job = Job(np.arange(3, dtype=np.int64), c.state, c.logits, 4, SamplingParams(), 0, False, None)
    job.blocks = []
    back = proto.job_of(wire(proto.submit(1, "m", job), proto.to_engine), c.spec, c.vocab)
    assert_same(back.state, c.state)
    assert_same(back.logits, c.logits)

    blocks = proto.blocks_out([(0, c.state, c.logits), (1, c.earlier, c.logits)])
    done = DoneEvent("length", c.earlier, c.logits, 4, "", None)
    batch = wire(
        proto.Batch(
            "m",
            proto.SchedulerStats(0, 0, 0, 0, 0, 0, 0),
            [
                proto.event_out(1, done, blocks),
                proto.event_out(2, RunDone(c.run_logits, c.batch, 0, 1)),
            ],
        ),
        proto.from_engine,
    )
    out_done, out_run = batch.events
    got_done = proto.event_in(out_done, c.spec, c.vocab)
    assert_same(got_done.state, c.earlier)
    assert_same(got_done.logits, c.logits)
    got_blocks = proto.blocks_in(out_done.blocks, c.spec, c.vocab)
    assert [i for i, _, _ in got_blocks] == [0, 1]
    for (_, s, lg), want in zip(got_blocks, (c.state, c.earlier), strict=True):
        assert_same(s, want)
        assert_same(lg, c.logits)
    got_run = proto.event_in(out_run, c.spec, c.vocab)
    assert_same(got_run.state, c.batch)
    assert_same(got_run.logits, c.run_logits)

    ids = np.zeros((len(arrays_of(c.batch)[0]), 2), np.int64)
    run = proto.run_job_of(wire(proto.run(3, "m", RunJob(ids, c.batch, None)), proto.to_engine), c.spec)
    assert_same(run.state, c.batch)


def test_a_checkpoint_of_other_shapes_is_refused_not_misread():
    """Checkpoints are stored with the record's shapes: one of other shapes would read back as
    garbage, so writing it fails instead."""
    state = np.ones((2, 8), np.float32)
    rec = record(Case(StateSpec.single((2, 8)), state, state, state[None], state[0], state[None, None]))
    odd = replace(rec.checkpoints[0], state=np.ones((2, 4), np.float32))
    bad = replace(rec, checkpoints=(odd, rec.checkpoints[1]))
    with pytest.raises(StateSizeError, match="checkpoint 0"):
        redis_store.encode(bad)
    with pytest.raises(StateSizeError, match="checkpoint 0"):
        sqlite_store.encode(bad, 60.0)


# -- today's byte layout, unchanged --


def test_one_tensor_bytes_are_plain_little_endian_float32():
    state = np.array([[1.0, -2.0, 0.5], [np.inf, -0.0, 1e-45]], np.float32)
    golden = struct.pack("<6f", 1.0, -2.0, 0.5, math.inf, -0.0, 1e-45)
    assert to_bytes(state) == golden
    assert to_bytes(state.astype(">f4")) == golden  # a big-endian array is written little-endian
    assert to_bytes(np.asfortranarray(state)) == golden  # C order, whatever the array's
    assert_same(StateSpec.single((2, 3)).from_bytes(golden), state)


def test_stored_and_sent_bytes_are_what_earlier_versions_wrote():
    rng = np.random.default_rng(11)
    state, earlier = (rng.standard_normal((2, 8)).astype(np.float32) for _ in range(2))
    state.flat[:4] = [np.nan, np.inf, -0.0, 1e-45]
    logits = rng.standard_normal(28).astype(np.float32)
    c = Case(StateSpec.single((2, 8)), state, earlier, state[None], logits, logits[None, None])
    rec = record(c)

    def old(a: np.ndarray) -> bytes:
        return np.asarray(a, "<f4").tobytes()

    fields = redis_store.encode(rec)
    f = dict(zip(fields[::2], fields[1::2], strict=True))
    assert f["state"] == old(state) and f["state_shape"] == "2,8"
    assert f["logits"] == old(logits) and f["logits_shape"] == "28"
    head = struct.Struct("<IQd?")
    cps = [
        head.pack(k.turn, k.tokens_seen, k.committed, k.logits is not None)
        + old(k.state)
        + (b"" if k.logits is None else old(k.logits))
        for k in rec.checkpoints
    ]
    assert f["checkpoints"] == b"".join(cps)

    row = dict(zip(sqlite_store.COLUMNS, sqlite_store.encode(rec, 60.0), strict=True))
    assert (row["state"], row["state_shape"], row["logits"], row["vocab"]) == (
        old(state),
        "2,8",
        old(logits),
        28,
    )
    assert row["checkpoints"] == b"".join(cps)

    blob = seal(Snapshot("m", "ab" * 32, 9, state, logits, 1.0), KEYS, now=2.0)
    _, _, header_len, body_len = struct.unpack_from("<8sHII", blob)
    header = json.loads(blob[18 : 18 + header_len])
    assert header["state_shape"] == [2, 8] and header["logits"] == 28
    assert blob[18 + header_len : 18 + header_len + body_len] == old(state) + old(logits)

    assert Entry(state, logits).to_bytes() == old(state) + old(logits)
    job = Job(np.arange(3, dtype=np.int64), state, logits, 4, SamplingParams(), 0, False, None)
    msg = proto.submit(1, "m", job)
    assert (msg.state, msg.logits) == (old(state), old(logits))
    assert proto.run(1, "m", RunJob(np.zeros((1, 2), np.int64), state[None], None)).state == old(state)


def test_spec_of_a_model_is_the_contracts_state():
    meta = ModelMetadata("m", ("a", "b", "c"), hidden_size=8, num_layers=2)
    dtype, (_batch, *shape) = meta.expected_shapes()["state"]
    spec = StateSpec.of(meta)
    assert dtype == "float32" and spec.shapes == (tuple(shape),) and spec.tensors[0].name == "state"
    assert spec.describe() == "2,8" and spec.to_json() == [2, 8]
