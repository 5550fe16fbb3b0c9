"""Model: one ONNX model in memory, loaded with checks, saved atomically.

The `onnx.ModelProto` is the single source of truth. Keeping the proto (rather than a converted graph) means that
everything a pass does not touch (ir_version, opset imports, metadata, functions, doc strings, subgraphs, custom
domains) survives byte for byte. Passes edit a copy and wrap the result in a new `Model`; networkx and
onnx-graphsurgeon views are built from the proto on demand.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from .._version import __version__
from .editing import unique_name
from .errors import InputError

# onnxruntime only guarantees operators from this default-domain opset on.
MIN_OPSET = 7
TWO_GB = 2**31
PROVENANCE_KEY = "graphopt"


class Model:
    """An ONNX model plus where it came from. Treat it as immutable: passes build new ones."""

    def __init__(self, proto: onnx.ModelProto, source: Path | None = None):
        self.proto = proto
        self.source = source

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Model":
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if path.is_dir():
            raise InputError(f"{path}: is a folder, expected an .onnx file")
        try:
            proto = onnx.load_model(str(path), load_external_data=False)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise InputError(f"{path}: not a readable ONNX model (truncated or not ONNX): {exc}") from None
        _check_looks_like_onnx(proto, path)
        _load_external_data(proto, path.parent)
        _check_opset(proto, path)
        try:
            onnx.checker.check_model(proto) if proto.ByteSize() < TWO_GB else None
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0]
            raise InputError(f"{path}: invalid ONNX model: {first}") from None
        _constants_to_initializers(proto)
        _name_unnamed_nodes(proto)
        return cls(proto, source=path)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto) -> "Model":
        """A Model of a copy of `proto`, normalised as `load` does (Constant nodes to initializers, unique node
        names: passes rely on both); the caller's proto is left as it was."""
        clone = onnx.ModelProto()
        clone.CopyFrom(proto)
        _constants_to_initializers(clone)
        _name_unnamed_nodes(clone)
        return cls(clone)

    def copy(self) -> "Model":
        clone = onnx.ModelProto()
        clone.CopyFrom(self.proto)
        return Model(clone, self.source)

    # ------------------------------------------------------------------ facts
    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    @property
    def opset(self) -> int:
        return default_opset(self.proto)

    def initializers(self) -> dict[str, onnx.TensorProto]:
        return {t.name: t for t in self.graph.initializer}

    def constant_names(self) -> set[str]:
        """Initializers that are true constants (an initializer listed as a graph input can be overridden)."""
        inputs = {i.name for i in self.graph.input}
        return {t.name for t in self.graph.initializer if t.name not in inputs}

    def input_names(self) -> list[str]:
        """The graph inputs a caller must feed (initializers listed as inputs excluded)."""
        inits = {t.name for t in self.graph.initializer}
        return [i.name for i in self.graph.input if i.name not in inits]

    def output_names(self) -> list[str]:
        return [o.name for o in self.graph.output]

    def op_counts(self) -> Counter:
        """Nodes per op type, those inside If/Loop/Scan bodies included (a subgraph's work is still work)."""
        counts: Counter = Counter()
        pending = [self.graph]
        while pending:
            graph = pending.pop()
            for n in graph.node:
                counts[_op_label(n)] += 1
                pending += [a.g for a in n.attribute if a.HasField("g")] + [g for a in n.attribute for g in a.graphs]
        return counts

    def parameter_count(self) -> int:
        return sum(int(np.prod(t.dims)) for t in self.graph.initializer)

    def byte_size(self) -> int:
        return self.proto.ByteSize()

    def to_bytes(self) -> bytes:
        return self.proto.SerializeToString()

    def to_graphsurgeon(self):
        """An onnx-graphsurgeon Graph of a copy of this model, for passes that edit with it."""
        import onnx_graphsurgeon as gs

        return gs.import_onnx(self.copy().proto)

    def with_graphsurgeon(self, graph) -> "Model":
        """A new Model from an edited graphsurgeon Graph, keeping this model's model-level fields."""
        import onnx_graphsurgeon as gs

        exported = gs.export_onnx(graph, do_type_check=False)
        return make_model_like(self, exported.graph)

    # ----------------------------------------------------------------- saving
    def with_provenance(self, passes: list[str]) -> "Model":
        """A copy that records in metadata_props which graphopt version and passes produced it."""
        out = self.copy()
        props = out.proto.metadata_props
        previous = [p for p in props if p.key == PROVENANCE_KEY]
        history = []
        for p in previous:
            try:
                history = json.loads(p.value).get("history", [])
            except (ValueError, AttributeError):
                history = []
            props.remove(p)
        history.append({"version": __version__, "passes": passes})
        props.add(key=PROVENANCE_KEY, value=json.dumps({"version": __version__, "passes": passes,
                                                        "history": history}))
        return out

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None, overwrite: bool = False) -> Path:
        """Write atomically. External data is used when asked for, or forced when the model exceeds 2 GB."""
        path = Path(path)
        if self.source is not None and path.resolve() == self.source.resolve() and not overwrite:
            raise InputError(f"{path}: refusing to overwrite the input model (pass overwrite=True / --overwrite)")
        if path.exists() and not overwrite:
            raise InputError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
        if not path.parent.exists():
            raise InputError(f"{path.parent}: output folder does not exist")
        if external_data is None:
            external_data = self.byte_size() >= TWO_GB
        proto = self.proto
        if external_data:
            proto = onnx.ModelProto()
            proto.CopyFrom(self.proto)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            tmp_model = Path(tmp) / path.name
            if external_data:
                data_name = path.name + ".data"
                onnx.save_model(proto, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data_name, size_threshold=1024)
                if (Path(tmp) / data_name).exists():
                    os.replace(Path(tmp) / data_name, path.parent / data_name)
            else:
                onnx.save_model(proto, str(tmp_model))
            os.replace(tmp_model, path)
        return path


# ----------------------------------------------------------------------- helpers
def default_opset(proto: onnx.ModelProto) -> int:
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 0


def _op_label(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _check_looks_like_onnx(proto: onnx.ModelProto, path: Path) -> None:
    # Protobuf happily parses many byte strings; a real model has an IR version, an opset and a graph.
    if proto.ir_version <= 0 or not proto.opset_import or not proto.HasField("graph"):
        raise InputError(f"{path}: not an ONNX model (no IR version, opset or graph found)")


def _check_opset(proto: onnx.ModelProto, path: Path) -> None:
    opset = default_opset(proto)
    if opset and opset < MIN_OPSET:
        raise InputError(f"{path}: opset {opset} is below {MIN_OPSET}, the oldest onnxruntime supports; "
                         "convert it first (onnx.version_converter)")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise InputError(f"{path}: opset {opset} is newer than this onnx ({onnx.__version__}) knows ({newest})")


def _external_tensors(graph: onnx.GraphProto):
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t") and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                yield attr.t
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _external_tensors(sub)


def _load_external_data(proto: onnx.ModelProto, base: Path) -> None:
    """Check every external-data reference stays inside the model's folder and exists, then load it."""
    base_real = base.resolve()
    tensors = list(_external_tensors(proto.graph))
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if not location or os.path.isabs(location) or base_real not in (target, *target.parents) or target == base_real:
            raise InputError(f"tensor {t.name!r}: external data location {location!r} points outside the model's folder")
        if not target.is_file():
            raise InputError(f"tensor {t.name!r}: external data file {location!r} is missing")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > target.stat().st_size:
            raise InputError(f"tensor {t.name!r}: external data file {location!r} is shorter than the model says")
    if tensors:
        onnx.external_data_helper.load_external_data_for_model(proto, str(base))


def _constants_to_initializers(proto: onnx.ModelProto) -> None:
    """Turn top-level Constant nodes holding tensors into initializers, so passes see every weight in one place."""
    graph = proto.graph
    if proto.ir_version < 4:  # before IR 4 every initializer must also be a graph input (overridable)
        return
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        tensor = _constant_value(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if tensor is None or node.output[0] in outputs:
            keep.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    attr = {a.name: a for a in node.attribute}
    if "value" in attr:
        t = onnx.TensorProto()
        t.CopyFrom(attr["value"].t)
        return t
    scalars = {"value_float": (np.float32, lambda a: a.f), "value_floats": (np.float32, lambda a: list(a.floats)),
               "value_int": (np.int64, lambda a: a.i), "value_ints": (np.int64, lambda a: list(a.ints))}
    for key, (dtype, get) in scalars.items():
        if key in attr:
            return numpy_helper.from_array(np.array(get(attr[key]), dtype=dtype))
    return None  # sparse_value and strings stay as Constant nodes


def _name_unnamed_nodes(proto: onnx.ModelProto) -> None:
    """Give every top-level node a unique name: reports, decisions and the dependency graph refer to nodes by it."""
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = unique_name(node.name or f"{node.op_type}_{i}", seen)
        seen.add(node.name)


def make_model_like(template: Model, graph: onnx.GraphProto) -> Model:
    """A new Model with `graph`, keeping the template's model-level fields (opsets, ir_version, metadata, functions)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(template.proto)
    proto.graph.CopyFrom(graph)
    return Model(proto, template.source)


def load(path: str | os.PathLike) -> Model:
    return Model.load(path)


__all__ = ["Model", "load", "make_model_like", "MIN_OPSET"]
