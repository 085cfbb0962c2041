"""Serving models that bring their own tokenizer (issue 14), over real gRPC and HTTP servers.

The models are made here, independently of the exporter: a byte-level BPE tokenizer trained
with the `tokenizers` library on The Time Machine plus lines of accents, CJK and emoji, and a
tiny embedding -> GRU -> linear language model exported with torch.onnx under the contract's
names, with the contract's metadata. Its weights make it a (noisy) bigram model of that tokenised
text, so it writes multi-byte characters split across tokens, which is what streaming must get
right. Two more tiny models have no unknown token: a word-list ("words") model and a character
model without <unk>.

The references are independent of the server: the ONNX file run as written in a bare
onnxruntime session (prefill, then one token per call; only gru_serve.sampling is shared, as in
tests/support/serving.reference_generate), prompts encoded and ids decoded by the `tokenizers`
library itself, and each token's expected text computed from the library's decode of growing prefixes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gru_serve.client import Client, sampling
from gru_serve.contract import IDENTITY_NORMALIZATION, ModelMetadata
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.ops.settings import Settings
from gru_serve.sampling import SamplingParams
from gru_serve.server import ThreadedServer
from tests.support.own_tokenizers import reference_ids, stream

torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[2]
BOOK = ROOT / "exporters" / "data" / "timemachine.txt"
EXTRA = [
    "Café crème brûlée, naïve résumé; déjà vu à l'hôtel. Señor Muñoz über alles.",
    "Ærøskøbing — smørrebrød og ål. Ça va? Œuvre, façade, jalapeño, Zürich.",
    "東京は日本の首都です。北京和上海都是大城市。今日はいい天気ですね。",
    "한국어 텍스트도 조금. Ελληνικά και русский текст. Ünïcödé everywhere.",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 and 🇫🇷 flags! 🚀✨🔥 party 🎂🍰",
]
PROMPT = "Crème brûlée à Tōkyō: 東京で食べた 😀 déjà-vu 👍🏽 "
REPLACEMENT = "\ufffd"

BPE, WORDS, CHARS = "bpe-tiny", "words-tiny", "chars-tiny"
MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS = 300, 200
HIDDEN_WORDS = 8
WORD_LIST = ("<eos>", "the", "time", "machine", "traveller", "said", "and", "it", "was", "a")
CHAR_LIST = (" ", *"abcdefghijklmnopqrstuvwxyz", ".", ",")


# -- the models --


class LM(torch.nn.Module):
    """Embedding -> GRU -> Linear, batch first, under the contract: (input_ids [B, S], state
    [B, L, H]) -> (logits [B, S, V], state_out [B, L, H])."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, hidden)
        self.gru = torch.nn.GRU(hidden, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, input_ids, state):
        out, h = self.gru(self.embedding(input_ids), state.transpose(0, 1).contiguous())
        return self.head(out), h.transpose(0, 1)


def export(module: LM, meta: ModelMetadata, path: Path) -> Path:
    module.eval()
    example = (torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 1, meta.hidden_size))
    with torch.no_grad():
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input_ids", "state"],
            output_names=["logits", "state_out"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "seq"},
                "state": {0: "batch"},
                "logits": {0: "batch", 1: "seq"},
                "state_out": {0: "batch"},
            },
        )
    model = onnx.load(str(path))
    for key, value in meta.to_props().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def train_bpe() -> tokenizers.Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([*BOOK.read_text().splitlines(), *EXTRA * 20], trainer)
    return tok


def bigram_lm(ids: list[int], vocab: int) -> LM:
    """An LM whose next-token logits are (noisy) bigram log-probabilities of `ids`: a one-hot
    embedding, a GRU whose state is the current token (update gate shut, reset path off), a
    head holding log P(next | current). The noise keeps any two logits apart (no ties that
    float rounding could break either way)."""
    counts = np.full((vocab, vocab), 0.005)
    np.add.at(counts, (ids[:-1], ids[1:]), 1.0)
    logp = np.log(counts / counts.sum(axis=1, keepdims=True))
    logp += np.random.default_rng(0).normal(0, 0.05, logp.shape)
    lm = LM(vocab, vocab)
    eye = torch.eye(vocab)
    with torch.no_grad():
        lm.embedding.weight.copy_(3 * eye)
        lm.gru.weight_ih_l0.zero_()
        lm.gru.weight_ih_l0[2 * vocab :].copy_(eye)  # the candidate state: the token itself
        lm.gru.weight_hh_l0.zero_()
        lm.gru.bias_ih_l0.zero_()
        lm.gru.bias_ih_l0[vocab : 2 * vocab] = -30.0  # update gate shut: the state is the candidate
        lm.gru.bias_hh_l0.zero_()
        lm.head.weight.copy_(torch.tensor(logp.T / np.tanh(3.0), dtype=torch.float32))
        lm.head.bias.zero_()
    return lm


def random_lm(vocab: int, hidden: int, seed: int) -> LM:
    torch.manual_seed(seed)
    return LM(vocab, hidden)


@dataclass(frozen=True)
class Models:
    bpe: Path
    words: Path
    chars: Path
    backend: tokenizers.Tokenizer


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    folder = tmp_path_factory.mktemp("own-tokenizers")
    backend = train_bpe()
    text = backend.to_str()
    vocab = [backend.id_to_token(i) for i in range(backend.get_vocab_size(with_added_tokens=True))]
    corpus = backend.encode("\n".join([BOOK.read_text()[:20_000], *EXTRA * 40])).ids
    bpe = export(
        bigram_lm(corpus, len(vocab)),
        ModelMetadata(
            name=BPE,
            vocab=tuple(vocab),
            hidden_size=len(vocab),
            num_layers=1,
            normalization=dict(IDENTITY_NORMALIZATION),
            tokenizer={"kind": "huggingface", "sha256": hashlib.sha256(text.encode()).hexdigest()},
            tokenizer_json=text,
            input_kind="embedding",
        ),
        folder / "bpe.onnx",
    )
    words = export(
        random_lm(len(WORD_LIST), HIDDEN_WORDS, 1),
        ModelMetadata(
            name=WORDS,
            vocab=WORD_LIST,
            hidden_size=HIDDEN_WORDS,
            num_layers=1,
            normalization=dict(IDENTITY_NORMALIZATION),
            tokenizer={"kind": "words", "split": "whitespace", "eos": "<eos>", "unk": None},
            input_kind="embedding",
        ),
        folder / "words.onnx",
    )
    chars = export(
        random_lm(len(CHAR_LIST), HIDDEN_WORDS, 2),
        ModelMetadata(
            name=CHARS,
            vocab=CHAR_LIST,
            hidden_size=HIDDEN_WORDS,
            num_layers=1,
            normalization=dict(IDENTITY_NORMALIZATION),
            input_kind="embedding",
        ),
        folder / "chars.onnx",
    )
    return Models(bpe, words, chars, backend)


def start(models: Models, **settings) -> ThreadedServer:
    return ThreadedServer(
        Settings(
            port=0,
            models=(str(models.bpe), str(models.words), str(models.chars)),
            max_prompt_chars=MAX_PROMPT_CHARS,
            max_prompt_tokens=MAX_PROMPT_TOKENS,
            **settings,
        ),
        http=True,
    )


@pytest.fixture(scope="module")
def server(models) -> Iterator[ThreadedServer]:
    srv = start(models)  # the fused path: up to 64 tokens a round, stop strings found in chunks
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def step_server(models) -> Iterator[ThreadedServer]:
    srv = start(models, fused_tokens=1)  # the step path: one token a round
    yield srv
    srv.stop()


@pytest.fixture
def client(server) -> Iterator[Client]:
    with Client(server.target) as c:
        yield c


@pytest.fixture(params=["fused", "step"])
def either(request) -> Iterator[tuple[Client, httpx.Client]]:
    """A gRPC and an HTTP client of the server with the fused path, then of the one without."""
    srv = request.getfixturevalue("server" if request.param == "fused" else "step_server")
    with Client(srv.target) as c, httpx.Client(base_url=srv.http_target, timeout=60) as h:
        yield c, h


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_target, timeout=60) as c:
        yield c


# -- independent references --


def expected_deltas(decode, prime: Sequence[int], ids: Sequence[int]) -> list[str]:
    """Each token's text as streamed: the library's decoding of everything up to it, less an
    unfinished character at its end (U+FFFD there), beyond what the tokens before it gave."""

    def out(k: int) -> str:
        text = decode([*prime, *ids[:k]])
        return text if k == len(ids) else text.rstrip(REPLACEMENT)

    before = decode(list(prime))
    texts = [out(k)[len(before) :] for k in range(len(ids) + 1)]
    return [texts[k + 1][len(texts[k]) :] for k in range(len(ids))]


def decoder(models: Models):
    return lambda ids: models.backend.decode(list(ids), skip_special_tokens=False)


def seeded(seed: int = 11, stop: Sequence[str] = ()) -> tuple[SamplingParams, object]:
    return SamplingParams(temperature=1.0, seed=seed, stop=tuple(stop)), sampling(1.0, seed=seed, stop=stop)


# -- streaming --


@pytest.mark.parametrize("how", ["greedy", "seeded"])
def test_streamed_texts_add_up_to_the_tokenizers_decoding(models, either, how) -> None:
    client, _ = either
    params, msg = (SamplingParams(), sampling()) if how == "greedy" else seeded()
    ids, texts, fin = stream(client, PROMPT, max_new_tokens=60, params=msg, model=BPE)
    want = reference_ids(models.bpe, models.backend, PROMPT, 60, params)
    assert ids == want
    decode = decoder(models)
    whole = decode(ids)
    assert "".join(texts) == whole
    assert all(REPLACEMENT not in t for t in texts) or REPLACEMENT in whole
    prompt_ids = models.backend.encode(PROMPT, add_special_tokens=False).ids
    # Token by token: each text is what its token completes, an unfinished character held back.
    assert texts == expected_deltas(decode, prompt_ids, ids)
    assert fin.reason == pb.FINISH_REASON_LENGTH and fin.prompt_tokens == len(prompt_ids)
    assert fin.normalized_prompt == PROMPT == decode(prompt_ids)
    if how == "seeded":
        # The model writes characters split across tokens, so text was held back somewhere.
        assert "" in texts[:-1], "the test model wrote no character split across tokens"


def test_a_generation_ending_inside_a_character_hands_out_what_was_held_back(models, either) -> None:
    client, _ = either
    params, msg = seeded(3)
    decode = decoder(models)
    prompt_ids = models.backend.encode(PROMPT, add_special_tokens=False).ids
    ref = reference_ids(models.bpe, models.backend, PROMPT, 60, params)
    # The first length at which the text ends inside a character (a later token completes it).
    n = next(k for k in range(1, 60) if decode(prompt_ids + ref[:k]).endswith(REPLACEMENT))
    ids, texts, fin = stream(client, PROMPT, max_new_tokens=n, params=msg, model=BPE)
    assert ids == ref[:n] and fin.reason == pb.FINISH_REASON_LENGTH
    # Its last text carries what was held back, as the library decodes it (U+FFFD).
    assert texts == expected_deltas(decode, prompt_ids, ids)
    assert "".join(texts) == decode(ids) and texts[-1].endswith(REPLACEMENT)


def test_fan_out_choices_each_stream_their_own_text(models, client) -> None:
    decode = decoder(models)
    prompt_ids = models.backend.encode(PROMPT, add_special_tokens=False).ids
    got: dict[int, tuple[list[int], list[str]]] = {0: ([], []), 1: ([], [])}
    for msg in client.generate(PROMPT, max_new_tokens=40, params=sampling(1.0, seed=5), model=BPE, n=2):
        for t in msg.tokens:
            got[t.choice][0].append(t.id)
            got[t.choice][1].append(t.text)
    for choice, (ids, texts) in got.items():
        assert ids == reference_ids(models.bpe, models.backend, PROMPT, 40, seeded(5 + choice)[0])
        assert texts == expected_deltas(decode, prompt_ids, ids)
        assert "".join(texts) == decode(ids)


def pick_stop(texts: list[str]) -> tuple[str, int]:
    """A stop string spanning two tokens: the last 2 characters through token j and the first of
    token j + 1, for the first j where that string first occurs just there. Returns it and the
    index of the token that completes it."""
    generated = "".join(texts)
    end = 0
    for j in range(len(texts) - 1):
        end += len(texts[j])
        if end < 2 or not texts[j] or not texts[j + 1]:
            continue
        stop = generated[end - 2 : end + 1]
        if generated.find(stop) == end - 2:
            return stop, j + 1
    raise AssertionError("no stop string spans a token boundary in the reference output")


def test_a_stop_string_across_tokens_stops_where_it_completes(models, either) -> None:
    client, http = either
    params, _ = seeded(3)
    decode = decoder(models)
    prompt_ids = models.backend.encode(PROMPT, add_special_tokens=False).ids
    ref = reference_ids(models.bpe, models.backend, PROMPT, 60, params)
    ref_texts = expected_deltas(decode, prompt_ids, ref)
    stop, at = pick_stop(ref_texts)
    assert stop not in ref_texts[at - 1] and stop not in ref_texts[at]  # it spans the boundary
    want_ids, want_texts = ref[: at + 1], ref_texts[: at + 1]

    ids, texts, fin = stream(client, PROMPT, max_new_tokens=60, params=seeded(3, [stop])[1], model=BPE)
    assert (ids, texts) == (want_ids, want_texts)
    assert fin.reason == pb.FINISH_REASON_STOP and fin.stop == stop
    assert fin.generated_tokens == at + 1

    body = {"model": BPE, "prompt": PROMPT, "max_tokens": 60, "temperature": 1.0, "seed": 3, "stop": stop}
    whole = http.post("/v1/completions", json={**body, "logprobs": 1}).json()
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == "".join(want_texts)
    assert choice["logprobs"]["tokens"] == want_texts
    offsets = [sum(len(t) for t in want_texts[:k]) for k in range(len(want_texts))]
    assert choice["logprobs"]["text_offset"] == offsets
    assert whole["usage"]["completion_tokens"] == at + 1

    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["text"] for e in events for c in e["choices"]) == "".join(want_texts)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_fifty_and_fifty_on_a_session_are_the_hundred_of_the_reference(models, either) -> None:
    client, _ = either
    params, msg = seeded(21)
    want = reference_ids(models.bpe, models.backend, PROMPT, 100, params)
    decode = decoder(models)
    s = client.create_session(PROMPT, model=BPE)
    first, texts1, _ = stream(client, "", session_id=s.session_id, max_new_tokens=50, params=msg)
    second, texts2, fin2 = stream(client, "", session_id=s.session_id, max_new_tokens=50, params=msg)
    assert first + second == want
    assert fin2.tokens_seen == len(models.backend.encode(PROMPT, add_special_tokens=False).ids) + 100
    # Each turn's texts add up to the decoding of its ids. (Streams are primed with the
    # request's own prompt; a continuation without one is not primed with the turn before.)
    assert "".join(texts1) == decode(first) and "".join(texts2) == decode(second)
    one_call, _, _ = stream(client, PROMPT, max_new_tokens=100, params=msg, model=BPE)
    assert one_call == want


def test_score_reads_the_text_as_the_tokenizer_splits_it(models, client) -> None:
    text = "The café in 東京 served 😀 crème brûlée."
    ids = models.backend.encode(text, add_special_tokens=False).ids
    r = client.score(text, model=BPE)
    assert [t.id for t in r.tokens] == ids[1:]
    assert r.normalized_text == text
    decode = decoder(models)
    assert [t.text for t in r.tokens] == expected_deltas(decode, ids[:1], ids[1:])
    assert decode(ids[:1]) + "".join(t.text for t in r.tokens) == text
    # Log-probabilities from the file as written, in one call from the zero state.
    session = ort.InferenceSession(str(models.bpe), providers=["CPUExecutionProvider"])
    hidden = int(session.get_modelmeta().custom_metadata_map["gru_serve.hidden_size"])
    feed = {"input_ids": np.array([ids], np.int64), "state": np.zeros((1, 1, hidden), np.float32)}
    logits, _ = session.run(["logits", "state_out"], feed)
    z = logits[0, :-1].astype(np.float64)
    lp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    want = lp[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose([t.logprob for t in r.tokens], want, atol=1e-4)


def test_model_info_lists_the_tokenizers_tokens(models, client) -> None:
    info = client.model_info(BPE)
    backend = models.backend
    assert list(info.vocab) == [backend.id_to_token(i) for i in range(backend.get_vocab_size())]
    assert list(client.model_info(WORDS).vocab) == list(WORD_LIST)


def test_a_words_model_streams_words_with_their_spaces(client) -> None:
    ids, texts, _ = stream(
        client, "the time machine", max_new_tokens=30, params=sampling(1.0, seed=2), model=WORDS
    )
    # PyTorch word_language_model's convention by hand: a space before a word that follows a
    # word (the prompt ends with one), <eos> a newline.
    after, want = True, []
    for i in ids:
        word = WORD_LIST[i]
        want.append("\n" if word == "<eos>" else (" " if after else "") + word)
        after = word != "<eos>"
    assert texts == want


# -- limits and unknown input --


def refused(call) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return err.value.details()


def test_prompts_are_limited_in_tokens_as_well_as_characters(models, client, http) -> None:
    many = "😀" * 60  # 60 characters, 4 bytes each: more tokens than the limit
    n = len(models.backend.encode(many).ids)
    assert len(many) <= MAX_PROMPT_CHARS and n > MAX_PROMPT_TOKENS
    words = f"has {n} tokens; the limit is {MAX_PROMPT_TOKENS} (max_prompt_tokens)"
    assert refused(lambda: stream(client, many, max_new_tokens=1, model=BPE)) == f"prompt {words}"
    assert refused(lambda: client.score(many, model=BPE)) == f"text {words}"
    assert refused(lambda: client.create_session(many, model=BPE)) == f"text {words}"
    turn = pb.ConverseRequest(model=BPE, text=many, max_new_tokens=1)
    assert refused(lambda: list(client.stub.Converse(iter([turn])))).endswith(words)
    r = http.post("/v1/completions", json={"model": BPE, "prompt": many, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["message"] == f"prompt {words}"
    r = http.post(f"/v2/models/{BPE}-generate/generate", json={"prompt": many, "max_new_tokens": 1})
    assert r.status_code == 400 and "max_prompt_tokens" in r.json()["error"]
    # Characters are counted before the tokenizer: a long text of few tokens is refused too.
    long = "a" * (MAX_PROMPT_CHARS + 1)
    assert "(max_prompt_chars)" in refused(lambda: stream(client, long, max_new_tokens=1, model=BPE))
    # At the limits, accepted.
    at = "😀" * 50
    assert len(models.backend.encode(at).ids) <= MAX_PROMPT_TOKENS
    assert stream(client, at, max_new_tokens=1, model=BPE)[2].prompt_tokens == len(
        models.backend.encode(at).ids
    )


def test_unknown_input_is_refused_naming_it_where_the_tokenizer_has_no_unknown_token(client, http) -> None:
    no_unk = "is not in the model's vocabulary, and its tokenizer has no unknown token"
    # A character model without <unk>: the character and its position.
    got = refused(lambda: stream(client, "café au lait", max_new_tokens=1, model=CHARS))
    assert got.startswith("prompt: character 'é' at position 3") and no_unk in got
    got = refused(lambda: client.score("the café", model=CHARS))
    assert got.startswith("text: character 'é' at position 7")
    # A word-list model: the word.
    got = refused(lambda: stream(client, "the time café", max_new_tokens=1, model=WORDS))
    assert got == f"prompt: word 'café' at position 9 {no_unk}"
    got = refused(lambda: client.create_session("the dodo", model=WORDS))
    assert got == f"text: word 'dodo' at position 4 {no_unk}"
    r = http.post("/v1/completions", json={"model": WORDS, "prompt": "the dodo", "max_tokens": 1})
    assert (
        r.status_code == 400 and r.json()["error"]["message"] == f"prompt: word 'dodo' at position 4 {no_unk}"
    )
    r = http.post(f"/v2/models/{CHARS}-generate/generate", json={"prompt": "café", "max_new_tokens": 1})
    assert r.status_code == 400 and "character 'é' at position 3" in r.json()["error"]
    # Known input goes through.
    assert stream(client, "the time", max_new_tokens=2, model=WORDS)[2].prompt_tokens == 2
    assert stream(client, "cafe au lait", max_new_tokens=2, model=CHARS)[2].prompt_tokens == 12
