"""Shapes and dtypes of a model's named tensors: declared value_info, graph inputs and outputs, initializers, and
what ONNX shape inference adds (best effort)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple | None  # ints for static dims, strings for symbolic ones, None for unknown
    dtype: str | None


def tensor_infos(proto: onnx.ModelProto) -> dict[str, TensorInfo]:
    """Shapes and dtypes of every named tensor we can learn (declared value_info, then shape inference)."""
    graph = proto.graph
    try:
        if proto.ByteSize() < 2**31:
            graph = onnx.shape_inference.infer_shapes(proto, strict_mode=False).graph
    except Exception:  # inference is best effort: custom ops or bad shapes leave some tensors unknown
        pass
    infos: dict[str, TensorInfo] = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        infos[vi.name] = _value_info(vi)
    for t in graph.initializer:
        infos[t.name] = TensorInfo(t.name, tuple(t.dims), helper.tensor_dtype_to_np_dtype(t.data_type).name)
    return infos


def _value_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return TensorInfo(vi.name, None, None)
    dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else None
    shape = None
    if tt.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return TensorInfo(vi.name, shape, dtype)


__all__ = ["TensorInfo", "tensor_infos"]
