"""The networkx dependency graph: producers, consumers, order, chains, joins, weights, shapes."""

from __future__ import annotations

import numpy as np
import torch
from builders import fvi, init, make, resnet_like, torch_export
from onnx import helper

from graphopt.analysis.depgraph import DependencyGraph
from graphopt.core.model import Model


def _branchy():
    """x -> conv1 -> relu1 -+-> add -> relu2 -> y ; x -> conv2 ----^ ; add is a residual join."""
    w = np.random.default_rng(0).standard_normal((4, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["r1", "c2"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="relu2")]
    return Model(make(nodes, [fvi("x", [1, 4, 3, 3])], [fvi("y", [1, 4, 3, 3])], [init("w1", w), init("w2", w)]))


def test_producers_consumers_weights_and_shapes():
    dg = DependencyGraph(_branchy())
    assert dg.producer("c1") == "conv1" and dg.producer("x") is None
    assert sorted(dg.consumers("x")) == ["conv1", "conv2"]
    assert dg.weights("conv1") == {1: "w1"}
    assert dg.nx.nodes["conv1"]["weights"] == {"w1": (4, 4, 1, 1)}
    assert dg.nx.nodes["conv1"]["op_type"] == "Conv"
    edge = dg.nx.edges["conv1", "relu1"]["tensors"][0]
    assert edge.name == "c1" and edge.shape == (1, 4, 3, 3) and edge.dtype == "float32"
    order = dg.topological_order()
    assert order.index("conv1") < order.index("relu1") < order.index("add") < order.index("relu2")


def test_chains_joins_and_forks():
    dg = DependencyGraph(_branchy())
    assert dg.linear_chains() == [["conv1", "relu1"], ["add", "relu2"]]
    (join,) = dg.joins()
    assert join.node == "add" and set(join.branch_inputs) == {"r1", "c2"}
    assert dg.fork_of(join) is None, "both branches start at the graph input, not at a node"


def test_resnet_blocks_are_found_in_an_exported_model():
    proto = torch_export(resnet_like(), (torch.randn(1, 3, 16, 16),), ["image"], ["logits"])
    dg = DependencyGraph(Model(proto))
    joins = [j for j in dg.joins() if j.op_type == "Add"]
    assert len(joins) == 2
    for join in joins:
        fork = dg.fork_of(join)
        assert fork is not None and dg.op_type(fork) == "Relu", "each block starts at the previous ReLU"
    summary = dg.summary()
    assert summary["residual_joins"] == 2 and summary["nodes"] == len(proto.graph.node)
