"""Rewrite a model so that chosen spans become one conv each (or nothing, for a dropped residual block).

The merged conv reads the span's input position and its result keeps the name of the span's output position, so
every reader downstream is untouched. A residual Add whose other operand comes from outside the span stays after
the merged conv; the activation at the span's end stays; everything else of the span goes.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from ...core.editing import add_initializer, all_names, drop_stale_value_info, drop_unused_initializers, \
    live_tensors, unique_name
from ...core.model import Model
from .merge import ConvMap
from .spans import Chain


@dataclass
class Replacement:
    chain: int
    st: int
    end: int
    kind: str  # "merge" | "drop"
    conv: ConvMap | None = None
    depthwise: bool = False


def _span_nodes(c: Chain, st: int, end: int) -> tuple[set[str], str | None, str | None]:
    """Nodes the span removes, and the Add / activation at its end that stay."""
    gone: set[str] = set()
    keep_add = keep_act = None
    for t in range(st + 1, end + 1):
        u = c.units[t - 1]
        gone.add(u.conv.node)
        if u.add:
            if u.skip_from is None or u.skip_from < st:
                keep_add = u.add  # only possible at the end (span_problem): the merged conv feeds it
            else:
                gone.add(u.add)
                if u.projection is not None:
                    gone.add(u.projection.node)
        if u.act:
            if t == end:
                keep_act = u.act
            else:
                gone.add(u.act)
    return gone, keep_add, keep_act


def apply(model: Model, chains: list[Chain], replacements: list[Replacement]) -> Model:
    out = model.copy()
    g = out.graph
    taken = all_names(g)
    by_name = {n.name: n for n in g.node}
    gone: set[str] = set()
    inserts: dict[str, list[onnx.NodeProto]] = {}  # first removed node of a span -> new nodes in its place
    for r in replacements:
        c = chains[r.chain]
        removed, keep_add, keep_act = _span_nodes(c, r.st, r.end)
        x, y = c.position(r.st), c.position(r.end)
        anchor = next(n.name for n in g.node if n.name in removed)
        gone |= removed
        if r.kind == "drop":
            if keep_act:
                by_name[keep_act].input[0] = x
            else:  # the position keeps its name (later spans and reports refer to it); onnxruntime elides this
                inserts[anchor] = [helper.make_node("Identity", [x], [y], name=unique_name(f"{y}_identity", taken))]
            continue
        w = r.conv
        name = unique_name(f"merged_{c.units[r.st].conv.node}_to_{c.units[r.end - 1].conv.node}", taken)
        w_name = add_initializer(g, f"{name}_weight", w.onnx_weight(r.depthwise), taken)
        b_name = add_initializer(g, f"{name}_bias", w.bias.astype("float32"), taken)
        last = c.units[r.end - 1]
        result = y if not (keep_add or keep_act) else unique_name(f"{name}_out", taken)
        taken.add(result)
        node = helper.make_node("Conv", [x, w_name, b_name], [result], name=name,
                                kernel_shape=list(w.kernel), strides=list(w.strides), pads=list(w.pads),
                                group=w.weight.shape[0] if r.depthwise else 1)
        inserts[anchor] = [node]
        if keep_add:
            add = by_name[keep_add]
            for i, t in enumerate(add.input):
                if t != last.skip_tensor:
                    add.input[i] = result
                    break
            if keep_act:
                by_name[keep_act].input[0] = add.output[0]
        elif keep_act:
            by_name[keep_act].input[0] = result
    nodes = []
    for n in g.node:
        nodes.extend(inserts.get(n.name, []))
        if n.name not in gone:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    _drop_dead(g)
    drop_unused_initializers(g)
    drop_stale_value_info(g)
    return out


def _drop_dead(g: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody reads any more (a projection conv of a dropped block)."""
    while True:
        _, alive = live_tensors(g)
        if all(alive):
            return
        keep = [n for n, a in zip(g.node, alive) if a]
        del g.node[:]
        g.node.extend(keep)


__all__ = ["Replacement", "apply"]
