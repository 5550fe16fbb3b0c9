"""Dynamic int8 for MatMul/Gemm sites: the activation's scale is computed at run time.

The rewrite emits the form onnxruntime's CPU provider fuses into one DynamicQuantizeMatMul kernel:

    x -> DynamicQuantizeLinear -> (xq, x_scale, x_zp)
    MatMulInteger(xq, W_int8, x_zp, W_zp) -> Cast(float) -> Mul(x_scale * W_scale) [-> Add(bias)]

with W symmetric int8 per output column. No calibrated range is involved, so the activation's outliers (attention
masks, the big features of transformer MLPs) cost nothing in resolution: more accurate than static int8 and
slower, since each call scans its input once for the range. Sites reading the same tensor share one
DynamicQuantizeLinear.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ...core.editing import add_initializer, all_names, drop_unused_initializers, new_node, node_attrs, unique_name
from ...core.model import Model
from .sites import QuantSite
from .quant import quantize_weight, weight_qparams

DYNAMIC_OPS = ("MatMul", "Gemm")


def dynamic_reason(site: QuantSite, model: Model) -> str:
    """Why `site` cannot take the dynamic form (empty if it can)."""
    if site.reason:
        return site.reason
    if site.op_type not in DYNAMIC_OPS:
        return f"{site.op_type} has no dynamic int8 kernel here"
    return ""


def to_dynamic(model: Model, sites: list[QuantSite], codes: dict[str, np.ndarray] | None = None) -> Model:
    """A copy of `model` with every site in `sites` (MatMul/Gemm with constant weights) in dynamic int8. `codes`
    may give a site's int8 weight (stored layout, per-output-channel scales) from another rounding than nearest."""
    out = model.copy()
    g = out.graph
    taken = all_names(g)
    consts = out.initializers()
    by_name = {s.node: s for s in sites}
    quantized_inputs: dict[str, tuple[str, str, str]] = {}  # float tensor -> (xq, x_scale, x_zp)
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        return add_initializer(g, name, value, taken)

    def make(op, inputs, outputs, **attrs) -> onnx.NodeProto:
        return new_node(op, inputs, outputs, taken, **attrs)

    for node in g.node:
        s = by_name.get(node.name)
        if s is None:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in quantized_inputs:
            names = tuple(unique_name(f"{x}_{suffix}", taken) for suffix in ("dq_u8", "dq_scale", "dq_zp"))
            nodes.append(make("DynamicQuantizeLinear", [x], list(names)))
            quantized_inputs[x] = names
        xq, x_scale, x_zp = quantized_inputs[x]
        w = numpy_helper.to_array(consts[s.weight]).astype(np.float32)
        q_w = codes.get(s.node) if codes else None
        if s.op_type == "Gemm" and s.weight_axis == 0:  # transB: MatMulInteger wants [K, N]
            w, q_w = w.T, (q_w.T if q_w is not None else None)
        alpha = node_attrs(node).get("alpha", 1.0) if s.op_type == "Gemm" else 1.0
        if alpha != 1.0:  # MatMulInteger has no alpha: fold it into the weight (a site's C needs alpha 1)
            w, q_w = w * np.float32(alpha), None
        wq = weight_qparams(w, axis=1)
        scale = unique_name(f"{node.name}_scale", taken)
        nodes.append(make("Mul", [x_scale, const(f"{s.weight}_scale", wq.scale)], [scale]))
        acc = unique_name(f"{node.name}_int32", taken)
        q_w = q_w if q_w is not None else quantize_weight(w, wq)
        integer = make("MatMulInteger", [xq, const(f"{s.weight}_int8", q_w), x_zp,
                                         const(f"{s.weight}_zp", wq.zero_point)], [acc])
        integer.name = node.name  # the site keeps its name, so the report can say which kernel ORT fused it into
        nodes.append(integer)
        cast = unique_name(f"{node.name}_float", taken)
        nodes.append(make("Cast", [acc], [cast], to=onnx.TensorProto.FLOAT))
        y = node.output[0]
        if s.op_type == "Gemm" and s.bias is not None:
            product = unique_name(f"{node.name}_product", taken)
            nodes.append(make("Mul", [cast, scale], [product]))
            nodes.append(make("Add", [product, s.bias], [y]))
        else:
            nodes.append(make("Mul", [cast, scale], [y]))
    del g.node[:]
    g.node.extend(nodes)
    drop_unused_initializers(g, {s.weight for s in sites})  # the float weights the int8 copies replaced
    return out
