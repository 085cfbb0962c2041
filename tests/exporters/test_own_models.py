"""Your own GRU language model: PyTorch word_language_model layouts (state_dict and pickled
module), any module through the Python API, tokenizers in the metadata, training on any
text, and the inputs that are refused. Real torch and onnxruntime; tiny models."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn

import exporters
from exporters.cli import main
from exporters.embedding import EMBEDDING, HEAD_B, HEAD_W
from exporters.export import export_module, validate_module
from exporters.tokenizer import read_tokenizer
from gru_serve.contract import IDENTITY_NORMALIZATION, read_model
from tests.support.paths import REPO

# PyTorch's examples/word_language_model/model.py RNNModel, GRU only, as its users have it.
WLM_SOURCE = """
import torch.nn as nn
import torch.nn.functional as F


class RNNModel(nn.Module):
    def __init__(self, ntoken, ninp, nhid, nlayers, dropout=0.5, tie_weights=False):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.GRU(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            if nhid != ninp:
                raise ValueError("When using the tied flag, nhid must be equal to emsize")
            self.decoder.weight = self.encoder.weight
        self.nhid, self.nlayers = nhid, nlayers

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output)
        decoded = decoded.view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden
"""
WLM_MODULE = "wlm_gru_model"
TEXT = (
    "The Time Traveller (for so it will be convenient to speak of him) was expounding a recondite "
    "matter to us. Café, naïve, déjà vu; 東京 and 北京 are cities; emoji 🙂🚀 too.\n"
)


@pytest.fixture(scope="module")
def wlm_dir(tmp_path_factory) -> Path:
    """A directory holding wlm_gru_model.py, importable here (sys.path) and, through
    PYTHONPATH, in subprocesses."""
    d = tmp_path_factory.mktemp("wlm")
    (d / f"{WLM_MODULE}.py").write_text(WLM_SOURCE)
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))
    sys.modules.pop(WLM_MODULE, None)


def scaled(module: nn.Module, seed: int) -> nn.Module:
    """Random weights: a GRU calm enough that float32 rounding is not amplified over the chained
    steps, a head wide enough that the argmax is never a near-tie (the greedy outputs of the
    two runtimes must agree token for token)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.25 if isinstance(module.get_submodule(name.rsplit(".", 1)[0]), nn.GRU) else 1.0
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def word_list(path: Path, size: int) -> Path:
    path.write_text("\n".join(["<unk>", "<eos>", *(f"w{i}" for i in range(size - 2))]) + "\n")
    return path


def cli(*args: str, cwd: Path = REPO, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "exporters.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )


def onnx_greedy(path: Path, prompt: list[int], n: int = 100) -> list[int]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = read_model(onnx.load(str(path)))
    state = np.zeros((1, meta.num_layers, meta.hidden_size), np.float32)
    logits, state = sess.run(None, {"input_ids": np.array([prompt], np.int64), "state": state})
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits, state = sess.run(None, {"input_ids": np.array([[out[-1]]], np.int64), "state": state})
    return out


def torch_greedy(module: nn.Module, prompt: list[int], time_major: bool, n: int = 100) -> list[int]:
    """The module's own greedy loop: its forward, its layout, its hidden state."""
    gru = next(m for m in module.modules() if isinstance(m, nn.GRU))
    h = torch.zeros(gru.num_layers, 1, gru.hidden_size)
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        scores, h = module(ids.T if time_major else ids, h)
        for _ in range(n):
            out.append(int(scores.reshape(-1, scores.shape[-1])[-1].argmax()))
            scores, h = module(torch.tensor([[out[-1]]]), h)
    return out


def served_greedy(path: Path, prompt: list[int], n: int = 100) -> list[int]:
    """The model served by gru-serve over gRPC (fast path and all): n greedy tokens after the
    prompt, given as its text (the model's tokenizer must read it back as the same ids)."""
    from gru_serve.client import Client
    from gru_serve.ops.settings import Settings
    from gru_serve.server import ThreadedServer
    from gru_serve.tokenizer import load_tokenizer

    text = load_tokenizer(read_model(onnx.load(str(path)))).decode(prompt)
    srv = ThreadedServer(Settings(port=0, models=(str(path),)))
    try:
        with Client(srv.target) as c:
            ids, finished = [], None
            for msg in c.generate(text, max_new_tokens=n):
                ids += [t.id for t in msg.tokens]
                finished = msg.finished if msg.HasField("finished") else finished
    finally:
        srv.stop()
    assert finished is not None and finished.prompt_tokens == len(prompt)
    return ids


def assert_one_error_line(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and err.count("\n") == 1 and lines[0].startswith("gru-export: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# word_language_model layouts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("tied", "ninp", "nhid", "layers"),
    [(True, 16, 16, 2), (False, 12, 20, 1)],
    ids=["tied-2-layers", "untied"],
)
def test_word_language_model_state_dict(wlm_dir, tmp_path, tied, ninp, nhid, layers):
    import wlm_gru_model

    net = scaled(wlm_gru_model.RNNModel(40, ninp, nhid, layers, 0.2 * (layers > 1), tied), seed=layers)
    sd_path = tmp_path / "model.pt"
    torch.save(net.state_dict(), sd_path)
    vocab = word_list(tmp_path / "vocab.txt", 40)
    out = tmp_path / "model.onnx"
    assert main(["export", str(sd_path), "-o", str(out), "--tokenizer", str(vocab), "--name", "wlm"]) == 0

    graph = onnx.load(str(out))
    meta = read_model(graph)
    assert (meta.input_kind, meta.vocab_size, meta.num_layers, meta.hidden_size) == (
        "embedding",
        40,
        layers,
        nhid,
    )
    assert meta.tokenizer == {"kind": "words", "split": "whitespace", "eos": "<eos>", "unk": "<unk>"}
    assert meta.normalization == IDENTITY_NORMALIZATION and meta.name == "wlm"
    inits = {t.name: tuple(t.dims) for t in graph.graph.initializer}
    assert inits[EMBEDDING] == (40, ninp) and inits[HEAD_W] == (nhid, 40) and inits[HEAD_B] == (40,)
    assert [
        n.op_type for n in graph.graph.node if n.op_type not in ("Constant", "Slice", "Squeeze", "Concat")
    ] == [
        "Transpose",
        "Gather",
        "Transpose",
        *["GRU"] * layers,
        "MatMul",
        "Add",
        "LogSoftmax",  # word_language_model's forward returns log-probabilities
        "Transpose",
        "Transpose",
    ]

    r = cli("validate", str(out), "--checkpoint", str(sd_path), "--tokenizer", str(vocab))
    assert r.returncode == 0, r.stderr
    assert "parity with PyTorch" in r.stdout
    prompt = [3, 7, 1, 12, 5]
    want = torch_greedy(net, prompt, time_major=True)
    assert onnx_greedy(out, prompt) == want and served_greedy(out, prompt) == want


def test_pickled_whole_module(wlm_dir, tmp_path, capsys):
    import wlm_gru_model

    net = scaled(wlm_gru_model.RNNModel(30, 16, 16, 2, tie_weights=True), seed=5)
    pickled = tmp_path / "model.pt"
    torch.save(net, pickled)  # what word_language_model/main.py saves
    vocab = word_list(tmp_path / "vocab.txt", 30)
    out = tmp_path / "model.onnx"
    argv = ["export", str(pickled), "-o", str(out), "--tokenizer", str(vocab)]
    assert_one_error_line(capsys, argv, "--trust-pickle", "pickle", "wlm_gru_model.RNNModel")
    assert not out.exists()
    assert main([*argv, "--trust-pickle"]) == 0
    capsys.readouterr()
    assert read_model(onnx.load(str(out))).input_kind == "embedding"

    # In a fresh process the class's module is importable through PYTHONPATH (or --pythonpath).
    check = ["validate", str(out), "--checkpoint", str(pickled)]
    r = cli(*check, "--trust-pickle", pythonpath=wlm_dir)
    assert r.returncode == 0, r.stderr
    r = cli(*check, "--trust-pickle", "--pythonpath", str(wlm_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli(*check, "--trust-pickle", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--pythonpath" in r.stderr, r.stderr
    r = cli(*check, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--trust-pickle" in r.stderr, r.stderr
    prompt = [2, 9, 4]
    want = torch_greedy(net, prompt, time_major=True)
    assert onnx_greedy(out, prompt) == want and served_greedy(out, prompt) == want


class BatchFirstLM(nn.Module):
    """Not word_language_model's layout: batch-first ids, a batch_first GRU, raw scores
    [batch, seq, V]."""

    def __init__(self, vocab: int, emb: int = 12, hidden: int = 24, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.gru = nn.GRU(emb, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids, state):
        y, state = self.gru(self.embed(ids), state)
        return self.head(y), state


def test_python_api_batch_first_module(tmp_path):
    words = dict.fromkeys(["[UNK]", *TEXT.split()])
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    vocab = tok.get_vocab_size()
    net = scaled(BatchFirstLM(vocab), seed=11)
    out = tmp_path / "api.onnx"
    report = exporters.export_module(net, out, tokenizer=tok, time_major=False, name="api-model")
    meta = report.metadata
    assert (
        meta.name == "api-model"
        and meta.input_kind == "embedding"
        and meta.tokenizer["kind"] == "huggingface"
    )
    assert any("parity with PyTorch" in c for c in report.checks)
    assert any("Gather -> GRU x2 -> MatMul + Add" in c and "LogSoftmax" not in c for c in report.checks)
    assert validate_module(out, net, tokenizer=tok).worst["logits"] <= 1e-4

    # The CLI validates it too, from the pickled module (its class importable from the repo).
    pickled = tmp_path / "api.pt"
    torch.save(net, pickled)
    r = cli("validate", str(out), "--checkpoint", str(pickled), "--trust-pickle", pythonpath=REPO)
    assert r.returncode == 0, r.stderr
    prompt = tok.encode("The Time Traveller was").ids
    want = torch_greedy(net, prompt, time_major=False)
    assert onnx_greedy(out, prompt) == want and served_greedy(out, prompt) == want


class NormedLM(nn.Module):
    """An extra LayerNorm before the head: not the plain pattern, so exported as traced."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, 8)
        self.rnn = nn.GRU(8, 8)
        self.norm = nn.LayerNorm(8)
        self.decoder = nn.Linear(8, vocab)

    def forward(self, ids, state):
        y, state = self.rnn(self.encoder(ids), state)
        return self.decoder(self.norm(y)), state


def test_other_modules_are_traced_as_they_are(tmp_path):
    net = scaled(NormedLM(20), seed=3)
    report = export_module(net, tmp_path / "t.onnx", tokenizer=[f"t{i}" for i in range(20)])
    assert any("traced from" in c for c in report.checks)
    assert report.metadata.input_kind == "embedding"
    assert onnx_greedy(tmp_path / "t.onnx", [1, 2]) == torch_greedy(net, [1, 2], time_major=True)


def test_tied_model_with_a_projection_exports_one_head(tmp_path):
    """Tied with embedding 8 != hidden 12: decoder(proj(h)) is folded into one [12, V] head."""
    from exporters.embedding import EmbeddingConfig, EmbeddingGRULM

    net = scaled(EmbeddingGRULM(EmbeddingConfig(24, 8, 12, 2, tie_weights=True)), seed=4)
    assert net.decoder.weight is net.encoder.weight and net.proj is not None
    out = tmp_path / "proj.onnx"
    report = export_module(net, out, tokenizer=[f"t{i}" for i in range(24)])
    assert any("Gather -> GRU x2 -> MatMul + Add (input embedding)" in c for c in report.checks)
    inits = {t.name: tuple(t.dims) for t in onnx.load(str(out)).graph.initializer}
    assert inits[EMBEDDING] == (24, 8) and inits[HEAD_W] == (12, 24)
    assert onnx_greedy(out, [5, 6]) == torch_greedy(net, [5, 6], time_major=True)


# Tokenizers in the metadata ----------------------------------------------------------------


def hf_byte_level_bpe(path: Path) -> Path:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([TEXT * 3], trainer)
    tok.save(str(path))
    return path


def hf_wordpiece(path: Path) -> Path:
    tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[UNK]"], show_progress=False)
    tok.train_from_iterator([TEXT * 3], trainer)
    tok.save(str(path))
    return path


@pytest.mark.parametrize("kind", ["words-whitespace", "words-chars", "byte-level-bpe", "wordpiece"])
def test_tokenizer_metadata_round_trips(tmp_path, kind):
    if kind.startswith("words"):
        split = kind.removeprefix("words-")
        tokens = sorted(set(TEXT.split() if split == "whitespace" else TEXT.replace("\n", "")))
        path = tmp_path / "vocab.txt"
        path.write_text("\n".join(["<unk>", "<eos>", *tokens]) + "\n")
    else:
        split = None
        path = (hf_byte_level_bpe if kind == "byte-level-bpe" else hf_wordpiece)(tmp_path / "tokenizer.json")
    tok = read_tokenizer(path, split)
    net = scaled(BatchFirstLM(len(tok), emb=8, hidden=8, layers=1), seed=1)
    sd = tmp_path / "sd.pt"
    out = tmp_path / "m.onnx"
    export_module(net, out, tokenizer=str(path), split=split)
    meta = read_model(onnx.load(str(out)))
    assert meta.vocab == tok.tokens and meta.normalization == IDENTITY_NORMALIZATION
    text = "The Time Traveller said: café 東京 🙂 unknownword\nand more"
    if kind.startswith("words"):
        assert meta.tokenizer == {"kind": "words", "split": split, "eos": "<eos>", "unk": "<unk>"}
        assert meta.tokenizer_json == ""
        pieces = [line.split() if split == "whitespace" else list(line) for line in text.split("\n")]
        want = [t for line in pieces for t in [*line, "<eos>"]]
        assert [meta.vocab[i] for i in tok.encode(text)] == [t if t in meta.vocab else "<unk>" for t in want]
    else:
        assert meta.tokenizer == {
            "kind": "huggingface",
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
        assert hashlib.sha256(meta.tokenizer_json.encode()).hexdigest() == meta.tokenizer["sha256"]
        hf = HFTokenizer.from_str(meta.tokenizer_json)
        assert hf.encode(text).ids == tok.encode(text)
        assert [hf.id_to_token(i) for i in range(len(meta.vocab))] == list(meta.vocab)
    del sd


# Training on any text ----------------------------------------------------------------------


def test_train_bpe_on_any_utf8_text_then_export_and_validate(tmp_path, capsys):
    corpus = tmp_path / "small.txt"
    lines = [
        "Le café était déjà fermé ; naïve Zoë mangea une crème brûlée.",
        "東京は日本の首都です。北京は中国の首都です。",
        "Emoji travel too: 🙂 🚀 🌍 and 👩‍🔬 (a zero-width joiner).",
        "The Time Traveller smiled. Are you sure we can move freely in Space?",
    ]
    corpus.write_text("\n".join(lines * 12) + "\n", encoding="utf-8")
    ck = tmp_path / "ck.pt"
    argv = ["train", "--corpus", str(corpus), "--tokenizer", "bpe:300", "--epochs", "1"]
    argv += ["--embedding-size", "16", "--hidden-size", "16", "--num-layers", "1", "--batch-size", "4"]
    argv += ["--num-steps", "8", "--tie-weights", "-o", str(ck)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "bits per character" in printed and "held-out" in printed

    out = tmp_path / "bpe.onnx"
    assert main(["export", str(ck), "-o", str(out), "--card", str(tmp_path / "README.md")]) == 0
    meta = read_model(onnx.load(str(out)))
    assert (
        meta.tokenizer["kind"] == "huggingface" and meta.vocab_size == 300 and meta.input_kind == "embedding"
    )
    assert {"train_d2l", "train_stream", "heldout_stream", "heldout_bpc"} <= set(meta.perplexity)
    hf = HFTokenizer.from_str(meta.tokenizer_json)
    assert hf.decode(hf.encode(lines[1] + "\n" + lines[2]).ids) == lines[1] + "\n" + lines[2]
    card = (tmp_path / "README.md").read_text()
    assert "bits per character" in card and "--tokenizer bpe:300" in card and "--tie-weights" in card
    r = cli("validate", str(out), "--checkpoint", str(ck))
    assert r.returncode == 0, r.stderr
    assert "perplexity on" in r.stdout


# Refused inputs: exit 2, one line ----------------------------------------------------------


def test_tokenizer_of_another_size_is_refused(wlm_dir, tmp_path, capsys):
    import wlm_gru_model

    sd = tmp_path / "sd.pt"
    torch.save(wlm_gru_model.RNNModel(40, 8, 8, 1, 0.0).state_dict(), sd)
    vocab = word_list(tmp_path / "vocab.txt", 37)
    argv = ["export", str(sd), "-o", str(tmp_path / "m.onnx"), "--tokenizer", str(vocab)]
    assert_one_error_line(capsys, argv, "37 tokens", "embedding has 40")
    bpe = hf_byte_level_bpe(tmp_path / "tokenizer.json")
    argv = ["export", str(sd), "-o", str(tmp_path / "m.onnx"), "--tokenizer", str(bpe)]
    assert_one_error_line(capsys, argv, "290 tokens", "embedding has 40")


def test_word_language_model_without_tokenizer_is_refused(wlm_dir, tmp_path, capsys):
    import wlm_gru_model

    sd = tmp_path / "sd.pt"
    torch.save(wlm_gru_model.RNNModel(40, 8, 8, 1, 0.0).state_dict(), sd)
    assert_one_error_line(capsys, ["export", str(sd), "-o", str(tmp_path / "m.onnx")], "--tokenizer")


class LSTMModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 8)
        self.decoder = nn.Linear(8, 20)

    def forward(self, ids, hidden):
        y, hidden = self.rnn(self.encoder(ids), hidden)
        return self.decoder(y), hidden


@pytest.mark.parametrize("kind", ["LSTM", "plain RNN"])
def test_lstm_and_plain_rnn_are_refused(tmp_path, capsys, kind):
    rnn = nn.LSTM(8, 8, 2) if kind == "LSTM" else nn.RNN(8, 8, 2)
    sd = {"encoder.weight": torch.zeros(20, 8), "decoder.weight": torch.zeros(20, 8)}
    sd |= {f"rnn.{k}": v for k, v in rnn.state_dict().items()} | {"decoder.bias": torch.zeros(20)}
    path = tmp_path / "rnn.pt"
    torch.save(sd, path)
    line = assert_one_error_line(capsys, ["export", str(path), "-o", str(tmp_path / "m.onnx")], kind)
    assert "only GRU is supported" in line
    if kind == "LSTM":
        assert "one state tensor [batch, layers, hidden]" in line
        with pytest.raises(Exception, match="only GRU is supported"):
            export_module(LSTMModel(), tmp_path / "m.onnx", tokenizer=[f"t{i}" for i in range(20)])


def test_pickle_without_trust_is_refused_without_traceback(wlm_dir, tmp_path):
    import wlm_gru_model

    pickled = tmp_path / "model.pt"
    torch.save(wlm_gru_model.RNNModel(10, 4, 4, 1, 0.0), pickled)
    r = cli("export", str(pickled), "-o", str(tmp_path / "m.onnx"), pythonpath=wlm_dir)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "--trust-pickle" in r.stderr and "runs code" in r.stderr


def test_corpus_that_is_not_utf8_is_refused(tmp_path, capsys):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("plain ascii first, then café".encode("latin-1"))
    argv = ["train", "--corpus", str(corpus), "--tokenizer", "char", "-o", str(tmp_path / "c.pt")]
    offset = len(b"plain ascii first, then caf")
    assert_one_error_line(capsys, argv, "not UTF-8", f"byte offset {offset}", "0xe9")
