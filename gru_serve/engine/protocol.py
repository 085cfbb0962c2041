"""The messages between front-end processes and the engine process (msgpack, by msgspec).

A front end connects a ZeroMQ DEALER to the engine's ROUTER (docs/architecture.md, Processes).
It says Hello (its PROTOCOL_VERSION and the models it serves, by name and file) and gets Ready,
or Refused when the engine speaks another version (a front end may attach with --engine-address
to an engine started separately, from another install) (Hello again when its models
change; Unload when one goes); then it sends one Submit
per generation and, for one that is under way, Cancel, Pause (its client stopped reading) and
Resume. The engine answers with one Batch per front end per scheduler round: every event of
that round for that front end's generations, in order, and the scheduler's gauges as of that
round (for metrics; Stats brings them a few times a second while nothing runs). A failure
travels as its status in gru_serve.ops.errors' table (gRPC code name, HTTP status) and message,
and is rebuilt as the table's class on the front end.

A job's states and logits travel by gru_serve.state's codec, its ids as raw int64: the receiver
knows the model's shapes. A GRU's state is a few KB, so a whole session crosses in one message.
"""

from __future__ import annotations

import msgspec
import numpy as np

from gru_serve.engine.work import Job, RunJob, SchedulerStats
from gru_serve.ops import errors
from gru_serve.outputs import DoneEvent, Event, FailedEvent, RunDone, Tokens
from gru_serve.sampling import SamplingParams
from gru_serve.state import State, StateSpec, array_from_bytes, logits_from_bytes, tensors, to_bytes
from gru_serve.tokenizer import PRIME_TOKENS

# The messages' layout: raised whenever a message below changes. A Hello's version comes first,
# so that an engine can read it from a front end of any version (PROTOCOL_VERSION 1 had none).
PROTOCOL_VERSION = 2


class Hello(msgspec.Struct, tag=True, array_like=True):
    version: int  # the front end's PROTOCOL_VERSION
    models: dict[str, str]  # name -> model file


def hello_version(payload: bytes) -> int | None:
    """The protocol version of a message that reads as some version's Hello but not as this
    one's (1 for a Hello without one); None when it is not a Hello at all."""
    try:
        msg = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError:
        return None
    if not (isinstance(msg, list) and msg and msg[0] == "Hello"):
        return None
    return msg[1] if len(msg) > 2 and type(msg[1]) is int else 1


class Submit(msgspec.Struct, tag=True, array_like=True):
    rid: int
    model: str
    prompt: bytes  # int64 ids
    state: bytes  # gru_serve.state
    logits: bytes | None  # float32 [vocab]
    max_new_tokens: int
    params: SamplingParams  # whole, as the front end checked it
    position: int
    want_logprobs: bool
    prime: list[int]  # the ids the job's text stream reads first
    chunked: bool
    offset: int
    want_blocks: bool


class Unload(msgspec.Struct, tag=True, array_like=True):
    model: str


class Run(msgspec.Struct, tag=True, array_like=True):
    rid: int
    model: str
    ids: bytes  # int64 [batch, seq]
    shape: tuple[int, int]
    state: bytes  # gru_serve.state, a batch


class Cancel(msgspec.Struct, tag=True, array_like=True):
    rid: int


class Pause(msgspec.Struct, tag=True, array_like=True):
    rid: int


class Resume(msgspec.Struct, tag=True, array_like=True):
    rid: int


class Ping(msgspec.Struct, tag=True, array_like=True):
    """A front end is alive (sent every PING_EVERY_S): the engine stops the jobs of one that
    falls silent."""


PING_EVERY_S = 0.5

ToEngine = Hello | Unload | Submit | Run | Cancel | Pause | Resume | Ping


class Refused(msgspec.Struct, tag=True, array_like=True):
    """The answer to a Hello of another protocol version; nothing else is read from that front end
    until it says a Hello of this one."""

    version: int  # the engine's PROTOCOL_VERSION
    message: str


class Ready(msgspec.Struct, tag=True, array_like=True):
    boot: str  # one id per engine process: a new one after a restart
    failed: dict[str, str]  # models the engine could not load: name -> why
    providers: dict[str, str]  # the onnxruntime provider running each model it has


class TokensOut(msgspec.Struct, tag=True, array_like=True):
    rid: int
    ids: list[int]
    texts: list[str]
    index: int
    logprobs: list[float] | None
    blocks: list[tuple[int, bytes, bytes]] | None = None  # with the job's first event


class DoneOut(msgspec.Struct, tag=True, array_like=True):
    rid: int
    reason: str
    state: bytes
    logits: bytes | None
    generated: int
    stop: str
    first_token_at: float | None  # time.perf_counter(): one clock for every process of a host
    blocks: list[tuple[int, bytes, bytes]] | None = None


class FailedOut(msgspec.Struct, tag=True, array_like=True):
    rid: int
    code: str  # the error's status in gru_serve.ops.errors.STATUS: gRPC code name,
    http: int  # and HTTP status
    message: str


class RunOut(msgspec.Struct, tag=True, array_like=True):
    rid: int
    logits: bytes  # float32 [batch, seq, vocab]
    state: bytes
    start_ns: int
    end_ns: int


EventOut = TokensOut | DoneOut | FailedOut | RunOut


class Batch(msgspec.Struct, tag=True, array_like=True):
    model: str
    stats: SchedulerStats  # as of the round that made the events
    events: list[EventOut]


class Stats(msgspec.Struct, tag=True, array_like=True):
    models: dict[str, SchedulerStats]


FromEngine = Ready | Refused | Batch | Stats

encoder = msgspec.msgpack.Encoder()
to_engine = msgspec.msgpack.Decoder(ToEngine)
from_engine = msgspec.msgpack.Decoder(FromEngine)


def _bytes(a: State | None) -> bytes | None:
    return None if a is None else to_bytes(a)


def refusal(version: int) -> Refused:
    """The engine's answer to a Hello of `version`, naming both versions."""
    return Refused(
        PROTOCOL_VERSION,
        f"engine protocol version mismatch: the front end speaks version {version}, the engine "
        f"version {PROTOCOL_VERSION}; run the same gru-serve release on both sides",
    )


def submit(rid: int, model: str, job: Job) -> Submit:
    return Submit(
        rid,
        model,
        np.ascontiguousarray(job.prompt, np.int64).tobytes(),
        _bytes(job.state),
        _bytes(job.logits),
        job.max_new_tokens,
        job.params,
        job.position,
        job.want_logprobs,
        job.prime if job.prime is not None else job.prompt.tolist()[-PRIME_TOKENS:],
        job.chunked,
        job.offset,
        job.blocks is not None,
    )


def job_of(msg: Submit, spec: StateSpec, vocab: int) -> Job:
    """The engine's Job for a Submit (its emit is set by the caller); its text stream and stop
    strings are made by the scheduler."""
    logits = None if msg.logits is None else logits_from_bytes(msg.logits, vocab)
    return Job(
        np.frombuffer(msg.prompt, np.int64).copy(),
        spec.from_bytes(msg.state),
        logits,
        msg.max_new_tokens,
        msg.params,
        msg.position,
        msg.want_logprobs,
        None,
        prime=msg.prime,
        chunked=msg.chunked,
        offset=msg.offset,
        blocks=[] if msg.want_blocks else None,
    )


def blocks_out(blocks: list[tuple[int, State, np.ndarray]]) -> list[tuple[int, bytes, bytes]]:
    return [(i, _bytes(state), _bytes(logits)) for i, state, logits in blocks]


def event_out(rid: int, ev: Event, blocks: list | None = None) -> EventOut:
    if isinstance(ev, Tokens):
        return TokensOut(rid, ev.ids, ev.texts, ev.index, ev.logprobs, blocks)
    if isinstance(ev, DoneEvent):
        return DoneOut(
            rid,
            ev.reason,
            _bytes(ev.state),
            _bytes(ev.logits),
            ev.generated,
            ev.stop,
            ev.first_token_at,
            blocks,
        )
    if isinstance(ev, RunDone):
        return RunOut(rid, _bytes(ev.logits), _bytes(ev.state), ev.start_ns, ev.end_ns)
    return FailedOut(rid, *errors.status_of(ev.error), str(ev.error))


def event_in(ev: EventOut, spec: StateSpec, vocab: int) -> Event:
    if isinstance(ev, TokensOut):
        return Tokens(ev.ids, ev.texts, ev.index, ev.logprobs)
    if isinstance(ev, DoneOut):
        logits = None if ev.logits is None else logits_from_bytes(ev.logits, vocab)
        state = spec.from_bytes(ev.state)
        return DoneEvent(ev.reason, state, logits, ev.generated, ev.stop, ev.first_token_at)
    if isinstance(ev, RunOut):
        state = spec.batch_from_bytes(ev.state)
        logits = array_from_bytes(ev.logits, (len(tensors(state)[0]), -1, vocab), "logits")
        return RunDone(logits, state, ev.start_ns, ev.end_ns)
    return FailedEvent(errors.error_of(ev.code, ev.http, ev.message))


def blocks_in(
    blocks: list[tuple[int, bytes, bytes]], spec: StateSpec, vocab: int
) -> list[tuple[int, State, np.ndarray]]:
    return [(i, spec.from_bytes(s), logits_from_bytes(lg, vocab)) for i, s, lg in blocks]


def run(rid: int, model: str, job: RunJob) -> Run:
    ids = np.ascontiguousarray(job.ids, np.int64)
    return Run(rid, model, ids.tobytes(), ids.shape, _bytes(job.state))


def run_job_of(msg: Run, spec: StateSpec) -> RunJob:
    ids = np.frombuffer(msg.ids, np.int64).reshape(msg.shape).copy()
    return RunJob(ids, spec.batch_from_bytes(msg.state, msg.shape[0]), None)
