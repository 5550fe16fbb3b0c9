"""Insert QuantizeLinear/DequantizeLinear so that onnxruntime's CPU provider fuses them into integer kernels.

A *site* is a Conv, MatMul or Gemm with a constant weight. Putting a site in int8 means:
- its activation input and its output carry Q->DQ with uint8 asymmetric parameters from calibration;
- its weight becomes an int8 initializer (symmetric, per output channel) behind a DequantizeLinear;
- its bias becomes int32 with scale input_scale x weight_scale (the weight scale is raised where that would
  overflow);
- a Relu or Clip(0, max) right after it is absorbed into the output's quantization range (uint8 with zero-point 0
  clamps below 0, and the range ends at the clip's max), which is what lets ORT fuse DQ->Conv->Q; not when the
  activation's output is a graph output, which stays float (then nothing would clamp it).
Ops between int8 sites follow: data-movement ops whose input is quantized keep the input's parameters (ORT drops
their Q/DQ), and Add/Mul/Concat/pooling with every input quantized get their own output parameters (QLinearAdd,
QLinearConcat, ...); a Relu or Clip(0, max) that alone reads such an op's output is absorbed into that op's output
range as it is for a site (otherwise ORT keeps a DQ->Q requantization, or a float Relu and pooling, after it).
uint8 activations avoid the signed-int8 fan-out trap: a quantized tensor with several
readers still fuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...core.editing import (add_initializer, all_names, drop_stale_value_info, drop_unused_initializers, new_node,
                             node_attrs, unique_name)
from ...core.model import Model
from .quant import QParams, activation_qparams, guard_bias_overflow, quantize_bias, quantize_weight, weight_qparams

SAME_SCALE_OPS = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}
OWN_SCALE_OPS = {"Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool"}
MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear


@dataclass
class QuantSite:
    """A Conv/MatMul/Gemm the qdq pass may put in int8: its tensors, the activation it may absorb, its cost."""

    node: str
    op_type: str
    activation: str  # the input tensor to quantize
    weight: str
    weight_axis: int  # output-channel axis of the weight
    bias: str | None
    output: str  # the node's own output
    absorbed: str | None = None  # a Relu/Clip right after, absorbed into the output range when int8
    absorbed_max: float | None = None  # Clip's max
    effective_output: str = ""  # absorbed node's output, else `output`
    macs: int = 0
    in_channels: int = 0  # size of the activation's channel axis (axis 1)
    reason: str = ""  # why the site cannot be quantized (empty if it can)


@dataclass
class QuantPlan:
    """Which tensors carry Q/DQ and with what parameters, for a given set of int8 sites."""

    int8_sites: set[str]
    tensors: dict[str, QParams] = field(default_factory=dict)
    bias_adjusted: dict[str, int] = field(default_factory=dict)
    bias_shift: dict[str, np.ndarray] = field(default_factory=dict)  # subtracted from int8 sites' biases
    followers: dict[str, str] = field(default_factory=dict)  # Add/Mul/Concat/pool node -> Relu/Clip it absorbs


def find_sites(model: Model) -> list[QuantSite]:
    """Every Conv/MatMul/Gemm with a constant weight, with the reason if it cannot be quantized."""
    g = model.graph
    consts = {n: t for n, t in model.initializers().items() if n in model.constant_names()}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in g.output}
    sites = []
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        attrs = node_attrs(node)
        weight = node.input[1] if len(node.input) > 1 else ""
        site = QuantSite(node.name, node.op_type, node.input[0], weight, 0, None, node.output[0])
        if weight not in consts:
            site.reason = "weight is not a constant initializer"
        elif node.input[0] in consts:
            site.reason = "activation input is constant"
        w_shape = tuple(consts[weight].dims) if weight in consts else ()
        if node.op_type == "Conv":
            site.weight_axis = 0
            site.bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            site.in_channels = w_shape[1] * attrs.get("group", 1) if w_shape else 0
        elif node.op_type == "MatMul":
            site.weight_axis = 1
            if len(w_shape) != 2 and not site.reason:
                site.reason = f"MatMul weight has rank {len(w_shape)}, expected 2"
        else:  # Gemm
            site.weight_axis = 0 if attrs.get("transB", 0) else 1
            site.in_channels = w_shape[1 - site.weight_axis] if w_shape else 0
            if attrs.get("transA", 0) and not site.reason:
                site.reason = "Gemm with transA"
            c = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if c is not None:
                c_shape = tuple(consts[c].dims) if c in consts else None
                n_out = w_shape[site.weight_axis] if w_shape else None
                if c_shape == (n_out,) and attrs.get("beta", 1.0) == 1.0 and attrs.get("alpha", 1.0) == 1.0:
                    site.bias = c
                elif not site.reason:
                    site.reason = "Gemm bias is not a constant vector with alpha = beta = 1"
        if site.bias is not None and site.bias not in consts and not site.reason:
            site.reason = "bias is not a constant initializer"
        follow = readers.get(node.output[0], [])
        if len(follow) == 1 and node.output[0] not in outputs:
            act = follow[0]
            clip_max = _clip_max(act, consts) if act.op_type == "Clip" else None
            # a graph output stays float, so a Relu/Clip writing one is not absorbed: it must still clamp
            if (act.op_type == "Relu" or (act.op_type == "Clip" and clip_max is not None)) \
                    and act.output[0] not in outputs:
                site.absorbed, site.absorbed_max = act.name, clip_max
                site.effective_output = act.output[0]
        site.effective_output = site.effective_output or site.output
        if site.effective_output in outputs and node.op_type == "Conv" and not site.reason:
            # Conv fuses only as DQ->Conv->Q, and a graph output stays float; MatMul/Gemm fuse with a float output
            site.reason = "its output is a graph output (kept in float)"
        if w_shape:
            site.macs = int(np.prod(w_shape))
        sites.append(site)
    return sites


def _clip_max(node: onnx.NodeProto, consts) -> float | None:
    """The max of a Clip whose min is 0 (so uint8 with zero-point 0 implements it), else None."""
    lo = numpy_helper.to_array(consts[node.input[1]]) if len(node.input) > 1 and node.input[1] in consts else None
    hi = numpy_helper.to_array(consts[node.input[2]]) if len(node.input) > 2 and node.input[2] in consts else None
    attrs = node_attrs(node)
    lo = float(lo) if lo is not None else attrs.get("min")
    hi = float(hi) if hi is not None else attrs.get("max")
    return float(hi) if lo == 0.0 and hi is not None else None


def tensors_to_quantize(model: Model, sites: list[QuantSite], int8: set[str]) -> dict[str, str]:
    """Tensor -> how its parameters are found: 'own' (its calibrated range) or 'same:<tensor>' (copy).

    Int8 sites quantize their input and effective output; follower ops extend the integer region. A graph output
    keeps its float value: it carries Q/DQ only for the nodes that read it, and none when nothing does.
    """
    return _tensors_and_followers(model, sites, int8)[0]


def _follower_activations(model: Model) -> dict[str, tuple[onnx.NodeProto, float | None]]:
    """OWN_SCALE_OPS node -> the Relu/Clip(0, max) that is the only reader of its output, with the clip's max.
    Neither output may be a graph output (a graph output stays float, so the activation must still clamp)."""
    consts = {n: t for n, t in model.initializers().items() if n in model.constant_names()}
    outputs = {o.name for o in model.graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in OWN_SCALE_OPS:
            continue
        follow = readers.get(node.output[0], [])
        if len(follow) != 1 or node.output[0] in outputs or follow[0].output[0] in outputs:
            continue
        act = follow[0]
        clip_max = _clip_max(act, consts) if act.op_type == "Clip" else None
        if act.op_type == "Relu" or (act.op_type == "Clip" and clip_max is not None):
            found[node.name] = (act, clip_max)
    return found


def _tensors_and_followers(model: Model, sites: list[QuantSite], int8: set[str]):
    """tensors_to_quantize's plan, and the follower activations absorbed for it ({node: (activation, max)})."""
    outputs = {o.name for o in model.graph.output}
    read = {i for n in model.graph.node for i in n.input}
    by_name = {s.node: s for s in sites}
    absorbed = {by_name[s].absorbed for s in int8 if by_name[s].absorbed}
    plan: dict[str, str] = {}
    for name in int8:
        s = by_name[name]
        plan.setdefault(s.activation, "own")
        plan[s.effective_output] = "own"
    consts = model.constant_names()
    candidates = _follower_activations(model)
    followers = {}
    for node in model.graph.node:  # topological order: followers see their inputs' decisions first
        if node.name in absorbed or node.domain not in ("", "ai.onnx"):
            continue
        acts = [i for i in node.input if i and i not in consts]
        if not acts or not all(a in plan for a in acts):
            continue
        out = node.output[0]
        if node.op_type in SAME_SCALE_OPS and len(acts) == 1:
            plan.setdefault(out, f"same:{acts[0]}")
        elif node.op_type in OWN_SCALE_OPS:
            if node.name in candidates:  # it writes its Relu/Clip's output, quantized from that tensor's range
                act = candidates[node.name][0]
                absorbed.add(act.name)
                followers[node.name] = candidates[node.name]
                out = act.output[0]
            plan.setdefault(out, "own")
    return {t: how for t, how in plan.items() if t not in outputs or t in read}, followers


def needed_statistics(model: Model, sites: list[QuantSite]) -> list[str]:
    """Tensors whose ranges any int8 assignment may need."""
    usable = {s.node for s in sites if not s.reason}
    plan = tensors_to_quantize(model, sites, usable)
    return sorted(t for t, how in plan.items() if how == "own")


def make_plan(model: Model, sites: list[QuantSite], int8: set[str],
              ranges: dict[str, tuple[float, float]]) -> QuantPlan:
    how, followers = _tensors_and_followers(model, sites, int8)
    by_name = {s.node: s for s in sites}
    caps = {by_name[s].effective_output: by_name[s].absorbed_max for s in int8 if by_name[s].absorbed}
    caps.update({act.output[0]: clip_max for act, clip_max in followers.values()})
    plan = QuantPlan(set(int8), followers={n: act.name for n, (act, _) in followers.items()})
    for tensor in sorted(how, key=lambda t: how[t] != "own"):  # own ranges first, copies after
        rule = how[tensor]
        if rule == "own":
            if tensor not in ranges:
                raise KeyError(f"no calibration range for tensor {tensor!r}")
            lo, hi = ranges[tensor]
            if tensor in caps:  # absorbed Relu/Clip: the range starts at 0 and stops at the clip's max
                lo = 0.0
                hi = min(hi, caps[tensor]) if caps[tensor] is not None else hi
            plan.tensors[tensor] = activation_qparams(lo, hi)
    for tensor, rule in how.items():
        if rule.startswith("same:"):
            src = rule[5:]
            while src not in plan.tensors and how.get(src, "").startswith("same:"):
                src = how[src][5:]
            plan.tensors[tensor] = plan.tensors[src]
    return plan


def rewrite(model: Model, sites: list[QuantSite], plan: QuantPlan, codes: dict[str, np.ndarray] | None = None,
            not_float: set[str] = frozenset()) -> Model:
    """A new model with the plan's Q/DQ nodes, int8 weights and int32 biases. `codes` may give a site's int8
    weight (stored layout, the per-channel scales of `weight_qparams`) from another rounding than nearest;
    `not_float` names sites outside the plan that another rewrite quantizes (dynamic, int4)."""
    out = model.copy()
    g = out.graph
    taken = all_names(g)
    by_name = {s.node: s for s in sites}
    consts = out.initializers()
    new_nodes: dict[str, list[onnx.NodeProto]] = {}  # inserted before the node with this name
    drop = {by_name[s].absorbed for s in plan.int8_sites if by_name[s].absorbed} | set(plan.followers.values())
    act_output = {n.name: n.output[0] for n in g.node if n.name in plan.followers.values()}

    def const(name: str, value: np.ndarray) -> str:
        return add_initializer(g, name, value, taken)

    def node(op, inputs, outputs, before, **attrs):
        new_nodes.setdefault(before, []).append(new_node(op, inputs, outputs, taken, **attrs))

    float_readers = {}  # float Conv/Gemm site -> its own per-channel DQ of a quantized input
    for node_proto in g.node:
        s = by_name.get(node_proto.name)
        if s is not None and s.node not in plan.int8_sites and s.node not in not_float and not s.reason \
                and s.activation in plan.tensors and s.op_type in ("Conv", "Gemm") and s.in_channels:
            float_readers[s.node] = s
        if node_proto.name in plan.followers:  # writes its absorbed Relu/Clip's output directly
            node_proto.output[0] = act_output[plan.followers[node_proto.name]]
        if s is None or s.node not in plan.int8_sites:
            continue
        w = numpy_helper.to_array(consts[s.weight]).astype(np.float32)
        wq = weight_qparams(w, s.weight_axis)
        x_scale = float(plan.tensors[s.activation].scale)
        raised = 0
        if s.bias is not None:
            b = numpy_helper.to_array(consts[s.bias]).astype(np.float32)
            if s.node in plan.bias_shift:
                b = (b - plan.bias_shift[s.node]).astype(np.float32)
            wq, raised = guard_bias_overflow(b, x_scale, wq)
            if raised:
                plan.bias_adjusted[s.node] = raised
            b_int, b_scale = quantize_bias(b, x_scale, wq)
            b_out = unique_name(f"{s.bias}_dq", taken)
            node("DequantizeLinear", [const(f"{s.bias}_int32", b_int), const(f"{s.bias}_scale", b_scale),
                                      const(f"{s.bias}_zp", np.zeros(b_scale.shape, np.int32))],
                 [b_out], node_proto.name, axis=0)
            node_proto.input[2] = b_out
        w_out = unique_name(f"{s.weight}_dq", taken)
        q_w = codes[s.node] if codes and s.node in codes and not raised else quantize_weight(w, wq)
        node("DequantizeLinear", [const(f"{s.weight}_int8", q_w),
                                  const(f"{s.weight}_scale", wq.scale), const(f"{s.weight}_zp", wq.zero_point)],
             [w_out], node_proto.name, axis=s.weight_axis)
        node_proto.input[1] = w_out
        if s.absorbed:  # the site writes the absorbed activation's output directly
            node_proto.output[0] = s.effective_output

    # Q -> DQ after every planned tensor; its readers (except the Q) read the DQ output.
    replacements = {}
    for tensor, q in plan.tensors.items():
        scale = const(f"{tensor}_scale", q.scale)
        zp = const(f"{tensor}_zp", q.zero_point)
        q_out, dq_out = unique_name(f"{tensor}_q", taken), unique_name(f"{tensor}_dq", taken)
        replacements[tensor] = (helper.make_node("QuantizeLinear", [tensor, scale, zp], [q_out],
                                                 name=unique_name(f"{tensor}_QuantizeLinear", taken)),
                                helper.make_node("DequantizeLinear", [q_out, scale, zp], [dq_out],
                                                 name=unique_name(f"{tensor}_DequantizeLinear", taken)), dq_out)
    # onnxruntime quantizes the float weight of a Conv/Gemm that reads a per-tensor DQ and feeds a Q
    # (WeightBiasQuantization). A site meant to stay float reads its input through a per-channel DQ with the same
    # parameters repeated: numerically identical, and outside that rewrite's pattern.
    own_dq = {}
    for name, s in float_readers.items():
        q = plan.tensors[s.activation]
        q_out = replacements[s.activation][0].output[0]
        out_name = unique_name(f"{s.activation}_dq_float", taken)
        node("DequantizeLinear", [q_out, const(f"{s.activation}_scale_pc", np.full(s.in_channels, q.scale, np.float32)),
                                  const(f"{s.activation}_zp_pc", np.full(s.in_channels, q.zero_point, np.uint8))],
             [out_name], name, axis=1)
        own_dq[name] = out_name
    graph_inputs = {i.name for i in g.input}
    ordered: list[onnx.NodeProto] = []
    for tensor in graph_inputs & set(replacements):
        ordered.extend(replacements[tensor][:2])
    for node_proto in g.node:
        if node_proto.name in drop:
            continue
        ordered.extend(new_nodes.get(node_proto.name, []))
        for i, name in enumerate(node_proto.input):
            if name in replacements:
                node_proto.input[i] = replacements[name][2]
        if node_proto.name in own_dq:
            node_proto.input[0] = own_dq[node_proto.name]
        ordered.append(node_proto)
        for name in node_proto.output:
            if name in replacements:
                ordered.extend(replacements[name][:2])
    del g.node[:]
    g.node.extend(ordered)
    drop_unused_initializers(g)
    drop_stale_value_info(g)
    return Model(out.proto, model.source)

