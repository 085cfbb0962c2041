"""Many streams on one server: held at once, batched together, limits answered at once."""

import asyncio

import grpc
import pytest

from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2_grpc as pb_grpc
from tests.support.serving import LONG, start_server


async def _stream(stub, prompt: str, n: int, started: asyncio.Event | None = None) -> str:
    text = []
    async for msg in stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=n)):
        text.extend(t.text for t in msg.tokens)
        if started:
            started.set()
    return "".join(text)


async def _conversation(stub, i: int, barrier: asyncio.Barrier) -> str:
    """Two turns on one Converse stream, with every stream open at once between them."""
    call = stub.Converse()
    text = []

    async def turn(msg: pb.ConverseRequest) -> None:
        await call.write(msg)
        while not (reply := await call.read()).HasField("finished"):
            text.extend(t.text for t in reply.tokens)

    await call.write(pb.ConverseRequest(text=f"the time {i}", max_new_tokens=20))
    assert (await call.read()).HasField("session")
    while not (reply := await call.read()).HasField("finished"):
        text.extend(t.text for t in reply.tokens)
    await barrier.wait()  # 256 server-side streams are open here
    await turn(pb.ConverseRequest(text=" and", max_new_tokens=20))
    await call.done_writing()
    return "".join(text)


def test_256_concurrent_streams_are_held(server):
    async def scenario():
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            barrier = asyncio.Barrier(256)
            return await asyncio.gather(*(_conversation(stub, i, barrier) for i in range(256)))

    texts = asyncio.run(scenario())
    assert all(len(t) == 40 for t in texts)
    assert server.service.schedulers["timemachine-d2l"].stats().peak_batch_size > 32


def test_stream_limit_answers_resource_exhausted_at_once():
    srv = start_server(max_streams=2)

    async def scenario():
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            calls = [stub.Generate(pb.GenerateRequest(prompt="time", max_new_tokens=LONG)) for _ in range(2)]
            for call in calls:  # both hold a slot: read one message, then let flow control hold them
                assert (await call.read()).tokens
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(_stream(stub, "time", 5), timeout=5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_streams=2" in err.value.details()
            for call in calls:
                call.cancel()
            # The slots are free again once the streams end.
            while srv.service.active_streams:
                await asyncio.sleep(0.001)
            return await _stream(stub, "time", 5)

    try:
        assert len(asyncio.run(scenario())) == 5
    finally:
        srv.stop()


def test_full_queue_answers_resource_exhausted():
    srv = start_server(max_batch_size=1, max_queue=1)

    async def scenario():
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            started = asyncio.Event()
            running = asyncio.create_task(_stream(stub, "time", 3000, started))
            await started.wait()
            waiting = asyncio.create_task(_stream(stub, "time", 5))  # fills the queue of 1
            while srv.service.schedulers["timemachine-d2l"].stats().queue_depth < 1:
                await asyncio.sleep(0.001)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _stream(stub, "time", 5)
            assert (
                err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue" in err.value.details()
            )
            return await asyncio.gather(running, waiting)

    try:
        assert [len(t) for t in asyncio.run(scenario())] == [3000, 5]
    finally:
        srv.stop()
