"""The prefix cache's glue: a zero-state job starts after the longest cached prefix of its
prompt (this replica's, or the shared tier's), and the block states its prefill makes are kept
and shared."""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from gru_serve.engine.api import Job, ModelRuntime
from gru_serve.engine.prefix_cache import Entry, PrefixCache, SharedBlocks, block_keys
from gru_serve.ops.errors import Unavailable
from gru_serve.ops.settings import Settings
from gru_serve.prefill import BLOCK
from gru_serve.state import StateSpec
from gru_serve.stores.sessions import SessionRecord, SessionStore

log = logging.getLogger(__name__)


class Prefixes:
    def __init__(self, settings: Settings, store: SessionStore) -> None:
        self.settings = settings
        self.cache = PrefixCache(int(settings.prefix_cache_mb * 2**20))
        # With the Redis store, replicas share prefix states through it as well.
        shared = self.cache.on and settings.prefix_redis_mb > 0 and isinstance(store, SharedBlocks)
        self.shared: SharedBlocks | None = store if shared else None
        self._sharing: set[asyncio.Task] = set()

    async def start(self, rt: ModelRuntime, rec: SessionRecord, ids: list[int], job: Job) -> list[str]:
        """Mark a job that prefills from the zero state as chunked and start it after its cached
        prefix; the prompt's block keys (none where nothing is looked up)."""
        if not (ids and rec.tokens_seen == 0 and rec.logits is None and not rec.state.any()):
            return []
        job.chunked = True  # with the cache off too: both must run the same chunks
        if not self.cache.on:
            return []
        # Scoped to the owner, one token's hits never tell it what another sent.
        scope = rec.owner if self.settings.prefix_cache_scope == "owner" else ""
        keys = block_keys(rt.model_hash, ids, scope)
        job.blocks = []
        await self.reuse(rt, job, keys)
        return keys

    async def reuse(self, rt: ModelRuntime, job: Job, keys: list[str]) -> None:
        """Start the job after the longest cached prefix of its prompt: this replica's, or a
        longer one from the shared tier."""
        if not keys:
            return  # under one block: nothing to look up, and not counted
        cache = self.cache
        n, entry = cache.longest(keys)
        if n < len(keys) and self.shared is not None:
            try:
                found = await self.shared.get_prefix_blocks(keys[n:])
            except Unavailable as e:
                # Readiness already reports an unreachable store; the request goes on without it.
                log.debug("prefix cache: shared tier not read: %s", e)
                found = []
            spec = StateSpec.of(rt.metadata)
            for i in reversed(range(len(found))):
                got = Entry.from_bytes(found[i], spec, rt.metadata.vocab_size) if found[i] else None
                if got is not None:
                    n, entry = n + i + 1, got
                    cache.put(keys[n - 1], got)
                    break
        cache.count(n)
        if entry is not None:
            job.offset = n * BLOCK
            job.state, job.logits = entry.state.copy(), entry.logits.copy()

    def keep(self, blocks: list[tuple[int, np.ndarray, np.ndarray]], keys: list[str]) -> None:
        """Cache the block states a prefill made; share them in the background (the request
        does not wait for Redis)."""
        entries = {keys[i]: Entry(state, logits) for i, state, logits in blocks}
        for key, entry in entries.items():
            self.cache.put(key, entry)
        if self.shared is not None:
            data = {key: entry.to_bytes() for key, entry in entries.items()}
            task = asyncio.create_task(_share(self.shared, data))
            self._sharing.add(task)
            task.add_done_callback(self._sharing.discard)


async def _share(shared: SharedBlocks, data: dict[str, bytes]) -> None:
    try:
        await shared.put_prefix_blocks(data)
    except Unavailable as e:
        log.debug("prefix cache: shared tier not written: %s", e)
