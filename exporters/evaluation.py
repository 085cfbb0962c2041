"""Held-out evaluation of models with a tokenizer of their own: the model's corpus split,
perplexity per token and bits per character (comparable across tokenizers)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from exporters.corpus import CorpusError, read_text_corpus, split_text, time_machine_path
from gru_serve.scoring import StepFn, d2l_perplexity, stream_logprobs


class EvalSplit(NamedTuple):
    """Token ids to evaluate on: training tokens, held-out tokens and the held-out text's
    length in characters (0: not known, no bits per character)."""

    train: list[int]
    heldout: list[int]
    heldout_chars: int = 0


def corpus_info(path: Path, sha1: str, text: str, holdout: float, max_tokens: int) -> dict[str, Any]:
    """What a checkpoint records to find its corpus split again."""
    return {
        "path": str(path),
        "sha1": sha1,
        "chars": len(text),
        "holdout": holdout,
        "max_tokens": max_tokens,
    }


def read_corpus_text(corpus: dict[str, Any]) -> str | None:
    """The recorded corpus text, if its file is still there (same sha1), or the packaged Time
    Machine for its sha1; None otherwise."""
    for path in (Path(corpus.get("path", "")), time_machine_path()):
        try:
            text, sha1 = read_text_corpus(path)
        except CorpusError:
            continue
        if sha1 == corpus.get("sha1"):
            return text
    return None


def tokenized_split(encode, text: str, holdout: float, max_tokens: int = 0) -> tuple[EvalSplit, str, str]:
    """(split, train text, held-out text): the text is split first (corpus.split_text), then
    each side is tokenized on its own; train keeps its first max_tokens (0: all)."""
    train_text, held_text = split_text(text, holdout)
    train = encode(train_text)
    if max_tokens:
        train = train[:max_tokens]
    held = encode(held_text) if held_text else []
    return EvalSplit(train, held, len(held_text)), train_text, held_text


def stream_nll_bits(step: StepFn, tokens: list[int], shape: tuple[int, int]) -> tuple[float, int]:
    """(total negative log-likelihood in bits, tokens scored) of one stream at batch 1 from a
    zero state; the first token only conditions the rest."""
    state = np.zeros((1, *shape), dtype=np.float32)
    lp = stream_logprobs(step, tokens, state)[0]
    return -float(np.sum(lp)) / math.log(2), len(lp)


def heldout_metrics(step: StepFn, split: EvalSplit, shape: tuple[int, int]) -> dict[str, float]:
    """heldout_stream (perplexity per token) and, with the held-out length, heldout_bpc (bits
    per character: the held-out tokens' total NLL in bits over the held-out characters)."""
    if not split.heldout:
        return {}
    bits, n = stream_nll_bits(step, split.heldout, shape)
    out = {"heldout_stream": 2 ** (bits / n) if n else float("nan")}
    if split.heldout_chars:
        out["heldout_bpc"] = bits / split.heldout_chars
    return out


def perplexities(step: StepFn, split: EvalSplit, shape: tuple[int, int]) -> dict[str, float]:
    """train_d2l, train_stream and the held-out metrics of a split."""
    from gru_serve.scoring import stream_perplexity

    out = {
        "train_d2l": d2l_perplexity(step, split.train, shape),
        "train_stream": stream_perplexity(step, split.train, shape),
    }
    return out | heldout_metrics(step, split, shape)
