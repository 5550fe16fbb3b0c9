"""Blocked int4 weights: packing, the clipping search, and the DequantizeLinear onnxruntime reads."""

from __future__ import annotations

import numpy as np
import onnx
from builders import fvi, init, make
from onnx import helper, numpy_helper

from graphopt.core.model import Model
from graphopt.passes.qdq.int4 import blocked_int4, dequantized, int4_tensor, to_int4
from graphopt.core.runtime import RuntimeSettings, kernels, make_session


def test_int4_packing_round_trips_through_onnx():
    q = np.random.default_rng(5).integers(-8, 8, (5, 7)).astype(np.int8)  # odd element count: the last byte is half used
    assert np.array_equal(numpy_helper.to_array(int4_tensor("q", q)).astype(np.int8), q)


def test_blocks_run_along_the_axis_and_clipping_lowers_the_error():
    w = np.random.default_rng(6).standard_normal((70, 12)).astype(np.float32)  # 70 rows: the last block is partial
    q, scale = blocked_int4(w, axis=0, block_size=32)
    assert q.shape == w.shape and scale.shape == (3, 12) and q.min() >= -8 and q.max() <= 7
    deq = dequantized(w, axis=0, block_size=32)
    plain = np.clip(np.round(w[:32] / (np.abs(w[:32]).max(0) / 7)), -8, 7) * (np.abs(w[:32]).max(0) / 7)
    assert np.sum((deq[:32] - w[:32]) ** 2) <= np.sum((plain - w[:32]) ** 2)
    assert np.abs(deq - w).max() < np.abs(w).max() / 7


def test_onnxruntime_dequantizes_exactly_what_we_computed():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = Model(make(nodes, [fvi("x", [3, 64])], [fvi("y", [3, 16])], [init("w", w)], opset=21, ir_version=10))
    q = to_int4(model, {"w": 0})
    onnx.checker.check_model(q.proto)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    unfused = make_session(q, RuntimeSettings(graph_optimization="disable")).run(None, {"x": x})[0]
    np.testing.assert_allclose(unfused, x @ dequantized(w, axis=0), rtol=1e-5, atol=1e-5)
    # fused into MatMulNBits, which by default also rounds the activations to int8 per block (its accuracy level
    # 4): close to, not equal to, the float product of the dequantized weight
    assert kernels(q)["mm"] == "MatMulNBits"
    fused = make_session(q).run(None, {"x": x})[0]
    assert np.abs(fused - unfused).max() < 0.02 * np.abs(unfused).max()
