"""Exact cleanup rewrites: fold BatchNormalization, drop Identity/Dropout, fold constants, remove dead code.

Each pass works on the top-level graph only; nodes with subgraphs and nodes in custom domains pass through
untouched (their outer-scope reads still count as uses, so nothing they need is removed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...core.editing import (all_names, drop_stale_value_info, drop_unused_initializers, has_subgraph, live_tensors,
                             node_attrs, node_inputs, rename_output, replace_input, set_attr, unique_name)
from ...core.model import Model
from ...core.shapes import tensor_infos
from ..base import Context, Decision, Pass, PassResult, register

DEFAULT_DOMAINS = ("", "ai.onnx")


def _copy(model: Model) -> tuple[Model, onnx.GraphProto]:
    out = model.copy()
    return out, out.proto.graph


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node_inputs(node):
            readers.setdefault(name, []).append(node)
    return readers


def _drop_nodes(graph: onnx.GraphProto, indices: set[int]) -> None:
    """Remove nodes by position (protobuf wrappers have no stable identity to key on)."""
    keep = [n for i, n in enumerate(graph.node) if i not in indices]
    del graph.node[:]
    graph.node.extend(keep)


def _copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def _constants(model: Model) -> dict[str, onnx.TensorProto]:
    names = model.constant_names()
    return {name: t for name, t in model.initializers().items() if name in names}


# ============================================================================ BatchNormalization folding
@register
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold an inference BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it."""

    name = "fold_batchnorm"
    description = "fold BatchNormalization into the preceding Conv / ConvTranspose / Gemm (exact)"

    def run(self, model: Model, ctx: Context) -> PassResult:
        out, graph = _copy(model)
        consts = _constants(out)
        readers = _consumers(graph)
        producer = {o: n for n in graph.node for o in n.output}
        outputs = {o.name for o in graph.output}
        taken = all_names(graph)
        decisions, removed, new_inits = [], set(), []
        for index, bn in enumerate(graph.node):
            if bn.op_type != "BatchNormalization" or bn.domain not in DEFAULT_DOMAINS:
                continue
            prev = producer.get(bn.input[0])
            reason = _why_not_foldable(bn, prev, consts, readers, outputs)
            if reason:
                decisions.append(Decision(bn.name, "skipped", reason))
                continue
            scale, shift = _bn_affine(bn, consts)
            folded = _fold_into(prev, scale, shift, consts, taken)
            if isinstance(folded, str):
                decisions.append(Decision(bn.name, "skipped", folded))
                continue
            new_inits.extend(folded)
            consts.update((t.name, t) for t in folded)
            # The producer now writes the BN's output directly; the BN node goes away.
            prev.output[0] = bn.output[0]
            producer[bn.output[0]] = prev  # a BN right after this one can fold into the same node
            removed.add(index)
            decisions.append(Decision(bn.name, "folded", f"into {prev.op_type} {prev.name}"))
        if not removed:
            return PassResult(model, False, {"folded": 0}, decisions)
        _drop_nodes(graph, removed)
        graph.initializer.extend(new_inits)
        drop_unused_initializers(graph)
        drop_stale_value_info(graph)
        return PassResult(out, True, {"folded": len(removed)}, decisions)


def _why_not_foldable(bn, prev, consts, readers, outputs) -> str:
    attrs = node_attrs(bn)
    if attrs.get("training_mode", 0):
        return "BatchNormalization is in training mode"
    if len([o for o in bn.output if o]) > 1:
        return "BatchNormalization exposes its running statistics (training outputs)"
    if any(name not in consts for name in bn.input[1:5]):
        return "BatchNormalization parameters are not constant initializers"
    if prev is None:
        return "input is not produced by a node"
    if prev.op_type not in ("Conv", "ConvTranspose", "Gemm") or prev.domain not in DEFAULT_DOMAINS:
        return f"preceded by {prev.op_type}, not Conv/ConvTranspose/Gemm"
    if len(readers.get(prev.output[0], [])) != 1 or prev.output[0] in outputs:
        return f"the output of {prev.name} is also used elsewhere"
    if prev.input[1] not in consts or (len(prev.input) > 2 and prev.input[2] and prev.input[2] not in consts):
        return f"{prev.name} weights are not constant initializers"
    if prev.op_type == "Gemm" and (node_attrs(prev).get("transA", 0) or len(consts[prev.input[1]].dims) != 2):
        return "Gemm with transA is not folded"
    return ""


def _bn_affine(bn, consts) -> tuple[np.ndarray, np.ndarray]:
    """BN(x) = scale * x + shift, computed in float64 with the node's own epsilon."""
    gamma, beta, mean, var = (numpy_helper.to_array(consts[n]).astype(np.float64) for n in bn.input[1:5])
    eps = node_attrs(bn).get("epsilon", 1e-5)
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def _fold_into(prev, scale, shift, consts, taken) -> list[onnx.TensorProto] | str:
    """Rescale prev's weight and bias so its output equals BN(prev output). Returns new initializers."""
    w_proto = consts[prev.input[1]]
    w = numpy_helper.to_array(w_proto)
    dtype = w.dtype
    if not np.issubdtype(dtype, np.floating):
        return f"{prev.name} weights are {dtype}, not float"
    w64 = w.astype(np.float64)
    has_bias = len(prev.input) > 2 and prev.input[2] != ""
    bias = numpy_helper.to_array(consts[prev.input[2]]).astype(np.float64) if has_bias else None
    channels = scale.shape[0]
    if prev.op_type == "Conv":
        if w.shape[0] != channels:
            return "channel count of Conv and BatchNormalization differ"
        w64 = w64 * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        bias = shift if bias is None else bias * scale + shift
    elif prev.op_type == "ConvTranspose":
        group = node_attrs(prev).get("group", 1)
        cin, cout_g = w.shape[0], w.shape[1]
        if cout_g * group != channels:
            return "channel count of ConvTranspose and BatchNormalization differ"
        # weight is [Cin, Cout/group, k...]; output channel g*Cout/group + j lives at [g-th input block, j]
        grouped = w64.reshape((group, cin // group, cout_g) + w.shape[2:])
        grouped = grouped * scale.reshape((group, 1, cout_g) + (1,) * (w.ndim - 2))
        w64 = grouped.reshape(w.shape)
        bias = shift if bias is None else bias * scale + shift
    else:  # Gemm: Y = alpha * A @ B' + beta * C, BN over the last axis
        attrs = node_attrs(prev)
        alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
        trans_b = attrs.get("transB", 0)
        if (w.shape[0] if trans_b else w.shape[1]) != channels:
            return "feature count of Gemm and BatchNormalization differ"
        w64 = alpha * w64 * (scale[:, None] if trans_b else scale[None, :])
        c = beta * bias if bias is not None else 0.0
        bias = np.broadcast_to(c * scale + shift, np.broadcast_shapes(np.shape(c), scale.shape)).copy()
        set_attr(prev, "alpha", 1.0)
        set_attr(prev, "beta", 1.0)
    w_name = unique_name(f"{prev.input[1]}_bnfold", taken)
    b_name = unique_name(f"{prev.name}_bias_bnfold", taken)
    prev.input[1] = w_name
    if has_bias:
        prev.input[2] = b_name
    else:
        prev.input.append(b_name)
    return [numpy_helper.from_array(w64.astype(dtype), w_name), numpy_helper.from_array(bias.astype(dtype), b_name)]


# ============================================================================ Identity / Dropout removal
@register
@dataclass(frozen=True)
class RemoveIdentity(Pass):
    """Remove Identity nodes and Dropout nodes that are in inference mode."""

    name = "remove_identity"
    description = "remove Identity and inference-mode Dropout (exact)"

    def run(self, model: Model, ctx: Context) -> PassResult:
        out, graph = _copy(model)
        consts = _constants(out)
        graph_inputs = {i.name for i in graph.input} | {t.name for t in graph.initializer}
        decisions, removed = [], set()
        for index, node in enumerate(graph.node):
            if node.op_type not in ("Identity", "Dropout") or node.domain not in DEFAULT_DOMAINS:
                continue
            reason = _why_not_removable(node, out.opset, consts)
            outputs = {o.name for o in graph.output}
            src, dst = node.input[0], node.output[0]
            if not reason and dst in outputs and (src in graph_inputs or src in outputs):
                reason = "it connects a graph input or output straight to a graph output"
            if reason:
                decisions.append(Decision(node.name, "skipped", reason))
                continue
            if dst in outputs:  # keep the graph output's name: the producer of src writes dst directly
                rename_output(graph, src, dst)
            else:
                replace_input(graph, dst, src)
            removed.add(index)
            decisions.append(Decision(node.name, "removed", node.op_type))
        if not removed:
            return PassResult(model, False, {"removed": 0}, decisions)
        _drop_nodes(graph, removed)
        drop_stale_value_info(graph)
        drop_unused_initializers(graph)
        return PassResult(out, True, {"removed": len(removed)}, decisions)


def _why_not_removable(node, opset: int, consts) -> str:
    if node.op_type == "Identity":
        return ""
    if len(node.output) > 1 and node.output[1]:
        return "Dropout's mask output is used"
    attrs = node_attrs(node)
    if opset < 7 and not attrs.get("is_test", 0):
        return "Dropout is in training mode (is_test=0)"
    if len(node.input) > 2 and node.input[2]:
        mode = node.input[2]
        if mode not in consts:
            return "Dropout's training_mode is decided at run time"
        if bool(numpy_helper.to_array(consts[mode])):
            return "Dropout is in training mode"
    return ""


# ============================================================================ constant folding
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli"}
MAX_GROWTH_BYTES = 1 << 20  # do not fold a node whose output is over 1 MiB and larger than its inputs


@register
@dataclass(frozen=True)
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constants and store their outputs as initializers."""

    name = "fold_constants"
    description = "precompute nodes whose inputs are all constant (exact)"

    def run(self, model: Model, ctx: Context) -> PassResult:
        from onnx.reference import ReferenceEvaluator

        out, graph = _copy(model)
        values = {name: numpy_helper.to_array(t) for name, t in _constants(out).items()}
        static_shapes = _static_shapes(out)
        outputs = {o.name for o in graph.output}
        opsets = {o.domain: o.version for o in out.proto.opset_import}
        decisions, folded = [], {}
        for index, node in enumerate(graph.node):
            if node.domain not in DEFAULT_DOMAINS or has_subgraph(node) or node.op_type in NONDETERMINISTIC:
                continue
            if any(o in outputs for o in node.output):
                continue
            if node.op_type == "Shape" and node.input[0] in static_shapes:
                result = [_shape_value(node, static_shapes[node.input[0]])]
            elif node.input and all(i == "" or i in values for i in node.input):
                try:
                    result = _evaluate(ReferenceEvaluator, node, values, opsets)
                except Exception as exc:  # an op the evaluator lacks: leave it to onnxruntime
                    decisions.append(Decision(node.name, "skipped", f"could not evaluate: {type(exc).__name__}"))
                    continue
            else:
                continue
            in_bytes = sum(values[i].nbytes for i in node.input if i in values)
            if any(not isinstance(r, np.ndarray) for r in result):
                continue
            if sum(r.nbytes for r in result) > max(MAX_GROWTH_BYTES, in_bytes):
                decisions.append(Decision(node.name, "skipped", "result would grow the model by over 1 MiB"))
                continue
            for name, value in zip(node.output, result):
                if name:
                    values[name] = value
            folded[index] = node
        if not folded:
            return PassResult(model, False, {"folded": 0}, decisions)
        folded_nodes = [_copy_node(n) for n in folded.values()]
        _drop_nodes(graph, set(folded))
        for node in folded_nodes:
            for name in node.output:
                if name:
                    graph.initializer.append(numpy_helper.from_array(values[name], name))
            decisions.append(Decision(node.name, "folded", node.op_type))
        drop_unused_initializers(graph)
        drop_stale_value_info(graph)
        return PassResult(out, True, {"folded": len(folded)}, decisions)


def _evaluate(evaluator_cls, node, values, opsets) -> list:
    inputs = [i for i in node.input if i]
    graph = helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(o, 0, None) for o in node.output
                                                   if o],
                              initializer=[numpy_helper.from_array(values[i], i) for i in dict.fromkeys(inputs)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    return list(evaluator_cls(model).run(None, {}))


def _static_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    return {name: info.shape for name, info in tensor_infos(model.proto).items()
            if info.shape is not None and all(isinstance(d, int) and d > 0 for d in info.shape)}


def _shape_value(node, shape) -> np.ndarray:
    attrs = node_attrs(node)
    start, end = attrs.get("start", 0), attrs.get("end", None)
    return np.array(shape[start:end], dtype=np.int64)


# ============================================================================ dead code
@register
@dataclass(frozen=True)
class RemoveDead(Pass):
    """Remove nodes no graph output depends on, and initializers nothing reads."""

    name = "remove_dead"
    description = "remove nodes and initializers that no output depends on (exact)"

    def run(self, model: Model, ctx: Context) -> PassResult:
        out, graph = _copy(model)
        _, keep = live_tensors(graph)
        dead = [n for n, k in zip(graph.node, keep) if not k]
        live_nodes = [n for n, k in zip(graph.node, keep) if k]
        del graph.node[:]
        graph.node.extend(live_nodes)
        n_init = drop_unused_initializers(graph)
        drop_stale_value_info(graph)
        decisions = [Decision(n.name, "removed", f"dead {n.op_type}") for n in dead]
        if n_init:
            decisions.append(Decision("initializers", "removed", f"{n_init} unused"))
        changed = bool(dead or n_init)
        return PassResult(out if changed else model, changed, {"nodes": len(dead), "initializers": n_init},
                          decisions)


DEFAULT_RECIPE = ("remove_identity", "fold_constants", "fold_batchnorm", "remove_dead")
