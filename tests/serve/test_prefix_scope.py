"""The prefix cache scoped to the token (--prefix-cache-scope owner, the default): one token's
prompt never reuses the prefix states of another's, in the local cache and through Redis, so
its time to first token tells it nothing of what others sent; scope shared reuses them.
Observed through the server's prefix-cache lookup metrics, not through timing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from gru_serve.bench.topology import RedisServer
from gru_serve.client import Client
from gru_serve.prefill import BLOCK
from tests.support.serving import start_server, wait_until

TEXT = (Path(__file__).parents[2] / "exporters" / "data" / "timemachine.txt").read_text()
TOKENS = ("alice-token", "bob-token")


def lookups(srv) -> dict[str, float]:
    """gru_serve_prefix_cache_lookups_total by result, as the metrics endpoint serves them."""
    text = generate_latest(srv.server.metrics.registry).decode()
    found = re.findall(r'^gru_serve_prefix_cache_lookups_total\{result="(\w+)"\} (\S+)$', text, re.M)
    return {"hit": 0.0, "miss": 0.0, **{k: float(v) for k, v in found}}


def generate(srv, token: str, prompt: str) -> list[int]:
    with Client(srv.target, token=token) as c:
        return [t.id for msg in c.generate(prompt, max_new_tokens=8) for t in msg.tokens]


def prompt(i: int) -> str:
    """About 5 blocks of text of its own per test."""
    return TEXT[4000 * i : 4000 * i + 5 * BLOCK + 20]


@pytest.fixture(scope="module")
def scoped() -> Iterator:
    srv = start_server(auth_tokens=TOKENS)
    yield srv
    srv.stop()


def test_another_tokens_same_prompt_gets_no_cache_hit(scoped):
    alice, bob = TOKENS
    before = lookups(scoped)
    first = generate(scoped, alice, prompt(1))
    assert lookups(scoped) == {"hit": before["hit"], "miss": before["miss"] + 1}
    assert generate(scoped, bob, prompt(1)) == first  # the same text, prefilled anew
    assert lookups(scoped) == {"hit": before["hit"], "miss": before["miss"] + 2}
    assert generate(scoped, alice, prompt(1)) == first  # alice's own prefix is reused
    assert lookups(scoped) == {"hit": before["hit"] + 1, "miss": before["miss"] + 2}


def test_with_scope_shared_another_token_hits():
    srv = start_server(auth_tokens=TOKENS, prefix_cache_scope="shared")
    try:
        alice, bob = TOKENS
        first = generate(srv, alice, prompt(2))
        assert generate(srv, bob, prompt(2)) == first
        assert lookups(srv) == {"hit": 1, "miss": 1}
    finally:
        srv.stop()


def test_the_redis_tier_is_scoped_too(tmp_path):
    """Two replicas on one Redis: bob on replica b misses alice's prefix that replica a shared,
    while alice herself on b reads it from Redis."""
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    a = b = None
    try:
        a = start_server(session_store=redis_server.url, auth_tokens=TOKENS)
        b = start_server(session_store=redis_server.url, auth_tokens=TOKENS)
        alice, bob = TOKENS
        first = generate(a, alice, prompt(3))
        blocks = len(a.service.runtime("").tokenizer.encode(prompt(3))) // BLOCK

        def shared() -> bool:
            with redis_server.client() as c:
                return len(c.keys("gru:pfx:*")) == blocks

        wait_until(shared)
        assert generate(b, bob, prompt(3)) == first
        assert lookups(b) == {"hit": 0, "miss": 1}
        assert generate(b, alice, prompt(3)) == first
        assert lookups(b) == {"hit": 1, "miss": 1}
    finally:
        for srv in (a, b):
            if srv is not None:
                srv.stop()
        redis_server.stop()
