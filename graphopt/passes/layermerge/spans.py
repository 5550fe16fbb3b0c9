"""Positions and spans of a CNN, read from its dependency graph (what LayerMerge hard-codes per architecture).

A *chain* is a run of conv units where each unit reads the previous one's output. A *unit* is one Conv (BN is
already folded by cleanup), then optionally a residual Add, then optionally an element-wise activation. Position 0
of a chain is its input tensor and position j the output of unit j. A *skip* (s, t) is a residual Add at unit t
whose other operand is position s of the same chain, directly or through a projection conv (ResNet's 1x1
downsample). An Add whose other operand comes from elsewhere is kept as it is and may only end a span.

A span (st, end] replaces units st+1..end by one conv (keeping the activation at `end`). It is valid when no
interior position is a break (read by anything outside the span: a Concat, a graph output, a second branch), it
does not cut a residual block in half (it lies inside one branch or contains whole blocks), and after a strided
conv only 1x1 convs follow inside it (LayerMerge's stride rule: the merged stride stays on the first conv).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
from onnx import numpy_helper

from ...analysis.depgraph import DependencyGraph
from ...core.editing import node_attrs
from ...core.model import Model

# element-wise activations a unit may end with (one input, or Clip with constant bounds)
ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus",
               "Gelu", "Mish", "Celu", "ThresholdedRelu"}


@dataclass
class Conv:
    """One Conv's weight and geometry (2-D, dilation 1, group 1 or depthwise)."""

    node: str
    weight: np.ndarray  # [Cout, Cin/group, kh, kw]
    bias: np.ndarray | None
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    group: int

    @property
    def cout(self) -> int:
        return self.weight.shape[0]

    @property
    def cin(self) -> int:
        return self.weight.shape[1] * self.group

    @property
    def kernel(self) -> tuple[int, int]:
        return tuple(self.weight.shape[2:])

    @property
    def depthwise(self) -> bool:
        return self.group > 1 and self.group == self.cout == self.cin

    @property
    def reducible(self) -> bool:
        """May be replaced by identity inside a merged span (LayerMerge: Cin = Cout and stride 1)."""
        return self.cin == self.cout and self.strides == (1, 1)


@dataclass
class Unit:
    conv: Conv
    add: str | None = None  # residual Add node after the conv
    skip_from: int | None = None  # chain position the Add reads (None: from outside the chain)
    skip_tensor: str | None = None  # the Add's other operand
    projection: Conv | None = None  # conv on the skip branch
    act: str | None = None  # activation node
    conv_output: str = ""
    pre_act: str = ""  # tensor before the activation (the Add's or the conv's output)
    output: str = ""  # the unit's output tensor: its chain position


@dataclass
class Chain:
    input: str
    units: list[Unit] = field(default_factory=list)
    breaks: dict[int, str] = field(default_factory=dict)  # interior position -> why no span may pass it

    @property
    def length(self) -> int:
        return len(self.units)

    def position(self, j: int) -> str:
        return self.input if j == 0 else self.units[j - 1].output

    def skips(self) -> list[tuple[int, int]]:
        return [(u.skip_from, t) for t, u in enumerate(self.units, start=1) if u.skip_from is not None]


@dataclass
class Span:
    chain: int
    st: int
    end: int

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.chain, self.st, self.end)


@dataclass
class Structure:
    chains: list[Chain]
    notes: list[str]  # why a conv is not in any chain, or why a chain ends
    spans: list[Span]
    rejected: dict[tuple[int, int, int], str]  # (chain, st, end) -> why the span is not valid (within max_units)

    def summary(self) -> dict:
        """What `graphopt inspect` shows: positions, valid spans and the breaks."""
        chains = []
        for i, c in enumerate(self.chains):
            units = []
            for j, u in enumerate(c.units, start=1):
                units.append({"position": j, "conv": u.conv.node,
                              "kernel": list(u.conv.kernel), "stride": list(u.conv.strides),
                              "channels": [u.conv.cin, u.conv.cout], "depthwise": u.conv.depthwise,
                              "skip_from": u.skip_from, "projection": u.projection.node if u.projection else None,
                              "external_add": bool(u.add and u.skip_from is None), "activation": u.act})
            chains.append({"input": c.input, "units": units,
                           "breaks": {str(k): v for k, v in sorted(c.breaks.items())},
                           "spans": [[s.st, s.end] for s in self.spans if s.chain == i and s.end - s.st > 1]})
        return {"chains": chains, "notes": self.notes,
                "multi_unit_spans": sum(1 for s in self.spans if s.end - s.st > 1)}


def _conv(dg: DependencyGraph, name: str) -> tuple[Conv | None, str]:
    node = dg.node(name)
    if node.domain not in ("", "ai.onnx"):
        return None, "custom domain"
    if len(node.input) < 2 or node.input[1] not in dg.constants or node.input[1] not in dg.model.initializers():
        return None, "its weight is not a constant"
    if len(node.input) > 2 and node.input[2] and node.input[2] not in dg.model.initializers():
        return None, "its bias is not a constant"
    inits = dg.model.initializers()
    w = numpy_helper.to_array(inits[node.input[1]])
    if w.ndim != 4:
        return None, f"{w.ndim - 2}-D conv (only 2-D convs merge)"
    a = node_attrs(node)
    if any(d != 1 for d in a.get("dilations", [1, 1])):
        return None, "dilated conv has no merge rule"
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID", ""):
        return None, f"auto_pad={auto_pad} (explicit pads only)"
    group = int(a.get("group", 1))
    conv = Conv(name, w, numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2]
                else None, tuple(a.get("strides", [1, 1])), tuple(a.get("pads", [0, 0, 0, 0])), group)
    if group != 1 and not conv.depthwise:
        return None, f"grouped conv (group={group}) has no merge rule"
    return conv, ""


def _single_reader(dg: DependencyGraph, tensor: str) -> str | None:
    readers = dg.consumers(tensor)
    if len(readers) != 1 or dg.is_graph_output(tensor):
        return None
    return readers[0]


def _is_activation(dg: DependencyGraph, name: str) -> bool:
    node = dg.node(name)
    if node.op_type not in ACTIVATIONS or node.domain not in ("", "ai.onnx"):
        return False
    return len(dg.activation_inputs(name)) == 1 and all(t in dg.constants for t in node.input[1:] if t)


def find_structure(model: Model, max_units: int = 6) -> Structure:
    """Chains, positions, skips, breaks and the valid spans of up to `max_units` units."""
    dg = DependencyGraph(model)
    notes: list[str] = []
    convs: dict[str, Conv] = {}
    for name in dg.topological_order():
        if dg.op_type(name) != "Conv":
            continue
        conv, why = _conv(dg, name)
        if conv is None:
            notes.append(f"{name}: {why}")
        else:
            convs[name] = conv
    projections = _projections(dg, convs)
    chains: list[Chain] = []
    where: dict[str, tuple[int, int]] = {}  # position tensor -> (chain, position)
    for name in dg.topological_order():
        if name not in convs or name in projections:
            continue
        node = dg.node(name)
        x = node.input[0]
        if x in where and where[x][1] == chains[where[x][0]].length:  # reads the last position of a chain
            chain_id = where[x][0]
        else:
            chain_id = len(chains)
            chains.append(Chain(x))
            where.setdefault(x, (chain_id, 0))
            producer = dg.producer(x)
            if chain_id > 0:
                what = (f"{dg.op_type(producer)} {producer}" if producer else "a graph input")
                notes.append(f"chain {chain_id} starts at {name}: its input comes from {what}, which has no merge "
                             "rule")
        chain = chains[chain_id]
        unit = Unit(convs[name], conv_output=node.output[0])
        out = node.output[0]
        reader = _single_reader(dg, out)
        if reader is not None and dg.op_type(reader) in ("Add", "Sum") and len(dg.activation_inputs(reader)) == 2 \
                and len(dg.node(reader).input) == 2:
            other = next(t for t in dg.node(reader).input if t != out)
            source = other
            proj = projections.get(dg.producer(other) or "")
            if proj is not None:
                source = dg.node(proj.node).input[0]
            unit.add, unit.skip_tensor, unit.projection = reader, other, proj
            if source in where and where[source][0] == chain_id:
                unit.skip_from = where[source][1]
            elif proj is not None:  # a projection from outside the chain: keep it as a plain external Add
                unit.projection = None
            out = dg.node(reader).output[0]
        unit.pre_act = out
        reader = _single_reader(dg, out)
        if reader is not None and dg.op_type(reader) == "BatchNormalization":
            notes.append(f"{name} feeds BatchNormalization {reader}: fold it first (--pass fold_batchnorm) so that the "
                         "conv and its activation form one position")
        if reader is not None and _is_activation(dg, reader):
            unit.act = reader
            out = dg.node(reader).output[0]
        unit.output = out
        chain.units.append(unit)
        where[out] = (chain_id, chain.length)
    for c in chains:
        _mark_breaks(dg, c)
    spans, rejected = _valid_spans(chains, max_units)
    return Structure(chains, notes, spans, rejected)


def _projections(dg: DependencyGraph, convs: dict[str, Conv]) -> dict[str, Conv]:
    """Convs on the short side of a residual Add: 1x1, read a tensor the Add's other operand descends from, and
    feed only the Add (ResNet's downsample shortcut)."""
    out = {}
    for join in dg.joins():
        if join.op_type != "Add" or len(join.branch_inputs) != 2:
            continue
        for mine, theirs in (join.branch_inputs, join.branch_inputs[::-1]):
            p = dg.producer(mine)
            if p not in convs or convs[p].kernel != (1, 1) or dg.consumers(mine) != [join.node]:
                continue
            src = dg.producer(dg.node(p).input[0])
            other = dg.producer(theirs)
            if other is None or other == src or dg.op_type(other) != "Conv":
                continue
            if src is None or nx.has_path(dg.nx, src, other):
                out[p] = convs[p]
                break
    return out


def _mark_breaks(dg: DependencyGraph, c: Chain) -> None:
    """Interior positions a span may not pass: their tensor is read by more than the chain itself."""
    for j in range(1, c.length):
        tensor = c.position(j)
        if dg.is_graph_output(tensor):
            c.breaks[j] = "a graph output"
            continue
        allowed = {c.units[j].conv.node}
        for u in c.units:
            if u.skip_from == j:
                allowed.add(u.projection.node if u.projection else u.add)
        others = [r for r in dg.consumers(tensor) if r not in allowed]
        if others:
            r = others[0]
            c.breaks[j] = f"also read by {dg.op_type(r)} {r}" + (f" (+{len(others) - 1} more)" if len(others) > 1
                                                                  else "")


def span_problem(c: Chain, st: int, end: int) -> str:
    """Why (st, end] is not a valid span of chain c, or '' if it is."""
    for j in range(st + 1, end):
        if j in c.breaks:
            return f"position {j} is a break ({c.breaks[j]})"
    for t, u in enumerate(c.units[st:end], start=st + 1):
        if u.add is not None and u.skip_from is None and t < end:
            return f"the Add at position {t} reads a tensor from outside the chain"
    for s, t in c.skips():
        if st < s < end < t:
            return f"cuts the residual block ({s}, {t}] in half (its source is inside the span)"
        if s < st < t < end:
            return f"cuts the residual block ({s}, {t}] in half (its Add is inside the span)"
    strided = False
    for u in c.units[st:end]:
        if strided and u.conv.kernel != (1, 1):
            return f"a {u.conv.kernel[0]}x{u.conv.kernel[1]} conv follows a strided conv ({u.conv.node})"
        strided = strided or u.conv.strides != (1, 1)
    for s, t in c.skips():
        u = c.units[t - 1]
        if st <= s and t <= end and u.projection is not None and strided and u.projection.strides == (1, 1):
            return "a projection shortcut with a different stride"
    return ""


def _valid_spans(chains: list[Chain], max_units: int):
    spans, rejected = [], {}
    for i, c in enumerate(chains):
        for st in range(c.length):
            for end in range(st + 1, min(c.length, st + max_units) + 1):
                why = span_problem(c, st, end) if end - st > 1 else ""
                if why:
                    rejected[(i, st, end)] = why
                else:
                    spans.append(Span(i, st, end))
    return spans, rejected


__all__ = ["ACTIVATIONS", "Chain", "Conv", "Span", "Structure", "Unit", "find_structure", "span_problem"]
