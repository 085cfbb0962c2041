"""The served section: the load sweep (gru_serve.bench.served) against our server, its variant
servers (one setting changed each) and the baseline PyTorch gRPC server; its goals compare the
served figures with the in-process ones and with the baseline's."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gru_serve import launch
from gru_serve.bench import served
from gru_serve.bench.inprocess_section import fused_batch1
from gru_serve.bench.section import Context, Section, best_batched, fmt, goal, level, md_table, pyplot

METHOD = (
    "Each level runs N concurrent streams; each stream sends Generate requests back to back "
    "(one-off sessions, prompt 'time traveller', greedy, a fixed number of new tokens), from "
    "grpc.aio clients in the benchmark's process, against the server in its own process on "
    "127.0.0.1; both share this machine's CPUs. TTFT: request sent to first token read. "
    "Inter-token latency (ITL) is per token: a message can carry several tokens (token packing) "
    "and its tokens share its arrival time, so the first token of a message gets the gap since "
    "the previous message and the others 0; the gap between messages and the time per output "
    "token (TPOT = (last - first arrival) / (tokens - 1)) are given beside it. End-to-end: "
    "request sent to the final message. Percentiles are over all tokens (ITL) or requests."
)
# Our server with one setting changed, at a few levels: what the fused path, a second
# onnxruntime thread and the engine process (against the engine in a thread) do once served.
VARIANT_SERVERS = (
    ("ours_step_path", ["--fused-tokens", "1"], "step path only"),
    ("ours_2_threads", ["--intra-op-threads", "2"], "intra_op_threads=2"),
    ("ours_engine_thread", ["--engine", "thread"], "engine in a thread"),
)
# key, console label, Markdown label, plot colour and marker
SERVERS = (
    ("ours", "gru-serve", "gru-serve", "C0", "o"),
    (
        "ours_step_path",
        "gru-serve, step path only",
        "gru-serve with the fused path off (step path only)",
        "C2",
        "s",
    ),
    ("ours_2_threads", "gru-serve, intra_op_threads=2", "gru-serve with intra_op_threads=2", "C1", "D"),
    (
        "ours_engine_thread",
        "gru-serve, engine in a thread",
        "gru-serve with the engine in a thread (--engine thread)",
        "C4",
        "v",
    ),
    (
        "baseline",
        "baseline: PyTorch eager gRPC",
        "baseline: PyTorch eager gRPC server (no batching, one message per token)",
        "C3",
        "^",
    ),
)
# The server's own time to first token and request time (its Finished message), p50.
SERVER_SIDE = ("server_ttft_ms", "server_e2e_ms")
MD_COLUMNS = [
    "streams",
    "tokens/s",
    "tokens/s per stream",
    "requests/s",
    "TTFT ms (p50/p90/p99/mean/max)",
    "ITL ms per token",
    "gap between messages ms",
    "TPOT p50 ms",
    "end-to-end ms",
    "in the server: TTFT / request ms (p50)",
    "tokens/message",
    "errors",
]
CONSOLE_COLUMNS = (
    "streams",
    "tokens/s",
    "per stream",
    "req/s",
    "TTFT p50/p99 ms",
    "ITL p50/p99 ms",
    "TPOT p50 ms",
    "E2E p50/p99 ms",
    "tok/msg",
    "errors",
)


def sweep_servers(ctx: Context) -> dict:
    model, cfg, args = ctx.model, ctx.mode.load, ctx.args
    out: dict = {"method": METHOD, "config": asdict(cfg), "baseline_workers": args.baseline_workers}

    def advance(name: str):
        def f(lv: dict) -> None:
            ctx.step(f"served: {name}, {lv['concurrency']} streams done")
            ctx.advance()

        return f

    if args.target:
        out["ours_target"] = args.target
        out["ours"] = served.sweep(args.target, cfg, advance("gru-serve"))
    else:
        with launch.Server(launch.serve_argv(model), name="gru-serve").start() as srv:
            out["ours"] = served.sweep(srv.target, cfg, advance("gru-serve"))
        levels = tuple(c for c in ctx.mode.step_path_levels if c in cfg.concurrency)
        for key, extra, label in VARIANT_SERVERS:
            if levels:
                with launch.Server(launch.serve_argv(model, *extra), name=key).start() as srv:
                    out[key] = served.sweep(srv.target, cfg, advance(label), levels)
    if not args.no_baseline:
        try:
            argv = served.baseline_argv(model, args.baseline_workers)
            with launch.Server(argv, name="baseline").start() as srv:
                out["baseline"] = served.sweep(srv.target, cfg, advance("baseline"))
        except RuntimeError as e:
            out["baseline_skipped"] = str(e).splitlines()[0]
    return out


class Served(Section):
    skip = "no_served"

    def steps(self, ctx: Context) -> int:
        load, args = ctx.mode.load, ctx.args
        n = len(load.concurrency) * (1 if args.no_baseline else 2)
        n_levels = len([c for c in ctx.mode.step_path_levels if c in load.concurrency])
        return n + (0 if args.target else n_levels * len(VARIANT_SERVERS))

    def run(self, ctx: Context) -> dict:
        ctx.step("served")
        try:
            return {"served": sweep_servers(ctx)}
        except RuntimeError as e:
            return {"served": {"skipped": str(e).splitlines()[0]}}

    def goals(self, results: dict) -> list[dict]:
        ip = results.get("inprocess") or {}
        k = results["settings"]["inprocess"]["server_k"]
        fused = fused_batch1(results)
        sv = results.get("served") or {}
        ours_lv = sv.get("ours")
        one, many, most = level(ours_lv, 1), level(ours_lv, 64), level(ours_lv, 256)
        out = [
            goal(
                "served, 1 stream: fraction of in-process fused batch-1 tokens/s",
                one["tokens_per_s"] / fused["tokens_per_s"] if one and fused else None,
                0.8,
                note=(
                    f"the fused path (K={k}) at batch 1 in process: {fused['tokens_per_s']:,.0f} tokens/s"
                    if fused
                    else ""
                ),
            )
        ]
        for n, lv in ((64, many), (256, most)):
            best = best_batched(ip, n)
            out.append(
                goal(
                    f"served, {n} streams: fraction of in-process batch-{n} tokens/s",
                    lv["tokens_per_s"] / best if lv and best else None,
                    0.8,
                    note=f"the best in-process batch-{n} figure (step path or fused)",
                )
            )
        ceiling = best_batched(ip, 64)
        out += [*_streams_goals(one, many, ceiling), *_baseline_goals(sv, many)]
        return out

    def tables(self, results: dict, console: Console) -> None:
        sv = results.get("served") or {}
        for key, label, *_ in SERVERS:
            if not sv.get(key):
                continue
            t = Table(title=f"Served: {label}", title_justify="left")
            for col in CONSOLE_COLUMNS:
                t.add_column(col, justify="right")
            for lv in sv[key]:

                def pp(m: str, lv=lv) -> str:
                    return "-" if not lv[m] else f"{lv[m]['p50']:.2f} / {lv[m]['p99']:.2f}"

                t.add_row(
                    str(lv["concurrency"]),
                    fmt(lv["tokens_per_s"]),
                    fmt((lv["per_stream_tokens_per_s"] or {}).get("mean")),
                    fmt(lv["requests_per_s"], ".1f"),
                    pp("ttft_ms"),
                    pp("itl_ms"),
                    fmt((lv["tpot_ms"] or {}).get("p50"), ".3f"),
                    pp("e2e_ms"),
                    fmt(lv["tokens_per_message"], ".1f"),
                    str(lv["errors"]),
                )
            console.print(t)

    def plots(self, results: dict, out_dir: Path) -> dict[str, str]:
        sv = results.get("served") or {}
        series = [(k, label, color, marker) for k, label, _, color, marker in SERVERS if sv.get(k)]
        if not series:
            return {}
        plt = pyplot()
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        for key, label, color, marker in series:
            lv = sv[key]
            c = [x["concurrency"] for x in lv]
            ax[0].plot(c, [x["tokens_per_s"] for x in lv], color=color, marker=marker, label=label)
            per_stream = [(x["per_stream_tokens_per_s"] or {}).get("mean", 0) for x in lv]
            ax[1].plot(c, per_stream, color=color, marker=marker, label=label)
        for a, title in zip(ax, ("aggregate output tokens/s", "output tokens/s per stream"), strict=True):
            a.set_xscale("log", base=2)
            a.set_yscale("log")
            a.set_xlabel("concurrent streams")
            a.set_title(title)
            a.grid(True, which="both", alpha=0.3)
            a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "served_throughput.png", dpi=110)
        plt.close(fig)
        fig, ax = plt.subplots(1, 4, figsize=(18, 4.5))
        for a, (metric, title) in zip(
            ax,
            (
                ("ttft_ms", "time to first token"),
                ("itl_ms", "inter-token latency (per token; 0 not shown)"),
                ("message_gap_ms", "gap between messages"),
                ("e2e_ms", "end-to-end latency"),
            ),
            strict=True,
        ):
            for key, label, color, marker in series:
                lv = [x for x in sv[key] if x[metric]]
                c = [x["concurrency"] for x in lv]
                for q, line in (("p50", "-"), ("p99", ":")):
                    # a p50 of 0 (tokens packed into one message) has no place on a log scale
                    y = [x[metric][q] if x[metric][q] > 0 else float("nan") for x in lv]
                    a.plot(c, y, color=color, linestyle=line, marker=marker, label=f"{label} {q}")
            a.set_xscale("log", base=2)
            a.set_yscale("log")
            a.set_xlabel("concurrent streams")
            a.set_ylabel("ms")
            a.set_title(title)
            a.grid(True, which="both", alpha=0.3)
        ax[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "served_latency.png", dpi=110)
        plt.close(fig)
        return {"served_throughput": "served_throughput.png", "served_latency": "served_latency.png"}

    def markdown(self, results: dict, plots: dict[str, str], prefix: str) -> list[str]:
        sv = results.get("served") or {}
        if sv.get("skipped"):
            return ["## Served", "", f"Skipped: {sv['skipped']}", ""]
        if not sv:
            return []
        lines = ["## Served", "", sv.get("method", ""), ""]
        for name in ("served_throughput", "served_latency"):
            if name in plots:
                lines += [f"![{name}]({prefix}{plots[name]})", ""]
        for key, _, label, *_ in SERVERS:
            if sv.get(key):
                lines += [f"### {label}", "", md_table(MD_COLUMNS, [_md_row(lv) for lv in sv[key]]), ""]
        return lines


def _md_row(lv: dict) -> list[str]:
    def pp(mm: str) -> str:
        x = lv[mm]
        return (
            "-"
            if not x
            else " / ".join(f"{x[q]:.2f}" for q in ("p50", "p90", "p99", "mean")) + f" / {x['max']:.1f}"
        )

    return [
        str(lv["concurrency"]),
        f"{lv['tokens_per_s']:,.0f}",
        fmt((lv["per_stream_tokens_per_s"] or {}).get("mean")),
        f"{lv['requests_per_s']:.1f}",
        pp("ttft_ms"),
        pp("itl_ms"),
        pp("message_gap_ms"),
        fmt((lv["tpot_ms"] or {}).get("p50"), ".3f"),
        pp("e2e_ms"),
        " / ".join(fmt((lv.get(m) or {}).get("p50"), ".2f") for m in SERVER_SIDE),
        f"{lv['tokens_per_message']:.1f}",
        str(lv["errors"]),
    ]


def _streams_goals(one: dict | None, many: dict | None, ceiling: float | None) -> list[dict]:
    """64 streams against one: aggregate tokens/s, time per output token, inter-token latency."""
    x_one = 6.0
    out = [
        goal(
            "served, 64 streams: x one served stream (aggregate tokens/s)",
            many["tokens_per_s"] / one["tokens_per_s"] if many and one else None,
            x_one,
            note=(
                f"{x_one:g}x one stream is {x_one * one['tokens_per_s']:,.0f} tokens/s served, "
                f"{x_one * one['tokens_per_s'] / ceiling:.0%} of the in-process batch-64 rate "
                f"({ceiling:,.0f}), with gRPC and the clients on the same CPUs"
                if one and ceiling
                else ""
            ),
        )
    ]
    # A step gives each of 64 streams one token: 64 / ceiling seconds at the in-process rate.
    step_64 = 64 / ceiling * 1e3 if ceiling else None
    tpot_99 = (many["tpot_ms"] or {}).get("p99") if many else None
    out.append(
        goal(
            "served, 64 streams: p99 time per output token / in-process batch-64 step time",
            tpot_99 / step_64 if tpot_99 is not None and step_64 else None,
            2.0,
            higher=False,
            note=(
                f"TPOT p99 over requests {tpot_99:.3f} ms; in-process batch-64 step "
                f"{step_64 * 1e3:.0f} µs (64 / {ceiling:,.0f} tokens/s)"
                if tpot_99 is not None and step_64
                else ""
            ),
        )
    )
    if not (many and one):
        out.append(
            goal("served, 64 streams: p99 inter-token latency / single stream's p50", None, 5.0, False)
        )
        return out
    p50 = one["itl_ms"]["p50"]
    base, note = p50, "per-token inter-token latency (tokens of one message share its arrival)"
    if p50 <= 0:
        base = one["tpot_ms"]["p50"]
        note = (
            "the single stream's per-token p50 is 0 (most tokens arrive packed with others), so "
            "the ratio is taken against its time per output token (p50) instead"
        )
    if ceiling and base:
        # Even a server with no overhead at all gives each of 64 streams a token every
        # 64 / ceiling seconds on average.
        bound = 64 / ceiling * 1e3 / base
        note += (
            f"; bound: at the in-process batch-64 rate each of 64 streams gets a token every "
            f"{64 / ceiling * 1e6:.0f} µs on average, {bound:.1f}x the single stream's "
            f"{base * 1e3:.0f} µs, before any serving cost"
        )
    out.append(
        goal(
            "served, 64 streams: p99 inter-token latency / single stream's p50",
            many["itl_ms"]["p99"] / base if base else None,
            5.0,
            higher=False,
            note=note,
        )
    )
    return out


def _baseline_goals(sv: dict, many: dict | None) -> list[dict]:
    """The engine process against the engine thread (informational), and against the baseline."""
    thread = level(sv.get("ours_engine_thread"), 64)
    out = [
        {
            "goal": "served, 64 streams: engine process / engine thread aggregate tokens/s",
            "value": many["tokens_per_s"] / thread["tokens_per_s"] if many and thread else None,
            "target": None,
            "higher_is_better": True,
            "met": None,
            "note": (
                f"informational: {many['tokens_per_s']:,.0f} tokens/s with the engine in its own process "
                f"(the default) vs {thread['tokens_per_s']:,.0f} with --engine thread"
                if many and thread
                else "informational"
            ),
        }
    ]
    bl = level(sv.get("baseline"), 64)
    out.append(
        goal(
            "served, 64 streams: x the baseline PyTorch gRPC server's aggregate tokens/s",
            many["tokens_per_s"] / bl["tokens_per_s"] if many and bl and bl["tokens_per_s"] else None,
            10.0,
        )
    )
    if many and bl:
        lower = {m: many[m]["p99"] < bl[m]["p99"] for m in ("ttft_ms", "e2e_ms") if many[m] and bl[m]}
        out.append(
            {
                "goal": "served, 64 streams: lower p99 latency than the baseline (TTFT and end-to-end)",
                "value": None,
                "target": None,
                "higher_is_better": None,
                "met": all(lower.values()) if lower else None,
                "note": ", ".join(
                    f"{m[:-3]} p99 {many[m]['p99']:.1f} ms vs {bl[m]['p99']:.1f} ms" for m in lower
                ),
            }
        )
    return out


SECTION = Served()
