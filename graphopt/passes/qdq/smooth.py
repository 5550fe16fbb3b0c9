"""Activation smoothing before int8 MatMul/Gemm (the SmoothQuant idea), chosen per input tensor by measurement.

Transformer activations carry a few channels with magnitudes far above the rest; with one scale per tensor those
channels squeeze every other channel into a handful of int8 levels. Dividing channel j of the input by s_j and
multiplying row j of the weight by s_j computes the same product in float, and with
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) moves part of the outlier range into the weights, which are quantized
per output column and absorb it better. The division is an explicit Mul before the sites (an elementwise op, cheap
next to the product), so no neighbouring op has to be linear.

Only inputs with outlier channels (largest channel range >= MIN_SPREAD x the median's) are candidates; alpha is
chosen per input tensor (shared by every site reading it) from a small grid, by the error of the
emulated int8 product on captured calibration rows; "no smoothing" is always a candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...core.capture import stream_tensors
from ...core.editing import add_initializer, all_names, node_inputs, unique_name
from ...core.model import Model
from .sites import QuantSite
from ...core.runtime import RuntimeSettings, int8_weight_qmax

ALPHAS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_SPREAD = 8.0  # smooth only inputs whose largest channel range is this many times the median channel's


@dataclass
class Smoothing:
    activation: str
    sites: list[str]
    alpha: float | None  # None: left as it was (smoothing did not lower the error)
    scale: np.ndarray | None  # s, per input channel
    error_before: float  # relative squared error of the emulated int8 products, unsmoothed
    error_after: float

    def describe(self) -> str:
        if self.alpha is None:
            return f"not smoothed (int8 product error {self.error_before:.2e})"
        return f"smoothed, alpha {self.alpha:g} (int8 product error {self.error_before:.2e} -> {self.error_after:.2e})"


def weight_k_by_n(site: QuantSite, w: np.ndarray) -> np.ndarray:
    """The weight as [K inputs, N outputs], whatever its stored orientation."""
    return w.T if site.op_type == "Gemm" and site.weight_axis == 0 else w


def plan(model: Model, sites: list[QuantSite], samples, *, settings: RuntimeSettings | None = None,
         max_rows: int = 1024, alphas=ALPHAS) -> list[Smoothing]:
    """Capture each site input's channel maxima and up to `max_rows` rows (kept per sample, since a dynamic
    scale covers one call), then choose alpha per input tensor by the error of the emulated dynamic int8
    products."""
    groups: dict[str, list[QuantSite]] = {}
    for s in sites:
        groups.setdefault(s.activation, []).append(s)
    names = list(groups)
    absmax = {a: None for a in names}
    rows: dict[str, list[np.ndarray]] = {a: [] for a in names}
    kept = dict.fromkeys(names, 0)
    for _, values in stream_tensors(model, names, samples, settings=settings):
        for a, v in values.items():
            x = v.reshape(-1, v.shape[-1]).astype(np.float32)
            m = np.abs(x).max(axis=0)
            absmax[a] = m if absmax[a] is None else np.maximum(absmax[a], m)
            if kept[a] < max_rows:
                rows[a].append(x[: max_rows - kept[a]])
                kept[a] += len(rows[a][-1])
    inits = model.initializers()
    out = []
    for a, members in groups.items():
        weights = [weight_k_by_n(s, numpy_helper.to_array(inits[s.weight]).astype(np.float32)) for s in members]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        x = rows[a]
        refs = [[c @ w for c in x] for w in weights]
        den = max(sum(float(np.sum(r**2)) for per_w in refs for r in per_w), 1e-30)

        def error(s):
            return sum(float(np.sum((_dynamic_int8_product(c, w, s) - r) ** 2))
                       for w, per_w in zip(weights, refs) for c, r in zip(x, per_w)) / den

        before = error(None)
        best = Smoothing(a, [s.node for s in members], None, None, before, before)
        spread = float(absmax[a].max() / max(float(np.median(absmax[a])), 1e-12))
        if spread < MIN_SPREAD:  # no outlier channels: nothing to move, and the Mul would cost bytes and time
            out.append(best)
            continue
        for alpha in alphas:
            s = np.maximum(absmax[a], 1e-6) ** alpha / np.maximum(wmax, 1e-6) ** (1 - alpha)
            s = np.where(np.isfinite(s) & (s > 0), s, 1.0).astype(np.float32)
            err = error(s)
            if err < best.error_after:
                best = Smoothing(a, best.sites, alpha, s, before, err)
        out.append(best)
    return out


def _dynamic_int8_product(x: np.ndarray, w: np.ndarray, s: np.ndarray | None) -> np.ndarray:
    """Q(x/s) Q(s w), Q as onnxruntime's dynamic int8: uint8 per call for x, int8 per output column for w."""
    ws = w if s is None else w * s[:, None]
    qmax = int8_weight_qmax()
    wscale = np.where(np.abs(ws).max(axis=0) > 0, np.abs(ws).max(axis=0) / qmax, 1.0)
    wq = np.clip(np.round(ws / wscale), -qmax, qmax) * wscale
    xs = x if s is None else x / s
    lo, hi = min(float(xs.min()), 0.0), max(float(xs.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = np.clip(np.round(-lo / scale), 0, 255)
    return ((np.clip(np.round(xs / scale) + zp, 0, 255) - zp) * scale) @ wq


def apply(model: Model, sites: list[QuantSite], smoothings: list[Smoothing]) -> Model:
    """A copy of `model` where every smoothed group's sites read input / s through one Mul and hold s-scaled
    weights (a weight also read elsewhere is copied, not changed). Exact in float."""
    out = model.copy()
    g = out.graph
    taken = all_names(g)
    by_name = {s.node: s for s in sites}
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in node_inputs(n):
            readers[i] = readers.get(i, 0) + 1
    inserts: dict[str, onnx.NodeProto] = {}  # first site's node name -> the Mul to put before it
    for sm in smoothings:
        if sm.alpha is None:
            continue
        inv = add_initializer(g, f"{sm.activation}_smooth_inv", (1.0 / sm.scale).astype(np.float32), taken)
        smoothed = unique_name(f"{sm.activation}_smoothed", taken)
        mul = helper.make_node("Mul", [sm.activation, inv], [smoothed], name=unique_name(f"{smoothed}_Mul", taken))
        first = next(n.name for n in g.node if n.name in sm.sites)
        inserts[first] = mul
        for name in sm.sites:
            s = by_name[name]
            w = numpy_helper.to_array(inits[s.weight]).astype(np.float32)
            scaled = w * (sm.scale[None, :] if s.op_type == "Gemm" and s.weight_axis == 0 else sm.scale[:, None])
            node = next(n for n in g.node if n.name == name)
            if readers.get(s.weight, 0) > 1:  # shared weight: give this site its own copy
                node.input[1] = add_initializer(g, f"{s.weight}_smoothed", scaled.astype(np.float32), taken)
            else:
                inits[s.weight].CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), s.weight))
            node.input[0] = smoothed
    if inserts:
        nodes = []
        for n in g.node:
            if n.name in inserts:
                nodes.append(inserts[n.name])
            nodes.append(n)
        del g.node[:]
        g.node.extend(nodes)
    return out
