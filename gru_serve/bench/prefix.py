"""Prefix cache: time to first token of requests that share a long prompt prefix, served with
the prefix cache and without it (--prefix-cache-mb 0), whether the two give the same output,
and the cache's own counters."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from rich.console import Console

from gru_serve import launch
from gru_serve.bench import served, topology
from gru_serve.bench.section import Context, Section, fmt, md_table, stopped, table
from gru_serve.client import Client

TEXT = topology.ROOT / "exporters" / "data" / "timemachine.txt"
METRIC = "gru_serve_prefix_cache_lookups_total"
# key, label, server flags
CONFIGS = (
    ("cache", "prefix cache on (default size)", ()),
    ("no_cache", "prefix cache off (--prefix-cache-mb 0)", ("--prefix-cache-mb", "0")),
)
METHOD = (
    "R Generate requests, one at a time from one client (grpc, in the benchmark's process), each "
    "prompt the same P-character prefix of the Time Machine text followed by a distinct suffix "
    "(50 characters from further on in the text), greedy, N new tokens with log-probabilities. "
    "TTFT: request sent to the first token read, on the client; the server's own TTFT (from its "
    "Finished message) beside it. The same requests go to a server with the prefix cache and to "
    "one without (--prefix-cache-mb 0), each in its own process; one short warm-up request first "
    "(under one block, so not looked up). The prefix cache keeps the state after every whole "
    "64-token block of a prompt read from the zero state: the first request misses and stores "
    "its blocks, each later one reuses the prefix's whole blocks and prefills only the rest, so "
    "the design implies R - 1 hits. 'identical': every request's token ids and float32 "
    "log-probabilities are equal, bit for bit, on the two servers."
)


@dataclass(frozen=True)
class PrefixConfig:
    requests: int = 64
    prefix_chars: int = 2000
    tokens: int = 8  # a few to compare; the first is what TTFT times


def mode_config(name: str) -> PrefixConfig:
    return PrefixConfig(requests=8) if name == "tiny" else PrefixConfig()


def prompts(cfg: PrefixConfig, text: str) -> list[str]:
    head = text[: cfg.prefix_chars]
    at = cfg.prefix_chars + 1000
    return [head + " " + text[at + 50 * i : at + 50 * (i + 1)] for i in range(cfg.requests)]


def _lookups(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
        body = reply.read().decode()
    found = re.finditer(rf'^{METRIC}{{result="(\w+)"}} (\S+)$', body, re.M)
    return {m.group(1): float(m.group(2)) for m in found}


def measure(target: str, cfg: PrefixConfig, texts: list[str]) -> tuple[dict, list]:
    ttft, server_ttft, outputs = [], [], []
    with Client(target) as client:
        client.generate_text("time traveller", max_new_tokens=cfg.tokens)
        for prompt in texts:
            ids, lps, first = [], [], None
            t0 = time.perf_counter()
            for msg in client.generate(prompt, max_new_tokens=cfg.tokens, logprobs=True):
                if msg.tokens and first is None:
                    first = time.perf_counter()
                ids += [t.id for t in msg.tokens]
                lps += [t.logprob for t in msg.tokens]
                if msg.HasField("finished"):
                    server_ttft.append(msg.finished.time_to_first_token_s)
            ttft.append((first or time.perf_counter()) - t0)
            outputs.append((ids, lps))
    row = {"ttft_ms": served.percentiles(ttft), "server_ttft_ms": served.percentiles(server_ttft)}
    return row, outputs


def run(model: Path, cfg: PrefixConfig, on_config: Callable[[str], None] | None = None) -> dict:
    if not TEXT.is_file():
        return {"skipped": f"{TEXT} not found (the corpus of a source checkout)"}
    texts = prompts(cfg, TEXT.read_text())
    out: dict = {"method": METHOD, "config": asdict(cfg), "expected_hits": cfg.requests - 1, "rows": []}
    outputs = []
    try:
        for key, label, flags in CONFIGS:
            if on_config:
                on_config(label)
            port = topology.free_port()
            argv = launch.serve_argv(model, *flags, "--metrics-port", str(port))
            with launch.Server(argv, name=f"prefix-{key}").start() as srv:
                before = _lookups(port)
                row, got = measure(srv.target, cfg, texts)
                after = _lookups(port)
            outputs.append(got)
            row |= {k: int(after.get(k, 0) - before.get(k, 0)) for k in ("hit", "miss")}
            out["rows"].append({"key": key, "what": label, **row})
    except (RuntimeError, OSError, grpc.RpcError) as e:
        out["error"] = (str(e).splitlines() or [type(e).__name__])[0]
        return out
    out["identical"] = outputs[0] == outputs[1]
    on, off = out["rows"]
    out["ttft_p50_ratio"] = off["ttft_ms"]["p50"] / on["ttft_ms"]["p50"]
    return out


COLUMNS = ("server", "TTFT p50 ms", "p90", "p99", "mean", "server TTFT p50 ms", "hits", "misses")


def rows(pc: dict) -> list[list[str]]:
    out = []
    for r in pc["rows"]:
        t = r["ttft_ms"]
        out.append(
            [
                r["what"],
                *(f"{t[q]:.2f}" for q in ("p50", "p90", "p99", "mean")),
                fmt((r.get("server_ttft_ms") or {}).get("p50"), ".2f"),
                str(r["hit"]),
                str(r["miss"]),
            ]
        )
    return out


def summary(pc: dict) -> str:
    by_key = {r["key"]: r for r in pc["rows"]}
    on, off = by_key.get("cache"), by_key.get("no_cache")
    if not (on and off and pc.get("ttft_p50_ratio")):
        return f"Stopped early: {pc.get('error', 'a server did not run')}"
    hits, want = on["hit"], pc["expected_hits"]
    return (
        f"Time to first token p50: {pc['ttft_p50_ratio']:.2f}x lower with the prefix cache "
        f"({on['ttft_ms']['p50']:.2f} ms vs {off['ttft_ms']['p50']:.2f} ms without); outputs "
        f"{'identical, bit for bit,' if pc['identical'] else '**different**'} on the two servers; "
        f"{hits} hits and {on['miss']} miss(es) ({'as' if hits == want else '**not** as'} the design "
        f"implies: {want}, every request but the first)."
    )


class PrefixCache(Section):
    skip = "no_prefix"

    def run(self, ctx: Context) -> dict:
        ctx.step("prefix cache")
        out = {
            "prefix_cache": run(ctx.model, mode_config(ctx.name), lambda w: ctx.step(f"prefix cache: {w}"))
        }
        ctx.advance()
        return out

    def tables(self, results: dict, console: Console) -> None:
        pc = results.get("prefix_cache") or {}
        if pc.get("rows"):
            console.print(table("Prefix cache: requests sharing a prompt prefix", COLUMNS, rows(pc)))
            console.print(summary(pc))
        elif pc:
            console.print(stopped("Prefix cache", pc))

    def markdown(self, results: dict, plots: dict[str, str], prefix: str) -> list[str]:
        pc = results.get("prefix_cache") or {}
        if pc.get("skipped"):
            return ["## Prefix cache", "", f"Skipped: {pc['skipped']}", ""]
        if not pc:
            return []
        c = pc["config"]
        lines = [
            "## Prefix cache",
            "",
            pc["method"],
            "",
            f"R = {c['requests']} requests, P = {c['prefix_chars']:,} characters, "
            f"N = {c['tokens']} tokens each.",
            "",
        ]
        if pc.get("rows"):
            lines += [md_table(list(COLUMNS), rows(pc)), ""]
        return [*lines, summary(pc), ""]


SECTION = PrefixCache()
