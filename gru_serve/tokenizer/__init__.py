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

from gru_serve.contract import ContractError, ModelMetadata
from gru_serve.tokenizer.base import (
    PRIME_TOKENS,
    REPLACEMENT,
    UNK,
    StopHit,
    StopMatcher,
    TextStream,
    Tokenizer,
)
from gru_serve.tokenizer.huggingface import HuggingFaceTokenizer
from gru_serve.tokenizer.lookup import CharTokenizer, WordTokenizer

__all__ = [
    "PRIME_TOKENS",
    "REPLACEMENT",
    "UNK",
    "CharTokenizer",
    "HuggingFaceTokenizer",
    "StopHit",
    "StopMatcher",
    "TextStream",
    "Tokenizer",
    "WordTokenizer",
    "load_tokenizer",
]


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
