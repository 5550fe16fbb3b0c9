"""Activation statistics (graphopt.core.capture): streaming histograms, range methods, collection, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.quant_utils import compute_scale_zp

from graphopt.core.capture import METHODS, TensorStats, collect_stats, scale_zero_point
from graphopt.core.errors import InputError
from graphopt.core.model import Model
from graphopt.core.runtime import RuntimeSettings

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = RuntimeSettings(intra_op_threads=1)


def qdq_mse(x: np.ndarray, lo: float, hi: float, qmin: int, qmax: int, symmetric: bool) -> float:
    """Real quantize-dequantize error of the samples themselves, as QuantizeLinear/DequantizeLinear compute it."""
    scale, zp = scale_zero_point(lo, hi, qmin, qmax, symmetric)
    x = x.astype(np.float64)
    q = np.clip(np.round(x / scale) + zp, qmin, qmax)
    return float(np.mean(((q - zp) * scale - x) ** 2))


# ------------------------------------------------------------------------------------------------ streaming
def test_streaming_histogram_equals_one_shot_histogram_over_final_edges():
    rng = np.random.default_rng(0)
    chunks = []
    for i, scale in enumerate([1e-3, 0.5, 0.25, 4.0, 1e-6, 300.0, 2.0, 5e4]):  # ranges grow, with setbacks
        x = (rng.standard_normal(4000) * scale).astype(np.float32)
        if i == 0:
            x[:50] = 0.0
            x[50:80] = -0.0
        if i == 2:  # exact powers of two and their negatives are bucket edges
            x[:8] = [1.0, -1.0, 0.5, -0.5, 0.25, -0.25, 2.0**-20, -(2.0**-20)]
        if i == 3:
            x[:3] = [np.nan, np.inf, -np.inf]
        chunks.append(x)
    stats = TensorStats("t")
    tops = []
    for x in chunks:
        stats.update(x.reshape(40, 100))  # any shape
        tops.append(stats.top)
    assert len(set(tops)) > 3  # the range grew several times

    values = np.concatenate(chunks)
    finite = values[np.isfinite(values)].astype(np.float64)
    counts, _ = np.histogram(finite, bins=stats.edges)
    np.testing.assert_array_equal(stats.hist, counts)
    assert stats.hist.sum() == stats.count == finite.size
    assert stats.nonfinite == 3 and stats.zeros == 80
    assert stats.min == finite.min() and stats.max == finite.max()  # exact
    assert stats.edges[stats.bins // 2] == 0.0 and np.all(np.diff(stats.edges) > 0)

    one_shot = TensorStats("t")
    one_shot.update(values)
    assert one_shot.top == stats.top
    np.testing.assert_array_equal(one_shot.hist, stats.hist)  # old buckets nested exactly into the new ones


def test_zeros_first_then_values_and_other_dtypes():
    stats = TensorStats("t")
    stats.update(np.zeros(10, np.float32))
    assert stats.top is None and stats.zeros == 10
    stats.update(np.float16([1.5, -2.0]))
    stats.update(np.array([3, -7], np.int64))
    stats.update(np.array([1e-40, -1e-42], np.float32))  # float32 subnormals
    finite = np.array([0.0] * 10 + [1.5, -2.0, 3.0, -7.0, np.float32(1e-40), np.float32(-1e-42)])
    counts, _ = np.histogram(finite, bins=stats.edges)
    np.testing.assert_array_equal(stats.hist, counts)
    tiny = TensorStats("tiny")  # a tensor living entirely among subnormals
    values = np.float32([1e-45, -1e-45, 3e-45, 2e-44])
    tiny.update(values)
    counts, _ = np.histogram(values.astype(np.float64), bins=tiny.edges)
    np.testing.assert_array_equal(tiny.hist, counts)
    with pytest.raises(TypeError):
        stats.update(np.array(["a"]))


# ------------------------------------------------------------------------------------------------ methods
def test_minmax_on_uniform_data_and_zero_always_in_range():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1.0, 3.0, 20000).astype(np.float32)
    stats = TensorStats("u")
    stats.update(x)
    assert stats.range("minmax") == (float(x.min()), float(x.max()))
    assert stats.range("minmax", qmin=-128, qmax=127, symmetric=True) == (-float(x.max()), float(x.max()))
    assert stats.range("percentile", percentile=99.0) == pytest.approx((-0.98, 2.98), abs=0.01)

    positive, negative = TensorStats("p"), TensorStats("n")
    positive.update(rng.uniform(1.0, 2.0, 5000).astype(np.float32))
    negative.update(rng.uniform(-2.0, -1.0, 5000).astype(np.float32))
    for method in METHODS:
        for qmin, qmax, sym in [(0, 255, False), (-128, 127, True)]:
            lo, hi = positive.range(method, qmin=qmin, qmax=qmax, symmetric=sym)
            assert lo <= 0.0 < hi and (lo == 0.0 or sym)
            lo, hi = negative.range(method, qmin=qmin, qmax=qmax, symmetric=sym)
            assert lo < 0.0 <= hi and (hi == 0.0 or sym)


def test_percentile_clips_huge_outliers():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal(400_000), [1e6, 1e6, -1e6]]).astype(np.float32)
    stats = TensorStats("x")
    stats.update(x)
    lo, hi = stats.range("percentile")  # 99.99 %: 0.005 % cut from each tail
    assert hi == pytest.approx(np.percentile(x, 99.995), rel=0.05)
    assert lo == pytest.approx(np.percentile(x, 0.005), rel=0.05)
    lo, hi = stats.range("percentile", qmin=-128, qmax=127, symmetric=True)
    assert hi == -lo == pytest.approx(np.percentile(np.abs(x), 99.99), rel=0.05)
    assert stats.range("minmax")[1] == 1e6


@pytest.mark.parametrize("qmin,qmax,symmetric", [(0, 255, False), (-128, 127, True)])
def test_mse_and_entropy_clip_heavy_tails_and_best_range_beats_minmax(qmin, qmax, symmetric):
    rng = np.random.default_rng(3)
    x = rng.standard_t(3, 200_000).astype(np.float32)  # heavy tails: the largest values are ~50x the bulk
    stats = TensorStats("t")
    for part in np.array_split(x, 7):
        stats.update(part)
    kw = dict(qmin=qmin, qmax=qmax, symmetric=symmetric)
    mm = stats.range("minmax", **kw)
    for method in ("mse", "entropy"):
        lo, hi = stats.range(method, **kw)
        assert lo <= 0.0 <= hi
        assert hi - lo < 0.9 * (mm[1] - mm[0])
    choice = stats.best_range(**kw)
    assert set(choice.candidates) == set(METHODS)
    assert choice.mse == min(c[2] for c in choice.candidates.values())
    for lo, hi, predicted in choice.candidates.values():  # the histogram's error model matches real QDQ
        assert predicted == pytest.approx(qdq_mse(x, lo, hi, **kw), rel=0.03)
    real_best, real_minmax = qdq_mse(x, choice.lo, choice.hi, **kw), qdq_mse(x, *mm, **kw)
    assert real_best < 0.8 * real_minmax
    assert (choice.scale, choice.zero_point) == scale_zero_point(choice.lo, choice.hi, qmin, qmax, symmetric)


def test_quant_mse_matches_real_error_on_relu_data():
    rng = np.random.default_rng(4)
    x = np.maximum(rng.standard_normal(100_000) * 2.0, 0.0).astype(np.float32)  # half exact zeros
    stats = TensorStats("relu")
    stats.update(x)
    for lo, hi in [(0.0, float(x.max())), (0.0, 3.0), (-1.0, 5.0), (0.0, 0.5)]:
        assert stats.quant_mse(lo, hi) == pytest.approx(qdq_mse(x, lo, hi, 0, 255, False), rel=0.02)
    choice = stats.best_range()
    assert choice.lo == 0.0 and choice.zero_point == 0
    assert choice.mse <= choice.candidates["minmax"][2]


def test_degenerate_tensors():
    const = TensorStats("c")
    const.update(np.full(100, 5.0, np.float32))
    for method in METHODS:
        assert const.range(method) == (0.0, 5.0)
    choice = const.best_range()
    assert (choice.lo, choice.hi) == (0.0, 5.0) and choice.mse < 1e-12

    zeros = TensorStats("z")
    zeros.update(np.zeros(100, np.float32))
    choice = zeros.best_range(qmin=-128, qmax=127, symmetric=True)
    assert (choice.lo, choice.hi, choice.mse, choice.scale, choice.zero_point) == (0.0, 0.0, 0.0, 1.0, 0)

    nothing = TensorStats("nan")
    nothing.update(np.array([np.nan, np.inf], np.float32))
    assert nothing.count == 0 and nothing.nonfinite == 2
    assert nothing.best_range().method == "minmax" and nothing.range("entropy") == (0.0, 0.0)

    single = TensorStats("s")
    single.update(np.float32([-3.0]))
    assert single.range("minmax", qmin=-128, qmax=127, symmetric=True) == (-3.0, 3.0)
    choice = single.best_range(qmin=-128, qmax=127, symmetric=True)
    assert choice.mse <= choice.candidates["minmax"][2] < 2e-4  # -3 lands within half a step of a level

    with pytest.raises(ValueError):
        const.range("kl")
    with pytest.raises(ValueError):
        const.range("minmax", qmin=1, qmax=255)
    with pytest.raises(TypeError):
        const.range("mse", percentile=99.0)


@pytest.mark.parametrize("lo,hi,qmin,qmax,symmetric", [
    (-1.0, 3.0, 0, 255, False), (-1.0, 3.0, -128, 127, True), (-1.0, 3.0, 0, 255, True),
    (0.5, 2.0, 0, 255, False), (-7.0, -2.0, -128, 127, False), (0.0, 0.0, 0, 255, False)])
def test_scale_zero_point_matches_onnxruntime(lo, hi, qmin, qmax, symmetric):
    dtype = np.uint8 if qmin == 0 else np.int8
    zp, scale = compute_scale_zp(np.array(lo, np.float32), np.array(hi, np.float32), np.array(qmin, dtype),
                                 np.array(qmax, dtype), symmetric=symmetric)
    assert scale_zero_point(lo, hi, qmin, qmax, symmetric) == (float(scale), int(zp))


# ------------------------------------------------------------------------------------------------ collection
def _conv_relu_matmul() -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    m = rng.standard_normal((8, 5)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("MatMul", ["relu", "m"], ["y"]),
             helper.make_node("Shape", ["relu"], ["shape"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 5]),
                               helper.make_tensor_value_info("shape", TensorProto.INT64, [4])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
                               numpy_helper.from_array(m, "m")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"w": w, "b": b, "m": m}


def _reference(x: np.ndarray, p: dict) -> dict[str, np.ndarray]:
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    conv = np.einsum("nchwkl,ockl->nohw", windows, p["w"]) + p["b"][None, :, None, None]
    relu = np.maximum(conv, 0.0)
    return {"x": x, "conv": conv, "relu": relu, "y": relu @ p["m"]}


def _inputs(n: int, seed: int = 6):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}


def test_collect_stats_matches_numpy_and_skips_with_reasons():
    proto, params = _conv_relu_matmul()
    refs = [_reference(s["x"], params) for s in _inputs(20)]
    messages = []
    consumed = []

    def source():
        for sample in _inputs(20):
            consumed.append(1)
            yield sample

    stats = collect_stats(Model.from_proto(proto), ["conv", "relu", "y", "x", "w", "shape", "nope", "conv"],
                          source(), settings=ONE_THREAD, progress=messages.append)
    assert len(consumed) == 20 and stats.samples == 20
    assert messages == ["calibrating: 16 samples", "calibrating: 20 samples"]
    assert list(stats) == ["conv", "relu", "y", "x", "w"]
    assert "float" in stats.skipped["shape"] and "int64" in stats.skipped["shape"]
    assert "no such tensor" in stats.skipped["nope"]
    for name in ("conv", "relu", "y", "x"):
        lo = min(r[name].min() for r in refs)
        hi = max(r[name].max() for r in refs)
        assert stats[name].min == pytest.approx(lo, rel=1e-5, abs=1e-5)
        assert stats[name].max == pytest.approx(hi, rel=1e-5, abs=1e-5)
        assert stats[name].count == 20 * refs[0][name].size == stats[name].hist.sum()
    assert stats["relu"].zeros > 0 and stats["relu"].min == 0.0
    assert stats["w"].count == params["w"].size and stats["w"].max == params["w"].max()  # a constant: its value
    assert stats["relu"].best_range().lo == 0.0


def test_collect_stats_consumes_a_calibration_data_reader():
    proto, params = _conv_relu_matmul()

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = _inputs(5, seed=7)
            self.calls = 0

        def get_next(self):
            self.calls += 1
            return next(self.samples, None)

    reader = Reader()
    stats = collect_stats(proto, ["relu", "y"], reader, settings=ONE_THREAD)
    assert reader.calls == 6 and stats.samples == 5
    refs = [_reference(s["x"], params) for s in _inputs(5, seed=7)]
    assert stats["y"].max == pytest.approx(max(r["y"].max() for r in refs), rel=1e-5)


def test_collect_stats_unknown_type_empty_source_and_bad_feed():
    node = helper.make_node("Foo", ["x"], ["z"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("z", TensorProto.UNDEFINED, None)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    custom = helper.make_model(graph, opset_imports=opsets)
    stats = collect_stats(custom, ["z"], iter(()))  # nothing runnable: no session, source left unread
    assert dict(stats) == {} and "type unknown" in stats.skipped["z"]

    proto, _ = _conv_relu_matmul()
    with pytest.raises(InputError, match="no calibration samples"):
        collect_stats(proto, ["relu"], [], settings=ONE_THREAD)
    with pytest.raises(InputError, match="sample 1"):
        collect_stats(proto, ["relu"], [{"x": np.zeros((1, 3, 4, 4), np.float32)}], settings=ONE_THREAD)


# ------------------------------------------------------------------------------------------------ memory
_MEMORY_SCRIPT = r"""
import json, resource, sys, tracemalloc
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from graphopt.core.capture import collect_stats
from graphopt.core.runtime import RuntimeSettings

n = int(sys.argv[1])
w = np.random.default_rng(0).standard_normal((64, 1, 3, 3)).astype(np.float32)
graph = helper.make_graph(
    [helper.make_node("Conv", ["x", "w"], ["act"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["act"], ["relu"]),
     helper.make_node("ReduceMax", ["relu"], ["y"], keepdims=0)],
    "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 32, 32])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [numpy_helper.from_array(w, "w")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8

def samples():  # made on the fly: the source holds no samples either
    rng = np.random.default_rng(1)
    for _ in range(n):
        yield {"x": rng.standard_normal((1, 1, 32, 32)).astype(np.float32)}

rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
stats = collect_stats(model, ["act", "relu"], samples(), settings=RuntimeSettings(intra_op_threads=1))
current, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert stats.samples == n and stats["act"].count == n * 64 * 32 * 32
print(json.dumps({"peak": peak, "rss_before_kb": rss_before, "rss_after_kb": rss_after}))
"""


def test_memory_does_not_grow_with_the_number_of_samples():
    # Each sample brings two 1x64x32x32 float tensors (512 KiB): keeping them would add 512 MiB at 1024 samples.
    # tracemalloc sees our own numpy temporaries but not the buffers onnxruntime allocates for its outputs, so
    # max RSS is the check that would catch kept outputs (keeping them raised it by ~100 MiB at 256 samples).
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {n: subprocess.Popen([sys.executable, "-c", _MEMORY_SCRIPT, str(n)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env) for n in (64, 1024)}
    results = {}
    for n, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results[n] = json.loads(out.strip().splitlines()[-1])
    small, large = results[64], results[1024]
    print(f"tracemalloc peak: {small['peak'] / 2**20:.2f} MiB (64 samples), {large['peak'] / 2**20:.2f} MiB "
          f"(1024); max RSS: {small['rss_after_kb'] / 1024:.1f} MiB, {large['rss_after_kb'] / 1024:.1f} MiB; "
          f"RSS growth: {(small['rss_after_kb'] - small['rss_before_kb']) / 1024:.1f} MiB, "
          f"{(large['rss_after_kb'] - large['rss_before_kb']) / 1024:.1f} MiB")
    assert large["peak"] <= 1.10 * small["peak"]
    assert large["rss_after_kb"] <= 1.10 * small["rss_after_kb"]
