"""Model cards: what a shipped model is, how well it does, and how to make it again."""

from __future__ import annotations

from exporters.model import Checkpoint
from exporters.train import TrainConfig
from exporters.validate import ValidationReport

PPL_LABELS = {
    "train_d2l": "training tokens, the d2l way (batch 32, sequential, 35 steps, state carried)",
    "train_stream": "training tokens, one stream at batch 1 from a zero state",
    "heldout_stream": "held-out: the last 10% of the book (17,058 tokens the model never trained on), "
    "one stream at batch 1 from a zero state",
}


def train_command(recipe: dict, output: str) -> str:
    """The `gru-export train` command line that reproduces a recipe (defaults omitted)."""
    defaults = TrainConfig()
    flags = []
    for key, value in recipe.items():
        if getattr(defaults, key, None) == value:
            continue
        flag = "--" + key.replace("_", "-")
        flags.append(flag if value is True else f"{flag} {value}")
    return " ".join(["gru-export train", *flags, "-o", output])


def render(report: ValidationReport, checkpoint: Checkpoint) -> str:
    meta, info = report.metadata, checkpoint.info
    ckpt = f"checkpoints/{meta.name}.pt"
    lines = [
        f"# {meta.name}",
        "",
        meta.description,
        "",
        "| | |",
        "|---|---|",
        f"| architecture | one-hot({meta.vocab_size}) -> GRU {meta.num_layers} x "
        f"{meta.hidden_size} -> Linear({meta.vocab_size}) |",
        f"| corpus | The Time Machine (d2l), sha1 `{meta.corpus_sha1}` |",
    ]
    if info:
        lines += [
            f"| training tokens | {info['train_tokens']:,} |",
            f"| training speed | {info['metrics']['tokens_per_second']:,.0f} tokens/s, "
            f"{info['metrics']['train_seconds']:.0f} s (CPU, torch {info['torch']}) |",
        ]
    lines += ["", "## Perplexity (measured with onnxruntime on the exported model)", ""]
    lines += [f"- {v:.4f}: {PPL_LABELS.get(k, k)}" for k, v in meta.perplexity.items()]
    if info.get("samples"):
        lines += ["", "## Greedy samples (50 characters)", ""]
        lines += [f"- `{s}`" for s in info["samples"].values()]
    lines += ["", "## Validation", ""] + [f"- {c}" for c in report.checks]
    if info.get("recipe"):
        lines += [
            "",
            "## Reproduce",
            "",
            "```",
            train_command(info["recipe"], ckpt),
            f"gru-export export {ckpt} -o model.onnx --name {meta.name} --card README.md",
            "```",
        ]
    return "\n".join(lines) + "\n"
