"""Prefix-state cache: the state (and pending logits) after the first whole blocks of a prompt
read from the zero state, so a prompt that starts with a cached prefix prefills only the rest.

Keys chain like vLLM's block hashes: a block's key is sha256(parent key + the block's ids), the
first block's parent being the model hash (and, scoped to an owner, the owner principal), so one
key names the model, the owner and every id up to its block's end, and a prompt's keys cost one
hash per block. Scoped keys (--prefix-cache-scope owner, the default) keep one tenant from
learning by its time to first token what another sent. Only whole blocks are cached: a
prompt's last partial block (under BLOCK tokens) is always prefilled.

Only prompts read from the zero state are keyed (one-off Generate, CreateSession with text, a
Triton sequence start on the generate endpoint): a session's later prompts start from its own
state, which the ids alone do not name.

Bit-identity: the scheduler prefills every such prompt in BLOCK-token chunks from its first
token, with the cache on or off, so a hit skips exactly the runs that made the cached state.

Local tier: LRU bounded in bytes, used on the event loop only (the service looks up before it
submits a job and stores the blocks the job's prefill made). Shared tier, with the Redis store:
entries (gru_serve.state's codec) under ``PREFIX pfx:KEY``, LRU within their own byte budget
(--prefix-redis-mb), read on a local miss and written after a prefill made new blocks
(gru_serve.stores.redis_store).
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from gru_serve.prefill import BLOCK
from gru_serve.state import DTYPE, State, StateSpec, logits_from_bytes, tensors, to_bytes

# Per entry, beside its arrays: the key, the Entry and two ndarray objects, the dict slot.
ENTRY_OVERHEAD = 512


@dataclass(frozen=True, slots=True)
class Entry:
    state: State  # gru_serve.state, as the block's last token left it
    logits: np.ndarray  # [vocab] float32, the distribution after the block's last token

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in tensors(self.state)) + self.logits.nbytes + ENTRY_OVERHEAD

    def to_bytes(self) -> bytes:
        return to_bytes(self.state) + to_bytes(self.logits)

    @classmethod
    def from_bytes(cls, data: bytes, spec: StateSpec, vocab: int) -> Entry | None:
        """None when the bytes do not fit the model (written by another model layout)."""
        if len(data) != spec.nbytes + DTYPE.itemsize * vocab:
            return None
        view = memoryview(data)
        return cls(spec.from_bytes(view[: spec.nbytes]), logits_from_bytes(view[spec.nbytes :], vocab))


def block_keys(model_hash: str, ids: list[int] | np.ndarray, owner: str = "") -> list[str]:
    """The keys of the prompt's whole blocks, in order; with an owner, keys of that owner's own
    (no other owner's prompt has them). No owner gives the shared keys."""
    arr = np.asarray(ids, dtype="<i8")
    keys: list[str] = []
    parent = model_hash.encode() + (b"\0" + owner.encode() if owner else b"")
    for end in range(BLOCK, len(arr) + 1, BLOCK):
        parent = hashlib.sha256(parent + arr[end - BLOCK : end].tobytes()).digest()
        keys.append(parent.hex())
    return keys


@runtime_checkable
class SharedBlocks(Protocol):
    """A store that shares prefix blocks between replicas (the Redis store)."""

    async def get_prefix_blocks(self, keys: list[str]) -> list[bytes | None]: ...

    async def put_prefix_blocks(self, blocks: dict[str, bytes]) -> None: ...


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = self.tokens_saved = 0
        self._entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def on(self) -> bool:
        return self.max_bytes > 0

    def longest(self, keys: list[str]) -> tuple[int, Entry | None]:
        """(blocks, entry) of the longest cached prefix among the keys; (0, None) if none. The
        prefix's cached ancestors count as used too: other prompts share them."""
        for n in range(len(keys), 0, -1):
            entry = self._entries.get(keys[n - 1])
            if entry is not None:
                for key in keys[:n]:
                    if key in self._entries:
                        self._entries.move_to_end(key)
                return n, entry
        return 0, None

    def put(self, key: str, entry: Entry) -> None:
        if entry.nbytes > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        self._entries[key] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes:
            _, gone = self._entries.popitem(last=False)
            self.bytes -= gone.nbytes

    def count(self, blocks: int) -> None:
        """One lookup's result: a hit when it found a prefix of `blocks` > 0 blocks."""
        if blocks:
            self.hits += 1
            self.tokens_saved += blocks * BLOCK
        else:
            self.misses += 1
