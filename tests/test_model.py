"""Model loading (checks, Constant nodes, external data), atomic saving, provenance."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import fvi, init, make
from onnx import helper

from graphopt.core.errors import InputError
from graphopt.core.model import Model


def _affine_model():
    nodes = [helper.make_node("Constant", [], ["k"], value=helper.make_tensor("v", 1, [3], [1.0, 2.0, 3.0])),
             helper.make_node("Constant", [], ["s"], value_float=2.0),
             helper.make_node("Mul", ["x", "k"], ["a"]),
             helper.make_node("Add", ["a", "w"], ["y"])]
    proto = make(nodes, [fvi("x", [3])], [fvi("y", [3])], [init("w", np.arange(3, dtype=np.float32))])
    proto.metadata_props.add(key="author", value="someone")
    proto.producer_name = "tests"
    return proto


def test_load_turns_constants_into_initializers_and_names_nodes(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(_affine_model(), path)
    model = Model.load(path)
    assert [n.op_type for n in model.graph.node] == ["Mul", "Add"]
    assert {"k", "s", "w"} <= set(model.initializers())
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert model.proto.producer_name == "tests" and model.opset == 17


def test_copy_is_independent():
    model = Model(_affine_model())
    clone = model.copy()
    clone.graph.node.pop()
    assert len(model.graph.node) == 4


def test_save_is_atomic_refuses_overwrite_and_records_provenance(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save_model(_affine_model(), src)
    before = src.read_bytes()
    model = Model.load(src)
    with pytest.raises(InputError, match="input model"):
        model.save(src)
    out = tmp_path / "out.onnx"
    model.with_provenance(["remove_dead"]).save(out)
    with pytest.raises(InputError, match="already exists"):
        model.save(out)
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx"], "no temporary files left"
    saved = onnx.load(out)
    props = {p.key: p.value for p in saved.metadata_props}
    assert props["author"] == "someone", "existing metadata is kept"
    record = json.loads(props["graphopt"])
    assert record["passes"] == ["remove_dead"] and record["history"][-1]["passes"] == ["remove_dead"]


def test_external_data_round_trip(tmp_path):
    big = make([helper.make_node("Add", ["x", "w"], ["y"])], [fvi("x", [256, 256])], [fvi("y", [256, 256])],
               [init("w", np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32))])
    out = tmp_path / "ext.onnx"
    Model(big).save(out, external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size >= 256 * 256 * 4
    loaded = Model.load(out)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(loaded.initializers()["w"]),
                                  onnx.numpy_helper.to_array(big.graph.initializer[0]))


def test_subgraphs_custom_domains_functions_and_metadata_survive_a_round_trip(tmp_path):
    then_g = helper.make_graph([helper.make_node("Neg", ["x"], ["t"])], "then", [], [fvi("t", [2])])
    else_g = helper.make_graph([helper.make_node("Abs", ["x"], ["e"])], "else", [], [fvi("e", [2])])
    fn = helper.make_function("com.example", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("If", ["c"], ["i"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Twice", ["i"], ["y"], domain="com.example")]
    proto = make(nodes, [fvi("x", [2]), fvi("c", [], onnx.TensorProto.BOOL)], [fvi("y", [2])])
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    proto.functions.append(fn)
    src = tmp_path / "sub.onnx"
    onnx.save_model(proto, src)
    out = tmp_path / "again.onnx"
    Model.load(src).save(out)
    again = onnx.load(out)
    assert again.functions[0].name == "Twice"
    assert {o.domain: o.version for o in again.opset_import} == {"": 17, "com.example": 1}
    assert again.graph.node[0].attribute[0].g.node[0].op_type in ("Neg", "Abs")
    assert again.ir_version == proto.ir_version


def test_graphsurgeon_view_edits_a_copy_and_keeps_model_fields():
    proto = make([helper.make_node("Relu", ["x"], ["a"], name="r"), helper.make_node("Neg", ["a"], ["y"], name="n")],
                  [fvi("x", [2])], [fvi("y", [2])])
    proto.metadata_props.add(key="k", value="v")
    model = Model(proto)
    graph = model.to_graphsurgeon()
    graph.nodes[1].op = "Abs"
    edited = model.with_graphsurgeon(graph)
    onnx.checker.check_model(edited.proto)
    assert [n.op_type for n in edited.graph.node] == ["Relu", "Abs"]
    assert [n.op_type for n in model.graph.node] == ["Relu", "Neg"]
    assert edited.proto.metadata_props[0].value == "v" and edited.opset == 17


def test_from_proto_names_nodes_and_turns_constants_into_initializers_like_load():
    proto = _affine_model()
    proto.graph.node[2].name = proto.graph.node[3].name = "same"
    model = Model.from_proto(proto)
    assert [n.op_type for n in model.graph.node] == ["Mul", "Add"]
    assert {"k", "s", "w"} <= set(model.initializers())
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert len(proto.graph.node) == 4, "the caller's proto is left as it was"
