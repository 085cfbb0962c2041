"""Load: 256 concurrent streaming sessions for a bounded time, then everything is given back."""

import asyncio
import os
import time

import grpc

from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2_grpc as pb_grpc
from tests.support.reliability import TALLY, record

STREAMS = 256
SECONDS = float(os.environ.get("GRU_SERVE_LOAD_SECONDS", "60"))
MAX_CALLS_PER_STREAM = 2000  # the loop is bounded in count as well as in time
TOKENS_PER_CALL = 32
WARMUP_SECONDS = min(5.0, SECONDS / 4)


async def _client(stub, i: int, deadline: float, stats: dict) -> None:
    session = await stub.CreateSession(pb.CreateSessionRequest(text=f"the time traveller {i}"))
    for _ in range(MAX_CALLS_PER_STREAM):
        if time.monotonic() > deadline:
            break
        n = 0
        try:
            async for msg in stub.Generate(
                pb.GenerateRequest(session_id=session.session_id, max_new_tokens=TOKENS_PER_CALL)
            ):
                n += len(msg.tokens)
        except grpc.aio.AioRpcError as e:
            stats["errors"].append(e.code().name)
            continue
        stats["tokens"] += n
        stats["calls"] += 1
        assert n == TOKENS_PER_CALL
    await stub.DeleteSession(pb.DeleteSessionRequest(session_id=session.session_id))


def test_256_streams_held_for_a_bounded_time(server_process):
    srv = server_process()
    before = srv.metrics()
    stats = {"tokens": 0, "calls": 0, "errors": []}

    async def scenario():
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            # A warm-up under the same load, so the baseline holds what serving 256 streams needs
            # at all (buffers, arenas); a leak shows as growth over the much longer run after it.
            warmup = time.monotonic() + WARMUP_SECONDS
            await asyncio.gather(
                *(_client(stub, i, warmup, {"tokens": 0, "calls": 0, "errors": []}) for i in range(STREAMS))
            )
            warm = srv.metrics()
            halves = []
            for _ in range(2):
                deadline = time.monotonic() + SECONDS / 2
                await asyncio.gather(*(_client(stub, i, deadline, stats) for i in range(STREAMS)))
                halves.append(srv.metrics())
            return warm, halves[0]

    t0 = time.monotonic()
    warm, mid = asyncio.run(scenario())
    elapsed = time.monotonic() - t0
    assert stats["errors"] == []
    after = srv.wait_metric("gru_serve_active_streams", lambda v: v == 0)
    assert after == 0
    end = srv.metrics()
    assert (
        end["gru_serve_active_sessions"] == 0
        or srv.wait_metric("gru_serve_active_sessions", lambda v: v == 0) == 0
    )
    rss0, rss1 = warm["process_resident_memory_bytes"], end["process_resident_memory_bytes"]
    rss_mid = mid["process_resident_memory_bytes"]
    shown = f"resident memory {rss0 / 1e6:.1f} -> {rss_mid / 1e6:.1f} -> {rss1 / 1e6:.1f} MB"
    # A leak grows with the traffic served, so it shows in both halves of the run; the allocator
    # settling after the warm-up shows in the first (seen: +7% to +11%). Between samples 20 s
    # apart under this load the resident size moves by up to +-5 MB with no trend (seven samples:
    # 210, 220, 216, 217, 217, 216, 217 MB), and one CI run saw +9.7 MB over a 30 s half. The
    # second half serves about 20,000 calls, so 24 MB still fails a leak of about 1 KB a call.
    assert rss1 <= rss0 * 1.25, shown
    assert rss1 - rss_mid <= 24e6, shown
    assert end["gru_serve_threads"] == before["gru_serve_threads"]
    assert end["gru_serve_event_loop_tasks"] <= before["gru_serve_event_loop_tasks"]
    TALLY["streams held"] += STREAMS
    TALLY["tokens served"] += stats["tokens"]
    record(
        "load",
        streams=STREAMS,
        seconds=round(elapsed, 1),
        calls=stats["calls"],
        tokens=stats["tokens"],
        tokens_per_s=round(stats["tokens"] / elapsed),
        errors=len(stats["errors"]),
        rss_mb_start=round(rss0 / 1e6, 1),
        rss_mb_end=round(rss1 / 1e6, 1),
        threads=(before["gru_serve_threads"], end["gru_serve_threads"]),
    )


def test_overload_33rd_stream_is_refused_at_once_and_32_complete(server_process):
    srv = server_process("--max-streams", "32")
    n = 2000

    async def long(stub, started: asyncio.Event) -> int:
        got = 0
        async for msg in stub.Generate(pb.GenerateRequest(prompt="time traveller", max_new_tokens=n)):
            got += len(msg.tokens)
            started.set()
        return got

    async def scenario():
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            started = [asyncio.Event() for _ in range(32)]
            tasks = [asyncio.create_task(long(stub, e)) for e in started]
            await asyncio.gather(*(e.wait() for e in started))
            t0 = time.monotonic()
            try:
                async for _ in stub.Generate(pb.GenerateRequest(prompt="time", max_new_tokens=5)):
                    pass
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code, details = e.code(), e.details()
            refused_in = time.monotonic() - t0
            return code, details, refused_in, await asyncio.gather(*tasks)

    code, details, refused_in, counts = asyncio.run(scenario())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams=32" in details
    assert refused_in < 1.0
    assert counts == [n] * 32
    TALLY["streams held"] += 32
    TALLY["tokens served"] += sum(counts)
    record(
        "overload",
        streams=32,
        refused="RESOURCE_EXHAUSTED",
        refused_in_ms=round(refused_in * 1000, 1),
        completed=len(counts),
    )
