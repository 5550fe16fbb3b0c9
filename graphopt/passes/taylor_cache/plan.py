"""What is forecast: the regions of a level, and which nodes a forecast step skips.

A region is a tensor the cache forecasts (its *target*) and the nodes only it needs. Levels:
- `last`: the last block's output (CG-Taylor): every block is skipped, block 0 too unless the gate needs it;
- `block`: each block's residual (output - input), one region per block; a forecast step still adds the
  forecast residuals along the stream, so the current step's patch embedding reaches the head;
- `module`: each attention / MLP output before the adaLN gate (TaylorSeer's choice): the modulation, gates and
  residual adds still run.
With the gate, block 0 always runs (its output feeds the gate) and the regions start at block 1.

Membership is read backwards in topological order: a node belongs to a region when it produces that region's
target, or when every reader of its outputs belongs to the same region and none is a graph output or a tensor
that must stay visible (the gate's input, a residual base).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...analysis.blocks import BlockStack
from ...analysis.depgraph import DependencyGraph
from ...core.errors import UsageError

LEVELS = ("last", "block", "module")


@dataclass(frozen=True)
class Region:
    name: str                  # state names derive from it: taylor.<name>
    target: str                # the tensor forecast
    base: str | None           # forecast = base + Taylor(residual) when set
    nodes: tuple[str, ...]     # skipped on forecast steps, in topological order

    @property
    def state(self) -> str:
        return f"taylor.{self.name}"

    @property
    def state_out(self) -> str:
        return f"taylor.{self.name}.next"


def targets_for(stack: BlockStack, level: str, gated: bool) -> list[tuple[str, str, str | None]]:
    """(name, target, base) per region, in stream order."""
    if level not in LEVELS:
        raise UsageError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    blocks = stack.blocks[1:] if gated else stack.blocks
    if not blocks:
        raise UsageError("the gate keeps block 0 and the stack has no other block to forecast")
    if level == "last":
        return [("last", stack.blocks[-1].output, None)]
    if level == "block":
        return [(f"block{b.index}", b.output, b.input) for b in blocks]
    return [(f"block{b.index}.{s.kind}{j if sum(x.kind == s.kind for x in b.segments) > 1 else ''}", s.module, None)
            for b in blocks for j, s in enumerate(b.segments)]


def regions(graph: DependencyGraph, targets: list[tuple[str, str, str | None]], keep: set[str]) -> list[Region]:
    """The regions of these targets; `keep` are tensors that must stay computed outside (the gate's input)."""
    order = graph.topological_order()
    target_of = {t: i for i, (_, t, _) in enumerate(targets)}
    visible = set(keep) | set(graph.graph_outputs) | {b for _, _, b in targets if b}
    member: dict[str, int | None] = {}
    for n in reversed(order):
        outs = [t for t in graph.nodes[n].output if t]
        hit = [target_of[t] for t in outs if t in target_of]
        if hit:
            if len(outs) > 1:
                raise UsageError(f"the forecast target {outs[0]} comes from a node with several outputs "
                                 f"({graph.op_type(n)}), which this pass cannot cut")
            member[n] = hit[0]
            continue
        if any(t in visible for t in outs):
            member[n] = None
            continue
        readers = {member.get(c) for t in outs for c in graph.consumers(t)}
        member[n] = readers.pop() if len(readers) == 1 else None
    out = []
    for i, (name, target, base) in enumerate(targets):
        nodes = tuple(n for n in order if member.get(n) == i)
        out.append(Region(name, target, base, nodes))
    return out


def stages(graph: DependencyGraph, regs: list[Region]) -> list[tuple[int | None, list[str]]]:
    """The split lowering's parts in run order: (None, nodes) for outer parts, (i, nodes) for region i.

    An outer node runs in the first outer part after every region it reads; a region runs after every part its
    nodes read from. Stage numbers: outer parts even, regions odd."""
    owner = {n: i for i, r in enumerate(regs) for n in r.nodes}
    stage: dict[str, int] = {}
    region_stage: dict[int, int] = {}

    def stage_of(node: str) -> int:
        return region_stage[owner[node]] if node in owner else stage[node]

    order = graph.topological_order()
    for n in order:
        i = owner.get(n)
        preds = {graph.producer(t) for t in graph.activation_inputs(n)} - {None}
        need = max((stage_of(p) for p in preds if i is None or owner.get(p) != i), default=0)
        if i is None:
            stage[n] = need + need % 2
        else:
            region_stage[i] = max(region_stage.get(i, 1), need + 1 + need % 2)
    parts: dict[tuple[int, int], list[str]] = {}
    for n in order:
        parts.setdefault((stage_of(n), owner.get(n, -1)), []).append(n)
    return [(None if idx < 0 else idx, nodes) for (_, idx), nodes in sorted(parts.items())]
