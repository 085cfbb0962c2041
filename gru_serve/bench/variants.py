"""The variants section: `gru-export variants` (optimized, fp16, fused graphs) in a subprocess,
each variant's size, largest difference and perplexity beside the exported graph's, and its
µs/step at batch 1 here."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from gru_serve.bench import inprocess
from gru_serve.bench.section import Context, Section, fmt, md_table
from gru_serve.engine.runtime import ModelRuntime, RuntimeOptions

NOTES = [
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


def run_variants(model: Path, tokens: int, repeats: int) -> dict:
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
        for kind, path in (
            ("base", model),
            ("optimized", Path(tmp) / "optimized.onnx"),
            ("fp16", Path(tmp) / "fp16.onnx"),
        ):
            rt = ModelRuntime(path, RuntimeOptions(fast_path=False))
            timing[kind] = 1e6 * inprocess.best_of(lambda rt=rt: inprocess.loop_step(rt, 1, tokens), repeats)
    return {"report": rep, "timing": timing, "notes": NOTES}


class Variants(Section):
    skip = "no_variants"

    def run(self, ctx: Context) -> dict:
        ctx.step("variants (gru-export variants, subprocess)")
        out = {"variants": run_variants(ctx.model, ctx.mode.inproc.tokens, ctx.mode.inproc.repeats)}
        ctx.advance()
        return out

    def markdown(self, results: dict, plots: dict[str, str], prefix: str) -> list[str]:
        var = results.get("variants") or {}
        if var.get("skipped"):
            return ["## Variants", "", f"Skipped: {var['skipped']}", ""]
        if not var:
            return []
        base = var["report"]["base"]["perplexity"]
        rows = [
            ["base (exported)", "-", "-"]
            + [f"{base[k]:.4f}" for k in base]
            + [fmt(var["timing"].get("base"), ".1f")]
        ]
        for kind, r in var["report"].items():
            if kind == "base":
                continue
            ppl = r.get("perplexity") or {}
            change = r.get("perplexity_change") or {}
            cells = [f"{ppl[k]:.4f} ({change[k]:+.4%})" if k in ppl else "-" for k in base]
            diff = ", ".join(f"{k} {x:.1e}" for k, x in (r.get("max_diff") or {}).items()) or "-"
            timing = "fused rows above" if kind == "fused" else fmt(var["timing"].get(kind), ".1f")
            rows.append([kind, f"{r['bytes'] / 1e6:.2f} MB", diff, *cells, timing])
        header = ["variant", "size", "max abs diff vs base", *[f"perplexity {k}" for k in base]]
        return [
            "## Variants (`gru-export variants`)",
            "",
            md_table([*header, "µs/step, batch 1"], rows),
            "",
            *[f"- {n}" for n in var.get("notes", [])],
            "",
        ]


SECTION = Variants()
