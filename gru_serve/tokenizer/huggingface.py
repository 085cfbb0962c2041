"""The "huggingface" tokenizer: a `tokenizers` tokenizer.json carried in the model."""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from gru_serve.contract import ContractError
from gru_serve.ops.errors import InvalidArgument
from gru_serve.tokenizer.base import PRIME_TOKENS, REPLACEMENT, TextStream, Tokenizer, _unknown

if TYPE_CHECKING:
    import tokenizers

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
