"""The native gru_serve.v1.GenerationService: a thin layer over gru_serve.service."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from google.protobuf.timestamp_pb2 import Timestamp

from gru_serve.errors import InvalidArgument
from gru_serve.grpc.auth import owner_of
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2_grpc as pb_grpc
from gru_serve.grpc.status import grpc_errors
from gru_serve.sampling import SamplingParams
from gru_serve.scheduler import Tokens
from gru_serve.service import Finished, GenerateRequest, GenerationService, Progress, SessionInfo

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
    )


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    return SamplingParams.checked(
        temperature=msg.temperature if msg.HasField("temperature") else None,
        top_k=msg.top_k if msg.HasField("top_k") else None,
        top_p=msg.top_p if msg.HasField("top_p") else None,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
    )


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
    )


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

    def _request(
        self,
        session_id: str,
        prompt: str,
        max_new: int | None,
        sampling: pb.SamplingParams,
        logprobs: bool,
        model: str,
    ) -> GenerateRequest:
        return GenerateRequest(session_id, prompt, max_new, sampling_params(sampling), logprobs, model)

    async def _stream(
        self, req: GenerateRequest, owner: str, progress: Progress | None = None
    ) -> AsyncIterator[Tokens | Finished]:
        async with contextlib.aclosing(self.service.generate(req, owner, progress)) as events:
            async for ev in events:
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
        )
        async for ev in self._stream(req, owner_of(context)):
            if isinstance(ev, Tokens):
                yield pb.GenerateResponse(tokens=tokens_pb(ev))
            else:
                yield pb.GenerateResponse(finished=finished_pb(ev))

    @grpc_errors
    async def Converse(
        self, request_iterator: AsyncIterator[pb.ConverseRequest], context
    ) -> AsyncIterator[pb.ConverseResponse]:
        owner = owner_of(context)
        out: asyncio.Queue = asyncio.Queue()
        session_id = ""
        turn: asyncio.Task | None = None

        async def run_turn(req: GenerateRequest) -> None:
            progress = Progress()
            try:
                async for ev in self._stream(req, owner, progress):
                    if isinstance(ev, Tokens):
                        await out.put(pb.ConverseResponse(tokens=tokens_pb(ev)))
                    else:
                        await out.put(pb.ConverseResponse(finished=finished_pb(ev)))
            except asyncio.CancelledError:
                await out.put(pb.ConverseResponse(finished=finished_pb(progress.cancelled())))
            except Exception as e:  # reported as the stream's status
                await out.put(e)

        async def read() -> None:
            nonlocal session_id, turn
            async for msg in request_iterator:
                if msg.cancel:
                    if turn and not turn.done():
                        turn.cancel()
                    continue
                if turn and not turn.done():
                    await turn  # turns run one after another, in order
                if not session_id:
                    if msg.session_id:
                        info = await self.service.get_session(msg.session_id, owner)
                    else:
                        info = await self.service.create_session("", msg.model, owner)
                    session_id = info.session_id
                    await out.put(pb.ConverseResponse(session=session_pb(info)))
                elif msg.session_id and msg.session_id != session_id:
                    raise InvalidArgument("session_id: a Converse stream stays on its first session")
                max_new = msg.max_new_tokens if msg.HasField("max_new_tokens") else 0
                req = self._request(session_id, msg.text, max_new, msg.sampling, msg.return_logprobs, "")
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
