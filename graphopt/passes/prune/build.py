"""Build the pruned sub-network: remove the chosen channels of channel groups physically, exactly.

`keep` maps a group id (a root of `ChannelGroups`) to the sorted channel indices that stay; groups not named keep
everything. Every tracked tensor's kept positions follow from its layout; each node with a plan gets its constants
sliced, its attributes and shape constants rewritten (Conv `group`, Split sizes, Slice bounds, Reshape targets).

`fill` (optional) gives, per tensor read by a consumer (Conv/Gemm/MatMul), the value each channel is replaced by
once removed (a calibration mean, or the constant a zeroed channel still carries after BN/bias): its contribution
W[:, removed] . fill is folded into the consumer's bias. That is exact for Gemm, MatMul and convs without padding
(the value is constant over positions); for a padded k x k conv it is exact away from the borders.

`zero_channels` is the other half of the exactness check (OTO's zero-invariant groups): it zeroes what makes the
chosen channels non-zero (producer weights and biases, BN scale and shift, per-channel additive constants, depthwise
biases), so the zeroed model and the pruned one must compute the same outputs.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...analysis.channel_groups import ChannelGroups
from ...core.editing import (all_names, drop_unused_initializers, node_attrs, node_inputs, remove_attr, set_attr,
                             unique_name)
from ...core.model import Model, make_model_like


def positions(cg: ChannelGroups, keep: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Kept positions along the tracked axis of every tensor that loses something."""
    keep = {cg.find(g): np.asarray(k, dtype=np.int64) for g, k in keep.items()}
    out = {}
    for tensor, tr in cg.tracked.items():
        parts, offset, changed = [], 0, False
        for seg in tr.layout:
            root = cg.find(seg.group)
            size = cg._size[root]
            n = int(size * seg.repeat)
            k = keep.get(root)
            if k is None or len(k) == size:
                parts.append(np.arange(n) + offset)
            else:
                changed = True
                parts.append(offset + _segment_positions(k, seg.repeat))
            offset += n
        if changed:
            out[tensor] = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return out


def _segment_positions(kept: np.ndarray, repeat: Fraction) -> np.ndarray:
    if repeat.denominator == 1:
        r = repeat.numerator
        return (kept[:, None] * r + np.arange(r)[None, :]).ravel()
    if repeat.numerator != 1:
        raise ValueError(f"layout repeat {repeat} not supported")
    return np.unique(kept // repeat.denominator)


def check_keep(cg: ChannelGroups, keep: dict[int, np.ndarray]) -> None:
    """Refuse a keep set that would break the graph: frozen groups, empty groups, partial blocks."""
    for g, k in keep.items():
        root = cg.find(g)
        size, block = cg._size[root], cg._block[root]
        k = np.asarray(k)
        if len(k) == size:
            continue
        if cg._reasons[root]:
            raise ValueError(f"group {root} is frozen: {'; '.join(cg._reasons[root])}")
        if len(k) == 0:
            raise ValueError(f"group {root}: at least one channel must stay")
        if np.any(k < 0) or np.any(k >= size) or len(np.unique(k)) != len(k):
            raise ValueError(f"group {root}: kept channels out of range or repeated")
        if block > 1:
            blocks = np.unique(k // block)
            if len(blocks) * block != len(k):
                raise ValueError(f"group {root} loses channels in whole blocks of {block} only")


class _Editor:
    """Initializer edits on a copy of the graph: sliced in place when one node uses them, else copied."""

    def __init__(self, proto: onnx.ModelProto):
        self.graph = proto.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.uses: dict[str, int] = {}
        for node in self.graph.node:
            for name in node_inputs(node):  # a read inside a subgraph body is a use: it must see the original
                self.uses[name] = self.uses.get(name, 0) + 1
        self.names = all_names(self.graph)
        self.values: dict[str, np.ndarray] = {}
        self.extra_nodes: list[onnx.NodeProto] = []

    def get(self, name: str) -> np.ndarray:
        if name not in self.values:
            self.values[name] = numpy_helper.to_array(self.inits[name])
        return self.values[name]

    def own(self, node: onnx.NodeProto, index: int) -> str:
        """A name for input `index` of `node` that only this node reads (copying a shared initializer)."""
        name = node.input[index]
        if self.uses.get(name, 0) > 1:
            new = unique_name(f"{name}_pruned", self.names)
            self.values[new] = self.get(name).copy()
            self.uses[name] -= 1
            self.uses[new] = 1
            node.input[index] = new
            return new
        return name

    def set(self, name: str, value: np.ndarray) -> None:
        self.values[name] = value

    def new(self, base: str, value: np.ndarray) -> str:
        name = unique_name(base, self.names)
        self.values[name] = value
        self.uses[name] = 1
        return name

    def finish(self) -> None:
        for t in self.graph.initializer:
            if t.name in self.values:
                t.CopyFrom(numpy_helper.from_array(self.values.pop(t.name), t.name))
        self.graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in self.values.items())
        drop_unused_initializers(self.graph)


def build(model: Model, cg: ChannelGroups, keep: dict[int, np.ndarray],
          fill: dict[str, np.ndarray] | None = None) -> Model:
    """The pruned model. `cg` must be the analysis of `model`."""
    check_keep(cg, keep)
    pos = positions(cg, keep)
    out = model.copy()
    ed = _Editor(out.proto)
    nodes = {n.name: n for n in out.graph.node}
    fill = fill or {}
    for name, plan in cg.plans.items():
        node = nodes[name]
        touched = {t for _, _, t in plan.slices if t in pos}
        if plan.kind == "producer" and plan.data.get("consumes") in fill and plan.data["consumes"] in pos:
            _fold(ed, node, plan, pos, fill, out.graph)
        by_input: dict[int, list[tuple[int, str]]] = {}
        for idx, axis, tensor in plan.slices:
            if tensor in pos:
                by_input.setdefault(idx, []).append((axis, tensor))
        for idx, cuts in by_input.items():
            arr = ed.get(node.input[idx])
            for axis, tensor in cuts:
                arr = np.take(arr, pos[tensor], axis=axis)
            ed.set(ed.own(node, idx), np.ascontiguousarray(arr))
        if plan.kind == "depthwise" and touched:
            set_attr(node, "group", len(pos[node.output[0]]))
        elif plan.kind == "split" and plan.data["source"] in pos:
            sizes = np.array([len(pos[o]) if o in pos else _length(cg, o) for o in node.output], np.int64)
            remove_attr(node, "split")
            remove_attr(node, "num_outputs")
            if cg.opset >= 13:
                name_ = ed.new(f"{node.name}_split", sizes)
                if len(node.input) > 1:
                    node.input[1] = name_
                else:
                    node.input.append(name_)
            else:
                set_attr(node, "split", [int(v) for v in sizes])
        elif plan.kind == "slice" and plan.data["source"] in pos:
            kept = pos[plan.data["source"]]
            i = plan.data["index"]
            for which, bound in ((1, plan.data["start"]), (2, plan.data["stop"])):
                arr = ed.get(node.input[which]).copy()
                arr[i] = int(np.sum(kept < bound))
                ed.set(ed.own(node, which), arr)
        elif plan.kind == "reshape" and node.output[0] in pos and plan.data["value"] > 0:
            _, init_name, i, user_name = plan.data["spec"]
            user = nodes[user_name]
            arr = ed.get(init_name).copy()
            np.ravel(arr)[i] = len(pos[node.output[0]])
            ed.set(ed.own(user, list(user.input).index(init_name)), arr)
    if ed.extra_nodes:  # bias Adds inserted after MatMuls
        out.graph.node.extend(ed.extra_nodes)
        _resort(out.graph)
    ed.finish()
    removed = set(pos)
    stale = [vi for vi in out.graph.value_info if vi.name in removed]
    for vi in stale:
        out.graph.value_info.remove(vi)
    return make_model_like(model, out.graph)


def _length(cg: ChannelGroups, tensor: str) -> int:
    return cg.length(cg.tracked[tensor].layout)


def _fold(ed: _Editor, node, plan, pos, fill, graph) -> None:
    """Add W[:, removed] . fill[removed] to the node's bias (before its weight is sliced)."""
    x = plan.data["consumes"]
    values = np.asarray(fill[x], dtype=np.float64)
    removed = np.setdiff1d(np.arange(len(values)), pos[x])
    if not len(removed) or not np.any(values[removed]):
        return
    w = ed.get(node.input[plan.data["weight"]]).astype(np.float64)
    w_in, w_out = plan.data["w_in_axis"], plan.data["w_out_axis"]
    part = np.take(w, removed, axis=w_in)
    part = np.moveaxis(part, (w_out, w_in), (0, 1)).reshape(part.shape[w_out], len(removed), -1).sum(axis=2)
    delta = part @ values[removed]  # [out channels]
    if node.op_type == "Gemm":
        attrs = node_attrs(node)
        alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
        delta = delta * alpha / (beta if beta else 1.0)
        if beta == 0:
            set_attr(node, "beta", 1.0)
    dtype = ed.get(node.input[plan.data["weight"]]).dtype
    bias_index = plan.data.get("bias")
    if node.op_type == "MatMul":
        _matmul_bias(ed, node, delta.astype(dtype), graph, pos)
        return
    if bias_index is not None and len(node.input) > bias_index and node.input[bias_index]:
        b = ed.get(node.input[bias_index]).astype(np.float64)
        ed.set(ed.own(node, bias_index), (b + delta.reshape((1,) * (b.ndim - 1) + (-1,))
                                          if b.size > 1 else b + delta).astype(dtype))
    else:  # a new bias, already cut to the kept output channels
        out = node.output[0]
        name = ed.new(f"{node.name}_bias", (delta[pos[out]] if out in pos else delta).astype(dtype))
        if len(node.input) == 2:
            node.input.append(name)
        else:
            node.input[2] = name


def _matmul_bias(ed: _Editor, node, delta, graph, pos) -> None:
    """A MatMul has no bias input: add to the constant vector of the Add right after it, or insert one."""
    out = node.output[0]
    users = [n for n in graph.node if out in n.input]
    if len(users) == 1 and users[0].op_type == "Add":
        add = users[0]
        other = [i for i, n in enumerate(add.input) if n != out]
        if len(other) == 1 and add.input[other[0]] in ed.inits and ed.get(add.input[other[0]]).shape == delta.shape:
            i = other[0]  # the Add's own plan (visited later, in topological order) slices it
            ed.set(ed.own(add, i), (ed.get(add.input[i]) + delta).astype(delta.dtype))
            return
    new_out = unique_name(f"{out}_unfolded", ed.names)
    node.output[0] = new_out
    name = ed.new(f"{node.name}_fold", delta[pos[out]] if out in pos else delta)
    ed.extra_nodes.append(helper.make_node("Add", [new_out, name], [out],
                                           name=unique_name(f"{node.name}_fold", ed.names)))


def _resort(graph) -> None:
    from ...analysis.channel_groups import topological_nodes

    order = topological_nodes(graph)
    del graph.node[:]
    graph.node.extend(order)


def zero_channels(model: Model, cg: ChannelGroups, keep: dict[int, np.ndarray]) -> Model:
    """A copy where the channels `keep` drops are exactly zero wherever a zero-preserving op reads them."""
    check_keep(cg, keep)
    pos = positions(cg, keep)
    out = model.copy()
    ed = _Editor(out.proto)
    nodes = {n.name: n for n in out.graph.node}
    for name, plan in cg.plans.items():
        node = nodes[name]
        for idx, axis, tensor in plan.slices:
            if tensor not in pos or tensor != node.output[0]:
                continue
            if plan.kind == "norm" and node.op_type == "BatchNormalization" and idx not in (1, 2):
                continue
            if plan.kind == "elementwise" and node.op_type not in ("Add", "Sub"):
                continue
            arr = ed.get(node.input[idx]).copy()
            drop = np.setdiff1d(np.arange(arr.shape[axis]), pos[tensor])
            index = [slice(None)] * arr.ndim
            index[axis] = drop
            arr[tuple(index)] = 0
            ed.set(ed.own(node, idx), arr)
    ed.finish()
    return make_model_like(model, out.graph)


__all__ = ["build", "zero_channels", "positions", "check_keep"]
