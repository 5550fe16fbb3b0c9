"""Small, careful edits on an onnx GraphProto that several passes need.

ONNX names are global across scopes (a subgraph may read an outer tensor by name), so renames and liveness
look inside If/Loop/Scan bodies too.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                names.update(i for i in n.input if i and i not in local)
                names.update(x for x in subgraph_reads(n) if x not in local)
            names.update(o.name for o in g.output if o.name not in local)
    return names


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: its declared inputs, then what its subgraphs read from outside."""
    declared = [i for i in node.input if i]
    extra = sorted(subgraph_reads(node) - set(declared)) if has_subgraph(node) else []
    return declared + extra


def has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for attr in node.attribute:
        if attr.HasField("g"):
            out.append(attr.g)
        out.extend(attr.graphs)
    return out


def replace_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every reader of tensor `old` (nodes, subgraph bodies, graph outputs) reads `new` instead."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for sub in subgraphs(node):
            replace_input(sub, old, new)
    for out in graph.output:
        if out.name == old:
            out.name = new


def rename_output(graph: onnx.GraphProto, old: str, new: str) -> None:
    """The producer of `old` now produces `new`, and all its readers follow."""
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    replace_input(graph, old, new)
    for vi in graph.value_info:
        if vi.name == old:
            vi.name = new


def live_tensors(graph: onnx.GraphProto) -> tuple[set[str], list[bool]]:
    """Tensors the graph outputs depend on, and for each node whether it is live."""
    live = {o.name for o in graph.output}
    keep = [False] * len(graph.node)
    for i in range(len(graph.node) - 1, -1, -1):  # ONNX stores nodes in topological order
        node = graph.node[i]
        if any(o in live for o in node.output if o):
            keep[i] = True
            live.update(node_inputs(node))
    return live, keep


def drop_unused_initializers(graph: onnx.GraphProto, candidates=None) -> int:
    """Remove initializers nothing reads (no node, subgraph body or graph output); with `candidates`, only those
    may go. Initializers listed as graph inputs stay: they are part of the model's interface. Returns how many
    went."""
    used = {name for node in graph.node for name in node_inputs(node)}
    used |= {o.name for o in graph.output} | {i.name for i in graph.input}
    allowed = None if candidates is None else set(candidates)
    kept = [t for t in graph.initializer if t.name in used or (allowed is not None and t.name not in allowed)]
    removed = len(graph.initializer) - len(kept)
    if removed:
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return removed


def drop_stale_value_info(graph: onnx.GraphProto) -> None:
    """Remove value_info entries for tensors no node produces any more."""
    produced = {o for n in graph.node for o in n.output}
    stale = [vi for vi in graph.value_info if vi.name not in produced]
    for vi in stale:
        graph.value_info.remove(vi)


def node_attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Set (replace or add) one attribute of a node."""
    remove_attr(node, name)
    node.attribute.append(helper.make_attribute(name, value))


def remove_attr(node: onnx.NodeProto, name: str) -> None:
    for a in [a for a in node.attribute if a.name == name]:
        node.attribute.remove(a)


def add_initializer(graph: onnx.GraphProto, base: str, value, taken: set[str]) -> str:
    """Store `value` as a new initializer named after `base` (made unique against `taken`); returns the name."""
    name = unique_name(base, taken)
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def new_node(op: str, inputs, outputs, taken: set[str], **attrs) -> onnx.NodeProto:
    """A node named after its first output and its op type (made unique against `taken`)."""
    return helper.make_node(op, inputs, outputs, name=unique_name(f"{outputs[0]}_{op}", taken), **attrs)


def unique_name(base: str, taken: set[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name in the graph (top level), to make new names that do not collide."""
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names
