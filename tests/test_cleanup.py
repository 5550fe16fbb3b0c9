"""Every cleanup rewrite: exact numerics in onnxruntime, and the cases each one must decline."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import bn_inits, bn_node, fvi, init, make, run_ort
from onnx import TensorProto, helper

from graphopt.core.model import Model
from graphopt.passes import Context, create

RTOL, ATOL = 1e-5, 1e-5


def apply(proto: onnx.ModelProto, pass_name: str, tmp_path, **params):
    path = tmp_path / "in.onnx"
    onnx.save_model(proto, path)
    model = Model.load(path)
    result = create(pass_name, params).run(model, Context())
    onnx.checker.check_model(result.model.proto)
    return model, result


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict):
    for x, y in zip(run_ort(a, feeds), run_ort(b, feeds)):
        np.testing.assert_allclose(y, x, rtol=RTOL, atol=ATOL)


def ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


# ------------------------------------------------------------------------------- BatchNormalization
@pytest.mark.parametrize("bias,group,eps", [(True, 1, 1e-5), (False, 1, 1e-3), (True, 2, 1e-5)])
def test_fold_bn_into_conv_is_exact(tmp_path, bias, group, eps):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 4 // group, 3, 3)).astype(np.float32)
    inits = [init("w", w)] + bn_inits("bn", 8, rng)
    conv_in = ["x", "w"]
    if bias:
        inits.append(init("b", rng.standard_normal(8).astype(np.float32)))
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["c"], name="conv", pads=[1, 1, 1, 1], group=group),
             bn_node("bn", "c", "y", eps)]
    proto = make(nodes, [fvi("x", [2, 4, 6, 6])], [fvi("y", [2, 8, 6, 6])], inits)
    model, result = apply(proto, "fold_batchnorm", tmp_path)
    assert result.changed and ops(result.model.proto) == ["Conv"]
    assert result.decisions[0].action == "folded"
    assert_same_outputs(proto, result.model.proto, {"x": rng.standard_normal((2, 4, 6, 6)).astype(np.float32)})
    assert ops(model.proto) == ["Conv", "BatchNormalization"], "the input model must not be mutated"


def test_fold_bn_into_grouped_conv_transpose_is_exact(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)  # Cin=4, Cout/group=3, group=2 -> Cout=6
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="deconv", strides=[2, 2], group=2),
             bn_node("bn", "c", "y")]
    proto = make(nodes, [fvi("x", [1, 4, 5, 5])], [fvi("y", [1, 6, 10, 10])], [init("w", w)] + bn_inits("bn", 6, rng))
    _, result = apply(proto, "fold_batchnorm", tmp_path)
    assert ops(result.model.proto) == ["ConvTranspose"]
    assert_same_outputs(proto, result.model.proto, {"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)})


@pytest.mark.parametrize("trans_b,with_c", [(0, True), (1, True), (1, False)])
def test_fold_bn_into_gemm_is_exact(tmp_path, trans_b, with_c):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 7) if trans_b else (7, 5)).astype(np.float32)
    inits = [init("w", w)] + bn_inits("bn", 5, rng)
    gemm_in = ["x", "w"]
    if with_c:
        inits.append(init("c", rng.standard_normal(5).astype(np.float32)))
        gemm_in.append("c")
    nodes = [helper.make_node("Gemm", gemm_in, ["g"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3),
             bn_node("bn", "g", "y")]
    proto = make(nodes, [fvi("x", [3, 7])], [fvi("y", [3, 5])], inits)
    _, result = apply(proto, "fold_batchnorm", tmp_path)
    assert ops(result.model.proto) == ["Gemm"]
    assert_same_outputs(proto, result.model.proto, {"x": rng.standard_normal((3, 7)).astype(np.float32)})


def _conv_bn(extra_nodes=(), conv_weight_is_input=False, outputs=("y",)):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    inputs = [fvi("x", [1, 3, 4, 4])] + ([fvi("w", [4, 3, 1, 1])] if conv_weight_is_input else [])
    inits = ([] if conv_weight_is_input else [init("w", w)]) + bn_inits("bn", 4, rng)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("bn", "c", "y"), *extra_nodes]
    return make(nodes, inputs, [fvi(o, [1, 4, 4, 4]) for o in outputs], inits)


@pytest.mark.parametrize("proto,reason", [
    (_conv_bn([helper.make_node("Relu", ["c"], ["z"], name="other")], outputs=("y", "z")), "used elsewhere"),
    (_conv_bn(outputs=("y", "c")), "used elsewhere"),
    (_conv_bn(conv_weight_is_input=True), "not constant"),
])
def test_fold_bn_skips_shared_outputs_and_non_constant_weights(tmp_path, proto, reason):
    _, result = apply(proto, "fold_batchnorm", tmp_path)
    assert not result.changed
    assert "BatchNormalization" in ops(result.model.proto)
    assert reason in result.decisions[0].reason


def test_fold_bn_skips_bn_after_a_non_conv(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("bn", "r", "y")]
    proto = make(nodes, [fvi("x", [1, 4, 2, 2])], [fvi("y", [1, 4, 2, 2])], bn_inits("bn", 4))
    _, result = apply(proto, "fold_batchnorm", tmp_path)
    assert not result.changed and "Relu" in result.decisions[0].reason


# ------------------------------------------------------------------------------- Identity / Dropout
def test_remove_identity_inside_and_at_the_output(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Identity", ["a"], ["b"], name="id1"),
             helper.make_node("Sigmoid", ["b"], ["c"], name="sig"),
             helper.make_node("Identity", ["c"], ["y"], name="id2")]
    proto = make(nodes, [fvi("x", [2, 3])], [fvi("y", [2, 3])])
    _, result = apply(proto, "remove_identity", tmp_path)
    out = result.model.proto
    assert ops(out) == ["Relu", "Sigmoid"]
    assert [o.name for o in out.graph.output] == ["y"], "graph output names are kept"
    assert_same_outputs(proto, out, {"x": np.random.default_rng(5).standard_normal((2, 3)).astype(np.float32)})


def test_identity_from_input_to_output_is_kept(tmp_path):
    proto = make([helper.make_node("Identity", ["x"], ["y"], name="id")], [fvi("x", [2])], [fvi("y", [2])])
    _, result = apply(proto, "remove_identity", tmp_path)
    assert not result.changed and "graph input" in result.decisions[0].reason


def test_remove_inference_dropout_and_keep_training_or_mask_dropout(tmp_path):
    nodes = [helper.make_node("Dropout", ["x"], ["a"], name="drop_inference"),
             helper.make_node("Dropout", ["a", "r", "on"], ["b"], name="drop_training"),
             helper.make_node("Dropout", ["b"], ["y", "mask"], name="drop_mask")]
    inits = [init("r", np.array(0.5, np.float32)), init("on", np.array(True))]
    proto = make(nodes, [fvi("x", [4])], [fvi("y", [4]), fvi("mask", [4], TensorProto.BOOL)], inits)
    _, result = apply(proto, "remove_identity", tmp_path)
    by_site = {d.site: d for d in result.decisions}
    assert by_site["drop_inference"].action == "removed"
    assert "training mode" in by_site["drop_training"].reason
    assert "mask" in by_site["drop_mask"].reason
    assert ops(result.model.proto) == ["Dropout", "Dropout"]


def test_identity_read_inside_a_subgraph_is_rewired(tmp_path):
    then_g = helper.make_graph([helper.make_node("Neg", ["b"], ["t"], name="neg")], "then", [], [fvi("t", [3])])
    else_g = helper.make_graph([helper.make_node("Abs", ["b"], ["e"], name="abs")], "else", [], [fvi("e", [3])])
    nodes = [helper.make_node("Identity", ["x"], ["b"], name="id"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    proto = make(nodes, [fvi("x", [3]), fvi("cond", [], TensorProto.BOOL)], [fvi("y", [3])])
    _, result = apply(proto, "remove_identity", tmp_path)
    assert ops(result.model.proto) == ["If"]
    for cond in (True, False):
        assert_same_outputs(proto, result.model.proto, {"x": np.array([1, -2, 3], np.float32),
                                                        "cond": np.array(cond)})


# ------------------------------------------------------------------------------- constant folding
def test_fold_constants_precomputes_weight_transforms_and_static_shapes(tmp_path):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["m"], name="mm"),
             helper.make_node("Shape", ["m"], ["s"], name="shape"),
             helper.make_node("Reshape", ["m", "s"], ["y"], name="reshape")]
    proto = make(nodes, [fvi("x", [2, 4])], [fvi("y", [2, 6])], [init("w", w)])
    _, result = apply(proto, "fold_constants", tmp_path)
    assert ops(result.model.proto) == ["MatMul", "Reshape"]
    assert {d.site for d in result.decisions if d.action == "folded"} == {"t", "shape"}
    assert_same_outputs(proto, result.model.proto, {"x": rng.standard_normal((2, 4)).astype(np.float32)})


def test_fold_constants_declines_growth_and_randomness(tmp_path):
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="cos",
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("RandomUniformLike", ["big"], ["r"], name="rand"),
             helper.make_node("Add", ["x", "r"], ["y"], name="add")]
    proto = make(nodes, [fvi("x", [512, 1024])], [fvi("y", [512, 1024])],
                 [init("shape", np.array([512, 1024], np.int64))])
    _, result = apply(proto, "fold_constants", tmp_path)
    assert not result.changed
    assert ops(result.model.proto) == ["ConstantOfShape", "RandomUniformLike", "Add"]
    assert any("1 MiB" in d.reason for d in result.decisions)


# ------------------------------------------------------------------------------- dead code
def test_remove_dead_nodes_and_unused_initializers_but_keep_subgraph_reads(tmp_path):
    then_g = helper.make_graph([helper.make_node("Add", ["x", "k"], ["t"], name="add_k")], "then", [],
                               [fvi("t", [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="neg")], "else", [], [fvi("e", [2])])
    nodes = [helper.make_node("Exp", ["x"], ["dead1"], name="exp"),
             helper.make_node("Log", ["dead1"], ["dead2"], name="log"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    inits = [init("k", np.ones(2, np.float32)), init("unused", np.zeros(3, np.float32))]
    proto = make(nodes, [fvi("x", [2]), fvi("cond", [], TensorProto.BOOL)], [fvi("y", [2])], inits)
    _, result = apply(proto, "remove_dead", tmp_path)
    out = result.model.proto
    assert ops(out) == ["If"]
    assert {t.name for t in out.graph.initializer} == {"k"}
    assert result.counters == {"nodes": 2, "initializers": 1}
    assert_same_outputs(proto, out, {"x": np.array([1, 2], np.float32), "cond": np.array(True)})


def test_passes_leave_custom_domain_nodes_alone(tmp_path):
    nodes = [helper.make_node("MyOp", ["x"], ["a"], name="custom", domain="com.example"),
             helper.make_node("Identity", ["a"], ["y"], name="id")]
    proto = make(nodes, [fvi("x", [2])], [fvi("y", [2])])
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    for name in ("remove_identity", "fold_constants", "fold_batchnorm", "remove_dead"):
        _, result = apply(proto, name, tmp_path)
        custom = [n for n in result.model.proto.graph.node if n.domain == "com.example"]
        assert len(custom) == 1 and custom[0].op_type == "MyOp"
