"""Generation: one request's tokens, one choice or n choices of one state (fan-out), with the
session leased while it runs and committed as it ends."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from gru_serve.core.jobs import Jobs
from gru_serve.core.limits import StreamSlots, encode
from gru_serve.core.models import ModelSet
from gru_serve.core.sessions import Sessions
from gru_serve.engine.api import ModelRuntime
from gru_serve.ops.errors import InvalidArgument
from gru_serve.ops.metrics import Metrics
from gru_serve.ops.settings import Settings
from gru_serve.outputs import DoneEvent, Tokens
from gru_serve.sampling import SamplingParams
from gru_serve.stores.sessions import SessionRecord, SessionStore

MAX_CHOICES = 16  # fan-out: most continuations one Generate samples


@dataclass(frozen=True)
class GenerateRequest:
    session_id: str = ""
    prompt: str = ""
    max_new_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_logprobs: bool = False
    model: str = ""
    snapshot: bytes = b""  # stateless mode: continue from this instead of a session
    n: int = 1  # choices of the same state; n > 1 fans out
    commit: int | None = None  # fan-out: the choice the session keeps
    best_of: bool = False  # fan-out: the session keeps the choice of highest log-probability

    def __post_init__(self) -> None:
        # The one check of n, whichever transport built the request (gRPC's unset 0 is 1 there).
        if not 1 <= self.n <= MAX_CHOICES:
            raise InvalidArgument(f"n must be in [1, {MAX_CHOICES}], got {self.n}")

    @property
    def fanned(self) -> bool:
        """Answered with one Finished per choice (ChoiceFinished), even for n = 1."""
        return self.n > 1 or self.commit is not None or self.best_of


@dataclass(frozen=True)
class Started:
    """The first event of a generation, once its model and state are found and its prompt is
    checked (an error before it is the request's status, not a stream event)."""

    model: str
    session_id: str


@dataclass(frozen=True)
class Finished:
    reason: str  # length | stop | cancelled
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float
    total_time_s: float
    normalized_prompt: str
    session_id: str
    tokens_seen: int
    stop: str
    seed: int
    turn: int = 0  # the session's turn after the request (0 for a one-off)
    snapshot: bytes = b""  # stateless mode: the snapshot after the request


@dataclass(frozen=True)
class ChoiceFinished(Finished):
    """The end of one fan-out choice."""

    committed: bool = False  # the session kept this choice
    logprob_sum: float = 0.0  # total log-probability of its generated tokens


Event = Started | Tokens | Finished


@dataclass
class Progress:
    """What a generation has done so far, kept up to date by Generation.generate, so that a
    front end that cancels a request (a Converse turn) can still report its counts."""

    session_id: str = ""
    seed: int = 0
    started: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    normalized_prompt: str = ""
    generated_tokens: int = 0
    first_token_at: float | None = None
    tokens_seen: int = 0  # the session's count before the request: a cancel leaves it so
    turn: int = 0  # likewise the session's turn

    def cancelled(self) -> Finished:
        now = time.perf_counter()
        ttft = self.first_token_at - self.started if self.first_token_at is not None else 0.0
        return Finished(
            "cancelled",
            self.prompt_tokens,
            self.generated_tokens,
            ttft,
            now - self.started,
            self.normalized_prompt,
            self.session_id,
            self.tokens_seen,
            "",
            self.seed,
            self.turn,
        )


class _Lease:
    """A request's session lease (none for a one-off): committed once, else released."""

    def __init__(self, store: SessionStore, session_id: str) -> None:
        self.store = store
        self.held = session_id

    async def commit(self, rec: SessionRecord) -> SessionRecord:
        new = await self.store.commit(rec)
        self.held = ""
        return new

    async def release(self) -> None:
        if self.held:
            await self.store.release(self.held)


async def _merged(
    streams: list[AsyncIterator[Tokens | DoneEvent]],
) -> AsyncIterator[tuple[int, Tokens | DoneEvent]]:
    """The events of several streams as they come, each with its stream's index; the first
    error ends it. One task per stream, so a stream with nothing ready never holds the others.
    The queue is bounded, so a reader that stops stops the pumps, and backpressure pauses the
    streams' jobs as it does a single stream's."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))
    end = object()

    async def pump(i: int, events: AsyncIterator[Tokens | DoneEvent]) -> None:
        try:
            async for ev in events:
                await queue.put((i, ev))
            await queue.put((i, end))
        except Exception as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, events)) for i, events in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, ev = await queue.get()
            if ev is end:
                running -= 1
            elif isinstance(ev, Exception):
                raise ev
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()  # each stream's own cleanup then cancels its job


def check_fan_out(req: GenerateRequest) -> None:
    if req.commit is not None and req.commit >= req.n:
        raise InvalidArgument(f"commit must be in [0, n) = [0, {req.n}), got {req.commit}")
    if req.commit is not None and req.best_of:
        raise InvalidArgument("best_of: give commit or best_of, not both")
    if (req.commit is not None or req.best_of) and not req.session_id:
        raise InvalidArgument("commit and best_of need a session_id (the session that keeps a choice)")
    if req.snapshot:
        raise InvalidArgument("snapshot: fan-out (n > 1) runs on a session or a one-off state")


class Generation:
    def __init__(
        self,
        models: ModelSet,
        sessions: Sessions,
        jobs: Jobs,
        slots: StreamSlots,
        metrics: Metrics,
        settings: Settings,
        clock: Callable[[], float],
    ) -> None:
        self.models = models
        self.sessions = sessions
        self.jobs = jobs
        self.slots = slots
        self.metrics = metrics
        self.settings = settings
        self.clock = clock

    def _max_new(self, req: GenerateRequest) -> int:
        s = self.settings
        max_new = s.default_new_tokens if req.max_new_tokens is None else req.max_new_tokens
        if not 0 <= max_new <= s.max_new_tokens:
            # One message for every transport: gRPC and the inference protocol say max_new_tokens,
            # OpenAI's API max_tokens.
            raise InvalidArgument(
                f"max_new_tokens / max_tokens must be in [0, {s.max_new_tokens}] (--max-new-tokens), "
                f"got {max_new}"
            )
        return max_new

    def _prompt_ids(self, rt: ModelRuntime, rec: SessionRecord, prompt: str, max_new: int) -> list[int]:
        ids = encode(self.settings, rt, prompt, "prompt")
        if not ids and rec.logits is None and max_new > 0:
            raise InvalidArgument(
                "prompt has no tokens and the session has seen no text yet: give a prompt of at least 1 token"
            )
        return ids

    def _observe(self, model: str, n: int, t0: float, last_sent: float | None) -> float:
        """Metrics for n tokens sent now (the first message's time is the TTFT); now."""
        now = time.perf_counter()
        if last_sent is None:
            self.metrics.observe_first_token(model, now - t0)
        self.metrics.observe_tokens(model, n, None if last_sent is None else now - last_sent)
        return now

    async def generate(
        self, req: GenerateRequest, owner: str = "", progress: Progress | None = None
    ) -> AsyncIterator[tuple[int, Event]]:
        """(choice, event): Started, then the tokens of each choice in chunks of those ready
        together, then each choice's Finished. One choice unless the request fans out (see
        _fan_out). The request counts once against max_streams."""
        if req.fanned:
            check_fan_out(req)
        p = progress or Progress()
        p.session_id, p.seed = req.session_id, req.sampling.seed
        max_new = self._max_new(req)
        if req.session_id and req.snapshot:
            raise InvalidArgument("session_id and snapshot: give one or the other, not both")
        with self.slots.slot(owner), contextlib.ExitStack() as held:
            lease = _Lease(self.sessions.store, "")
            try:
                rec, rt = await self.sessions.start_state(req.session_id, req.snapshot, req.model, owner)
                lease.held = req.session_id
                held.enter_context(self.models.using(rt))
                ids = self._prompt_ids(rt, rec, req.prompt, max_new)
                p.prompt_tokens, p.normalized_prompt = len(ids), rt.tokenizer.decode(ids)
                p.tokens_seen, p.turn = rec.tokens_seen, rec.turn
                yield 0, Started(rt.name, req.session_id)
                run = self._fan_out if req.fanned else self._one
                async for item in run(req, rt, rec, ids, max_new, p, lease):
                    yield item
            finally:
                await lease.release()

    async def _one(
        self,
        req: GenerateRequest,
        rt: ModelRuntime,
        rec: SessionRecord,
        ids: list[int],
        max_new: int,
        p: Progress,
        lease: _Lease,
    ) -> AsyncIterator[tuple[int, Tokens | Finished]]:
        t0, last_sent = p.started, None
        async for ev in self.jobs.events(rt, rec, ids, max_new, req.sampling, req.return_logprobs):
            if not isinstance(ev, DoneEvent):
                last_sent = self._observe(rt.name, len(ev), t0, last_sent)
                p.first_token_at = p.first_token_at or last_sent
                p.generated_tokens += len(ev)
                yield 0, ev
                continue
            keep = self.settings.max_checkpoints
            new = rec.advanced(ev.state, ev.logits, len(ids) + ev.generated, self.clock(), keep)
            if req.session_id:
                new = await lease.commit(new)
            ttft = (ev.first_token_at - t0) if ev.first_token_at else 0.0
            yield 0, Finished(
                ev.reason,
                len(ids),
                ev.generated,
                ttft,
                time.perf_counter() - t0,
                p.normalized_prompt,
                req.session_id,
                new.tokens_seen,
                ev.stop,
                req.sampling.seed,
                new.turn,
                self.sessions.seal(new) if req.snapshot else b"",
            )

    async def _fan_out(
        self,
        req: GenerateRequest,
        rt: ModelRuntime,
        rec: SessionRecord,
        ids: list[int],
        max_new: int,
        p: Progress,
        lease: _Lease,
    ) -> AsyncIterator[tuple[int, Tokens | ChoiceFinished]]:
        """n continuations of one state, batched together, choice i sampled with seed + i, so
        each equals a fork of the session generating with that seed. Yields (choice, chunk) as
        chunks come, then, once every choice has ended and the kept one is committed, each
        choice's ChoiceFinished in choice order. The session keeps choice `commit`, or with
        `best_of` the one with the highest total log-probability, or else nothing."""
        n, t0 = req.n, p.started
        # The prompt is consumed once; every choice starts where it leaves the state, at the
        # same session position, so choice i draws what a fork would with seed + i.
        start = rec
        if ids:
            async for ev in self.jobs.events(rt, rec, ids, 0, SamplingParams(), False):
                seen = rec.tokens_seen + len(ids)
                start = replace(rec, state=ev.state, logits=ev.logits, tokens_seen=seen)
        seeds = [(req.sampling.seed + i) % (1 << 64) for i in range(n)]
        # Log-probabilities are always computed: best_of and logprob_sum need them.
        streams = [
            self.jobs.events(rt, start, [], max_new, replace(req.sampling, seed=seed), True, prime=ids)
            for seed in seeds
        ]
        sums = [0.0] * n
        ends: dict[int, DoneEvent] = {}
        last_sent: float | None = None
        async with contextlib.aclosing(_merged(streams)) as events:
            async for i, ev in events:
                if isinstance(ev, DoneEvent):
                    ends[i] = ev
                    continue
                last_sent = self._observe(rt.name, len(ev), t0, last_sent)
                for lp in ev.logprobs or ():  # token by token: the same sum however packed
                    sums[i] += lp
                if not req.return_logprobs:
                    ev.logprobs = None
                yield i, ev
        commit = req.commit
        if commit is None and req.best_of:
            commit = max(range(n), key=sums.__getitem__)
        after = rec  # the session as this request leaves it
        if commit is not None:  # only with a session: checked by check_fan_out
            kept = ends[commit]
            keep = self.settings.max_checkpoints
            new = rec.advanced(kept.state, kept.logits, len(ids) + kept.generated, self.clock(), keep)
            after = await lease.commit(new)
        now = time.perf_counter()
        for i in range(n):
            ev = ends[i]
            # A one-off's "session" is the choice's own state, as in a single generation.
            seen = after.tokens_seen if req.session_id else len(ids) + ev.generated
            fin = ChoiceFinished(
                ev.reason,
                len(ids),
                ev.generated,
                (ev.first_token_at - t0) if ev.first_token_at else 0.0,
                now - t0,
                p.normalized_prompt,
                req.session_id,
                seen,
                ev.stop,
                seeds[i],
                after.turn,
                committed=i == commit,
                logprob_sum=sums[i],
            )
            yield i, fin
