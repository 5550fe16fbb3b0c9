"""A networkx view of a Model for analysis: nodes are ONNX nodes, edges are the tensors between them.

Built on demand from the model's proto and thrown away after use; it is never edited to change the model.
Only the top-level graph is analysed. A node holding subgraphs (If, Loop, Scan) is one opaque node, and the
outer-scope tensors its subgraphs read count as its inputs, so nothing they use looks dead.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import networkx as nx
import onnx
from onnx import helper

from ..core.editing import has_subgraph, node_inputs
from ..core.shapes import TensorInfo, tensor_infos

JOIN_OPS = {"Add", "Sub", "Mul", "Sum", "Concat"}


@dataclass(frozen=True)
class Join:
    """A node where two or more activation branches meet (a residual Add, a Concat of branches)."""

    node: str
    op_type: str
    branch_inputs: tuple[str, ...]


class DependencyGraph:
    """Producers, consumers, order, chains and joins of a model's top-level graph."""

    def __init__(self, model):
        self.model = model
        graph = model.proto.graph
        self.constants = model.constant_names()
        self.graph_inputs = set(model.input_names())
        self.graph_outputs = set(model.output_names())
        self._infos = tensor_infos(model.proto)
        self.nx = nx.DiGraph()
        self._producer: dict[str, str] = {}
        self._consumers: dict[str, list[str]] = defaultdict(list)
        self.nodes: dict[str, onnx.NodeProto] = {}
        init_shapes = {t.name: tuple(t.dims) for t in graph.initializer}
        for node in graph.node:
            self.nodes[node.name] = node
            self.nx.add_node(node.name, op_type=node.op_type, domain=node.domain,
                             attrs={a.name: helper.get_attribute_value(a) for a in node.attribute
                                    if a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)},
                             weights={name: init_shapes[name] for name in node.input if name in self.constants},
                             has_subgraph=has_subgraph(node))
            for out in node.output:
                if out:
                    self._producer[out] = node.name
        for node in graph.node:
            for tensor in node_inputs(node):
                self._consumers[tensor].append(node.name)
                src = self._producer.get(tensor)
                if src is not None:
                    if not self.nx.has_edge(src, node.name):
                        self.nx.add_edge(src, node.name, tensors=[])
                    self.nx.edges[src, node.name]["tensors"].append(self.tensor(tensor))

    # -------------------------------------------------------------- tensors
    def producer(self, tensor: str) -> str | None:
        return self._producer.get(tensor)

    def consumers(self, tensor: str) -> list[str]:
        return list(self._consumers.get(tensor, []))

    def is_graph_output(self, tensor: str) -> bool:
        return tensor in self.graph_outputs

    def is_constant(self, tensor: str) -> bool:
        return tensor in self.constants

    def tensor(self, name: str) -> TensorInfo:
        return self._infos.get(name, TensorInfo(name, None, None))

    # ---------------------------------------------------------------- nodes
    def node(self, name: str) -> onnx.NodeProto:
        return self.nodes[name]

    def op_type(self, name: str) -> str:
        return self.nx.nodes[name]["op_type"]

    def weights(self, name: str) -> dict[int, str]:
        """Input position -> initializer name, for the node's constant inputs."""
        return {i: t for i, t in enumerate(self.nodes[name].input) if t in self.constants}

    def activation_inputs(self, name: str) -> list[str]:
        """The node's non-constant inputs."""
        return [t for t in self.nodes[name].input if t and t not in self.constants]

    def topological_order(self) -> list[str]:
        return list(nx.topological_sort(self.nx))

    def single_consumer(self, name: str) -> str | None:
        """The one node that reads all of this node's outputs, if there is exactly one and no output escapes."""
        node = self.nodes[name]
        readers: set[str] = set()
        for out in node.output:
            if not out:
                continue
            if out in self.graph_outputs:
                return None
            readers.update(self._consumers.get(out, []))
        return readers.pop() if len(readers) == 1 else None

    def linear_chains(self, min_length: int = 2) -> list[list[str]]:
        """Maximal runs of nodes where each feeds only the next and the next reads only it (no branches)."""
        def links_to_next(name: str) -> str | None:
            nxt = self.single_consumer(name)
            if nxt is None or self.nx.nodes[nxt]["has_subgraph"]:
                return None
            if len(self.activation_inputs(nxt)) != 1:
                return None
            return nxt

        successor = {n: links_to_next(n) for n in self.nodes}
        has_predecessor = {s for s in successor.values() if s is not None}
        chains = []
        for start in self.topological_order():
            if start in has_predecessor:
                continue
            chain = [start]
            while successor[chain[-1]] is not None:
                chain.append(successor[chain[-1]])
            if len(chain) >= min_length:
                chains.append(chain)
        return chains

    def joins(self) -> list[Join]:
        """Nodes where two or more activation branches meet: residual Add/Sub/Mul/Sum and Concat."""
        out = []
        for name, node in self.nodes.items():
            if node.op_type in JOIN_OPS and node.domain in ("", "ai.onnx"):
                branches = tuple(self.activation_inputs(name))
                if len(branches) >= 2:
                    out.append(Join(name, node.op_type, branches))
        return out

    def fork_of(self, join: Join) -> str | None:
        """The nearest node every branch of a join descends from (the start of a residual block), if any."""
        common = None
        for tensor in join.branch_inputs:
            src = self.producer(tensor)
            if src is None:
                return None
            ancestors = nx.ancestors(self.nx, src) | {src}
            common = ancestors if common is None else common & ancestors
        if not common:
            return None
        order = {n: i for i, n in enumerate(self.topological_order())}
        return max(common, key=order.__getitem__)

    def summary(self) -> dict:
        """What `graphopt inspect` prints about the graph's structure."""
        joins = self.joins()
        chains = self.linear_chains()
        return {
            "nodes": self.nx.number_of_nodes(),
            "edges": self.nx.number_of_edges(),
            "linear_chains": len(chains),
            "longest_chain": max((len(c) for c in chains), default=0),
            "residual_joins": sum(1 for j in joins if j.op_type != "Concat"),
            "concat_joins": sum(1 for j in joins if j.op_type == "Concat"),
            "nodes_with_subgraphs": sum(1 for n in self.nx.nodes if self.nx.nodes[n]["has_subgraph"]),
            "custom_domain_nodes": sum(1 for n in self.nx.nodes
                                       if self.nx.nodes[n]["domain"] not in ("", "ai.onnx")),
        }
