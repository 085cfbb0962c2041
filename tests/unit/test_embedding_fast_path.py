"""The fast path (Gather + GRU cell decode step, fused K-token Loop) for embedding-input GRU LMs:
Embedding -> GRU (2 layers) -> Linear [-> log_softmax], tied and untied, as torch.onnx.export
writes them (batch-first and word_language_model's time-major layout, with and without
constant folding) and as exporters.export.export_module writes them. The derived step must
compute the exported graph's function for every token id, the fused path must be bit-identical
to the step path, and the greedy tokens must be PyTorch's."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gru_serve.contract import (
    IDENTITY_NORMALIZATION,
    INPUT_IDS,
    LOGITS,
    OPSET,
    STATE,
    STATE_OUT,
    ModelMetadata,
)
from gru_serve.engine.runtime import ModelRuntime
from gru_serve.graphs.decode import decode_graph
from gru_serve.graphs.weights import NotAGRULanguageModel, gru_weights
from gru_serve.reference import fused_generate, step_generate
from gru_serve.sampling import SamplingParams
from gru_serve.shipped import shipped_models
from tests.support.serving import D2L

LAYERS = 2
CHARS = tuple("abcdefghijklmnopqrstuvwxyz0123456789 ")  # 37 tokens
WORDS = ("<unk>", "<eos>", *(f"w{i}" for i in range(39)))  # 41 tokens
WORDS_TOKENIZER = {"kind": "words", "split": "whitespace", "eos": "<eos>", "unk": "<unk>"}
# The load check's tolerances (gru_serve.engine.runtime.ModelRuntime._check_derived).
ATOL_LOGITS, ATOL_STATE = 1e-4, 1e-5


class BatchFirstLM(nn.Module):
    """ids [batch, seq], a batch_first GRU, scores [batch, seq, V]."""

    def __init__(self, vocab: int, emb: int, hidden: int, tied: bool, log_softmax: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.gru = nn.GRU(emb, hidden, LAYERS, batch_first=True)
        self.head = nn.Linear(hidden, vocab)
        if tied:
            self.head.weight = self.embed.weight
        self.log_softmax = log_softmax

    def forward(self, ids, state):
        y, state = self.gru(self.embed(ids), state)
        scores = self.head(y)
        return (F.log_softmax(scores, dim=-1) if self.log_softmax else scores), state


class WordLM(nn.Module):
    """word_language_model's RNNModel (GRU): time-major, log_softmax over [seq * batch, V]; with
    `flat`, the decoder runs on the [seq * batch, hidden] view (a Gemm in the graph)."""

    def __init__(self, vocab: int, emb: int, hidden: int, tied: bool, flat: bool) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, emb)
        self.rnn = nn.GRU(emb, hidden, LAYERS)
        self.decoder = nn.Linear(hidden, vocab)
        if tied:
            self.decoder.weight = self.encoder.weight
        self.flat = flat

    def forward(self, ids, hidden):
        y, hidden = self.rnn(self.encoder(ids), hidden)
        if self.flat:
            decoded = self.decoder(y.reshape(-1, y.shape[-1]))
        else:
            decoded = self.decoder(y).view(-1, self.decoder.out_features)
        return F.log_softmax(decoded, dim=1), hidden


class Contract(nn.Module):
    """gru_serve.contract around a module: ids [batch, seq], state [batch, layers, hidden] in,
    logits [batch, seq, V], state_out out."""

    def __init__(self, module: nn.Module, time_major: bool) -> None:
        super().__init__()
        self.module, self.time_major = module, time_major

    def forward(self, input_ids, state):
        ids = input_ids.transpose(0, 1) if self.time_major else input_ids
        scores, h = self.module(ids, state.transpose(0, 1).contiguous())
        scores = scores.reshape(ids.shape[0], ids.shape[1], -1)
        return (scores.transpose(0, 1) if self.time_major else scores), h.transpose(0, 1)


def seeded(module: nn.Module, seed: int) -> nn.Module:
    """Random weights: a calm GRU and a head wide enough that the argmax is never a near-tie,
    so PyTorch's greedy tokens and onnxruntime's must agree."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.25 if isinstance(module.get_submodule(name.rsplit(".", 1)[0]), nn.GRU) else 1.0
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def export_contract(
    module: nn.Module,
    time_major: bool,
    path: Path,
    vocab: tuple[str, ...],
    tokenizer: dict,
    fold: bool = True,
) -> Path:
    hidden = next(m for m in module.modules() if isinstance(m, nn.GRU)).hidden_size
    batch_seq = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Contract(module, time_major).eval(),
            (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, LAYERS, hidden)),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=fold,
            input_names=[INPUT_IDS, STATE],
            output_names=[LOGITS, STATE_OUT],
            dynamic_axes={
                INPUT_IDS: batch_seq,
                STATE: {0: "batch"},
                LOGITS: batch_seq,
                STATE_OUT: {0: "batch"},
            },
        )
    model = onnx.load(str(path))
    for out in model.graph.output:  # an export without constant folding leaves these symbolic
        dims = out.type.tensor_type.shape.dim
        for axis, size in {LOGITS: {2: len(vocab)}, STATE_OUT: {1: LAYERS, 2: hidden}}[out.name].items():
            dims[axis].dim_value = size
    meta = ModelMetadata(
        name=path.stem,
        vocab=vocab,
        hidden_size=hidden,
        num_layers=LAYERS,
        normalization=dict(IDENTITY_NORMALIZATION),
        tokenizer=tokenizer,
        input_kind="embedding",
    )
    onnx.helper.set_model_props(model, meta.to_props())
    onnx.save(model, str(path))
    return path


@dataclass(frozen=True)
class Case:
    path: Path
    module: nn.Module
    time_major: bool
    log_softmax: bool


def _build(name: str, root: Path) -> Case:
    V, W = len(CHARS), len(WORDS)
    if name == "batch-first untied":  # MatMul [H, V] + Add
        m = seeded(BatchFirstLM(V, 10, 16, tied=False, log_softmax=False), 1)
        return Case(export_contract(m, False, root / "bf.onnx", CHARS, {"kind": "chars"}), m, False, False)
    if name == "batch-first tied log_softmax":  # MatMul (E^T, folded) + Add + LogSoftmax(-1)
        m = seeded(BatchFirstLM(V, 16, 16, tied=True, log_softmax=True), 2)
        return Case(export_contract(m, False, root / "bft.onnx", CHARS, {"kind": "chars"}), m, False, True)
    if name == "wlm tied Gemm unfolded":  # Gemm(transB=1) on the embedding itself, LogSoftmax(1)
        m = seeded(WordLM(W, 16, 16, tied=True, flat=True), 3)
        path = export_contract(m, True, root / "wlm_gemm.onnx", WORDS, WORDS_TOKENIZER, fold=False)
        return Case(path, m, True, True)
    if name == "wlm untied unfolded":  # MatMul(Transpose(decoder.weight)), gate Slices unfolded
        m = seeded(WordLM(W, 12, 16, tied=False, flat=False), 4)
        path = export_contract(m, True, root / "wlm.onnx", WORDS, WORDS_TOKENIZER, fold=False)
        return Case(path, m, True, True)
    # The exporter's own graphs (exporters.embedding.EMBEDDING_GRAPH).
    export_module = pytest.importorskip("exporters.export").export_module
    if name == "export_module word_language_model tied":
        from exporters.embedding import EmbeddingConfig, EmbeddingGRULM

        m = seeded(EmbeddingGRULM(EmbeddingConfig(W, 16, 16, LAYERS, tie_weights=True, log_softmax=True)), 5)
        export_module(m, root / "exp_wlm.onnx", tokenizer=list(WORDS))
        return Case(root / "exp_wlm.onnx", m, True, True)
    assert name == "export_module batch-first"
    m = seeded(BatchFirstLM(W, 12, 20, tied=False, log_softmax=False), 6)
    export_module(m, root / "exp_bf.onnx", tokenizer=list(WORDS), time_major=False)
    return Case(root / "exp_bf.onnx", m, False, False)


CASES = [
    "batch-first untied",
    "batch-first tied log_softmax",
    "wlm tied Gemm unfolded",
    "wlm untied unfolded",
    "export_module word_language_model tied",
    "export_module batch-first",
]


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory) -> Case:
    return _build(request.param, tmp_path_factory.mktemp("embedding"))


@pytest.fixture(scope="module")
def rt(case) -> ModelRuntime:
    return ModelRuntime(case.path)


def test_the_fast_path_is_on(case, rt):
    assert rt.metadata.input_kind == "embedding"
    assert rt.fast_path_note.startswith("on"), rt.fast_path_note
    assert rt.has_fused and rt.decode_session is not None and rt.fused_single is not None
    w = gru_weights(onnx.load(str(case.path)))
    assert (w.input_kind, w.log_softmax, len(w.layers)) == ("embedding", case.log_softmax, LAYERS)
    # Layer 0's input projection is a [V, 3H] table gathered by token id: the decode step has
    # the nodes of a two-layer one-hot model's, and a LogSoftmax where the exported graph has one.
    assert w.layers[0][0].shape == (3 * w.hidden, rt.metadata.vocab_size)
    ops = sorted(n.op_type for n in decode_graph(onnx.load(str(case.path))).graph.node)
    one_hot = [
        n.op_type for n in decode_graph(onnx.load(str(shipped_models()["timemachine-full"]))).graph.node
    ]
    assert ops == sorted(one_hot + ["LogSoftmax"] * case.log_softmax)


def test_the_derived_step_is_the_exported_graph_for_every_token_id(rt):
    V, (L, H) = rt.metadata.vocab_size, rt.state_shape
    every = np.arange(V, dtype=np.int64)[:, None]
    rng = np.random.default_rng(0)
    worst = {"logits": 0.0, "state": 0.0}
    for state in (np.zeros((V, L, H), np.float32), (rng.standard_normal((V, L, H)) * 0.5).astype(np.float32)):
        want = rt.session.run([LOGITS, STATE_OUT], {INPUT_IDS: every, STATE: state})
        got = rt.decode_session.run([LOGITS, STATE_OUT], {INPUT_IDS: every, STATE: state})
        for key, a, b in zip(("logits", "state"), got, want, strict=True):
            assert a.shape == b.shape
            worst[key] = max(worst[key], float(np.abs(a - b).max()))
    # Chained: 40 decode steps of 3 rows against one exported-graph run over the same 40 ids.
    ids = rng.integers(0, V, (3, 40), dtype=np.int64)
    state = (rng.standard_normal((3, L, H)) * 0.5).astype(np.float32)
    want_logits, want_state = rt.session.run([LOGITS, STATE_OUT], {INPUT_IDS: ids, STATE: state})
    for t in range(ids.shape[1]):
        logits, state = rt.decode_session.run(
            [LOGITS, STATE_OUT], {INPUT_IDS: ids[:, t : t + 1], STATE: state}
        )
        worst["logits"] = max(worst["logits"], float(np.abs(logits[:, 0] - want_logits[:, t]).max()))
    worst["state"] = max(worst["state"], float(np.abs(state - want_state).max()))
    print(f"{rt.name}: max |derived - exported| logits {worst['logits']:.3g}, state {worst['state']:.3g}")
    assert worst["logits"] <= ATOL_LOGITS and worst["state"] <= ATOL_STATE, worst


PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=1.0, seed=7),
    SamplingParams(temperature=0.75, top_k=5, seed=11),
    SamplingParams(temperature=1.25, top_p=0.875, seed=3),
    SamplingParams(temperature=0.625, top_k=3, top_p=0.75, seed=2**63 + 5),
]
PROMPTS = [[1, 5, 9, 2], [3], [7, 7, 0], [4, 11], [12, 2, 8, 6, 1]]
N = 64


def step_path(rt, prompt, params):
    return step_generate(rt.step, prompt, rt.zero_state(), params, N)


@pytest.mark.parametrize("k", [16, 64])
def test_fused_is_the_step_path_bit_for_bit_at_batch_1(rt, k):
    for prompt, params in zip(PROMPTS, PARAMS, strict=True):
        got, logits, state = fused_generate(rt, [prompt], [params], N, k)
        want, want_logits, want_state = step_path(rt, prompt, params)
        assert got[0] == want, params
        assert np.array_equal(logits[0], want_logits) and np.array_equal(state[0], want_state), params


@pytest.mark.parametrize(
    "rows",
    [[0, 0, 0], [0, 1, 2], [1, 3, 4]],
    ids=["greedy branch", "temperature branch", "top-k and top-p branch"],
)
def test_fused_is_the_step_path_bit_for_bit_at_batch_3(rt, rows):
    prompts, params = [PROMPTS[(r + 1) % 5] for r in rows], [PARAMS[r] for r in rows]
    for k in (16, 64):
        got, logits, state = fused_generate(rt, prompts, params, N, k)
        for r, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            want, want_logits, want_state = step_path(rt, prompt, p)
            assert got[r] == want, (k, p)
            assert np.array_equal(logits[r], want_logits) and np.array_equal(state[r], want_state), (k, p)


def test_iobinding_decoder_is_the_step_path(rt):
    state = (np.random.default_rng(1).standard_normal((3, *rt.state_shape)) * 0.5).astype(np.float32)
    dec = rt.decoder(state)
    for tokens in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):
        logits, state = rt.step(np.array(tokens, np.int64)[:, None], state)
        assert np.array_equal(dec.step(np.array(tokens)), logits[:, 0])
        assert np.array_equal(dec.state(), state)


def torch_greedy(case: Case, prompt: list[int], n: int) -> list[int]:
    """The module's own greedy loop: its forward, its layout, its hidden state."""
    gru = next(m for m in case.module.modules() if isinstance(m, nn.GRU))
    h = torch.zeros(gru.num_layers, 1, gru.hidden_size)
    out: list[int] = []
    with torch.no_grad():
        ids = torch.tensor([prompt])
        scores, h = case.module(ids.T if case.time_major else ids, h)
        for _ in range(n):
            out.append(int(scores.reshape(-1, scores.shape[-1])[-1].argmax()))
            scores, h = case.module(torch.tensor([[out[-1]]]), h)
    return out


def test_greedy_tokens_are_pytorchs(case, rt):
    greedy = SamplingParams()
    got, _, _ = fused_generate(rt, PROMPTS[:3], [greedy] * 3, N, 16)
    for r, prompt in enumerate(PROMPTS[:3]):
        want = torch_greedy(case, prompt, N)
        assert got[r] == want
        assert fused_generate(rt, [prompt], [greedy], N, 64)[0][0] == want
        assert step_path(rt, prompt, greedy)[0] == want


# What is not taken, and why ------------------------------------------------------------------


class NormedLM(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed, self.gru = nn.Embedding(vocab, 8), nn.GRU(8, 8, LAYERS, batch_first=True)
        self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, vocab)

    def forward(self, ids, state):
        y, state = self.gru(self.embed(ids), state)
        return self.head(self.norm(y)), state


class SoftmaxLM(BatchFirstLM):
    def forward(self, ids, state):
        scores, state = super().forward(ids, state)
        return torch.softmax(scores, dim=-1), state


class WrongAxisLM(BatchFirstLM):
    def forward(self, ids, state):
        scores, state = super().forward(ids, state)
        return F.log_softmax(scores, dim=1), state  # over the sequence


class StatelessLM(BatchFirstLM):
    def forward(self, ids, state):
        y, _ = self.gru(self.embed(ids))  # ignores the state it is given
        zeros = torch.zeros(LAYERS, ids.shape[0], self.gru.hidden_size)
        return self.head(y), zeros + 0 * state


@pytest.mark.parametrize(
    "module, reason",
    [
        (NormedLM(20), "the head.s input comes from LayerNormalization node"),
        (SoftmaxLM(20, 8, 8, tied=False, log_softmax=False), "they come from Softmax node"),
        (WrongAxisLM(20, 8, 8, tied=False, log_softmax=False), "LogSoftmax node '.*' is over axis 1"),
        (
            StatelessLM(20, 8, 8, tied=False, log_softmax=False),
            "initial_h comes from ConstantOfShape node .*, not the state input",
        ),
    ],
    ids=["LayerNorm before the head", "Softmax", "LogSoftmax over the sequence", "state ignored"],
)
def test_other_graphs_are_refused_with_the_reason(tmp_path, module, reason):
    tokens = tuple(f"t{i}" for i in range(20))
    path = export_contract(seeded(module, 0), False, tmp_path / "m.onnx", tokens, {"kind": "chars"})
    with pytest.raises(NotAGRULanguageModel, match=reason):
        gru_weights(onnx.load(str(path)))
    rt = ModelRuntime(path)  # still served, by the exported graph
    assert rt.fast_path_note.startswith("off: ") and not rt.has_fused and rt.decode_session is None
    logits, _ = rt.step(np.array([[1]], np.int64), rt.zero_state())
    assert logits.shape == (1, 1, 20)


def test_graphs_that_cannot_be_built_leave_the_model_on_the_exported_graph(tmp_path, monkeypatch):
    import gru_serve.engine.runtime as runtime

    def too_big(*_):
        raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB")

    monkeypatch.setattr(runtime, "fused_graph", too_big)
    rt = ModelRuntime(D2L)
    assert rt.fast_path_note.startswith("off: the derived graphs cannot be built (ValueError: Message")
    assert not rt.has_fused and rt.decode_session is None


def test_one_hot_models_keep_their_weights():
    w = gru_weights(onnx.load(str(D2L)))
    assert (w.input_kind, w.log_softmax) == ("one_hot", False)


def test_a_gru_without_initial_h_is_refused(tmp_path):
    path = export_contract(
        seeded(BatchFirstLM(20, 8, 8, False, False), 0),
        False,
        tmp_path / "m.onnx",
        tuple(f"t{i}" for i in range(20)),
        {"kind": "chars"},
    )
    model = onnx.load(str(path))
    gru = next(n for n in model.graph.node if n.op_type == "GRU")
    gru.input[5] = ""
    with pytest.raises(
        NotAGRULanguageModel, match=r"GRU node .* has no initial_h: the graph ignores its state"
    ):
        gru_weights(model)


def test_a_large_model_keeps_the_decode_step_without_the_fused_loop(monkeypatch, case):
    """Past FUSED_MAX_WEIGHT_BYTES the fused loop (three copies of the weights, two sessions)
    is skipped; the decode step still runs and matches the exported graph."""
    import gru_serve.engine.runtime as runtime

    monkeypatch.setattr(runtime, "FUSED_MAX_WEIGHT_BYTES", 1024)
    rt = runtime.ModelRuntime(case.path)
    assert rt.fast_path_note.startswith("decode step only") and not rt.has_fused
    ids = np.array([[3], [5]], np.int64)
    state = rt.zero_state(2)
    want = rt.session.run(None, {"input_ids": ids, "state": state})
    got = rt.decode_session.run(None, {"input_ids": ids, "state": state})
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=0)
