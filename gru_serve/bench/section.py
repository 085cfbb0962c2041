"""A bench section: it runs, and from its part of results.json gives goals, terminal tables,
plots and Markdown. gru_serve.bench.run runs the sections; gru_serve.bench.report writes them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gru_serve.bench import inprocess, served


@dataclass(frozen=True)
class Mode:
    inproc: inprocess.InProcessConfig
    load: served.LoadConfig
    torch_tokens: int
    torch_batched_tokens: int
    step_path_levels: tuple[int, ...]


@dataclass
class Context:
    """What a section's run gets: the model, the mode (`name` and its figures), the command
    line, the results so far, and the progress bar's two calls."""

    model: Path
    name: str
    mode: Mode
    args: argparse.Namespace
    results: dict
    step: Callable[[str], None] = lambda desc: None
    advance: Callable[[], None] = lambda: None
    runtimes: dict = field(default_factory=dict)  # name -> ModelRuntime the run already loaded


class Section:
    """One part of the bench. `skip`: the --no-... flag (an attribute of the parsed command line)
    that leaves it out ("": never left out)."""

    skip = ""

    def enabled(self, args: argparse.Namespace) -> bool:
        return not (self.skip and getattr(args, self.skip))

    def steps(self, ctx: Context) -> int:
        """Its ticks on the progress bar (it calls ctx.advance() that many times)."""
        return 1

    def run(self, ctx: Context) -> dict:
        """Its results: keys of results.json, merged into them."""
        raise NotImplementedError

    def goals(self, results: dict) -> list[dict]:
        return []

    def tables(self, results: dict, console: Console) -> None:
        pass

    def plots(self, results: dict, out_dir: Path) -> dict[str, str]:
        """PNG files written into out_dir: plot name -> file name."""
        return {}

    def markdown(self, results: dict, plots: dict[str, str], prefix: str) -> list[str]:
        """Its Markdown lines; `prefix` goes before a plot's or results.json's file name."""
        return []


# -- shared by the sections --


def goal(goal: str, value: float | None, target: float, higher: bool = True, note: str = "") -> dict:
    met = None if value is None else (value >= target if higher else value <= target)
    return {
        "goal": goal,
        "value": value,
        "target": target,
        "higher_is_better": higher,
        "met": met,
        "note": note,
    }


def fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def table(title: str, columns: tuple[str, ...], rows: list[list[str]], left: str = "server") -> Table:
    """A section's console table: the `left` column left, figures right."""
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, justify="left" if col == left else "right")
    for row in rows:
        t.add_row(*row)
    return t


def row(rows: list[dict] | None, name: str, batch: int) -> dict | None:
    return next((r for r in rows or [] if r["name"] == name and r["batch"] == batch), None)


def level(levels: list[dict] | None, c: int) -> dict | None:
    return next((lv for lv in levels or [] if lv["concurrency"] == c), None)


def best_batched(ip: dict, batch: int) -> float | None:
    """The best in-process tokens/s at this batch (any path)."""
    return max((r["tokens_per_s"] for r in ip.get("batched") or [] if r["batch"] == batch), default=None)


def pyplot():
    """matplotlib's pyplot, drawing to files only (the bench extra installs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stopped(what: str, results: dict) -> str:
    """Why a section has no rows: skipped or stopped with an error."""
    return f"{what} skipped: {results.get('skipped') or results.get('error')}"
