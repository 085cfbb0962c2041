"""The tokenizer interface, incremental detokenisation (TextStream) and stop strings (StopMatcher)."""

from __future__ import annotations

import bisect
import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

from gru_serve.ops.errors import InvalidArgument

UNK = "<unk>"
REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character
# Ids of earlier text a stream is primed with (the tail of the prompt / session history): enough
# for every `tokenizers` decoder (a 4-byte character in byte tokens, WordPiece's "##", Metaspace's
# leading space need at most the 4 tokens before), with room to spare. A session only needs to
# keep its last PRIME_TOKENS ids for its streams to decode exactly.
PRIME_TOKENS = 8


class TextStream(ABC):
    """Incremental detokenisation of one generation. `push` returns one text delta per id: the
    text it adds, every character it completes included; only an unfinished end is held back
    (a token ending inside a UTF-8 character gives "" or the text before that character). The
    deltas of every push, then `flush()`, concatenate to the decoding of the ids pushed (the
    text after that of the ids the stream was primed with), and no delta holds a U+FFFD that
    that decoding does not."""

    __slots__ = ()

    @abstractmethod
    def push(self, ids: Sequence[int]) -> list[str]:
        """The text delta of each id, in order."""

    def flush(self) -> str:
        """Text still held back, decoded as `decode` would (an unfinished character becomes
        U+FFFD). Call once, when the generation ends."""
        return ""


class StopHit(NamedTuple):
    index: int  # the token, in the texts given to StopMatcher.feed, whose text completes the stop
    stop: str  # the stop string
    end: int  # the stop string ends after this many characters of that token's text (1..len)


class StopMatcher:
    """Stop strings over a generation's text deltas, found across token and chunk boundaries.

    `feed` takes the deltas of a chunk of tokens and returns where the earliest stop string
    completes (the first listed wins a tie), or None. The work is per chunk: the chunk's text
    is joined once, searched with the tail of the earlier text prepended, and a match's end is
    mapped back to its token through cumulative lengths. After a hit the matcher stands just
    after the hit's token, so feeding the tokens that follow it goes on from there.
    """

    __slots__ = ("_keep", "_sized", "stops", "tail")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(dict.fromkeys(s for s in stops if s))
        self._sized = tuple((s, len(s) - 1) for s in self.stops)
        # The longest stop minus one: the most of it earlier text can hold when it completes.
        self._keep = max(map(len, self.stops), default=1) - 1
        self.tail = ""

    def __bool__(self) -> bool:
        return bool(self.stops)

    def feed(self, texts: Sequence[str]) -> StopHit | None:
        chunk = texts[0] if len(texts) == 1 else "".join(texts)
        if not chunk or not self.stops:
            return None
        tail = self.tail
        base = len(tail)
        window = tail + chunk
        best_end, best = -1, ""
        for s, n1 in self._sized:
            # Only occurrences that end in this chunk: earlier ones would have stopped already.
            at = window.find(s, base - n1 if base > n1 else 0)
            if at >= 0 and (best_end < 0 or at + n1 < best_end):
                best_end, best = at + n1, s
        keep = self._keep
        if best_end < 0:
            self.tail = window[-keep:] if keep else ""
            return None
        end = best_end + 1 - base  # characters of the chunk up to the stop's end
        if len(texts) == 1:
            index, before = 0, 0
        else:
            cum = list(itertools.accumulate(map(len, texts)))
            index = bisect.bisect_left(cum, end)
            before = cum[index - 1] if index else 0
        self.tail = window[: base + before + len(texts[index])][-keep:] if keep else ""
        return StopHit(index, best, end - before)


class Tokenizer(ABC):
    """A model's text <-> ids.

    `tokens` has one display string per id (the metadata's vocabulary: what ModelInfo lists);
    for text in context use `decode` or a `stream`, whose deltas are what the ids read as.
    """

    kind: str
    tokens: tuple[str, ...]
    unk: int | None  # the id unknown input becomes, or None when unknown input is refused

    @property
    def size(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def normalize(self, text: str) -> str:
        """The text as the tokenizer sees it before splitting it (identity unless the kind
        normalises)."""
        return text

    @abstractmethod
    def encode(self, text: str, field: str = "text") -> list[int]:
        """Ids of `text`; unknown input per the tokenizer's policy (InvalidArgument, naming
        `field`, the first unknown character or word and its position, where it has no unknown
        token)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` as a whole."""

    @abstractmethod
    def stream(self, prime: Sequence[int] = ()) -> TextStream:
        """A TextStream for a generation that follows the ids `prime` (the prompt and session
        history; only the last PRIME_TOKENS matter)."""


def _unknown(field: str, what: str, item: str, pos: int, where: str = "") -> InvalidArgument:
    return InvalidArgument(
        f"{field}: {what} {item!r} at position {pos}{where} is not in the model's vocabulary, "
        "and its tokenizer has no unknown token"
    )
