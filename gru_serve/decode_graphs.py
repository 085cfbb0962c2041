"""Graphs derived from an exported GRU language model's own weights, for the decode path.

- the decode step (seq = 1): the input projection as a Gather of a precomputed
  [vocab, 3 x hidden] table instead of a one-hot MatMul, and a hand-written GRU cell (Gemm and
  elementwise ops) instead of the GRU operator; 10-40% faster than the exported graph here.
- the fused K-token graph: an ONNX Loop that runs the decode step, samples the next token
  (greedy, or temperature / top-k / top-p with the uniforms passed in, exactly as
  gru_serve.sampling does in numpy) and feeds it back, K times in one session.run.

gru_serve.runtime builds sessions from them and checks them against the exported graph.
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
    head (weight [H, V], bias [V])."""

    layers: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]
    head_w: np.ndarray
    head_b: np.ndarray

    @property
    def hidden(self) -> int:
        return self.layers[0][1].shape[1]

    @property
    def vocab(self) -> int:
        return self.head_w.shape[1]


class NotAGRULanguageModel(ValueError):
    pass


def gru_weights(model: onnx.ModelProto) -> GRUWeights:
    """The weights of an exported GRU LM (one-hot -> GRU layers -> linear head), or
    NotAGRULanguageModel saying what does not fit."""
    g = model.graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for node in g.node:  # Constant nodes, and Casts of constants (weights stored as float16)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            init[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Cast" and node.input[0] in init:
            to = helper.get_attribute_value(node.attribute[0])
            init[node.output[0]] = init[node.input[0]].astype(helper.tensor_dtype_to_np_dtype(to))
    if not any(n.op_type == "OneHot" for n in g.node):
        raise NotAGRULanguageModel("no OneHot input projection")
    layers = []
    for node in g.node:
        if node.op_type != "GRU":
            continue
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
        layers.append((w, r, b[: 3 * h], b[3 * h :]))
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


class _Graph:
    """A tiny graph builder: each op returns its output name; small constants are made once."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
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
            self._consts[name] = self.prefix + name
            self.inits.append(numpy_helper.from_array(np.asarray(value), self.prefix + name))
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
    return g.op("Gemm", x, g.const("head_w", w.head_w), g.const("head_b", w.head_b)), new


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
    return model


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
    """gru_serve.sampling.sample in ONNX, op for op in float64: temperature, top-k, softmax,
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
        b = _Graph(prefix)
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
        b = _Graph(prefix)
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
        b = _Graph("sample_")
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
