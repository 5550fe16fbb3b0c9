"""onnxruntime sessions with explicit settings, running feeds, and latency measurement."""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import InputError

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class RuntimeSettings:
    """How every session is built. Fixed thread counts make latencies comparable between runs."""

    intra_op_threads: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    inter_op_threads: int = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    graph_optimization: str = "all"  # disable | basic | extended | all
    log_severity: int = 4  # fatal only: our own one-line errors say what went wrong
    custom_op_libraries: tuple[str, ...] = ()  # shared libraries implementing a model's custom-domain ops

    def __post_init__(self):
        if self.graph_optimization not in _OPT_LEVELS:
            raise ValueError(f"graph_optimization must be one of {sorted(_OPT_LEVELS)}")
        if self.intra_op_threads < 1 or self.inter_op_threads < 1:
            raise ValueError("thread counts must be at least 1")


_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@functools.lru_cache(maxsize=1)
def int8_weight_qmax() -> int:
    """The largest int8 weight code that onnxruntime's CPU integer kernels multiply without overflow on this
    machine: 127 where u8 x s8 products are summed in 32 bits (AVX-VNNI, AVX512-VNNI, AMX, or not x86); 63 on x86
    without them, where the AVX2 kernel (vpmaddubsw) adds pairs of u8 x s8 products in int16 and saturates
    (onnxruntime's advice there is `reduce_range`: 7-bit weights). GRAPHOPT_INT8_WEIGHT_BITS=7|8 overrides it,
    for a model quantized on one machine for another."""
    bits = os.environ.get("GRAPHOPT_INT8_WEIGHT_BITS")
    if bits in ("7", "8"):
        return 63 if bits == "7" else 127
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return 127
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return 63  # unknown x86: the safe range
    return 127 if {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags) else 63


def session_options(settings: RuntimeSettings) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.intra_op_threads
    opts.inter_op_num_threads = settings.inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _OPT_LEVELS[settings.graph_optimization]
    opts.log_severity_level = settings.log_severity
    for lib in settings.custom_op_libraries:
        if not Path(lib).is_file():
            raise InputError(f"{lib}: custom op library not found")
        try:
            opts.register_custom_ops_library(str(lib))
        except Exception as exc:
            raise InputError(f"{lib}: onnxruntime could not load this custom op library: {_first_line(exc)}") from None
    return opts


def make_session(model, settings: RuntimeSettings | None = None) -> ort.InferenceSession:
    """An ORT session for a Model. Models over 2 GB go through a temporary file with external data."""
    settings = settings or RuntimeSettings()
    opts = session_options(settings)
    if model.byte_size() < 2**31:
        return ort.InferenceSession(model.to_bytes(), opts, providers=list(settings.providers))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        model.save(path, external_data=True)
        return ort.InferenceSession(str(path), opts, providers=list(settings.providers))


def run(session: ort.InferenceSession, feeds: list[Feed]) -> list[dict[str, np.ndarray]]:
    """Run every feed; returns one {output name: array} per feed."""
    names = [o.name for o in session.get_outputs()]
    results = []
    for feed in feeds:
        try:
            values = session.run(names, feed)
        except Exception as exc:  # ORT raises its own exception types; say which feed failed and why
            shapes = {k: tuple(v.shape) for k, v in feed.items()}
            raise InputError(f"onnxruntime could not run the model on inputs {shapes}: {_first_line(exc)}") from None
        results.append(dict(zip(names, values)))
    return results


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def kernels(model, settings: RuntimeSettings | None = None) -> dict[str, str]:
    """Node name -> the op onnxruntime actually runs for it after its graph optimizations (e.g. a Conv fused
    into QLinearConv keeps its name). Read from the optimized model ORT writes out, at the 'extended' level so
    that layout rewrites specific to this CPU do not rename everything."""
    settings = dataclasses.replace(settings or RuntimeSettings(), graph_optimization="extended")
    opts = session_options(settings)
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model.to_bytes(), opts, providers=list(settings.providers))
        import onnx

        optimized = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    return {n.name: n.op_type for n in optimized.graph.node}


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure_latency(session: ort.InferenceSession, feed: Feed, *, warmup: int = 10, repeats: int = 50,
                    min_seconds: float = 0.5, max_seconds: float = 5.0, threads: int | None = None) -> Latency:
    """Median and p90 wall time of one run on one feed, after warm-up.

    Times at least `repeats` runs and keeps going until `min_seconds` of timed runs (fast models need many runs
    for a stable median), but stops after `max_seconds` so that a slow model does not stall the pipeline.
    """
    return measure_latencies([session], feed, warmup=warmup, repeats=repeats, min_seconds=min_seconds,
                             max_seconds=max_seconds, threads=threads)[0]


def measure_latencies(sessions: list[ort.InferenceSession], feed: Feed, *, warmup: int = 10, repeats: int = 50,
                      min_seconds: float = 0.5, max_seconds: float = 5.0, threads: int | None = None
                      ) -> list[Latency]:
    """Latency of several sessions on the same feed, measured in interleaved rounds.

    Alternating short rounds between the sessions spreads any drift of the machine (frequency, other load)
    evenly over them, so their ratio is fairer than timing one after the other.
    """
    names = [[o.name for o in s.get_outputs()] for s in sessions]
    for s, n in zip(sessions, names):
        for _ in range(warmup):
            s.run(n, feed)
    times: list[list[float]] = [[] for _ in sessions]
    spent = [0.0 for _ in sessions]
    round_size = 5
    while True:
        for i, (s, n) in enumerate(zip(sessions, names)):
            for _ in range(round_size):
                t0 = time.perf_counter()
                s.run(n, feed)
                dt = time.perf_counter() - t0
                times[i].append(dt * 1e3)
                spent[i] += dt
        runs = len(times[0])
        if runs >= repeats and min(spent) >= min_seconds:
            break
        if max(spent) >= max_seconds and runs >= 5:
            break
    used = threads if threads is not None else sessions[0].get_session_options().intra_op_num_threads
    return [_stats(t, used) for t in times]


def _stats(times: list[float], threads: int) -> Latency:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return Latency(statistics.median(times), p90, statistics.fmean(times), len(times), threads)
