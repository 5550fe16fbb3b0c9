"""LayerMerge's two tables, measured rather than assumed.

T (latency): every candidate merged conv, with the Add and activation it keeps, timed alone in onnxruntime on its
real input shape at the latency batch and the runtime's threads. The fixed cost of one `session.run` (measured on
an empty model) is taken off, so that entries add up to a whole model. Entries are cached on disk, keyed by
everything the time depends on: shapes, attributes, activation, threads, onnxruntime version and the CPU.

I (importance): the output distortion on calibration samples when only that span is replaced by its merged conv
(least-squares refitted to the original span's output on calibration activations) - no training.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ...core.files import write_text_atomic
from ...core.model import Model
from ...core.runtime import RuntimeSettings, make_session, measure_latency

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("GRAPHOPT_CACHE_DIR") or Path.home() / ".cache" / "graphopt")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class LatencyTable:
    """Milliseconds of one conv (+ Add, + activation) at one shape, measured once per machine and cached."""

    def __init__(self, settings: RuntimeSettings, cache_dir: Path | None = None, *, min_seconds: float = 0.15):
        self.settings = settings
        self.path = (cache_dir or default_cache_dir()) / "layermerge_latency.json"
        self.min_seconds = min_seconds
        self.machine = {"ort": ort.__version__, "cpu": _cpu(), "threads": settings.intra_op_threads,
                        "providers": list(settings.providers), "optimization": settings.graph_optimization,
                        "version": CACHE_VERSION}
        try:
            self.entries: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, ValueError):
            self.entries = {}  # an unreadable cache is rebuilt, never trusted
        self.hits = self.misses = 0
        self._overhead: float | None = None

    def _key(self, spec: dict) -> str:
        text = json.dumps({**spec, **self.machine}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()

    def overhead_ms(self) -> float:
        """What one run of an almost empty model costs: the part of every entry a whole model pays only once."""
        if self._overhead is None:
            spec = {"overhead": True}
            key = self._key(spec)
            if key not in self.entries:
                x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 1, 1])
                y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 1, 1])
                g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "overhead", [x], [y])
                self.entries[key] = self._time(_model(g), {"x": np.zeros((1, 1, 1, 1), np.float32)})
                self.misses += 1
            self._overhead = self.entries[key]
        return self._overhead

    def conv_ms(self, in_shape: tuple, weight_shape: tuple | None, strides, pads, group: int, add: bool,
                act: onnx.NodeProto | None, act_consts: dict[str, np.ndarray]) -> float:
        """One conv (+ Add of a tensor of its output's shape, + activation); no conv when weight_shape is None."""
        spec = {"in": list(in_shape), "w": list(weight_shape or []), "s": list(strides or []),
                "p": list(pads or []), "g": group, "add": add, "act": _act_key(act, act_consts)}
        key = self._key(spec)
        if key in self.entries:
            self.hits += 1
            return max(self.entries[key] - self.overhead_ms(), 0.0)
        rng = np.random.default_rng(0)
        inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(in_shape))]
        feed = {"x": rng.standard_normal(in_shape).astype(np.float32)}
        inits, nodes, last = [], [], "x"
        if weight_shape is not None:
            w = (rng.standard_normal(weight_shape) * 0.1).astype(np.float32)
            inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(weight_shape[0], np.float32),
                                                                              "b")]
            nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=list(weight_shape[2:]),
                                      strides=list(strides), pads=list(pads), group=group)]
            last = "c"
        if add:
            out_shape = _conv_out(in_shape, weight_shape, strides, pads)
            inputs.append(helper.make_tensor_value_info("skip", onnx.TensorProto.FLOAT, list(out_shape)))
            feed["skip"] = rng.standard_normal(out_shape).astype(np.float32)
            nodes.append(helper.make_node("Add", ["c", "skip"], ["a"]))
            last = "a"
        if act is not None:
            node = onnx.NodeProto()
            node.CopyFrom(act)
            node.input[0] = last
            node.output[0] = "y"
            nodes.append(node)
            inits += [numpy_helper.from_array(v, k) for k, v in act_consts.items()]
        else:
            nodes.append(helper.make_node("Identity", [last], ["y"]))
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
        g = helper.make_graph(nodes, "entry", inputs, [y], inits)
        self.entries[key] = self._time(_model(g), feed)
        self.misses += 1
        return max(self.entries[key] - self.overhead_ms(), 0.0)

    def _time(self, model: Model, feed) -> float:
        session = make_session(model, self.settings)
        return measure_latency(session, feed, warmup=5, repeats=20, min_seconds=self.min_seconds,
                               max_seconds=2.0).median_ms

    def save(self) -> None:
        if self.misses:
            try:
                write_text_atomic(self.path, json.dumps(self.entries, sort_keys=True))
            except OSError:
                pass  # a read-only home only costs the next run the timing again


def _model(graph: onnx.GraphProto) -> Model:
    return Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _act_key(act, consts) -> list | None:
    if act is None:
        return None
    attrs = sorted((a.name, str(helper.get_attribute_value(a))) for a in act.attribute)
    return [act.op_type, attrs, {k: np.asarray(v).tolist() for k, v in consts.items()}]


def _conv_out(in_shape, weight_shape, strides, pads) -> tuple:
    n, _, h, w = in_shape
    kh, kw = weight_shape[2:]
    return (n, weight_shape[0], (h + pads[0] + pads[2] - kh) // strides[0] + 1,
            (w + pads[1] + pads[3] - kw) // strides[1] + 1)


__all__ = ["LatencyTable", "default_cache_dir"]
