"""Channel groups: every set of channels that must be removed together for a pruned graph to stay valid.

OTO calls them zero-invariant groups, Torch-Pruning / DepGraph dependency groups. One walk over the nodes in
topological order assigns every channel-carrying tensor a *tracked axis* and a *layout*: the tracked axis, read
as a concatenation of segments, each segment one group seen with a `repeat`:

- repeat 1: position i is channel i of the group (a conv output);
- integer repeat r: channel c owns the r consecutive positions c*r .. c*r+r-1 (a [N,C,H,W] -> [N,C*H*W] flatten);
- repeat 1/D: position h stands for the D channels h*D .. h*D+D-1 (attention heads after [B,S,H*D] ->
  [B,S,H,D]); the group may then only lose whole blocks of D channels.

Groups start at producers (Conv, ConvTranspose, Gemm, MatMul with a constant weight) and are merged by a
union-find wherever two layouts meet (residual Add/Sub/Mul, batched MatMul heads, contracted MatMul axes). Ops
this module has no rule for, graph outputs, shared weights, norms and softmaxes over the channel axis freeze the
groups they touch, with the reason kept for the report. What each node needs rewritten when channels go is kept
in `plans` for `prune_build`.

Each op's rule lives in `CHANNEL_RULES`, keyed by (domain, op_type); `register_channel_rule` (or the `channel_rule`
context manager) adds one for a custom op, either a built-in rule by name ("pass_through", "elementwise", "pool")
or a function `rule(cg, node, reads)` written against the helpers below, the way Torch-Pruning takes customized
pruners.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..core.editing import node_inputs

ONE = Fraction(1)

UNARY = {"Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
         "Softsign", "Gelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round",
         "Sign", "Sin", "Cos", "Identity", "Dropout", "Cast", "Clip", "Mish", "ThresholdedRelu", "IsNaN", "IsInf",
         "Not", "Shrink"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Equal", "Less",
               "Greater", "And", "Or"}
ZERO_PRESERVING = {"Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Tanh", "Gelu", "Erf", "Identity", "Dropout", "Cast",
                   "Clip", "Mish", "Abs", "Neg", "Sqrt", "Floor", "Ceil", "Round", "Sign", "Sin", "HardSwish",
                   "Softsign", "ThresholdedRelu", "Shrink"} | POOLS


@dataclass(frozen=True)
class Segment:
    group: int  # group id (resolve with ChannelGroups.find)
    repeat: Fraction  # positions on the axis per group channel

    def length(self, size: int) -> int:
        n = size * self.repeat
        return int(n)


@dataclass
class Tracked:
    axis: int  # negative: counted from the last axis, so broadcasting does not move it
    layout: tuple[Segment, ...]


@dataclass
class Group:
    """A root of the union-find, after the analysis: what the report and the pass need to know."""

    id: int
    size: int  # channels
    block: int  # channels leave in whole blocks of this many (attention heads)
    producers: list[str]
    consumers: list[str]
    tensors: list[str]
    reasons: list[str]

    @property
    def frozen(self) -> bool:
        return bool(self.reasons)

    @property
    def prunable(self) -> bool:
        return not self.reasons and self.size // self.block >= 2

    def summary(self) -> dict:
        return {"id": self.id, "size": self.size, "block": self.block, "producers": self.producers,
                "consumers": self.consumers, "frozen": "; ".join(self.reasons) if self.reasons else ""}


@dataclass
class SliceRecipe:
    """What a node needs when channels of its tracked inputs/outputs are removed."""

    kind: str
    # (input index, axis of that constant, tensor whose kept positions slice it)
    slices: list[tuple[int, int, str]] = field(default_factory=list)
    data: dict = field(default_factory=dict)


class ChannelGroups:
    """The analysis of one model. `groups()` lists the final groups; `tracked` maps tensor -> Tracked."""

    def __init__(self, model, infos=None):
        t0 = time.perf_counter()
        proto = model.proto
        graph = proto.graph
        self.model = model
        if infos is None:
            from .depgraph import tensor_infos

            infos = tensor_infos(proto)
        self.infos = infos
        self.inits = {t.name: t for t in graph.initializer}
        self.constants = model.constant_names()
        self._arrays: dict[str, np.ndarray] = {}
        self.use_count: dict[str, int] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node_inputs(node):  # reads inside If/Loop/Scan bodies are uses too
                if name:
                    self.use_count[name] = self.use_count.get(name, 0) + 1
                    self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in graph.output}
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.producer_of: dict[str, str] = {}
        # union-find
        self._parent: list[int] = []
        self._size: list[int] = []
        self._block: list[int] = []
        self._reasons: list[list[str]] = []
        self._producers: list[list[str]] = []
        self._consumers: list[list[str]] = []
        self.tracked: dict[str, Tracked] = {}
        self.plans: dict[str, SliceRecipe] = {}
        self.nodes: dict[str, onnx.NodeProto] = {}
        for node in topological_nodes(graph):
            self.nodes[node.name] = node
            for out in node.output:
                self.producer_of[out] = node.name
            self._visit(node)
        for name in self.graph_outputs:
            if name in self.tracked:
                self._freeze(self.tracked[name].layout, f"graph output {name!r}")
        self.seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------- union-find
    def _new(self, size: int, reason: str | None = None, producer: str | None = None) -> int:
        gid = len(self._parent)
        self._parent.append(gid)
        self._size.append(size)
        self._block.append(1)
        self._reasons.append([reason] if reason else [])
        self._producers.append([producer] if producer else [])
        self._consumers.append([])
        return gid

    def find(self, g: int) -> int:
        root = g
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[g] != root:
            self._parent[g], g = root, self._parent[g]
        return root

    def _union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self._size[ra] != self._size[rb]:  # cannot happen for aligned layouts; stay safe
            self._freeze_group(ra, f"{where} joins channel groups of different sizes")
            self._freeze_group(rb, f"{where} joins channel groups of different sizes")
            return
        self._parent[rb] = ra
        self._block[ra] = math.lcm(self._block[ra], self._block[rb])
        for attr in (self._reasons, self._producers, self._consumers):
            attr[ra].extend(x for x in attr[rb] if x not in attr[ra])

    def _freeze_group(self, g: int, reason: str) -> None:
        r = self.find(g)
        if reason not in self._reasons[r]:
            self._reasons[r].append(reason)

    def _freeze(self, layout, reason: str) -> None:
        for seg in layout:
            self._freeze_group(seg.group, reason)

    def _freeze_inputs(self, node, reason: str | None = None) -> None:
        reason = reason or f"read by {node.op_type} node {node.name!r} (no channel rule for it)"
        for name in node_inputs(node):
            if name in self.tracked:
                self._freeze(self.tracked[name].layout, reason)

    # ---------------------------------------------------------------------------------------------- helpers
    def length(self, layout) -> int:
        return sum(int(self._size[self.find(s.group)] * s.repeat) for s in layout)

    def segment_length(self, seg: Segment) -> int:
        return int(self._size[self.find(seg.group)] * seg.repeat)

    def array(self, name: str) -> np.ndarray | None:
        if name not in self.constants:
            return None
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.inits[name])
        return self._arrays[name]

    def shape(self, name: str) -> tuple | None:
        if name in self.inits:
            return tuple(self.inits[name].dims)
        info = self.infos.get(name)
        return None if info is None or info.shape is None else tuple(info.shape)

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def _unify(self, la, lb, where: str) -> bool:
        """Merge two layouts position by position; freeze both when their segments do not line up."""
        if len(la) == len(lb) and all(a.repeat == b.repeat and self.segment_length(a) == self.segment_length(b)
                                      for a, b in zip(la, lb)):
            for a, b in zip(la, lb):
                self._union(a.group, b.group, where)
            return True
        self._freeze(la, f"{where} joins channel layouts that do not line up")
        self._freeze(lb, f"{where} joins channel layouts that do not line up")
        return False

    def _set(self, tensor: str, axis: int, layout) -> None:
        self.tracked[tensor] = Tracked(axis, tuple(layout))

    def _weight_ok(self, node, index: int) -> bool:
        name = node.input[index] if len(node.input) > index else ""
        return bool(name) and name in self.constants and self.use_count.get(name, 0) == 1

    # ------------------------------------------------------------------------------------------------ visit
    def _visit(self, node: onnx.NodeProto) -> None:
        reads = [n for n in node.input if n in self.tracked]
        # If/Loop/Scan bodies are not walked, so what they do with the channels is unknown
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            self._freeze_inputs(node)
            return
        rule = CHANNEL_RULES.get((_domain(node.domain), node.op_type))
        if rule is None:  # an op we know nothing about may mix or read its channels: keep them all
            self._freeze_inputs(node)
            return
        if reads or rule.source:
            rule.apply(self, node, reads)

    # ---------------------------------------------------------------------------------------------- results
    def groups(self) -> list[Group]:
        members: dict[int, list[str]] = {}
        for tensor, tr in self.tracked.items():
            for seg in tr.layout:
                members.setdefault(self.find(seg.group), []).append(tensor)
        out = []
        for g in range(len(self._parent)):
            if self.find(g) != g:
                continue
            out.append(Group(g, self._size[g], self._block[g], list(self._producers[g]),
                             list(self._consumers[g]), list(dict.fromkeys(members.get(g, []))),
                             list(self._reasons[g])))
        return out

    def group(self, gid: int) -> Group:
        return next(g for g in self.groups() if g.id == self.find(gid))

    def summary(self) -> list[dict]:
        return [g.summary() for g in self.groups()]


# ------------------------------------------------------------------------------------------------ handlers
def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _producer(cg: ChannelGroups, node, reads, w_index: int, out_axis_of_w: int, in_axis_of_w: int,
              x_axis: int, bias_index: int | None, out_axis: int) -> None:
    """A node with a constant weight: consumes its input's channels, produces a new group."""
    x = node.input[0]
    w = cg.array(node.input[w_index]) if len(node.input) > w_index else None
    if w is None or not cg._weight_ok(node, w_index):
        why = "its weight is not a constant" if w is None else "its weight is shared with another node"
        cg._freeze_inputs(node, f"{node.op_type} {node.name!r}: {why}")
        if w is not None:
            g = cg._new(int(w.shape[out_axis_of_w]), f"{node.op_type} {node.name!r}: {why}", node.name)
            cg._set(node.output[0], out_axis, [Segment(g, ONE)])
        return
    plan = SliceRecipe("producer", data={"weight": w_index, "w_in_axis": in_axis_of_w, "w_out_axis": out_axis_of_w,
                                  "bias": bias_index})
    if x in cg.tracked:
        tr = cg.tracked[x]
        if tr.axis != x_axis:
            cg._freeze(tr.layout, f"{node.op_type} {node.name!r} reads its input with channels on another axis")
        else:
            plan.slices.append((w_index, in_axis_of_w, x))
            plan.data["consumes"] = x
            for seg in tr.layout:
                cg._consumers[cg.find(seg.group)].append(node.name)
    out = node.output[0]
    g = cg._new(int(w.shape[out_axis_of_w]), None, node.name)
    cg._set(out, out_axis, [Segment(g, ONE)])
    plan.slices.append((w_index, out_axis_of_w, out))
    if bias_index is not None and len(node.input) > bias_index and node.input[bias_index]:
        b = cg.array(node.input[bias_index])
        if b is None:
            cg._freeze_group(g, f"{node.op_type} {node.name!r}: its bias is not a constant")
        elif b.ndim >= 1 and b.shape[-1] == w.shape[out_axis_of_w]:
            plan.slices.append((bias_index, b.ndim - 1, out))
        elif b.size != 1:
            cg._freeze_group(g, f"{node.op_type} {node.name!r}: bias shape {b.shape} not understood")
    cg.plans[node.name] = plan


def _conv(cg, node, reads):
    w = cg.array(node.input[1])
    rank = None if w is None else w.ndim
    group = _attr(node, "group", 1)
    x = node.input[0]
    if w is None:
        cg._freeze_inputs(node, f"Conv {node.name!r}: its weight is not a constant")
        return
    axis = -(rank - 1)
    if group == 1:
        _producer(cg, node, reads, 1, 0, 1, axis, 2, axis)
        return
    c_in = w.shape[1] * group
    if w.shape[1] == 1 and w.shape[0] == c_in and x in cg.tracked and cg.tracked[x].axis == axis \
            and cg._weight_ok(node, 1):  # depthwise: channel i in -> channel i out
        plan = SliceRecipe("depthwise", slices=[(1, 0, node.output[0])])
        if len(node.input) > 2 and node.input[2]:
            if cg.array(node.input[2]) is None:
                cg._freeze_inputs(node, f"Conv {node.name!r}: its bias is not a constant")
                return
            plan.slices.append((2, 0, node.output[0]))
        cg.plans[node.name] = plan
        cg._set(node.output[0], axis, cg.tracked[x].layout)
        return
    kind = "depthwise Conv with a channel multiplier" if w.shape[1] == 1 else f"grouped Conv (group={group})"
    cg._freeze_inputs(node, f"{kind} {node.name!r}")
    g = cg._new(int(w.shape[0]), f"output of {kind} {node.name!r}", node.name)
    cg._set(node.output[0], axis, [Segment(g, ONE)])


def _conv_transpose(cg, node, reads):
    w = cg.array(node.input[1])
    if w is None or _attr(node, "group", 1) != 1 or _attr(node, "output_shape") is not None:
        cg._freeze_inputs(node, f"ConvTranspose {node.name!r}: non-constant weight, group > 1 or output_shape")
        return
    axis = -(w.ndim - 1)
    _producer(cg, node, reads, 1, 1, 0, axis, 2, axis)


def _gemm(cg, node, reads):
    if _attr(node, "transA", 0) or node.input[1] in cg.tracked:
        cg._freeze_inputs(node, f"Gemm {node.name!r} with transA or an activation as B")
        return
    trans_b = _attr(node, "transB", 0)
    _producer(cg, node, reads, 1, 0 if trans_b else 1, 1 if trans_b else 0, -1, 2, -1)


def _matmul(cg, node, reads):
    a, b = node.input[0], node.input[1]
    wb = cg.array(b)
    if wb is not None and wb.ndim == 2:
        if a in cg.tracked and cg.tracked[a].axis != -1:
            cg._freeze_inputs(node, f"MatMul {node.name!r} reads channels on its row axis")
            return
        _producer(cg, node, reads, 1, 1, 0, -1, None, -1)
        return
    if cg.array(a) is not None or wb is not None:
        cg._freeze_inputs(node, f"MatMul {node.name!r} with a constant of rank other than 2")
        return
    ta, tb = cg.tracked.get(a), cg.tracked.get(b)
    where = f"MatMul {node.name!r}"
    ra, rb = cg.rank(a), cg.rank(b)
    if ra is None or rb is None or ra < 2 or rb < 2:
        cg._freeze_inputs(node, f"{where}: operand ranks unknown or below 2")
        return
    out = node.output[0]
    if ta and tb and ta.axis == tb.axis and ta.axis <= -3:  # heads: a batch axis on both sides
        cg._unify(ta.layout, tb.layout, where)
        cg._set(out, ta.axis, ta.layout)
        cg.plans[node.name] = SliceRecipe("activation_matmul")
        return
    if ta and tb and ta.axis == -1 and tb.axis == -2:  # contracted on both sides
        cg._unify(ta.layout, tb.layout, where)
        cg.plans[node.name] = SliceRecipe("activation_matmul")
        return
    if ta and not tb and ta.axis == -2:
        cg._set(out, -2, ta.layout)
        return
    if tb and not ta and tb.axis == -1:
        cg._set(out, -1, tb.layout)
        return
    cg._freeze_inputs(node, f"{where}: channel axes of its operands not understood")


def _unary(cg, node, reads):
    x = node.input[0]
    others = [n for n in node.input[1:] if n in cg.tracked]
    if x not in cg.tracked or others:
        cg._freeze_inputs(node, f"{node.op_type} {node.name!r} takes channels in a parameter input")
        return
    tr = cg.tracked[x]
    cg._set(node.output[0], tr.axis, tr.layout)
    cg.plans[node.name] = SliceRecipe("unary")


def _pool(cg, node, reads):
    x = node.input[0]
    rank = cg.rank(x)
    if x not in cg.tracked or rank is None or cg.tracked[x].axis != -(rank - 1):
        cg._freeze_inputs(node, f"{node.op_type} {node.name!r} over the channel axis")
        return
    tr = cg.tracked[x]
    cg._set(node.output[0], tr.axis, tr.layout)


def _norm(cg, node, reads):
    """BatchNormalization / InstanceNormalization: per-channel parameters on axis 1."""
    x = node.input[0]
    rank = cg.rank(x)
    if x not in cg.tracked or rank is None or cg.tracked[x].axis != -(rank - 1) \
            or any(n in cg.tracked for n in node.input[1:]) \
            or any(cg.array(n) is None for n in node.input[1:] if n):
        cg._freeze_inputs(node, f"{node.op_type} {node.name!r}: channels not on axis 1 or non-constant parameters")
        return
    tr = cg.tracked[x]
    cg._set(node.output[0], tr.axis, tr.layout)
    cg.plans[node.name] = SliceRecipe("norm", slices=[(i, 0, node.output[0]) for i, n in enumerate(node.input)
                                               if i >= 1 and n])


def _layernorm(cg, node, reads):
    x = node.input[0]
    rank = cg.rank(x)
    if x not in cg.tracked or rank is None:
        cg._freeze_inputs(node)
        return
    axis = _attr(node, "axis", -1)
    start = axis - rank if axis >= 0 else axis  # normalised axes: [start, -1]
    tr = cg.tracked[x]
    if tr.axis >= start or any(n in cg.tracked for n in node.input[1:]):
        cg._freeze(tr.layout, f"normalised over its channels by {node.op_type} {node.name!r} (not zero-invariant)")
        cg._set(node.output[0], tr.axis, tr.layout)  # still the same (frozen) channels downstream
        return
    cg._set(node.output[0], tr.axis, tr.layout)


def _softmax(cg, node, reads):
    x = node.input[0]
    rank = cg.rank(x)
    tr = cg.tracked.get(x)
    if tr is None or rank is None:
        cg._freeze_inputs(node)
        return
    axis = _attr(node, "axis", -1 if cg.opset >= 13 else 1)
    axis = axis - rank if axis >= 0 else axis
    over = tr.axis == axis if cg.opset >= 13 else tr.axis >= axis
    if over:
        cg._freeze(tr.layout, f"{node.op_type} {node.name!r} over its channels")
        return
    cg._set(node.output[0], tr.axis, tr.layout)


def _elementwise(cg, node, reads):
    """Broadcasting ops: tracked operands must line up (a join), the others broadcast or are per-channel constants."""
    out = node.output[0]
    names = [n for n in node.input if n]
    tracked = [cg.tracked[n] for n in names if n in cg.tracked]
    axes = {t.axis for t in tracked}
    where = f"{node.op_type} {node.name!r}"
    if len(axes) != 1:
        cg._freeze_inputs(node, f"{where} combines tensors with channels on different axes")
        return
    axis = axes.pop()
    layout = tracked[0].layout
    for t in tracked[1:]:
        cg._unify(layout, t.layout, where)
    full = cg.length(layout)
    plan = SliceRecipe("elementwise")
    for i, n in enumerate(node.input):
        if not n or n in cg.tracked:
            continue
        shape = cg.shape(n)
        if shape is None:
            cg._freeze(layout, f"{where}: shape of {n!r} unknown")
            return
        dim = shape[len(shape) + axis] if len(shape) + axis >= 0 else 1
        if dim == 1:
            continue
        if dim == full and cg.array(n) is not None:
            plan.slices.append((i, len(shape) + axis, out))
            continue
        cg._freeze(layout, f"{where} combines its channels with {n!r}, which has no channel group")
        cg._set(out, axis, layout)  # the same (now frozen) channels flow on
        return
    cg._set(out, axis, layout)
    cg.plans[node.name] = plan


def _concat(cg, node, reads):
    out = node.output[0]
    rank = cg.rank(out) or cg.rank(reads[0])
    axes = {cg.tracked[n].axis for n in reads}
    if rank is None or len(axes) != 1:
        cg._freeze_inputs(node, f"Concat {node.name!r}: ranks unknown or channels on different axes")
        return
    axis = axes.pop()
    cat = _attr(node, "axis")
    cat = cat - rank if cat >= 0 else cat
    where = f"Concat {node.name!r}"
    if cat != axis:  # concatenation along another axis: every input keeps the same channels
        layout = cg.tracked[reads[0]].layout
        for n in node.input:
            if n in cg.tracked:
                cg._unify(layout, cg.tracked[n].layout, where)
            elif n:
                cg._freeze(layout, f"{where} concatenates its channels with {n!r}, which has no channel group")
                return
        cg._set(out, axis, layout)
        return
    layout = []
    for n in node.input:
        if n in cg.tracked:
            layout.extend(cg.tracked[n].layout)
            continue
        shape = cg.shape(n)
        size = shape[rank + axis] if shape is not None and len(shape) == rank else None
        if not isinstance(size, int):
            cg._freeze_inputs(node, f"{where}: channel count of input {n!r} unknown")
            return
        if size:
            layout.append(Segment(cg._new(size, f"{where}: input {n!r} has no channel group"), ONE))
    cg._set(out, axis, layout)


def _cut(cg, layout, start: int, stop: int, where: str):
    """The sub-layout for positions [start, stop), or None (and the straddled groups frozen) if it cuts a segment."""
    pos, sub, bad = 0, [], []
    for seg in layout:
        n = cg.segment_length(seg)
        lo, hi = pos, pos + n
        if lo >= start and hi <= stop:
            sub.append(seg)
        elif hi > start and lo < stop:
            bad.append(seg)
        pos = hi
    if bad:
        cg._freeze(bad, f"{where} cuts a channel group in the middle")
        return None
    return sub


def _split(cg, node, reads):
    x = node.input[0]
    tr, rank = cg.tracked.get(x), cg.rank(x)
    if tr is None or rank is None or any(n in cg.tracked for n in node.input[1:]):
        cg._freeze_inputs(node)
        return
    axis = _attr(node, "axis", 0)
    axis = axis - rank if axis >= 0 else axis
    outs = list(node.output)
    if axis != tr.axis:
        for o in outs:
            cg._set(o, tr.axis, tr.layout)
        return
    full = cg.length(tr.layout)
    if len(node.input) > 1 and node.input[1]:
        sizes = cg.array(node.input[1])
        sizes = None if sizes is None else [int(v) for v in sizes]
    elif _attr(node, "split") is not None:
        sizes = list(_attr(node, "split"))
    else:
        k = len(outs)
        step = -(-full // k)
        sizes = [min(step, full - i * step) for i in range(k)]
    if sizes is None or sum(sizes) != full:
        cg._freeze(tr.layout, f"Split {node.name!r}: split sizes not constant")
        return
    pos, subs = 0, []
    for o, s in zip(outs, sizes):
        sub = _cut(cg, tr.layout, pos, pos + s, f"Split {node.name!r}")
        if sub is None:
            return
        subs.append((o, sub))
        pos += s
    for o, sub in subs:
        cg._set(o, tr.axis, sub)
    cg.plans[node.name] = SliceRecipe("split", data={"source": x})


def _slice(cg, node, reads):
    x = node.input[0]
    tr, rank = cg.tracked.get(x), cg.rank(x)
    consts = [cg.array(n) if n else None for n in node.input[1:]]
    if tr is None or rank is None or any(n in cg.tracked for n in node.input[1:]) or cg.opset < 10 \
            or any(c is None for c, n in zip(consts, node.input[1:]) if n):
        cg._freeze_inputs(node, f"Slice {node.name!r}: non-constant starts/ends/axes/steps")
        return
    starts, ends = consts[0], consts[1]
    axes = consts[2] if len(consts) > 2 and consts[2] is not None else np.arange(len(starts))
    steps = consts[3] if len(consts) > 3 and consts[3] is not None else np.ones(len(starts), np.int64)
    axes = [int(a) - rank if a >= 0 else int(a) for a in axes]
    if tr.axis not in axes:
        cg._set(node.output[0], tr.axis, tr.layout)
        return
    i = axes.index(tr.axis)
    full = cg.length(tr.layout)
    if int(steps[i]) != 1:
        cg._freeze(tr.layout, f"Slice {node.name!r} with a step over the channels")
        return
    lo, hi = int(starts[i]), int(ends[i])
    lo = max(0, min(full, lo + full if lo < 0 else lo))
    hi = max(0, min(full, hi + full if hi < 0 else hi))
    sub = _cut(cg, tr.layout, lo, hi, f"Slice {node.name!r}")
    if sub is None:
        return
    cg._set(node.output[0], tr.axis, sub)
    cg.plans[node.name] = SliceRecipe("slice", data={"source": x, "index": i, "start": lo, "stop": hi})


def _transpose(cg, node, reads):
    x = node.input[0]
    tr = cg.tracked[x]
    perm = _attr(node, "perm")
    rank = len(perm) if perm is not None else cg.rank(x)
    if rank is None:
        cg._freeze_inputs(node)
        return
    perm = list(perm) if perm is not None else list(range(rank))[::-1]
    p = rank + tr.axis
    cg._set(node.output[0], perm.index(p) - rank, tr.layout)


def _axes(cg, node) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        a = cg.array(node.input[1])
        return None if a is None else [int(v) for v in np.ravel(a)]
    a = _attr(node, "axes")
    return None if a is None else list(a)


def _unsqueeze(cg, node, reads):
    x = node.input[0]
    tr, rank = cg.tracked[x], cg.rank(x)
    axes = _axes(cg, node)
    if rank is None or axes is None:
        cg._freeze_inputs(node)
        return
    out_rank = rank + len(axes)
    axes = sorted(a + out_rank if a < 0 else a for a in axes)
    p = rank + tr.axis
    kept = [i for i in range(out_rank) if i not in axes]
    cg._set(node.output[0], kept[p] - out_rank, tr.layout)


def _squeeze(cg, node, reads):
    x = node.input[0]
    tr, shape = cg.tracked[x], cg.shape(x)
    axes = _axes(cg, node)
    if shape is None:
        cg._freeze_inputs(node)
        return
    rank = len(shape)
    p = rank + tr.axis
    if axes is None:
        axes = [i for i, d in enumerate(shape) if d == 1]
        if any(not isinstance(d, int) for d in shape):
            cg._freeze_inputs(node)
            return
    axes = [a + rank if a < 0 else a for a in axes]
    if p in axes:
        cg._freeze(tr.layout, f"Squeeze {node.name!r} removes the channel axis")
        return
    kept = [i for i in range(rank) if i not in axes]
    cg._set(node.output[0], kept.index(p) - len(kept), tr.layout)


def _flatten(cg, node, reads):
    x = node.input[0]
    tr, shape = cg.tracked[x], cg.shape(x)
    if shape is None:
        cg._freeze_inputs(node)
        return
    rank = len(shape)
    axis = _attr(node, "axis", 1)
    axis = axis + rank if axis < 0 else axis
    p = rank + tr.axis
    after = shape[p + 1:]
    before = shape[axis:p]
    if p < axis or any(d != 1 for d in before) or not all(isinstance(d, int) for d in after):
        cg._freeze(tr.layout, f"Flatten {node.name!r} mixes the channels with other axes")
        return
    r = int(np.prod(after)) if after else 1
    cg._set(node.output[0], -1, [Segment(s.group, s.repeat * r) for s in tr.layout])


def _shape_source(cg, name: str, user: str):
    """The shape vector of a Reshape as a list of (value or None, source); source says where to rewrite it."""
    arr = cg.array(name)
    if arr is not None:
        return [(int(v), ("init", name, i, user)) for i, v in enumerate(arr)]
    prod = cg.producer_of.get(name)
    node = cg.nodes.get(prod) if prod else None
    if node is None or node.op_type != "Concat" or cg.use_count.get(name, 0) != 1:
        return None
    out = []
    for piece in node.input:
        a = cg.array(piece)
        if a is not None:
            out.extend((int(v), ("init", piece, i, node.name)) for i, v in enumerate(np.ravel(a)))
        else:
            shape = cg.shape(piece)
            if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
                return None
            out.extend((None, None) for _ in range(shape[0]))
    return out


def _reshape(cg, node, reads):
    x = node.input[0]
    tr, shape_in = cg.tracked[x], cg.shape(x)
    if node.input[1] in cg.tracked or shape_in is None:
        cg._freeze_inputs(node)
        return
    rank = len(shape_in)
    out_shape = cg.shape(node.output[0])
    spec = _shape_source(cg, node.input[1], node.name)
    where = f"Reshape {node.name!r}"
    if spec is None:
        cg._freeze(tr.layout, f"{where}: target shape neither constant nor a Concat of constants and dims")
        return
    rank_out = len(spec)
    p = rank + tr.axis
    full = cg.length(tr.layout)
    values = [v for v, _ in spec]
    if p == rank - 1 and rank_out == rank + 1 and values[-1] not in (None, -1, 0) and full % values[-1] == 0 \
            and values[-2] in (full // values[-1], -1):  # [.., H*D] -> [.., H, D]: heads
        d = values[-1]
        ok = all(cg.segment_length(s) % d == 0 and (s.repeat.denominator == 1) for s in tr.layout)
        if not ok:
            cg._freeze(tr.layout, f"{where} splits into heads of {d} that cut a channel group")
            return
        for s in tr.layout:
            r = cg.find(s.group)
            per = int(d / s.repeat) if s.repeat >= 1 else None
            if per is None or d % s.repeat.numerator:
                cg._freeze_group(r, f"{where} splits heads across a repeated layout")
                return
            cg._block[r] = math.lcm(cg._block[r], per)
        cg._set(node.output[0], -2, [Segment(s.group, s.repeat / d) for s in tr.layout])
        cg.plans[node.name] = SliceRecipe("reshape", data={"spec": spec[-2][1], "value": values[-2]})
        return
    repeats = {s.repeat for s in tr.layout}
    d = shape_in[-1] if isinstance(shape_in[-1], int) else \
        (repeats.pop().denominator if len(repeats) == 1 and next(iter(repeats)).numerator == 1 else None)
    if p == rank - 2 and rank_out == rank - 1 and d is not None \
            and values[-1] in (full * d, -1):  # [.., H, D] -> [.., H*D]: heads merged
        cg._set(node.output[0], -1, [Segment(s.group, s.repeat * d) for s in tr.layout])
        cg.plans[node.name] = SliceRecipe("reshape", data={"spec": spec[-1][1], "value": values[-1]})
        return
    after = shape_in[p + 1:]
    if rank_out == p + 1 and all(isinstance(d, int) for d in after) \
            and values[-1] in (full * int(np.prod(after or [1])), -1) \
            and all(v == 0 or v == shape_in[i] or (v == -1 and values[-1] != -1) for i, v in enumerate(values[:-1])):
        r = int(np.prod(after or [1]))  # [.., C, H, W] -> [.., C*H*W]: each channel owns H*W features
        cg._set(node.output[0], -1, [Segment(s.group, s.repeat * r) for s in tr.layout])
        cg.plans[node.name] = SliceRecipe("reshape", data={"spec": spec[-1][1], "value": values[-1]})
        return
    if out_shape is not None and rank_out == rank and p == rank - 1 and values[-1] == full:
        cg._set(node.output[0], -1, tr.layout)  # leading axes reshaped, channels untouched
        cg.plans[node.name] = SliceRecipe("reshape", data={"spec": spec[-1][1], "value": values[-1]})
        return
    cg._freeze(tr.layout, f"{where} reshapes the channel axis in a way not understood")


def _shape(cg, node, reads):
    """Shape of a tracked tensor is harmless when only other dims are read from it (Gather of a constant index)."""
    x = node.input[0]
    tr, rank = cg.tracked[x], cg.rank(x)
    start = _attr(node, "start", 0)
    end = _attr(node, "end", None)
    if rank is None:
        cg._freeze(tr.layout, f"Shape {node.name!r} of a tensor of unknown rank")
        return
    start = start + rank if start < 0 else start
    end = rank if end is None else (end + rank if end < 0 else min(end, rank))
    p = rank + tr.axis
    if not start <= p < end:
        return
    for user in cg.consumers.get(node.output[0], []):
        idx = cg.array(user.input[1]) if user.op_type == "Gather" and len(user.input) > 1 else None
        if idx is None or any(start + (int(v) if v >= 0 else int(v) + end - start) == p for v in np.ravel(idx)):
            cg._freeze(tr.layout, f"the channel count of {x!r} is read (Shape {node.name!r})")
            return


def _gather(cg, node, reads):
    x = node.input[0]
    if x not in cg.tracked or node.input[1] in cg.tracked:
        cg._freeze_inputs(node)
        return
    tr, rank = cg.tracked[x], cg.rank(x)
    idx = cg.shape(node.input[1])
    axis = _attr(node, "axis", 0)
    if rank is None or idx is None:
        cg._freeze_inputs(node)
        return
    axis = axis + rank if axis < 0 else axis
    p = rank + tr.axis
    if axis == p:
        cg._freeze(tr.layout, f"Gather {node.name!r} picks channels")
        return
    out_rank = rank - 1 + len(idx)
    q = p if p < axis else p - 1 + len(idx)
    cg._set(node.output[0], q - out_rank, tr.layout)


def _reduce(cg, node, reads):
    x = node.input[0]
    tr, rank = cg.tracked[x], cg.rank(x)
    axes = _axes(cg, node) if (len(node.input) > 1 and node.input[1]) or _attr(node, "axes") is not None else []
    if rank is None or axes is None:
        cg._freeze_inputs(node)
        return
    axes = [a + rank if a < 0 else a for a in axes]
    p = rank + tr.axis
    if not axes or p in axes:
        if not axes and _attr(node, "noop_with_empty_axes", 0):
            cg._set(node.output[0], tr.axis, tr.layout)
            return
        cg._freeze(tr.layout, f"{node.op_type} {node.name!r} reduces over the channels")
        return
    if _attr(node, "keepdims", 1):
        cg._set(node.output[0], tr.axis, tr.layout)
        return
    kept = [i for i in range(rank) if i not in axes]
    cg._set(node.output[0], kept.index(p) - len(kept), tr.layout)


def _pad(cg, node, reads):
    x = node.input[0]
    tr, rank = cg.tracked[x], cg.rank(x)
    pads = cg.array(node.input[1]) if len(node.input) > 1 and node.input[1] else _attr(node, "pads")
    axes = cg.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if rank is None or pads is None or any(n in cg.tracked for n in node.input[1:]):
        cg._freeze_inputs(node)
        return
    pads = [int(v) for v in np.ravel(pads)]
    axes = list(range(rank)) if axes is None else [int(a) + rank if a < 0 else int(a) for a in axes]
    p = rank + tr.axis
    k = len(axes)
    if p in axes and (pads[axes.index(p)] or pads[k + axes.index(p)]):
        cg._freeze(tr.layout, f"Pad {node.name!r} pads the channel axis")
        return
    cg._set(node.output[0], tr.axis, tr.layout)


def _resize(cg, node, reads):
    x = node.input[0]
    tr, rank = cg.tracked[x], cg.rank(x)
    scales = cg.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    sizes = node.input[3] if len(node.input) > 3 else ""
    if rank is None or scales is None or sizes or scales.size != rank or scales[rank + tr.axis] != 1:
        cg._freeze(tr.layout, f"Resize {node.name!r}: only constant scales of 1 on the channel axis are supported")
        return
    cg._set(node.output[0], tr.axis, tr.layout)


# --------------------------------------------------------------------------------------------- rule registry
@dataclass(frozen=True)
class ChannelRule:
    """How one op type moves channel layouts from its inputs to its outputs.

    `apply(cg, node, reads)` (reads: the node's inputs that carry channels) sets `cg.tracked` for the outputs it
    passes channels to (`cg._set`), joins layouts (`cg._unify`), freezes what it cannot follow (`cg._freeze`,
    `cg._freeze_inputs`) and records in `cg.plans[node.name]` what the build must slice (a SliceRecipe("elementwise")
    slice for a per-channel constant, for instance). An output it does not track carries no channels.
    """

    apply: Callable[[ChannelGroups, onnx.NodeProto, list[str]], None]
    source: bool = False  # also applied to nodes that read no channels (producers start new groups)


# Ready-made rules a custom op can reuse by name.
BUILTIN_RULES: dict[str, ChannelRule] = {
    "pass_through": ChannelRule(_unary),  # one channel in -> the same channel out; other inputs carry none
    "elementwise": ChannelRule(_elementwise),  # broadcasting join; per-channel constant inputs are sliced
    "pool": ChannelRule(_pool),  # works over the spatial axes, channels on axis 1
}

_REDUCES = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
            "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")

# (domain, op_type) -> rule; the default ONNX domain is "". Extend it with register_channel_rule.
CHANNEL_RULES: dict[tuple[str, str], ChannelRule] = {
    **{("", op): ChannelRule(fn, source=True) for op, fn in (
        ("Conv", _conv), ("ConvTranspose", _conv_transpose), ("Gemm", _gemm), ("MatMul", _matmul))},
    **{("", op): BUILTIN_RULES["pass_through"] for op in UNARY},
    **{("", op): BUILTIN_RULES["pool"] for op in POOLS},
    **{("", op): ChannelRule(_norm) for op in ("BatchNormalization", "InstanceNormalization")},
    ("", "LayerNormalization"): ChannelRule(_layernorm),
    **{("", op): ChannelRule(_softmax) for op in ("Softmax", "LogSoftmax", "Hardmax")},
    **{("", op): BUILTIN_RULES["elementwise"] for op in ELEMENTWISE},
    **{("", op): ChannelRule(fn) for op, fn in (
        ("Concat", _concat), ("Split", _split), ("Slice", _slice), ("Transpose", _transpose),
        ("Unsqueeze", _unsqueeze), ("Squeeze", _squeeze), ("Flatten", _flatten), ("Reshape", _reshape),
        ("Shape", _shape), ("Gather", _gather), ("Pad", _pad), ("Resize", _resize))},
    **{("", op): ChannelRule(_reduce) for op in _REDUCES},
}


def _domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def _as_rule(rule) -> ChannelRule:
    """A ChannelRule, the name of a built-in rule, or a function apply(cg, node, reads)."""
    if isinstance(rule, ChannelRule):
        return rule
    if isinstance(rule, str):
        if rule not in BUILTIN_RULES:
            raise ValueError(f"unknown channel rule {rule!r}: the built-in ones are {sorted(BUILTIN_RULES)}")
        return BUILTIN_RULES[rule]
    if callable(rule):
        try:
            inspect.signature(rule).bind(None, None, None)
        except TypeError:
            raise TypeError(f"channel rule {rule!r} must take (cg, node, reads)") from None
        except ValueError:  # no signature to inspect (some builtins): let the call decide
            pass
        return ChannelRule(rule)
    raise TypeError(f"a channel rule is a ChannelRule, a function rule(cg, node, reads) or one of "
                    f"{sorted(BUILTIN_RULES)}; got {type(rule).__name__} {rule!r}")


def register_channel_rule(op_type: str, rule, domain: str = "") -> ChannelRule | None:
    """Make the analysis follow channels through `op_type` of `domain`; returns the rule it replaces, if any."""
    if not isinstance(op_type, str) or not op_type or not isinstance(domain, str):
        raise TypeError(f"op_type and domain must be strings (got {op_type!r}, {domain!r})")
    rule = _as_rule(rule)  # validate before touching the registry
    key = (_domain(domain), op_type)
    previous = CHANNEL_RULES.get(key)
    CHANNEL_RULES[key] = rule
    return previous


def unregister_channel_rule(op_type: str, domain: str = "") -> ChannelRule | None:
    """Forget the rule for `op_type` of `domain` (its groups freeze again); returns it, or None if there was none."""
    return CHANNEL_RULES.pop((_domain(domain), op_type), None)


@contextmanager
def channel_rule(op_type: str, rule, domain: str = ""):
    """`register_channel_rule` for the duration of a `with` block; the previous rule (or none) comes back after."""
    previous = register_channel_rule(op_type, rule, domain)
    try:
        yield CHANNEL_RULES[(_domain(domain), op_type)]
    finally:
        if previous is None:
            unregister_channel_rule(op_type, domain)
        else:
            CHANNEL_RULES[(_domain(domain), op_type)] = previous


def topological_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes with producers first (ONNX requires it; files that break the rule are re-sorted, Kahn's algorithm)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    done, order, pending = set(known), [], nodes
    while pending:
        rest = []
        for node in pending:
            if all(i in done for i in node.input):
                order.append(node)
                done.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # inputs nobody produces (outer scope): keep file order for the rest
            order.extend(rest)
            break
        pending = rest
    return order


def analyse(model, infos=None) -> ChannelGroups:
    """The channel groups of a Model (its top-level graph)."""
    return ChannelGroups(model, infos)


__all__ = ["ChannelGroups", "Group", "SliceRecipe", "Segment", "Tracked", "analyse", "ZERO_PRESERVING", "ChannelRule",
           "CHANNEL_RULES", "BUILTIN_RULES", "register_channel_rule", "unregister_channel_rule", "channel_rule"]
