"""Model cards: what a shipped model is, how well it does, and how to make it again."""

from __future__ import annotations

from pathlib import Path

from exporters.model import Checkpoint
from exporters.train import TokenizerTrainConfig, TrainConfig
from exporters.validate import ValidationReport

PPL_LABELS = {
    "train_d2l": "training tokens, the d2l way (batch 32, sequential, 35 steps, state carried)",
    "train_stream": "training tokens, one stream at batch 1 from a zero state",
    "heldout_stream": "held-out: the last 10% of the book (17,058 tokens the model never trained on), "
    "one stream at batch 1 from a zero state",
}


def train_command(recipe: dict, output: str) -> str:
    """The `gru-export train` command line that reproduces a recipe (defaults omitted)."""
    tokenized = "tokenizer" in recipe
    defaults = TokenizerTrainConfig() if tokenized else TrainConfig()
    flags = []
    for key, value in recipe.items():
        if getattr(defaults, key, None) == value and key not in ("corpus", "tokenizer"):
            continue
        if value is False or (key == "corpus" and not value):
            continue
        flag = "--" + key.replace("_", "-")
        flags.append(flag if value is True else f"{flag} {value}")
    return " ".join(["gru-export train", *flags, "-o", output])


def _ending(lines: list[str], report: ValidationReport, info: dict) -> str:
    """A card's validation checks and the commands that make the model again."""
    name = report.metadata.name
    lines += ["", "## Validation", ""] + [f"- {c}" for c in report.checks]
    if info.get("recipe"):
        ckpt = f"checkpoints/{name}.pt"
        lines += [
            "",
            "## Reproduce",
            "",
            "```",
            train_command(info["recipe"], ckpt),
            f"gru-export export {ckpt} -o model.onnx --name {name} --card README.md",
            "```",
        ]
    return "\n".join(lines) + "\n"


def render(report: ValidationReport, checkpoint: Checkpoint) -> str:
    if checkpoint.io is not None:
        return render_module(report, checkpoint)
    meta, info = report.metadata, checkpoint.info
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
    return _ending(lines, report, info)


def render_module(report: ValidationReport, checkpoint: Checkpoint) -> str:
    """The card of an embedding (or other module) model with a tokenizer of its own."""
    meta, info = report.metadata, checkpoint.info
    cfg = getattr(checkpoint.model, "config", None)
    corpus = info.get("corpus", {})
    if cfg is not None and hasattr(cfg, "embedding_size"):
        proj = cfg.tie_weights and cfg.embedding_size != cfg.hidden_size
        head = (
            f"Linear({cfg.hidden_size}, {cfg.embedding_size}) -> " if proj else ""
        ) + f"Linear({meta.vocab_size}){' tied to the embedding' if cfg.tie_weights else ''}"
        arch = (
            f"Embedding({meta.vocab_size}, {cfg.embedding_size}) -> GRU {meta.num_layers} x "
            f"{meta.hidden_size} -> {head}" + (" -> log_softmax" if cfg.log_softmax else "")
        )
    else:
        arch = f"{checkpoint.source}: GRU {meta.num_layers} x {meta.hidden_size}, vocab {meta.vocab_size}"
    lines = [f"# {meta.name}", "", meta.description, "", "| | |", "|---|---|", f"| architecture | {arch} |"]
    if checkpoint.tokenizer is not None:
        lines.append(f"| tokenizer | {checkpoint.tokenizer.describe()}, in the model's metadata |")
    if corpus:
        lines.append(
            f"| corpus | `{Path(corpus['path']).name}`, {corpus['chars']:,} characters, sha1 "
            f"`{corpus['sha1']}` |"
        )
    if info.get("metrics"):
        lines += [
            f"| training tokens | {info['train_tokens']:,} |",
            f"| held-out | the last {corpus.get('holdout', 0):.0%} of the text from a line start: "
            f"{info.get('heldout_chars', 0):,} characters, {info['heldout_tokens']:,} tokens, never seen "
            "in training (nor by the tokenizer) |",
            f"| training speed | {info['metrics']['tokens_per_second']:,.0f} tokens/s, "
            f"{info['metrics']['train_seconds']:.0f} s (CPU, torch {info['torch']}) |",
        ]
    labels = {
        "train_d2l": "perplexity per token, training tokens, the d2l way (batch 32, 35 steps, state carried)",
        "train_stream": "perplexity per token, training tokens, one stream at batch 1 from a zero state",
        "heldout_stream": "perplexity per token, held-out text, one stream at batch 1 from a zero state",
        "heldout_bpc": "bits per character, held-out text: the held-out tokens' total NLL in bits over "
        "its characters (comparable across tokenizers)",
    }
    if meta.perplexity:
        lines += ["", "## Evaluation (measured with onnxruntime on the exported model)", ""]
        lines += [f"- {v:.4f}: {labels.get(k, k)}" for k, v in meta.perplexity.items()]
    if info.get("samples"):
        lines += ["", "## Greedy samples (50 tokens)", ""]
        lines += [f"- `{s!r}`" for s in info["samples"].values()]
    return _ending(lines, report, info)
