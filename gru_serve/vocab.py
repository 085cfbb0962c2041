"""Text <-> token ids, with the normalisation rule the model's metadata states."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

UNK = "<unk>"


@dataclass(frozen=True)
class Vocabulary:
    tokens: tuple[str, ...]
    normalization: dict[str, Any]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})
        object.__setattr__(self, "_pattern", re.compile(self.normalization["pattern"]))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def unk(self) -> int:
        return self._index.get(UNK, 0)

    def normalize(self, text: str) -> str:
        if self.normalization.get("lowercase"):
            text = text.lower()
        return self._pattern.sub(self.normalization["replacement"], text)

    def encode(self, text: str) -> list[int]:
        """Normalise then map each character to its id (unknown characters to <unk>)."""
        unk = self.unk
        return [self._index.get(c, unk) for c in self.normalize(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.tokens[i] for i in ids)

    def token(self, token_id: int) -> str:
        return self.tokens[token_id]

    def ids(self, tokens: Sequence[str]) -> list[int]:
        unk = self.unk
        return [self._index.get(t, unk) for t in tokens]
