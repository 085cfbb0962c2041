"""HTTP/SSE beside gRPC: the same streaming load over both front ends of one server process,
level by level, so their tokens/s compare as a ratio from one run."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from gru_serve import launch
from gru_serve.bench import served
from gru_serve.bench.section import Context, Section, fmt, md_table, table

METHOD = (
    "One server process with both front ends. Each level runs N concurrent streams, each sending "
    "requests back to back (one-off, prompt 'time traveller', greedy, T new tokens): over gRPC, "
    "Generate from grpc.aio clients; over HTTP, POST /v1/completions with stream=true (server-sent "
    "events) from aiohttp clients, both in the benchmark's process and sharing this machine's CPUs "
    "with the server. gRPC and HTTP alternate at each level. The tokens of an SSE event are its "
    "characters, scaled so that a request's total equals the usage the server reports (the "
    "character model's tokens are characters)."
)


@dataclass(frozen=True)
class TransportConfig:
    levels: tuple[int, ...] = (1, 64)
    tokens: int = 256
    level_tokens: int = 16384
    prompt: str = "time traveller"
    level_timeout_s: float = 180.0


def mode_config(name: str) -> TransportConfig:
    if name == "tiny":
        return TransportConfig(levels=(1, 4), tokens=16, level_tokens=64, level_timeout_s=30)
    if name == "quick":
        return TransportConfig(tokens=128, level_tokens=4096, level_timeout_s=60)
    return TransportConfig()


async def _sse_request(http, url: str, cfg: TransportConfig, out: list[served.Record]) -> None:
    rec = served.Record(time.perf_counter())
    body = {
        "prompt": cfg.prompt,
        "max_tokens": cfg.tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with http.post(url, json=body) as reply:
            if reply.status != 200:
                rec.error = f"HTTP_{reply.status}"
            async for line in reply.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = chunk["error"].get("code", "ERROR")
                for choice in chunk.get("choices") or ():
                    if choice["text"]:
                        rec.arrivals.append((time.perf_counter(), len(choice["text"])))
                ext = chunk.get("gru_serve")
                if ext:
                    rec.server_ttft = ext["time_to_first_token_s"]
                usage = chunk.get("usage")
                if usage and rec.arrivals:
                    chars = sum(k for _, k in rec.arrivals)
                    tokens = usage["completion_tokens"]
                    if chars != tokens:  # a multi-character token: count the server's tokens
                        scale = tokens / chars
                        rec.arrivals = [(t, round(k * scale)) for t, k in rec.arrivals]
        rec.end = time.perf_counter()
    except Exception as e:  # a level reports its errors; one failed stream does not end it
        rec.error = type(e).__name__
    out.append(rec)


async def drive_http(base: str, concurrency: int, cfg: TransportConfig) -> dict:
    import aiohttp

    url = f"{base}/v1/completions"
    reps = max(1, math.ceil(cfg.level_tokens / (concurrency * cfg.tokens)))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await _sse_request(http, url, cfg, [])  # warm up the connection and the server
        records: list[served.Record] = []

        async def stream() -> None:
            for _ in range(reps):
                await _sse_request(http, url, cfg, records)

        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(stream() for _ in range(concurrency))), cfg.level_timeout_s
            )
        except TimeoutError:
            records.append(served.Record(t0, error="LEVEL_TIMEOUT"))
        wall = time.perf_counter() - t0
    return served.summarize(records, wall, concurrency, reps, cfg.tokens)


def run(model: Path, cfg: TransportConfig, on_level: Callable[[str], None] | None = None) -> dict:
    out: dict = {"method": METHOD, "config": asdict(cfg), "rows": []}
    load = served.LoadConfig(
        concurrency=cfg.levels,
        tokens=cfg.tokens,
        level_tokens=cfg.level_tokens,
        prompt=cfg.prompt,
        level_timeout_s=cfg.level_timeout_s,
    )
    argv = launch.serve_argv(model, "--http-port", str(launch.free_port()))  # --http-port 0: off
    try:
        with launch.Server(argv, name="transports", http=True).start() as srv:
            base = f"http://{srv.http_target}"
            for n in cfg.levels:
                if on_level:
                    on_level(f"{n} streams")
                grpc_level = asyncio.run(served.drive(srv.target, n, load))
                http_level = asyncio.run(drive_http(base, n, cfg))
                out["rows"].append(
                    {
                        "concurrency": n,
                        "grpc": grpc_level,
                        "http": http_level,
                        "ratio": http_level["tokens_per_s"] / grpc_level["tokens_per_s"]
                        if grpc_level["tokens_per_s"]
                        else None,
                    }
                )
    except (RuntimeError, OSError) as e:
        out["error"] = (str(e).splitlines() or [type(e).__name__])[0]
    return out


COLUMNS = (
    "streams",
    "gRPC tokens/s",
    "HTTP/SSE tokens/s",
    "HTTP / gRPC",
    "gRPC TTFT p50 ms",
    "HTTP TTFT p50 ms",
    "errors",
)


def rows(tr: dict) -> list[list[str]]:
    return [
        [
            str(r["concurrency"]),
            f"{r['grpc']['tokens_per_s']:,.0f}",
            f"{r['http']['tokens_per_s']:,.0f}",
            fmt(r["ratio"], ".2f"),
            fmt((r["grpc"]["ttft_ms"] or {}).get("p50"), ".2f"),
            fmt((r["http"]["ttft_ms"] or {}).get("p50"), ".2f"),
            str(r["grpc"]["errors"] + r["http"]["errors"]),
        ]
        for r in tr["rows"]
    ]


class Transports(Section):
    skip = "no_http"

    def run(self, ctx: Context) -> dict:
        label = "HTTP/SSE beside gRPC"
        ctx.step(label)
        out = {"transports": run(ctx.model, mode_config(ctx.name), lambda w: ctx.step(f"{label}: {w}"))}
        ctx.advance()
        return out

    def tables(self, results: dict, console: Console) -> None:
        tr = results.get("transports") or {}
        if tr.get("rows"):
            console.print(table("HTTP/SSE beside gRPC (one server)", COLUMNS, rows(tr)))
        if tr.get("error"):
            console.print(f"HTTP/SSE beside gRPC stopped early: {tr['error']}")

    def markdown(self, results: dict, plots: dict[str, str], prefix: str) -> list[str]:
        tr = results.get("transports") or {}
        if not tr:
            return []
        lines = [
            "## HTTP/SSE beside gRPC",
            "",
            tr["method"],
            "",
            f"T = {tr['config']['tokens']} tokens per request.",
            "",
        ]
        if tr.get("rows"):
            lines += [md_table(list(COLUMNS), rows(tr)), ""]
        if tr.get("error"):
            lines += [f"Stopped early: {tr['error']}", ""]
        return lines


SECTION = Transports()
