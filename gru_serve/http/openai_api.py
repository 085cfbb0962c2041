"""OpenAI-compatible completions: the API the unmodified `openai` client speaks.

Endpoints (JSON; errors are OpenAI-shaped `{"error": {"message", "type", "code", "param"}}`
with the status of gru_serve.ops.errors.STATUS):

GET /v1/models
    `{"object": "list", "data": [{"id", "object": "model", "created", "owned_by": "gru-serve"}]}`;
    `created` is when this server started (unix seconds).
GET /v1/models/{id}
    One of those objects; 404 for a model this server does not serve.
POST /v1/completions
    A completion of one prompt, as gru_serve.v1 Generate runs it (same engine, same sessions,
    same defaults except where OpenAI's API defines its own):

    model        a served model's name; "" or absent: the server's default model
    prompt       a string, or a list holding exactly one string ("" continues a session)
    max_tokens   default settings.default_new_tokens, at most settings.max_new_tokens
    temperature  OpenAI's default 1.0 when omitted (gRPC's is 0); 0 is greedy
    top_p, seed  as gRPC's sampling; no seed: a random one (reported in the extension object).
                 temperature and top_p are taken at gRPC's float32 precision (as every
                 transport's gru_serve.sampling.SamplingParams), so a request samples the
                 same tokens over either transport
    stop         a string or a list of up to 4 strings
    logprobs     null/0, or 1: the chosen token's log-probability (the server computes no
                 alternatives, so more than 1 is refused); the choice's `logprobs` is then
                 {tokens, token_logprobs, top_logprobs (one {token: logprob} per token),
                 text_offset (each token's character offset in the choice's text)}
    n            1..gru_serve.core.generation.MAX_CHOICES choices of one state; choice i is sampled
                 with seed + i (gRPC's fan-out). On a session the session is left unchanged:
                 gRPC's `commit` has no OpenAI field
    stream, stream_options.include_usage
    echo (false), best_of (null/1), suffix (null), logit_bias (null/{}), presence_penalty and
    frequency_penalty (0): accepted only at those values; user: ignored.
    Extensions (the openai client sends them with `extra_body`):
    session_id   continue that session, exactly as Generate with session_id (the session
                 commits the prompt and the completion)
    top_k, ...   every other sampling option by its gru_serve.sampling.SamplingParams name,
                 as gRPC's sampling (top_k: 0 is no limit)
    snapshot     base64 of a session snapshot (stateless mode, as GenerateRequest.snapshot);
                 the reply's extension object then carries the snapshot after the request

    Reply: `{"id": "cmpl-…", "object": "text_completion", "created", "model", "choices":
    [{"index", "text", "logprobs", "finish_reason": "stop"|"length"}], "usage":
    {"prompt_tokens", "completion_tokens", "total_tokens"}, "gru_serve": {"session_id",
    "tokens_seen", "turn", "seed", "time_to_first_token_s", "snapshot" (when one was given)}}`.
    With n > 1 the extension object is choice 0's (choice i's seed is seed + i). Prompt tokens
    count once, whatever n: the prompt is consumed once.

    With stream=true, server-sent events: one chunk per token message of the engine,
    `{"id", "object": "text_completion", "created", "model", "choices": [{"index", "text",
    "logprobs", "finish_reason": null}]}`; then per choice a chunk with text "" and its
    finish_reason, which carries that choice's "gru_serve" extension object; then with
    stream_options.include_usage a chunk with `"choices": []` and "usage"; then `data: [DONE]`.
    An error found before the first token is the reply's status; one after it is an `error`
    event. A client that disconnects cancels the generation, and the session is left as it was.
POST /v1/chat/completions
    Chat needs a chat template, which a model would declare in its ONNX metadata under
    `gru_serve.chat_template`. The model contract (gru_serve.contract.ModelMetadata) carries
    none yet, so no served model has one: this answers 404 naming the model.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gru_serve.core.generation import Finished, GenerateRequest, Started
from gru_serve.core.service import GenerationService
from gru_serve.http.common import HttpFront, event_stream, owner, parse_body, sse_event
from gru_serve.ops.errors import InvalidArgument, NotFound
from gru_serve.outputs import Tokens
from gru_serve.sampling import OPTIONS, SamplingParams

MAX_STOP = 4  # OpenAI's limit on stop sequences
CHAT_TEMPLATE_KEY = "gru_serve.chat_template"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI's padding against length attacks: none here


class _CompletionBody(BaseModel):
    # Strict: "5" is not a number and 1 is not true, as in OpenAI's API. Every field is
    # nullable because clients built on other SDKs send null for "the default".
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | list[str] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    seed: int | None = None
    suffix: str | None = None
    # gru-serve's extensions
    session_id: str | None = None
    snapshot: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        # Checked here, not by the union, so the message says what is wanted rather than
        # listing each member's failure.
        one = isinstance(v, list) and len(v) == 1 and isinstance(v[0], str)
        ok = v is None or isinstance(v, str) or one
        if not ok:
            raise ValueError(
                "must be a string or a list holding exactly one string "
                "(token-id prompts and several prompts per request are not supported)"
            )
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        ok = v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
        if not ok:
            raise ValueError("must be a string or a list of strings")
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"has {len(v)} strings; at most {MAX_STOP}")
        return v


# The body: OpenAI's fields above, and every other sampling option (a SamplingParams field) by
# its name, as an extension.
CompletionRequest = create_model(
    "CompletionRequest",
    __base__=_CompletionBody,
    **{
        f.name: (float | None if f.type == "float" else int | None, None)
        for f in fields(SamplingParams)
        if f.name not in _CompletionBody.model_fields
    },
)


class ChatRequest(BaseModel):
    # Only the model is read (to name it in the 404); chat's own fields are not this server's.
    model_config = ConfigDict(extra="allow")

    model: str | None = None


@dataclass(frozen=True)
class Plan:
    """A completions body as the engine's request and how to answer it."""

    req: GenerateRequest
    n: int
    stream: bool
    include_usage: bool
    snapshot: bool  # stateless mode: the reply carries the new snapshot


def unsupported(body: CompletionRequest) -> str:
    """Why a field OpenAI defines but this server does not implement is refused ('' if none)."""
    if body.echo:
        return "echo: only false is supported (the reply never repeats the prompt)"
    if body.suffix is not None:
        return "suffix: not supported (the models continue text; they cannot fill in before a suffix)"
    if body.best_of not in (None, 1):
        return "best_of: only 1 is supported (n gives several choices)"
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            return f"{name}: only 0 is supported (the sampler applies no penalties)"
    if body.logit_bias:
        return "logit_bias: not supported (the sampler applies no biases); send null or {}"
    if body.stream_options is not None and not body.stream:
        return "stream_options: only allowed when stream is true"
    return ""


def plan(body: CompletionRequest, service: GenerationService) -> Plan:
    """Every field checked; a bad one raises InvalidArgument naming it."""
    if why := unsupported(body):
        raise InvalidArgument(why)
    # max_tokens and n are checked where every transport's requests are (the core's
    # GenerateRequest), with one message each.
    n = 1 if body.n is None else body.n
    logprobs = body.logprobs or 0
    if logprobs < 0:
        raise InvalidArgument(f"logprobs must be 0 or 1, got {logprobs}")
    if logprobs > 1:
        raise InvalidArgument(
            f"logprobs: at most 1, got {logprobs}: the server returns only the chosen token's "
            "log-probability, no alternatives"
        )
    snapshot = b""
    if body.snapshot is not None:
        try:
            snapshot = base64.b64decode(body.snapshot, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InvalidArgument(f"snapshot: not base64 ({e})") from e
        if not snapshot:
            raise InvalidArgument("snapshot: empty")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    given = {name: getattr(body, name) for name in OPTIONS}
    temperature = 1.0 if body.temperature is None else body.temperature
    sampling = SamplingParams.checked(**given | {"temperature": temperature, "stop": stop})
    prompt = body.prompt[0] if isinstance(body.prompt, list) else body.prompt or ""
    req = GenerateRequest(
        session_id=body.session_id or "",
        prompt=prompt,
        max_new_tokens=body.max_tokens,
        sampling=sampling,
        return_logprobs=logprobs == 1,
        model=body.model or "",
        snapshot=snapshot,
        n=n,
    )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Plan(req, n, bool(body.stream), include_usage, body.snapshot is not None)


@dataclass
class ChoiceLog:
    """A choice's tokens so far: its text offset, and for a non-stream reply its pieces."""

    offset: int = 0
    texts: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def logprobs_json(self, texts: list[str], lps: list[float]) -> dict[str, Any]:
        """The OpenAI logprobs object of these tokens, which follow those already counted."""
        offsets = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=self.offset))
        self.offset += sum(len(t) for t in texts)
        return {
            "tokens": texts,
            "token_logprobs": lps,
            "top_logprobs": [{t: lp} for t, lp in zip(texts, lps, strict=True)],
            "text_offset": offsets if texts else [],
        }


def extension(f: Finished, with_snapshot: bool) -> dict[str, Any]:
    ext: dict[str, Any] = {
        "session_id": f.session_id,
        "tokens_seen": f.tokens_seen,
        "turn": f.turn,
        "seed": f.seed,
        "time_to_first_token_s": f.time_to_first_token_s,
    }
    if with_snapshot:
        ext["snapshot"] = base64.b64encode(f.snapshot).decode()
    return ext


def usage(ends: list[Finished]) -> dict[str, int]:
    prompt = ends[0].prompt_tokens if ends else 0
    completion = sum(f.generated_tokens for f in ends)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Completion:
    """One /v1/completions reply, whole or streamed."""

    def __init__(self, p: Plan, model: str) -> None:
        self.p = p
        self.head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion"}
        self.head.update(created=int(time.time()), model=model)
        self.logs = [ChoiceLog() for _ in range(p.n)]

    async def whole(self, events: AsyncIterator[tuple[int, Tokens | Finished]]) -> dict[str, Any]:
        ends: dict[int, Finished] = {}
        async with contextlib.aclosing(events):
            async for i, ev in events:
                if isinstance(ev, Finished):
                    ends[i] = ev
                else:
                    self.logs[i].texts += ev.texts
                    self.logs[i].logprobs += ev.logprobs or ()
        choices = []
        for i, log in enumerate(self.logs):
            lp = ChoiceLog().logprobs_json(log.texts, log.logprobs) if self.p.req.return_logprobs else None
            text = "".join(log.texts)
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": ends[i].reason})
        done = [ends[i] for i in range(self.p.n)]
        return {
            **self.head,
            "choices": choices,
            "usage": usage(done),
            "gru_serve": extension(done[0], self.p.snapshot),
        }

    def _chunk(self, choices: list[dict[str, Any]], **more: Any) -> str:
        if self.p.include_usage:
            more.setdefault("usage", None)  # as OpenAI: every chunk has the key, the last a value
        return sse_event({**self.head, "choices": choices, **more})

    def event(self, i: int, ev: Tokens | Finished) -> str:
        if isinstance(ev, Finished):
            choice = {"index": i, "text": "", "logprobs": None, "finish_reason": ev.reason}
            return self._chunk([choice], gru_serve=extension(ev, self.p.snapshot))
        lps = self.logs[i].logprobs_json(ev.texts, ev.logprobs) if ev.logprobs is not None else None
        return self._chunk([{"index": i, "text": "".join(ev.texts), "logprobs": lps, "finish_reason": None}])

    async def stream(
        self, first: tuple[int, Tokens | Finished], events: AsyncIterator[tuple[int, Tokens | Finished]]
    ) -> AsyncIterator[str]:
        ends: list[Finished] = []
        async with contextlib.aclosing(events):
            item: tuple[int, Tokens | Finished] | None = first
            while item is not None:
                i, ev = item
                if isinstance(ev, Finished):
                    ends.append(ev)
                yield self.event(i, ev)
                item = await anext(events, None)
        if self.p.include_usage:
            yield self._chunk([], usage=usage(ends))
        yield sse_event("[DONE]")


def routes(front: HttpFront) -> list[BaseRoute]:
    service = front.service
    started = int(time.time())

    def model_json(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": "gru-serve"}

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_json(n) for n in service.runtimes]})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        if name not in service.runtimes:
            served = ", ".join(service.runtimes)
            raise NotFound(f"model {name!r} is not served here; this server serves {served}")
        return JSONResponse(model_json(name))

    async def completions(request: Request) -> Response:
        p = plan(await parse_body(request, CompletionRequest), service)
        # (choice, event); closing it cancels the jobs and releases the session unchanged.
        events = service.generate(p.req, owner(request))
        # The first events are awaited here, so an error found before any token (a bad field,
        # an unknown or busy session) is the reply's status rather than an event after a 200.
        try:
            _, started = await anext(events)
            assert isinstance(started, Started)  # it names the model, for the reply's `model`
            first = await anext(events) if p.stream else None
        except BaseException:
            await events.aclose()
            raise
        reply = Completion(p, started.model)
        if not p.stream:
            return JSONResponse(await reply.whole(events))
        return event_stream(request.url.path, reply.stream(first, events))

    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatRequest)
        rt = service.runtime(body.model or "")
        raise NotFound(
            f"model {rt.name!r} declares no chat template (ONNX metadata key {CHAT_TEMPLATE_KEY!r}), "
            "so it cannot serve chat: use /v1/completions with a prompt"
        )

    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
