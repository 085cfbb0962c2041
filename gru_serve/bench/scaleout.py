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

from gru_serve.bench import topology
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
