"""The onnxruntime sessions behind a model: providers, threads, the batched step, and the fast
decode path.

Besides the exported graph (which runs prompts of any length), a runtime derives two graphs
from the model's own weights when it recognises them as a GRU language model:

- the decode step (seq = 1): the input projection as a Gather of a precomputed
  [vocab, 3 x hidden] table instead of a one-hot MatMul, and a hand-written GRU cell (Gemm and
  elementwise ops) instead of the GRU operator; 10-40% faster than the exported graph here.
- the fused K-token graph: an ONNX Loop that runs the decode step, samples the next token
  (greedy, or temperature / top-k / top-p with the uniforms passed in, exactly as
  gru_serve.sampling does in numpy) and feeds it back, K times in one session.run.

Both compute the same function as the exported graph (checked at load, within 1e-4); every
decode step (`step` with seq = 1) runs the derived graph, so the step path and the fused path
give identical numbers, whatever the batch.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from gru_serve.contract import INPUT_IDS, LOGITS, STATE, STATE_OUT, ContractError, ModelMetadata, read_model
from gru_serve.errors import ModelLoadError
from gru_serve.vocab import Vocabulary

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

GRAPH_OPTIMIZATION = {
    "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# The fused graph's tensors (gru_serve side only: the exported contract stays as it is).
FUSED_INPUTS = ("tokens", STATE, "temperature", "top_k", "top_p", "uniforms")
FUSED_OUTPUTS = ("sampled", "step_logits", "step_states")


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # auto | cuda | cpu
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: str = "all"  # off | basic | extended | all
    fast_path: bool = True  # derive the decode-step and fused graphs from the weights


def load_metadata(path: Path) -> tuple[ModelMetadata, bytes]:
    """Read and check a model file; any problem is one ModelLoadError line naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"model {path}: {e.strerror or e}") from e
    try:
        model = onnx.load_from_string(raw)
    except Exception as e:
        raise ModelLoadError(f"model {path}: not an ONNX model ({type(e).__name__})") from e
    try:
        return read_model(model), raw
    except ContractError as e:
        raise ModelLoadError(f"model {path}: {e}") from e


# -- the weights of a GRU language model, and the graphs derived from them --


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
    row uses them. (Unrolling 2 or 4 steps per Loop iteration was
    measured: no faster here.)"""
    w = w or gru_weights(base)
    L, H, V = len(w.layers), w.hidden, w.vocab
    d, i64, f = TensorProto.DOUBLE, TensorProto.INT64, TensorProto.FLOAT
    g = _Graph()
    trips = g.op("Gather", g.op("Shape", "uniforms"), g.const("one_i", np.array(1, np.int64)), axis=0)
    h0 = _split_state(g, STATE, L)

    def loop_body(prefix: str, rows: dict[str, str] | None, filters: bool = False) -> onnx.GraphProto:
        b = _Graph(prefix)
        tok_in, cond_in, it = prefix + "tok_in", prefix + "cond_in", prefix + "iter"
        hs_in = [f"{prefix}h{i}_in" for i in range(L)]
        logits, hs = _cell(b, w, tok_in, hs_in)
        if rows is None:
            nxt = b.op("ArgMax", logits, axis=1, keepdims=0)
        else:
            nxt = _sample(b, logits, b.op("Gather", rows["u_steps"], it, axis=0), rows, V, filters)
        # Body outputs must be distinct values: only the token needs a copy (B int64s).
        outs = [b.op("Identity", cond_in), nxt, *hs, b.op("Identity", nxt), logits, _join_state(b, hs)]
        types = [(TensorProto.BOOL, []), (i64, ["batch"])] + [(f, ["batch", H])] * L
        types += [(i64, ["batch"]), (f, ["batch", V]), (f, ["batch", L, H])]
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
            outputs=1 + L + 3,
        )
        outputs = [
            helper.make_tensor_value_info(o, t, None) for o, t in zip(outs[1 + L :], types, strict=True)
        ]
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


# -- the runtime --


class ModelRuntime:
    """One model loaded into onnxruntime. `step` runs the contract on numpy arrays; with the
    fast path, steps of seq = 1 run the derived decode graph and `fused` runs K of them."""

    def __init__(self, path: Path, options: RuntimeOptions = RuntimeOptions(), name: str = "") -> None:
        self.path = Path(path)
        self.options = options
        self.metadata, raw = load_metadata(self.path)
        self.name = name or self.metadata.name
        self.model_hash = hashlib.sha256(raw).hexdigest()
        self.vocab = Vocabulary(self.metadata.vocab, self.metadata.normalization)
        self.session, self.provider = self._create_session(raw, options)
        self.decode_session: ort.InferenceSession | None = None
        self.fused_session: ort.InferenceSession | None = None
        self.fast_path_note = "off (RuntimeOptions.fast_path=False)"
        if options.fast_path:
            self._derive(onnx.load_from_string(raw))

    def _session_options(self, options: RuntimeOptions) -> ort.SessionOptions:
        if options.graph_optimization not in GRAPH_OPTIMIZATION:
            raise ModelLoadError(
                f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATION)}, "
                f"got {options.graph_optimization!r}"
            )
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.graph_optimization_level = GRAPH_OPTIMIZATION[options.graph_optimization]
        return so

    def _providers(self) -> list[str]:
        return [CUDA, CPU] if self.provider == CUDA else [CPU]

    def _create_session(self, raw: bytes, options: RuntimeOptions) -> tuple[ort.InferenceSession, str]:
        if options.device not in ("auto", "cuda", "cpu"):
            raise ModelLoadError(f"device must be auto, cuda or cpu, got {options.device!r}")
        so = self._session_options(options)
        # onnxruntime logs two errors when CUDA libraries are missing; we say it once, below.
        ort.set_default_logger_severity(4)
        want_cuda = options.device != "cpu" and CUDA in ort.get_available_providers()
        providers = [CUDA, CPU] if want_cuda else [CPU]
        try:
            session = ort.InferenceSession(raw, so, providers=providers)
        except Exception as e:
            raise ModelLoadError(
                f"model {self.path}: onnxruntime cannot load it: {str(e).splitlines()[0]}"
            ) from e
        finally:
            ort.set_default_logger_severity(2)
        active = session.get_providers()
        # get_available_providers() lists CUDA whenever the GPU build is installed; only the
        # session knows whether CUDA really initialised.
        if CUDA in active:
            return session, CUDA
        if options.device == "cuda":
            raise ModelLoadError(
                "--device cuda: CUDA is not active in onnxruntime (installed providers: "
                f"{', '.join(ort.get_available_providers())}; session got {', '.join(active)}); "
                "check the GPU, the CUDA 12/13 and cuDNN 9 libraries, or use --device cpu"
            )
        if options.device == "auto":
            why = (
                "onnxruntime could not initialise CUDA (no GPU or CUDA/cuDNN libraries)"
                if want_cuda
                else "this onnxruntime build has no CUDA provider"
            )
            log.warning("running on CPU: %s", why)
        return session, CPU

    def _derive(self, model: onnx.ModelProto) -> None:
        """Build the decode and fused sessions; keep them only if they compute what the
        exported graph computes (logits within 1e-4, states within 1e-5)."""
        try:
            weights = gru_weights(model)
        except NotAGRULanguageModel as e:
            self.fast_path_note = f"off: {e}"
            log.info("model %s: no fast decode path (%s); every step runs the exported graph", self.name, e)
            return
        so = self._session_options(self.options)
        providers = self._providers()
        decode = ort.InferenceSession(
            decode_graph(model, weights).SerializeToString(), so, providers=providers
        )
        fused = ort.InferenceSession(fused_graph(model, weights).SerializeToString(), so, providers=providers)
        problem = self._check_derived(decode, fused)
        if problem == "fused":
            self.decode_session = decode
            self.fast_path_note = (
                "decode step only: the fused graph is not bit-identical to it on this provider"
            )
            log.warning("model %s: %s", self.name, self.fast_path_note)
        elif problem:
            self.fast_path_note = f"off: {problem}"
            log.warning(
                "model %s: fast path %s; every step runs the exported graph", self.name, self.fast_path_note
            )
        else:
            self.decode_session, self.fused_session = decode, fused
            self.fast_path_note = "on: derived decode step (Gather + GRU cell) and fused K-token Loop"

    def _check_derived(self, decode: ort.InferenceSession, fused: ort.InferenceSession) -> str:
        """'' when the decode graph computes the exported graph's function (logits within 1e-4,
        state within 1e-5) and the fused graph is bit-identical to chained decode steps."""
        rng = np.random.default_rng(0)
        batch, length = 3, 5
        ids = rng.integers(0, self.metadata.vocab_size, (batch, length), dtype=np.int64)
        state = (rng.standard_normal((batch, *self.state_shape)) * 0.5).astype(np.float32)
        want_logits, want_state = self.session.run([LOGITS, STATE_OUT], {INPUT_IDS: ids, STATE: state})
        got_state, steps = state, []
        for t in range(length):
            got_logits, got_state = decode.run(
                [LOGITS, STATE_OUT], {INPUT_IDS: ids[:, t : t + 1], STATE: got_state}
            )
            steps.append((got_logits[:, 0], got_state))
            if not np.allclose(got_logits[:, 0], want_logits[:, t], atol=1e-4, rtol=0):
                return "the derived decode graph's logits differ from the model's"
        if not np.allclose(got_state, want_state, atol=1e-5, rtol=0):
            return "the derived decode graph's state differs from the model's"
        # The fused graph, greedy, from the decode path's own tokens: bit-identical or unused.
        z = np.zeros(batch)
        sampled, logits, states = fused.run(
            list(FUSED_OUTPUTS),
            {
                "tokens": ids[:, 0],
                STATE: state,
                "temperature": z,
                "top_k": z.astype(np.int64),
                "top_p": z + 1.0,
                "uniforms": np.zeros((batch, 4)),
            },
        )
        s, ok = state, True
        tok = ids[:, 0]
        for k in range(4):
            lg, s = decode.run([LOGITS, STATE_OUT], {INPUT_IDS: tok[:, None], STATE: s})
            ok &= np.array_equal(lg[:, 0], logits[k]) and np.array_equal(s, states[k])
            tok = lg[:, 0].argmax(axis=1)
            ok &= np.array_equal(tok, sampled[k])
        return "" if ok else "fused"

    @property
    def state_shape(self) -> tuple[int, int]:
        return self.metadata.num_layers, self.metadata.hidden_size

    def zero_state(self, batch: int = 1) -> np.ndarray:
        return np.zeros((batch, *self.state_shape), dtype=np.float32)

    def _session_for(self, ids: np.ndarray) -> ort.InferenceSession:
        return self.decode_session if ids.shape[1] == 1 and self.decode_session is not None else self.session

    def step(self, ids: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, state_out = self._session_for(ids).run([LOGITS, STATE_OUT], {INPUT_IDS: ids, STATE: state})
        return logits, state_out

    @property
    def device(self) -> str:
        return "cuda" if self.provider == CUDA else "cpu"

    def to_device(self, state: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(state), self.device, 0)

    def bound_step(self, ids: np.ndarray, state: ort.OrtValue) -> tuple[np.ndarray, ort.OrtValue]:
        """The step with IOBinding: the state stays where the model runs (on the GPU under
        CUDA); only ids go in and logits come out through host memory."""
        binding = self._session_for(ids).io_binding()
        binding.bind_cpu_input(INPUT_IDS, ids)
        binding.bind_ortvalue_input(STATE, state)
        binding.bind_output(LOGITS, "cpu")
        binding.bind_output(STATE_OUT, self.device, 0)
        self._session_for(ids).run_with_iobinding(binding)
        logits, state_out = binding.get_outputs()
        return logits.numpy(), state_out

    def decoder(self, state: np.ndarray) -> Decoder:
        """A decode loop for this batch with IOBinding and preallocated buffers."""
        return Decoder(self, state)

    @property
    def has_fused(self) -> bool:
        return self.fused_session is not None

    def fused(
        self,
        tokens: np.ndarray,
        state: np.ndarray,
        temperature: np.ndarray,
        top_k: np.ndarray,
        top_p: np.ndarray,
        uniforms: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feed tokens [B], then K = uniforms.shape[1] times: sample the next token with
        uniforms[:, k] (as gru_serve.sampling.sample does) and feed it. Returns time-major
        sampled [K, B], step_logits [K, B, V] and step_states [K, B, L, H]: entry k is what
        follows the k-th fed token (the given one is k = 0)."""
        if self.fused_session is None:
            raise RuntimeError(f"model {self.name}: no fused graph ({self.fast_path_note})")
        sampled, logits, states = self.fused_session.run(
            list(FUSED_OUTPUTS),
            {
                "tokens": tokens.astype(np.int64, copy=False),
                STATE: state,
                "temperature": temperature.astype(np.float64, copy=False),
                "top_k": top_k.astype(np.int64, copy=False),
                "top_p": top_p.astype(np.float64, copy=False),
                "uniforms": uniforms.astype(np.float64, copy=False),
            },
        )
        return sampled, logits, states


class Decoder:
    """The decode step of one batch with IOBinding: preallocated ids and logits buffers and a
    double-buffered state that stays where the model runs (on the GPU under CUDA), so a step
    copies only token ids in and logits out."""

    def __init__(self, rt: ModelRuntime, state: np.ndarray) -> None:
        self.rt = rt
        self.batch = state.shape[0]
        self.session = rt.decode_session or rt.session
        self.ids = np.zeros((self.batch, 1), np.int64)
        self.logits = np.zeros((self.batch, 1, rt.metadata.vocab_size), np.float32)
        device = rt.device
        if device == "cpu":
            self._host = [np.array(state, np.float32, order="C"), np.empty_like(state, np.float32)]
            self._states = [ort.OrtValue.ortvalue_from_numpy(h) for h in self._host]
        else:
            self._host = []
            self._states = [
                ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(state, np.float32), device, 0),
                ort.OrtValue.ortvalue_from_shape_and_type(state.shape, np.float32, device, 0),
            ]
        ids, logits = (
            ort.OrtValue.ortvalue_from_numpy(self.ids),
            ort.OrtValue.ortvalue_from_numpy(self.logits),
        )
        self._bindings = []
        for src in (0, 1):
            b = self.session.io_binding()
            b.bind_ortvalue_input(INPUT_IDS, ids)
            b.bind_ortvalue_input(STATE, self._states[src])
            b.bind_ortvalue_output(LOGITS, logits)
            b.bind_ortvalue_output(STATE_OUT, self._states[1 - src])
            self._bindings.append(b)
        self._cur = 0

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed tokens [B]; returns the logits [B, V] (a view, overwritten by the next step)."""
        self.ids[:, 0] = tokens
        self.session.run_with_iobinding(self._bindings[self._cur])
        self._cur = 1 - self._cur
        return self.logits[:, 0]

    def state(self) -> np.ndarray:
        """The batch's state [B, L, H] (on CPU a view, overwritten by the next step)."""
        if self._host:
            return self._host[self._cur]
        return self._states[self._cur].numpy()

    def load(self, state: np.ndarray) -> None:
        if self._host:
            np.copyto(self._host[self._cur], state)
        else:
            self._states[self._cur].update_inplace(np.ascontiguousarray(state, np.float32))
