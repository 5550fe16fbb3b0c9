"""The shared proto edits of core/editing.py: liveness and clean-up that see inside If/Loop/Scan bodies."""

from __future__ import annotations

import numpy as np
import onnx
from builders import fvi, init, make
from onnx import helper

from graphopt.core.editing import drop_unused_initializers, new_node, node_attrs, set_attr


def _model_with_if():
    """y = If(c) { x + k } else { x - k }; z = x * w; `k` is read only inside the branches."""
    then_g = helper.make_graph([helper.make_node("Add", ["x", "k"], ["t"])], "then", [], [fvi("t", [2])])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "k"], ["e"])], "else", [], [fvi("e", [2])])
    nodes = [helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
             helper.make_node("Mul", ["x", "w"], ["z"], name="mul")]
    inits = [init(n, np.ones(2, np.float32)) for n in ("k", "w", "unused", "dead", "overridable")]
    return make(nodes, [fvi("x", [2]), fvi("c", [], onnx.TensorProto.BOOL), fvi("overridable", [2])],
                [fvi("y", [2]), fvi("z", [2])], inits)


def test_drop_unused_initializers_keeps_what_subgraphs_and_the_interface_read():
    proto = _model_with_if()
    assert drop_unused_initializers(proto.graph) == 2
    assert [t.name for t in proto.graph.initializer] == ["k", "w", "overridable"]
    onnx.checker.check_model(proto)


def test_drop_unused_initializers_only_drops_candidates():
    proto = _model_with_if()
    assert drop_unused_initializers(proto.graph, {"dead", "k"}) == 1
    assert [t.name for t in proto.graph.initializer] == ["k", "w", "unused", "overridable"]


def test_attributes_and_new_nodes():
    taken = {"y_Relu"}
    node = new_node("Gemm", ["a", "b"], ["y"], taken, alpha=0.5)
    relu = new_node("Relu", ["y"], ["y"], taken)
    assert node.name == "y_Gemm" and relu.name == "y_Relu_1" and {"y_Gemm", "y_Relu_1"} <= taken
    set_attr(node, "alpha", 2.0)
    set_attr(node, "transB", 1)
    assert node_attrs(node) == {"alpha": 2.0, "transB": 1}
