"""The PyTorch eager section: exporters.torch_bench in a subprocess (gru_serve never imports
torch). Its figures appear in the in-process tables and goals; without torch it says why."""

from __future__ import annotations

import json
import subprocess
import sys

from gru_serve.bench.section import Context, Section


def subprocess_json(argv: list[str], timeout: float) -> dict:
    """The JSON a command prints last, or {"skipped": why}."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"{' '.join(argv[:3])} took over {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"{' '.join(argv[1:3])} failed: {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


class TorchEager(Section):
    skip = "no_torch"

    def run(self, ctx: Context) -> dict:
        ctx.step("PyTorch eager (subprocess)")
        ip = ctx.mode.inproc
        argv = [
            sys.executable,
            "-m",
            "exporters.torch_bench",
            "--model",
            str(ctx.model),
            "--tokens",
            str(ctx.mode.torch_tokens),
            "--batched-tokens",
            str(ctx.mode.torch_batched_tokens),
            "--batches",
            ",".join(map(str, ip.batches)),
            "--repeats",
            str(ip.repeats),
        ]
        out = {"torch": subprocess_json(argv, 900)}
        if "torch" in out["torch"]:
            out["versions"] = {**ctx.results["versions"], "torch": out["torch"]["torch"]}
        ctx.advance()
        return out


SECTION = TorchEager()
