"""Interference: how long the running streams stall while one long prompt is prefilled.

N streams generate long outputs; once every one of them is streaming, one Generate with a long
prompt (P characters of the Time Machine text) and one new token is sent. Every message's arrival
time of the N streams is kept: the largest gap between two consecutive messages of any stream
during the long request, against the largest over an equally long window just before it. Two
servers side by side: the default prefill chunk, and a chunk larger than the prompt (the whole
prompt in one prefill, as before chunking).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from rich.console import Console

from gru_serve import launch
from gru_serve.bench.prefix import TEXT
from gru_serve.bench.section import Context, Section, fmt, goal, md_table, table
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2_grpc as pb_grpc
from gru_serve.ops.settings import Settings

# key, label, server flags
DEFAULT_CHUNK = Settings.model_fields["prefill_chunk"].default
CONFIGS = (
    ("chunked", f"default (--prefill-chunk {DEFAULT_CHUNK})", ("--prefill-chunk", str(DEFAULT_CHUNK))),
    ("whole", "whole prompt in one prefill (--prefill-chunk 16384)", ("--prefill-chunk", "16384")),
)
# without the corpus (an installed package): a sentence of the book, repeated
FILLER = "The Time Traveller (for so it will be convenient to speak of him) was expounding to us. "
METHOD = (
    "N streams (grpc.aio, one channel, in the benchmark's process) each send one greedy Generate "
    "('time traveller', T new tokens); once every stream has read its first message and S more "
    "seconds have passed, one Generate with a P-character prompt (the start of the Time Machine "
    "text) and max_new_tokens=1 goes out on a second channel. Every message's arrival time of the "
    "N streams is kept. 'during': the largest gap between two consecutive messages of any stream "
    "that overlaps [long request sent, its last message read]; 'before': the largest gap that ends "
    "within an equally long window just before it was sent (the same run's baseline: what the "
    "streams see with no long prompt). The streams are cancelled once each has a message after "
    "the long request finished. Long request: sent to its last message, on the client; the "
    "server's own TTFT (from its Finished message) beside it. The same load goes to a server with "
    "the default prefill chunk and to one whose chunk (16384) is larger than the prompt, so the "
    "whole prompt is read between two decode rounds; each in its own process."
)


@dataclass(frozen=True)
class InterferenceConfig:
    streams: int = 64
    tokens: int = 20000  # each stream's max_new_tokens: enough to outlast the long request
    prompt_chars: int = 16000
    settle_s: float = 2.0  # streaming before the long request (room for the 'before' window)
    stream_prompt: str = "time traveller"
    timeout_s: float = 60.0


def mode_config(name: str) -> InterferenceConfig:
    if name == "quick":
        return InterferenceConfig(settle_s=1.0, timeout_s=30.0)
    if name == "tiny":
        return InterferenceConfig(streams=4, prompt_chars=2000, settle_s=0.3, timeout_s=30.0)
    return InterferenceConfig()


def long_prompt(chars: int) -> str:
    text = TEXT.read_text() if TEXT.is_file() else ""
    if len(text) < chars:
        text = FILLER * (chars // len(FILLER) + 1)
    return text[:chars]


def max_gaps(
    arrivals: list[list[float]], start: float, end: float, before_s: float
) -> tuple[float | None, float | None]:
    """Largest gap between consecutive messages of any stream that overlaps [start, end], and
    the largest one that ends within [start - before_s, start] (seconds)."""
    during = before = None
    for ts in arrivals:
        for a, b in itertools.pairwise(ts):
            if b > start and a < end:
                during = max(during or 0.0, b - a)
            elif start - before_s < b <= start:
                before = max(before or 0.0, b - a)
    return during, before


async def measure(target: str, cfg: InterferenceConfig, prompt: str) -> dict:
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = grpc.aio.insecure_channel(target, options=options)
    long_channel = grpc.aio.insecure_channel(target, options=options)
    stub = pb_grpc.GenerationServiceStub(channel)
    long_stub = pb_grpc.GenerationServiceStub(long_channel)
    arrivals: list[list[float]] = [[] for _ in range(cfg.streams)]
    ended: list[float | None] = [None] * cfg.streams
    errors: list[str] = []

    async def stream(i: int) -> None:
        req = pb.GenerateRequest(prompt=cfg.stream_prompt, max_new_tokens=cfg.tokens)
        try:
            async for msg in stub.Generate(req):
                if msg.tokens:
                    arrivals[i].append(time.perf_counter())
        except grpc.aio.AioRpcError as e:
            errors.append(e.code().name)
        ended[i] = time.perf_counter()

    async def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while not cond():
            if time.perf_counter() > deadline:
                return False
            await asyncio.sleep(0.002)
        return True

    tasks: list[asyncio.Task] = []
    try:
        async for _ in stub.Generate(pb.GenerateRequest(prompt=cfg.stream_prompt, max_new_tokens=4)):
            pass  # warm up the connection and the server
        async for _ in long_stub.Generate(pb.GenerateRequest(prompt="time", max_new_tokens=1)):
            pass
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(stream(i)) for i in range(cfg.streams)]
        if not await wait_until(lambda: all(arrivals) or bool(errors), cfg.timeout_s) or errors:
            raise RuntimeError(
                f"not all {cfg.streams} streams started within {cfg.timeout_s:g} s ({', '.join(errors)})"
            )
        all_streaming = time.perf_counter()
        await asyncio.sleep(cfg.settle_s)
        sent = time.perf_counter()
        first = None
        finished_msg = None
        async for msg in long_stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=1)):
            if msg.tokens and first is None:
                first = time.perf_counter()
            if msg.HasField("finished"):
                finished_msg = msg.finished
        done = time.perf_counter()
        # let every stream stalled by the long request read its next message (closing its gap)
        await wait_until(
            lambda: all(e is not None or ts[-1] > done for ts, e in zip(arrivals, ended, strict=True)),
            min(10.0, cfg.timeout_s),
        )
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await channel.close()
        await long_channel.close()
    latency = done - sent
    before_s = min(latency, sent - all_streaming)
    during, before = max_gaps(arrivals, sent, done, before_s)
    early = sum(e is not None and e < done for e in ended)
    return {
        "long_request_ms": latency * 1e3,
        "long_ttft_ms": (first - sent) * 1e3 if first else None,
        "long_server_ttft_ms": finished_msg.time_to_first_token_s * 1e3 if finished_msg else None,
        "prompt_tokens": finished_msg.prompt_tokens if finished_msg else None,
        "max_gap_during_ms": during * 1e3 if during is not None else None,
        "max_gap_before_ms": before * 1e3 if before is not None else None,
        "before_window_ms": before_s * 1e3,
        "streams_ended_early": early,
        "stream_errors": len(errors),
        "messages": sum(map(len, arrivals)),
        "streaming_s": time.perf_counter() - t0,
    }


def run(model: Path, cfg: InterferenceConfig, on_config: Callable[[str], None] | None = None) -> dict:
    prompt = long_prompt(cfg.prompt_chars)
    # what the servers get: they inherit GRU_SERVE_* (the goal divides by it)
    budget = Settings.load().round_budget_ms
    out: dict = {"method": METHOD, "config": asdict(cfg), "round_budget_ms": budget, "rows": []}
    # the server must accept the long prompt whatever GRU_SERVE_MAX_PROMPT_* say
    limits = ["--max-prompt-chars", str(max(16384, cfg.prompt_chars))]
    limits += ["--max-prompt-tokens", str(max(16384, cfg.prompt_chars))]
    limits += ["--max-new-tokens", str(cfg.tokens)]  # the streams are cancelled long before the end
    try:
        for key, label, flags in CONFIGS:
            if on_config:
                on_config(label)
            argv = launch.serve_argv(model, *flags, *limits)
            with launch.Server(argv, name=f"interference-{key}").start() as srv:
                row = asyncio.run(measure(srv.target, cfg, prompt))
            out["rows"].append({"key": key, "what": label, "prefill_chunk": int(flags[1]), **row})
    except (RuntimeError, OSError, grpc.RpcError) as e:
        out["error"] = (str(e).splitlines() or [type(e).__name__])[0]
    return out


COLUMNS = (
    "server",
    "max gap during ms",
    "max gap before ms",
    "during / round budget",
    "long request ms",
    "its server TTFT ms",
    "prompt tokens",
)


def rows(it: dict) -> list[list[str]]:
    budget = it.get("round_budget_ms")
    out = []
    for r in it["rows"]:
        gap = r["max_gap_during_ms"]
        out.append(
            [
                r["what"],
                fmt(gap, ".1f"),
                fmt(r["max_gap_before_ms"], ".1f"),
                fmt(gap / budget if gap is not None and budget else None, ".2f"),
                fmt(r["long_request_ms"], ".1f"),
                fmt(r["long_server_ttft_ms"], ".1f"),
                fmt(r["prompt_tokens"], "d"),
            ]
        )
    return out


def interference_goal(it: dict) -> dict:
    by_key = {r["key"]: r for r in it.get("rows", [])}
    chunked, whole = by_key.get("chunked"), by_key.get("whole")
    budget = it.get("round_budget_ms")
    gap = (chunked or {}).get("max_gap_during_ms")
    note = it.get("skipped") or it.get("error") or ""
    if gap is not None and budget:
        note = (
            f"{gap:.1f} ms (before it: {fmt(chunked.get('max_gap_before_ms'), '.1f')} ms) with the default "
            f"--prefill-chunk {chunked['prefill_chunk']}, round budget {budget:g} ms"
        )
        if whole and whole.get("max_gap_during_ms") is not None:
            note += (
                f"; today's (--prefill-chunk {whole['prefill_chunk']}, the whole prompt in one prefill): "
                f"{whole['max_gap_during_ms']:.1f} ms, {whole['max_gap_during_ms'] / budget:.2f}x "
                f"(before it: {fmt(whole.get('max_gap_before_ms'), '.1f')} ms)"
            )
    return goal(
        "interference: largest gap of 64 streams while a 16,000-character prompt is prefilled / round budget",
        gap / budget if gap is not None and budget else None,
        2.0,
        higher=False,
        note=note,
    )


class Interference(Section):
    skip = "no_interference"

    def run(self, ctx: Context) -> dict:
        ctx.step("interference")
        out = {
            "interference": run(ctx.model, mode_config(ctx.name), lambda w: ctx.step(f"interference: {w}"))
        }
        ctx.advance()
        return out

    def goals(self, results: dict) -> list[dict]:
        return [interference_goal(results.get("interference") or {})]

    def tables(self, results: dict, console: Console) -> None:
        it = results.get("interference") or {}
        if it.get("rows"):
            console.print(table("Interference: streams while a long prompt is prefilled", COLUMNS, rows(it)))
        if it.get("error"):
            console.print(f"Interference stopped early: {it['error']}")

    def markdown(self, results: dict, plots: dict[str, str], prefix: str) -> list[str]:
        it = results.get("interference") or {}
        if not it:
            return []
        c = it["config"]
        lines = [
            "## Interference: streams while a long prompt is prefilled",
            "",
            it["method"],
            "",
            f"N = {c['streams']} streams, T = {c['tokens']:,} tokens each (cancelled once measured), "
            f"S = {c['settle_s']:g} s, P = {c['prompt_chars']:,} characters; round budget "
            f"{fmt(it.get('round_budget_ms'), 'g')} ms.",
            "",
        ]
        if it.get("rows"):
            lines += [md_table(list(COLUMNS), rows(it)), ""]
            early = sum(r["streams_ended_early"] for r in it["rows"])
            if early:
                lines += [f"**{early} stream(s) ended before the long request did**: raise T.", ""]
        if it.get("error"):
            lines += [f"Stopped early: {it['error']}", ""]
        return lines


SECTION = Interference()
