"""The Time Machine corpus exactly as d2l.ai (0.17) prepares it, and its minibatch iterators."""

from __future__ import annotations

import collections
import hashlib
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from exporters.tokenizer import read_utf8
from gru_serve.contract import D2L_NORMALIZATION
from gru_serve.tokenizer import UNK, CharTokenizer

TIME_MACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
TIME_MACHINE_TOKENS = 170_580
DEFAULT_MAX_TOKENS = 10_000


class CorpusError(ValueError):
    pass


def time_machine_path() -> Path:
    return Path(str(resources.files("exporters") / "data" / "timemachine.txt"))


def read_time_machine(path: Path | None = None) -> list[str]:
    """The book's lines, preprocessed as d2l does; the file is checked against its sha1."""
    path = path or time_machine_path()
    raw = path.read_bytes()
    digest = hashlib.sha1(raw).hexdigest()
    if digest != TIME_MACHINE_SHA1:
        raise CorpusError(f"{path}: sha1 {digest} is not the Time Machine's {TIME_MACHINE_SHA1}")
    lines = raw.decode("utf-8").splitlines(keepends=True)
    return [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines]


def build_vocab(tokens: Sequence[str]) -> CharTokenizer:
    """d2l's Vocab: <unk> first, then tokens by descending frequency, ties in first-seen order."""
    counts = collections.Counter(tokens)
    ordered = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)  # stable sort
    return CharTokenizer((UNK, *(t for t, _ in ordered if t != UNK)), dict(D2L_NORMALIZATION))


@dataclass(frozen=True)
class Corpus:
    """Token ids of the whole book (vocabulary built from all of it, as d2l does)."""

    ids: list[int]
    vocab: CharTokenizer
    sha1: str = TIME_MACHINE_SHA1

    @classmethod
    def time_machine(cls, path: Path | None = None) -> Corpus:
        # Lines joined with no separator: d2l's samples read "accession ofcheerfulness".
        chars = [c for line in read_time_machine(path) for c in line]
        vocab = build_vocab(chars)
        return cls(vocab.encode("".join(chars)), vocab)

    def split(
        self, max_tokens: int = DEFAULT_MAX_TOKENS, holdout: float = 0.0
    ) -> tuple[list[int], list[int]]:
        """(train, held-out): held-out is the last `holdout` fraction of the whole stream,
        tokens from int((1 - holdout) * len) on; train is the first `max_tokens` before it
        (0 means all of them)."""
        if not 0.0 <= holdout < 1.0:
            raise CorpusError(f"holdout must be in [0, 1), got {holdout}")
        if max_tokens < 0:
            raise CorpusError(f"max_tokens must be >= 0, got {max_tokens}")
        cut = int((1.0 - holdout) * len(self.ids)) if holdout else len(self.ids)
        train = self.ids[:cut]
        if max_tokens:
            train = train[:max_tokens]
        return train, self.ids[cut:] if holdout else []


def seq_data_iter_sequential(
    corpus: Sequence[int],
    batch_size: int,
    num_steps: int,
    rng: random.Random,
    offset: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """d2l's sequential partitioning: row b continues row b of the previous minibatch."""
    if offset is None:
        offset = rng.randint(0, num_steps)
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    xs = torch.tensor(corpus[offset : offset + num_tokens]).reshape(batch_size, -1)
    ys = torch.tensor(corpus[offset + 1 : offset + 1 + num_tokens]).reshape(batch_size, -1)
    num_batches = xs.shape[1] // num_steps
    for i in range(0, num_steps * num_batches, num_steps):
        yield xs[:, i : i + num_steps], ys[:, i : i + num_steps]


def seq_data_iter_random(
    corpus: Sequence[int], batch_size: int, num_steps: int, rng: random.Random
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """d2l's random sampling: independent subsequences, shuffled."""
    corpus = corpus[rng.randint(0, num_steps - 1) :]
    num_subseqs = (len(corpus) - 1) // num_steps
    starts = list(range(0, num_subseqs * num_steps, num_steps))
    rng.shuffle(starts)
    num_batches = num_subseqs // batch_size
    for i in range(0, batch_size * num_batches, batch_size):
        batch = starts[i : i + batch_size]
        yield (
            torch.tensor([corpus[j : j + num_steps] for j in batch]),
            torch.tensor([corpus[j + 1 : j + 1 + num_steps] for j in batch]),
        )


def read_text_corpus(path: Path) -> tuple[str, str]:
    """(text, sha1) of a UTF-8 corpus file; CorpusError names the first bad byte's offset."""
    text, raw = read_utf8(path, "corpus", CorpusError)
    if not text.strip():
        raise CorpusError(f"corpus {path} is empty")
    return text.removeprefix("\ufeff"), hashlib.sha1(raw).hexdigest()


def split_text(text: str, holdout: float) -> tuple[str, str]:
    """(train, held-out) text: the held-out part is the last `holdout` fraction of the
    characters, starting at the first line start from int((1 - holdout) * len(text)) on (so a
    line-based tokenizer sees whole lines on both sides)."""
    if not 0.0 <= holdout < 1.0:
        raise CorpusError(f"holdout must be in [0, 1), got {holdout}")
    if not holdout:
        return text, ""
    cut = int((1.0 - holdout) * len(text))
    if cut > 0 and text[cut - 1] != "\n":
        nl = text.find("\n", cut)
        cut = nl + 1 if nl >= 0 else cut
    return text[:cut], text[cut:]


def d2l_normalize(text: str) -> str:
    """d2l's preprocessing of a text (read_time_machine's, on any text): each line lower-cased,
    every run of non-letters one space, stripped; the lines joined with no separator."""
    lines = text.splitlines(keepends=True)
    return "".join(re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines)
