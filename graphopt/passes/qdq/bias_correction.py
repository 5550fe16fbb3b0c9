"""Empirical bias correction for int8 sites: remove the mean output shift that quantization adds.

Rounding weights and clipping/rounding activations do not only add noise, they move each output channel's mean
(clipping a long-tailed activation pulls it down; a rounded weight row no longer sums to the same value). For a
site y = W x + b the int8 model computes E[y] = W_q E[x_q] + b instead of W E[x] + b, so subtracting
W_q E[x_q] - W E[x] from the bias restores every channel's mean. The means come from one streaming pass over
the calibration inputs of the float model: per input channel, E[x] and E[fake-quantized x] with the range the
plan chose. Exact in expectation for the site in isolation (zero padding at conv borders is ignored).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from onnx import numpy_helper

from ...core.capture import stream_tensors
from ...core.editing import node_attrs
from ...core.model import Model
from .sites import QuantSite
from .quant import QParams, quantize_weight, weight_qparams
from ...core.runtime import RuntimeSettings


def fake_quantize(x: np.ndarray, q: QParams) -> np.ndarray:
    scale, zp = float(q.scale), float(q.zero_point)
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


def channel_means(model: Model, sites: list[QuantSite], tensors: dict[str, QParams], samples, *,
                  settings: RuntimeSettings | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{activation: (E[x], E[fake-quantized x])} per input channel (axis 1 for convs, the last axis for
    MatMul/Gemm), streamed over `samples`."""
    axis_of = {s.activation: (1 if s.op_type == "Conv" else -1) for s in sites}
    names = [a for a in dict.fromkeys(s.activation for s in sites) if a in tensors]
    sums: dict[str, list] = {a: [0.0, 0.0, 0] for a in names}
    inputs = {i.name for i in model.graph.input}
    fetch = [a for a in names if a not in inputs]
    for feed, values in stream_tensors(model, fetch, samples, settings=settings):
        values.update({a: feed[a] for a in names if a in inputs})
        for a, x in values.items():
            x = np.moveaxis(x.astype(np.float32), axis_of[a], -1).reshape(-1, x.shape[axis_of[a]])
            acc = sums[a]
            acc[0] = acc[0] + x.sum(axis=0, dtype=np.float64)
            acc[1] = acc[1] + fake_quantize(x, tensors[a]).sum(axis=0, dtype=np.float64)
            acc[2] += len(x)
    return {a: (s / max(n, 1), fq / max(n, 1)) for a, (s, fq, n) in sums.items()}


def bias_shifts(model: Model, sites: list[QuantSite], int8: set[str], tensors: dict[str, QParams], samples, *,
                settings: RuntimeSettings | None = None,
                codes: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """{site: per-output-channel shift to subtract from its float bias} for the int8 sites that have a bias
    (`codes`: int8 weights from another rounding than nearest, as the rewrite will store them)."""
    chosen = [s for s in sites if s.node in int8 and s.bias is not None and s.activation in tensors]
    means = channel_means(model, chosen, tensors, samples, settings=settings)
    inits = model.initializers()
    nodes = {n.name: n for n in model.graph.node}
    shifts = {}
    for s in chosen:
        mu, mu_q = means[s.activation]
        w = numpy_helper.to_array(inits[s.weight]).astype(np.float64)
        wq_params = weight_qparams(w.astype(np.float32), s.weight_axis)
        wq = (codes[s.node] if codes and s.node in codes else
              quantize_weight(w.astype(np.float32), wq_params)).astype(np.float64)
        shape = [1] * w.ndim
        shape[s.weight_axis] = -1
        wq = wq * wq_params.scale.reshape(shape)
        if s.op_type == "Conv":
            group = node_attrs(nodes[s.node]).get("group", 1)
            per_group = w.shape[1]
            out_per_group = w.shape[0] // group
            # input channel of (output o, weight channel c): (o // out_per_group) * per_group + c
            index = (np.arange(w.shape[0])[:, None] // out_per_group) * per_group + np.arange(per_group)[None, :]
            spatial = tuple(range(2, w.ndim))
            shifts[s.node] = ((wq.sum(axis=spatial) * mu_q[index]).sum(axis=1)
                              - (w.sum(axis=spatial) * mu[index]).sum(axis=1))
        else:
            k_axis = 1 - s.weight_axis  # MatMul [K, N]: K is axis 0; Gemm transB [N, K]: axis 1
            shifts[s.node] = np.tensordot(mu_q, wq, axes=([0], [k_axis])) - np.tensordot(mu, w, axes=([0], [k_axis]))
    return shifts


def output_means(model: Model, names: dict[str, int], samples, *,
                 settings: RuntimeSettings | None = None) -> dict[str, np.ndarray]:
    """{tensor: mean per channel} of the named tensors ({name: channel axis}), streamed over `samples`."""
    sums: dict[str, list] = {t: [0.0, 0] for t in names}
    for _, values in stream_tensors(model, list(names), samples, settings=settings):
        for t, x in values.items():
            x = np.moveaxis(np.asarray(x, np.float32), names[t], -1).reshape(-1, x.shape[names[t]])
            sums[t][0] = sums[t][0] + x.sum(axis=0, dtype=np.float64)
            sums[t][1] += len(x)
    return {t: s / max(n, 1) for t, (s, n) in sums.items()}


def refine_shifts(model: Model, sites: list[QuantSite], int8: set[str], shifts: dict[str, np.ndarray], build,
                  samples, *, settings: RuntimeSettings | None = None, progress=None) -> dict[str, np.ndarray]:
    """Bias shifts that also remove the mean error arriving from upstream int8 sites (which the per-site correction
    above cannot see). In graph order, each int8 site's output mean per channel in the all-int8 model
    `build(shifts)` (upstream sites already corrected) is compared with the float model's, and the difference added
    to the site's shift. The QDQ model's site node writes the value before its absorbed Relu/Clip (its output
    quantizer clamps), so the comparison is of pre-activation means. One model run per site: correcting every site
    from one run would correct each downstream site for drift its upstream corrections remove too."""
    chosen = [s for s in sites if s.node in int8 and s.bias is not None]
    if not chosen:
        return shifts
    axis = {s.node: (1 if s.op_type == "Conv" else -1) for s in chosen}
    float_means = output_means(model, {s.output: axis[s.node] for s in chosen}, samples, settings=settings)
    emulate = dataclasses.replace(settings or RuntimeSettings(), graph_optimization="disable")
    shifts = dict(shifts)
    for i, s in enumerate(chosen, 1):
        if progress is not None and (i % 8 == 0 or i == len(chosen)):
            progress(f"qdq: bias correction against the all-int8 model, {i} of {len(chosen)} sites")
        out = s.effective_output if s.absorbed else s.output
        drift = output_means(build(shifts), {out: axis[s.node]}, samples, settings=emulate)[out] - float_means[s.output]
        shifts[s.node] = shifts.get(s.node, 0.0) + drift
    return shifts
