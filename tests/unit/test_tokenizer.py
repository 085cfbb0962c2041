"""gru_serve.tokenizer against independent references: d2l's rule written out (chars), Python's str
operations (words), the `tokenizers` library's own decode (huggingface), and a brute-force
search of decoded prefixes (stop strings)."""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from gru_serve.contract import IDENTITY_NORMALIZATION, ContractError, ModelMetadata, read_model
from gru_serve.ops.errors import InvalidArgument
from gru_serve.shipped import default_model_path
from gru_serve.tokenizer import (
    PRIME_TOKENS,
    REPLACEMENT,
    CharTokenizer,
    HuggingFaceTokenizer,
    StopMatcher,
    Tokenizer,
    WordTokenizer,
    load_tokenizer,
)

# A small corpus with accents, CJK and emoji (one ZWJ sequence, one skin tone).
CORPUS = [
    "Café crème brûlée, naïve résumé; déjà vu à l'hôtel.",
    "Ærøskøbing — smørrebrød og ål. Ça va? Señor Muñoz.",
    "東京は日本の首都です。北京和上海都是大城市。",
    "한국어 텍스트도 조금. Ελληνικά και русский текст.",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 and 🇫🇷 flags!",
    "The quick brown fox jumps over the lazy dog's back, isn't it? 42 + 7 = 49.",
    "It was the best of times, it was the worst of times.",
]
PROMPT = "Crème brûlée à Tōkyō: 東京で食べた 😀 déjà-vu 👍🏽!"


def meta(vocab: Sequence[str], **kw) -> ModelMetadata:
    return ModelMetadata(name="t", vocab=tuple(vocab), hidden_size=4, num_layers=1, **kw)


# -- reference helpers --


def chunked(ids: list[int], rng: random.Random, most: int = 5) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, most)
        out.append(ids[i : i + n])
        i += n
    return out


def stream_text(tok: Tokenizer, chunks: Sequence[Sequence[int]], prime: Sequence[int] = ()) -> list[str]:
    """Every delta of a stream fed `chunks` (one per id, checked), then the flush."""
    s = tok.stream(prime)
    deltas = []
    for c in chunks:
        got = s.push(list(c))
        assert len(got) == len(c)
        deltas += got
    return [*deltas, s.flush()]


def brute_force_stop(decode: Callable[[list[int]], str], ids: list[int], stops: Sequence[str]) -> int | None:
    """The first token whose decoded prefix contains a stop string."""
    for k in range(1, len(ids) + 1):
        text = decode(ids[:k])
        if any(s in text for s in stops):
            return k - 1
    return None


# -- chars (d2l) --


@functools.cache
def shipped() -> ModelMetadata:
    return read_model(onnx.load(str(default_model_path()), load_external_data=False))


TEXTS = [
    "",
    "The Time Traveller (for so it will be convenient to speak of him)",
    "  Crème brûlée, 42 times!\n\tNaïve   DÉJÀ vu; 東京 😀 ",
    "zzz---qqq...xyz",
]


def d2l(text: str, vocab: Sequence[str]) -> list[int]:
    """d2l.ai §8.2 by hand: lower-case, runs of non-letters to one space, one id per character."""
    index = {t: i for i, t in enumerate(vocab)}
    return [index.get(c, index["<unk>"]) for c in re.sub("[^a-z]+", " ", text.lower())]


@pytest.mark.parametrize("text", TEXTS)
def test_chars_equal_d2l_on_shipped_model(text: str) -> None:
    m = shipped()
    tok = load_tokenizer(m)
    assert isinstance(tok, CharTokenizer) and tok.tokens == m.vocab and tok.size == len(m.vocab)
    ids = tok.encode(text)
    assert ids == d2l(text, m.vocab)
    assert tok.decode(ids) == re.sub("[^a-z]+", " ", text.lower()) == tok.normalize(text)
    assert stream_text(tok, [ids]) == [m.vocab[i] for i in ids] + [""]


def test_chars_on_corpus_equal_d2l() -> None:
    m = shipped()
    tok = load_tokenizer(m)
    text = (Path(__file__).parents[2] / "exporters" / "data" / "timemachine.txt").read_text()[:20000]
    ids = tok.encode(text)
    assert ids == d2l(text, m.vocab)
    assert tok.decode(ids) == tok.normalize(text)


def test_chars_unknown_without_unk_is_refused() -> None:
    vocab = [" ", *"abcdefghijklmnopqrstuvwxy"]  # no <unk>, no 'z'
    tok = load_tokenizer(meta(vocab))
    assert tok.unk is None
    assert tok.encode("A b!") == [1, 0, 2, 0]
    # Positions are in the normalised text (d2l's normalisation keeps a-z and single spaces).
    with pytest.raises(InvalidArgument, match=r"prompt: character 'z' at position 5 .*no unknown token"):
        tok.encode("Hi,  LAZY!", field="prompt")  # normalised "hi lazy "


def test_chars_unknown_with_unk_is_unk_not_zero() -> None:
    vocab = [" ", "a", "b", "<unk>"]
    tok = load_tokenizer(meta(vocab, normalization=dict(IDENTITY_NORMALIZATION)))
    assert tok.unk == 3
    assert tok.encode("ab é") == [1, 2, 0, 3]
    assert tok.decode([1, 3]) == "a<unk>"


# -- words --

WORDS = ["<eos>", "the", "cat", "sat", "on", "mat", "<unk>", "a", "dog."]


def words_reference(text: str) -> str:
    return "\n".join(" ".join(line.split()) for line in text.split("\n"))


@pytest.mark.parametrize(
    "text",
    ["the cat sat\non the mat\n", "  the   cat\t sat  \n\n a dog.\non", "", "\n", "the"],
)
def test_words_whitespace_round_trip(text: str) -> None:
    tok = load_tokenizer(meta(WORDS, tokenizer={"kind": "words", "split": "whitespace", "eos": "<eos>"}))
    ids = tok.encode(text)
    assert ids.count(0) == text.count("\n")  # eos for every newline, none added
    assert tok.decode(ids) == words_reference(text)
    assert "".join(stream_text(tok, [ids])) == tok.decode(ids)
    for k in range(len(ids) + 1):  # primed with the ids before: the space goes where it should
        assert tok.decode(ids[:k]) + "".join(stream_text(tok, [ids[k:]], ids[:k])) == tok.decode(ids)


def test_words_unk_policy() -> None:
    spec = {"kind": "words", "split": "whitespace", "eos": "<eos>"}
    with_unk = load_tokenizer(meta(WORDS, tokenizer={**spec, "unk": "<unk>"}))
    assert with_unk.encode("the bird sat") == [1, 6, 3]
    without = load_tokenizer(meta(WORDS, tokenizer={**spec, "unk": None}))
    text = "the cat\non the  bird mat"
    with pytest.raises(InvalidArgument, match=rf"text: word 'bird' at position {text.index('bird')}\b"):
        without.encode(text)


def test_words_without_eos_newline_is_whitespace() -> None:
    tok = load_tokenizer(meta(WORDS, tokenizer={"kind": "words", "split": "whitespace", "eos": None}))
    assert tok.encode("the cat\nsat\n") == [1, 2, 3]
    assert tok.decode([1, 2, 3]) == "the cat sat"


def test_words_chars_split() -> None:
    vocab = ["<eos>", "a", "b", " ", "é", "東", "<unk>"]
    tok = load_tokenizer(meta(vocab, tokenizer={"kind": "words", "split": "chars", "eos": "<eos>"}))
    text = "ab a\n東é\n\nb"
    ids = tok.encode(text)
    assert ids == [1, 2, 3, 1, 0, 5, 4, 0, 0, 2]
    assert tok.decode(ids) == text
    assert "".join(stream_text(tok, [ids[:3], ids[3:]])) == text
    with pytest.raises(InvalidArgument, match=r"character 'c' at position 2"):
        tok.encode("abc")
    unk = load_tokenizer(
        meta(vocab, tokenizer={"kind": "words", "split": "chars", "eos": None, "unk": "<unk>"})
    )
    assert unk.encode("a\nc") == [1, 6, 6]


def test_words_contract_errors() -> None:
    with pytest.raises(ContractError, match="eos"):
        WordTokenizer(WORDS, "whitespace", "<EOS>", None)
    with pytest.raises(ContractError, match="split"):
        WordTokenizer(WORDS, "lines", None, None)


# -- huggingface --


def train(model, trainer, pre=None, decoder=None) -> Backend:
    tok = Backend(model)
    if pre is not None:
        tok.pre_tokenizer = pre
    if decoder is not None:
        tok.decoder = decoder
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


@functools.cache
def backend(kind: str) -> Backend:
    quiet = {"show_progress": False}
    if kind == "bytelevel-bpe":
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        return train(
            models.BPE(),
            trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, **quiet),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
            decoders.ByteLevel(),
        )
    if kind == "bpe":  # not byte-level, with an unknown token and a word-end suffix
        return train(
            models.BPE(unk_token="[UNK]", end_of_word_suffix="</w>"),
            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], end_of_word_suffix="</w>", **quiet),
            pre_tokenizers.Whitespace(),
            decoders.BPEDecoder(suffix="</w>"),
        )
    if kind == "wordpiece":
        return train(
            models.WordPiece(unk_token="[UNK]"),
            trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"], **quiet),
            pre_tokenizers.BertPreTokenizer(),
            decoders.WordPiece(),
        )
    if kind == "unigram":
        return train(
            models.Unigram(),
            trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>"], unk_token="<unk>", **quiet),
            pre_tokenizers.Metaspace(),
            decoders.Metaspace(),
        )
    if kind == "wordlevel":
        return train(
            models.WordLevel(unk_token="<unk>"),
            trainers.WordLevelTrainer(special_tokens=["<unk>"], **quiet),
            pre_tokenizers.Whitespace(),
        )
    raise AssertionError(kind)


KINDS = ["bytelevel-bpe", "bpe", "wordpiece", "unigram", "wordlevel"]


def hf_meta(b: Backend) -> ModelMetadata:
    text = b.to_str()
    vocab = [b.id_to_token(i) for i in range(b.get_vocab_size(with_added_tokens=True))]
    return meta(
        vocab,
        normalization=dict(IDENTITY_NORMALIZATION),
        tokenizer={"kind": "huggingface", "sha256": hashlib.sha256(text.encode()).hexdigest()},
        tokenizer_json=text,
    )


@functools.cache
def hf(kind: str, library_stream: bool = True) -> HuggingFaceTokenizer:
    m = hf_meta(backend(kind))
    if library_stream:
        tok = load_tokenizer(m)
        assert isinstance(tok, HuggingFaceTokenizer)
        return tok
    return HuggingFaceTokenizer(m.vocab, m.tokenizer_json, library_stream=False)


def reference(kind: str) -> Callable[[list[int]], str]:
    """The library's own decode."""
    b = backend(kind)
    return lambda ids: b.decode(ids, skip_special_tokens=False)


def test_byte_level_bpe_has_about_300_tokens() -> None:
    assert hf("bytelevel-bpe").size == 300
    assert hf("bytelevel-bpe").unk is None  # byte-level: nothing is unknown


@pytest.mark.parametrize("library", [True, False], ids=["DecodeStream", "python"])
@pytest.mark.parametrize("kind", KINDS)
def test_prompt_streams_to_decode(kind: str, library: bool) -> None:
    tok, ref = hf(kind, library), reference(kind)
    ids = tok.encode(PROMPT)
    assert ids == backend(kind).encode(PROMPT, add_special_tokens=False).ids
    want = ref(ids)
    assert tok.decode(ids) == want
    one = stream_text(tok, [[i] for i in ids])
    assert "".join(one) == want
    assert not any(REPLACEMENT in d for d in one)
    assert_prompt_deltas(ref, ids, one)
    if kind == "bytelevel-bpe":  # tokens end inside characters here: text is held back
        assert "" in one[:-1]
        assert any(ref(ids[:k]).endswith(REPLACEMENT) for k in range(1, len(ids)))
    rng = random.Random(7)
    for _ in range(20):
        got = stream_text(tok, chunked(ids, rng))
        assert got == one  # the same deltas, however the ids come
    # WordPiece/BPE/WordLevel decode with spaces and markers the tokens alone lack.
    assert "".join(one) != "".join(tok.backend.id_to_token(i) for i in ids)


@pytest.mark.parametrize("kind", KINDS)
def test_library_and_python_streams_agree(kind: str) -> None:
    rng = random.Random(3)
    ids = hf(kind).encode(" ".join(CORPUS))
    for _ in range(5):
        chunks = chunked(ids, rng, 7)
        assert stream_text(hf(kind), chunks) == stream_text(hf(kind, False), chunks)


ALPHABET = st.sampled_from(sorted(set("".join(CORPUS)) | set(" \n\tXYZ¿ß€𝄞ﬁ\u0301")))


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(ALPHABET, max_size=40), seed=st.integers(0, 2**32 - 1), split=st.integers(0, 40))
def test_random_text_streams_to_decode(kind: str, text: str, seed: int, split: int) -> None:
    tok, ref = hf(kind), reference(kind)
    ids = tok.encode(text)
    want = ref(ids)
    deltas = stream_text(tok, chunked(ids, random.Random(seed), 6))
    assert "".join(deltas) == want
    if REPLACEMENT not in want:
        assert not any(REPLACEMENT in d for d in deltas)
    assert_prompt_deltas(ref, ids, deltas)
    # Primed with the ids before a split point: the text after what those ids read as (up to
    # an unfinished character at their end, which comes out whole with this stream).
    k = min(split, len(ids))
    base = ref(ids[:k]).rstrip(REPLACEMENT)
    assert base + "".join(stream_text(tok, chunked(ids[k:], random.Random(seed)), ids[:k])) == want


def assert_prompt_deltas(ref: Callable[[list[int]], str], ids: list[int], deltas: list[str]) -> None:
    """After each token, the text out is the decoding of the ids so far, but an unfinished end:
    a token's delta has every character it completes."""
    out = ""
    for k, d in enumerate(deltas[:-1], 1):
        out += d
        assert out == ref(ids[:k]).rstrip(REPLACEMENT), k


@pytest.mark.parametrize("kind", ["bytelevel-bpe", "wordpiece", "unigram"])
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_random_ids_stream_to_decode(kind: str, data: st.DataObject) -> None:
    """Any ids a model might sample, unfinished and invalid UTF-8 included: the deltas and the
    flush add up to the library's decode, and a U+FFFD comes out only where it stays."""
    tok, ref = hf(kind), reference(kind)
    ids = data.draw(st.lists(st.integers(0, tok.backend.get_vocab_size() - 1), max_size=30))
    chunks = chunked(ids, random.Random(data.draw(st.integers(0, 99))), 4)
    deltas = stream_text(tok, chunks)
    want = ref(ids)
    assert "".join(deltas) == want
    assert stream_text(hf(kind, library_stream=False), chunks) == deltas
    assert_prompt_deltas(ref, ids, deltas)
    out = ""
    for d in deltas:
        out += d
        assert out.count(REPLACEMENT) <= want[: len(out)].count(REPLACEMENT)


def test_wordpiece_continuation_needs_priming() -> None:
    tok, ref = hf("wordpiece"), reference("wordpiece")
    ids = tok.encode("foxcrèmetimes")
    pieces = [tok.backend.id_to_token(i) for i in ids]
    k = next(i for i, p in enumerate(pieces) if p.startswith("##"))
    rest = "".join(stream_text(tok, [ids[k:]], ids[:k]))
    assert ref(ids[:k]) + rest == "foxcrèmetimes"
    assert rest.startswith(pieces[k][2:])
    assert "".join(stream_text(tok, [ids[k:]])).startswith("##")  # unprimed: read on its own


def test_byte_level_priming_inside_a_character() -> None:
    """History that ends inside a character (a generation stopped there): the character comes
    out whole with the next generation, never the history's own text."""
    tok, ref = hf("bytelevel-bpe"), reference("bytelevel-bpe")
    ids = tok.encode("ab 東京 😀 cd")
    cut = next(k for k in range(1, len(ids)) if ref(ids[:k]).endswith(REPLACEMENT))
    deltas = stream_text(tok, [[i] for i in ids[cut:]], ids[:cut])
    base = ref(ids[:cut]).rstrip(REPLACEMENT)
    assert base + "".join(deltas) == ref(ids)
    assert REPLACEMENT not in "".join(deltas)
    # Long history: only its last PRIME_TOKENS ids count.
    long = tok.encode(" ".join(CORPUS))
    assert len(long) > 4 * PRIME_TOKENS
    k = len(long) // 2
    while ref(long[:k]).endswith(REPLACEMENT):
        k += 1
    assert ref(long[:k]) + "".join(stream_text(tok, [long[k:]], long[:k])) == ref(long)


def test_flush_gives_an_unfinished_character() -> None:
    tok, ref = hf("bytelevel-bpe"), reference("bytelevel-bpe")
    ids = tok.encode("x東")
    k = next(k for k in range(1, len(ids) + 1) if ref(ids[:k]).endswith(REPLACEMENT))
    s = tok.stream()
    deltas = s.push(ids[:k])
    assert REPLACEMENT not in "".join(deltas)
    tail = s.flush()
    assert tail.endswith(REPLACEMENT) and "".join(deltas) + tail == ref(ids[:k])


def test_hf_unknown_policy() -> None:
    # With an unknown token: the tokenizer's own policy.
    wp = hf("wordpiece")
    assert wp.unk == wp.backend.token_to_id("[UNK]")
    assert wp.unk in wp.encode("Zebra ☃")
    # BPE with no unknown token drops what it does not know, silently: refused instead.
    plain = train(
        models.BPE(), trainers.BpeTrainer(vocab_size=150, show_progress=False), pre_tokenizers.Whitespace()
    )
    tok = load_tokenizer(hf_meta(plain))
    assert tok.unk is None
    assert plain.encode("cat ☃ dog").ids == plain.encode("cat dog").ids  # the library drops it
    assert tok.decode(tok.encode("Café 東京")) == plain.decode(plain.encode("Café 東京").ids)
    with pytest.raises(InvalidArgument, match=r"prompt: character '☃' at position 4 "):
        tok.encode("cat ☃ dog", field="prompt")
    plain.add_special_tokens(["<|end|>"])  # added tokens are whole: their characters need not be known
    tok = load_tokenizer(hf_meta(plain))
    assert tok.encode("cat <|end|> dog") == plain.encode("cat <|end|> dog").ids
    with pytest.raises(InvalidArgument, match=r"character '\|' at position 12 "):
        tok.encode("cat <|end|> |")
    # Byte-level BPE trained without the whole byte alphabet: the characters using a byte it lacks.
    bl = train(
        models.BPE(),
        trainers.BpeTrainer(vocab_size=300, show_progress=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
    )
    assert bl.encode("ok \x07 ok").ids == bl.encode("ok  ok").ids  # the library drops it
    tok = load_tokenizer(hf_meta(bl))
    assert tok.unk is None and tok.decode(tok.encode(CORPUS[4])) == bl.decode(bl.encode(CORPUS[4]).ids)
    with pytest.raises(InvalidArgument, match=r"character 'ō' at position 16 "):
        tok.encode(PROMPT)  # "Tōkyō": no 'ō' in the corpus
    with pytest.raises(InvalidArgument, match=r"character '\\x07' at position 3 "):
        tok.encode("ok \x07 ok")
    assert hf("bytelevel-bpe").encode("ok \x07 ok")  # with every byte: nothing to refuse
    # WordLevel / Unigram without an unknown token: the library refuses; we name the word.
    wl = Backend(models.WordLevel({"the": 0, "cat": 1}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = load_tokenizer(hf_meta(wl))
    assert tok.unk is None and tok.encode("the cat") == [0, 1]
    with pytest.raises(InvalidArgument, match=r"text: word 'dog' at position 8 "):
        tok.encode("the cat dog")
    ug = Backend(
        models.Unigram([("▁the", -1.0), ("▁", -2.0), ("t", -3.0), ("h", -3.0), ("e", -3.0)], None, False)
    )
    ug.pre_tokenizer = pre_tokenizers.Metaspace()
    tok = load_tokenizer(hf_meta(ug))
    assert tok.unk is None and tok.decode(tok.encode("the"))
    with pytest.raises(InvalidArgument, match=r"word '▁hex' at position 3"):
        tok.encode("the hex")


def test_hf_normalize_is_the_tokenizers_own() -> None:
    b = Backend.from_str(backend("wordpiece").to_str())
    b.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()]
    )
    tok = load_tokenizer(hf_meta(b))
    assert tok.normalize("Crème BRÛLÉE") == "creme brulee"
    assert hf("wordpiece").normalize("Crème BRÛLÉE") == "Crème BRÛLÉE"  # none: identity
    assert tok.decode(tok.encode("Crème")) == b.decode(b.encode("Crème", add_special_tokens=False).ids)


def test_hf_contract() -> None:
    m = hf_meta(backend("wordpiece"))
    read = ModelMetadata.from_props(m.to_props())  # as a model file carries it
    assert load_tokenizer(read).encode(PROMPT) == hf("wordpiece").encode(PROMPT)
    with pytest.raises(ContractError, match="cannot read every id"):
        HuggingFaceTokenizer(m.vocab[:-1], m.tokenizer_json)
    with pytest.raises(ContractError, match="not a tokenizer"):
        HuggingFaceTokenizer(m.vocab, "{}")
    padded = HuggingFaceTokenizer((*m.vocab, "<pad0>", "<pad1>"), m.tokenizer_json)  # a padded embedding
    assert padded.size == len(m.vocab) + 2


# -- stop strings --


def stop_at(texts: list[str], chunks: Sequence[int], stops: Sequence[str]) -> tuple[int, str, int] | None:
    """Feed the deltas in chunks of the given sizes: (token index, stop, end) of the first hit."""
    m, at = StopMatcher(stops), 0
    for n in chunks:
        hit = m.feed(texts[at : at + n])
        if hit is not None:
            return at + hit.index, hit.stop, hit.end
        at += n
    return None


def check_stop(tok: Tokenizer, ref: Callable[[list[int]], str], ids: list[int], stops, rng) -> None:
    deltas = stream_text(tok, [ids])[:-1]
    want = brute_force_stop(ref, ids, stops)
    sizes = []
    while sum(sizes) < len(ids):
        sizes.append(rng.randint(1, 6))
    for chunks in ([1] * len(ids), [len(ids)], sizes):
        got = stop_at(deltas, chunks, stops)
        if want is None:
            assert got is None
            continue
        assert got is not None and got[0] == want, (stops, chunks)
        index, stop, end = got
        before = "".join(deltas[:index]) + deltas[index][:end]
        assert before.endswith(stop) and stop not in before[:-1]
        assert 1 <= end <= len(deltas[index])


def test_stop_spanning_two_tokens() -> None:
    tok, ref = hf("bytelevel-bpe"), reference("bytelevel-bpe")
    text = "the worst of times, 東京 😀!"
    ids = tok.encode(text)
    deltas = stream_text(tok, [ids])[:-1]
    # A stop made of the end of one token's text and the start of the next one's.
    k = next(k for k in range(1, len(deltas)) if len(deltas[k - 1]) >= 2 and deltas[k])
    stop = deltas[k - 1][-2:] + deltas[k][:1]
    assert brute_force_stop(ref, ids, [stop]) == k
    assert stop_at(deltas, [1] * len(ids), [stop]) == (k, stop, 1)
    assert stop_at(deltas, [k, len(ids) - k], [stop]) == (k, stop, 1)  # across the chunk boundary
    # Inside a character made of several tokens: at the token that completes it.
    cjk = next(k for k in range(len(deltas)) if "東" in deltas[k])
    assert brute_force_stop(ref, ids, ["東"]) == cjk
    assert stop_at(deltas, [2] * len(ids), ["東"])[0] == cjk
    assert stop_at(deltas, [1] * len(ids), ["😀"])[0] == brute_force_stop(ref, ids, ["😀"])
    # A token that completes one character and starts the next: the first is out with it.
    ids = tok.encode("22κΕ")
    deltas = stream_text(tok, [ids])[:-1]
    k = brute_force_stop(ref, ids, ["2κ"])
    assert k is not None and ref(ids[: k + 1]).endswith(REPLACEMENT)  # the case in point
    assert stop_at(deltas, [1] * len(ids), ["2κ"]) == (k, "2κ", 1)


def test_several_stops_earliest_completion_wins() -> None:
    texts = ["ab", "cd", "ef", "gh"]
    assert stop_at(texts, [4], ["fg", "bcd", "h"]) == (1, "bcd", 2)
    assert stop_at(texts, [1, 1, 1, 1], ["fg", "bcd", "h"]) == (1, "bcd", 2)
    assert stop_at(texts, [2, 2], ["cdefg", "e"]) == (2, "e", 1)  # shorter, completes first
    assert stop_at(texts, [4], ["d", "cd"]) == (1, "d", 2)  # a tie: the first listed
    assert stop_at(["a", "", "", "b"], [2, 2], ["ab"]) == (3, "ab", 1)  # empty deltas in between
    assert stop_at(["xa", "a", "b"], [1, 1, 1], ["aaa"]) is None
    assert stop_at(["xa", "a", "a"], [1, 1, 1], ["aaa"]) == (2, "aaa", 1)
    assert stop_at(["xa", "a", "a"], [1, 2], ["aa"]) == (1, "aa", 1)
    assert StopMatcher([]).feed(["anything"]) is None and not StopMatcher([""])


def test_matcher_goes_on_after_a_hit() -> None:
    m = StopMatcher(["bc"])
    assert m.feed(["a", "b", "c", "x"]) == (2, "bc", 1)
    assert m.feed(["b", "c"]) == (1, "bc", 1)  # the tail ends at the hit's token
    m = StopMatcher(["bc", "abcd"])
    assert m.feed(["abc"]) == (0, "bc", 3)
    assert m.feed(["x"]) is None  # the "bc" already found is not found again


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_stops_equal_brute_force(kind: str, data: st.DataObject) -> None:
    tok, ref = hf(kind), reference(kind)
    ids = tok.encode(data.draw(st.text(ALPHABET, min_size=1, max_size=30)))
    text = ref(ids)
    stops = []
    for _ in range(data.draw(st.integers(1, 3))):
        if text and data.draw(st.booleans()):
            a = data.draw(st.integers(0, len(text) - 1))
            stops.append(text[a : a + data.draw(st.integers(1, 4))])
        else:
            stops.append(data.draw(st.text(ALPHABET, min_size=1, max_size=3)))
    stops = [s for s in stops if REPLACEMENT not in s]
    check_stop(tok, ref, ids, stops, random.Random(data.draw(st.integers(0, 99))))


def test_chars_stops_equal_brute_force() -> None:
    tok = load_tokenizer(shipped())
    ids = tok.encode("it was the best of times it was the worst of times")
    rng = random.Random(1)
    for stops in (["worst"], ["st of", "times"], ["s i", "he b"], ["zzz"], ["t", "it"]):
        check_stop(tok, tok.decode, ids, stops, rng)
