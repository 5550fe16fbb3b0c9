"""Activation smoothing: exact in float, lower int8 error where the input has outlier channels."""

from __future__ import annotations

import numpy as np
import onnx
from builders import fvi, init, make
from onnx import helper

from graphopt.passes.qdq import smooth
from graphopt.core.model import Model
from graphopt.passes.qdq.dynamic import to_dynamic
from graphopt.passes.qdq.sites import find_sites
from graphopt.core.runtime import make_session, run


def two_readers(seed: int = 11) -> Model:
    """x -> MatMul(wa), Gemm(transB, wb); the Gemm's weight is also read by a third node (a shared weight)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="a"),
             helper.make_node("Gemm", ["x", "wb", "bb"], ["b"], name="b", transB=1),
             helper.make_node("ReduceSum", ["wb"], ["wsum"], name="uses_wb", keepdims=0),
             helper.make_node("Add", ["b", "wsum"], ["y"], name="add")]
    inits = [init("wa", rng.standard_normal((32, 24)).astype(np.float32)),
             init("wb", rng.standard_normal((16, 32)).astype(np.float32)),
             init("bb", rng.standard_normal(16).astype(np.float32))]
    return Model(make(nodes, [fvi("x", [64, 32])], [fvi("a", [64, 24]), fvi("y", [64, 16])], inits))


def outlier_feeds(n=6, seed: int = 12):
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        x = rng.standard_normal((64, 32)).astype(np.float32)
        x[:, [3, 17]] *= 60.0  # two outlier channels, as in transformer hidden states
        feeds.append({"x": x})
    return feeds


def rel_err(ref, new):
    num = sum(float(np.sum((r[k] - n[k]) ** 2)) for r, n in zip(ref, new) for k in r)
    return num / sum(float(np.sum(r[k] ** 2)) for r in ref for k in r)


def test_smoothing_is_exact_in_float_and_lowers_the_dynamic_int8_error():
    model, data, held = two_readers(), outlier_feeds(), outlier_feeds(seed=14)  # the plan reads `data` only
    sites = [s for s in find_sites(model) if not s.reason]
    plans = smooth.plan(model, sites, data)
    assert len(plans) == 1 and plans[0].alpha is not None and plans[0].error_after < plans[0].error_before / 2
    smoothed = smooth.apply(model, sites, plans)
    onnx.checker.check_model(smoothed.proto)
    assert sum(n.op_type == "Mul" for n in smoothed.graph.node) == 1, "one Mul serves both readers"
    ref = run(make_session(model), held)
    assert rel_err(ref, run(make_session(smoothed), held)) < 1e-10
    shared = [n for n in smoothed.graph.node if n.name == "uses_wb"][0]
    assert shared.input[0] == "wb" and "wb" in smoothed.initializers(), "a weight read elsewhere is copied"

    plain = rel_err(ref, run(make_session(to_dynamic(model, sites)), held))
    new_sites = [s for s in find_sites(smoothed) if not s.reason]
    better = rel_err(ref, run(make_session(to_dynamic(smoothed, new_sites)), held))
    assert better < plain / 2, (plain, better)


def test_smoothing_is_declined_when_it_does_not_help():
    model = two_readers()
    w = onnx.numpy_helper.to_array(model.initializers()["wa"]).copy()
    w[5] *= 100.0  # an outlier weight row: alpha 0 would blow input channel 5 up by as much
    model.initializers()["wa"].CopyFrom(onnx.numpy_helper.from_array(w, "wa"))
    rng = np.random.default_rng(13)
    data = [{"x": rng.standard_normal((64, 32)).astype(np.float32)} for _ in range(4)]  # no outliers
    plans = smooth.plan(model, [s for s in find_sites(model) if not s.reason], data, alphas=(0.0,))
    assert plans[0].alpha is None and "not smoothed" in plans[0].describe()
    assert smooth.apply(model, [], plans).graph == model.graph
