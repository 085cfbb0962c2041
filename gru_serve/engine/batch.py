"""The batch of a scheduler's active jobs: their state, pending logits and sampling settings in
one order, and how it is rebuilt (on the host, or on the device after a fused round) when its
members change."""

from __future__ import annotations

import numpy as np

from gru_serve.engine.device_batch import Decoder, FusedBatch
from gru_serve.engine.work import Job
from gru_serve.sampling import columns


class Batch:
    """The active jobs' state [B, L, H], pending logits [B, V] and sampling settings, in one
    order; rebuilt when the members change. With a Decoder the state may live in its
    buffers (on the GPU under CUDA) and is fetched only when needed. After a fused round the
    state stays in its FusedBatch (on the device) with the logits, and the next round's tokens
    are those the loop already drew from them (`next_tokens`): host copies of the state and
    logits are made only for the rows that need them."""

    def __init__(self, jobs: list[Job], state: np.ndarray | None, logits: np.ndarray | None) -> None:
        self.jobs = jobs
        self.host_state: np.ndarray | None = state
        self.logits = logits  # [B, V] on the host, or None while they are on the device
        self.fused: FusedBatch | None = None  # holds the state after a fused round
        self.next_tokens: np.ndarray | None = None  # the tokens drawn from the pending logits
        # Where pending logits on the device are: (the FusedBatch, its step), and per row the
        # row there (-1: a newcomer, whose logits are on its job).
        self.device_logits: tuple[FusedBatch, int] | None = None
        self.origin = np.arange(len(jobs))
        self.decoder: Decoder | None = None
        self.decoder_current = False  # the decoder holds the batch's current state
        params = [j.params for j in jobs]
        self.columns = columns(params)  # the sampler's per-row settings, by option name
        self.seeds = np.array([p.seed for p in params], np.uint64)
        self.any_sampled = bool((self.columns["temperature"] > 0).any())
        self.logprobs = [i for i, j in enumerate(jobs) if j.want_logprobs]

    def state(self) -> np.ndarray:
        if self.host_state is None:
            if self.fused is not None:
                self.host_state = self.fused.host_state()
            else:
                assert self.decoder is not None
                self.host_state = self.decoder.state()
        return self.host_state

    def logits_rows(self, rows: list[int]) -> np.ndarray:
        """The pending logits of these rows [len(rows), V], fetched from the device if there."""
        if self.logits is not None:
            return self.logits[rows]
        assert self.device_logits is not None
        fused, step = self.device_logits
        on_device = [r for r in rows if self.origin[r] >= 0]
        got = fused.rows_logits([(step, int(self.origin[r])) for r in on_device]) if on_device else None
        where = {r: i for i, r in enumerate(on_device)}
        return np.stack([got[where[r]] if r in where else self.jobs[r].logits for r in rows])

    def positions(self) -> np.ndarray:
        return np.array([j.position + j.generated for j in self.jobs], np.uint64)
