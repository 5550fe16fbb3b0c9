"""Structured pruning benchmark: graphopt's prune pass against Torch-Pruning, no fine-tuning on either side.

(placeholder: filled in below)
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def big_graph(nodes: int = 10_000, width: int = 8, seed: int = 0):
    """A residual conv net of about `nodes` nodes (conv3x3-relu-conv1x1-add blocks), random weights."""
    from graphopt.model import Model

    rng = np.random.default_rng(seed)
    inits, graph_nodes = [], []
    cur = "x"
    for i in range(max(1, nodes // 4)):
        w1, b1, w2 = f"w{i}a", f"b{i}a", f"w{i}b"
        inits += [numpy_helper.from_array((rng.standard_normal((width, width, 3, 3)) * 0.1).astype(np.float32), w1),
                  numpy_helper.from_array(np.zeros(width, np.float32), b1),
                  numpy_helper.from_array((rng.standard_normal((width, width, 1, 1)) * 0.1).astype(np.float32), w2)]
        graph_nodes += [helper.make_node("Conv", [cur, w1, b1], [f"c{i}"], name=f"conv{i}a", pads=[1, 1, 1, 1]),
                        helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
                        helper.make_node("Conv", [f"r{i}", w2], [f"d{i}"], name=f"conv{i}b"),
                        helper.make_node("Add", [cur, f"d{i}"], [f"s{i}"], name=f"add{i}")]
        cur = f"s{i}"
    graph_nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    graph = helper.make_graph(graph_nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 [1, width, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width, 4, 4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return Model(proto)
