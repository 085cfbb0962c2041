"""Embedding-input GRU language models: PyTorch's word_language_model layout, and any GRU LM
nn.Module, adapted to the exported contract (gru_serve.contract).

The word_language_model layout (pytorch/examples, word_language_model/model.py, RNNModel with
rnn_type GRU): nn.Embedding encoder -> nn.GRU (time-major, N layers, dropout) -> nn.Dropout ->
nn.Linear decoder (optionally tied: decoder.weight is encoder.weight) -> log_softmax over a
[seq * batch, ntoken] view. Its state_dict keys: encoder.weight [ntoken, ninp],
rnn.{weight_ih,weight_hh,bias_ih,bias_hh}_l{k}, decoder.weight, decoder.bias.

Two modules stand for a model here:
- the reference, `ContractAdapter(module)`: the contract (ids [batch, seq], state
  [batch, layers, hidden] -> logits [batch, seq, vocab], state_out) computed by the module's
  own forward; validation compares the exported graph with it.
- the exported module: `EmbeddingStateful` when the module is an embedding -> GRU -> linear
  head (checked numerically against the reference first), which exports to the graph
  described in EMBEDDING_GRAPH; else the reference itself, traced as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import nn

# Names of the exported embedding graph's initializers (name_graph sets them).
EMBEDDING = "embedding.weight"  # [vocab, embedding]: Gather(EMBEDDING, ids [seq, batch], axis 0)
GRU_W, GRU_R, GRU_B = "gru.l{}.W", "gru.l{}.R", "gru.l{}.B"  # layer k's ONNX GRU inputs 1, 2, 3
HEAD_W, HEAD_B = "head.weight", "head.bias"  # [hidden, vocab] MatMul, then [vocab] Add
EMBEDDING_GRAPH = (
    "input_ids -> Transpose -> Gather(embedding.weight) -> GRU (one node a layer, "
    "gru.l{k}.W/R/B) -> MatMul(head.weight) -> Add(head.bias) [-> LogSoftmax(axis=-1)] -> "
    "Transpose -> logits"
)

_GRU_KEY = re.compile(r"(?:^|\.)(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)$")
RECURRENT_GATES = {3: "GRU", 4: "LSTM", 1: "plain RNN"}
WHY_GRU_ONLY = {
    "LSTM": "the contract carries one state tensor [batch, layers, hidden] and an LSTM has two (h and c)",
    "plain RNN": "the exported graph and the server's decode path are built from ONNX GRU nodes, and "
    "an Elman RNN's cell is not a GRU's",
}


class NotSupported(ValueError):
    """A model this exporter cannot take (an LSTM, say); the message says why."""


def only_gru(kind: str, what: str) -> NotSupported:
    return NotSupported(
        f"not a GRU language model: {what} is an {kind}; only GRU is supported: {WHY_GRU_ONLY[kind]}"
        if kind == "LSTM"
        else f"not a GRU language model: {what} is a {kind}; only GRU is supported: {WHY_GRU_ONLY[kind]}"
    )


def recurrent_kind(sd: dict[str, Any]) -> str | None:
    """ "GRU", "LSTM" or "plain RNN" from a state_dict's recurrent weights (weight_ih_l0 has
    3, 4 or 1 x hidden rows), or None without them."""
    for key, value in sd.items():
        m = _GRU_KEY.search(key)
        if m and m.group(1) == "weight_ih" and m.group(2) == "0":
            hh = sd.get(key.replace("weight_ih", "weight_hh"))
            if isinstance(value, torch.Tensor) and isinstance(hh, torch.Tensor) and hh.dim() == 2:
                return RECURRENT_GATES.get(value.shape[0] // max(1, hh.shape[1]), "?")
    return None


@dataclass(frozen=True)
class EmbeddingConfig:
    vocab_size: int
    embedding_size: int
    hidden_size: int
    num_layers: int = 1
    dropout: float = 0.0  # on the embedding, between GRU layers and before the head; training only
    tie_weights: bool = False  # decoder.weight is encoder.weight
    log_softmax: bool = False  # forward returns log-probabilities (word_language_model does)


class EmbeddingGRULM(nn.Module):
    """word_language_model's RNNModel with a GRU: forward(input [seq, batch], hidden
    [layers, batch, hidden]) -> scores [seq * batch, vocab], new hidden. Tied with an
    embedding size other than the hidden size, a linear projection (`proj`, hidden ->
    embedding) comes before the tied decoder; the export folds it into the head."""

    def __init__(self, config: EmbeddingConfig) -> None:
        super().__init__()
        c = self.config = config
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.Embedding(c.vocab_size, c.embedding_size)
        self.rnn = nn.GRU(
            c.embedding_size, c.hidden_size, c.num_layers, dropout=c.dropout if c.num_layers > 1 else 0.0
        )
        projected = c.tie_weights and c.embedding_size != c.hidden_size
        self.proj = nn.Linear(c.hidden_size, c.embedding_size) if projected else None
        self.decoder = nn.Linear(c.embedding_size if c.tie_weights else c.hidden_size, c.vocab_size)
        if c.tie_weights:
            self.decoder.weight = self.encoder.weight
        self.init_weights()

    def init_weights(self) -> None:
        """word_language_model's initialisation."""
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not self.config.tie_weights:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, input: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        if self.proj is not None:
            output = self.proj(output)
        decoded = self.decoder(output).view(-1, self.config.vocab_size)
        return (F.log_softmax(decoded, dim=1) if self.config.log_softmax else decoded), hidden

    def begin_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(self.config.num_layers, batch_size, self.config.hidden_size)


def embedding_config_from_state_dict(sd: dict[str, Any], log_softmax: bool = True) -> EmbeddingConfig:
    """Sizes of a word_language_model-layout state_dict (and our own, which may add proj.*), or
    NotSupported / ValueError saying what does not fit."""
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("not a state_dict of tensors")
    kind = recurrent_kind(sd)
    if kind and kind != "GRU":
        raise only_gru(kind, "this state_dict's rnn")
    layers = sorted({int(m.group(2)) for k in sd if (m := _GRU_KEY.search(k)) and k.startswith("rnn.")})
    if not layers or "decoder.weight" not in sd:
        raise ValueError(
            "not a word_language_model state_dict: it needs encoder.weight, rnn.*_l0 and decoder.*"
        )
    vocab, emb = sd["encoder.weight"].shape
    hidden = sd["rnn.weight_hh_l0"].shape[1]
    tied = sd["decoder.weight"].shape == sd["encoder.weight"].shape and (
        sd["decoder.weight"].data_ptr() == sd["encoder.weight"].data_ptr()
        or torch.equal(sd["decoder.weight"], sd["encoder.weight"])
    )
    config = EmbeddingConfig(
        vocab_size=vocab,
        embedding_size=emb,
        hidden_size=hidden,
        num_layers=len(layers),
        tie_weights=tied,
        log_softmax=log_softmax,
    )
    if "proj.weight" in sd and not (tied and emb != hidden):
        raise ValueError("proj.weight is only for a tied model whose embedding and hidden sizes differ")
    expected = EmbeddingGRULM(config).state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "not a word_language_model state_dict: "
            + (f"missing {', '.join(missing)}" if missing else f"unexpected keys {unexpected}")
        )
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)} for vocab {vocab}, "
                f"embedding {emb}, hidden {hidden}, layers {len(layers)}"
            )
    return config


# Any module --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleSpec:
    """What the contract needs to know about a GRU LM module, found by looking at it and
    running it once."""

    vocab_size: int
    num_layers: int
    hidden_size: int
    time_major: bool
    embedding_rows: int | None  # rows of its nn.Embedding, if it has one
    flat_scores: bool  # scores come as [seq * batch, vocab]


def find_gru(module: nn.Module) -> nn.GRU:
    """The module's one nn.GRU; an LSTM or plain RNN (or none, or several) is refused."""
    for sub in module.modules():
        if isinstance(sub, nn.LSTM):
            raise only_gru("LSTM", f"{type(module).__name__} (its {type(sub).__name__})")
        if isinstance(sub, nn.RNN):
            raise only_gru("plain RNN", f"{type(module).__name__} (its nn.RNN)")
    grus = [m for m in module.modules() if isinstance(m, nn.GRU)]
    if len(grus) != 1:
        raise NotSupported(
            f"{type(module).__name__} has {len(grus)} nn.GRU modules; the contract's state "
            "[batch, layers, hidden] is that of exactly one (multi-layer) nn.GRU"
        )
    gru = grus[0]
    if gru.bidirectional:
        raise NotSupported("a bidirectional GRU cannot run one token at a time: not a language model")
    return gru


def _call(module: nn.Module, ids: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = module(ids, h0)
    pair = isinstance(out, tuple | list) and len(out) == 2
    if not (pair and all(isinstance(t, torch.Tensor) for t in out)):
        raise NotSupported(
            f"{type(module).__name__}.forward(ids, state) must return (scores, state) tensors, "
            f"got {type(out).__name__}"
        )
    return out[0], out[1]


def inspect_module(module: nn.Module, time_major: bool | None = None) -> ModuleSpec:
    """Sizes and layout of a GRU LM whose forward takes (ids, state [layers, batch, hidden]) and
    returns (scores, new state); time_major None: the nn.GRU's batch_first decides."""
    gru = find_gru(module)
    if time_major is None:
        time_major = not gru.batch_first
    embs = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    seq, batch = 5, 3
    layers, hidden = gru.num_layers, gru.hidden_size
    vocab = embs[0].num_embeddings if len(embs) == 1 else None
    ids = torch.zeros((seq, batch) if time_major else (batch, seq), dtype=torch.long)
    if vocab:
        ids = torch.randint(0, vocab, ids.shape, generator=torch.Generator().manual_seed(0))
    module.eval()
    with torch.no_grad():
        try:
            scores, h = _call(module, ids, torch.zeros(layers, batch, hidden))
        except NotSupported:
            raise
        except Exception as e:
            layout = "[seq, batch]" if time_major else "[batch, seq]"
            raise NotSupported(
                f"{type(module).__name__}.forward(ids {layout}, state [layers, batch, hidden]) "
                f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from e
    if tuple(h.shape) != (layers, batch, hidden):
        raise NotSupported(
            f"{type(module).__name__} returned a state of shape {tuple(h.shape)}, expected "
            f"[layers, batch, hidden] = {(layers, batch, hidden)}"
        )
    want = (seq, batch) if time_major else (batch, seq)
    if scores.dim() == 3 and tuple(scores.shape[:2]) == want:
        flat = False
    elif scores.dim() == 2 and scores.shape[0] == seq * batch:
        flat = True
    else:
        layout = "[seq, batch, V]" if time_major else "[batch, seq, V]"
        raise NotSupported(
            f"{type(module).__name__} returned scores of shape {tuple(scores.shape)} for {seq} steps "
            f"at batch {batch}; expected {layout} or [seq * batch, V]"
        )
    return ModuleSpec(scores.shape[-1], layers, hidden, time_major, vocab, flat)


class ContractAdapter(nn.Module):
    """The contract computed by a module's own forward: ids [batch, seq] and state
    [batch, layers, hidden] in, logits [batch, seq, vocab] and state_out out."""

    def __init__(self, module: nn.Module, spec: ModuleSpec) -> None:
        super().__init__()
        self.module, self.spec = module, spec

    def forward(self, input_ids: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tm = self.spec.time_major
        ids = input_ids.transpose(0, 1) if tm else input_ids
        scores, h = _call(self.module, ids, state.transpose(0, 1).contiguous())
        if self.spec.flat_scores:
            scores = scores.reshape(ids.shape[0], ids.shape[1], scores.shape[-1])
        if tm:
            scores = scores.transpose(0, 1)
        return scores, h.transpose(0, 1)


class EmbeddingStateful(nn.Module):
    """The exported form of an embedding -> GRU -> linear head model (EMBEDDING_GRAPH)."""

    def __init__(
        self,
        embedding: torch.Tensor,
        gru: nn.GRU,
        head_w: torch.Tensor,
        head_b: torch.Tensor,
        log_softmax: bool,
    ) -> None:
        super().__init__()
        self.embedding = nn.Parameter(embedding.detach().clone().float(), requires_grad=False)
        self.rnn = nn.GRU(gru.input_size, gru.hidden_size, gru.num_layers, bias=gru.bias)
        self.rnn.load_state_dict(gru.state_dict())
        self.head_weight = nn.Parameter(head_w.detach().clone().float(), requires_grad=False)
        self.head_bias = nn.Parameter(head_b.detach().clone().float(), requires_grad=False)
        self.log_softmax = log_softmax
        self.eval()

    def forward(self, input_ids: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.embedding(input_ids.transpose(0, 1), self.embedding)
        y, h = self.rnn(x, state.transpose(0, 1).contiguous())
        logits = F.linear(y, self.head_weight, self.head_bias)
        if self.log_softmax:
            logits = F.log_softmax(logits, dim=-1)
        return logits.transpose(0, 1), h.transpose(0, 1)


def _head(linears: list[nn.Linear], hidden: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The head as one [vocab, hidden] weight and [vocab] bias: one Linear(hidden, vocab), or a
    projection Linear(hidden, e) then a decoder Linear(e, vocab) (folded: no nonlinearity
    between them is assumed, and the caller checks it numerically)."""

    def bias(lin: nn.Linear) -> torch.Tensor:
        return lin.bias.detach().double() if lin.bias is not None else torch.zeros(lin.out_features).double()

    if len(linears) == 1:
        (lin,) = linears
        if (lin.in_features, lin.out_features) == (hidden, vocab):
            return lin.weight.detach(), bias(lin).float()
        return None
    if len(linears) == 2:
        a, b = linears
        if b.in_features == hidden and a.out_features == vocab:
            a, b = b, a
        if a.in_features == hidden and b.out_features == vocab and a.out_features == b.in_features:
            w = b.weight.detach().double() @ a.weight.detach().double()
            return w.float(), (b.weight.detach().double() @ bias(a) + bias(b)).float()
    return None


def canonical_module(module: nn.Module, spec: ModuleSpec, atol: float = 1e-5) -> EmbeddingStateful | None:
    """EmbeddingStateful equal to the module (checked on random ids), or None when the module
    is not an embedding -> GRU -> linear head (or computes something else)."""
    if isinstance(module, EmbeddingGRULM):
        linears = [m for m in (module.proj, module.decoder) if m is not None]
        head = _head(linears, spec.hidden_size, spec.vocab_size)
        assert head is not None
        return EmbeddingStateful(module.encoder.weight, module.rnn, *head, module.config.log_softmax)
    subs = [m for m in module.modules() if m is not module and not list(m.children())]
    embs = [m for m in subs if isinstance(m, nn.Embedding)]
    linears = [m for m in subs if isinstance(m, nn.Linear)]
    gru = find_gru(module)
    others = [m for m in subs if not isinstance(m, nn.Embedding | nn.Linear | nn.GRU | nn.Dropout)]
    own_params = [n for n, _ in module.named_parameters(recurse=False)]
    if len(embs) != 1 or others or own_params or embs[0].max_norm is not None:
        return None
    head = _head(linears, spec.hidden_size, spec.vocab_size)
    if head is None or embs[0].num_embeddings != spec.vocab_size:
        return None
    ref = ContractAdapter(module, spec).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab_size, (3, 7), generator=gen)
    state = torch.randn(3, spec.num_layers, spec.hidden_size, generator=gen) * 0.5
    with torch.no_grad():
        want, want_h = ref(ids, state)
        for log_softmax in (False, True):
            cand = EmbeddingStateful(embs[0].weight, gru, *head, log_softmax)
            got, got_h = cand(ids, state)
            same = torch.allclose(got, want, atol=atol, rtol=0)
            if same and torch.allclose(got_h, want_h, atol=atol, rtol=0):
                return cand
    return None


# The exported graph ------------------------------------------------------------------------


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for init in graph.initializer:
        if init.name == old:
            init.name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


# What EmbeddingStateful exports to: the pattern's ops and the moves of data around them.
_PATTERN_OPS = {
    "Transpose",
    "Gather",
    "GRU",
    "Slice",
    "Squeeze",
    "Unsqueeze",
    "Concat",
    "MatMul",
    "Gemm",
    "Add",
}
_PATTERN_OPS |= {"LogSoftmax"}


def name_graph(model: onnx.ModelProto) -> str | None:
    """Give an exported embedding graph's weights the names of EMBEDDING_GRAPH; returns the
    pattern found ("Gather -> GRU x2 -> MatMul + Add -> LogSoftmax"), or None when the graph
    is not that pattern (then nothing is renamed)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    ops = [n.op_type for n in g.node if n.op_type not in ("Constant",)]
    gathers = [n for n in g.node if n.op_type == "Gather" and n.input[0] in inits]
    grus = [n for n in g.node if n.op_type == "GRU"]
    matmuls = [n for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    if len(gathers) != 1 or not grus or len(matmuls) != 1 or not set(ops) <= _PATTERN_OPS:
        return None
    mm = matmuls[0]
    adds = [n for n in g.node if n.op_type == "Add" and mm.output[0] in n.input]
    bias = [x for n in adds for x in n.input if x in inits and len(inits[x].dims) == 1]
    if len(bias) != 1 or any(not all(x in inits for x in n.input[1:4] if x) for n in grus):
        return None
    renames = {gathers[0].input[0]: EMBEDDING, mm.input[1]: HEAD_W, bias[0]: HEAD_B}
    for k, node in enumerate(grus):
        for name, pattern in zip(node.input[1:4], (GRU_W, GRU_R, GRU_B), strict=False):
            if name:
                renames[name] = pattern.format(k)
    if len(set(renames)) != len(renames) or len(set(renames.values())) != len(renames):
        return None  # a weight shared between roles: leave the names alone
    for old, new in renames.items():
        _rename(g, old, new)
    for k, node in enumerate(grus):
        node.name = f"gru_l{k}"
    pattern = f"Gather -> GRU x{len(grus)} -> {mm.op_type} + Add"
    return pattern + (" -> LogSoftmax" if "LogSoftmax" in ops else "")
