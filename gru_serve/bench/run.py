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
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from gru_serve.bench import (
    inprocess,
    interference,
    machine,
    prefix,
    report,
    scaleout,
    served,
    transports,
)
from gru_serve.engine.runtime import ModelRuntime, RuntimeOptions
from gru_serve.ops.settings import Settings
from gru_serve.shipped import default_model_path, shipped_models

SCHEMA = "gru-serve-bench/1"
BASELINE_WORKERS = 10
SERVED_METHOD = (
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


# Sections that start their own servers: (the flag that skips it, results key, label, module
# with mode_config(name) and run(model, config, on_step)).
SECTIONS = (
    ("no_prefix", "prefix_cache", "prefix cache", prefix),
    ("no_http", "transports", "HTTP/SSE beside gRPC", transports),
    ("no_interference", "interference", "interference", interference),
)


@dataclass(frozen=True)
class Mode:
    inproc: inprocess.InProcessConfig
    load: served.LoadConfig
    torch_tokens: int
    torch_batched_tokens: int
    step_path_levels: tuple[int, ...]


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


def _subprocess_json(argv: list[str], timeout: float) -> dict:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"{' '.join(argv[:3])} took over {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"{' '.join(argv[1:3])} failed: {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_torch(model: Path, mode: Mode) -> dict:
    ip = mode.inproc
    argv = [
        sys.executable,
        "-m",
        "exporters.torch_bench",
        "--model",
        str(model),
        "--tokens",
        str(mode.torch_tokens),
        "--batched-tokens",
        str(mode.torch_batched_tokens),
        "--batches",
        ",".join(map(str, ip.batches)),
        "--repeats",
        str(ip.repeats),
    ]
    return _subprocess_json(argv, 900)


def run_variants(model: Path, mode: Mode) -> dict:
    with tempfile.TemporaryDirectory(prefix="gru-variants-") as tmp:
        argv = [
            sys.executable,
            "-m",
            "exporters.cli",
            "variants",
            str(model),
            "-o",
            tmp,
            "--kinds",
            "optimized,fp16,fused",
        ]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return {"skipped": "gru-export variants took over 600 s"}
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {"skipped": f"gru-export variants failed: {last}"}
        rep = json.loads((Path(tmp) / "variants.json").read_text())
        timing = {}
        steps = mode.inproc.tokens
        for kind, path in (
            ("base", model),
            ("optimized", Path(tmp) / "optimized.onnx"),
            ("fp16", Path(tmp) / "fp16.onnx"),
        ):
            rt = ModelRuntime(path, RuntimeOptions(fast_path=False))
            timing[kind] = 1e6 * inprocess.best_of(
                lambda rt=rt: inprocess.loop_step(rt, 1, steps), mode.inproc.repeats
            )
    notes = [
        "µs/step: the exported graph (or variant) with plain session.run, batch 1, greedy.",
        "optimized: onnxruntime's offline optimisation (basic level, portable) only folds constants in this "
        "graph; onnxruntime applies the same optimisations when it loads the exported model, so it changes "
        "neither numbers nor speed here. The optimisation that pays is the derived decode graph "
        "(in-process tables).",
        "fp16: weights stored as float16 and cast back to float32 in the graph: half the file; on CPU "
        "onnxruntime folds the casts at load, so it runs at float32 speed with the weights' rounding "
        "(the perplexity change).",
        "fused: its tokens equal the step path's, greedy and seeded (checked by gru-export variants).",
    ]
    return {"report": rep, "timing": timing, "notes": notes}


def run_served(model: Path, mode: Mode, args: argparse.Namespace, progress, task) -> dict:
    cfg = mode.load
    out: dict = {"method": SERVED_METHOD, "config": asdict(cfg), "baseline_workers": args.baseline_workers}

    def advance(name: str):
        def f(level: dict) -> None:
            progress.update(
                task, advance=1, description=f"served: {name}, {level['concurrency']} streams done"
            )

        return f

    if args.target:
        out["ours_target"] = args.target
        out["ours"] = served.sweep(args.target, cfg, advance("gru-serve"))
    else:
        with served.ServerProcess("gru-serve", served.ours_argv(model)) as srv:
            out["ours"] = served.sweep(srv.target, cfg, advance("gru-serve"))
        levels = tuple(c for c in mode.step_path_levels if c in cfg.concurrency)
        for key, extra, label in VARIANT_SERVERS:
            if levels:
                with served.ServerProcess(key, served.ours_argv(model, extra)) as srv:
                    out[key] = served.sweep(srv.target, cfg, advance(label), levels)
    if not args.no_baseline:
        try:
            with served.ServerProcess("baseline", served.baseline_argv(model, args.baseline_workers)) as srv:
                out["baseline"] = served.sweep(srv.target, cfg, advance("baseline"))
        except RuntimeError as e:
            out["baseline_skipped"] = str(e).splitlines()[0]
    return out


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
    sections = ["batch 1", "batched", "sampling", "scheduler"]
    sections += [] if args.no_tuning else ["tuning"]
    sections += [] if args.no_torch else ["torch"]
    sections += [] if args.no_variants else ["variants"]
    sections += [] if args.no_scaleout else ["scaleout"]
    sections += [] if args.no_prefix else ["prefix"]
    sections += [] if args.no_http else ["http"]
    sections += [] if args.no_interference else ["interference"]
    n_served = 0
    if not args.no_served:
        n_served = len(load.concurrency) * (1 if args.no_baseline else 2)
        n_levels = len([c for c in mode.step_path_levels if c in load.concurrency])
        n_served += 0 if args.target else n_levels * len(VARIANT_SERVERS)
    ip = mode.inproc
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("in process", total=len(sections) + n_served)
        res_ip: dict = {}
        results["inprocess"] = res_ip

        def step(desc: str) -> None:
            progress.update(task, description=desc)

        step("in process: batch 1 decode loops")
        res_ip["batch1"] = inprocess.batch1(ip, exported, fast)
        progress.advance(task)
        step("in process: batched")
        res_ip["batched"] = inprocess.batched(ip, exported, fast)
        progress.advance(task)
        step("in process: seeded sampling")
        res_ip["sampling"] = inprocess.sampling(ip, fast)
        progress.advance(task)
        step("in process: scheduler without gRPC")
        res_ip["scheduler"] = inprocess.scheduler(ip, fast)
        progress.advance(task)
        step("in process: the shipped models")
        res_ip["shipped"] = inprocess.shipped(ip, shipped_models())
        if not args.no_tuning:
            step("in process: onnxruntime settings")
            res_ip["tuning"] = inprocess.tuning(ip)
            results["tuning_choice"] = choose_settings(res_ip["tuning"])
            progress.advance(task)
        if not args.no_torch:
            step("PyTorch eager (subprocess)")
            results["torch"] = run_torch(model, mode)
            if "torch" in results["torch"]:
                results["versions"]["torch"] = results["torch"]["torch"]
            progress.advance(task)
        if not args.no_variants:
            step("variants (gru-export variants, subprocess)")
            results["variants"] = run_variants(model, mode)
            progress.advance(task)
        if not args.no_served:
            step("served")
            try:
                results["served"] = run_served(model, mode, args, progress, task)
            except RuntimeError as e:
                results["served"] = {"skipped": str(e).splitlines()[0]}
        if not args.no_scaleout:
            step("scale-out")
            results["scaleout"] = scaleout.run(
                scaleout.mode_config(name), lambda label: step(f"scale-out: {label}")
            )
            progress.advance(task)
        for skip, key, label, section in SECTIONS:
            if getattr(args, skip):
                continue
            step(label)
            results[key] = section.run(
                model, section.mode_config(name), lambda what, label=label: step(f"{label}: {what}")
            )
            progress.advance(task)
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
