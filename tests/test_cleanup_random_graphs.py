"""Property test: on random conv nets with BN, residuals, Identity and Dropout, cleanup changes no output."""

from __future__ import annotations

import numpy as np
import onnx
from builders import fvi, init, make, run_ort
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from graphopt.core.model import Model
from graphopt.passes import DEFAULT_RECIPE, Context, create

LAYER = st.tuples(st.sampled_from(["conv", "conv_bn", "bn_relu", "identity", "dropout", "residual"]),
                  st.booleans())


def build(layers, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    c = 4
    nodes, inits, cur = [], [], "x"
    for i, (kind, flag) in enumerate(layers):
        out = f"t{i}"
        if kind in ("conv", "conv_bn"):
            inits.append(init(f"w{i}", rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.3))
            conv_in = [cur, f"w{i}"] + ([f"b{i}"] if flag else [])
            if flag:
                inits.append(init(f"b{i}", rng.standard_normal(c).astype(np.float32)))
            conv_out = out if kind == "conv" else f"c{i}"
            nodes.append(helper.make_node("Conv", conv_in, [conv_out], pads=[1, 1, 1, 1]))
            if kind == "conv_bn":
                nodes.append(_bn(i, conv_out, out, c, rng, inits))
        elif kind == "bn_relu":
            nodes.append(_bn(i, cur, f"n{i}", c, rng, inits))
            nodes.append(helper.make_node("Relu", [f"n{i}"], [out]))
        elif kind == "identity":
            nodes.append(helper.make_node("Identity", [cur], [out]))
        elif kind == "dropout":
            nodes.append(helper.make_node("Dropout", [cur], [out]))
        else:  # residual: a conv branch added back onto its input
            inits.append(init(f"w{i}", rng.standard_normal((c, c, 1, 1)).astype(np.float32) * 0.3))
            nodes.append(helper.make_node("Conv", [cur, f"w{i}"], [f"r{i}"]))
            nodes.append(helper.make_node("Add", [cur, f"r{i}"], [out]))
        cur = out
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    return make(nodes, [fvi("x", [2, c, 5, 5])], [fvi("y", [2, c, 5, 5])], inits)


def _bn(i, x, y, c, rng, inits):
    names = [f"g{i}", f"be{i}", f"m{i}", f"v{i}"]
    values = [rng.uniform(0.5, 1.5, c), rng.uniform(-1, 1, c), rng.uniform(-1, 1, c), rng.uniform(0.5, 2, c)]
    inits.extend(init(n, v.astype(np.float32)) for n, v in zip(names, values))
    return helper.make_node("BatchNormalization", [x, *names], [y], epsilon=1e-3)


@settings(max_examples=40, deadline=None)
@given(layers=st.lists(LAYER, min_size=1, max_size=8), seed=st.integers(0, 1000))
def test_cleanup_recipe_preserves_outputs(tmp_path_factory, layers, seed):
    proto = build(layers, seed)
    path = tmp_path_factory.mktemp("g") / "m.onnx"
    onnx.save_model(proto, path)
    model = Model.load(path)
    for name in DEFAULT_RECIPE:
        model = create(name).run(model, Context()).model
    onnx.checker.check_model(model.proto)
    ops = [n.op_type for n in model.graph.node]
    passthrough = ("identity", "dropout")
    if all(k in passthrough for k, _ in layers):
        assert ops == ["Identity"], "an Identity from the graph input to the output is kept"
    else:
        assert "Identity" not in ops and "Dropout" not in ops
    kinds = [k for k, _ in layers if k not in passthrough]
    after_conv = sum(1 for i, k in enumerate(kinds) if k == "bn_relu" and i and kinds[i - 1] in ("conv", "conv_bn"))
    assert ops.count("BatchNormalization") == kinds.count("bn_relu") - after_conv, \
        "a BN right after a conv (Identity/Dropout between removed) is folded; a BN after anything else stays"
    x = np.random.default_rng(seed).standard_normal((2, 4, 5, 5)).astype(np.float32)
    (expected,), (got,) = run_ort(proto, {"x": x}), run_ort(model.proto, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
