"""The fused K-token graph: an ONNX Loop of decode steps with sampling and feedback."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gru_serve.contract import STATE
from gru_serve.graphs.decode import _axis1, _cell, _Graph, _model, _split_state
from gru_serve.graphs.weights import GRUWeights, gru_weights
from gru_serve.sampling import COLUMNS

# The fused graph's tensors (gru_serve side only: the exported contract stays as it is): one
# input per sampler column (gru_serve.sampling.COLUMNS), named as the SamplingParams field.
FUSED_INPUTS = ("tokens", STATE, *COLUMNS, "uniforms")
FUSED_OUTPUTS = ("sampled", "step_logits", "step_states")


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
    relative = g.op("Greater", "min_p", c("zero", np.array(0.0)))
    filtered = g.op("Cast", g.op("Or", g.op("Or", limited, nucleus), relative), to=TensorProto.INT32)
    return {
        "any_filter": g.op("Cast", g.op("ReduceMax", filtered, keepdims=0), to=TensorProto.BOOL),
        "t_pos": t_pos,
        "t_col": g.op("Unsqueeze", g.op("Where", t_pos, "temperature", c("one", np.array(1.0))), _axis1(g)),
        "k_idx": g.op("Unsqueeze", k_idx, _axis1(g)),
        "p_col": g.op("Unsqueeze", "top_p", _axis1(g)),
        "min_p_col": g.op("Unsqueeze", "min_p", _axis1(g)),
        "nucleus_col": g.op("Unsqueeze", nucleus, _axis1(g)),
        "zeros": g.op(
            "ConstantOfShape",
            g.op("Concat", g.op("Shape", "top_p"), c("vocab", np.array([V], np.int64)), axis=0),
            value=numpy_helper.from_array(np.array([0.0])),
        ),
        "u_steps": g.op("Transpose", "uniforms", perm=[1, 0]),  # [K, B]
    }


def _sample(g: _Graph, logits: str, u: str, rows: dict[str, str], V: int, filters: bool) -> str:
    """gru_serve.sampling.sample in ONNX, op for op in float64: temperature, min_p, top-k,
    softmax, top-p, inverse CDF with the uniform `u` [B]; rows with temperature 0 take the argmax.
    Without `filters` (no row uses min_p, top-k or top-p) their ops, which leave such rows
    unchanged, are left out."""
    c, ax = g.const, _axis1(g)
    vocab = c("vocab", np.array([V], np.int64))
    z = g.op("Div", g.op("Cast", logits, to=TensorProto.DOUBLE), rows["t_col"])
    if filters:
        # min_p: drop a token when exp(z - max z), its probability over the largest, is below
        # min_p (rows with min_p 0 drop none)
        scaled = g.op("Exp", g.op("Sub", z, g.op("ReduceMax", z, axes=[1], keepdims=1)))
        z = g.op("Where", g.op("Less", scaled, rows["min_p_col"]), c("neg_inf", np.array(-np.inf)), z)
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
    cols = COLUMNS.items()
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
            *[helper.make_tensor_value_info(n, i64 if t is np.int64 else d, ["batch"]) for n, t in cols],
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
