"""`gru-serve bench`: in-process and served latency and throughput, side by side with PyTorch
eager and a plain PyTorch gRPC server, in one run; a table, JSON, PNG plots and Markdown.

PyTorch runs only in subprocesses (exporters.torch_bench, exporters.baseline_server,
gru-export variants): gru_serve never imports torch. Without torch or the exporters, those
sections are skipped and say why.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from gru_serve.bench import inprocess, machine, report, served
from gru_serve.bench.section import Context, Mode
from gru_serve.engine.runtime import ModelRuntime, RuntimeOptions
from gru_serve.ops.settings import Settings
from gru_serve.shipped import default_model_path

SCHEMA = "gru-serve-bench/1"
BASELINE_WORKERS = 10
SKIP_HELP = {
    "torch": "skip PyTorch eager (a subprocess)",
    "served": "skip the served sweep (our server, its variants and the baseline)",
    "baseline": "skip the baseline PyTorch gRPC server in the served sweep",
    "variants": "skip gru-export variants (optimized, fp16, fused graphs)",
    "tuning": "skip the onnxruntime settings (optimisation levels, threads)",
    "scaleout": "skip scale-out (replicas behind Envoy sharing sessions in Redis)",
    "prefix": "skip the prefix cache (servers with and without it)",
    "http": "skip HTTP/SSE beside gRPC",
    "interference": "skip interference (64 streams while a 16,000-character prompt is prefilled)",
    "plots": "write no PNG plots",
}


def mode_config(name: str, model: Path) -> Mode:
    if name == "full":
        return Mode(inprocess.InProcessConfig(model), served.LoadConfig(), 2000, 20000, (1, 64))
    if name == "quick":
        return Mode(
            inprocess.InProcessConfig(
                model,
                tokens=500,
                batched_tokens=4000,
                repeats=2,
                fused_k=(16, 32),
                tuning_levels=("basic", "all"),
                tuning_batches=(1, 64),
                scheduler_tokens=128,
            ),
            served.LoadConfig(concurrency=(1, 16, 64), tokens=128, level_tokens=4096, level_timeout_s=60),
            500,
            4000,
            (1, 64),
        )
    # tiny: seconds, for tests
    return Mode(
        inprocess.InProcessConfig(
            model,
            tokens=20,
            batched_tokens=40,
            batches=(1, 4),
            fused_k=(4,),
            server_k=4,
            repeats=1,
            tuning_batches=(1,),
            tuning_levels=("all",),
            tuning_threads=(1,),
            scheduler_batches=(1, 4),
            scheduler_tokens=16,
        ),
        served.LoadConfig(concurrency=(1, 4), tokens=16, level_tokens=32, level_timeout_s=30),
        20,
        40,
        (1,),
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a shorter run (under 2 minutes)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds; for tests
    p.add_argument("--model", type=Path, default=None, help="ONNX model (default: the shipped d2l model)")
    p.add_argument(
        "-o",
        "--output-dir",
        type=Path,
        default=Path("bench-results"),
        help="where results.json and the PNG plots go (default bench-results)",
    )
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="write the Markdown report here (default OUTPUT_DIR/benchmarks.md)",
    )
    p.add_argument("--target", default="", help="benchmark this running server instead of starting one")
    p.add_argument("--concurrency", default="", help="served sweep, e.g. 1,4,16,64,256")
    p.add_argument("--tokens", type=int, default=0, help="new tokens per served request")
    p.add_argument("--baseline-workers", type=int, default=BASELINE_WORKERS, help="baseline server threads")
    for section in (
        "torch",
        "served",
        "baseline",
        "variants",
        "tuning",
        "scaleout",
        "prefix",
        "http",
        "interference",
        "plots",
    ):
        p.add_argument(
            f"--no-{section}", action="store_true", help=SKIP_HELP.get(section, f"skip the {section} section")
        )
    p.add_argument(
        "--gpu-check", action="store_true", help="CUDA parity test and in-process bench, then exit"
    )


def main(args: argparse.Namespace) -> int:
    if args.gpu_check:
        from gru_serve.bench.gpu import gpu_check

        return gpu_check(args.model)
    console = Console()
    # One line says where the model runs (below); not a warning per runtime the bench loads.
    logging.getLogger("gru_serve.engine.runtime").setLevel(logging.ERROR)
    model = (args.model or default_model_path()).resolve()
    name = "tiny" if args.tiny else "quick" if args.quick else "full"
    mode = mode_config(name, model)
    load = mode.load
    if args.concurrency:
        load = replace(load, concurrency=tuple(int(c) for c in args.concurrency.split(",") if c))
    if args.tokens:
        load = replace(load, tokens=args.tokens)
    mode = replace(mode, load=load)
    fast = ModelRuntime(model)
    exported = ModelRuntime(model, RuntimeOptions(fast_path=False))
    console.print(f"bench ({name}): {model.name} on {fast.provider}; fast path {fast.fast_path_note}")
    defaults = Settings.load()  # what the served runs get: they inherit GRU_SERVE_* too
    shown = model.relative_to(Path.cwd()) if model.is_relative_to(Path.cwd()) else model
    results: dict = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "mode": name,
        "machine": machine.machine_info(),
        "versions": machine.versions(),
        "provider": fast.provider,
        "providers": machine.providers(),
        "model": {
            "path": str(shown),
            "name": fast.name,
            "hidden": fast.metadata.hidden_size,
            "layers": fast.metadata.num_layers,
            "vocab": fast.metadata.vocab_size,
            "fast_path": fast.fast_path_note,
        },
        "settings": {
            "model": str(shown),
            "inprocess": {**asdict(mode.inproc), "model": str(shown)},
            "runtime": asdict(RuntimeOptions()),
            "server": (
                f"intra_op_threads={defaults.intra_op_threads}, "
                f"inter_op_threads={defaults.inter_op_threads}, "
                f"io_binding={defaults.io_binding}, max_batch_size={defaults.max_batch_size}, "
                f"fused_tokens={defaults.fused_tokens}, round_budget={defaults.round_budget_ms:g} ms, "
                f"prefill_chunk={defaults.prefill_chunk}, engine={defaults.engine}"
            ),
        },
        "notes": [
            "The machine is shared (other work may run on the same cores); compare rows of one run, "
            "not figures across runs.",
            "Served, the model, the server's gRPC event loop (one Python thread doing the per-message and "
            "per-token work) and the load generator share the same CPUs; the scheduler-without-gRPC rows "
            "and the variant servers (step path only, intra_op_threads=2, engine in a thread) show where the "
            "time goes.",
        ],
    }
    sections = [s for s in report.SECTIONS if s.enabled(args)]
    ctx = Context(model, name, mode, args, results, runtimes={"fast": fast, "exported": exported})
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("in process", total=sum(s.steps(ctx) for s in sections))
        ctx.step = lambda desc: progress.update(task, description=desc)
        ctx.advance = lambda: progress.advance(task)
        for section in sections:
            results |= section.run(ctx)
    results["goals"] = report.goals(results)
    results["machine"]["load_average_at_end"] = machine.machine_info()["load_average_at_start"]
    out_dir = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_files = {} if args.no_plots else report.plots(results, out_dir)
    md_path = args.markdown or out_dir / "benchmarks.md"
    rel = "" if md_path.parent.resolve() == out_dir.resolve() else _relative(out_dir, md_path.parent)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(report.markdown(results, plot_files, rel))
    report.print_tables(results, console)
    met = [g for g in results["goals"] if g["met"] is not None]
    console.print(
        f"bench ({name}): {sum(g['met'] for g in met)}/{len(met)} goals met; "
        f"wrote {out_dir / 'results.json'}, "
        f"{', '.join(plot_files.values()) or 'no plots'} and {md_path}"
    )
    return 0


def _relative(target: Path, start: Path) -> str:
    return os.path.relpath(target.resolve(), start.resolve()).replace(os.sep, "/") + "/"
