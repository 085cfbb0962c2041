"""Served load: N concurrent streaming clients (grpc.aio, in this process) against a server,
a sweep over N, and the latency and throughput figures of each level.

Arrival times are taken when a response message is read. A message may carry several tokens
(token packing); its tokens share its arrival time, so in the per-token inter-token latency
the first token of a message gets the gap since the previous message and the others get 0.
The gap between messages and the time per output token ((last - first arrival) / (n - 1)) are
reported beside it. The server's own TTFT and request time (from its Finished message) show how
much of the client's figures is spent outside the server's generation (gRPC, event loops).
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2_grpc as pb_grpc

STREAMS_PER_CHANNEL = 64


@dataclass(frozen=True)
class LoadConfig:
    concurrency: tuple[int, ...] = (1, 4, 16, 64, 256)
    tokens: int = 256  # generated per request (greedy)
    level_tokens: int = 16384  # each level runs at least this many tokens (requests per stream)
    prompt: str = "time traveller"
    level_timeout_s: float = 180.0


@dataclass
class Record:
    start: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    end: float = 0.0
    error: str = ""
    server_ttft: float | None = None  # the server's own view (Finished): time to first token
    server_total: float | None = None  # and the request's whole time inside the server


def baseline_argv(model: Path, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "exporters.baseline_server",
        "--port",
        "0",
        "--model",
        str(model),
        "--workers",
        str(workers),
    ]


async def _request(stub, cfg: LoadConfig, out: list[Record]) -> None:
    rec = Record(time.perf_counter())
    req = pb.GenerateRequest(prompt=cfg.prompt, max_new_tokens=cfg.tokens)
    try:
        async for msg in stub.Generate(req):
            if msg.tokens:
                rec.arrivals.append((time.perf_counter(), len(msg.tokens)))
            if msg.HasField("finished"):
                rec.server_ttft = msg.finished.time_to_first_token_s
                rec.server_total = msg.finished.total_time_s
        rec.end = time.perf_counter()
    except grpc.aio.AioRpcError as e:
        rec.error = e.code().name
    out.append(rec)


async def drive(target: str, concurrency: int, cfg: LoadConfig) -> dict:
    """One level: `concurrency` streams, each running requests back to back."""
    reps = max(1, math.ceil(cfg.level_tokens / (concurrency * cfg.tokens)))
    n_channels = max(1, math.ceil(concurrency / STREAMS_PER_CHANNEL))
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(n_channels)]
    stubs = [pb_grpc.GenerationServiceStub(ch) for ch in channels]
    try:
        await _request(stubs[0], cfg, [])  # warm up the connection and the server
        records: list[Record] = []

        async def stream(i: int) -> None:
            for _ in range(reps):
                await _request(stubs[i % n_channels], cfg, records)

        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(stream(i) for i in range(concurrency))), cfg.level_timeout_s
            )
        except TimeoutError:
            records.append(Record(t0, error="LEVEL_TIMEOUT"))
        wall = time.perf_counter() - t0
    finally:
        for ch in channels:
            await ch.close()
    return summarize(records, wall, concurrency, reps, cfg.tokens)


def percentiles(xs: list[float] | np.ndarray, scale: float = 1e3) -> dict[str, float] | None:
    if len(xs) == 0:
        return None
    a = np.asarray(xs, dtype=np.float64) * scale
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "max": float(a.max()),
    }


def summarize(records: list[Record], wall: float, concurrency: int, reps: int, tokens: int) -> dict:
    ok = [r for r in records if not r.error and r.arrivals]
    errors = Counter(r.error or "NO_TOKENS" for r in records if r.error or not r.arrivals)
    ttft, e2e, tpot, itl, gaps, per_stream = [], [], [], [], [], []
    total = messages = 0
    for r in ok:
        n = sum(k for _, k in r.arrivals)
        total += n
        messages += len(r.arrivals)
        first = r.arrivals[0][0]
        ttft.append(first - r.start)
        e2e.append(r.end - r.start)
        per_stream.append(n / (r.end - r.start))
        if n > 1:
            tpot.append((r.arrivals[-1][0] - first) / (n - 1))
        itl.extend([0.0] * (r.arrivals[0][1] - 1))
        for (prev, _), (t, k) in zip(r.arrivals, r.arrivals[1:], strict=False):
            gaps.append(t - prev)
            itl.append(t - prev)
            itl.extend([0.0] * (k - 1))
    return {
        "concurrency": concurrency,
        "requests_per_stream": reps,
        "tokens_per_request": tokens,
        "requests": len(ok),
        "errors": sum(errors.values()),
        "error_codes": dict(errors),
        "tokens": total,
        "messages": messages,
        "tokens_per_message": total / messages if messages else 0.0,
        "wall_s": wall,
        "tokens_per_s": total / wall if wall else 0.0,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "per_stream_tokens_per_s": percentiles(per_stream, 1.0),
        "ttft_ms": percentiles(ttft),
        "itl_ms": percentiles(itl),
        "message_gap_ms": percentiles(gaps),
        "tpot_ms": percentiles(tpot),
        "e2e_ms": percentiles(e2e),
        "server_ttft_ms": percentiles([r.server_ttft for r in ok if r.server_ttft is not None]),
        "server_e2e_ms": percentiles([r.server_total for r in ok if r.server_total is not None]),
    }


def sweep(target: str, cfg: LoadConfig, on_level=None, levels: tuple[int, ...] | None = None) -> list[dict]:
    out = []
    for c in levels or cfg.concurrency:
        level = asyncio.run(drive(target, c, cfg))
        out.append(level)
        if on_level:
            on_level(level)
    return out
