"""Tokenizers that travel with a model, in its ONNX metadata (gru_serve.contract, TOKENIZER_KINDS).

- "words": a word list (vocab.txt, one token per line, in id order), PyTorch
  word_language_model's convention: each line is split on whitespace (or into characters)
  and `<eos>` ends it; `<unk>` stands for a token outside the list, where the list has one.
- "huggingface": any Hugging Face `tokenizers` tokenizer.json (BPE, byte-level or not,
  WordPiece, Unigram, WordLevel), held whole in the metadata.

d2l's character models keep their exporters.model CharTokenizer ("chars", d2l normalisation);
everything here uses IDENTITY_NORMALIZATION: the tokenizer normalises, the contract does not.

Training (`gru-export train --tokenizer char|word|bpe:N`) builds one from a corpus: a
character or word list ("words" kind, split chars or whitespace) or a byte-level BPE with the
`tokenizers` library.
"""

from __future__ import annotations

import collections
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gru_serve.contract import IDENTITY_NORMALIZATION
from gru_serve.tokenizer import CharTokenizer, HuggingFaceTokenizer, WordTokenizer

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("whitespace", "chars")


def read_utf8(path: Path, what: str, error: type[ValueError]) -> tuple[str, bytes]:
    """(text, bytes) of a UTF-8 file; `error` names the file and, for bad UTF-8, the first bad
    byte and its offset."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise error(f"{what} {path} does not exist") from e
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from e
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError as e:
        raise error(
            f"{what} {path} is not UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start} ({e.reason})"
        ) from e


class TokenizerError(ValueError):
    """A tokenizer cannot be read or does not fit the model; the message says why."""


@dataclass(frozen=True)
class Tokenizer:
    """Text -> ids for a model: its metadata (`spec`, `json`) and id -> token list (`tokens`)."""

    spec: dict[str, Any]  # gru_serve.tokenizer
    tokens: tuple[str, ...]  # gru_serve.vocab: id -> token string
    json: str = ""  # gru_serve.tokenizer_json (kind "huggingface")
    source: str = ""  # where it came from, for messages
    _index: dict[str, int] = field(init=False, repr=False, compare=False)
    _hf: Any = field(init=False, repr=False, compare=False, default=None)
    _served: Any = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})
        if self.kind == "huggingface":
            object.__setattr__(self, "_hf", _hf_from_str(self.json, self.source or "tokenizer.json"))
            served = HuggingFaceTokenizer(self.tokens, self.json)
        else:
            spec = self.spec
            served = WordTokenizer(self.tokens, spec["split"], spec.get("eos"), spec.get("unk"))
        object.__setattr__(self, "_served", served)

    @property
    def kind(self) -> str:
        return self.spec["kind"]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def normalization(self) -> dict[str, Any]:
        return dict(IDENTITY_NORMALIZATION)

    def vocabulary(self) -> CharTokenizer:
        return CharTokenizer(self.tokens, self.normalization)

    def describe(self) -> str:
        if self.kind == "words":
            what = "characters" if self.spec["split"] == "chars" else "whitespace-split words"
            eos = f", {EOS} at line ends" if self.spec["eos"] else ""
            return f"word list of {len(self):,} {what}{eos}"
        model = json.loads(self.json).get("model", {}).get("type", "?")
        return f"Hugging Face tokenizer ({model}, {len(self):,} tokens)"

    def encode(self, text: str) -> list[int]:
        """The ids of `text`. words: each line (text split at '\\n'; a final '\\n' ends the last
        line) split on whitespace or into characters, then `eos`; huggingface:
        `Tokenizer.encode(text).ids`."""
        if self.kind == "huggingface":
            return list(self._hf.encode(text).ids)
        eos, unk = self.spec.get("eos"), self.spec.get("unk")
        lines = text.split("\n")
        if text.endswith("\n"):
            lines.pop()
        ids: list[int] = []
        unk_id = self._index.get(unk) if unk else None
        for line in lines:
            for tok in line.split() if self.spec["split"] == "whitespace" else line:
                i = self._index.get(tok, unk_id)
                if i is None:
                    raise TokenizerError(f"token {tok!r} is not in the vocabulary, which has no {UNK}")
                ids.append(i)
            if eos:
                ids.append(self._index[eos])
        return ids

    def decode(self, ids: list[int]) -> str:
        """The server's decoding (gru_serve.tokenizer): one set of rules for both sides."""
        return self._served.decode(list(ids))

    def metadata(self) -> tuple[dict[str, Any], str]:
        """(gru_serve.tokenizer, gru_serve.tokenizer_json)."""
        return dict(self.spec), self.json

    def to_dict(self) -> dict[str, Any]:
        """For a checkpoint (torch.load(weights_only=True) reads it back)."""
        return {"spec": json.dumps(self.spec), "tokens": list(self.tokens), "json": self.json}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "checkpoint") -> Tokenizer:
        return cls(json.loads(d["spec"]), tuple(d["tokens"]), d.get("json", ""), source)


def _hf_from_str(text: str, source: str):
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"{source} is not a Hugging Face tokenizer.json: {msg}") from e


def words_tokenizer(
    tokens: list[str] | tuple[str, ...], split: str = "whitespace", source: str = ""
) -> Tokenizer:
    """A "words" tokenizer from an id -> token list; `<eos>` and `<unk>` are used if present."""
    if split not in SPLITS:
        raise TokenizerError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    where = source or "the word list"
    seen: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok == "":
            raise TokenizerError(f"{where}: token {i} is empty")
        if tok in seen:
            raise TokenizerError(f"{where}: token {tok!r} appears twice (ids {seen[tok]} and {i})")
        if split == "whitespace" and tok not in (EOS, UNK) and any(c.isspace() for c in tok):
            raise TokenizerError(
                f"{where}: token {i} ({tok!r}) has whitespace, which --split whitespace never produces"
            )
        seen[tok] = i
    if not tokens:
        raise TokenizerError(f"{where} has no tokens")
    spec = {
        "kind": "words",
        "split": split,
        "eos": EOS if EOS in seen else None,
        "unk": UNK if UNK in seen else None,
    }
    return Tokenizer(spec, tuple(tokens), "", source)


def huggingface_tokenizer(text: str, source: str = "tokenizer.json") -> Tokenizer:
    """A "huggingface" tokenizer from tokenizer.json text; the vocabulary is get_vocab() inverted
    and must give every id 0..V-1 exactly one token."""
    hf = _hf_from_str(text, source)
    vocab = hf.get_vocab(with_added_tokens=True)
    size = max(vocab.values(), default=-1) + 1
    by_id: dict[int, str] = {}
    for tok, i in vocab.items():
        if i in by_id:
            raise TokenizerError(f"{source}: id {i} has two tokens ({by_id[i]!r} and {tok!r})")
        by_id[i] = tok
    missing = [i for i in range(size) if i not in by_id]
    if missing or size == 0:
        first = missing[0] if missing else 0
        raise TokenizerError(f"{source}: no token has id {first}; the ids must cover 0..V-1")
    spec = {"kind": "huggingface", "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return Tokenizer(spec, tuple(by_id[i] for i in range(size)), text, source)


def read_tokenizer(path: Path, split: str | None = None) -> Tokenizer:
    """tokenizer.json (any name ending in .json) or a word list (one token per line)."""
    path = Path(path)
    text, _ = read_utf8(path, "tokenizer", TokenizerError)
    if path.suffix.lower() == ".json":
        if split:
            raise TokenizerError("--split applies to a word list (vocab.txt), not to a tokenizer.json")
        return huggingface_tokenizer(text, str(path))
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return words_tokenizer([line.removesuffix("\r") for line in lines], split or "whitespace", str(path))


def as_tokenizer(obj: Any, split: str | None = None) -> Tokenizer:
    """A Tokenizer from what the Python API accepts: a Tokenizer, a path (tokenizer.json or
    vocab.txt), a `tokenizers.Tokenizer`, or an id -> token list."""
    if isinstance(obj, Tokenizer):
        return obj
    if isinstance(obj, str | Path):
        return read_tokenizer(Path(obj), split)
    if isinstance(obj, list | tuple):
        return words_tokenizer(list(obj), split or "whitespace")
    if hasattr(obj, "to_str") and hasattr(obj, "get_vocab"):
        return huggingface_tokenizer(obj.to_str(), "tokenizers.Tokenizer")
    raise TokenizerError(f"cannot use {type(obj).__name__} as a tokenizer")


# Training ---------------------------------------------------------------------------------


def parse_kind(kind: str) -> tuple[str, int]:
    """char | word | bpe:N -> (name, N or 0)."""
    if kind in ("char", "word"):
        return kind, 0
    if kind.startswith("bpe:"):
        try:
            n = int(kind[4:])
        except ValueError:
            n = 0
        if n > 256:
            return "bpe", n
        raise TokenizerError(f"bpe:N needs a vocabulary size N above 256 (the byte alphabet), got {kind!r}")
    raise TokenizerError(f"--tokenizer must be char, word or bpe:N, got {kind!r}")


def _by_frequency(tokens: list[str]) -> list[str]:
    counts = collections.Counter(tokens)
    return [t for t, _ in sorted(counts.items(), key=lambda kv: kv[1], reverse=True)]  # ties: first seen


def train_tokenizer(kind: str, text: str) -> Tokenizer:
    """char: the corpus's characters; word: its whitespace-split words (both with <unk> and
    <eos> first, then by descending frequency); bpe:N: byte-level BPE of N tokens trained with
    the `tokenizers` library (every UTF-8 text encodes; no unknown token)."""
    name, size = parse_kind(kind)
    if name in ("char", "word"):
        lines = text.split("\n")
        pieces = [t for line in lines for t in (line.split() if name == "word" else line)]
        return words_tokenizer(
            [UNK, EOS, *(t for t in _by_frequency(pieces) if t not in (UNK, EOS))],
            "whitespace" if name == "word" else "chars",
            f"{name} list",
        )
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator([text], trainer)
    return huggingface_tokenizer(hf.to_str(), f"byte-level BPE ({size})")
