"""Where low-rank factorization applies in an ONNX graph, how to rewrite a site, and its calibration inputs.

A *site* is a MatMul (constant weight on either side), a Gemm (transB, alpha, beta and C kept; not transA) or a
2-D Conv with group 1, whose weight is a float32 initializer read by no other node. Each is seen as `y = x @ W`
with W [n_in, n_out] (see graphopt/lowrank.py) and rewritten as two thinner ops:
- MatMul(X, W)  -> MatMul(MatMul(X, A), B)
- MatMul(W, X)  -> MatMul(Bᵀ, MatMul(Aᵀ, X))            (W [n_out, n_in] acts on X's columns)
- Gemm(X, W, C) -> Gemm(Gemm(X, A), B, C; alpha, beta)   (the inner one a MatMul below opset 11)
- Conv k×k      -> Conv k×k with r filters (same strides, pads, dilations, auto_pad; no bias) -> Conv 1×1 (bias)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...core.capture import stream_tensors
from ...core.conv import conv_patches
from ...core.editing import all_names, drop_unused_initializers, node_attrs, node_inputs, unique_name
from ...core.errors import InputError
from ...core.numerics import Gram
from .factorize import conv_factors, conv_matrix
from ...core.model import Model, make_model_like
from ...core.runtime import RuntimeSettings


@dataclass
class FactorSite:
    """A Conv/MatMul/Gemm whose weight may be factorized: its tensors, orientation and shape as y = x @ W."""

    node: str
    op_type: str
    activation: str  # the input that multiplies the weight
    weight: str
    bias: str | None = None  # Conv bias or Gemm C (kept on the second op)
    weight_first: bool = False  # MatMul(W, X)
    n_in: int = 0
    n_out: int = 0
    attrs: dict = field(default_factory=dict)
    weight_shape: tuple = ()
    reason: str = ""  # why it cannot be factorized (empty if it can)

    @property
    def params(self) -> int:
        return self.n_in * self.n_out

    @property
    def shape_text(self) -> str:
        if self.op_type == "Conv":
            return "Conv " + "x".join(str(d) for d in self.weight_shape)
        return f"{self.op_type} {self.n_in}x{self.n_out}"

    def gram_key(self) -> tuple:
        """Sites that read the same tensor the same way share one Gram matrix (e.g. attention q, k, v)."""
        if self.op_type == "Conv":
            a = self.attrs
            return (self.activation, "conv", tuple(self.weight_shape[1:]), tuple(a.get("strides", ())),
                    tuple(a.get("pads", ())), tuple(a.get("dilations", ())), a.get("auto_pad", "NOTSET"))
        return (self.activation, "cols" if self.weight_first else "rows", self.n_in)


def find_sites(model: Model) -> list[FactorSite]:
    g = model.graph
    consts = {n: t for n, t in model.initializers().items() if n in model.constant_names()}
    readers: dict[str, int] = {}
    for node in g.node:
        for name in set(node_inputs(node)):
            readers[name] = readers.get(name, 0) + 1
    sites = []
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in node_attrs(node).items()}
        first_const = node.input[0] in consts
        weight_first = node.op_type == "MatMul" and first_const and node.input[1] not in consts
        w_name = node.input[0] if weight_first else (node.input[1] if len(node.input) > 1 else "")
        act = node.input[1] if weight_first else node.input[0]
        site = FactorSite(node.name, node.op_type, act, w_name, weight_first=weight_first, attrs=attrs)
        sites.append(site)
        if w_name not in consts:
            site.reason = "weight is not a constant initializer"
            continue
        w = consts[w_name]
        site.weight_shape = tuple(w.dims)
        if act in consts:
            site.reason = "both inputs are constant (constant folding's job)"
        elif w.data_type != TensorProto.FLOAT:
            site.reason = f"weight is {TensorProto.DataType.Name(w.data_type)}, only float32 is factorized"
        elif readers.get(w_name, 0) > 1:
            site.reason = "weight is shared with other nodes"
        if site.reason:
            continue
        dims = site.weight_shape
        if node.op_type == "MatMul":
            if len(dims) != 2:
                site.reason = f"MatMul weight has rank {len(dims)}, expected 2"
                continue
            site.n_in, site.n_out = (dims[1], dims[0]) if weight_first else dims
        elif node.op_type == "Gemm":
            if attrs.get("transA", 0):
                site.reason = "Gemm with transA"
                continue
            site.n_in, site.n_out = (dims[1], dims[0]) if attrs.get("transB", 0) else dims
            site.bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        else:  # Conv
            if len(dims) != 4:
                site.reason = f"only 2-D convolutions are factorized (weight rank {len(dims)})"
                continue
            if attrs.get("group", 1) != 1:
                site.reason = f"grouped convolution (group={attrs['group']})"
                continue
            site.n_in, site.n_out = dims[1] * dims[2] * dims[3], dims[0]
            site.bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return sites


def weight_matrix(model: Model, site: FactorSite) -> np.ndarray:
    """The site's weight as W [n_in, n_out] (float32)."""
    w = numpy_helper.to_array(model.initializers()[site.weight])
    if site.op_type == "Conv":
        return conv_matrix(w)
    if site.op_type == "Gemm" and site.attrs.get("transB", 0):
        return w.T
    return w.T if site.weight_first else w


# ------------------------------------------------------------------------------------------------ rewrite
def rewrite(model: Model, sites: list[FactorSite], factors: dict[str, tuple[np.ndarray, np.ndarray]]) -> Model:
    """A copy of `model` with each site named in `factors` replaced by its two thinner ops (in place, so the
    node order stays topological). The original weight initializer is dropped (it had no other reader)."""
    by_name = {s.node: s for s in sites}
    out = model.copy()
    g = out.graph
    taken = all_names(g)
    dropped: set[str] = set()
    new_nodes = []
    for node in g.node:
        if node.name not in factors:
            new_nodes.append(node)
            continue
        site = by_name[node.name]
        a, b = factors[node.name]
        first, second, inits = _factorized(site, node, a, b, taken, model.opset)
        new_nodes.extend([first, second])
        g.initializer.extend(inits)
        dropped.add(site.weight)
    del g.node[:]
    g.node.extend(new_nodes)
    drop_unused_initializers(g, dropped)
    return make_model_like(model, g)


def _factorized(site: FactorSite, node: onnx.NodeProto, a: np.ndarray, b: np.ndarray, taken: set[str], opset: int):
    base = node.name or site.weight
    wa, wb = unique_name(f"{site.weight}_lowrank_a", taken), unique_name(f"{site.weight}_lowrank_b", taken)
    mid = unique_name(f"{node.output[0]}_lowrank", taken)
    name_a, name_b = unique_name(f"{base}/lowrank_a", taken), unique_name(f"{base}/lowrank_b", taken)
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    if site.op_type == "MatMul" and site.weight_first:
        ta, tb = numpy_helper.from_array(np.ascontiguousarray(a.T), wa), numpy_helper.from_array(np.ascontiguousarray(b.T), wb)
        first = helper.make_node("MatMul", [wa, site.activation], [mid], name=name_a)
        second = helper.make_node("MatMul", [wb, mid], list(node.output), name=name_b)
    elif site.op_type == "MatMul":
        ta, tb = numpy_helper.from_array(a, wa), numpy_helper.from_array(b, wb)
        first = helper.make_node("MatMul", [site.activation, wa], [mid], name=name_a)
        second = helper.make_node("MatMul", [mid, wb], list(node.output), name=name_b)
    elif site.op_type == "Gemm":
        ta, tb = numpy_helper.from_array(a, wa), numpy_helper.from_array(b, wb)
        # C is a required Gemm input before opset 11 (the original has one then): the C-less first half is a
        # MatMul there, the same product for Gemm's 2-D input
        first = helper.make_node("Gemm" if opset >= 11 else "MatMul", [site.activation, wa], [mid], name=name_a)
        extra = {k: site.attrs[k] for k in ("alpha", "beta") if k in site.attrs}
        second = helper.make_node("Gemm", [mid, wb] + ([site.bias] if site.bias else []), list(node.output),
                                  name=name_b, **extra)
    else:  # Conv
        w1, w2 = conv_factors(a, b, site.weight_shape)
        ta, tb = numpy_helper.from_array(w1, wa), numpy_helper.from_array(w2, wb)
        keep = {k: v for k, v in site.attrs.items() if k in ("strides", "pads", "dilations", "auto_pad")}
        keep["kernel_shape"] = list(site.weight_shape[2:])
        first = helper.make_node("Conv", [site.activation, wa], [mid], name=name_a, **keep)
        second = helper.make_node("Conv", [mid, wb] + ([site.bias] if site.bias else []), list(node.output),
                                  name=name_b, kernel_shape=[1, 1])
    return first, second, [ta, tb]


# ------------------------------------------------------------------------------------------ micro-models
def site_model(model: Model, site: FactorSite, shape: tuple) -> Model:
    """The site's node alone, reading an input `x` of `shape`, with its weight and bias: timed against its
    factorized versions (built from it with `rewrite`)."""
    node = next(n for n in model.graph.node if n.name == site.node)
    inits = model.initializers()
    names = [site.weight] + ([site.bias] if site.bias else [])
    clone = onnx.NodeProto()
    clone.CopyFrom(node)
    for i, name in enumerate(clone.input):
        if name == site.activation:
            clone.input[i] = "x"
    del clone.output[:]
    clone.output.append("y")
    graph = helper.make_graph([clone], "site", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[inits[n] for n in names])
    # A fresh ModelProto with the same opsets (not a copy of the whole model: that would copy every weight).
    proto = helper.make_model(graph, opset_imports=list(model.proto.opset_import))
    proto.ir_version = model.proto.ir_version
    return Model(proto)


def micro_site(site: FactorSite) -> FactorSite:
    """The same site as seen inside its micro-model (activation renamed to `x`)."""
    return FactorSite(**{**site.__dict__, "activation": "x"})


# -------------------------------------------------------------------------------------------- calibration
def collect_grams(model: Model, sites: list[FactorSite], samples, settings: RuntimeSettings | None = None,
                  progress=None, timing_feed=None) -> tuple[dict[tuple, Gram], dict[str, np.ndarray]]:
    """XᵀX of every site's input rows (im2col patches for convs) over all samples, one sample in memory at a
    time; plus each activation's value on `timing_feed` (the latency shape; default the first sample), which
    feeds the latency micro-models and is not counted in the Gram matrices."""
    keys = {}
    for s in sites:
        keys.setdefault(s.gram_key(), s)
    grams = {k: Gram(s.n_in) for k, s in keys.items()}
    tensors = list(dict.fromkeys(s.activation for s in keys.values()))
    inputs = {i.name for i in model.graph.input}
    fetch = [t for t in tensors if t not in inputs]
    # the timing feed runs first through the same session, and is kept apart from the Gram matrices
    feeds = itertools.chain([timing_feed], samples) if timing_feed is not None else samples
    first: dict[str, np.ndarray] = {}
    n = 0
    for i, (feed, values) in enumerate(stream_tensors(model, fetch, feeds, settings=settings)):
        values.update({t: feed[t] for t in tensors if t in inputs})
        if not first:
            first = {t: np.array(values[t]) for t in tensors}
        if i == 0 and timing_feed is not None:
            continue
        n += 1
        for key, s in keys.items():
            grams[key].update(_rows(s, values[s.activation]))
        del values
        if progress is not None and n % 8 == 0:
            progress(f"lowrank: input covariance, {n} samples")
    if n == 0:
        raise InputError("no calibration samples")
    return grams, first


def _rows(site: FactorSite, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if site.op_type == "Conv":
        return conv_patches(x, site.attrs, site.weight_shape[2:])
    if site.weight_first:
        return np.swapaxes(x, -1, -2).reshape(-1, site.n_in)
    return x.reshape(-1, site.n_in)


__all__ = ["FactorSite", "find_sites", "weight_matrix", "rewrite", "site_model", "micro_site", "collect_grams"]
