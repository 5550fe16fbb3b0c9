"""int4 weight-only quantization: blocked DequantizeLinear (opset 21) on constant weights.

A MatMul whose weight reads `DequantizeLinear(int4 W, scales, axis=0, block_size=B)` is what onnxruntime's CPU
provider turns into one MatMulNBits kernel (the weight stays 4-bit in memory, activations stay float). A Gather
over an embedding table takes the same blocked form along the hidden axis, which shrinks the file (onnxruntime
dequantizes it on every call, so this is for size, not speed). Weights are symmetric per block: values in
[-8, 7], no zero-point, and the scale max|block| x r / 7 with the clipping ratio r that gives the block the least
squared error.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...core.editing import add_initializer, all_names, drop_unused_initializers, unique_name
from ...core.model import Model

MIN_OPSET = 21  # int4 types and block_size in DequantizeLinear
BLOCK_SIZE = 32
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def blocked_int4(w: np.ndarray, axis: int, block_size: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(int8-held int4 values, float32 scales) of `w` (2-D), blocks of `block_size` along `axis`; the scales have
    w's shape with that axis divided (rounded up) by the block size."""
    moved = np.moveaxis(w.astype(np.float32), axis, 0)
    k = moved.shape[0]
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size,) + moved.shape[1:], np.float32)
    padded[:k] = moved
    grouped = padded.reshape(blocks, block_size, *moved.shape[1:])
    amax = np.abs(grouped).max(axis=1)
    scale = best_err = None
    for ratio in CLIP_RATIOS:  # per block, the clipping that gives the least squared error
        s = np.where(amax > 0, amax * ratio / 7.0, 1.0).astype(np.float32)
        err = ((np.clip(np.round(grouped / s[:, None]), -8, 7) * s[:, None] - grouped) ** 2).sum(axis=1)
        if scale is None:
            scale, best_err = s, err
        else:
            better = err < best_err
            scale, best_err = np.where(better, s, scale), np.where(better, err, best_err)
    q = np.clip(np.round(grouped / scale[:, None]), -8, 7).astype(np.int8).reshape(padded.shape)[:k]
    return np.moveaxis(q, 0, axis), np.moveaxis(scale, 0, axis)


def int4_tensor(name: str, q: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer: two values per byte, the first in the low nibble."""
    flat = (q.astype(np.int16).ravel() & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    t = onnx.TensorProto(name=name, data_type=onnx.TensorProto.INT4, dims=list(q.shape))
    t.raw_data = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    return t


def dequantized(w: np.ndarray, axis: int, block_size: int = BLOCK_SIZE) -> np.ndarray:
    """What the blocked int4 form of `w` dequantizes to (for error estimates without a session)."""
    q, scale = blocked_int4(w, axis, block_size)
    return q.astype(np.float32) * np.repeat(scale, block_size, axis=axis).take(range(w.shape[axis]), axis=axis)


def to_int4(model: Model, weights: dict[str, int], block_size: int = BLOCK_SIZE) -> Model:
    """A copy of `model` where each constant weight in `weights` ({initializer: block axis}) is stored as blocked
    int4 behind a DequantizeLinear; every reader reads the dequantized tensor. The model's opset must be >= 21."""
    if model.opset < MIN_OPSET:
        raise ValueError(f"int4 DequantizeLinear needs opset {MIN_OPSET}, the model has {model.opset}")
    out = model.copy()
    g = out.graph
    taken = all_names(g)
    inits = {t.name: t for t in g.initializer}
    dq_nodes, renamed = [], {}
    for name, axis in weights.items():
        w = numpy_helper.to_array(inits[name])
        q, scale = blocked_int4(w, axis, block_size)
        q_name = unique_name(f"{name}_int4", taken)
        g.initializer.append(int4_tensor(q_name, q))
        s_name = add_initializer(g, f"{name}_scale", scale, taken)
        renamed[name] = unique_name(f"{name}_dq", taken)
        dq_nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name], [renamed[name]],
                                         name=unique_name(f"{name}_DequantizeLinear", taken), axis=axis,
                                         block_size=block_size))
    for node in g.node:
        for i, x in enumerate(node.input):
            if x in renamed:
                node.input[i] = renamed[x]
    drop_unused_initializers(g, renamed)  # a float weight stays where a subgraph body still reads it
    nodes = dq_nodes + list(g.node)  # DQ of constants first: topological order holds
    del g.node[:]
    g.node.extend(nodes)
    return out


def to_opset(model: Model, opset: int) -> Model:
    """The model converted to `opset` with onnx's version converter (raises ValueError if it cannot)."""
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model.proto, opset)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises its own types
        raise ValueError(f"cannot convert the model to opset {opset}: {str(exc).splitlines()[0]}") from None
    return Model(converted, model.source)


def constant_tables(model: Model) -> list:
    """Gather nodes reading rows of a constant 2-D table (embeddings), as QuantSite records (macs holds
    the table's element count, weight_axis the axis the int4 blocks run along: the hidden one)."""
    from .sites import QuantSite

    inits = model.initializers()
    consts = model.constant_names()
    out = []
    for node in model.graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.input[0] not in consts:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        dims = list(inits[node.input[0]].dims)
        if axis == 0 and len(dims) == 2 and dims[1] >= BLOCK_SIZE:
            out.append(QuantSite(node.name, "Gather", node.input[1], node.input[0], 1, None, node.output[0],
                            macs=dims[0] * dims[1]))
    return out
