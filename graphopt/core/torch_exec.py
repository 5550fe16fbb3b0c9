"""Run an ONNX graph in torch, with every float initializer an `nn.Parameter` under its initializer name, so that
gradients can train the weights of a rewritten model and the trained values write back into the same model.

Quantized graphs run as fake quantisation: QuantizeLinear rounds with a straight-through estimator (its
gradient passes the rounding, and stops where the value saturates), DequantizeLinear maps back. A weight stored
as integers behind a DequantizeLinear trains as a float master copy that is re-rounded on every forward and on
write-back, with the model's own scales and zero points (kept, not learned). DynamicQuantizeLinear and
MatMulInteger run the same way. Integer values in flight are float tensors holding integers, so gradients flow.

torch is an optional extra (`pip install 'graphopt[torch]'`); importing this module without it is a one-line
UsageError. An op the executor has no rule for is refused at construction, naming the op.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .editing import has_subgraph, node_attrs
from .errors import UsageError
from .model import Model

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - exercised by the torch-missing test in a subprocess
    raise UsageError("recovery runs the model in torch, which is not installed: pip install 'graphopt[torch]'") from None

_FLOAT_TYPES = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
                TensorProto.DOUBLE: torch.float64, TensorProto.BFLOAT16: torch.bfloat16}
_INT_RANGES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127), TensorProto.UINT4: (0, 15),
               TensorProto.INT4: (-8, 7), TensorProto.UINT16: (0, 65535), TensorProto.INT16: (-32768, 32767),
               TensorProto.INT32: (-2**31, 2**31 - 1)}
_CAST_TYPES = {**_FLOAT_TYPES, TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32,
               TensorProto.INT16: torch.int16, TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
               TensorProto.BOOL: torch.bool}


def round_ste(x):
    """Round half to even (as onnxruntime does) in the forward pass; identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def _param_shape(p, x, axis: int | None, block: int = 0):
    """Broadcast a per-tensor / per-axis / blocked scale or zero point against x."""
    if p.dim() == 0 or p.numel() == 1 and axis is None:
        return p.reshape(())
    axis = axis % x.dim()
    if block:
        return torch.repeat_interleave(p, block, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def fake_quantize(x, scale, zero_point, lo: int, hi: int, axis: int | None = 1, block: int = 0):
    """clamp(round(x / scale) + zero_point): float tensors holding the integers QuantizeLinear would give."""
    s = _param_shape(scale.to(x.dtype), x, axis, block)
    z = _param_shape(zero_point.to(x.dtype), x, axis, block)
    return torch.clamp(round_ste(x / s) + z, lo, hi)


def dequantize(q, scale, zero_point, axis: int | None = 1, block: int = 0):
    s = _param_shape(scale, q, axis, block)
    z = _param_shape(zero_point.to(s.dtype), q, axis, block)
    return (q.to(s.dtype) - z) * s


class TorchGraph(torch.nn.Module):
    """An ONNX model as a torch module. `trainable(name)` says which initializers get gradients (default: every
    float one); the rest are constants. `forward(feeds, outputs)` returns {name: tensor} for the model's outputs,
    or for any named tensors of the graph (intermediates included)."""

    def __init__(self, model: Model, trainable: Callable[[str], bool] | Iterable[str] | None = None):
        super().__init__()
        refuse_unsupported(model)
        self.model = model
        g = model.graph
        if trainable is None:
            wants = lambda name: True  # noqa: E731
        elif callable(trainable):
            wants = trainable
        else:
            names = set(trainable)
            wants = names.__contains__
        inits = {t.name: t for t in g.initializer}
        # integer weights behind a DequantizeLinear with constant scale and zero point: float master copies
        self.masters: dict[str, tuple[str, str | None, int | None, int, int, int]] = {}
        for node in g.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in inits:
                t = inits[node.input[0]]
                zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
                if t.data_type in _INT_RANGES and node.input[1] in inits and (zp is None or zp in inits):
                    a = node_attrs(node)
                    lo, hi = _INT_RANGES[t.data_type]
                    if t.data_type == TensorProto.INT8 and np.abs(numpy_helper.to_array(t)).max() <= 63:
                        lo, hi = -63, 63  # 7-bit weights (see int8_weight_qmax) stay 7-bit when re-rounded
                    self.masters[t.name] = (node.input[1], zp, a.get("axis", 1), a.get("block_size", 0), lo, hi)
        self.constants: dict[str, torch.Tensor] = {}
        self.parameter_names: list[str] = []
        params = []
        for t in g.initializer:
            arr = numpy_helper.to_array(t)
            if t.name in self.masters:
                scale_name, zp_name, axis, block, _, _ = self.masters[t.name]
                scale = _tensor(numpy_helper.to_array(inits[scale_name]))
                zp = _tensor(numpy_helper.to_array(inits[zp_name])) if zp_name else torch.zeros((), dtype=torch.int32)
                value = dequantize(_tensor(arr), scale, zp, axis if scale.numel() > 1 else None, block)
            elif t.data_type in _FLOAT_TYPES:
                value = _tensor(arr)
            else:
                self.constants[t.name] = _tensor(arr)
                continue
            p = torch.nn.Parameter(value, requires_grad=bool(wants(t.name)))
            self.parameter_names.append(t.name)
            params.append(p)
        self.params = torch.nn.ParameterList(params)
        self.nodes = _fuse_fake_quantize(g)
        self._attrs = [node_attrs(n) for n in self.nodes]
        if model.opset < 13:  # older semantics some rules need: Softmax over a 2-D flattening, Resize(x, scales)
            for node, attrs in zip(self.nodes, self._attrs):
                if node.op_type in ("Softmax", "LogSoftmax", "Resize"):
                    attrs["_opset"] = model.opset
        self.output_names = [o.name for o in g.output]
        self.input_names = [i.name for i in g.input if i.name not in inits]

    def named_onnx_parameters(self):
        """(initializer name, parameter) for every float initializer and every integer weight's master copy."""
        return zip(self.parameter_names, self.params)

    def trainable_parameters(self) -> list:
        return [p for p in self.params if p.requires_grad]

    def _environment(self) -> dict:
        env = dict(self.constants)
        env.update((name, p) for name, p in self.named_onnx_parameters() if name not in self.masters)
        for name, p in self.named_onnx_parameters():
            if name in self.masters:  # after the scales, which are float initializers
                scale_name, zp_name, axis, block, lo, hi = self.masters[name]
                scale = env[scale_name]
                zp = env[zp_name] if zp_name else torch.zeros((), dtype=torch.int32)
                env[name] = fake_quantize(p, scale, zp, lo, hi, axis if scale.numel() > 1 else None, block)
        return env

    def forward(self, feeds: dict, outputs: Iterable[str] | None = None) -> dict:
        wanted = list(outputs) if outputs is not None else self.output_names
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise UsageError(f"the torch executor needs inputs {missing}")
        env = self._environment()
        for name, value in feeds.items():
            env[name] = value if isinstance(value, torch.Tensor) else _tensor(np.asarray(value))
        need = set(wanted)
        last = {}  # tensor -> index of the last node that reads it: free what nothing reads any more
        for i, node in enumerate(self.nodes):
            for x in node.input:
                last[x] = i
        for i, (node, attrs) in enumerate(zip(self.nodes, self._attrs)):
            args = [env[x] if x else None for x in node.input]
            try:
                result = OPS[node.op_type](attrs, *args)
            except Exception as exc:
                raise RuntimeError(f"torch executor: node {node.name or node.op_type} ({node.op_type}) failed: "
                                   f"{exc}") from exc
            results = result if isinstance(result, (tuple, list)) else (result,) * len(node.output)
            for name, value in zip(node.output, results):
                if name:
                    env[name] = value
            for x in node.input:
                if last.get(x) == i and x not in need and x in env and x not in self.constants:
                    del env[x]
        absent = [n for n in wanted if n not in env]
        if absent:
            raise UsageError(f"the torch executor computed no tensor named {absent}")
        return {n: env[n] for n in wanted}

    def write_back(self) -> Model:
        """A copy of the model whose initializers hold the current parameter values; integer weights are
        re-rounded from their master copies with their own scales and zero points."""
        out = self.model.copy()
        values = {}
        env = self._environment() if self.masters else {}
        for name, p in self.named_onnx_parameters():
            values[name] = (env[name] if name in self.masters else p).detach().cpu().numpy()
        for i, t in enumerate(out.graph.initializer):
            if t.name not in values:
                continue
            old = numpy_helper.to_array(t)
            new = values[t.name].astype(old.dtype).reshape(old.shape)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(new, t.name))
        return out


def _fuse_fake_quantize(g) -> list:
    """The graph's nodes with each QuantizeLinear whose every reader is a DequantizeLinear of the same scale and
    zero point replaced by one fused fake-quantize node writing those readers' outputs (torch's own kernel: the
    activations' Q -> DQ pairs are most of a quantized graph's extra work)."""
    readers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    outputs = {o.name for o in g.output}
    fused, dropped = {}, set()
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.output[0] in outputs:
            continue
        rs = readers.get(n.output[0], [])
        if rs and all(r.op_type == "DequantizeLinear" and list(r.input[1:]) == list(n.input[1:])
                      and node_attrs(r).get("axis", 1) == node_attrs(n).get("axis", 1)
                      and not node_attrs(n).get("block_size") for r in rs):
            fused[id(n)] = helper.make_node("FakeQuantize", list(n.input), [r.output[0] for r in rs],
                                            name=n.name, **{k: v for k, v in node_attrs(n).items()
                                                            if k in ("axis", "output_dtype")})
            dropped.update(id(r) for r in rs)
    return [fused.get(id(n), n) for n in g.node if id(n) not in dropped]


def refuse_unsupported(model: Model) -> None:
    g = model.graph
    bad = sorted({_op_label(n) for n in g.node if n.domain not in ("", "ai.onnx") or n.op_type not in OPS
                  or has_subgraph(n)})
    if bad:
        raise UsageError(f"the torch executor cannot run {', '.join(bad)}, so this model cannot be recovered "
                         "(recovery trains the model in torch)")


def _op_label(node) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _tensor(arr: np.ndarray):
    if arr.dtype.name in ("int4", "uint4"):
        arr = arr.astype(np.int8 if arr.dtype.name == "int4" else np.uint8)
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.int32)
    elif arr.dtype == np.uint32:
        arr = arr.astype(np.int64)
    return torch.from_numpy(np.array(arr, copy=True))


def run_torch(model: Model, feeds: list[dict]) -> list[dict[str, np.ndarray]]:
    """Outputs of the model run by the executor, like runtime.run: one {name: array} per feed."""
    graph = TorchGraph(model, trainable=())
    with torch.no_grad():
        return [{k: v.numpy() for k, v in graph(f).items()} for f in feeds]


# --- op rules: each takes the node's attributes and its inputs (None for an omitted optional one) ---------------

def _ints(t) -> list[int]:
    return [int(v) for v in t.tolist()] if isinstance(t, torch.Tensor) else list(t)


def _axes(a: dict, axes_input, rank: int) -> list[int] | None:
    axes = _ints(axes_input) if axes_input is not None else a.get("axes")
    return None if axes is None else [int(x) % rank for x in axes]


def _conv(a, x, w, b=None):
    nd = x.dim() - 2
    kernel = list(w.shape[2:])
    strides = a.get("strides", [1] * nd)
    dilations = a.get("dilations", [1] * nd)
    pads = _explicit_pads(x.shape[2:], kernel, strides, dilations, a)
    x = _pad_spatial(x, pads, nd)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return fn(x, w, b, stride=strides, dilation=dilations, groups=a.get("group", 1))


def _explicit_pads(spatial, kernel, strides, dilations, a) -> list[int]:
    from .conv import conv_pads  # n-d geometry, shared with the numpy side

    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    pads = a.get("pads")
    if auto in ("NOTSET", "") and pads is None:
        return [0] * (2 * len(kernel))
    return conv_pads(list(spatial), kernel, strides, dilations, pads, auto)


def _pad_spatial(x, pads, nd, value=0.0):
    if not any(pads):
        return x
    spec = []
    for d in reversed(range(nd)):  # F.pad wants the last dim first: (begin, end) pairs
        spec += [pads[d], pads[d + nd]]
    return F.pad(x, spec, value=value)


def _conv_transpose(a, x, w, b=None):
    nd = x.dim() - 2
    strides = a.get("strides", [1] * nd)
    dilations = a.get("dilations", [1] * nd)
    pads = a.get("pads", [0] * (2 * nd))
    out_pad = a.get("output_padding", [0] * nd)
    if a.get("output_shape") or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError("ConvTranspose with output_shape or auto_pad is not supported")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
    y = fn(x, w, b, stride=strides, output_padding=out_pad, groups=a.get("group", 1), dilation=dilations)
    for d in range(nd):  # pads crop the full output, begin and end separately
        y = y.narrow(2 + d, pads[d], y.shape[2 + d] - pads[d] - pads[d + nd])
    return y


def _gemm(a, x, w, c=None):
    if a.get("transA", 0):
        x = x.transpose(0, 1)
    if a.get("transB", 0):
        w = w.transpose(0, 1)
    y = a.get("alpha", 1.0) * (x @ w)
    return y if c is None else y + a.get("beta", 1.0) * c


def _clip(a, x, lo=None, hi=None):
    lo = a.get("min") if lo is None else lo
    hi = a.get("max") if hi is None else hi
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
    return x


def _gelu(a, x):
    approx = a.get("approximate", b"none")
    return F.gelu(x, approximate="tanh" if approx in (b"tanh", "tanh") else "none")


def _layer_norm(a, x, scale, bias=None):
    axis = a.get("axis", -1) % x.dim()
    shape = list(x.shape[axis:])
    return F.layer_norm(x, shape, scale, bias, eps=a.get("epsilon", 1e-5))


def _batch_norm(a, x, scale, bias, mean, var):
    # written out rather than F.batch_norm, whose running statistics cannot take gradients (all four train)
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = scale / torch.sqrt(var + a.get("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


def _reduce(fn):
    def rule(a, x, axes=None):
        rank = x.dim()
        dims = _axes(a, axes, rank)
        keep = bool(a.get("keepdims", 1))
        if not dims:
            if a.get("noop_with_empty_axes", 0):
                return x
            dims = list(range(rank))
        return fn(x, dims, keep)
    return rule


def _reduce_max(x, dims, keep):
    return torch.amax(x, dim=dims, keepdim=keep)


def _reduce_min(x, dims, keep):
    return torch.amin(x, dim=dims, keepdim=keep)


def _reshape(a, x, shape):
    dims = _ints(shape)
    if not a.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _flatten(a, x):
    axis = a.get("axis", 1) % max(x.dim(), 1) if x.dim() else 0
    lead = math.prod(x.shape[:axis])
    return x.reshape(lead, -1)


def _split(a, x, split=None):
    axis = a.get("axis", 0) % x.dim()
    sizes = _ints(split) if split is not None else a.get("split")
    if sizes is None:
        n = a["num_outputs"]
        size = -(-x.shape[axis] // n)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(n)]
    return tuple(torch.split(x, list(sizes), dim=axis))


def _slice(a, x, starts=None, ends=None, axes=None, steps=None):
    if starts is None:  # opset < 10: attributes
        starts, ends, axes = a["starts"], a["ends"], a.get("axes")
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        ax %= x.dim()
        size = x.shape[ax]
        if sp > 0:
            st = min(max(st + size if st < 0 else st, 0), size)
            en = min(max(en + size if en < 0 else en, 0), size)
            index[ax] = slice(st, max(en, st), sp)
        else:  # torch has no negative steps: take the forward range, then flip it
            st = min(max(st + size if st < 0 else st, -1), size - 1)
            en = min(max(en + size if en < 0 else en, -1), size - 1)
            idx = torch.arange(st, en, sp)
            x = x.index_select(ax, idx) if idx.numel() else x.narrow(ax, 0, 0)
    return x[tuple(index)]


def _gather(a, x, idx):
    axis = a.get("axis", 0) % x.dim()
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


def _unsqueeze(a, x, axes=None):
    axes = _ints(axes) if axes is not None else a["axes"]
    rank = x.dim() + len(axes)
    for ax in sorted(int(v) % rank for v in axes):
        x = x.unsqueeze(ax)
    return x


def _squeeze(a, x, axes=None):
    axes = _ints(axes) if axes is not None else a.get("axes")
    if axes is None:
        return x.squeeze()
    for ax in sorted((int(v) % x.dim() for v in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def _shape(a, x):
    dims = list(x.shape)
    start, end = a.get("start", 0), a.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _pool(kind):
    def rule(a, x):
        nd = x.dim() - 2
        kernel = a["kernel_shape"]
        strides = a.get("strides", [1] * nd)
        dilations = a.get("dilations", [1] * nd)
        pads = _explicit_pads(x.shape[2:], kernel, strides, dilations, a)
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            x = _pad_spatial(x, pads, nd, value=-math.inf)
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
            return fn(x, kernel, strides, 0, dilations, ceil_mode=ceil)
        if any(d != 1 for d in dilations):
            raise ValueError("AveragePool with dilations is not supported")
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        symmetric = pads[:nd] == pads[nd:]
        if a.get("count_include_pad", 0) or not any(pads):
            return fn(_pad_spatial(x, pads, nd), kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
        if symmetric and all(p <= k // 2 for p, k in zip(pads[:nd], kernel)):
            return fn(x, kernel, strides, pads[:nd], ceil_mode=ceil, count_include_pad=False)
        ones = torch.ones_like(x[:1, :1])  # divide the padded sum by the count of real pixels
        total = fn(_pad_spatial(x, pads, nd), kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
        count = fn(_pad_spatial(ones, pads, nd), kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
        return total / count
    return rule


def _global_pool(fn):
    def rule(a, x):
        return fn(x, dim=tuple(range(2, x.dim())), keepdim=True)
    return rule


def _resize(a, x, roi=None, scales=None, sizes=None):
    if a.get("_opset", 13) < 11:  # Resize-10: (x, scales), asymmetric coordinates
        roi, scales, a = None, roi, {**a, "coordinate_transformation_mode": b"asymmetric",
                                     "nearest_mode": b"floor"}
    mode = a.get("mode", b"nearest").decode()
    ctm = a.get("coordinate_transformation_mode", b"half_pixel").decode()
    nd = x.dim() - 2
    if sizes is not None and sizes.numel():
        size = _ints(sizes)[2:]
        if _ints(sizes)[:2] != list(x.shape[:2]):
            raise ValueError("Resize of the batch or channel axis is not supported")
        factor = None
    else:
        s = [float(v) for v in scales.tolist()]
        if s[:2] != [1.0, 1.0]:
            raise ValueError("Resize of the batch or channel axis is not supported")
        size = [int(math.floor(d * f)) for d, f in zip(x.shape[2:], s[2:])]
        factor = s[2:]
    if mode == "nearest":
        nearest = a.get("nearest_mode", b"round_prefer_floor").decode()
        if ctm == "asymmetric" and nearest == "floor":
            return F.interpolate(x, size=size, mode="nearest")
        if ctm in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn") and nearest in (
                "round_prefer_floor", "round_prefer_ceil"):
            return F.interpolate(x, size=size, mode="nearest-exact")
        raise ValueError(f"Resize nearest with {ctm}/{nearest} is not supported")
    if mode == "linear":
        interp = {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]
        if ctm == "align_corners":
            return F.interpolate(x, size=size, mode=interp, align_corners=True)
        if ctm in ("half_pixel", "pytorch_half_pixel"):
            if factor is not None and all(float(f).is_integer() for f in factor):
                return F.interpolate(x, scale_factor=factor, mode=interp, align_corners=False)
            return F.interpolate(x, size=size, mode=interp, align_corners=False)
        raise ValueError(f"Resize linear with {ctm} is not supported")
    raise ValueError(f"Resize mode {mode} is not supported")


def _cast(a, x):
    return x.to(_CAST_TYPES[a["to"]])


def _softmax(fn):
    def rule(a, x):
        if a.get("_opset", 13) < 13:  # opset < 13: over the 2-D flattening at axis (default 1)
            axis = a.get("axis", 1) % x.dim()
            return fn(x.reshape(math.prod(x.shape[:axis]), -1), dim=1).reshape(x.shape)
        return fn(x, dim=a.get("axis", -1))
    return rule


def _concat(a, *xs):
    xs = [x for x in xs if x is not None]
    return torch.cat(xs, dim=a["axis"])


def _expand(a, x, shape):
    target = _ints(shape)
    rank = max(len(target), x.dim())
    target = [1] * (rank - len(target)) + target
    current = [1] * (rank - x.dim()) + list(x.shape)
    return x.reshape(current).expand([c if t == 1 else t for c, t in zip(current, target)])


def _constant_of_shape(a, shape):
    value = a.get("value")
    fill = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    return torch.full(_ints(shape), fill.item(), dtype=_tensor(fill).dtype)


def _constant(a):
    if "value" in a:
        return _tensor(numpy_helper.to_array(a["value"]))
    for key in ("value_float", "value_int"):
        if key in a:
            return torch.tensor(a[key])
    for key in ("value_floats", "value_ints"):
        if key in a:
            return torch.tensor(list(a[key]))
    raise ValueError("unsupported Constant attribute")


def _range(a, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _pad(a, x, pads=None, value=None, axes=None):
    mode = a.get("mode", b"constant").decode()
    pads = _ints(pads) if pads is not None else a["pads"]
    rank = x.dim()
    axes = [int(v) % rank for v in _ints(axes)] if axes is not None else list(range(rank))
    n = len(axes)
    spec = []
    full = {ax: (pads[i], pads[i + n]) for i, ax in enumerate(axes)}
    for ax in reversed(range(rank)):
        spec += list(full.get(ax, (0, 0)))
    while len(spec) > 2 and spec[-2:] == [0, 0]:  # F.pad takes trailing axes only as far as needed
        spec = spec[:-2]
    fill = float(value.item()) if value is not None else 0.0
    return F.pad(x, spec, mode={"constant": "constant", "reflect": "reflect", "edge": "replicate"}[mode],
                 value=fill if mode == "constant" else None)


def _tile(a, x, repeats):
    return x.repeat(_ints(repeats))


def _transpose(a, x):
    perm = a.get("perm", list(reversed(range(x.dim()))))
    return x.permute(perm)


def _einsum(a, *xs):
    return torch.einsum(a["equation"].decode(), *xs)


def _zero_point(zp):
    return zp if zp is not None else torch.zeros((), dtype=torch.int32)


def _quantize_linear(a, x, scale, zp=None):
    out_type = a.get("output_dtype", 0) or (_ONNX_OF.get(zp.dtype, TensorProto.UINT8) if zp is not None
                                            else TensorProto.UINT8)
    lo, hi = _INT_RANGES[out_type]
    axis = a.get("axis", 1) if scale.dim() and scale.numel() > 1 else None
    return fake_quantize(x, scale, _zero_point(zp), lo, hi, axis, a.get("block_size", 0))


def _fake_quantize(a, x, scale, zp=None):
    """QuantizeLinear then DequantizeLinear in one kernel (the gradient passes where the value does not
    saturate); one copy per DequantizeLinear that read it."""
    out_type = a.get("output_dtype", 0) or (_ONNX_OF.get(zp.dtype, TensorProto.UINT8) if zp is not None
                                            else TensorProto.UINT8)
    lo, hi = _INT_RANGES[out_type]
    zp = _zero_point(zp)
    if x.dtype != torch.float32 or hi - lo > 65535 or scale.requires_grad:  # a trained scale: LSQ-style, unfused
        y = dequantize(_quantize_linear(a, x, scale, zp), scale, zp, a.get("axis", 1) if scale.numel() > 1 else None)
    elif scale.numel() == 1:
        y = torch.fake_quantize_per_tensor_affine(x, scale.reshape(()).float(), zp.reshape(()).int(), lo, hi)
    else:
        y = torch.fake_quantize_per_channel_affine(x, scale.float(), zp.int(), a.get("axis", 1) % x.dim(), lo, hi)
    return y


def _dequantize_linear(a, x, scale, zp=None):
    axis = a.get("axis", 1) if scale.dim() and scale.numel() > 1 else None
    return dequantize(x, scale, _zero_point(zp), axis, a.get("block_size", 0))


def _dynamic_quantize_linear(a, x):
    lo = torch.clamp(x.detach().min(), max=0.0)
    hi = torch.clamp(x.detach().max(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    return torch.clamp(round_ste(x / scale) + zp, 0, 255), scale, zp


def _matmul_integer(a, x, w, x_zp=None, w_zp=None):
    x = x.float() - (_row_zp(x_zp, x).float() if x_zp is not None else 0.0)
    w = w.float() - (w_zp.float() if w_zp is not None else 0.0)
    return x @ w


def _row_zp(zp, x):
    return zp.reshape(-1, 1) if zp.dim() == 1 and zp.numel() > 1 else zp


def _binary(fn):
    def rule(a, x, y):
        return fn(x, y)
    return rule


def _unary(fn):
    def rule(a, x):
        return fn(x)
    return rule


def _div(a, x, y):
    if not x.is_floating_point() and not y.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


def _variadic(fn):
    def rule(a, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return rule


_ONNX_OF = {torch.uint8: TensorProto.UINT8, torch.int8: TensorProto.INT8, torch.int16: TensorProto.INT16,
            torch.int32: TensorProto.INT32}

OPS: dict[str, Callable] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm,
    "MatMul": _binary(torch.matmul), "Add": _binary(torch.add), "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul), "Div": _div, "Pow": _binary(torch.pow),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt),
    "LessOrEqual": _binary(torch.le), "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Not": _unary(torch.logical_not),
    "Relu": _unary(F.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf), "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp), "Log": _unary(torch.log),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil), "Sin": _unary(torch.sin), "Cos": _unary(torch.cos),
    "Sign": _unary(torch.sign), "Softplus": _unary(F.softplus), "Mish": _unary(F.mish),
    "Elu": lambda a, x: F.elu(x, a.get("alpha", 1.0)), "PRelu": _binary(lambda x, s: torch.where(x >= 0, x, x * s)),
    "Identity": _unary(lambda x: x), "Dropout": lambda a, x, *rest: x,
    "Clip": _clip, "Gelu": _gelu,
    "HardSigmoid": lambda a, x: torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": _unary(F.hardswish),
    "LeakyRelu": lambda a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "LayerNormalization": _layer_norm, "BatchNormalization": _batch_norm,
    "ReduceMean": _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k)),
    "ReduceSum": _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k)),
    "ReduceL2": _reduce(lambda x, d, k: torch.sqrt((x * x).sum(dim=d, keepdim=k))),
    "ReduceSumSquare": _reduce(lambda x, d, k: (x * x).sum(dim=d, keepdim=k)),
    "ReduceMax": _reduce(_reduce_max), "ReduceMin": _reduce(_reduce_min),
    "Reshape": _reshape, "Transpose": _transpose, "Flatten": _flatten, "Concat": _concat, "Split": _split,
    "Slice": _slice, "Gather": _gather, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Shape": _shape,
    "Expand": _expand, "ConstantOfShape": _constant_of_shape, "Constant": _constant, "Range": _range,
    "Where": lambda a, c, x, y: torch.where(c, x, y), "Cast": _cast, "Pad": _pad, "Tile": _tile,
    "Einsum": _einsum,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global_pool(torch.mean), "GlobalMaxPool": _global_pool(torch.amax),
    "Resize": _resize,
    "QuantizeLinear": _quantize_linear, "DequantizeLinear": _dequantize_linear, "FakeQuantize": _fake_quantize,
    "DynamicQuantizeLinear": _dynamic_quantize_linear, "MatMulInteger": _matmul_integer,
}
