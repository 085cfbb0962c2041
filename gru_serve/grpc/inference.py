"""The Open Inference Protocol (KServe v2) gRPC service, with Triton's extensions, so that
tritonclient.grpc, KServe clients and grpcurl work with gru-serve as with Triton. Each method
delegates to the protocol's data plane (gru_serve.oip.dataplane: the models, parameters,
statistics and repository it serves); what is gRPC's own is here.

ModelStreamInfer: a generation model's responses come as they are ready (Triton's decoupled
streaming); a failed request is one message with `error_message` ("[CODE] message") and the
stream stays open. Responses of non-decoupled requests on a stream come in request order;
requests of one sequence run one after another in arrival order.

Errors: unary methods end with the status of gru_serve.grpc.status's table.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gru_serve.grpc.auth import caller_of, owner_of
from gru_serve.grpc.generated.inference import grpc_service_pb2 as pb
from gru_serve.grpc.generated.inference import grpc_service_pb2_grpc as pb_grpc
from gru_serve.grpc.status import grpc_errors
from gru_serve.oip.dataplane import DataPlane
from gru_serve.oip.tensors import FINAL
from gru_serve.ops import errors

MAX_INFLIGHT_PER_STREAM = 64
STREAM_QUEUE = 64


def error_message(e: BaseException) -> str:
    code, _, message = errors.public(e)
    return f"[{code}] {message}"


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
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    # -- health and metadata --

    @grpc_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready)

    @grpc_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    @grpc_errors
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.dataplane.server_metadata())

    @grpc_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        return self.dataplane.model_metadata(request.name, request.version)

    @grpc_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.dataplane.model_config(request.name, request.version))

    @grpc_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context
    ) -> pb.ModelStatisticsResponse:
        return self.dataplane.statistics(request.name, request.version)

    # -- the model repository --

    @grpc_errors
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context
    ) -> pb.RepositoryIndexResponse:
        return self.dataplane.repository_index(request.ready)

    @grpc_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context
    ) -> pb.RepositoryModelLoadResponse:
        await self.dataplane.load_model(caller_of(context), request.model_name, list(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context
    ) -> pb.RepositoryModelUnloadResponse:
        # unload_dependents means nothing here: a model has no dependents.
        await self.dataplane.unload_model(caller_of(context), request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- inference --

    @grpc_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        return await self.dataplane.infer(request, owner_of(context))

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
                ep = self.dataplane.endpoint(request.model_name, request.model_version)
                if ep.generate:
                    async for resp in self.dataplane.generate_stream(ep, request, owner):
                        await st.out.put(pb.ModelStreamInferResponse(infer_response=resp))
                    return
                resp = await self.dataplane.infer_on(ep, request, owner)
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
                key = self.dataplane.sequence_key(request, owner)
                ep = self.dataplane.endpoints.get(request.model_name)
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
