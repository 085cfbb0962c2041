"""The weights of an exported GRU language model, read out of its graph (or why it is not one)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gru_serve.contract import INPUT_IDS, LOGITS, STATE, STATE_OUT


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
