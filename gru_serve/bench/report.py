"""The benchmark's outputs from its JSON: goal ratios, terminal tables, plots and Markdown."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

# The server's own time to first token and request time (its Finished message), p50.
SERVER_SIDE = ("server_ttft_ms", "server_e2e_ms")

# -- looking things up in the results --


def _row(rows: list[dict] | None, name: str, batch: int) -> dict | None:
    return next((r for r in rows or [] if r["name"] == name and r["batch"] == batch), None)


def _level(levels: list[dict] | None, c: int) -> dict | None:
    return next((lv for lv in levels or [] if lv["concurrency"] == c), None)


def _torch_batched(results: dict, batch: int) -> tuple[float, str] | None:
    """The faster of PyTorch eager's default-threads and one-thread runs at this batch."""
    t = results.get("torch") or {}
    best = None
    for key in ("batched", "batched_1_thread"):
        for r in t.get(key, []):
            if r["batch"] == batch and (best is None or r["tokens_per_s"] > best[0]):
                best = (r["tokens_per_s"], f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}")
    return best


def _goal(goal: str, value: float | None, target: float, higher: bool = True, note: str = "") -> dict:
    met = None if value is None else (value >= target if higher else value <= target)
    return {
        "goal": goal,
        "value": value,
        "target": target,
        "higher_is_better": higher,
        "met": met,
        "note": note,
    }


def goals(results: dict) -> list[dict]:
    """The issue's goals as ratios from this one run (None where a section was not run)."""
    ip = results.get("inprocess") or {}
    b1 = ip.get("batch1")
    torch = results.get("torch") or {}
    d2l = (torch.get("d2l") or {}).get("tokens_per_s")
    k = results["settings"]["inprocess"]["server_k"]
    step = _row(b1, "ort_decode_iobinding", 1)
    plain = _row(b1, "ort_exported_step", 1)
    # the batch-1 loops time the fused path at a few K (quick mode may leave out the server's);
    # the batched rows always time it at the server's K, batch 1 included
    fused = _row(b1, f"fused_k{k}", 1) or _row(ip.get("batched"), f"fused_k{k}", 1)
    out = [
        _goal(
            "onnxruntime per-step greedy, batch 1: x the d2l-style eager loop",
            step["tokens_per_s"] / d2l if step and d2l else None,
            3.5,
            note=(
                f"decode graph + IOBinding (the server's step path); the exported graph with plain "
                f"session.run gives {plain['tokens_per_s'] / d2l:.2f}x"
                if plain and d2l
                else ""
            ),
        ),
        _goal(
            f"fused path (K={k}), batch 1: x the d2l-style eager loop",
            fused["tokens_per_s"] / d2l if fused and d2l else None,
            6.0,
        ),
    ]
    for b in (64, 256):
        ours = max(
            (
                r["tokens_per_s"]
                for r in ip.get("batched") or []
                if r["batch"] == b and r["name"] != "ort_exported_step"
            ),
            default=None,
        )
        eager = _torch_batched(results, b)
        out.append(
            _goal(
                f"onnxruntime batched at {b}: x PyTorch eager at {b}",
                ours / eager[0] if ours and eager else None,
                1.0,
                note=f"best of our step path and fused loop vs PyTorch's best ({eager[1]})" if eager else "",
            )
        )
    served = results.get("served") or {}
    ours_lv = served.get("ours")
    one, many, most = _level(ours_lv, 1), _level(ours_lv, 64), _level(ours_lv, 256)
    out.append(
        _goal(
            "served, 1 stream: fraction of in-process fused batch-1 tokens/s",
            one["tokens_per_s"] / fused["tokens_per_s"] if one and fused else None,
            0.8,
            note=(
                f"the fused path (K={k}) at batch 1 in process: {fused['tokens_per_s']:,.0f} tokens/s"
                if fused
                else ""
            ),
        )
    )
    for n, level in ((64, many), (256, most)):
        best = _best_batched(ip, n)
        out.append(
            _goal(
                f"served, {n} streams: fraction of in-process batch-{n} tokens/s",
                level["tokens_per_s"] / best if level and best else None,
                0.8,
                note=f"the best in-process batch-{n} figure (step path or fused)",
            )
        )
    ceiling = _best_batched(ip, 64)
    x_one = 6.0
    out.append(
        _goal(
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
    )
    # A step gives each of 64 streams one token: 64 / ceiling seconds at the in-process rate.
    step_64 = 64 / ceiling * 1e3 if ceiling else None
    tpot_99 = (many["tpot_ms"] or {}).get("p99") if many else None
    out.append(
        _goal(
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
    if many and one:
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
            _goal(
                "served, 64 streams: p99 inter-token latency / single stream's p50",
                many["itl_ms"]["p99"] / base if base else None,
                5.0,
                higher=False,
                note=note,
            )
        )
    else:
        out.append(
            _goal("served, 64 streams: p99 inter-token latency / single stream's p50", None, 5.0, False)
        )
    thread = _level(served.get("ours_engine_thread"), 64)
    out.append(
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
    )
    bl = _level(served.get("baseline"), 64)
    out.append(
        _goal(
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
    out.append(_interference_goal(results.get("interference") or {}))
    out.append(_scaleout_goal(results.get("scaleout") or {}))
    return out


def _best_batched(ip: dict, batch: int) -> float | None:
    """The best in-process tokens/s at this batch (any path)."""
    return max((r["tokens_per_s"] for r in ip.get("batched") or [] if r["batch"] == batch), default=None)


def _interference_goal(it: dict) -> dict:
    rows = {r["key"]: r for r in it.get("rows", [])}
    chunked, whole = rows.get("chunked"), rows.get("whole")
    budget = it.get("round_budget_ms")
    gap = (chunked or {}).get("max_gap_during_ms")
    note = it.get("skipped") or it.get("error") or ""
    if gap is not None and budget:
        note = (
            f"{gap:.1f} ms (before it: {_fmt(chunked.get('max_gap_before_ms'), '.1f')} ms) with the default "
            f"--prefill-chunk {chunked['prefill_chunk']}, round budget {budget:g} ms"
        )
        if whole and whole.get("max_gap_during_ms") is not None:
            note += (
                f"; today's (--prefill-chunk {whole['prefill_chunk']}, the whole prompt in one prefill): "
                f"{whole['max_gap_during_ms']:.1f} ms, {whole['max_gap_during_ms'] / budget:.2f}x "
                f"(before it: {_fmt(whole.get('max_gap_before_ms'), '.1f')} ms)"
            )
    return _goal(
        "interference: largest gap of 64 streams while a 16,000-character prompt is prefilled / round budget",
        gap / budget if gap is not None and budget else None,
        2.0,
        higher=False,
        note=note,
    )


def _scaleout_goal(so: dict) -> dict:
    rows = {r["key"]: r for r in so.get("rows", [])}
    local, single = rows.get("affinity_local"), rows.get("single")
    ratio = local.get("p50_ratio") if local else None
    note = so.get("skipped") or so.get("error") or ""
    if ratio is not None and single:
        note = (
            f"continue-call p50 {local['latency_ms']['p50']:.2f} ms vs {single['latency_ms']['p50']:.2f} ms "
            f"(a {so['config']['tokens']}-token greedy turn on an existing session)"
        )
    return _goal(
        "scale-out: 3 replicas, affinity + local tier: continue-call p50 / one process's",
        ratio,
        so.get("goal_ratio", 1.3),
        higher=False,
        note=note,
    )


# -- terminal --


def _table(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> Table:
    """A section's console table: the server column left, figures right."""
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, justify="left" if col == "server" else "right")
    for row in rows:
        t.add_row(*row)
    return t


def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def print_tables(results: dict, console: Console) -> None:
    ip = results.get("inprocess") or {}
    torch = results.get("torch") or {}
    t = Table(title="Batch 1, greedy: one stream's decode loop", title_justify="left")
    for col in ("path", "µs/token", "tokens/s", "x d2l eager"):
        t.add_column(col, justify="left" if col == "path" else "right")
    d2l = (torch.get("d2l") or {}).get("tokens_per_s")
    for key, label in (
        ("d2l", "PyTorch eager, d2l predict_ch8 (autograd on)"),
        ("no_grad", "PyTorch eager, no_grad"),
    ):
        if key in torch:
            r = torch[key]
            t.add_row(
                label,
                _fmt(r["us_per_token"], ".1f"),
                _fmt(r["tokens_per_s"]),
                _fmt(r["tokens_per_s"] / d2l, ".2f"),
            )
    for r in ip.get("batch1") or []:
        ratio = r["tokens_per_s"] / d2l if d2l else None
        t.add_row(r["what"], _fmt(r["us_per_token"], ".1f"), _fmt(r["tokens_per_s"]), _fmt(ratio, ".2f"))
    console.print(t)
    if ip.get("batched"):
        t = Table(title="Batched greedy decoding: tokens/s", title_justify="left")
        batches = sorted({r["batch"] for r in ip["batched"]})
        t.add_column("path")
        for b in batches:
            t.add_column(f"batch {b}", justify="right")
        for key, label in (
            ("batched", "PyTorch eager (default threads)"),
            ("batched_1_thread", "PyTorch eager (1 thread)"),
        ):
            if torch.get(key):
                t.add_row(
                    label,
                    *[
                        _fmt(next((r["tokens_per_s"] for r in torch[key] if r["batch"] == b), None))
                        for b in batches
                    ],
                )
        for name in dict.fromkeys(r["name"] for r in ip["batched"]):
            what = next(r["what"] for r in ip["batched"] if r["name"] == name)
            t.add_row(
                what, *[_fmt((_row(ip["batched"], name, b) or {}).get("tokens_per_s")) for b in batches]
            )
        console.print(t)
    served = results.get("served") or {}
    for key, label in (
        ("ours", "gru-serve"),
        ("ours_step_path", "gru-serve, step path only"),
        ("ours_2_threads", "gru-serve, intra_op_threads=2"),
        ("ours_engine_thread", "gru-serve, engine in a thread"),
        ("baseline", "baseline: PyTorch eager gRPC"),
    ):
        if not served.get(key):
            continue
        t = Table(title=f"Served: {label}", title_justify="left")
        cols = (
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
        for col in cols:
            t.add_column(col, justify="right")
        for lv in served[key]:

            def pp(m: str, lv=lv) -> str:
                return "-" if not lv[m] else f"{lv[m]['p50']:.2f} / {lv[m]['p99']:.2f}"

            t.add_row(
                str(lv["concurrency"]),
                _fmt(lv["tokens_per_s"]),
                _fmt((lv["per_stream_tokens_per_s"] or {}).get("mean")),
                _fmt(lv["requests_per_s"], ".1f"),
                pp("ttft_ms"),
                pp("itl_ms"),
                _fmt((lv["tpot_ms"] or {}).get("p50"), ".3f"),
                pp("e2e_ms"),
                _fmt(lv["tokens_per_message"], ".1f"),
                str(lv["errors"]),
            )
        console.print(t)
    so = results.get("scaleout") or {}
    if so.get("rows"):
        t = Table(title="Scale-out: continue-call latency (x: / single process)", title_justify="left")
        # The Markdown table less turns and mean, with short headers, to fit 80 columns.
        keep = (0, 2, 3, 5, 6, 7, 8, 9)
        for col in ("configuration", "p50 ms", "p99 ms", "x p50", "x p99", "same", "Redis B", "read B"):
            t.add_column(col, justify="left" if col == "configuration" else "right")
        for row in _scaleout_rows(so):
            t.add_row(*[row[i] for i in keep])
        console.print(t)
    elif so:
        console.print(f"Scale-out skipped: {so.get('skipped') or so.get('error')}")
    pc = results.get("prefix_cache") or {}
    if pc.get("rows"):
        console.print(
            _table("Prefix cache: requests sharing a prompt prefix", _PREFIX_COLUMNS, _prefix_rows(pc))
        )
        console.print(_prefix_summary(pc))
    elif pc:
        console.print(f"Prefix cache skipped: {pc.get('skipped') or pc.get('error')}")
    tr = results.get("transports") or {}
    if tr.get("rows"):
        console.print(_table("HTTP/SSE beside gRPC (one server)", _TRANSPORT_COLUMNS, _transport_rows(tr)))
    if tr.get("error"):
        console.print(f"HTTP/SSE beside gRPC stopped early: {tr['error']}")
    it = results.get("interference") or {}
    if it.get("rows"):
        title = "Interference: streams while a long prompt is prefilled"
        console.print(_table(title, _INTERFERENCE_COLUMNS, _interference_rows(it)))
    if it.get("error"):
        console.print(f"Interference stopped early: {it['error']}")
    t = Table(title="Goals (ratios from this run)", title_justify="left")
    for col in ("goal", "value", "target", "met"):
        t.add_column(col, justify="left" if col == "goal" else "right")
    for g in results.get("goals", []):
        target = (
            "-" if g["target"] is None else ("≥ " if g["higher_is_better"] else "≤ ") + f"{g['target']:g}"
        )
        met = {True: "[green]met[/]", False: "[red]missed[/]", None: "-"}[g["met"]]
        t.add_row(g["goal"], _fmt(g["value"], ".2f"), target, met)
    console.print(t)


_SCALEOUT_COLUMNS = (
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


def _scaleout_rows(so: dict) -> list[list[str]]:
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
                _fmt(r.get("p50_ratio"), ".2f"),
                _fmt(r.get("p99_ratio"), ".2f"),
                "-" if same is None else f"{same:.0%}",
                _fmt(r.get("redis_out_bytes_per_turn")),
                _fmt(r.get("store_read_bytes_per_turn")),
            ]
        )
    return out


_PREFIX_COLUMNS = ("server", "TTFT p50 ms", "p90", "p99", "mean", "server TTFT p50 ms", "hits", "misses")


_TRANSPORT_COLUMNS = (
    "streams",
    "gRPC tokens/s",
    "HTTP/SSE tokens/s",
    "HTTP / gRPC",
    "gRPC TTFT p50 ms",
    "HTTP TTFT p50 ms",
    "errors",
)


def _transport_rows(tr: dict) -> list[list[str]]:
    return [
        [
            str(r["concurrency"]),
            f"{r['grpc']['tokens_per_s']:,.0f}",
            f"{r['http']['tokens_per_s']:,.0f}",
            _fmt(r["ratio"], ".2f"),
            _fmt((r["grpc"]["ttft_ms"] or {}).get("p50"), ".2f"),
            _fmt((r["http"]["ttft_ms"] or {}).get("p50"), ".2f"),
            str(r["grpc"]["errors"] + r["http"]["errors"]),
        ]
        for r in tr["rows"]
    ]


_INTERFERENCE_COLUMNS = (
    "server",
    "max gap during ms",
    "max gap before ms",
    "during / round budget",
    "long request ms",
    "its server TTFT ms",
    "prompt tokens",
)


def _interference_rows(it: dict) -> list[list[str]]:
    budget = it.get("round_budget_ms")
    out = []
    for r in it["rows"]:
        gap = r["max_gap_during_ms"]
        out.append(
            [
                r["what"],
                _fmt(gap, ".1f"),
                _fmt(r["max_gap_before_ms"], ".1f"),
                _fmt(gap / budget if gap is not None and budget else None, ".2f"),
                _fmt(r["long_request_ms"], ".1f"),
                _fmt(r["long_server_ttft_ms"], ".1f"),
                _fmt(r["prompt_tokens"], "d"),
            ]
        )
    return out


def _prefix_rows(pc: dict) -> list[list[str]]:
    out = []
    for r in pc["rows"]:
        t = r["ttft_ms"]
        out.append(
            [
                r["what"],
                *(f"{t[q]:.2f}" for q in ("p50", "p90", "p99", "mean")),
                _fmt((r.get("server_ttft_ms") or {}).get("p50"), ".2f"),
                str(r["hit"]),
                str(r["miss"]),
            ]
        )
    return out


def _prefix_summary(pc: dict) -> str:
    rows = {r["key"]: r for r in pc["rows"]}
    on, off = rows.get("cache"), rows.get("no_cache")
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


# -- plots --


def plots(results: dict, out_dir: Path) -> dict[str, str]:
    """PNG plots next to the JSON; returns name -> file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    ip = results.get("inprocess") or {}
    torch = results.get("torch") or {}
    if ip.get("batched") or ip.get("batch1"):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
        labels, values, colors = [], [], []
        for key, label in (("d2l", "PyTorch d2l loop"), ("no_grad", "PyTorch no_grad")):
            if key in torch:
                labels.append(label)
                values.append(torch[key]["us_per_token"])
                colors.append("#888888")
        for r in ip.get("batch1") or []:
            labels.append(r["name"].replace("ort_", "ORT ").replace("_", " "))
            values.append(r["us_per_token"])
            colors.append("#2ca02c" if r["name"].startswith("fused") else "#4c72b0")
        a1.barh(labels[::-1], values[::-1], color=colors[::-1])
        a1.set_xlabel("µs per token (batch 1, greedy; lower is better)")
        a1.set_title("One stream")
        for key, label, style in (
            ("batched", "PyTorch eager", "k--"),
            ("batched_1_thread", "PyTorch eager, 1 thread", "k:"),
        ):
            if torch.get(key):
                a2.plot(
                    [r["batch"] for r in torch[key]],
                    [r["tokens_per_s"] for r in torch[key]],
                    style,
                    marker="o",
                    label=label,
                )
        for name in dict.fromkeys(r["name"] for r in ip.get("batched") or []):
            rows = [r for r in ip["batched"] if r["name"] == name]
            a2.plot(
                [r["batch"] for r in rows],
                [r["tokens_per_s"] for r in rows],
                marker="o",
                label=rows[0]["what"],
            )
        a2.set_xscale("log", base=2)
        a2.set_yscale("log")
        a2.set_xlabel("batch")
        a2.set_ylabel("tokens/s")
        a2.set_title("Batched greedy decoding, in process")
        a2.legend(fontsize=8)
        a2.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "inprocess.png", dpi=110)
        plt.close(fig)
        made["inprocess"] = "inprocess.png"
    served = results.get("served") or {}
    series = [
        (k, lbl, color, marker)
        for k, lbl, color, marker in (
            ("ours", "gru-serve", "C0", "o"),
            ("ours_step_path", "gru-serve, step path only", "C2", "s"),
            ("ours_2_threads", "gru-serve, intra_op_threads=2", "C1", "D"),
            ("ours_engine_thread", "gru-serve, engine in a thread", "C4", "v"),
            ("baseline", "baseline: PyTorch eager gRPC", "C3", "^"),
        )
        if served.get(k)
    ]
    if series:
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        for key, label, color, marker in series:
            lv = served[key]
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
        made["served_throughput"] = "served_throughput.png"
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
                lv = [x for x in served[key] if x[metric]]
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
        made["served_latency"] = "served_latency.png"
    return made


# -- Markdown --


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def markdown(results: dict, plot_files: dict[str, str], plot_prefix: str = "") -> str:
    m = results["machine"]
    v = results["versions"]
    s = results["settings"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `gru-serve bench{' --quick' if results['mode'] == 'quick' else ''}` "
        f"on {results['created']} "
        f"from [`results.json`]({plot_prefix}results.json); rerun it with `make bench`. Every ratio below "
        "comes from this one run on this one machine (in-process figures: best of "
        f"{s['inprocess']['repeats']} runs each, one after another).",
        "",
        f"- machine: {m['cpu']}, {m['usable_cpus']} usable CPUs of {m['cpu_count']}, {m['memory_gib']} GiB; "
        f"{m['platform']}; Python {m['python']}; load average at start {m['load_average_at_start']}",
        "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
        f"- execution provider: {results['provider']} (available: {', '.join(results['providers'])})",
        f"- model: `{s['model']}` ({results['model']['hidden']} hidden, "
        f"{results['model']['layers']} layer(s), "
        f"vocab {results['model']['vocab']}); fast path: {results['model']['fast_path']}",
        f"- server settings: {s['server']}",
        "",
    ]
    if results.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in results["notes"]] + [""]
    lines += ["## Goals", ""]
    rows = []
    for g in results.get("goals", []):
        target = "" if g["target"] is None else ("≥ " if g["higher_is_better"] else "≤ ") + f"{g['target']:g}"
        met = {True: "met", False: "**missed**", None: "not measured"}[g["met"]]
        if g["met"] is None and g["target"] is None and g["value"] is not None:
            met = "informational"
        rows.append([g["goal"], _fmt(g["value"], ".2f"), target, met, g.get("note", "")])
    lines += [_md_table(["goal", "value", "target", "", "how"], rows), ""]
    ip = results.get("inprocess") or {}
    torch = results.get("torch") or {}
    if "inprocess" in plot_files:
        lines += ["## In process", "", f"![in-process]({plot_prefix}{plot_files['inprocess']})", ""]
    d2l = (torch.get("d2l") or {}).get("tokens_per_s")
    rows = []
    for key, label in (
        ("d2l", "PyTorch eager, d2l's predict_ch8 as written (autograd on)"),
        ("no_grad", "PyTorch eager, the same loop under no_grad"),
    ):
        if key in torch:
            r = torch[key]
            rows.append(
                [
                    label,
                    f"{r['us_per_token']:.1f}",
                    f"{r['tokens_per_s']:,.0f}",
                    f"{r['tokens_per_s'] / d2l:.2f}",
                ]
            )
    for r in ip.get("batch1") or []:
        rows.append(
            [
                r["what"],
                f"{r['us_per_token']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                _fmt(r["tokens_per_s"] / d2l if d2l else None, ".2f"),
            ]
        )
    if rows:
        lines += [
            "### One stream, greedy",
            "",
            _md_table(["path", "µs/token", "tokens/s", "x d2l eager"], rows),
            "",
        ]
    if torch.get("skipped"):
        lines += [f"PyTorch timings skipped: {torch['skipped']}", ""]
    if ip.get("batched"):
        batches = sorted({r["batch"] for r in ip["batched"]})
        rows = []
        for key, label in (
            ("batched", "PyTorch eager, no_grad (default threads)"),
            ("batched_1_thread", "PyTorch eager, no_grad (1 thread)"),
        ):
            if torch.get(key):
                rows.append(
                    [label]
                    + [
                        _fmt(next((r["tokens_per_s"] for r in torch[key] if r["batch"] == b), None))
                        for b in batches
                    ]
                )
        for name in dict.fromkeys(r["name"] for r in ip["batched"]):
            what = next(r["what"] for r in ip["batched"] if r["name"] == name)
            rows.append(
                [what] + [_fmt((_row(ip["batched"], name, b) or {}).get("tokens_per_s")) for b in batches]
            )
        lines += [
            "### Batched greedy decoding (tokens/s)",
            "",
            _md_table(["path"] + [f"batch {b}" for b in batches], rows),
            "",
        ]
    if ip.get("sampling"):
        rows = [
            [r["what"], str(r["batch"]), f"{r['us_per_token']:.1f}", f"{r['tokens_per_s']:,.0f}"]
            for r in ip["sampling"]
        ]
        lines += [
            "### Seeded sampling (temperature 1)",
            "",
            "Same tokens on both paths (tests/bench).",
            "",
            _md_table(["path", "batch", "µs/token", "tokens/s"], rows),
            "",
        ]
    if ip.get("scheduler"):
        rows = [[r["what"], str(r["batch"]), f"{r['tokens_per_s']:,.0f}"] for r in ip["scheduler"]]
        lines += [
            "### The scheduler without gRPC",
            "",
            f"Jobs of {s['inprocess']['scheduler_tokens']} greedy tokens submitted at once; events go to a "
            "plain callback.",
            "",
            _md_table(["path", "jobs", "tokens/s"], rows),
            "",
        ]
    if ip.get("shipped"):
        rows = [
            [
                r["what"],
                str(r["batch"]),
                f"{r['tokens_per_s']:,.0f}",
                f"{r['chars_per_token']:.2f}",
                f"{r['chars_per_s']:,.0f}",
            ]
            for r in ip["shipped"]
        ]
        lines += [
            "### The shipped models",
            "",
            f"Fused path, K = {s['inprocess']['server_k']}, greedy. Characters per token: a paragraph of "
            "the book as the model's tokenizer splits it (d2l's models see the normalised text).",
            "",
            _md_table(["model", "batch", "tokens/s", "chars/token", "chars/s"], rows),
            "",
        ]
    if ip.get("tuning"):
        batches = sorted({r["batch"] for r in ip["tuning"]})
        rows = []
        for what in dict.fromkeys(r["what"] for r in ip["tuning"]):
            rr = [r for r in ip["tuning"] if r["what"] == what]
            rows.append(
                [what]
                + [_fmt(next((r["tokens_per_s"] for r in rr if r["batch"] == b), None)) for b in batches]
                + [f"{rr[0]['exported_load_s'] * 1000:.0f}"]
            )
        lines += [
            "### onnxruntime settings (decode step + IOBinding, tokens/s)",
            "",
            _md_table(["setting"] + [f"batch {b}" for b in batches] + ["load ms"], rows),
            "",
            f"Chosen: {results.get('tuning_choice', '-')}",
            "",
        ]
    var = results.get("variants") or {}
    if var.get("skipped"):
        lines += ["## Variants", "", f"Skipped: {var['skipped']}", ""]
    elif var:
        base = var["report"]["base"]["perplexity"]
        rows = [
            ["base (exported)", "-", "-"]
            + [f"{base[k]:.4f}" for k in base]
            + [_fmt(var["timing"].get("base"), ".1f")]
        ]
        for kind, r in var["report"].items():
            if kind == "base":
                continue
            ppl = r.get("perplexity") or {}
            change = r.get("perplexity_change") or {}
            cells = [f"{ppl[k]:.4f} ({change[k]:+.4%})" if k in ppl else "-" for k in base]
            diff = ", ".join(f"{k} {x:.1e}" for k, x in (r.get("max_diff") or {}).items()) or "-"
            timing = "fused rows above" if kind == "fused" else _fmt(var["timing"].get(kind), ".1f")
            rows.append([kind, f"{r['bytes'] / 1e6:.2f} MB", diff, *cells, timing])
        lines += [
            "## Variants (`gru-export variants`)",
            "",
            _md_table(
                [
                    "variant",
                    "size",
                    "max abs diff vs base",
                    *[f"perplexity {k}" for k in base],
                    "µs/step, batch 1",
                ],
                rows,
            ),
            "",
        ]
        lines += [f"- {n}" for n in var.get("notes", [])] + [""]
    served = results.get("served") or {}
    if served.get("skipped"):
        lines += ["## Served", "", f"Skipped: {served['skipped']}", ""]
    elif served:
        lines += ["## Served", "", served.get("method", ""), ""]
        for name in ("served_throughput", "served_latency"):
            if name in plot_files:
                lines += [f"![{name}]({plot_prefix}{plot_files[name]})", ""]
        for key, label in (
            ("ours", "gru-serve"),
            ("ours_step_path", "gru-serve with the fused path off (step path only)"),
            ("ours_2_threads", "gru-serve with intra_op_threads=2"),
            ("ours_engine_thread", "gru-serve with the engine in a thread (--engine thread)"),
            ("baseline", "baseline: PyTorch eager gRPC server (no batching, one message per token)"),
        ):
            if not served.get(key):
                continue
            rows = []
            for lv in served[key]:

                def pp(mm: str, lv=lv) -> str:
                    x = lv[mm]
                    return (
                        "-"
                        if not x
                        else " / ".join(f"{x[q]:.2f}" for q in ("p50", "p90", "p99", "mean"))
                        + f" / {x['max']:.1f}"
                    )

                rows.append(
                    [
                        str(lv["concurrency"]),
                        f"{lv['tokens_per_s']:,.0f}",
                        _fmt((lv["per_stream_tokens_per_s"] or {}).get("mean")),
                        f"{lv['requests_per_s']:.1f}",
                        pp("ttft_ms"),
                        pp("itl_ms"),
                        pp("message_gap_ms"),
                        _fmt((lv["tpot_ms"] or {}).get("p50"), ".3f"),
                        pp("e2e_ms"),
                        " / ".join(_fmt((lv.get(m) or {}).get("p50"), ".2f") for m in SERVER_SIDE),
                        f"{lv['tokens_per_message']:.1f}",
                        str(lv["errors"]),
                    ]
                )
            lines += [
                f"### {label}",
                "",
                _md_table(
                    [
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
                    ],
                    rows,
                ),
                "",
            ]
    so = results.get("scaleout") or {}
    if so.get("skipped"):
        lines += ["## Scale-out", "", f"Skipped: {so['skipped']}", ""]
    elif so:
        c = so["config"]
        lines += [
            "## Scale-out",
            "",
            so["method"],
            "",
            f"S = {c['sessions']} sessions, T = {c['turns']} turns each, N = {c['tokens']} tokens per turn; "
            f"{c['replicas']} replicas.",
            "",
        ]
        if so.get("rows"):
            lines += [_md_table(list(_SCALEOUT_COLUMNS), _scaleout_rows(so)), ""]
        if so.get("error"):
            lines += [f"Stopped early: {so['error']}", ""]
        g = _scaleout_goal(so)
        if g["value"] is not None:
            verdict = "within" if g["met"] else "**not within**"
            lines += [
                f"Affinity + local tier: {g['value']:.2f}x the single process at p50, {verdict} the "
                f"{g['target']:g}x goal.",
                "",
            ]
        rows = {r["key"]: r for r in so.get("rows", [])}
        on, off = rows.get("affinity_local"), rows.get("affinity_only")
        if on and off and on.get("redis_out_bytes_per_turn") is not None:
            read = (
                f"; the stores' own count (`gru_serve_session_store_read_bytes_total`): "
                f"{_fmt(on.get('store_read_bytes_per_turn'))} vs {_fmt(off.get('store_read_bytes_per_turn'))}"
                if on.get("store_read_bytes_per_turn") is not None
                else "; the replicas do not export a store-read metric, so only Redis's INFO figure is given"
            )
            lines += [
                f"Bytes Redis sent per turn, with affinity: {on['redis_out_bytes_per_turn']:,.0f} with the "
                f"local tier, {off['redis_out_bytes_per_turn']:,.0f} without it{read}.",
                "",
            ]
    pc = results.get("prefix_cache") or {}
    if pc.get("skipped"):
        lines += ["## Prefix cache", "", f"Skipped: {pc['skipped']}", ""]
    elif pc:
        c = pc["config"]
        lines += [
            "## Prefix cache",
            "",
            pc["method"],
            "",
            f"R = {c['requests']} requests, P = {c['prefix_chars']:,} characters, "
            f"N = {c['tokens']} tokens each.",
            "",
        ]
        if pc.get("rows"):
            lines += [_md_table(list(_PREFIX_COLUMNS), _prefix_rows(pc)), ""]
        lines += [_prefix_summary(pc), ""]
    tr = results.get("transports") or {}
    if tr:
        c = tr["config"]
        lines += [
            "## HTTP/SSE beside gRPC",
            "",
            tr["method"],
            "",
            f"T = {c['tokens']} tokens per request.",
            "",
        ]
        if tr.get("rows"):
            lines += [_md_table(list(_TRANSPORT_COLUMNS), _transport_rows(tr)), ""]
        if tr.get("error"):
            lines += [f"Stopped early: {tr['error']}", ""]
    it = results.get("interference") or {}
    if it:
        c = it["config"]
        lines += [
            "## Interference: streams while a long prompt is prefilled",
            "",
            it["method"],
            "",
            f"N = {c['streams']} streams, T = {c['tokens']:,} tokens each (cancelled once measured), "
            f"S = {c['settle_s']:g} s, P = {c['prompt_chars']:,} characters; round budget "
            f"{_fmt(it.get('round_budget_ms'), 'g')} ms.",
            "",
        ]
        if it.get("rows"):
            lines += [_md_table(list(_INTERFERENCE_COLUMNS), _interference_rows(it)), ""]
            early = sum(r["streams_ended_early"] for r in it["rows"])
            if early:
                lines += [f"**{early} stream(s) ended before the long request did**: raise T.", ""]
        if it.get("error"):
            lines += [f"Stopped early: {it['error']}", ""]
    return "\n".join(lines).rstrip() + "\n"
