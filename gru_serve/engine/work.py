"""The engine's work items: a generation (Job) and a plain model run (RunJob) as a scheduler
holds them, and a scheduler's gauges (SchedulerStats)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import numpy as np

from gru_serve.outputs import Event
from gru_serve.sampling import SamplingParams
from gru_serve.tokenizer import StopMatcher, TextStream


@dataclass(eq=False)
class RunJob:
    """A plain model run (Score, the inference protocol's ModelInfer): the exported graph over
    `ids` [batch, seq] from `state`, in chunks of at most prefill_chunk positions between
    decode rounds, queued and bounded with the generations."""

    ids: np.ndarray
    state: np.ndarray
    emit: Callable[[Event], None]
    cancelled: bool = False
    ended: bool = False
    key: int = 0
    offset: int = 0
    parts: list[np.ndarray] = field(default_factory=list)
    start_ns: int = 0

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class Job:
    """One generation request as the scheduler sees it. `emit` must be thread-safe; it gets at
    most one Tokens per round."""

    prompt: np.ndarray  # int64 token ids to consume first (may be empty)
    state: np.ndarray  # [layers, hidden]
    logits: np.ndarray | None  # [vocab] pending distribution
    max_new_tokens: int
    params: SamplingParams
    position: int  # session position of the first generated token (seeds the sampler)
    want_logprobs: bool
    emit: Callable[[Event], None]
    cancelled: bool = False
    ended: bool = False  # its last event (done or failed) is out
    generated: int = 0
    # The generation's text, token by token (Scheduler.submit makes it from the runtime's
    # tokenizer, primed with the prompt, when none is given), and its stop strings (None when
    # it has none; made from params.stop when not given).
    stream: TextStream | None = None
    stops: StopMatcher | None = None
    prime: list[int] | None = None  # the ids its text stream reads first (default: the prompt's)
    first_token_at: float | None = None
    stop_hit: str = field(default="")
    # A prompt read from the zero state is prefilled in BLOCK-token chunks from its first token
    # (gru_serve.engine.prefix_cache), whether or not a prefix came from the cache, so that a cached
    # state is bit for bit what the skipped chunks would have made.
    chunked: bool = False
    offset: int = 0  # prompt tokens consumed so far (a cached prefix, then each chunk)
    # With the prefix cache on: (block index, state, logits) after each whole block prefilled.
    blocks: list[tuple[int, np.ndarray, np.ndarray]] | None = None
    # Its consumer is behind: written only by Scheduler.pause and Scheduler.resume. A paused job
    # sits out the rounds with its state kept on the job.
    paused: bool = False
    key: int = 0  # its id between a front end and the engine process (gru_serve.engine.client)

    def cancel(self) -> None:
        self.cancelled = True


class SchedulerStats(msgspec.Struct, array_like=True):
    """A scheduler's gauges (for metrics), as of its last round."""

    last_batch_size: int
    peak_batch_size: int
    queue_depth: int
    active: int
    paused: int
    pauses: int
    decoders: int
