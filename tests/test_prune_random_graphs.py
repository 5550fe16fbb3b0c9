"""Property test of channel groups and exact construction on random conv nets (residuals, concats, splits,
slices, depthwise convs, BN, per-channel constants, flatten-to-Gemm): zeroing a random set of channels of random
prunable groups in the original and physically removing them gives the same outputs in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from builders import fvi, init, make, run_ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from graphopt.analysis.channel_groups import analyse
from graphopt.core.model import Model
from graphopt.passes.prune.build import build, zero_channels

KINDS = ["conv", "conv_bn_relu", "residual", "concat", "depthwise", "maxpool", "scale", "split", "slice", "bn"]


def random_net(layers, seed: int, head: str) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)  # noqa: E731
    nodes, inits = [], []
    cur, c, hw = "x", 3, 6
    counter = iter(range(10_000))

    def name(prefix):
        return f"{prefix}{next(counter)}"

    def conv(x, cin, cout, k=3, group=1):
        wn, bn, out = name("w"), name("b"), name("c")
        inits.extend([init(wn, w(cout, cin // group, k, k)), init(bn, w(cout))])
        nodes.append(helper.make_node("Conv", [x, wn, bn], [out], name=out, pads=[k // 2] * 4, group=group))
        return out

    def bn(x, ch):
        names = [name(p) for p in ("g", "be", "m", "v")]
        vals = [rng.uniform(0.5, 1.5, ch), rng.uniform(-1, 1, ch), rng.uniform(-1, 1, ch), rng.uniform(0.5, 2, ch)]
        inits.extend(init(n, v.astype(np.float32)) for n, v in zip(names, vals))
        out = name("bn")
        nodes.append(helper.make_node("BatchNormalization", [x, *names], [out], name=out))
        return out

    def op(kind, inputs, **attrs):
        out = name(kind.lower())
        nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    for kind, width in layers:
        if kind == "conv":
            cur, c = conv(cur, c, width), width
        elif kind == "conv_bn_relu":
            cur, c = op("Relu", [bn(conv(cur, c, width), width)]), width
        elif kind == "residual":  # conv-relu-conv added back onto the input
            y = conv(op("Relu", [conv(cur, c, width)]), width, c, k=1)
            cur = op("Add", [cur, y])
        elif kind == "concat":
            a, b = conv(cur, c, width), conv(cur, c, 2)
            cur, c = op("Concat", [a, b], axis=1), width + 2
        elif kind == "depthwise":
            cur = op("Relu", [conv(cur, c, c, group=c)])
        elif kind == "maxpool" and hw > 2:
            cur, hw = op("MaxPool", [cur], kernel_shape=[2, 2], strides=[2, 2]), hw // 2
        elif kind == "scale":
            s, t = name("s"), name("t")
            inits.extend([init(s, w(1, c, 1, 1)), init(t, w(c, 1, 1))])
            cur = op("Add", [op("Mul", [cur, s]), t])
        elif kind == "split":  # two convs, concatenated, split back at the same boundary, added
            a, b = conv(cur, c, width), conv(cur, c, 3)
            cat = op("Concat", [a, b], axis=1)
            sizes = name("sizes")
            inits.append(init(sizes, np.array([width, 3], np.int64)))
            p, q = f"{cat}_p", f"{cat}_q"
            nodes.append(helper.make_node("Split", [cat, sizes], [p, q], name=f"{cat}_split", axis=1))
            cur, c = op("Concat", [op("Relu", [p]), q], axis=1), width + 3
        elif kind == "slice":  # concat of two convs, keep the second one through a Slice
            a, b = conv(cur, c, 2), conv(cur, c, width)
            cat = op("Concat", [a, b], axis=1)
            names = [name(p) for p in ("st", "en", "ax")]
            inits.extend(init(n, np.array([v], np.int64)) for n, v in zip(names, (2, 2 + width, 1)))
            cur, c = op("Slice", [cat, *names]), width
        elif kind == "bn":
            cur = bn(cur, c)
    if head == "flatten":  # each channel owns H*W features of the Gemm's input
        flat = op("Flatten", [cur], axis=1)
        features = c * hw * hw
    else:
        flat = op("Flatten", [op("GlobalAveragePool", [cur])], axis=1)
        features = c
    inits.extend([init("wf", w(5, features)), init("bf", w(5))])
    nodes.append(helper.make_node("Gemm", [flat, "wf", "bf"], ["y"], name="fc", transB=1))
    return make(nodes, [fvi("x", [2, 3, 6, 6])], [fvi("y", [2, 5])], inits)


def random_keep(cg, rng):
    keep = {}
    for g in cg.groups():
        if g.prunable and rng.random() < 0.7:
            n = g.size // g.block
            kept = np.sort(rng.choice(n, rng.integers(1, n), replace=False))
            keep[g.id] = (kept[:, None] * g.block + np.arange(g.block)).ravel()
    return keep


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(2, 5)), min_size=1, max_size=7),
       seed=st.integers(0, 10_000), head=st.sampled_from(["flatten", "gap"]))
def test_zeroed_groups_equal_pruned_network(layers, seed, head):
    proto = random_net(layers, seed, head)
    onnx.checker.check_model(proto)
    model = Model(proto)
    cg = analyse(model)
    rng = np.random.default_rng(seed)
    keep = random_keep(cg, rng)
    pruned = build(model, cg, keep)
    onnx.checker.check_model(pruned.proto, full_check=True)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    (expected,) = run_ort(zero_channels(model, cg, keep).proto, {"x": x})
    (got,) = run_ort(pruned.proto, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
    if keep:
        assert pruned.parameter_count() < model.parameter_count()
    frozen = [g for g in cg.groups() if g.frozen]
    assert all(g.reasons for g in frozen)
    assert any("graph output" in r for g in frozen for r in g.reasons), "the Gemm's output group is frozen"


def test_groups_of_a_known_graph():
    """conv-residual-concat-depthwise: which groups exist, which are merged, which are frozen."""
    proto = random_net([("conv", 4), ("residual", 3), ("concat", 3), ("depthwise", 0)], 0, "flatten")
    cg = analyse(Model(proto))
    groups = sorted((g.size, len(g.producers), bool(g.frozen)) for g in cg.groups())
    # conv w/ residual (its output and the residual conv's are one group), residual inner conv,
    # the two concat branches (independent), the Gemm (graph output, frozen)
    assert groups == [(2, 1, False), (3, 1, False), (3, 1, False), (4, 2, False), (5, 1, True)]
    flat = next(t for t in cg.tracked if t.startswith("flatten"))
    assert [s.repeat for s in cg.tracked[flat].layout] == [36, 36]  # each channel owns 6*6 features
