"""Text <-> token ids for a model, whatever its tokenizer kind (gru_serve.contract, TOKENIZER_KINDS).

One interface, three kinds:

- "chars" (d2l): the metadata's `normalization`, then one id per character;
- "words" (PyTorch word_language_model): lines split on whitespace or into characters, `eos`
  ending each line (decoded as a newline), words joined with a space when decoding;
- "huggingface": a `tokenizers` tokenizer.json carried in the model (byte-level BPE, BPE,
  WordPiece, Unigram, WordLevel, ...). `tokenizers` is imported only for this kind.

Unknown input follows the tokenizer's own policy: its unknown token where it has one; without
one, `encode` raises InvalidArgument naming the first unknown character (or word) and its
position. Nothing is ever mapped to id 0 silently.

Generation turns ids back into text one token at a time with a `TextStream` (`Tokenizer.stream`),
which hands out one text delta per token such that the deltas (and `flush()` at the end) add up
to `decode` of every id, holding text back while a token ends inside a UTF-8 character. Stop
strings are found on those deltas, across token and chunk boundaries, by a `StopMatcher`.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from gru_serve.contract import ContractError, ModelMetadata
from gru_serve.ops.errors import InvalidArgument

if TYPE_CHECKING:
    import tokenizers

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


# -- "huggingface": a `tokenizers` tokenizer.json --


@functools.cache
def _library_stream() -> type | None:
    """tokenizers.decoders.DecodeStream if it can be primed with ids (tokenizers >= 0.22), else
    None (streams then run the same algorithm in Python)."""
    try:
        from tokenizers.decoders import DecodeStream

        DecodeStream(ids=[], skip_special_tokens=False)
    except (ImportError, TypeError):
        return None
    return DecodeStream


def _byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode, as a list: byte -> the character ByteLevel writes for it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _has_type(node: Any, kind: str) -> bool:
    """A tokenizer.json component (or a Sequence of them) is, or holds, one of type `kind`."""
    if isinstance(node, dict):
        return node.get("type") == kind or any(_has_type(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, kind) for v in node)
    return False


class _HFStream(TextStream):
    """`tokenizers`' DecodeStream algorithm, holding back only an unfinished end.

    The ids of the last text handed out in full (the context) and those since (held) are
    decoded together; once that text does not end in U+FFFD, what goes beyond the context's
    own decoding is handed out and the held ids become the context. While it does end in
    U+FFFD (a token ending inside a character), DecodeStream hands out nothing; here the text
    before that unfinished end goes out already (`partial`), so a token's delta has every
    character it completes: a stop string is seen at the token that completes it.

    The library's DecodeStream does the stepping where available (tokenizers >= 0.22, which
    can prime it with ids); the context and held ids are followed here too, for the partial
    text, for `flush`, for priming (DecodeStream would hand out the primed text itself when it
    ends inside a character), and to go on in Python should the library's step fail.
    """

    __slots__ = ("_ctx", "_decode", "_ds", "_held", "_partial", "_prefix", "_tok")

    def __init__(self, owner: HuggingFaceTokenizer, prime: Sequence[int], library: bool) -> None:
        self._tok = owner.backend
        self._decode = owner.decode
        ctx = [int(i) for i in prime[-PRIME_TOKENS:]]
        # The context ends after the last primed id whose text is whole; the ids after it (an
        # unfinished character) are held, their text before the unfinished end counted as out.
        clean = len(ctx)
        while clean and self._decode(ctx[:clean]).endswith(REPLACEMENT):
            clean -= 1
        self._ctx, self._held = ctx[:clean], ctx[clean:]
        self._prefix: str | None = self._decode(self._ctx) if self._held else None  # decode(ctx)
        self._partial = ""  # the held ids' text already out (their text before an unfinished end)
        if self._held:
            self._hold()
        cls = _library_stream() if library else None
        self._ds = None
        if cls is not None:
            self._ds = cls(ids=list(self._ctx), skip_special_tokens=False)
            for i in self._held:
                self._ds.step(self._tok, i)  # None every time: each of these ends in U+FFFD

    def _hold(self, text: str | None = None) -> str:
        """The held ids' text up to its unfinished end, beyond what is out already."""
        if self._prefix is None:
            self._prefix = self._decode(self._ctx)
        if text is None:
            text = self._decode(self._ctx + self._held)
        stable = text.rstrip(REPLACEMENT)
        out = self._prefix + self._partial
        if len(stable) > len(out) and stable.startswith(out):
            self._partial = stable[len(self._prefix) :]
            return stable[len(out) :]
        return ""

    def _step(self, i: int) -> str:
        self._held.append(i)
        if self._ds is not None:
            try:
                chunk = self._ds.step(self._tok, i)
            except Exception:  # a decoder whose text changes before the window: go on in Python
                self._ds = None
            else:
                if chunk is None:
                    return self._hold()
                done = len(self._partial)
                self._ctx, self._held, self._prefix, self._partial = self._held, [], None, ""
                return chunk[done:]
        if self._prefix is None:
            self._prefix = self._decode(self._ctx)
        text = self._decode(self._ctx + self._held)
        if text.endswith(REPLACEMENT):
            return self._hold(text)
        if len(text) > len(self._prefix):
            done = len(self._prefix) + len(self._partial)
            self._ctx, self._held, self._prefix, self._partial = self._held, [], None, ""
            return text[done:]
        return ""

    def push(self, ids: Sequence[int]) -> list[str]:
        step = self._step
        return [step(int(i)) for i in ids]

    def flush(self) -> str:
        if not self._held:
            return ""
        prefix = self._prefix if self._prefix is not None else self._decode(self._ctx)
        done = len(prefix) + len(self._partial)
        self._ctx, self._held, self._partial = self._ctx + self._held, [], ""
        text = self._decode(self._ctx)
        # Go on (should anything be pushed after) in Python, from all that is out now.
        self._ds, self._prefix = None, text
        return text[done:]


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers` tokenizer. Encoding adds no special tokens (no [CLS]/[SEP] around a
    prompt) and decoding keeps them, as streams do. `library_stream=False` makes streams run
    DecodeStream's algorithm in Python instead of the library's (tests; old `tokenizers`)."""

    kind = "huggingface"

    def __init__(self, tokens: Sequence[str], tokenizer_json: str, library_stream: bool = True) -> None:
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError as e:
            raise ContractError(
                "model metadata 'gru_serve.tokenizer' is huggingface: serving it needs the "
                "'tokenizers' package (pip install tokenizers)"
            ) from e
        try:
            self.backend: tokenizers.Tokenizer = Backend.from_str(tokenizer_json)
        except Exception as e:
            raise ContractError(f"model metadata 'gru_serve.tokenizer_json' is not a tokenizer: {e}") from e
        self.tokens = tuple(tokens)
        size = self.backend.get_vocab_size(with_added_tokens=True)
        if size > len(self.tokens):
            raise ContractError(
                f"model metadata 'gru_serve.tokenizer_json' has {size} tokens but 'gru_serve.vocab' "
                f"has {len(self.tokens)}: the model cannot read every id its tokenizer writes"
            )
        self.library_stream = library_stream
        config = json.loads(tokenizer_json)
        model = config.get("model") or {}
        self.model_type = model.get("type", "")
        unk_token = model.get("unk_token") if self.model_type != "Unigram" else None
        self.unk = self.backend.token_to_id(unk_token) if unk_token is not None else None
        if self.model_type == "Unigram" and model.get("unk_id") is not None:
            self.unk = int(model["unk_id"])
        # BPE without an unknown token or byte fallback drops what it does not know, silently:
        # encode checks for it. (The others raise, or map to their unknown token.)
        self._vocab: dict[str, int] = {}
        self._missing_bytes: frozenset[int] = frozenset()
        self._check_bpe = False
        if self.model_type == "BPE" and self.unk is None and not model.get("byte_fallback"):
            self._vocab = self.backend.get_vocab(with_added_tokens=False)
            self._prefix = model.get("continuing_subword_prefix") or ""
            self._suffix = model.get("end_of_word_suffix") or ""
            self._ignore_merges = bool(model.get("ignore_merges"))
            if _has_type(config.get("pre_tokenizer"), "ByteLevel"):
                alphabet = _byte_alphabet()
                self._missing_bytes = frozenset(
                    b
                    for b, c in enumerate(alphabet)
                    if c not in self._vocab and self._prefix + c not in self._vocab
                )
                self._check_bpe = bool(self._missing_bytes)
            else:
                self._check_bpe = True
        added = [t.content for t in self.backend.get_added_tokens_decoder().values() if t.content]
        self._added = (
            re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
            if added
            else None
        )

    def normalize(self, text: str) -> str:
        normalizer = self.backend.normalizer
        return normalizer.normalize_str(text) if normalizer is not None else text

    def encode(self, text: str, field: str = "text") -> list[int]:
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        except Exception as e:
            raise self._refusal(text, field, e) from None
        if self._check_bpe:
            self._check_known(text, field)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def stream(self, prime: Sequence[int] = ()) -> TextStream:
        return _HFStream(self, prime, self.library_stream)

    # -- unknown input --

    def _pieces(self, text: str) -> Iterator[tuple[str, int]]:
        """What the model gets, piece by piece (pre-tokenised), with each piece's position in
        the text (in the normalised text where the tokenizer normalises); added tokens skipped."""
        segments = [(text, 0)]
        if self._added is not None:
            starts = [0, *(e for m in self._added.finditer(text) for e in m.span())]
            segments = [(text[a:b], a) for a, b in itertools.pairwise([*starts, len(text)])][::2]
        backend = self.backend
        for segment, at in segments:
            normal = self.normalize(segment)
            if backend.pre_tokenizer is not None:
                pieces = backend.pre_tokenizer.pre_tokenize_str(normal)
            else:
                pieces = [(normal, (0, len(normal)))]
            for piece, (start, _) in pieces:
                yield piece, at + start

    def _refusal(self, text: str, field: str, error: Exception) -> InvalidArgument:
        """Why the backend would not encode `text`: its first piece the model cannot tokenise
        (a word with no unknown token to fall back on), else the backend's own message."""
        try:
            for piece, pos in self._pieces(text):
                try:
                    self.backend.model.tokenize(piece)
                except Exception:
                    return _unknown(field, "word", piece, pos)
        except Exception:
            pass
        return InvalidArgument(f"{field}: the model's tokenizer cannot encode it ({error})")

    def _check_known(self, text: str, field: str) -> None:
        """BPE without unknown token nor byte fallback: refuse what it would drop."""
        if self._missing_bytes:  # byte-level, some bytes absent: a character using one of them
            missing = self._missing_bytes
            for pos, c in enumerate(self.normalize(text)):
                if any(b in missing for b in c.encode("utf-8", "surrogatepass")):
                    raise _unknown(field, "character", c, pos)
            return
        vocab, prefix, suffix = self._vocab, self._prefix, self._suffix
        for piece, at in self._pieces(text):
            if self._ignore_merges and piece in vocab:
                continue
            last = len(piece) - 1
            for k, c in enumerate(piece):
                unit = (prefix + c if k and prefix else c) + (suffix if k == last else "")
                if unit not in vocab:
                    raise _unknown(field, "character", c, at + k)


def load_tokenizer(meta: ModelMetadata) -> Tokenizer:
    """The tokenizer a model's metadata describes (gru_serve.contract, TOKENIZER_KINDS); a
    description that cannot be served raises ContractError naming the field."""
    spec = meta.tokenizer or {"kind": "chars"}
    kind = spec.get("kind", "chars")
    if kind == "chars":
        return CharTokenizer(meta.vocab, meta.normalization)
    if kind == "words":
        return WordTokenizer(meta.vocab, spec.get("split", "whitespace"), spec.get("eos"), spec.get("unk"))
    if kind == "huggingface":
        if not meta.tokenizer_json:
            raise ContractError("model metadata 'gru_serve.tokenizer_json' is missing")
        return HuggingFaceTokenizer(meta.vocab, meta.tokenizer_json)
    raise ContractError(f"model metadata 'gru_serve.tokenizer' has an unknown kind {kind!r}")
