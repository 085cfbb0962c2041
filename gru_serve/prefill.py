"""How prompts are read, shared by the engine, the prefix cache and the settings: the block of
prompt tokens (a zero-state prompt is prefilled, and its prefix states cached, in BLOCK-token
chunks) and the rule for the most prompt tokens read between two decode rounds."""

from __future__ import annotations

BLOCK = 64  # tokens per cached block (and per prefill chunk of a zero-state prompt)


def check_prefill_chunk(tokens: int) -> int:
    """`tokens` if it is a whole number of blocks (at least one), else ValueError: a chunk that
    splits a block would make prefix states no cache entry could reproduce bit for bit."""
    if tokens < BLOCK or tokens % BLOCK:
        raise ValueError(
            f"must be a positive multiple of {BLOCK} (the prefix cache's block of prompt tokens), "
            f"got {tokens}"
        )
    return tokens
