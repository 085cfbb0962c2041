"""Graphs derived from an exported GRU language model's own weights, for the decode path.

- the decode step (seq = 1): the input projection as a Gather of a precomputed
  [vocab, 3 x hidden] table instead of a one-hot MatMul (or, for an embedding model, an
  embedding Gather and the GRU's input MatMul), and a hand-written GRU cell (Gemm and
  elementwise ops) instead of the GRU operator; 10-40% faster than the exported graph here.
- the fused K-token graph: an ONNX Loop that runs the decode step, samples the next token
  (greedy, or temperature / top-k / top-p with the uniforms passed in, exactly as
  gru_serve.engine.sampling does in numpy) and feeds it back, K times in one session.run.

gru_serve.engine.runtime builds sessions from them and checks them against the exported graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gru_serve.contract import INPUT_IDS, LOGITS, STATE, STATE_OUT

# The fused graph's tensors (gru_serve side only: the exported contract stays as it is).
FUSED_INPUTS = ("tokens", STATE, "temperature", "top_k", "top_p", "uniforms")
FUSED_OUTPUTS = ("sampled", "step_logits", "step_states")


@dataclass(frozen=True)
class GRUWeights:
    """Per layer (W [3H, in], R [3H, H], Wb [3H], Rb [3H]) in ONNX gate order z, r, h, and the
    head (weight [H, V], bias [V]), followed by a LogSoftmax over the vocabulary when
    `log_softmax`. Layer 0's W is the input projection of each token id, [3H, V]: a one-hot
    model's own GRU weight; for an embedding model (a table E [V, E] gathered into a GRU with
    W0 [3H, E]) the product (E @ W0^T)^T, computed once in float32."""

    layers: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]
    head_w: np.ndarray
    head_b: np.ndarray
    log_softmax: bool = False
    input_kind: str = "one_hot"  # or "embedding" (gru_serve.contract.INPUT_KINDS)

    @property
    def hidden(self) -> int:
        return self.layers[0][1].shape[1]

    @property
    def vocab(self) -> int:
        return self.head_w.shape[1]


class NotAGRULanguageModel(ValueError):
    pass


def gru_weights(model: onnx.ModelProto) -> GRUWeights:
    """The weights of an exported GRU LM, or NotAGRULanguageModel saying what does not fit:
    one-hot -> GRU layers -> linear head (d2l's graphs, which have a OneHot node), or an
    embedding Gather -> GRU layers -> linear head [-> LogSoftmax] (the graph decides, not
    the metadata; `_embedding_weights` says exactly which graphs are taken)."""
    g = model.graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for node in g.node:  # Constant nodes, and Casts of constants (weights stored as float16)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            init[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Cast" and node.input[0] in init:
            to = helper.get_attribute_value(node.attribute[0])
            init[node.output[0]] = init[node.input[0]].astype(helper.tensor_dtype_to_np_dtype(to))
    if not any(n.op_type == "OneHot" for n in g.node):
        return _embedding_weights(model, init)
    layers = [_gru_layer(node, init) for node in g.node if node.op_type == "GRU"]
    if not layers:
        raise NotAGRULanguageModel("no GRU node")
    h = layers[0][1].shape[1]
    vocab = layers[0][0].shape[1]
    matmuls = [n for n in g.node if n.op_type == "MatMul" and n.input[1] in init]
    adds = [n for n in g.node if n.op_type == "Add"]
    if len(matmuls) != 1:
        raise NotAGRULanguageModel("no single MatMul head")
    head_w = init[matmuls[0].input[1]]
    bias = [
        init[x]
        for n in adds
        if matmuls[0].output[0] in n.input
        for x in n.input
        if x in init and init[x].shape == (vocab,)
    ]
    if head_w.shape != (h, vocab) or len(bias) != 1:
        raise NotAGRULanguageModel(f"head is not a [{h}, {vocab}] MatMul followed by a bias Add")
    return GRUWeights(tuple(layers), head_w.astype(np.float32), bias[0].astype(np.float32))


def _gru_layer(
    node: onnx.NodeProto, init: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(W, R, Wb, Rb) of a forward, linear_before_reset=1 GRU node with constant weights."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("linear_before_reset", 0) != 1 or attrs.get("direction", b"forward") != b"forward":
        raise NotAGRULanguageModel(f"GRU node {node.name!r} is not a forward, linear_before_reset=1 GRU")
    if "activations" in attrs or "clip" in attrs or attrs.get("layout", 0) != 0:
        raise NotAGRULanguageModel(f"GRU node {node.name!r} has non-default activations, clip or layout")
    if len(node.input) > 4 and node.input[4]:
        raise NotAGRULanguageModel(f"GRU node {node.name!r} has sequence_lens")
    try:
        w, r = init[node.input[1]][0], init[node.input[2]][0]
    except KeyError as e:
        raise NotAGRULanguageModel(f"GRU node {node.name!r} weights are not constants") from e
    h = r.shape[1]
    b = init[node.input[3]][0] if len(node.input) > 3 and node.input[3] else np.zeros(6 * h, np.float32)
    return w, r, b[: 3 * h], b[3 * h :]


# Embedding models ---------------------------------------------------------------------------
#
# The graph taken (what torch.onnx.export makes of Embedding -> GRU -> Linear [-> log_softmax],
# batch-first or time-major, with or without constant folding; exporters.embedding's
# EMBEDDING_GRAPH is one of them), traced back from the two outputs:
#   logits <- [layout] <- [LogSoftmax over the last axis <- [layout]]
#          <- [Add(constant bias [V])] <- MatMul(x, constant [H, V])
#                                       | Gemm(x, constant [V, H] with transB=1 or [H, V],
#                                              [constant bias C], alpha = beta = 1, transA=0)
#   x <- [layout] <- Y of GRU layer L-1; its X <- [layout] <- Y of layer L-2 ... layer 0's X
#     <- [layout] <- Gather(constant table [V, E], axis 0) whose indices <- [layout] <- input_ids
#   each layer's initial_h <- [layout, Slice, Split, Gather] <- state
#   state_out <- [layout] <- the layers' Y_h, concatenated (Concat) in layer order
# "layout" is Identity, Transpose, Squeeze, Unsqueeze, Reshape, Flatten and Casts to float32
# or integers: ops that move values without computing new ones. Which way they arrange the
# values is not traced: the runtime's load check compares the derived graphs' numbers with the
# exported graph's. Constants include what Constant nodes, Casts and the ops of _FOLDABLE
# compute from constants alone (a tied head's Transpose of the embedding, the gate re-ordering
# Slices and Concats of an export without constant folding). Anything else on these paths (a
# LayerNorm before the head, a Softmax, an activation, a GRU whose state the graph ignores) is
# NotAGRULanguageModel, naming the node.

_LAYOUT_OPS = frozenset({"Identity", "Transpose", "Squeeze", "Unsqueeze", "Reshape", "Flatten"})
_SELECT_OPS = _LAYOUT_OPS | {"Slice", "Split", "Gather"}
_FOLDABLE = _SELECT_OPS | {"Cast", "Concat"}
_LAYOUT_CASTS = frozenset({TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32})


def _fold_constants(model: onnx.ModelProto, init: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`init` with the outputs of the _FOLDABLE nodes whose inputs are all constants, evaluated
    with onnx's reference implementation."""
    from onnx.reference import ReferenceEvaluator

    opsets = {o.domain or "": o.version for o in model.opset_import}
    init = dict(init)
    for node in model.graph.node:
        ins = [x for x in node.input if x]
        if node.op_type not in _FOLDABLE or node.domain or not ins or not all(x in init for x in ins):
            continue
        if all(o in init for o in node.output if o):
            continue
        outs = ReferenceEvaluator(node, opsets=opsets).run(None, {x: init[x] for x in ins})
        init.update((o, np.asarray(v)) for o, v in zip(node.output, outs, strict=False) if o)
    return init


def _rank(model: onnx.ModelProto, name: str) -> int | None:
    """The rank onnx's shape inference gives a tensor, or None. Inferred on the graph with its
    initializers as typed inputs (no weights copied: a model over 2 GB cannot be serialised)."""
    g = model.graph
    given = {v.name for v in g.input}
    inputs = [*g.input] + [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in g.initializer
        if t.name not in given
    ]
    light = helper.make_model(
        helper.make_graph(list(g.node), "shapes", inputs, list(g.output)),
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
    )
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:
        return None
    for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return None


def _embedding_weights(model: onnx.ModelProto, init: dict[str, np.ndarray]) -> GRUWeights:
    """The weights of the embedding graphs described above, or NotAGRULanguageModel."""
    g = model.graph
    init = _fold_constants(model, init)
    producer = {o: n for n in g.node for o in n.output if o}

    def back(name: str, ops: frozenset[str] = _LAYOUT_OPS) -> tuple[str, onnx.NodeProto | None]:
        """The first tensor up from `name` that `ops` (and layout Casts) do not make, and the
        node that makes it (None: a graph input or a constant)."""
        node = producer.get(name)
        while name not in init and node is not None:
            cast = node.op_type == "Cast" and attrs(node).get("to") in _LAYOUT_CASTS
            if node.op_type not in ops and not cast:
                break
            name = node.input[0]
            node = producer.get(name)
        return name, None if name in init else node

    def what(name: str, node: onnx.NodeProto | None) -> str:
        if node is not None:
            return f"{node.op_type} node {node.name or name!r}"
        return "a constant" if name in init else f"graph input {name!r}"

    def attrs(node: onnx.NodeProto) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    # logits <- [LogSoftmax] <- [bias Add] <- MatMul | Gemm
    name, node = back(LOGITS)
    log_softmax = node is not None and node.op_type == "LogSoftmax"
    if log_softmax:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        axis = attrs(node).get("axis", -1 if opset >= 13 else 1)
        if axis != -1 and axis != (rank := _rank(model, node.input[0]) or 0) - 1:
            raise NotAGRULanguageModel(
                f"LogSoftmax node {node.name!r} is over axis {axis} of a rank-{rank or '?'} tensor, "
                "not over the vocabulary (the last axis)"
            )
        name, node = back(node.input[0])
    bias = None
    if node is not None and node.op_type == "Add":
        consts = [x for x in node.input if x in init]
        if len(consts) != 1:
            raise NotAGRULanguageModel(
                f"Add node {node.name!r} before the logits does not add a constant bias"
            )
        bias = init[consts[0]]
        name = next(x for x in node.input if x not in init)
        node = producer.get(name)
    if node is None or node.op_type not in ("MatMul", "Gemm"):
        raise NotAGRULanguageModel(
            "the logits are not a linear head's (MatMul or Gemm with a constant weight, [a bias Add], "
            f"[LogSoftmax]): they come from {what(name, node)}"
        )
    head = node
    if head.input[1] not in init:
        raise NotAGRULanguageModel(f"the head's weight ({head.op_type} node {head.name!r}) is not a constant")
    head_w = init[head.input[1]]
    if head.op_type == "Gemm":
        a = attrs(head)
        if (
            a.get("alpha", 1.0) != 1.0
            or a.get("transA", 0)
            or (len(head.input) > 2 and a.get("beta", 1.0) != 1.0)
        ):
            raise NotAGRULanguageModel(f"Gemm head {head.name!r} has alpha, beta or transA set")
        if a.get("transB", 0):
            head_w = head_w.T
        if len(head.input) > 2 and head.input[2]:
            if head.input[2] not in init or bias is not None:
                raise NotAGRULanguageModel(
                    f"Gemm head {head.name!r} has a bias C that is not one constant bias"
                )
            bias = init[head.input[2]]

    # the GRU layers, from the head back to the first
    name, node = back(head.input[0])
    chain: list[onnx.NodeProto] = []
    while node is not None and node.op_type == "GRU" and name == node.output[0]:
        chain.insert(0, node)
        name, node = back(node.input[0])
    if not chain:
        raise NotAGRULanguageModel(
            f"the head's input comes from {what(name, node)}, not a GRU layer's output sequence Y"
        )
    gather = node
    if gather is None or gather.op_type != "Gather" or gather.input[0] not in init:
        raise NotAGRULanguageModel(
            "no OneHot or embedding input projection: the first GRU layer's input comes from "
            f"{what(name, node)}, not a Gather from a constant table"
        )
    table = init[gather.input[0]]
    if table.ndim != 2 or attrs(gather).get("axis", 0) not in (0, -2):
        raise NotAGRULanguageModel(f"Gather node {gather.name!r} does not look up rows of a 2-D table")
    src, src_node = back(gather.input[1])
    if src != INPUT_IDS:
        raise NotAGRULanguageModel(f"the embedding's indices come from {what(src, src_node)}, not input_ids")

    # the state: each layer's initial_h is part of it; state_out is the layers' Y_h
    for node in chain:
        if len(node.input) < 6 or not node.input[5]:
            raise NotAGRULanguageModel(
                f"GRU node {node.name!r} has no initial_h: the graph ignores its state"
            )
        src, src_node = back(node.input[5], _SELECT_OPS)
        if src != STATE:
            raise NotAGRULanguageModel(
                f"GRU node {node.name!r}: its initial_h comes from {what(src, src_node)}, not the state input"
            )

    def finals(name: str) -> list[str]:
        name, node = back(name)
        if node is not None and node.op_type == "Concat":
            return [x for i in node.input for x in finals(i)]
        return [name]

    if finals(STATE_OUT) != [n.output[1] if len(n.output) > 1 else "" for n in chain]:
        raise NotAGRULanguageModel(
            "state_out is not the GRU layers' final states Y_h, concatenated in layer order"
        )

    layers = [_gru_layer(node, init) for node in chain]
    w0, r0, wb0, rb0 = layers[0]
    vocab, hidden = table.shape[0], layers[-1][1].shape[1]
    if table.shape[1] != w0.shape[1]:
        raise NotAGRULanguageModel(
            f"the embedding table is {list(table.shape)} but the first GRU layer takes {w0.shape[1]} inputs"
        )
    if head_w.ndim != 2 or head_w.shape != (hidden, vocab):
        raise NotAGRULanguageModel(
            f"the head's weight is {list(head_w.shape)}; expected [{hidden}, {vocab}] "
            f"(hidden, the embedding's {vocab} rows)"
        )
    if bias is None:
        bias = np.zeros(vocab, np.float32)
    if bias.size not in (1, vocab) or (bias.ndim and bias.shape[-1] not in (1, vocab)):
        raise NotAGRULanguageModel(f"the head's bias is {list(bias.shape)}, not [{vocab}]")
    # Layer 0's input projection of every token id: [V, E] @ [E, 3H], as [3H, V] like a one-hot W.
    projection = table.astype(np.float32) @ w0.astype(np.float32).T
    layers[0] = (projection.T, r0, wb0, rb0)
    return GRUWeights(
        tuple(layers),
        head_w.astype(np.float32),
        np.broadcast_to(bias.reshape(-1), (vocab,)).astype(np.float32),
        log_softmax=log_softmax,
        input_kind="embedding",
    )


_DEFERRED_BYTES = 1 << 16


class _Graph:
    """A tiny graph builder: each op returns its output name; small constants are made once.

    Large weights are left out of the initializers until the model is finished (_model): the
    nested graphs (Loop bodies in If branches) are copied as they are assembled, and with a
    word vocabulary's [V, 3H] tables each copy would be hundreds of MB. `parent`: the graph
    this one is nested in (they share those weights)."""

    def __init__(self, prefix: str = "", parent: _Graph | None = None) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.weights: dict[str, np.ndarray] = parent.weights if parent else {}
        self._consts: dict[str, str] = {}
        self._n = 0

    def _name(self, op: str) -> str:
        self._n += 1
        return f"{self.prefix}{op.lower()}_{self._n}"

    def op(self, op: str, *inputs: str, outputs: int = 1, names: list[str] | None = None, **attrs):
        outs = names or [self._name(op) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, name: str, value) -> str:
        """An initializer of this graph, made on first use."""
        if name not in self._consts:
            full = self._consts[name] = self.prefix + name
            value = np.asarray(value)
            if value.dtype == np.float32 and value.nbytes >= _DEFERRED_BYTES:
                # numpy_helper.from_array's tensor, but for its bytes, which _fill_weights writes
                self.inits.append(onnx.TensorProto(name=full, dims=value.shape, data_type=TensorProto.FLOAT))
                self.weights[full] = value
            else:
                self.inits.append(numpy_helper.from_array(value, full))
        return self._consts[name]

    def graph(self, name: str, inputs, outputs) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, self.prefix + name, inputs, outputs, self.inits)


def _cell(g: _Graph, w: GRUWeights, tok: str, hs: list[str]) -> tuple[str, list[str]]:
    """One decode step: token ids [B] and per-layer states [B, H] -> logits [B, V], new states.

    ONNX GRU with linear_before_reset=1: z, r = sigmoid(x W^T + Wb + h R^T + Rb),
    n = tanh(x Wn^T + Wbn + r * (h Rn^T + Rbn)), h' = (1 - z) n + z h  (= n + z (h - n)).
    The weights are split into the z, r gates and the candidate n, so no [B, 3H] tensor needs
    splitting; layer 0's input projection (one-hot @ W^T + Wb) is a row of a [V, 3H] table
    (with the z, r recurrent biases folded in) gathered as Gemm's C input. 13 nodes a step.
    The weights are initializers of `g` itself: onnxruntime prepacks a graph's own constant
    weights but not those a Loop body reads from its outer graph, and the packed and unpacked
    GEMMs round differently; so the decode graph and the fused loop run the same kernels."""
    f32 = np.float32
    x = None
    new = []
    for i, (wi, ri, wb, rb) in enumerate(w.layers):
        h = ri.shape[1]
        rt_zr = g.const(f"l{i}_RT_zr", np.ascontiguousarray(ri[: 2 * h].T, f32))
        rt_n = g.const(f"l{i}_RT_n", np.ascontiguousarray(ri[2 * h :].T, f32))
        rb_n = g.const(f"l{i}_RB_n", rb[2 * h :].astype(f32))
        if i == 0:
            table = wi.T + wb[None, :]
            table[:, : 2 * h] += rb[None, : 2 * h]
            xi_zr = g.op(
                "Gather", g.const("l0_T_zr", np.ascontiguousarray(table[:, : 2 * h], f32)), tok, axis=0
            )
            xi_n = g.op(
                "Gather", g.const("l0_T_n", np.ascontiguousarray(table[:, 2 * h :], f32)), tok, axis=0
            )
        else:
            wt_zr = g.const(f"l{i}_WT_zr", np.ascontiguousarray(wi[: 2 * h].T, f32))
            wt_n = g.const(f"l{i}_WT_n", np.ascontiguousarray(wi[2 * h :].T, f32))
            xi_zr = g.op("Gemm", x, wt_zr, g.const(f"l{i}_B_zr", (wb[: 2 * h] + rb[: 2 * h]).astype(f32)))
            xi_n = g.op("Gemm", x, wt_n, g.const(f"l{i}_WB_n", wb[2 * h :].astype(f32)))
        zr = g.op("Sigmoid", g.op("Gemm", hs[i], rt_zr, xi_zr))
        z, r = g.op("Split", zr, g.const("split_h_h", np.array([h, h], np.int64)), axis=1, outputs=2)
        n = g.op("Tanh", g.op("Add", xi_n, g.op("Mul", r, g.op("Gemm", hs[i], rt_n, rb_n))))
        h = g.op("Add", n, g.op("Mul", z, g.op("Sub", hs[i], n)))
        new.append(h)
        x = h
    logits = g.op("Gemm", x, g.const("head_w", w.head_w), g.const("head_b", w.head_b))
    if w.log_softmax:  # the exported graph's logits are log-probabilities
        logits = g.op("LogSoftmax", logits, axis=1)
    return logits, new


def _axis1(g: _Graph) -> str:
    return g.const("axes_1", np.array([1], np.int64))


def _split_state(g: _Graph, state: str, layers: int) -> list[str]:
    """[B, L, H] -> L tensors [B, H]."""
    if layers == 1:
        return [g.op("Squeeze", state, _axis1(g))]
    parts = g.op("Split", state, g.const("ones_l", np.ones(layers, np.int64)), axis=1, outputs=layers)
    return [g.op("Squeeze", p, _axis1(g)) for p in parts]


def _join_state(g: _Graph, hs: list[str], name: str | None = None) -> str:
    """L tensors [B, H] -> [B, L, H]."""
    names = [name] if name and len(hs) == 1 else None
    parts = [g.op("Unsqueeze", h, _axis1(g), names=names) for h in hs]
    return parts[0] if len(parts) == 1 else g.op("Concat", *parts, axis=1, names=[name] if name else None)


def _model(g: _Graph, inputs, outputs, name: str, base: onnx.ModelProto) -> onnx.ModelProto:
    model = helper.make_model(
        g.graph(name, inputs, outputs),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=base.ir_version,
    )
    model.producer_name = "gru-serve"
    _fill_weights(model.graph, g.weights)
    return model


def _fill_weights(graph: onnx.GraphProto, weights: dict[str, np.ndarray]) -> None:
    """Write the deferred weights' bytes into the finished model's initializers, in place."""
    for t in graph.initializer:
        if t.name in weights:
            t.raw_data = weights[t.name].tobytes()
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _fill_weights(a.g, weights)


def decode_graph(base: onnx.ModelProto, w: GRUWeights | None = None) -> onnx.ModelProto:
    """The contract's step for seq = 1: input_ids [B, 1], state [B, L, H] -> logits [B, 1, V],
    state_out [B, L, H], with a Gather input projection and a hand-written GRU cell."""
    w = w or gru_weights(base)
    L, H, V = len(w.layers), w.hidden, w.vocab
    g = _Graph()
    tok = g.op("Squeeze", INPUT_IDS, _axis1(g))
    logits, hs = _cell(g, w, tok, _split_state(g, STATE, L))
    g.op("Unsqueeze", logits, _axis1(g), names=[LOGITS])
    _join_state(g, hs, STATE_OUT)
    f = TensorProto.FLOAT
    return _model(
        g,
        [
            helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", 1]),
            helper.make_tensor_value_info(STATE, f, ["batch", L, H]),
        ],
        [
            helper.make_tensor_value_info(LOGITS, f, ["batch", 1, V]),
            helper.make_tensor_value_info(STATE_OUT, f, ["batch", L, H]),
        ],
        "gru_serve_decode",
        base,
    )


def _sampling_rows(g: _Graph, V: int) -> dict[str, str]:
    """Per-row sampling settings from the graph inputs, computed once per run."""
    c = g.const
    t_pos = g.op("Greater", "temperature", c("zero", np.array(0.0)))
    limited = g.op(
        "And",
        g.op("Greater", "top_k", c("zero_i", np.array(0, np.int64))),
        g.op("Less", "top_k", c("vocab_i", np.array(V, np.int64))),
    )
    k_idx = g.op("Where", limited, g.op("Sub", "top_k", c("one_i", np.array(1, np.int64))), c("vmax", V - 1))
    nucleus = g.op("Less", "top_p", c("one", np.array(1.0)))
    filtered = g.op("Cast", g.op("Or", limited, nucleus), to=TensorProto.INT32)
    return {
        "any_filter": g.op("Cast", g.op("ReduceMax", filtered, keepdims=0), to=TensorProto.BOOL),
        "t_pos": t_pos,
        "t_col": g.op("Unsqueeze", g.op("Where", t_pos, "temperature", c("one", np.array(1.0))), _axis1(g)),
        "k_idx": g.op("Unsqueeze", k_idx, _axis1(g)),
        "p_col": g.op("Unsqueeze", "top_p", _axis1(g)),
        "nucleus_col": g.op("Unsqueeze", nucleus, _axis1(g)),
        "zeros": g.op(
            "ConstantOfShape",
            g.op("Concat", g.op("Shape", "top_p"), c("vocab", np.array([V], np.int64)), axis=0),
            value=numpy_helper.from_array(np.array([0.0])),
        ),
        "u_steps": g.op("Transpose", "uniforms", perm=[1, 0]),  # [K, B]
    }


def _sample(g: _Graph, logits: str, u: str, rows: dict[str, str], V: int, filters: bool) -> str:
    """gru_serve.engine.sampling.sample in ONNX, op for op in float64: temperature, top-k, softmax,
    top-p, inverse CDF with the uniform `u` [B]; rows with temperature 0 take the argmax.
    Without `filters` (no row limits top-k or top-p) the top-k and top-p ops, which leave such
    rows unchanged, are left out."""
    c, ax = g.const, _axis1(g)
    vocab = c("vocab", np.array([V], np.int64))
    z = g.op("Div", g.op("Cast", logits, to=TensorProto.DOUBLE), rows["t_col"])
    if filters:
        # top-k: keep logits >= the k-th largest (ties stay in); unlimited rows compare with the minimum
        ranked = g.op("TopK", z, vocab, axis=1, largest=1, sorted=1, outputs=2)[0]
        kth = g.op("GatherElements", ranked, rows["k_idx"], axis=1)
        z = g.op("Where", g.op("GreaterOrEqual", z, kth), z, c("neg_inf", np.array(-np.inf)))
    z = g.op("Sub", z, g.op("ReduceMax", z, axes=[1], keepdims=1))
    e = g.op("Exp", z)
    probs = g.op("Div", e, g.op("ReduceSum", e, ax, keepdims=1))
    if filters:
        probs = _top_p(g, probs, rows, vocab)
    cdf = g.op("CumSum", probs, c("axis_1", np.array(1, np.int64)))
    last = g.op("Slice", cdf, c("minus1", np.array([-1], np.int64)), vocab, ax)
    below = g.op("Less", cdf, g.op("Mul", g.op("Unsqueeze", u, ax), last))
    picked = g.op("ReduceSum", g.op("Cast", below, to=TensorProto.INT64), ax, keepdims=0)
    picked = g.op("Min", picked, c("vmax", np.array(V - 1, np.int64)))
    return g.op("Where", rows["t_pos"], picked, g.op("ArgMax", logits, axis=1, keepdims=0))


def _top_p(g: _Graph, probs: str, rows: dict[str, str], vocab: str) -> str:
    """Keep a token when the mass before it (sorted, ties by index) is below p; renormalise."""
    c, ax = g.const, _axis1(g)
    sp, order = g.op("TopK", probs, vocab, axis=1, largest=1, sorted=1, outputs=2)
    before = g.op("Sub", g.op("CumSum", sp, c("axis_1", np.array(1, np.int64))), sp)
    keep_sorted = g.op("Cast", g.op("Less", before, rows["p_col"]), to=TensorProto.DOUBLE)
    keep = g.op("ScatterElements", rows["zeros"], order, keep_sorted, axis=1)
    kept = g.op("Where", g.op("Greater", keep, c("half", np.array(0.5))), probs, c("zero", np.array(0.0)))
    kept = g.op("Div", kept, g.op("ReduceSum", kept, ax, keepdims=1))
    return g.op("Where", rows["nucleus_col"], kept, probs)


def fused_graph(base: onnx.ModelProto, w: GRUWeights | None = None) -> onnx.ModelProto:
    """K decode steps in one run: feed `tokens` [B], then K times: step, sample the next token
    with uniforms[:, k], feed it. Outputs are time-major: sampled [K, B] (token k is drawn from
    step_logits[k]), step_logits [K, B, V] (the distribution after each fed token), step_states
    [K, B, L, H] (the state after each fed token). K = uniforms.shape[1]. Ifs pick a lean
    greedy loop when every temperature is 0, and a sampler without the top-k and top-p ops when no
    row uses them. (Unrolling 2 or 4 steps per Loop iteration, and the ONNX GRU operator in the
    body, were measured: no faster here.)"""
    w = w or gru_weights(base)
    L, H, V = len(w.layers), w.hidden, w.vocab
    d, i64, f = TensorProto.DOUBLE, TensorProto.INT64, TensorProto.FLOAT
    g = _Graph()
    trips = g.op("Gather", g.op("Shape", "uniforms"), g.const("one_i", np.array(1, np.int64)), axis=0)
    h0 = _split_state(g, STATE, L)

    def loop_body(prefix: str, rows: dict[str, str] | None, filters: bool = False) -> onnx.GraphProto:
        """Carries the token and the states; scans out the logits and, as they come in, the
        fed token and the states, so no value needs copying to be both carried and scanned."""
        b = _Graph(prefix, g)
        tok_in, cond_in, it = prefix + "tok_in", prefix + "cond_in", prefix + "iter"
        hs_in = [f"{prefix}h{i}_in" for i in range(L)]
        logits, hs = _cell(b, w, tok_in, hs_in)
        if rows is None:
            nxt = b.op("ArgMax", logits, axis=1, keepdims=0)
        else:
            nxt = _sample(b, logits, b.op("Gather", rows["u_steps"], it, axis=0), rows, V, filters)
        outs = [cond_in, nxt, *hs, logits, tok_in, *hs_in]
        types = [(TensorProto.BOOL, []), (i64, ["batch"])] + [(f, ["batch", H])] * L
        types += [(f, ["batch", V]), (i64, ["batch"])] + [(f, ["batch", H])] * L
        inputs = [
            helper.make_tensor_value_info(it, i64, []),
            helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
            helper.make_tensor_value_info(tok_in, i64, ["batch"]),
            *[helper.make_tensor_value_info(x, f, ["batch", H]) for x in hs_in],
        ]
        outputs = [helper.make_tensor_value_info(o, t, s) for o, (t, s) in zip(outs, types, strict=True)]
        return b.graph("body", inputs, outputs)

    types = (i64, f, f)

    def loop_branch(prefix: str, rows: dict[str, str] | None, filters: bool = False) -> onnx.GraphProto:
        b = _Graph(prefix, g)
        outs = b.op(
            "Loop",
            trips,
            "",
            "tokens",
            *h0,
            body=loop_body(prefix + "body_", rows, filters),
            outputs=3 + 2 * L,
        )
        last_tok, last_hs = outs[0], outs[1 : 1 + L]
        logits, fed, fed_hs = outs[1 + L], outs[2 + L], outs[3 + L :]
        # What follows fed token k is fed token k + 1, or the loop's last value.
        zero, one = b.const("zero_1d", np.array([0], np.int64)), b.const("one_1d", np.array([1], np.int64))
        end = b.const("end", np.array([np.iinfo(np.int64).max], np.int64))

        def after(scanned: str, last: str) -> str:
            return b.op(
                "Concat", b.op("Slice", scanned, one, end, zero), b.op("Unsqueeze", last, zero), axis=0
            )

        two = b.const("axes_2", np.array([2], np.int64))
        states = [b.op("Unsqueeze", after(s, h), two) for s, h in zip(fed_hs, last_hs, strict=True)]
        state = states[0] if L == 1 else b.op("Concat", *states, axis=2)
        results = [after(fed, last_tok), logits, state]
        outputs = [helper.make_tensor_value_info(o, t, None) for o, t in zip(results, types, strict=True)]
        return b.graph("branch", [], outputs)

    def sampling_branch() -> onnx.GraphProto:
        """A second If: the full sampler when a row limits top-k or top-p, else the lean one."""
        b = _Graph("sample_", g)
        rows = _sampling_rows(b, V)
        outs = b.op(
            "If",
            rows["any_filter"],
            then_branch=loop_branch("filtered_", rows, True),
            else_branch=loop_branch("temperature_", rows, False),
            outputs=3,
        )
        outputs = [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types, strict=True)]
        return b.graph("branch", [], outputs)

    all_greedy = g.op(
        "LessOrEqual", g.op("ReduceMax", "temperature", keepdims=0), g.const("zero", np.array(0.0))
    )
    g.op(
        "If",
        all_greedy,
        then_branch=loop_branch("greedy_", None),
        else_branch=sampling_branch(),
        names=list(FUSED_OUTPUTS),
    )
    return _model(
        g,
        [
            helper.make_tensor_value_info("tokens", i64, ["batch"]),
            helper.make_tensor_value_info(STATE, f, ["batch", L, H]),
            helper.make_tensor_value_info("temperature", d, ["batch"]),
            helper.make_tensor_value_info("top_k", i64, ["batch"]),
            helper.make_tensor_value_info("top_p", d, ["batch"]),
            helper.make_tensor_value_info("uniforms", d, ["batch", "k"]),
        ],
        [
            helper.make_tensor_value_info("sampled", i64, ["k", "batch"]),
            helper.make_tensor_value_info("step_logits", f, ["k", "batch", V]),
            helper.make_tensor_value_info("step_states", f, ["k", "batch", L, H]),
        ],
        "gru_serve_fused",
        base,
    )


def take_graph() -> onnx.ModelProto:
    """rows[i] = x[index[i, 0], index[i, 1]]: single rows of the fused graph's step outputs
    [K, B, ...], read where they are (the device), so only those rows need copying out."""
    f = TensorProto.FLOAT
    node = helper.make_node("GatherND", ["x", "index"], ["rows"])
    graph = helper.make_graph(
        [node],
        "gru_serve_take",
        [
            helper.make_tensor_value_info("x", f, None),
            helper.make_tensor_value_info("index", TensorProto.INT64, ["rows", 2]),
        ],
        [helper.make_tensor_value_info("rows", f, None)],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name="gru-serve"
    )


def rebuild_graph() -> onnx.ModelProto:
    """rows = Concat(x, extra)[order]: a batch's state when its members change, built where
    the state is (the device), with the newcomers' rows (extra) from the host."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Concat", ["x", "extra"], ["both"], axis=0),
        helper.make_node("Gather", ["both", "order"], ["rows"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "gru_serve_rebuild",
        [
            helper.make_tensor_value_info("x", f, None),
            helper.make_tensor_value_info("extra", f, None),
            helper.make_tensor_value_info("order", TensorProto.INT64, ["rows"]),
        ],
        [helper.make_tensor_value_info("rows", f, None)],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name="gru-serve"
    )
