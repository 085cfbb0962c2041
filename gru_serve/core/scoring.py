"""Scoring a text (perplexity, per-token log-probabilities) and a model's description."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gru_serve.core.jobs import Jobs
from gru_serve.core.limits import StreamSlots, encode
from gru_serve.core.models import ModelSet
from gru_serve.core.sessions import Sessions
from gru_serve.engine.api import ModelRuntime
from gru_serve.ops.errors import InvalidArgument
from gru_serve.ops.settings import Settings
from gru_serve.scoring import perplexity, piece_logprobs
from gru_serve.stores.sessions import SessionRecord


@dataclass(frozen=True)
class ScoreResult:
    perplexity: float
    token_ids: list[int]
    token_texts: list[str]
    logprobs: list[float]
    normalized_text: str
    tokens_seen: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    vocab: tuple[str, ...]
    hidden_size: int
    num_layers: int
    model_hash: str
    provider: str
    perplexity: dict[str, float]


class Scoring:
    def __init__(
        self,
        models: ModelSet,
        sessions: Sessions,
        jobs: Jobs,
        slots: StreamSlots,
        settings: Settings,
        clock: Callable[[], float],
    ) -> None:
        self.models = models
        self.sessions = sessions
        self.jobs = jobs
        self.slots = slots
        self.settings = settings
        self.clock = clock

    async def _logprobs(
        self, rt: ModelRuntime, ids: list[int], rec: SessionRecord
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log-probabilities of `ids` from the record's state, the state after them and the
        logits after the last, in model runs of at most max_response_logits logits: a long text
        never holds [tokens x vocab] at once, only the log-probabilities are kept."""
        step = max(1, self.settings.max_response_logits // rt.metadata.vocab_size)
        state, last, scored = rec.state[None], rec.logits, []
        for start in range(0, len(ids), step):
            piece = ids[start : start + step]
            run = await self.jobs.run(rt, np.asarray([piece], np.int64), state)
            lp, last = piece_logprobs(last, piece, run.logits[0])
            scored.append(lp)
            state = run.state
        return np.concatenate(scored), state, last

    async def score(
        self, text: str, session_id: str = "", commit: bool = False, model: str = "", owner: str = ""
    ) -> ScoreResult:
        """Perplexity and per-token log-probabilities; counts against max_streams and
        max_streams_per_token as a generation stream does."""
        leased = ""
        store = self.sessions.store
        with self.slots.slot(owner), contextlib.ExitStack() as held:
            try:
                if session_id:
                    rec = await self.sessions.owned(session_id, owner, lease=commit)
                    leased = session_id if commit else ""
                    rt = self.sessions.runtime_of(rec, model)
                else:
                    if commit:
                        raise InvalidArgument("commit needs a session_id")
                    rt = self.models.runtime(model)
                    rec = self.sessions.fresh(rt, owner)
                held.enter_context(self.models.using(rt))
                ids = encode(self.settings, rt, text, "text")
                if len(ids) < (1 if rec.logits is not None else 2):
                    raise InvalidArgument(
                        f"text has {len(ids)} token(s): it must have at least 2 tokens from a fresh "
                        "state (the first is context), or 1 in a session with text"
                    )
                lp, state, last = await self._logprobs(rt, ids, rec)
                context = 0 if rec.logits is not None else 1
                scored = ids[context:]
                # Each scored token's text as it reads after the ones before (as streamed).
                stream = rt.tokenizer.stream(ids[:context])
                texts = stream.push(scored)
                texts[-1] += stream.flush()
                tokens_seen = rec.tokens_seen
                if leased:
                    keep = self.settings.max_checkpoints
                    new = await store.commit(rec.advanced(state[0], last, len(ids), self.clock(), keep))
                    leased = ""
                    tokens_seen = new.tokens_seen
                return ScoreResult(
                    perplexity(lp),
                    scored,
                    texts,
                    [float(x) for x in lp],
                    rt.tokenizer.decode(ids),
                    tokens_seen,
                )
            finally:
                if leased:
                    await store.release(leased)

    def model_info(self, model: str = "") -> ModelInfo:
        rt = self.models.runtime(model)
        m = rt.metadata
        return ModelInfo(
            rt.name,
            rt.tokenizer.tokens,
            m.hidden_size,
            m.num_layers,
            rt.model_hash,
            self.models.provider(rt),
            dict(m.perplexity),
        )
