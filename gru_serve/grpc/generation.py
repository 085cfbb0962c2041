"""The native gru_serve.v1.GenerationService: a thin layer over gru_serve.core.service."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

from google.protobuf.timestamp_pb2 import Timestamp

from gru_serve.core.generation import ChoiceFinished, Finished, GenerateRequest, Progress, Started
from gru_serve.core.service import GenerationService
from gru_serve.core.sessions import SessionInfo
from gru_serve.grpc.auth import owner_of
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2_grpc as pb_grpc
from gru_serve.grpc.status import grpc_errors
from gru_serve.ops.errors import InvalidArgument
from gru_serve.outputs import Tokens
from gru_serve.sampling import SamplingParams

FINISH_REASONS = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}


def timestamp(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def session_pb(info: SessionInfo) -> pb.Session:
    return pb.Session(
        session_id=info.session_id,
        model=info.model,
        tokens_seen=info.tokens_seen,
        created=timestamp(info.created),
        last_used=timestamp(info.last_used),
        expires=timestamp(info.expires),
        turns=[
            pb.Turn(turn=t.turn, tokens_seen=t.tokens_seen, committed=timestamp(t.committed))
            for t in info.turns
        ],
    )


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    # The message's fields are SamplingParams' by name: optional scalars (unset: None) and
    # repeated ones.
    given = {}
    for f in msg.DESCRIPTOR.fields:
        if f.is_repeated:
            given[f.name] = tuple(getattr(msg, f.name))
        elif msg.HasField(f.name):
            given[f.name] = getattr(msg, f.name)
    return SamplingParams.checked(**given)


def tokens_pb(chunk: Tokens) -> list[pb.Token]:
    i, texts, ids = chunk.index, chunk.texts, chunk.ids
    if chunk.logprobs is None:
        return [pb.Token(text=texts[n], id=ids[n], index=i + n) for n in range(len(ids))]
    lps = chunk.logprobs
    return [pb.Token(text=texts[n], id=ids[n], index=i + n, logprob=lps[n]) for n in range(len(ids))]


def finished_pb(f: Finished) -> pb.Finished:
    return pb.Finished(
        reason=FINISH_REASONS[f.reason],
        prompt_tokens=f.prompt_tokens,
        generated_tokens=f.generated_tokens,
        time_to_first_token_s=f.time_to_first_token_s,
        total_time_s=f.total_time_s,
        normalized_prompt=f.normalized_prompt,
        session_id=f.session_id,
        tokens_seen=f.tokens_seen,
        stop=f.stop,
        seed=f.seed,
        snapshot=f.snapshot,
        turn=f.turn,
    )


def response_pb(choice: int, ev: Tokens | Finished) -> pb.GenerateResponse:
    """An event as a response message, marked with its choice (a single choice's 0 and a plain
    Finished's fan-out fields are proto3 defaults: not on the wire)."""
    if isinstance(ev, Tokens):
        tokens = tokens_pb(ev)
        for t in tokens:
            t.choice = choice
        return pb.GenerateResponse(tokens=tokens)
    fin = finished_pb(ev)
    fin.choice = choice
    if isinstance(ev, ChoiceFinished):
        fin.committed, fin.logprob_sum = ev.committed, ev.logprob_sum
    return pb.GenerateResponse(finished=fin)


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, service: GenerationService) -> None:
        self.service = service

    @grpc_errors
    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.Session:
        return session_pb(await self.service.create_session(request.text, request.model, owner_of(context)))

    @grpc_errors
    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.Session:
        return session_pb(await self.service.get_session(request.session_id, owner_of(context)))

    @grpc_errors
    async def DeleteSession(self, request: pb.DeleteSessionRequest, context) -> pb.DeleteSessionResponse:
        await self.service.delete_session(request.session_id, owner_of(context))
        return pb.DeleteSessionResponse()

    @grpc_errors
    async def ForkSession(self, request: pb.ForkSessionRequest, context) -> pb.Session:
        return session_pb(await self.service.fork_session(request.session_id, owner_of(context)))

    @grpc_errors
    async def RewindSession(self, request: pb.RewindSessionRequest, context) -> pb.Session:
        info = await self.service.rewind_session(request.session_id, request.turn, owner_of(context))
        return session_pb(info)

    @grpc_errors
    async def ExportSession(self, request: pb.ExportSessionRequest, context) -> pb.ExportSessionResponse:
        blob, info = await self.service.export_session(request.session_id, owner_of(context))
        return pb.ExportSessionResponse(snapshot=blob, model=info.model, tokens_seen=info.tokens_seen)

    @grpc_errors
    async def ImportSession(self, request: pb.ImportSessionRequest, context) -> pb.Session:
        return session_pb(await self.service.import_session(request.snapshot, owner_of(context)))

    def _request(
        self,
        session_id: str,
        prompt: str,
        max_new: int | None,
        sampling: pb.SamplingParams,
        logprobs: bool,
        model: str,
        snapshot: bytes = b"",
    ) -> GenerateRequest:
        return GenerateRequest(
            session_id, prompt, max_new, sampling_params(sampling), logprobs, model, snapshot
        )

    async def _stream(
        self, req: GenerateRequest, owner: str, progress: Progress | None = None
    ) -> AsyncIterator[Tokens | Finished]:
        async with contextlib.aclosing(self.service.generate(req, owner, progress)) as events:
            async for _, ev in events:
                if not isinstance(ev, Started):
                    yield ev

    @grpc_errors
    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        req = self._request(
            request.session_id,
            request.prompt,
            request.max_new_tokens if request.HasField("max_new_tokens") else None,
            request.sampling,
            request.return_logprobs,
            request.model,
            request.snapshot,
        )
        commit = request.commit if request.HasField("commit") else None
        req = dataclasses.replace(req, n=request.n or 1, commit=commit, best_of=request.best_of)
        async with contextlib.aclosing(self.service.generate(req, owner_of(context))) as events:
            async for choice, ev in events:
                if not isinstance(ev, Started):
                    yield response_pb(choice, ev)

    @grpc_errors
    async def Converse(
        self, request_iterator: AsyncIterator[pb.ConverseRequest], context
    ) -> AsyncIterator[pb.ConverseResponse]:
        owner = owner_of(context)
        out: asyncio.Queue = asyncio.Queue()
        taken = asyncio.Event()  # set each time the response side takes a message from `out`
        session_id = ""
        snapshot, model = b"", ""  # stateless mode: the snapshot after the last turn, its model
        turn: asyncio.Task | None = None

        async def send_tokens(msg: pb.ConverseResponse) -> None:
            """Queue a turn's tokens, then wait while more than two messages wait unsent: a
            client that stops reading stops the turn's stream, so backpressure pauses its job.
            Queued first, so a turn cancelled while it waits has lost nothing it counted."""
            out.put_nowait(msg)
            while out.qsize() > 2:
                taken.clear()
                await taken.wait()

        async def run_turn(req: GenerateRequest) -> None:
            nonlocal snapshot
            progress = Progress()
            try:
                # Closed here, not when collected: a turn cancelled while it waits in
                # send_tokens lets go of its job and lease before it reports Finished.
                async with contextlib.aclosing(self._stream(req, owner, progress)) as events:
                    async for ev in events:
                        if isinstance(ev, Tokens):
                            await send_tokens(pb.ConverseResponse(tokens=tokens_pb(ev)))
                        else:
                            snapshot = ev.snapshot or snapshot
                            await out.put(pb.ConverseResponse(finished=finished_pb(ev)))
            except asyncio.CancelledError:
                # A cancelled turn leaves the state as it was: so does its snapshot.
                f = dataclasses.replace(progress.cancelled(), snapshot=req.snapshot)
                await out.put(pb.ConverseResponse(finished=finished_pb(f)))
            except Exception as e:  # reported as the stream's status
                await out.put(e)

        async def read() -> None:
            nonlocal session_id, snapshot, model, turn
            async for msg in request_iterator:
                if msg.cancel:
                    if turn and not turn.done():
                        turn.cancel()
                    continue
                if turn and not turn.done():
                    await turn  # turns run one after another, in order
                if not (session_id or snapshot):
                    if msg.snapshot and msg.session_id:
                        raise InvalidArgument("session_id and snapshot: give one or the other, not both")
                    if msg.snapshot:  # stateless: no session, so no session message
                        snapshot, model = msg.snapshot, msg.model
                    else:
                        if msg.session_id:
                            info = await self.service.get_session(msg.session_id, owner)
                        else:
                            info = await self.service.create_session("", msg.model, owner)
                        session_id = info.session_id
                        await out.put(pb.ConverseResponse(session=session_pb(info)))
                elif msg.snapshot:
                    raise InvalidArgument("snapshot: only the first message of a Converse stream carries one")
                elif msg.session_id and msg.session_id != session_id:
                    raise InvalidArgument("session_id: a Converse stream stays on its first session")
                max_new = msg.max_new_tokens if msg.HasField("max_new_tokens") else 0
                req = self._request(
                    session_id, msg.text, max_new, msg.sampling, msg.return_logprobs, model, snapshot
                )
                turn = asyncio.create_task(run_turn(req))
            if turn:
                await turn
            await out.put(None)

        async def read_safely() -> None:
            try:
                await read()
            except Exception as e:
                await out.put(e)

        reader = asyncio.create_task(read_safely())
        try:
            while (item := await out.get()) is not None:
                taken.set()
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            reader.cancel()
            if turn:
                turn.cancel()

    @grpc_errors
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        r = await self.service.score(
            request.text, request.session_id, request.commit, request.model, owner_of(context)
        )
        tokens = [
            pb.TokenScore(text=text, id=t, logprob=lp)
            for text, t, lp in zip(r.token_texts, r.token_ids, r.logprobs, strict=True)
        ]
        return pb.ScoreResponse(
            perplexity=r.perplexity,
            tokens=tokens,
            normalized_text=r.normalized_text,
            tokens_seen=r.tokens_seen,
        )

    @grpc_errors
    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        m = self.service.model_info(request.model)
        s = self.service.settings
        limits = pb.Limits(
            max_prompt_chars=s.max_prompt_chars,
            max_new_tokens=s.max_new_tokens,
            max_sessions=s.max_sessions,
            session_ttl_s=s.session_ttl_s,
            max_batch_size=s.max_batch_size,
            max_queue=s.max_queue,
            max_streams_per_client=s.max_streams_per_token,
        )
        return pb.ModelInfoResponse(
            name=m.name,
            vocab=m.vocab,
            hidden_size=m.hidden_size,
            num_layers=m.num_layers,
            model_hash=m.model_hash,
            provider=m.provider,
            limits=limits,
            perplexity=m.perplexity,
            models=list(self.service.runtimes),
            default_model=self.service.default_model,
        )
