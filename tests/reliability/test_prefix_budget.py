"""The shared prefix tier under its own byte budget (--prefix-redis-mb): 1,000 long distinct
prompts through a real redis-server with the shipped eviction policy keep the prefix blocks
under the budget while every session created before them survives and continues exactly."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gru_serve.bench.topology import DOCKER, RedisServer
from gru_serve.client import Client
from tests.support.reliability import TALLY, record
from tests.support.serving import reference_generate

TEXT = (Path(__file__).parents[2] / "exporters" / "data" / "timemachine.txt").read_text()
PROMPTS, CHARS, STRIDE = 1000, 4_000, 160  # distinct windows of the book, each its own blocks
SESSIONS, TURN = 50, 10
# The review's case scaled down 4x to keep the run short: the shipped Redis holds 512 MB and a
# 64 MB prefix budget; here Redis holds 32 MB and the tier 8 MB, and 1,000 prompts of 4,000
# characters make about 70 MB of d2l blocks (without the budget they evict every session).
MAXMEMORY = 32 * 2**20
BUDGET_MB = 8


def shipped_policy() -> str:
    """The eviction policy docker/compose.yaml and docker/kubernetes/redis.yaml give Redis."""
    found = {
        re.search(r'"--maxmemory-policy",\s*"([\w-]+)"', (DOCKER / name).read_text()).group(1)
        for name in ("compose.yaml", "kubernetes/redis.yaml")
    }
    assert len(found) == 1, found
    return found.pop()


def prefix_tier(c) -> tuple[int, int, int]:
    """(keys, their value bytes, their MEMORY USAGE plus the LRU index's) as Redis reports them."""
    keys = list(c.scan_iter("gru:pfx:*", count=10_000))
    pipe = c.pipeline(transaction=False)
    for k in keys:
        pipe.strlen(k)
        pipe.memory_usage(k, samples=0)
    sizes = pipe.execute()
    index = c.memory_usage("gru:pfx-lru", samples=0) or 0
    return len(keys), sum(sizes[0::2]), sum(sizes[1::2]) + index


def session_text(i: int) -> str:
    return TEXT[170_000 + 150 * i : 170_000 + 150 * i + 120]


def test_a_thousand_long_prompts_keep_the_prefix_tier_in_budget_and_evict_no_session(
    tmp_path, server_process, runtime
):
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    try:
        policy = shipped_policy()
        with redis_server.client() as c:
            c.config_set("maxmemory", MAXMEMORY)
            c.config_set("maxmemory-policy", policy)
        srv = server_process("--session-store", redis_server.url, "--prefix-redis-mb", str(BUDGET_MB))
        with Client(srv.target) as client:
            sessions = [client.create_session(session_text(i)).session_id for i in range(SESSIONS)]
            firsts = [client.generate_text("", session_id=s, max_new_tokens=TURN)[0] for s in sessions]

        def one(i: int) -> int:
            with Client(srv.target) as c:
                prompt = TEXT[STRIDE * i : STRIDE * i + CHARS]
                return c.generate_text(prompt, max_new_tokens=0)[1].prompt_tokens

        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            tokens = list(pool.map(one, range(PROMPTS)))
        took = time.monotonic() - started

        with Client(srv.target) as client:
            seen = [client.get_session(s).tokens_seen for s in sessions]  # none evicted
            rests = [client.generate_text("", session_id=s, max_new_tokens=TURN)[0] for s in sessions]
        for i, (first, rest) in enumerate(zip(firsts, rests, strict=True)):
            assert first + rest == reference_generate(runtime, session_text(i), 2 * TURN)
        assert seen == [len(runtime.tokenizer.encode(session_text(i))) + TURN for i in range(SESSIONS)]

        budget = BUDGET_MB * 2**20
        with redis_server.client() as c:
            stats, memory = c.info("stats"), c.info("memory")
            keys, values, usage = prefix_tier(c)
            counted = int(c.get("gru:pfx-bytes") or 0)
        assert stats["evicted_keys"] == 0  # Redis itself never had to evict anything
        assert usage <= budget and counted <= budget
        written = sum(t // 64 for t in tokens)
        block = 4 * (int(np.prod(runtime.state_shape)) + runtime.metadata.vocab_size)  # float32
        assert written * block > 4 * budget  # the prompts made far more blocks than the tier holds
        TALLY["prefix prompts"] += PROMPTS
        record(
            "Prefix tier under its budget",
            prompts=PROMPTS,
            chars_per_prompt=CHARS,
            tokens_per_prompt=round(sum(tokens) / len(tokens)),
            blocks_made=written,
            blocks_kept=keys,
            block_bytes_kept=values,
            memory_usage_bytes=usage,
            budget_bytes=budget,
            redis_maxmemory=MAXMEMORY,
            redis_policy=policy,
            redis_peak_bytes=memory["used_memory_peak"],
            redis_evicted_keys=stats["evicted_keys"],
            sessions_kept=f"{SESSIONS}/{SESSIONS}, each continued exactly",
            seconds=round(took, 1),
        )
    finally:
        redis_server.stop()
