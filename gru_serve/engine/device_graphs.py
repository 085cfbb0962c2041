"""Small graphs that move a batch's rows where they are (the device), for FusedBatch."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper


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
