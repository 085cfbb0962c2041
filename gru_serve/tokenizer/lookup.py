"""The lookup tokenizers: "chars" (d2l) and "words" (PyTorch word_language_model)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from gru_serve.contract import ContractError
from gru_serve.tokenizer.base import UNK, TextStream, Tokenizer, _unknown

# -- "chars": d2l --


class _LookupStream(TextStream):
    """Each id's text is its token: the per-token work is list indexing."""

    __slots__ = ("_tokens",)

    def __init__(self, tokens: tuple[str, ...]) -> None:
        self._tokens = tokens

    def push(self, ids: Sequence[int]) -> list[str]:
        tokens = self._tokens
        return [tokens[i] for i in ids]


class CharTokenizer(Tokenizer):
    """d2l's: normalise (`normalization`: lower-case, a pattern replaced), one id per character.
    A character outside the vocabulary is <unk> if the vocabulary has one, else refused."""

    kind = "chars"

    def __init__(self, tokens: Sequence[str], normalization: dict[str, Any]) -> None:
        self.tokens = tuple(tokens)
        self.normalization = dict(normalization)
        self._index = {t: i for i, t in enumerate(self.tokens)}
        self._pattern = re.compile(normalization["pattern"])
        self._replacement = normalization["replacement"]
        self._lowercase = bool(normalization.get("lowercase"))
        self.unk = self._index.get(UNK)
        self._stream = _LookupStream(self.tokens)  # stateless: one serves every generation

    def normalize(self, text: str) -> str:
        if self._lowercase:
            text = text.lower()
        return self._pattern.sub(self._replacement, text)

    def encode(self, text: str, field: str = "text") -> list[int]:
        text = self.normalize(text)
        index = self._index
        if self.unk is not None:
            unk = self.unk
            return [index.get(c, unk) for c in text]
        try:
            return [index[c] for c in text]
        except KeyError:
            pos, c = next((i, c) for i, c in enumerate(text) if c not in index)
            raise _unknown(field, "character", c, pos, " (of the normalised text)") from None

    def decode(self, ids: Sequence[int]) -> str:
        tokens = self.tokens
        return "".join([tokens[i] for i in ids])

    def stream(self, prime: Sequence[int] = ()) -> TextStream:
        return self._stream


# -- "words": PyTorch word_language_model --


class _WordStream(TextStream):
    __slots__ = ("_after_word", "_tok")

    def __init__(self, tok: WordTokenizer, prime: Sequence[int]) -> None:
        self._tok = tok
        self._after_word = bool(prime) and prime[-1] != tok.eos  # the next word needs a space

    def push(self, ids: Sequence[int]) -> list[str]:
        tok = self._tok
        tokens, eos, space = tok.tokens, tok.eos, tok.separator
        out = []
        after = self._after_word
        for i in ids:
            if i == eos:
                out.append("\n")
                after = False
            else:
                out.append(space + tokens[i] if after else tokens[i])
                after = True
        self._after_word = after
        return out


class WordTokenizer(Tokenizer):
    """Each line split on whitespace (or into characters), `eos` ending every line but the last
    (a text ending with a newline ends with `eos`); decoding joins words with a space (nothing
    when split into characters) and writes `eos` as a newline. Without `eos`, a newline is
    whitespace (or, split into characters, a character like any other)."""

    kind = "words"

    def __init__(self, tokens: Sequence[str], split: str, eos: str | None, unk: str | None) -> None:
        if split not in ("whitespace", "chars"):
            raise ContractError(f"words tokenizer: split must be 'whitespace' or 'chars', got {split!r}")
        self.tokens = tuple(tokens)
        self._index = {t: i for i, t in enumerate(self.tokens)}
        for key, token in (("eos", eos), ("unk", unk)):
            if token is not None and token not in self._index:
                raise ContractError(f"words tokenizer: {key} {token!r} is not in the vocabulary")
        self.split = split
        self.eos = None if eos is None else self._index[eos]
        self.unk = None if unk is None else self._index[unk]
        self.separator = " " if split == "whitespace" else ""
        if split == "whitespace":
            self._pattern = re.compile(r"\n|\S+" if eos is not None else r"\S+")
        else:
            self._pattern = re.compile(r"(?s).")

    def _units(self, text: str) -> Iterator[tuple[str, int]]:
        for m in self._pattern.finditer(text):
            yield m.group(), m.start()

    def encode(self, text: str, field: str = "text") -> list[int]:
        index, eos, unk = self._index, self.eos, self.unk
        what = "word" if self.split == "whitespace" else "character"
        ids = []
        for unit, pos in self._units(text):
            if unit == "\n" and eos is not None:
                ids.append(eos)
                continue
            i = index.get(unit, unk)
            if i is None:
                raise _unknown(field, what, unit, pos)
            ids.append(i)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        lines, line = [], []
        for i in ids:
            if i == self.eos:
                lines.append(self.separator.join(line))
                line = []
            else:
                line.append(self.tokens[i])
        lines.append(self.separator.join(line))
        return "\n".join(lines)

    def stream(self, prime: Sequence[int] = ()) -> TextStream:
        return _WordStream(self, prime)
