"""The decode step (seq = 1) derived from a model's weights, and the graph builder it shares
with the fused graph."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gru_serve.contract import INPUT_IDS, LOGITS, STATE, STATE_OUT
from gru_serve.graphs.weights import GRUWeights, gru_weights

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
