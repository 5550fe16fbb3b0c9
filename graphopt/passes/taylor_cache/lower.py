"""The graph forms of the cache.

`if`: one model. Each region's nodes move into the full branch of an `If` on the bool input `taylor.full` (or the
gate's decision); that branch also refreshes the region's Taylor factors, the forecast branch computes them into
the target and skips the region. The factors of a region are one state tensor [order+1, *target shape]: an input
`taylor.<region>` and an output `taylor.<region>.next`, swapped by the driver like a KV cache. Weights stay in the
outer graph (the branches read them by name). The condition is always an input or computed from inputs, so
constant folding cannot flatten the `If`.

With the gate (CG-Taylor), block 0 runs outside every region: block 0's own factors forecast its output, and
err = mean|forecast - y0| / mean|y0| decides: forecast the rest when err < `taylor.threshold`, unless
`taylor.full` forces the step. The outputs `taylor.did_full` and `taylor.gate_error` tell the driver what happened.

`split`: the regions and the outer parts between them as separate models (what TensorRT and CUDA graphs accept);
the driver runs a region only on full steps and does the same arithmetic in numpy (schedule.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...analysis.depgraph import DependencyGraph
from ...core.editing import all_names, node_inputs, unique_name
from ...core.errors import UsageError
from ...core.model import Model
from .plan import Region, stages

META_KEY = "graphopt.taylor_cache"
FULL, COEF, INV_DELTA = "taylor.full", "taylor.coef", "taylor.inv_delta"
GATE, GATE_COEF, GATE_INV_DELTA, THRESHOLD = "taylor.gate", "taylor.gate_coef", "taylor.gate_inv_delta", "taylor.threshold"
DID_FULL, GATE_ERROR = "taylor.did_full", "taylor.gate_error"


class _Builder:
    """Emits the factor arithmetic as nodes (unique names against the whole model)."""

    def __init__(self, graph: onnx.GraphProto, taken: set[str]):
        self.graph, self.taken = graph, taken
        self.index: dict[int, str] = {}

    def name(self, base: str) -> str:
        return unique_name(base, self.taken)

    def node(self, out: list, op: str, inputs: list[str], base: str, **attrs) -> str:
        y = self.name(base)
        out.append(helper.make_node(op, inputs, [y], name=self.name(f"{y}_{op}"), **attrs))
        return y

    def const_index(self, m: int) -> str:
        if m not in self.index:
            name = self.name(f"taylor.index{m}")
            self.graph.initializer.append(numpy_helper.from_array(np.array(m, np.int64), name))
            self.index[m] = name
        return self.index[m]

    def axes0(self) -> str:
        if -1 not in self.index:
            name = self.name("taylor.axes0")
            self.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), name))
            self.index[-1] = name
        return self.index[-1]

    def forecast(self, out: list, state: str, coef: str, order: int, base: str) -> str:
        """Σ state[m] * coef[m], left to right (schedule.forecast)."""
        acc = None
        for m in range(order + 1):
            f = self.node(out, "Gather", [state, self.const_index(m)], f"{base}.f{m}", axis=0)
            c = self.node(out, "Gather", [coef, self.const_index(m)], f"{base}.c{m}", axis=0)
            term = self.node(out, "Mul", [f, c], f"{base}.t{m}")
            acc = term if acc is None else self.node(out, "Add", [acc, term], f"{base}.sum{m}")
        return acc

    def refresh(self, out: list, value: str, state: str, inv_delta: str, order: int, base: str) -> str:
        """[value, (value - f0) * inv_delta[0], ...] stacked on a new axis 0 (schedule.refresh)."""
        new = [value]
        for m in range(order):
            old = self.node(out, "Gather", [state, self.const_index(m)], f"{base}.old{m}", axis=0)
            d = self.node(out, "Gather", [inv_delta, self.const_index(m)], f"{base}.inv{m}", axis=0)
            diff = self.node(out, "Sub", [new[m], old], f"{base}.diff{m}")
            new.append(self.node(out, "Mul", [diff, d], f"{base}.new{m + 1}"))
        parts = [self.node(out, "Unsqueeze", [n, self.axes0()], f"{base}.u{m}") for m, n in enumerate(new)]
        # every new factor has the value's shape (the value takes part in each): at the first full step the old
        # state [order+1, 1, ...] only broadcasts
        return parts[0] if len(parts) == 1 else self.node(out, "Concat", parts, f"{base}.stack", axis=0)


def _float_input(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _state_dims(name: str, order: int, rank: int) -> list:
    return [order + 1] + [f"{name}_d{i}" for i in range(rank)]


def lower_if(model: Model, regs: list[Region], ranks: dict[str, int], order: int, gate: str | None,
             gate_order: int, meta: dict) -> Model:
    """The `if` lowering of `model` (a new Model; the input is not touched)."""
    if model.opset < 13:
        raise UsageError(f"the `if` lowering needs opset >= 13 (Unsqueeze with axes as input); the model has "
                         f"opset {model.opset}: convert it, or use lowering=split or lite")
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    g = proto.graph
    taken = all_names(g)
    b = _Builder(g, taken)
    inputs = [helper.make_tensor_value_info(FULL, TensorProto.BOOL, [1]), _float_input(COEF, [order + 1])]
    if order:
        inputs.append(_float_input(INV_DELTA, [order]))
    for r in regs:
        inputs.append(_float_input(r.state, _state_dims(r.state, order, ranks[r.target])))
    outputs = []
    gate_nodes: list[onnx.NodeProto] = []
    cond = FULL
    if gate is not None:
        inputs += [_float_input(GATE, _state_dims(GATE, gate_order, ranks[gate])), _float_input(GATE_COEF, [gate_order + 1]),
                   _float_input(THRESHOLD, [1])]
        if gate_order:
            inputs.append(_float_input(GATE_INV_DELTA, [gate_order]))
        pred = b.forecast(gate_nodes, GATE, GATE_COEF, gate_order, "taylor.gate.forecast")
        err_abs = b.node(gate_nodes, "Abs", [b.node(gate_nodes, "Sub", [pred, gate], "taylor.gate.diff")], "taylor.gate.abs")
        num = b.node(gate_nodes, "ReduceMean", [err_abs], "taylor.gate.num", keepdims=0)
        den = b.node(gate_nodes, "ReduceMean", [b.node(gate_nodes, "Abs", [gate], "taylor.gate.y0abs")],
                     "taylor.gate.den", keepdims=0)
        gate_nodes.append(helper.make_node("Div", [num, den], [GATE_ERROR], name=b.name("taylor.gate.error_Div")))
        less = b.node(gate_nodes, "Less", [GATE_ERROR, THRESHOLD], "taylor.gate.confident")
        cond = b.node(gate_nodes, "Or", [FULL, b.node(gate_nodes, "Not", [less], "taylor.gate.unsure")], "taylor.cond")
        fresh = b.refresh(gate_nodes, gate, GATE, GATE_INV_DELTA, gate_order, "taylor.gate.refresh")
        gate_nodes.append(helper.make_node("Where", [cond, fresh, GATE], [GATE + ".next"],
                                           name=b.name("taylor.gate.keep_Where")))
        outputs += [_float_input(GATE + ".next", _state_dims(GATE + ".next", gate_order, ranks[gate])),
                    _float_input(GATE_ERROR, [])]
    gate_nodes.append(helper.make_node("Identity", [cond], [DID_FULL], name=b.name("taylor.did_full_Identity")))
    outputs.append(helper.make_tensor_value_info(DID_FULL, TensorProto.BOOL, [1]))

    by_name = {n.name: n for n in g.node}
    moved = {n for r in regs for n in r.nodes}
    producer_of_target = {}
    for i, r in enumerate(regs):
        producer = next(n for n in r.nodes if r.target in by_name[n].output)
        producer_of_target[producer] = i
    gate_producer = None
    if gate is not None:
        gate_producer = next((n.name for n in g.node if gate in n.output), None)
    new_nodes = []
    if gate is not None and gate_producer is None:   # the gate reads a graph input
        new_nodes += gate_nodes
    for node in g.node:
        if node.name in producer_of_target:
            r = regs[producer_of_target[node.name]]
            new_nodes.append(_region_if(b, r, [by_name[n] for n in r.nodes], cond, order, ranks[r.target]))
            outputs.append(_float_input(r.state_out, [f"{r.state_out}_d{i}" for i in range(ranks[r.target] + 1)]))
        elif node.name not in moved:
            new_nodes.append(node)
        if node.name == gate_producer:
            new_nodes += gate_nodes
    if gate is None:
        new_nodes = gate_nodes + new_nodes
    del g.node[:]
    g.node.extend(_topological(new_nodes))
    g.input.extend(inputs)
    g.output.extend(outputs)
    _set_meta(proto, meta)
    return Model(proto, model.source)


def _region_if(b: _Builder, r: Region, nodes: list[onnx.NodeProto], cond: str, order: int, rank: int
               ) -> onnx.NodeProto:
    full_value = b.name(f"{r.target}.full")
    then_nodes = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        for k, out in enumerate(c.output):
            if out == r.target:
                c.output[k] = full_value
        then_nodes.append(c)
    residual = full_value
    if r.base:
        residual = b.node(then_nodes, "Sub", [full_value, r.base], f"{r.state}.residual")
    then_state = b.refresh(then_nodes, residual, r.state, INV_DELTA, order, f"{r.state}.refresh")
    else_nodes = []
    value = b.forecast(else_nodes, r.state, COEF, order, f"{r.state}.forecast")
    if r.base:
        value = b.node(else_nodes, "Add", [r.base, value], f"{r.state}.forecast.plus_base")
    # a forecast step leaves the factors as they are: it returns an empty state (no copy of the factors) and the
    # driver keeps the one it fed (taylor.did_full says which)
    else_state = b.name(f"{r.state}.unchanged")
    b.graph.initializer.append(numpy_helper.from_array(np.zeros((0,) + (1,) * rank, np.float32), else_state))
    else_state = b.node(else_nodes, "Identity", [else_state], f"{r.state}.kept")

    def outs(value_name: str, state_name: str) -> list[onnx.ValueInfoProto]:
        return [_float_input(value_name, [f"{r.target}_d{i}" for i in range(rank)]),
                _float_input(state_name, [f"{r.state}_d{i}" for i in range(rank + 1)])]

    then_g = helper.make_graph(then_nodes, f"{r.name}_full", [], outs(full_value, then_state))
    else_g = helper.make_graph(else_nodes, f"{r.name}_forecast", [], outs(value, else_state))
    return helper.make_node("If", [cond], [r.target, r.state_out], name=b.name(f"taylor.{r.name}_If"),
                            then_branch=then_g, else_branch=else_g)


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Stable topological order (a node after every producer of what it or its subgraphs read)."""
    produced = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{produced[t] for t in node_inputs(n) if t in produced and produced[t] != i} for i, n in enumerate(nodes)]
    done, out = set(), []

    def visit(i: int, path: set[int]) -> None:
        stack = [(i, iter(sorted(deps[i])))]
        path.add(i)
        while stack:
            j, it = stack[-1]
            nxt = next((d for d in it if d not in done), None)
            if nxt is None:
                stack.pop()
                path.discard(j)
                if j not in done:
                    done.add(j)
                    out.append(nodes[j])
            else:
                if nxt in path:
                    raise UsageError("the cached graph has a cycle (a region reads its own forecast): internal error")
                path.add(nxt)
                stack.append((nxt, iter(sorted(deps[nxt]))))

    for i in range(len(nodes)):
        if i not in done:
            visit(i, set())
    return out


@dataclass
class Part:
    """One model of the split lowering: an outer part (region None) or region i."""

    region: int | None
    proto: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]


def split_parts(model: Model, regs: list[Region], keep: set[str]) -> list[Part]:
    """The model cut at the regions' targets into parts run in order (plan.stages); `keep` tensors are outputs
    of the part computing them (the gate's input)."""
    graph = DependencyGraph(model)
    infos = graph._infos
    plan = stages(graph, regs)
    part_of = {n: k for k, (_, nodes) in enumerate(plan) for n in nodes}
    inits = {t.name: t for t in model.graph.initializer}
    graph_outputs = set(model.output_names())
    readers: dict[str, set[int]] = {}
    for n, k in part_of.items():
        for t in node_inputs(graph.nodes[n]):
            readers.setdefault(t, set()).add(k)
    out = []
    for k, (region, names) in enumerate(plan):
        nodes = [graph.nodes[n] for n in names]
        produced = [o for n in nodes for o in n.output if o]
        produced_set = set(produced)
        reads = [t for n in nodes for t in node_inputs(n)]
        ins = list(dict.fromkeys(t for t in reads if t not in produced_set and t not in inits))
        outs = [t for t in produced if t in graph_outputs or t in keep or readers.get(t, set()) - {k}]
        used_inits = [inits[t] for t in dict.fromkeys(reads) if t in inits]
        g = helper.make_graph(nodes, f"part{k}", [_value_info(t, infos) for t in ins],
                              [_value_info(t, infos) for t in outs], initializer=used_inits)
        p = helper.make_model(g, opset_imports=list(model.proto.opset_import), ir_version=model.proto.ir_version)
        out.append(Part(region, p, ins, outs))
    return out


def _value_info(name: str, infos) -> onnx.ValueInfoProto:
    info = infos.get(name)
    if info is None or info.dtype is None:
        raise UsageError(f"split lowering: the type of {name} is unknown (shape inference could not tell)")
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(info.dtype))
    return helper.make_tensor_value_info(name, elem, None)


def _set_meta(proto: onnx.ModelProto, meta: dict) -> None:
    for p in list(proto.metadata_props):
        if p.key == META_KEY:
            proto.metadata_props.remove(p)
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta, sort_keys=True))


def read_meta(proto: onnx.ModelProto) -> dict | None:
    for p in proto.metadata_props:
        if p.key == META_KEY:
            return json.loads(p.value)
    return None


def with_meta(model: Model, meta: dict) -> Model:
    """The model unchanged but for the cache's metadata (the split and lite lowerings)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    _set_meta(proto, meta)
    return Model(proto, model.source)
