"""A gru-serve server for benchmarks: `gru-serve serve` with the scheduler's knobs exposed.

    python -m gru_serve.bench.serve --port 0 [--fused-tokens K] [--round-budget-ms MS] [serve flags]

Prints `gru-serve listening on HOST:PORT` when ready, like `gru-serve serve`, and serves until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import fields

from gru_serve import logs
from gru_serve.cli import add_setting_flags
from gru_serve.scheduler import FUSED_TOKENS, ROUND_BUDGET_S
from gru_serve.server import GruServer
from gru_serve.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gru_serve.bench.serve", description=__doc__)
    add_setting_flags(p)
    p.add_argument(
        "--fused-tokens",
        type=int,
        default=FUSED_TOKENS,
        help=f"most tokens per job from one fused run; 1: the step path only (default {FUSED_TOKENS})",
    )
    p.add_argument(
        "--round-budget-ms",
        type=float,
        default=ROUND_BUDGET_S * 1000,
        help=f"time a fused round is sized to (default {ROUND_BUDGET_S * 1000:g})",
    )
    return p


async def serve(settings: Settings, fused_tokens: int, round_budget_s: float) -> int:
    server = GruServer(settings)
    await server.start()
    for sched in server.service.schedulers.values():
        sched.fused_tokens = fused_tokens
        sched.round_budget_s = round_budget_s
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"gru-serve listening on {settings.host}:{server.port}", flush=True)
    await stop.wait()
    await server.stop(0.5)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = {f.name for f in fields(Settings)}
    settings = Settings.load(**{k: v for k, v in vars(args).items() if k in names})
    logs.configure(settings.log_level)
    return asyncio.run(serve(settings, args.fused_tokens, args.round_budget_ms / 1000))


if __name__ == "__main__":
    sys.exit(main())
