"""int4 weight-only quantization in the two forms onnxruntime runs without dequantizing a whole weight.

- A MatMul with a constant [K, N] weight becomes com.microsoft `MatMulNBits`: the weight stays 4-bit in memory
  (blocks of 32 along K, one scale each), activations stay float. At `accuracy_level` 4 the kernel also rounds the
  activations to int8 per block (the fast path on AVX2); the sensitivity is measured through the same kernel, so
  it includes that rounding.
- A Gather over a constant [V, H] table (embeddings) becomes com.microsoft `GatherBlockQuantized`, which
  dequantizes only the rows it gathers. (The standard form, DequantizeLinear -> Gather, dequantizes the whole
  table on every call: that made int4 MiniLM 3x slower than fp32.)

Both read two nibbles per uint8 with the implicit zero point 8, so no opset conversion is needed. Weights are
symmetric per block, values in [-8, 7], scale max|block| x r / 7 with the clipping ratio r that gives the block
the least squared error (or scales and values from GPTQ rounding, see gptq.py).
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from ...core.editing import add_initializer, all_names, drop_unused_initializers
from ...core.model import Model
from .sites import QuantSite

BLOCK_SIZE = 32
ACCURACY_LEVELS = (0, 1, 4)  # MatMulNBits compute type on the CPU: 0/1 fp32, 4 int8 activations
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
MS_DOMAIN = "com.microsoft"


def _blocks(w: np.ndarray, axis: int, block_size: int) -> tuple[np.ndarray, int]:
    """w (2-D) with `axis` moved first, zero-padded to whole blocks, as [blocks, block_size, other]; and its
    original length along `axis`."""
    moved = np.moveaxis(w.astype(np.float32), axis, 0)
    k = moved.shape[0]
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size,) + moved.shape[1:], np.float32)
    padded[:k] = moved
    return padded.reshape(blocks, block_size, *moved.shape[1:]), k


def block_scales(w: np.ndarray, axis: int, block_size: int = BLOCK_SIZE) -> np.ndarray:
    """float32 scales of `w` (2-D), one per block of `block_size` along `axis` and per position on the other axis
    ([blocks, other] with axis 0, [other, blocks] with axis 1): for each block the clipping ratio with the least
    squared round-to-nearest error."""
    grouped, _ = _blocks(w, axis, block_size)
    amax = np.abs(grouped).max(axis=1)
    scale = best_err = None
    for ratio in CLIP_RATIOS:
        s = np.where(amax > 0, amax * ratio / 7.0, 1.0).astype(np.float32)
        err = ((np.clip(np.round(grouped / s[:, None]), -8, 7) * s[:, None] - grouped) ** 2).sum(axis=1)
        if scale is None:
            scale, best_err = s, err
        else:
            better = err < best_err
            scale, best_err = np.where(better, s, scale), np.where(better, err, best_err)
    return np.moveaxis(scale, 0, axis)


def expand_scales(scale: np.ndarray, axis: int, length: int, block_size: int = BLOCK_SIZE) -> np.ndarray:
    """Block scales repeated to one per element along `axis` (cut to `length`)."""
    return np.repeat(scale, block_size, axis=axis).take(range(length), axis=axis)


def blocked_int4(w: np.ndarray, axis: int, block_size: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(int8-held int4 values shaped like w, float32 block scales) by round-to-nearest."""
    scale = block_scales(w, axis, block_size)
    full = expand_scales(scale, axis, w.shape[axis], block_size)
    return np.clip(np.round(w / full), -8, 7).astype(np.int8), scale


def dequantized(w: np.ndarray, axis: int, block_size: int = BLOCK_SIZE) -> np.ndarray:
    """What the round-to-nearest int4 form of `w` dequantizes to."""
    q, scale = blocked_int4(w, axis, block_size)
    return q.astype(np.float32) * expand_scales(scale, axis, w.shape[axis], block_size)


def pack_nibbles(q: np.ndarray, block_size: int = BLOCK_SIZE) -> np.ndarray:
    """int4 values [rows, k] (in [-8, 7]) as uint8 [rows, blocks, block_size / 2]: value + 8, the first of each pair
    in the low nibble, k zero-padded to whole blocks (the padding stores the zero point, i.e. 0.0)."""
    rows, k = q.shape
    blocks = -(-k // block_size)
    u = np.full((rows, blocks * block_size), 8, np.uint8)
    u[:, :k] = (q.astype(np.int16) + 8).astype(np.uint8)
    u = u.reshape(rows, blocks, block_size)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def to_int4(model: Model, sites: list[QuantSite], *, accuracy_level: int = 4, block_size: int = BLOCK_SIZE,
            codes: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Model:
    """A copy of `model` with each site in `sites` (MatMul with a constant 2-D weight, or Gather over a constant
    table, see `constant_tables`) in its int4 form. `codes` may give a site's (int4 values, block scales) from
    another rounding (shaped as `blocked_int4` returns them); the others are rounded to nearest. The nodes keep
    the sites' names, so the report can name the kernels onnxruntime runs."""
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"int4 accuracy level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")
    out = model.copy()
    g = out.graph
    taken = all_names(g)
    inits = {t.name: t for t in g.initializer}
    by_name = {s.node: s for s in sites}
    replaced, nodes = set(), []
    for node in g.node:
        s = by_name.get(node.name)
        if s is None:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[s.weight]).astype(np.float32)
        axis = 0 if s.op_type == "MatMul" else 1  # blocks along K for a MatMul, along the hidden axis for a table
        q, scale = (codes or {}).get(s.node) or blocked_int4(w, axis, block_size)
        rows = q.T if axis == 0 else q  # MatMulNBits stores B transposed: [N, K]
        per_row_scale = scale.T if axis == 0 else scale
        packed = pack_nibbles(rows, block_size)
        if s.op_type == "MatMul":
            packed = add_initializer(g, f"{s.weight}_int4", packed, taken)
            scales = add_initializer(g, f"{s.weight}_int4_scale", per_row_scale.astype(np.float32).ravel(), taken)
            k, n = w.shape
            new = helper.make_node("MatMulNBits", [node.input[0], packed, scales], list(node.output), name=node.name,
                                   domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=block_size,
                                   accuracy_level=accuracy_level)
        else:  # GatherBlockQuantized reads the packed bytes as [V, H / 2]
            packed = add_initializer(g, f"{s.weight}_int4", packed.reshape(w.shape[0], -1), taken)
            scales = add_initializer(g, f"{s.weight}_int4_scale", per_row_scale.astype(np.float32), taken)
            gather_axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            new = helper.make_node("GatherBlockQuantized", [packed, node.input[1], scales], list(node.output),
                                   name=node.name, domain=MS_DOMAIN, gather_axis=gather_axis, quantize_axis=1,
                                   block_size=block_size, bits=4)
        nodes.append(new)
        replaced.add(s.weight)
    del g.node[:]
    g.node.extend(nodes)
    drop_unused_initializers(g, replaced)  # a float weight stays where something else still reads it
    if replaced and not any(o.domain == MS_DOMAIN for o in out.proto.opset_import):
        out.proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out


def int4_reason(site: QuantSite, model: Model, block_size: int = BLOCK_SIZE) -> str:
    """Why a MatMul site cannot take the int4 form (empty if it can)."""
    if site.reason:
        return site.reason
    if site.op_type != "MatMul":
        return f"{site.op_type} has no int4 kernel here"
    dims = list(model.initializers()[site.weight].dims)
    if len(dims) != 2 or dims[0] < block_size:
        return f"weight {dims} has fewer than {block_size} rows"
    return ""


def constant_tables(model: Model, block_size: int = BLOCK_SIZE) -> list[QuantSite]:
    """Gather nodes reading rows of a constant 2-D table (embeddings), as QuantSite records (macs holds the
    table's element count)."""
    inits = model.initializers()
    consts = model.constant_names()
    out = []
    for node in model.graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.input[0] not in consts:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        dims = list(inits[node.input[0]].dims)
        if axis == 0 and len(dims) == 2 and dims[1] % block_size == 0:  # the kernel wants whole blocks
            out.append(QuantSite(node.name, "Gather", node.input[1], node.input[0], 1, None, node.output[0],
                                 macs=dims[0] * dims[1]))
    return out


__all__ = ["BLOCK_SIZE", "ACCURACY_LEVELS", "blocked_int4", "block_scales", "dequantized", "pack_nibbles", "to_int4",
           "int4_reason", "constant_tables"]
