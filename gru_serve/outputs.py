"""What a generation or a model run hands out, in order: Tokens chunks, then one DoneEvent or
FailedEvent (a plain run: one RunDone or FailedEvent). The engine makes them; the core and the
front ends read them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gru_serve.ops.errors import GruServeError


@dataclass(slots=True)
class Tokens:
    """Tokens of one job made together, in order: ids, their texts, the index of the first among
    the request's generated tokens, and log-probabilities when asked for. One object per job and
    round (not one per token): the per-token work on the serving path is list slicing.

    A token's text is its delta in the generation's text (gru_serve.tokenizer.TextStream): what
    it adds, "" while it ends inside a UTF-8 character; the texts of every chunk of a generation
    that ends by length concatenate to the tokenizer's decoding of all its ids (the last text
    carries whatever was held back)."""

    ids: list[int]
    texts: list[str]
    index: int
    logprobs: list[float] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, more: Tokens) -> None:
        """Append the chunk that follows this one (token packing)."""
        self.ids += more.ids
        self.texts += more.texts
        if self.logprobs is not None and more.logprobs is not None:
            self.logprobs += more.logprobs


@dataclass(frozen=True)
class DoneEvent:
    reason: str  # "length" | "stop"
    state: np.ndarray
    logits: np.ndarray | None
    generated: int
    stop: str
    first_token_at: float | None


@dataclass(frozen=True)
class FailedEvent:
    error: GruServeError


@dataclass(frozen=True)
class RunDone:
    logits: np.ndarray  # [batch, seq, vocab]
    state: np.ndarray  # [batch, layers, hidden]
    start_ns: int  # when its first model call began and its last ended (perf_counter_ns)
    end_ns: int


Event = Tokens | DoneEvent | FailedEvent | RunDone
