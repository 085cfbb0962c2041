"""Scale-out: continue-call latency of one process against replicas behind Envoy sharing
sessions in Redis, with and without session affinity and the replicas' local tier, and the
bytes Redis sends per turn. The topology is gru_serve.bench.topology (the compose file as
processes on loopback)."""

from __future__ import annotations

import re
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import redis
from rich.console import Console
from rich.table import Table

from gru_serve.bench import topology
from gru_serve.bench.section import Context, Section, fmt, goal, md_table
from gru_serve.bench.served import percentiles
from gru_serve.client import Client

STORE_READ_METRIC = "gru_serve_session_store_read_bytes_total"
GOAL_RATIO = 1.3  # affinity + local tier p50 within this of the single process
QUIET = ("--log-level", "WARNING")
# key, label, replica flags (None: one process, memory store), client affinity
CONFIGS = (
    ("single", "single process", None, True),
    ("affinity_local", "affinity + local tier", (), True),
    ("affinity_only", "affinity only", ("--session-cache", "0"), True),
    ("neither", "neither", ("--session-cache", "0"), False),
)
METHOD = (
    "Continue-call latency: S sessions are created (prompt 'time traveller') and each gets one "
    "warm-up turn; then T rounds over the sessions, each turn a greedy Generate of N tokens on "
    "the session with no new prompt, one call at a time from one client, timed end to end on the "
    "client (request sent to stream closed). single: one `gru-serve serve` process with the "
    "memory store, the client connected directly. The others: 3 replicas with the Redis store "
    "behind Envoy (docker/envoy.yaml rendered onto loopback ports), the client connected to "
    "Envoy. affinity: the client sends the session id as `x-session-id`, which Envoy hashes on "
    "so a session's turns reach one replica; local tier: each replica keeps a copy of the "
    "sessions it served (`--session-cache`, default on) and reads only the session's version "
    "from Redis when its copy is current; without it (`--session-cache 0`) every turn reads the "
    "whole state from Redis. 'same replica': the share of turns Envoy sent to the replica that "
    "served the session's previous turn (from Envoy's access log). Redis bytes/turn: the change "
    "in Redis's `total_net_output_bytes` (everything Redis sent to any client: replies to the "
    "replicas' reads and writes, their health pings) over the measured turns, per turn; "
    f"`{STORE_READ_METRIC}`, where the replicas export it, counts the bytes the stores read."
)


@dataclass(frozen=True)
class ScaleoutConfig:
    sessions: int = 20
    turns: int = 25  # per session, after the warm-up turn
    tokens: int = 30
    replicas: int = 3
    prompt: str = "time traveller"


def mode_config(name: str) -> ScaleoutConfig:
    if name == "full":
        return ScaleoutConfig()
    if name == "quick":
        return ScaleoutConfig(sessions=10, turns=10)
    # Not a multiple of the replicas: round robin would then send each session back to its
    # replica by chance, and 'same replica' would not show whether affinity works.
    return ScaleoutConfig(sessions=4, turns=2)


def missing() -> str:
    """Why the section cannot run here ('' when it can)."""
    try:
        topology.installed_binary("redis-server")
        topology.installed_binary("envoy")
    except topology.MissingBinary as e:
        return str(e)
    if not (topology.DOCKER / "envoy.yaml").is_file():
        return f"{topology.DOCKER / 'envoy.yaml'} not found (the Envoy configuration of a source checkout)"
    return ""


def _redis_out(redis_server: topology.RedisServer) -> int:
    with redis_server.client() as c:
        return int(c.info("stats")["total_net_output_bytes"])


def _store_read(ports: list[int]) -> float | None:
    """The replicas' store read bytes summed (None: no replica exports the metric)."""
    total, seen = 0.0, False
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
        for m in re.finditer(rf"^{STORE_READ_METRIC}(?:{{[^}}]*}})? (\S+)$", text, re.M):
            total, seen = total + float(m.group(1)), True
    return total if seen else None


def _flushed_upstreams(envoy: topology.Envoy) -> list[str]:
    time.sleep(0.2)  # the access log is flushed every 50 ms
    return envoy.upstreams_used()


def measure(
    target: str,
    cfg: ScaleoutConfig,
    affinity: bool,
    top: topology.Topology | None = None,
    metrics_ports: list[int] | None = None,
) -> dict:
    with Client(target, affinity=affinity) as client:
        sids = [client.create_session(cfg.prompt).session_id for _ in range(cfg.sessions)]
        for sid in sids:
            client.generate_text(session_id=sid, max_new_tokens=cfg.tokens)
        logged = len(_flushed_upstreams(top.envoy)) if top else 0
        info_reply = out0 = 0
        if top:
            # Two INFOs back to back: the second's change is the size of one INFO reply, which
            # the delta over the turns includes once.
            info_reply = -_redis_out(top.redis) + _redis_out(top.redis)
            out0 = _redis_out(top.redis)
        read0 = _store_read(metrics_ports) if metrics_ports else None
        times = []
        for _ in range(cfg.turns):
            for sid in sids:
                t0 = time.perf_counter()
                client.generate_text(session_id=sid, max_new_tokens=cfg.tokens)
                times.append(time.perf_counter() - t0)
    n = len(times)
    row: dict = {"turns": n, "latency_ms": percentiles(times)}
    if top:
        row["redis_out_bytes_per_turn"] = (_redis_out(top.redis) - out0 - info_reply) / n
        read1 = _store_read(metrics_ports) if metrics_ports else None
        row["store_read_bytes_per_turn"] = None if read0 is None or read1 is None else (read1 - read0) / n
        # The warm-up turns (one per session, in session order) give each session's first upstream.
        ups = _flushed_upstreams(top.envoy)[logged - len(sids) :]
        k = len(sids)
        same = sum(ups[j] == ups[j - k] for j in range(k, len(ups)))
        row["same_replica"] = same / (len(ups) - k) if len(ups) == k + n else None
    return row


def run(cfg: ScaleoutConfig, on_config: Callable[[str], None] | None = None) -> dict:
    if why := missing():
        return {"skipped": why}
    out: dict = {"method": METHOD, "config": asdict(cfg), "goal_ratio": GOAL_RATIO, "rows": []}
    with tempfile.TemporaryDirectory(prefix="gru-scaleout-") as tmp:
        started: dict[tuple[str, ...], tuple[topology.Topology, list[int]]] = {}
        try:
            for key, label, flags, affinity in CONFIGS:
                if on_config:
                    on_config(label)
                if flags is None:
                    single = topology.Replica("single", "memory", Path(tmp), *QUIET)
                    single.start()
                    try:
                        row = measure(single.target, cfg, affinity)
                    finally:
                        single.stop()
                else:
                    if flags not in started:
                        # A fresh topology per set of replica flags; the configurations that
                        # differ only in the client share one (new sessions each).
                        for old, _ in started.values():
                            old.stop()
                        started.clear()
                        sub = Path(tmp) / key
                        sub.mkdir()
                        top = topology.Topology(sub, cfg.replicas, (*QUIET, *flags))
                        ports = []
                        for r in top.replicas:
                            ports.append(topology.free_port())
                            r.flags = (*r.flags, "--metrics-port", str(ports[-1]))
                        started[flags] = (top, ports)  # stopped below even if it starts only in part
                        top.start()
                    top, ports = started[flags]
                    row = measure(top.envoy.target, cfg, affinity, top, ports)
                out["rows"].append({"key": key, "what": label, "affinity": affinity, **row})
        except (RuntimeError, OSError, grpc.RpcError, redis.RedisError) as e:
            # The rows measured so far stay; the report says where it stopped.
            out["error"] = (str(e).splitlines() or [type(e).__name__])[0]
        finally:
            for top, _ in started.values():
                top.stop()
    single_row = next((r for r in out["rows"] if r["key"] == "single"), None)
    for r in out["rows"]:
        base = single_row["latency_ms"] if single_row else None
        r["p50_ratio"] = r["latency_ms"]["p50"] / base["p50"] if base else None
        r["p99_ratio"] = r["latency_ms"]["p99"] / base["p99"] if base else None
    return out


COLUMNS = (
    "configuration",
    "turns",
    "p50 ms",
    "p99 ms",
    "mean ms",
    "p50 / single",
    "p99 / single",
    "same replica",
    "Redis bytes/turn",
    "store read bytes/turn",
)


def rows(so: dict) -> list[list[str]]:
    out = []
    for r in so["rows"]:
        lat = r["latency_ms"]
        same = r.get("same_replica")
        out.append(
            [
                r["what"],
                str(r["turns"]),
                f"{lat['p50']:.2f}",
                f"{lat['p99']:.2f}",
                f"{lat['mean']:.2f}",
                fmt(r.get("p50_ratio"), ".2f"),
                fmt(r.get("p99_ratio"), ".2f"),
                "-" if same is None else f"{same:.0%}",
                fmt(r.get("redis_out_bytes_per_turn")),
                fmt(r.get("store_read_bytes_per_turn")),
            ]
        )
    return out


def scaleout_goal(so: dict) -> dict:
    by_key = {r["key"]: r for r in so.get("rows", [])}
    local, single = by_key.get("affinity_local"), by_key.get("single")
    ratio = local.get("p50_ratio") if local else None
    note = so.get("skipped") or so.get("error") or ""
    if ratio is not None and single:
        note = (
            f"continue-call p50 {local['latency_ms']['p50']:.2f} ms vs {single['latency_ms']['p50']:.2f} ms "
            f"(a {so['config']['tokens']}-token greedy turn on an existing session)"
        )
    return goal(
        "scale-out: 3 replicas, affinity + local tier: continue-call p50 / one process's",
        ratio,
        so.get("goal_ratio", 1.3),
        higher=False,
        note=note,
    )


class Scaleout(Section):
    skip = "no_scaleout"

    def run(self, ctx: Context) -> dict:
        ctx.step("scale-out")
        out = {"scaleout": run(mode_config(ctx.name), lambda label: ctx.step(f"scale-out: {label}"))}
        ctx.advance()
        return out

    def goals(self, results: dict) -> list[dict]:
        return [scaleout_goal(results.get("scaleout") or {})]

    def tables(self, results: dict, console: Console) -> None:
        so = results.get("scaleout") or {}
        if so.get("rows"):
            t = Table(title="Scale-out: continue-call latency (x: / single process)", title_justify="left")
            # The Markdown table less turns and mean, with short headers, to fit 80 columns.
            keep = (0, 2, 3, 5, 6, 7, 8, 9)
            for col in ("configuration", "p50 ms", "p99 ms", "x p50", "x p99", "same", "Redis B", "read B"):
                t.add_column(col, justify="left" if col == "configuration" else "right")
            for row in rows(so):
                t.add_row(*[row[i] for i in keep])
            console.print(t)
        elif so:
            console.print(f"Scale-out skipped: {so.get('skipped') or so.get('error')}")

    def markdown(self, results: dict, plots: dict[str, str], prefix: str) -> list[str]:
        so = results.get("scaleout") or {}
        if so.get("skipped"):
            return ["## Scale-out", "", f"Skipped: {so['skipped']}", ""]
        if not so:
            return []
        c = so["config"]
        lines = [
            "## Scale-out",
            "",
            so["method"],
            "",
            f"S = {c['sessions']} sessions, T = {c['turns']} turns each, N = {c['tokens']} tokens per turn; "
            f"{c['replicas']} replicas.",
            "",
        ]
        if so.get("rows"):
            lines += [md_table(list(COLUMNS), rows(so)), ""]
        if so.get("error"):
            lines += [f"Stopped early: {so['error']}", ""]
        g = scaleout_goal(so)
        if g["value"] is not None:
            verdict = "within" if g["met"] else "**not within**"
            lines += [
                f"Affinity + local tier: {g['value']:.2f}x the single process at p50, {verdict} the "
                f"{g['target']:g}x goal.",
                "",
            ]
        return lines + _bytes_md(so)


def _bytes_md(so: dict) -> list[str]:
    by_key = {r["key"]: r for r in so.get("rows", [])}
    on, off = by_key.get("affinity_local"), by_key.get("affinity_only")
    if not (on and off and on.get("redis_out_bytes_per_turn") is not None):
        return []
    read = (
        f"; the stores' own count (`gru_serve_session_store_read_bytes_total`): "
        f"{fmt(on.get('store_read_bytes_per_turn'))} vs {fmt(off.get('store_read_bytes_per_turn'))}"
        if on.get("store_read_bytes_per_turn") is not None
        else "; the replicas do not export a store-read metric, so only Redis's INFO figure is given"
    )
    return [
        f"Bytes Redis sent per turn, with affinity: {on['redis_out_bytes_per_turn']:,.0f} with the "
        f"local tier, {off['redis_out_bytes_per_turn']:,.0f} without it{read}.",
        "",
    ]


SECTION = Scaleout()
