"""Repeated-block detection: the residual stream of a transformer-like graph and the identical blocks along it.

Read from the dependency graph only (no node names):
- a *residual Add* is an Add whose one operand (the skip) is an ancestor of the other (the branch);
- the *stream* is the longest chain of residual Adds where each Add's skip is the previous Add's output;
- each *segment* (stream tensor -> next Add) gets a structural signature: a Weisfeiler-Lehman hash of the nodes on
  the paths from its stream tensor to its branch, labelled by op type, attributes and weight shapes;
- the *blocks* are the longest run of a period of p segments repeated N >= 2 times. Where the phase is ambiguous
  (ABABAB is AB x 3 or A + BA x 2 + B), the phase whose blocks do not share private context nodes wins (a DiT's
  per-block adaLN modulation feeds both of its segments and no other block's);
- *context* is what the blocks read that does not descend from the stream (the timestep/class conditioning);
  the *head* is what follows the last block.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import networkx as nx

from .depgraph import DependencyGraph


@dataclass(frozen=True)
class Segment:
    """One residual branch along the stream: `stream_in` + branch -> `stream_out` (the Add's output)."""

    stream_in: str
    stream_out: str
    add: str           # the residual Add node
    branch: str        # the Add's branch operand
    module: str        # the branch's output before a gate from the context (Mul(gate, module)), else `branch`
    kind: str          # "attention" when the branch holds a Softmax, else "mlp"
    nodes: tuple[str, ...]  # nodes on the paths stream_in -> branch, and the Add


@dataclass(frozen=True)
class Block:
    index: int
    input: str
    output: str
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class BlockStack:
    blocks: tuple[Block, ...]
    period: int                   # segments per block
    stream_shape: tuple | None    # of the stream tensor, as shape inference gives it
    context: tuple[str, ...]      # context tensors read by two or more blocks (the conditioning)
    head_nodes: int               # nodes after the last block
    unmatched_segments: int       # residual segments on the stream outside the repeated run

    def describe(self) -> str:
        kinds = "+".join(s.kind for s in self.blocks[0].segments)
        shape = "x".join(str(d) if isinstance(d, int) else "N" for d in self.stream_shape) if self.stream_shape else "?"
        ctx = f", conditioning {', '.join(self.context)}" if self.context else ", no conditioning"
        return (f"{len(self.blocks)} identical blocks ({kinds}) on a residual stream of shape {shape}{ctx}; "
                f"head: {self.head_nodes} nodes")


class NoBlockStack(ValueError):
    """The graph has no stack of repeated residual blocks; the message says what was found instead."""


def find_block_stack(graph: DependencyGraph) -> BlockStack:
    g = graph.nx
    adds = _residual_adds(graph)
    if not adds:
        raise NoBlockStack("no residual Add (an Add whose one operand descends from the other) in the graph")
    chain = _longest_chain(graph, adds)
    if len(chain) < 2:
        raise NoBlockStack(f"{len(adds)} residual Adds, but no two in a row along one stream (each residual "
                           "branch's output is not the next one's skip)")
    start = adds[chain[0]][0]
    start_node = graph.producer(start)
    upstream = (nx.ancestors(g, start_node) | {start_node}) if start_node else set()
    segments = []
    stream_in = start
    for add in chain:
        skip, branch = adds[add]
        assert skip == stream_in
        segments.append(_segment(graph, stream_in, add, branch, upstream))
        stream_in = graph.nodes[add].output[0]
    signatures = [_signature(graph, s) for s in segments]
    period, phase, count = _best_period(signatures, segments, graph, upstream)
    if count < 2:
        raise NoBlockStack(f"a residual stream of {len(segments)} branches, but no run of two or more structurally "
                           "identical blocks along it")
    blocks = []
    for k in range(count):
        segs = tuple(segments[phase + k * period: phase + (k + 1) * period])
        blocks.append(Block(k, segs[0].stream_in, segs[-1].stream_out, segs))
    block_nodes = [set().union(*(s.nodes for s in b.segments)) for b in blocks]
    context = _shared_context(graph, blocks, block_nodes, upstream)
    last = graph.producer(blocks[-1].output)
    head = len(nx.descendants(g, last)) if last else 0
    return BlockStack(tuple(blocks), period, graph.tensor(start).shape, tuple(context), head,
                      len(segments) - count * period)


def _residual_adds(graph: DependencyGraph) -> dict[str, tuple[str, str]]:
    """Add node -> (skip, branch) for every Add whose one activation operand is an ancestor of the other."""
    out = {}
    for name, node in graph.nodes.items():
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        a, b = node.input
        if graph.is_constant(a) or graph.is_constant(b):
            continue
        for skip, branch in ((a, b), (b, a)):
            src, dst = graph.producer(skip), graph.producer(branch)
            if dst is None:
                continue
            reaches = (src is None and skip in _graph_input_closure(graph, dst)) or \
                      (src is not None and nx.has_path(graph.nx, src, dst))
            if reaches:
                out[name] = (skip, branch)
                break
    return out


def _graph_input_closure(graph: DependencyGraph, node: str) -> set[str]:
    """Graph inputs that `node` reads, directly or through its ancestors."""
    names = nx.ancestors(graph.nx, node) | {node}
    return {t for n in names for t in graph.nodes[n].input if t in graph.graph_inputs}


def _longest_chain(graph: DependencyGraph, adds: dict[str, tuple[str, str]]) -> list[str]:
    by_skip: dict[str, list[str]] = {}
    for add, (skip, _) in adds.items():
        by_skip.setdefault(skip, []).append(add)
    outputs = {graph.nodes[a].output[0] for a in adds}
    best: list[str] = []
    for add, (skip, _) in adds.items():
        if skip in outputs and len(by_skip.get(skip, [])) == 1:
            continue  # not the start of a chain
        chain = [add]
        while True:
            nxt = by_skip.get(graph.nodes[chain[-1]].output[0], [])
            if len(nxt) != 1:
                break
            chain.append(nxt[0])
        if len(chain) > len(best):
            best = chain
    return best


def _segment(graph: DependencyGraph, stream_in: str, add: str, branch: str, upstream: set[str]) -> Segment:
    g = graph.nx
    src, dst = graph.producer(stream_in), graph.producer(branch)
    below = nx.descendants(g, src) if src else set(g.nodes) - upstream
    nodes = (nx.ancestors(g, dst) | {dst}) & below
    nodes |= {add}
    module = branch
    node = graph.nodes[dst]
    if node.op_type == "Mul" and len(node.input) == 2:
        for gate, other in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            gp = graph.producer(gate)
            if gp is not None and gp not in nodes and graph.producer(other) in nodes:
                module = other
                break
    kind = "attention" if any(graph.op_type(n) == "Softmax" for n in nodes) else "mlp"
    order = {n: i for i, n in enumerate(graph.topological_order())}
    return Segment(stream_in, graph.nodes[add].output[0], add, branch, module, kind,
                   tuple(sorted(nodes, key=order.__getitem__)))


def _signature(graph: DependencyGraph, seg: Segment) -> str:
    """WL hash of the segment's float computation. Shape arithmetic (integer tensors) is left out: an exporter
    may compute a shape once in the first block and let the others read it."""
    def is_float(t: str) -> bool:
        return (graph.tensor(t).dtype or "float32").startswith(("float", "bfloat"))

    nodes = [n for n in seg.nodes if any(is_float(t) for t in graph.nodes[n].output if t)]
    sub = nx.DiGraph()
    for n in nodes:
        data = graph.nx.nodes[n]
        attrs = ",".join(f"{k}={v}" for k, v in sorted(data["attrs"].items()))
        weights = ",".join(str(s) for s in data["weights"].values())
        outside = sum(1 for t in graph.activation_inputs(n) if is_float(t) and graph.producer(t) not in seg.nodes)
        sub.add_node(n, label=f"{data['op_type']}|{attrs}|{weights}|{outside}")
    sub.add_edges_from((a, b) for a, b in graph.nx.subgraph(nodes).edges)
    with warnings.catch_warnings():  # networkx 3.5 notes that its directed hashes changed: we compare within a run
        warnings.simplefilter("ignore", UserWarning)
        return nx.weisfeiler_lehman_graph_hash(sub, node_attr="label", iterations=3)


def _best_period(signatures, segments, graph, upstream) -> tuple[int, int, int]:
    """(period, phase, repeats) covering the most segments; ties: fewest shared private context, then shorter."""
    m = len(signatures)
    private = _private_context(graph, segments, upstream)
    best = None
    for p in range(1, m // 2 + 1):
        for phase in range(p):
            n = 0
            while phase + (n + 1) * p <= m and signatures[phase + n * p: phase + (n + 1) * p] == signatures[phase: phase + p]:
                n += 1
            if n < 2:
                continue
            crossing = sum(1 for users in private if len({(j - phase) // p for j in users}) > 1)
            key = (-n * p, crossing, p, phase)
            if best is None or key < best[0]:
                best = (key, (p, phase, n))
    return best[1] if best else (1, 0, 1)


def _private_context(graph: DependencyGraph, segments, upstream) -> list[set[int]]:
    """For each context node read by some but not all segments: the indices of the segments that read it
    (through context nodes only: what an earlier segment reads reaches a later one through the stream too)."""
    g = graph.nx
    inside = set().union(*(s.nodes for s in segments))
    context = g.subgraph(n for n in g.nodes if n not in inside and n not in upstream)
    users: dict[str, set[int]] = {}
    for j, seg in enumerate(segments):
        seeds = {p for n in seg.nodes for p in g.predecessors(n) if p in context}
        for anc in set().union(*(nx.ancestors(context, p) | {p} for p in seeds)) if seeds else ():
            users.setdefault(anc, set()).add(j)
    return [u for u in users.values() if len(u) < len(segments)]


def _shared_context(graph: DependencyGraph, blocks, block_nodes, upstream) -> list[str]:
    """The conditioning: outputs of context nodes that feed two or more blocks, where they are read by context
    private to one block (a DiT's c = t_embed + y_embed, read by each block's own adaLN modulation)."""
    g = graph.nx
    inside = set().union(*block_nodes)
    owner = {n: k for k, nodes in enumerate(block_nodes) for n in nodes}
    context = g.subgraph(n for n in g.nodes if n not in inside and n not in upstream)
    feeds: dict[str, set[int]] = {}
    for n in context.nodes:
        reached = nx.descendants(context, n) | {n}
        ks = {owner[c] for r in reached for c in g.successors(r) if c in owner}
        if ks:
            feeds[n] = ks
    shared = {n for n, ks in feeds.items() if len(ks) > 1}
    out = []
    for n in shared:
        for t in graph.nodes[n].output:
            if any(c in feeds and c not in shared for c in graph.consumers(t)):
                out.append(t)
    return sorted(out)
