"""GPTQ rounding: round a layer's weights one input row at a time and push each row's rounding error onto the
rows not yet rounded, so that the layer's *output* error on the calibration inputs shrinks, not each weight's.

For a layer y = x W (W [K, N]) and calibration inputs X, the output error of a rounded Q is tr((W-Q)ᵀ H (W-Q))
with H = XᵀX. Rounding row i and correcting the remaining rows by the closed-form optimal update (the OBQ step)
is, with U the upper Cholesky factor of H⁻¹: e = (w_i - q_i) / U_ii, W[j] -= U_ij e for j > i. Rows go in
decreasing order of H_ii (inputs with the most energy first, GPTQ's "act order"). H is damped by 1 % of its mean
diagonal. The scales are fixed before rounding (per output channel for int8, per block of 32 inputs for int4,
the same scales round-to-nearest uses), so the codes drop into the same rewrites. Convs round their im2col form:
rows are (input channel, kh, kw), and a grouped conv (depthwise) has one small H per group.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from ...core.capture import stream_tensors
from ...core.conv import conv_patches
from ...core.editing import node_attrs
from ...core.model import Model
from ...core.numerics import Gram
from ...core.runtime import RuntimeSettings, int8_weight_qmax
from .int4 import block_scales, expand_scales
from .quant import weight_qparams
from .sites import QuantSite

DAMP = 0.01
INT8 = (-127, 127)  # the full int8 range; the pass rounds to this machine's (see int8_weight_qmax)
INT4 = (-8, 7)


def gptq_round(w: np.ndarray, h: np.ndarray, scale: np.ndarray, qrange: tuple[int, int],
               damp: float = DAMP) -> np.ndarray:
    """Integer codes of w [G, K, N] (G independent groups) under H [G, K, K] with per-element scales [G, K, N]."""
    g, k, n = w.shape
    W = w.astype(np.float64).copy()
    H = h.astype(np.float64).copy()
    diag = np.einsum("gkk->gk", H).copy()
    dead = diag <= 0  # inputs that are always zero: their rows cannot change the output
    idx = np.arange(k)
    H[:, idx, idx] += np.where(dead, 1.0, 0.0) + damp * np.maximum(diag.mean(axis=1, keepdims=True), 1e-12)
    order = np.argsort(-diag, axis=1, kind="stable")
    W = np.take_along_axis(W, order[:, :, None], axis=1)
    S = np.take_along_axis(scale.astype(np.float64), order[:, :, None], axis=1)
    H = np.take_along_axis(np.take_along_axis(H, order[:, :, None], axis=1), order[:, None, :], axis=2)
    U = np.swapaxes(np.linalg.cholesky(np.linalg.inv(H)), 1, 2)  # H⁻¹ = Uᵀ U, U upper
    lo, hi = qrange
    Q = np.empty((g, k, n), np.int32)
    for i in range(k):
        q = np.clip(np.round(W[:, i] / S[:, i]), lo, hi)
        Q[:, i] = q
        err = (W[:, i] - q * S[:, i]) / U[:, i, i][:, None]
        W[:, i + 1:] -= U[:, i, i + 1:, None] * err[:, None, :]
    out = np.empty_like(Q)
    np.put_along_axis(out, order[:, :, None], Q, axis=1)
    return out


def _groups(s: QuantSite, node) -> int:
    return node_attrs(node).get("group", 1) if s.op_type == "Conv" else 1


def _as_kn(s: QuantSite, w: np.ndarray, groups: int) -> np.ndarray:
    """The stored weight as [G, K, N]: K the inputs the layer multiplies, N its outputs."""
    if s.op_type == "Conv":
        o = w.shape[0]
        return w.reshape(groups, o // groups, -1).transpose(0, 2, 1)
    return (w.T if s.weight_axis == 0 else w)[None]  # Gemm transB stores [N, K]


def _from_kn(s: QuantSite, q: np.ndarray, shape) -> np.ndarray:
    if s.op_type == "Conv":
        return q.transpose(0, 2, 1).reshape(shape)
    return q[0].T if s.weight_axis == 0 else q[0]


def _rows(s: QuantSite, node, x: np.ndarray, weight_shape, groups: int) -> np.ndarray:
    """The site's input as rows [rows, G, K] matching `_as_kn`."""
    x = np.asarray(x, np.float32)
    if s.op_type == "Conv":
        # im2col of every channel (columns: channel, kh, kw); channels are contiguous per group
        cols = conv_patches(x, {**node_attrs(node), "group": 1}, weight_shape[2:])
        return cols.reshape(len(cols), groups, -1)
    return x.reshape(-1, 1, x.shape[-1])


def second_moments(model: Model, sites: list[QuantSite], samples, settings: RuntimeSettings | None = None,
                   progress=None) -> dict[str, np.ndarray]:
    """{site: XᵀX [G, K, K]} over the calibration samples, streamed one sample at a time (sites reading the same
    tensor the same way share one)."""
    nodes = {n.name: n for n in model.graph.node}
    inits = model.initializers()
    shapes = {s.node: tuple(inits[s.weight].dims) for s in sites}
    groups = {s.node: _groups(s, nodes[s.node]) for s in sites}
    key = {s.node: (s.activation, s.op_type, str(node_attrs(nodes[s.node])) if s.op_type == "Conv" else "",
                    shapes[s.node][2:] if s.op_type == "Conv" else (), groups[s.node]) for s in sites}
    first = {}
    for s in sites:
        first.setdefault(key[s.node], s)
    acc: dict[tuple, list] = {}
    inputs = {i.name for i in model.graph.input}
    tensors = list(dict.fromkeys(s.activation for s in first.values()))
    fetch = [t for t in tensors if t not in inputs]
    for n, (feed, values) in enumerate(stream_tensors(model, fetch, samples, settings=settings), 1):
        values.update({t: feed[t] for t in tensors if t in inputs})
        for k, s in first.items():
            rows = _rows(s, nodes[s.node], values[s.activation], shapes[s.node], groups[s.node])
            if rows.shape[1] == 1:  # one group: the shared buffered Gram
                acc.setdefault(k, [Gram(rows.shape[2])])[0].update(rows[:, 0])
            else:
                r = np.ascontiguousarray(rows.transpose(1, 0, 2))  # [G, rows, K]: one batched BLAS product
                total = (np.swapaxes(r, 1, 2) @ r).astype(np.float64)
                acc[k] = [acc[k][0] + total] if k in acc else [total]
        del values
        if progress is not None and n % 8 == 0:
            progress(f"qdq: input second moments, {n} samples")
    out = {}
    for s in sites:
        v = acc[key[s.node]][0]
        out[s.node] = v.xtx[None] if isinstance(v, Gram) else v
    return out


def gptq_codes(model: Model, sites: list[QuantSite], menus: dict[str, tuple[str, ...]], samples,
               settings: RuntimeSettings | None = None, progress=None):
    """GPTQ codes for every site that offers int8 (static or dynamic: {site: int8 weight, stored layout}) or int4
    (MatMul: {site: (int4 values [K, N], block scales)}), from the calibration samples' input second moments."""
    wanted = [s for s in sites if any(f in menus[s.node] for f in ("int8", "int8-dynamic", "int4"))
              and s.op_type != "Gather"]
    if not wanted:
        return {}, {}
    moments = second_moments(model, wanted, samples, settings, progress)
    nodes = {n.name: n for n in model.graph.node}
    inits = model.initializers()
    codes8, codes4 = {}, {}
    for s in wanted:
        w = numpy_helper.to_array(inits[s.weight]).astype(np.float32)
        groups = _groups(s, nodes[s.node])
        kn = _as_kn(s, w, groups)
        h = moments[s.node]
        if any(f in menus[s.node] for f in ("int8", "int8-dynamic")):
            per_channel = weight_qparams(w, s.weight_axis).scale  # one per output channel
            scale = np.broadcast_to(_as_kn(s, _channel_grid(per_channel, w.shape, s.weight_axis), groups), kn.shape)
            int8 = (-int8_weight_qmax(), int8_weight_qmax())
            codes8[s.node] = _from_kn(s, gptq_round(kn, h, scale, int8), w.shape).astype(np.int8)
        if "int4" in menus[s.node]:
            blocks = block_scales(kn[0], axis=0)
            full = expand_scales(blocks, 0, kn.shape[1])[None]
            codes4[s.node] = (gptq_round(kn, h, full, INT4)[0].astype(np.int8), blocks)
    return codes8, codes4


def _channel_grid(scale: np.ndarray, shape, axis: int) -> np.ndarray:
    """Per-channel scales broadcast to the weight's stored shape."""
    view = [1] * len(shape)
    view[axis] = -1
    return np.broadcast_to(scale.reshape(view), shape)


__all__ = ["gptq_round", "second_moments", "gptq_codes"]
