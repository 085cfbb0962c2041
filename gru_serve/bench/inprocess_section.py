"""The in-process section: decode loops at batch 1 and batched, seeded sampling, the scheduler
without gRPC, the shipped models and onnxruntime's settings (gru_serve.bench.inprocess), beside
PyTorch eager's figures (the torch section); its goals are ratios to the d2l-style eager loop."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from gru_serve.bench import inprocess
from gru_serve.bench.section import Context, Section, fmt, goal, md_table, pyplot, row
from gru_serve.shipped import shipped_models

TORCH_BATCH1 = (
    ("d2l", "PyTorch eager, d2l predict_ch8 (autograd on)"),
    ("no_grad", "PyTorch eager, no_grad"),
)
TORCH_BATCH1_MD = (
    ("d2l", "PyTorch eager, d2l's predict_ch8 as written (autograd on)"),
    ("no_grad", "PyTorch eager, the same loop under no_grad"),
)


def torch_batched(results: dict, batch: int) -> tuple[float, str] | None:
    """The faster of PyTorch eager's default-threads and one-thread runs at this batch."""
    t = results.get("torch") or {}
    best = None
    for key in ("batched", "batched_1_thread"):
        for r in t.get(key, []):
            if r["batch"] == batch and (best is None or r["tokens_per_s"] > best[0]):
                best = (r["tokens_per_s"], f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}")
    return best


def choose_settings(rows: list[dict]) -> str:
    """The fastest graph optimisation level and thread count in process, at each batch size,
    and what the server keeps."""
    if not rows:
        return "-"
    wins = []
    for b in sorted({r["batch"] for r in rows}):
        top = max((r for r in rows if r["batch"] == b), key=lambda r: r["tokens_per_s"])
        wins.append(f"batch {b}: {top['what']}")
    return (
        "fastest in process: " + "; ".join(wins) + ". The levels differ by noise only: the exported "
        "graph has nothing for the extended and layout optimisers to fuse, and the derived graphs are "
        "already minimal. The server keeps intra_op_threads=1: a second onnxruntime thread spins on the "
        "core that the gRPC event loop and the clients need (served with intra_op_threads=2: see Served)."
    )


def _batched_rows(results: dict, torch_labels: tuple[str, str]) -> tuple[list[int], list[list[str]]]:
    """The batched table: PyTorch eager's rows, then each in-process path, tokens/s per batch."""
    ip, torch = results.get("inprocess") or {}, results.get("torch") or {}
    batches = sorted({r["batch"] for r in ip["batched"]})
    rows = []
    for key, label in zip(("batched", "batched_1_thread"), torch_labels, strict=True):
        if torch.get(key):
            rows.append(
                [label]
                + [
                    fmt(next((r["tokens_per_s"] for r in torch[key] if r["batch"] == b), None))
                    for b in batches
                ]
            )
    for name in dict.fromkeys(r["name"] for r in ip["batched"]):
        what = next(r["what"] for r in ip["batched"] if r["name"] == name)
        rows.append([what] + [fmt((row(ip["batched"], name, b) or {}).get("tokens_per_s")) for b in batches])
    return batches, rows


class InProcess(Section):
    def steps(self, ctx: Context) -> int:
        return 4 + (0 if ctx.args.no_tuning else 1)

    def run(self, ctx: Context) -> dict:
        ip, fast, exported = ctx.mode.inproc, ctx.runtimes["fast"], ctx.runtimes["exported"]
        res: dict = {}
        out: dict = {"inprocess": res}
        for key, desc, measure in (
            ("batch1", "batch 1 decode loops", lambda: inprocess.batch1(ip, exported, fast)),
            ("batched", "batched", lambda: inprocess.batched(ip, exported, fast)),
            ("sampling", "seeded sampling", lambda: inprocess.sampling(ip, fast)),
            ("scheduler", "scheduler without gRPC", lambda: inprocess.scheduler(ip, fast)),
        ):
            ctx.step(f"in process: {desc}")
            res[key] = measure()
            ctx.advance()
        ctx.step("in process: the shipped models")
        res["shipped"] = inprocess.shipped(ip, shipped_models())
        if not ctx.args.no_tuning:
            ctx.step("in process: onnxruntime settings")
            res["tuning"] = inprocess.tuning(ip)
            out["tuning_choice"] = choose_settings(res["tuning"])
            ctx.advance()
        return out

    def goals(self, results: dict) -> list[dict]:
        ip = results.get("inprocess") or {}
        b1 = ip.get("batch1")
        d2l = ((results.get("torch") or {}).get("d2l") or {}).get("tokens_per_s")
        k = results["settings"]["inprocess"]["server_k"]
        step = row(b1, "ort_decode_iobinding", 1)
        plain = row(b1, "ort_exported_step", 1)
        fused = fused_batch1(results)
        out = [
            goal(
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
            goal(
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
            eager = torch_batched(results, b)
            how = f"best of our step path and fused loop vs PyTorch's best ({eager[1]})" if eager else ""
            out.append(
                goal(
                    f"onnxruntime batched at {b}: x PyTorch eager at {b}",
                    ours / eager[0] if ours and eager else None,
                    1.0,
                    note=how,
                )
            )
        return out

    def tables(self, results: dict, console: Console) -> None:
        ip = results.get("inprocess") or {}
        t = Table(title="Batch 1, greedy: one stream's decode loop", title_justify="left")
        for col in ("path", "µs/token", "tokens/s", "x d2l eager"):
            t.add_column(col, justify="left" if col == "path" else "right")
        for r in _batch1_rows(results, TORCH_BATCH1):
            t.add_row(*r)
        console.print(t)
        if ip.get("batched"):
            t = Table(title="Batched greedy decoding: tokens/s", title_justify="left")
            batches, rows = _batched_rows(
                results, ("PyTorch eager (default threads)", "PyTorch eager (1 thread)")
            )
            t.add_column("path")
            for b in batches:
                t.add_column(f"batch {b}", justify="right")
            for r in rows:
                t.add_row(*r)
            console.print(t)

    def plots(self, results: dict, out_dir: Path) -> dict[str, str]:
        ip, torch = results.get("inprocess") or {}, results.get("torch") or {}
        if not (ip.get("batched") or ip.get("batch1")):
            return {}
        plt = pyplot()
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
        return {"inprocess": "inprocess.png"}

    def markdown(self, results: dict, plots: dict[str, str], prefix: str) -> list[str]:
        ip, torch = results.get("inprocess") or {}, results.get("torch") or {}
        s = results["settings"]
        lines: list[str] = []
        if "inprocess" in plots:
            lines += ["## In process", "", f"![in-process]({prefix}{plots['inprocess']})", ""]
        rows = _batch1_rows(results, TORCH_BATCH1_MD)
        if rows:
            lines += [
                "### One stream, greedy",
                "",
                md_table(["path", "µs/token", "tokens/s", "x d2l eager"], rows),
                "",
            ]
        if torch.get("skipped"):
            lines += [f"PyTorch timings skipped: {torch['skipped']}", ""]
        if ip.get("batched"):
            batches, rows = _batched_rows(
                results, ("PyTorch eager, no_grad (default threads)", "PyTorch eager, no_grad (1 thread)")
            )
            lines += [
                "### Batched greedy decoding (tokens/s)",
                "",
                md_table(["path"] + [f"batch {b}" for b in batches], rows),
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
                md_table(["path", "batch", "µs/token", "tokens/s"], rows),
                "",
            ]
        if ip.get("scheduler"):
            rows = [[r["what"], str(r["batch"]), f"{r['tokens_per_s']:,.0f}"] for r in ip["scheduler"]]
            lines += [
                "### The scheduler without gRPC",
                "",
                f"Jobs of {s['inprocess']['scheduler_tokens']} greedy tokens submitted at once; events go "
                "to a plain callback.",
                "",
                md_table(["path", "jobs", "tokens/s"], rows),
                "",
            ]
        return lines + _shipped_md(ip, s) + _tuning_md(results)


def fused_batch1(results: dict) -> dict | None:
    """The fused path at the server's K, batch 1: the batch-1 loops time it at a few K (quick
    mode may leave out the server's); the batched rows always time it at the server's K."""
    ip = results.get("inprocess") or {}
    k = results["settings"]["inprocess"]["server_k"]
    return row(ip.get("batch1"), f"fused_k{k}", 1) or row(ip.get("batched"), f"fused_k{k}", 1)


def _batch1_rows(results: dict, labels: tuple[tuple[str, str], ...]) -> list[list[str]]:
    """PyTorch eager's batch-1 rows, then ours: path, µs/token, tokens/s, x d2l eager."""
    ip, torch = results.get("inprocess") or {}, results.get("torch") or {}
    d2l = (torch.get("d2l") or {}).get("tokens_per_s")
    rows = []
    for key, label in labels:
        if key in torch:
            r = torch[key]
            rows.append(
                [
                    label,
                    fmt(r["us_per_token"], ".1f"),
                    fmt(r["tokens_per_s"]),
                    fmt(r["tokens_per_s"] / d2l, ".2f"),
                ]
            )
    for r in ip.get("batch1") or []:
        rows.append(
            [
                r["what"],
                fmt(r["us_per_token"], ".1f"),
                fmt(r["tokens_per_s"]),
                fmt(r["tokens_per_s"] / d2l if d2l else None, ".2f"),
            ]
        )
    return rows


def _shipped_md(ip: dict, s: dict) -> list[str]:
    if not ip.get("shipped"):
        return []
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
    return [
        "### The shipped models",
        "",
        f"Fused path, K = {s['inprocess']['server_k']}, greedy. Characters per token: a paragraph of "
        "the book as the model's tokenizer splits it (d2l's models see the normalised text).",
        "",
        md_table(["model", "batch", "tokens/s", "chars/token", "chars/s"], rows),
        "",
    ]


def _tuning_md(results: dict) -> list[str]:
    tuning = (results.get("inprocess") or {}).get("tuning")
    if not tuning:
        return []
    batches = sorted({r["batch"] for r in tuning})
    rows = []
    for what in dict.fromkeys(r["what"] for r in tuning):
        rr = [r for r in tuning if r["what"] == what]
        rows.append(
            [what]
            + [fmt(next((r["tokens_per_s"] for r in rr if r["batch"] == b), None)) for b in batches]
            + [f"{rr[0]['exported_load_s'] * 1000:.0f}"]
        )
    return [
        "### onnxruntime settings (decode step + IOBinding, tokens/s)",
        "",
        md_table(["setting"] + [f"batch {b}" for b in batches] + ["load ms"], rows),
        "",
        f"Chosen: {results.get('tuning_choice', '-')}",
        "",
    ]


SECTION = InProcess()
