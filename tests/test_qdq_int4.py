"""int4 weight-only forms: the clipping search, MatMulNBits and GatherBlockQuantized against numpy references."""

from __future__ import annotations

import numpy as np
import onnx
from builders import fvi, init, make
from onnx import helper

from graphopt.core.model import Model
from graphopt.core.runtime import RuntimeSettings, kernels, make_session
from graphopt.passes.qdq.int4 import blocked_int4, constant_tables, dequantized, int4_reason, to_int4
from graphopt.passes.qdq.sites import find_sites


def test_blocks_run_along_the_axis_and_clipping_lowers_the_error():
    w = np.random.default_rng(6).standard_normal((70, 12)).astype(np.float32)  # 70 rows: the last block is partial
    q, scale = blocked_int4(w, axis=0, block_size=32)
    assert q.shape == w.shape and scale.shape == (3, 12) and q.min() >= -8 and q.max() <= 7
    deq = dequantized(w, axis=0, block_size=32)
    plain = np.clip(np.round(w[:32] / (np.abs(w[:32]).max(0) / 7)), -8, 7) * (np.abs(w[:32]).max(0) / 7)
    assert np.sum((deq[:32] - w[:32]) ** 2) <= np.sum((plain - w[:32]) ** 2)
    assert np.abs(deq - w).max() < np.abs(w).max() / 7


def test_matmulnbits_computes_the_numpy_product_of_the_dequantized_weight():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((80, 16)).astype(np.float32)  # K = 80: a partial last block, padded in the packing
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = Model(make(nodes, [fvi("x", [3, 80])], [fvi("y", [3, 16])], [init("w", w)]))  # opset 17: no conversion
    site = find_sites(model)[0]
    assert int4_reason(site, model) == ""
    x = rng.standard_normal((3, 80)).astype(np.float32)
    exact = to_int4(model, [site], accuracy_level=0)
    onnx.checker.check_model(exact.proto)
    assert kernels(exact)["mm"] == "MatMulNBits" and not exact.initializers().get("w")
    np.testing.assert_allclose(make_session(exact).run(None, {"x": x})[0], x @ dequantized(w, axis=0),
                               rtol=1e-5, atol=1e-5)
    # accuracy level 4 also rounds the activations to int8 per block: close to, not equal to, that product
    fast = make_session(to_int4(model, [site], accuracy_level=4)).run(None, {"x": x})[0]
    ref = x @ dequantized(w, axis=0)
    assert 0 < np.abs(fast - ref).max() < 0.02 * np.abs(ref).max()


def test_gather_block_quantized_gathers_the_numpy_dequantized_rows():
    rng = np.random.default_rng(8)
    table = rng.standard_normal((50, 64)).astype(np.float32)
    ids = rng.integers(0, 50, (2, 7)).astype(np.int64)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed")]
    model = Model(make(nodes, [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 7])],
                       [fvi("e", [2, 7, 64])], [init("table", table)]))
    [site] = constant_tables(model)
    q = to_int4(model, [site])
    assert kernels(q)["embed"] == "GatherBlockQuantized"
    assert q.byte_size() < model.byte_size() / 5
    # reference: blocks of 32 along the hidden axis, dequantized in numpy, then the rows gathered
    got = make_session(q, RuntimeSettings(graph_optimization="disable")).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, dequantized(table, axis=1)[ids])
