"""The prefix-state cache: the module's keys and byte-bounded LRU, and real servers with the
cache on and off giving the same tokens and log-probabilities, bit for bit, as each other and
the same text as the exported graph run plainly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest

from gru_serve.bench.topology import RedisServer
from gru_serve.client import Client
from gru_serve.core.sequences import Sequence
from gru_serve.engine.prefix_cache import ENTRY_OVERHEAD, Entry, PrefixCache, block_keys
from gru_serve.grpc.generated.inference import grpc_service_pb2_grpc as pb_grpc
from gru_serve.prefill import BLOCK
from gru_serve.state import StateSpec
from tests.support.oip import generate_request, text_of
from tests.support.serving import reference_generate, start_server, wait_until

TEXT = (Path(__file__).parents[2] / "exporters" / "data" / "timemachine.txt").read_text()


def prefix(i: int) -> str:
    """A 2,000-character prefix of its own for each test, so none relies on another's."""
    return TEXT[3000 * i : 3000 * i + 2000]


PREFIX = prefix(0)
SUFFIXES = [" the time traveller said", " filby became pensive", " it is simple enough", " no"]
TOKENS = 24


# -- the module --


def entry(value: float, layers: int = 1, hidden: int = 4, vocab: int = 3) -> Entry:
    return Entry(np.full((layers, hidden), value, np.float32), np.full(vocab, value, np.float32))


def test_keys_chain_whole_blocks_and_name_the_model():
    ids = list(range(20)) * 10  # 200 tokens: 3 whole blocks, 8 left over
    keys = block_keys("m1", ids)
    assert len(keys) == 3 and len(set(keys)) == 3
    assert block_keys("m1", ids[:150]) == keys[:2]  # a shared prefix shares its keys
    assert block_keys("m1", ids[:63]) == []
    assert block_keys("m2", ids)[0] != keys[0]
    changed = [*ids[:10], 99, *ids[11:]]
    assert all(a != b for a, b in zip(block_keys("m1", changed), keys, strict=True))


def test_lru_is_bounded_in_bytes():
    size = entry(0).nbytes
    assert size == 4 * (4 + 3) + ENTRY_OVERHEAD
    cache = PrefixCache(3 * size)
    for i, key in enumerate("abc"):
        cache.put(key, entry(i))
    assert cache.longest(["a"])[0] == 1  # a is now the most recently used
    cache.put("d", entry(3))
    assert len(cache) == 3 and cache.bytes == 3 * size
    assert cache.longest(["b"]) == (0, None)  # the least recently used went
    # A key names its whole prefix (a hash chain): the longest found wins, evicted parents or not.
    n, got = cache.longest(["x", "c", "d"])
    assert n == 3 and got is not None and got.state[0, 0] == 3
    cache.put("d", entry(4))  # replacing keeps the count right
    assert cache.bytes == 3 * size
    PrefixCache(size - 1).put("a", entry(0))  # larger than the whole cache: not kept, no error


def test_entry_bytes_round_trip():
    e = Entry(np.arange(8, dtype=np.float32).reshape(2, 4), np.array([-0.0, np.inf, 1e-45], np.float32))
    back = Entry.from_bytes(e.to_bytes(), StateSpec.single((2, 4)), 3)
    assert back is not None
    assert back.state.tobytes() == e.state.tobytes() and back.logits.tobytes() == e.logits.tobytes()
    assert Entry.from_bytes(e.to_bytes(), StateSpec.single((2, 4)), 4) is None


# -- served --


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple]:
    on, off = start_server(), start_server(prefix_cache_mb=0)
    yield on, off
    on.stop()
    off.stop()


def counts(srv) -> tuple[int, int, int]:
    pc = srv.service.prefix_cache
    return pc.hits, pc.misses, pc.tokens_saved


def run(srv, prompt: str = "", n: int = TOKENS, **kw) -> tuple[list[int], list[float]]:
    """Token ids and their log-probabilities (float32, compared bit for bit)."""
    ids, lps = [], []
    with Client(srv.target) as c:
        for msg in c.generate(prompt, max_new_tokens=n, logprobs=True, **kw):
            ids += [t.id for t in msg.tokens]
            lps += [t.logprob for t in msg.tokens]
    return ids, lps


def test_outputs_are_bit_identical_with_and_without_the_cache(servers, runtime):
    on, off = servers
    hits, misses, saved = counts(on)
    for suffix in SUFFIXES:
        prompt = PREFIX + suffix
        got = run(on, prompt)
        assert got == run(off, prompt)
        assert runtime.tokenizer.decode(got[0]) == reference_generate(runtime, prompt, TOKENS)
    blocks = len(runtime.tokenizer.encode(PREFIX)) // BLOCK
    assert counts(on) == (hits + len(SUFFIXES) - 1, misses + 1, saved + (len(SUFFIXES) - 1) * blocks * BLOCK)
    assert counts(off) == (0, 0, 0)
    text = generate_latest(on.server.metrics.registry).decode()
    assert f'gru_serve_prefix_cache_lookups_total{{result="hit"}} {float(counts(on)[0])}' in text
    assert on.service.prefix_cache.bytes > 0 and "gru_serve_prefix_cache_tokens_saved_total" in text


def test_a_block_aligned_prompt_is_reused_whole_and_short_ones_are_not_looked_up(servers, runtime):
    on, off = servers
    prompt = runtime.tokenizer.normalize(prefix(1))[: 2 * BLOCK]
    assert len(runtime.tokenizer.encode(prompt)) == 2 * BLOCK
    first = run(on, prompt)
    hits = counts(on)[0]
    assert run(on, prompt) == first == run(off, prompt)  # nothing left to prefill: cached logits
    assert counts(on)[0] == hits + 1
    before = counts(on)
    run(on, "time traveller")
    assert counts(on) == before


def test_create_session_and_session_turns(servers, runtime):
    on, off = servers
    prompt = prefix(2) + " and then"
    run(on, prefix(2))
    got = []
    for srv in (on, off):
        with Client(srv.target) as c:
            hits = counts(srv)[0]
            sid = c.create_session(prompt).session_id
            assert counts(srv)[0] == hits + (srv is on)  # the prefix is cached by now
            # A turn on the session starts from its own state: not keyed by its ids.
            before = counts(srv)
            got.append(run(srv, " " + TEXT[3000:3300], session_id=sid))
            assert counts(srv) == before
    assert got[0] == got[1]
    whole = prompt + " " + TEXT[3000:3300]
    assert runtime.tokenizer.decode(got[0][0]) == reference_generate(runtime, whole, TOKENS)


def test_a_triton_sequence_start_reuses_the_prefix(servers, runtime):
    on, _ = servers
    prompt = prefix(3) + " a sequence"
    run(on, prefix(3))
    hits = counts(on)[0]
    with grpc.insecure_channel(on.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = generate_request(prompt, seq=Sequence("prefixed", start=True, end=True), max_new_tokens=TOKENS)
        texts, _ = text_of(stub.ModelInfer(req))
    assert counts(on)[0] == hits + 1
    assert "".join(texts) == reference_generate(runtime, prompt, TOKENS)


def test_replicas_share_prefix_states_through_redis(tmp_path, runtime):
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    a = b = None
    try:
        a = start_server(session_store=redis_server.url)
        b = start_server(session_store=redis_server.url)
        want = run(a, PREFIX + " one")

        def written() -> bool:
            with redis_server.client() as c:
                return len(c.keys("gru:pfx:*")) == len(runtime.tokenizer.encode(PREFIX + " one")) // BLOCK

        wait_until(written)
        got = run(b, PREFIX + " two")
        assert counts(b)[:2] == (1, 0) and len(b.service.prefix_cache) == 1
        assert got == run(a, PREFIX + " two")
        assert runtime.tokenizer.decode(want[0]) == reference_generate(runtime, PREFIX + " one", TOKENS)
    finally:
        for srv in (a, b):
            if srv is not None:
                srv.stop()
        redis_server.stop()
