"""The Open Inference Protocol (KServe v2) gRPC service, with Triton's extensions, so that
tritonclient.grpc, KServe clients and grpcurl work with gru-serve as with Triton.

Each served model M appears twice:

- `M`: the ONNX model as Triton would serve it with implicit state. Input `input_ids` INT64
  [batch, seq], output `logits` FP32 [batch, seq, vocab]. Without sequence parameters a request
  is stateless (zero state). With `sequence_id` (uint64 or string), `sequence_start` and
  `sequence_end` it runs on that sequence's state and advances it (gru_serve.sequences: a
  sequence is a session in the native API's store, owned by the caller).
- `M-generate`: a decoupled generation model. Input `prompt` BYTES [1]; request parameters
  max_new_tokens, temperature, top_k, top_p, seed, stop (a string, or a JSON list of strings),
  and optionally the sequence parameters to continue a sequence of M. Over ModelStreamInfer each
  message of tokens ready together is one response with outputs `text` BYTES [n] (one string
  per token) and `token_ids` INT64 [n]; every response carries `triton_final_response`, and when
  the request sets `triton_enable_empty_final_response` (tritonclient's
  enable_empty_final_response=True) an empty final response (`triton_final_response: true`, with
  finish_reason, prompt_tokens, generated_tokens and tokens_seen) ends the request, as Triton
  does for decoupled models. Unary ModelInfer (which Triton refuses for decoupled models)
  returns the whole generation in one response.

Errors: unary methods end with the status of gru_serve.grpc.status's table; on ModelStreamInfer
a failed request is one message with `error_message` ("[CODE] message") and the stream stays
open. Responses of non-decoupled requests on a stream come in request order; requests of one
sequence run one after another in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import numpy as np

from gru_serve import errors
from gru_serve.contract import INPUT_IDS, LOGITS
from gru_serve.errors import InvalidArgument, NotFound
from gru_serve.grpc import model_config as triton_config
from gru_serve.grpc.auth import owner_of
from gru_serve.grpc.generated.inference import grpc_service_pb2 as pb
from gru_serve.grpc.generated.inference import grpc_service_pb2_grpc as pb_grpc
from gru_serve.grpc.generated.inference import model_config_pb2 as mc
from gru_serve.grpc.status import grpc_errors
from gru_serve.grpc.tensors import (
    EMPTY_FINAL,
    FINAL,
    MODEL_VERSION,
    PROMPT,
    TEXT,
    TOKEN_IDS,
    Endpoint,
    check_parameters,
    error_message,
    flag,
    read_inputs,
    requested_outputs,
    response,
    sampling_of,
    sequence_of,
)
from gru_serve.scheduler import Tokens
from gru_serve.sequences import Sequences, sequence_session_id
from gru_serve.service import Finished, GenerateRequest, GenerationService

SERVER_NAME = "gru-serve"
GENERATE_SUFFIX = "-generate"
EXTENSIONS = ("sequence", "model_configuration", "statistics", "parameters")
MAX_INFLIGHT_PER_STREAM = 64
STREAM_QUEUE = 64


def server_version() -> str:
    try:
        return importlib.metadata.version("gru-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class Stats:
    """Cheap per-model counters for ModelStatistics."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    inferences: int = 0
    executions: int = 0
    last_ms: int = 0

    def pb(self, name: str) -> pb.ModelStatistics:
        d = pb.StatisticDuration
        return pb.ModelStatistics(
            name=name,
            version=MODEL_VERSION,
            last_inference=self.last_ms,
            inference_count=self.inferences,
            execution_count=self.executions,
            inference_stats=pb.InferStatistics(
                success=d(count=self.success, ns=self.success_ns), fail=d(count=self.fail, ns=self.fail_ns)
            ),
        )


# -- the service --


@dataclass
class _StreamState:
    """One ModelStreamInfer call: its responses queue and the ordering of its requests."""

    out: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(STREAM_QUEUE))
    tasks: set[asyncio.Task] = field(default_factory=set)
    last_of_sequence: dict[str, asyncio.Task] = field(default_factory=dict)
    last_ordered: asyncio.Task | None = None
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_INFLIGHT_PER_STREAM))


async def _after(task: asyncio.Task | None) -> None:
    """Wait for an earlier request's task to end, whatever its outcome."""
    if task is not None:
        await asyncio.wait([task])


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: GenerationService) -> None:
        self.service = service
        self.sequences = Sequences(service)
        # The server sets this once its models are loaded and clears it when it drains.
        self.ready = False
        self.endpoints: dict[str, Endpoint] = {}
        for rt in service.runtimes.values():
            self.endpoints.setdefault(
                rt.name + GENERATE_SUFFIX, Endpoint(rt.name + GENERATE_SUFFIX, rt, True)
            )
        for rt in service.runtimes.values():  # a model's own name wins over a generation name
            self.endpoints[rt.name] = Endpoint(rt.name, rt, False)
        self.stats = {name: Stats() for name in self.endpoints}

    def endpoint(self, name: str, version: str = "") -> Endpoint:
        ep = self.endpoints.get(name)
        if ep is None:
            raise NotFound(f"model '{name}' is unknown; this server serves {', '.join(self.endpoints)}")
        if version not in ("", MODEL_VERSION):
            raise NotFound(f"model '{name}' has no version '{version}'; its version is {MODEL_VERSION}")
        return ep

    @contextlib.contextmanager
    def _timed(self, ep: Endpoint) -> Iterator[list[int]]:
        """Count a request in the model's statistics; the caller may set its batch size."""
        t0 = time.perf_counter_ns()
        stats = self.stats[ep.name]
        batch = [1]
        try:
            yield batch
        except BaseException:
            stats.fail += 1
            stats.fail_ns += time.perf_counter_ns() - t0
            raise
        stats.success += 1
        stats.success_ns += time.perf_counter_ns() - t0
        stats.inferences += batch[0]
        stats.executions += 1
        stats.last_ms = int(time.time() * 1000)

    # -- health and metadata --

    @grpc_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready)

    @grpc_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        known = request.name in self.endpoints and request.version in ("", MODEL_VERSION)
        return pb.ModelReadyResponse(ready=self.ready and known)

    @grpc_errors
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

    @grpc_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        return self.model_metadata(self.endpoint(request.name, request.version))

    def model_metadata(self, ep: Endpoint) -> pb.ModelMetadataResponse:
        tensor = pb.ModelMetadataResponse.TensorMetadata
        if ep.generate:
            inputs = [tensor(name=PROMPT, datatype="BYTES", shape=[1])]
            outputs = [
                tensor(name=TEXT, datatype="BYTES", shape=[-1]),
                tensor(name=TOKEN_IDS, datatype="INT64", shape=[-1]),
            ]
            platform = "gru_serve"
        else:
            vocab = len(ep.runtime.vocab)
            inputs = [tensor(name=INPUT_IDS, datatype="INT64", shape=[-1, -1])]
            outputs = [tensor(name=LOGITS, datatype="FP32", shape=[-1, -1, vocab])]
            platform = triton_config.PLATFORM
        return pb.ModelMetadataResponse(
            name=ep.name, versions=[MODEL_VERSION], platform=platform, inputs=inputs, outputs=outputs
        )

    def model_config(self, ep: Endpoint) -> mc.ModelConfig:
        rt, s = ep.runtime, self.service.settings
        kind = mc.ModelInstanceGroup.KIND_GPU if rt.device == "cuda" else mc.ModelInstanceGroup.KIND_CPU
        group = mc.ModelInstanceGroup(name=f"{ep.name}_{rt.device}", kind=kind, count=1)
        if not ep.generate:
            # Triton's configuration for the model, as this server runs it. Built under a
            # placeholder name: Triton's name rules are stricter than ours.
            cfg = triton_config.model_config(
                rt.metadata,
                "model",
                max_batch_size=s.max_batch_size,
                max_sequence_idle_us=max(1, int(s.session_ttl_s * 1e6)),
            )
            cfg.name = ep.name
            del cfg.instance_group[:]
            cfg.instance_group.append(group)
            return cfg
        described = {
            "base_model": rt.name,
            "request_parameters": ", ".join(ep.parameters),
            "default_new_tokens": str(s.default_new_tokens),
            "max_new_tokens": str(s.max_new_tokens),
        }
        return mc.ModelConfig(
            name=ep.name,
            backend="gru_serve",
            max_batch_size=0,
            input=[mc.ModelInput(name=PROMPT, data_type=mc.TYPE_STRING, dims=[1])],
            output=[
                mc.ModelOutput(name=TEXT, data_type=mc.TYPE_STRING, dims=[-1]),
                mc.ModelOutput(name=TOKEN_IDS, data_type=mc.TYPE_INT64, dims=[-1]),
            ],
            model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
            instance_group=[group],
            parameters={k: mc.ModelParameter(string_value=v) for k, v in described.items()},
        )

    @grpc_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.model_config(self.endpoint(request.name, request.version)))

    @grpc_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context
    ) -> pb.ModelStatisticsResponse:
        return self.statistics(request.name, request.version)

    def statistics(self, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        """One model's statistics, or every model's when name is empty."""
        names = [self.endpoint(name, version).name] if name else list(self.endpoints)
        return pb.ModelStatisticsResponse(model_stats=[self.stats[n].pb(n) for n in names])

    # -- inference --

    async def _infer(self, ep: Endpoint, request: pb.ModelInferRequest, owner: str) -> pb.ModelInferResponse:
        """One request to a model's raw endpoint: logits, on a sequence or stateless."""
        with self._timed(ep) as batch:
            check_parameters(request, ep)
            ids = read_inputs(request, ep)[INPUT_IDS]
            if ids.ndim != 2:
                raise InvalidArgument(
                    f"input '{INPUT_IDS}': shape must be [batch, seq], got {list(ids.shape)}"
                )
            requested_outputs(request, ep)
            seq = sequence_of(request)
            batch[0] = ids.shape[0]
            logits = await self.sequences.infer(ep.runtime.name, ids, seq, owner)
            return response(request, ep, {LOGITS: logits})

    async def _generation(
        self, ep: Endpoint, request: pb.ModelInferRequest, owner: str
    ) -> AsyncIterator[Tokens | Finished]:
        """A generation request's token groups then Finished, via GenerationService.generate."""
        with self._timed(ep):
            check_parameters(request, ep)
            prompt_arr = read_inputs(request, ep)[PROMPT]
            if prompt_arr.size != 1:
                raise InvalidArgument(
                    f"input '{PROMPT}' must hold one string, got shape {list(prompt_arr.shape)}"
                )
            try:
                prompt = bytes(prompt_arr.reshape(-1)[0]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidArgument(f"input '{PROMPT}' is not UTF-8 text") from e
            requested_outputs(request, ep)
            max_new, params = sampling_of(request)
            seq = sequence_of(request)
            rt = ep.runtime
            session_id = await self.sequences.session_for(rt, seq, owner) if seq else ""
            req = GenerateRequest(session_id, prompt, max_new, params, False, rt.name)
            async with contextlib.aclosing(self.service.generate(req, owner)) as events:
                async for ev in events:
                    yield ev
            if seq and seq.end:
                await self.sequences.end(session_id)

    @staticmethod
    def _tokens(chunk: Tokens | None) -> dict[str, np.ndarray]:
        texts, ids = (chunk.texts, chunk.ids) if chunk else ([], [])
        text = np.empty(len(texts), dtype=object)
        text[:] = [t.encode() for t in texts]
        return {TEXT: text, TOKEN_IDS: np.array(ids, np.int64)}

    @staticmethod
    def _finish(f: Finished) -> dict[str, bool | int | str]:
        return {
            "finish_reason": f.reason,
            "prompt_tokens": f.prompt_tokens,
            "generated_tokens": f.generated_tokens,
            "tokens_seen": f.tokens_seen,
        }

    async def _generate_unary(
        self, ep: Endpoint, request: pb.ModelInferRequest, owner: str
    ) -> pb.ModelInferResponse:
        tokens: Tokens | None = None
        finish: dict[str, bool | int | str] = {}
        async for ev in self._generation(ep, request, owner):
            if isinstance(ev, Tokens):
                if tokens is None:
                    tokens = ev
                else:
                    tokens.extend(ev)
            else:
                finish = self._finish(ev)
        return response(request, ep, self._tokens(tokens), finish)

    async def generate_stream(
        self, ep: Endpoint, request: pb.ModelInferRequest, owner: str
    ) -> AsyncIterator[pb.ModelInferResponse]:
        """A generation request's responses as they come (Triton's decoupled streaming)."""
        empty_final = flag(request, EMPTY_FINAL)
        async for ev in self._generation(ep, request, owner):
            if isinstance(ev, Tokens):
                yield response(request, ep, self._tokens(ev), {FINAL: False})
            elif empty_final:
                yield response(request, ep, {}, {FINAL: True, **self._finish(ev)})

    @grpc_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        return await self.infer(request, owner_of(context))

    async def infer(self, request: pb.ModelInferRequest, owner: str) -> pb.ModelInferResponse:
        """One unary request (either endpoint kind), whatever the transport."""
        ep = self.endpoint(request.model_name, request.model_version)
        if ep.generate:
            return await self._generate_unary(ep, request, owner)
        return await self._infer(ep, request, owner)

    # -- streaming --

    def _sequence_key(self, request: pb.ModelInferRequest, owner: str) -> str | None:
        """The session a request's sequence lives in, to run a sequence's requests in order."""
        ep = self.endpoints.get(request.model_name)
        try:
            seq = sequence_of(request)
        except errors.GruServeError:
            return None  # the request fails on its own turn
        if ep is None or seq is None:
            return None
        return sequence_session_id(owner, ep.runtime.name, seq.id)

    async def _stream_one(
        self,
        request: pb.ModelInferRequest,
        owner: str,
        st: _StreamState,
        same_sequence: asyncio.Task | None,
        ordered: asyncio.Task | None,
    ) -> None:
        """Run one request of a stream, putting its responses (or its error) on the stream."""
        try:
            await _after(same_sequence)
            try:
                ep = self.endpoint(request.model_name, request.model_version)
                if ep.generate:
                    async for resp in self.generate_stream(ep, request, owner):
                        await st.out.put(pb.ModelStreamInferResponse(infer_response=resp))
                    return
                resp = await self._infer(ep, request, owner)
                resp.parameters[FINAL].bool_param = True
                msg = pb.ModelStreamInferResponse(infer_response=resp)
            except Exception as e:
                failed = pb.ModelInferResponse(
                    id=request.id, model_name=request.model_name, model_version=request.model_version
                )
                failed.parameters[FINAL].bool_param = True
                msg = pb.ModelStreamInferResponse(error_message=error_message(e), infer_response=failed)
            await _after(ordered)
            await st.out.put(msg)
        finally:
            st.slots.release()

    @grpc_errors
    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        owner = owner_of(context)
        st = _StreamState()

        async def read() -> None:
            async for request in request_iterator:
                await st.slots.acquire()
                key = self._sequence_key(request, owner)
                ep = self.endpoints.get(request.model_name)
                ordered = ep is None or not ep.generate  # decoupled responses may interleave
                task = asyncio.create_task(
                    self._stream_one(
                        request,
                        owner,
                        st,
                        st.last_of_sequence.get(key) if key else None,
                        st.last_ordered if ordered else None,
                    )
                )
                st.tasks.add(task)
                task.add_done_callback(st.tasks.discard)
                if key:
                    st.last_of_sequence[key] = task
                    task.add_done_callback(
                        lambda t, k=key: (
                            st.last_of_sequence.pop(k) if st.last_of_sequence.get(k) is t else None
                        )
                    )
                if ordered:
                    st.last_ordered = task
            while st.tasks:
                await asyncio.wait(list(st.tasks))
            await st.out.put(None)

        async def read_safely() -> None:
            try:
                await read()
            except Exception as e:
                await st.out.put(e)

        reader = asyncio.create_task(read_safely())
        try:
            while (item := await st.out.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            reader.cancel()
            for task in list(st.tasks):
                task.cancel()
