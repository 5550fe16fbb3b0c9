"""Contenders: ways of turning the fp32 ONNX model into the one that is benchmarked.

A contender is a function `(fp32_path, calibration_feeds, workdir) -> Optimized(path, seconds)` (one that also
takes a `task` keyword gets the model's name, e.g. "minilm"):
it reads the fp32 model (never modifies it), may use the calibration feeds (a list of {input name: array}, separate
from the evaluation data), writes whatever it needs under `workdir` (an empty folder of its own) and returns the
model to benchmark plus the seconds its optimization took. Raising an exception marks the contender as failed for
that model; the harness records the reason in the table and carries on.

Adding one is a few lines:

    @contender("graphopt_cleanup")
    def _cleanup(fp32_path, feeds, workdir):
        t0 = time.perf_counter()
        ...write workdir / "model.onnx"...
        return Optimized(workdir / "model.onnx", time.perf_counter() - t0)
"""

from __future__ import annotations

import contextlib

import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

Feed = dict[str, np.ndarray]


class Optimized(NamedTuple):
    path: Path
    seconds: float
    note: str = ""  # anything the table should say about how it was built


ContenderFn = Callable[[Path, list[Feed], Path], Optimized]
CONTENDERS: dict[str, ContenderFn] = {}
DEFAULT_CONTENDERS = ("fp32", "ort_minmax", "ort_percentile", "ort_entropy", "ort_entropy_2048")


def contender(name: str) -> Callable[[ContenderFn], ContenderFn]:
    """Register a contender under `name` (what --contenders takes)."""
    def register(fn: ContenderFn) -> ContenderFn:
        if name in CONTENDERS:
            raise ValueError(f"contender {name!r} registered twice")
        CONTENDERS[name] = fn
        return fn
    return register


def get(name: str) -> ContenderFn:
    if name not in CONTENDERS:
        raise KeyError(f"unknown contender {name!r}; known: {', '.join(sorted(CONTENDERS))}")
    return CONTENDERS[name]


ORT_SETTINGS = ("quant_pre_process (symbolic shape inference, ORT graph optimization, ONNX shape inference), then "
                "quantize_static with QDQ format, per-channel QInt8 weights, QUInt8 activations, ORT's default op "
                "list, calibration fed one calibration batch at a time (CalibStridedMinMax=1)")


def describe(name: str) -> str:
    """One line about a contender: the first line of its function's docstring."""
    doc = (get(name).__doc__ or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else name


@contender("fp32")
def _fp32(fp32_path: Path, feeds: list[Feed], workdir: Path) -> Optimized:
    """the fp32 model unchanged (the reference every other contender is compared with)."""
    return Optimized(Path(fp32_path), 0.0)


# ---------------------------------------------------------------------------------------------------------- ORT
class FeedReader(CalibrationDataReader):
    """An onnxruntime CalibrationDataReader over a fixed list of feeds (rewindable)."""

    def __init__(self, feeds: list[Feed]):
        self._all = list(feeds)
        self._feeds = self._all
        self._i = 0

    def get_next(self) -> Feed | None:
        if self._i >= len(self._feeds):
            return None
        self._i += 1
        return self._feeds[self._i - 1]

    def rewind(self) -> None:
        self._i = 0

    def __len__(self) -> int:  # ORT's strided calibration asks for it
        return len(self._all)

    def set_range(self, start_index: int, end_index: int) -> None:  # used by ORT's strided MinMax calibration
        self._feeds = self._all[start_index:end_index]
        self._i = 0


def ort_quantize_static(fp32_path: Path, feeds: list[Feed], workdir: Path, method: str,
                        calibrator_options: dict | None = None) -> Optimized:
    """onnxruntime's static QDQ quantization as its docs recommend for x86 CPUs: quant_pre_process (symbolic shape
    inference + ORT graph optimization), then quantize_static with QDQ format, per-channel QInt8 weights, QUInt8
    activations and the given calibration method, calibrated on `feeds`.

    `calibrator_options` (e.g. {"num_bins": 2048}) are passed to ORT's calibrator, which quantize_static's
    extra_options cannot reach: the ranges are then computed with ORT's own `create_calibrator` and handed to
    quantize_static through its calibration cache file, so the quantization itself is unchanged."""
    from onnxruntime.quantization import CalibrationMethod

    calibrate_method = getattr(CalibrationMethod, method)
    t0 = time.perf_counter()
    fp32_path, workdir = Path(fp32_path).resolve(), Path(workdir).resolve()
    with contextlib.chdir(workdir):  # ORT's quantizer leaves temporary models and .data files in the cwd
        return _quantize_static(fp32_path, feeds, workdir, calibrate_method, calibrator_options, t0)


def _quantize_static(fp32_path: Path, feeds, workdir: Path, calibrate_method, calibrator_options,
                     t0: float) -> Optimized:
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    source, note = _pre_process(Path(fp32_path), workdir / "preprocessed.onnx", quant_pre_process)
    cache = None
    if calibrator_options:
        cache = workdir / "calibration_cache.json"
        _ort_ranges(source, feeds, workdir, calibrate_method, calibrator_options, cache)
    out = workdir / "model.onnx"
    quantize_static(
        str(source), str(out), FeedReader(feeds),
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=calibrate_method, calibration_cache_path=cache,
        # calibrate one feed (batch) at a time: ORT's histogram calibrators otherwise keep every activation of
        # every feed in memory and stack them, which also fails when feeds differ in shape (text batches padded
        # to their own longest sequence). For MinMax this changes nothing; histograms are merged feed by feed.
        extra_options={"CalibStridedMinMax": 1},
    )
    return Optimized(out, time.perf_counter() - t0, note)


# quant_pre_process settings tried in turn: ORT's defaults, then symbolic shape inference with auto_merge (the
# MiniLM export's dynamic shapes need it), then without symbolic shape inference
_PRE_PROCESS_TRIES = ({}, {"auto_merge": True}, {"skip_symbolic_shape": True})


def _pre_process(src: Path, dst: Path, quant_pre_process) -> tuple[Path, str]:
    errors = []
    for kw in _PRE_PROCESS_TRIES:
        try:
            quant_pre_process(str(src), str(dst), **kw)
        except Exception as exc:
            errors.append(_first_line(exc))
            continue
        if not kw:
            return dst, ""
        opts = ", ".join(f"{k}={v}" for k, v in kw.items())
        return dst, f"quant_pre_process with {opts} (defaults failed: {errors[0]})"
    # pre-processing is ORT's recommendation, not a requirement
    return src, f"quant_pre_process failed ({errors[0]}); quantized the export directly"


def _ort_ranges(model: Path, feeds: list[Feed], workdir: Path, method, options: dict, cache: Path) -> None:
    """Tensor ranges from ORT's calibrator with explicit options, saved as a quantize_static calibration cache.
    Calibrates the op types quantize_static would (its default op list)."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    calibrator = create_calibrator(model, op_types, augmented_model_path=str(workdir / "augmented.onnx"),
                                   calibrate_method=method, extra_options=dict(options))
    for feed in feeds:  # one feed at a time, as quantize_static does with CalibStridedMinMax=1
        calibrator.collect_data(FeedReader([feed]))
    save_tensors_data(calibrator.compute_data(), cache)
    del calibrator


_ORT_CALIBRATOR_DEFAULTS = {"MinMax": "", "Percentile": "ORT's defaults: num_bins=2048, percentile=99.999",
                            "Entropy": "ORT's defaults: num_bins=128, num_quantized_bins=128"}


def _ort(method: str, calibrator_options: dict | None = None) -> ContenderFn:
    def run(fp32_path: Path, feeds: list[Feed], workdir: Path) -> Optimized:
        return ort_quantize_static(fp32_path, feeds, workdir, method, calibrator_options)
    extra = (", ".join(f"{k}={v}" for k, v in calibrator_options.items()) if calibrator_options
             else _ORT_CALIBRATOR_DEFAULTS[method])
    run.__doc__ = f"ORT quantize_static, {method} calibration" + (f" ({extra})" if extra else "")
    return run


# quantize_static's own settings (what a user of ORT gets). Its Entropy calibrator starts histograms with
# num_bins=128, equal to num_quantized_bins=128, and then has a single candidate threshold, the full range, as
# MinMax; it only searches where merging later feeds has widened a histogram beyond 128 bins (calibrated in a
# single pass, it reproduces MinMax exactly). quantize_static's extra_options cannot change num_bins, hence:
for _method in ("MinMax", "Percentile", "Entropy"):
    contender(f"ort_{_method.lower()}")(_ort(_method))
# Entropy with a histogram fine enough for its KL search to choose from (TensorRT and PyTorch use 2048 bins)
contender("ort_entropy_2048")(_ort("Entropy", {"num_bins": 2048}))


@contender("ort_dynamic")
def _ort_dynamic(fp32_path: Path, feeds: list[Feed], workdir: Path) -> Optimized:
    """ORT quantize_dynamic (after quant_pre_process): MatMul only, per-channel QInt8 weights, run-time activation scales.

    No calibration: the feeds are not used."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    t0 = time.perf_counter()
    fp32_path, workdir = Path(fp32_path).resolve(), Path(workdir).resolve()
    with contextlib.chdir(workdir):
        source, note = _pre_process(fp32_path, workdir / "preprocessed.onnx", quant_pre_process)
        out = workdir / "model.onnx"
        quantize_dynamic(str(source), str(out), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8)
    return Optimized(out, time.perf_counter() - t0, note)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


# graphopt's passes register themselves as contenders too (kept in their own module), and so do the peers (NNCF,
# onnxruntime's MatMulNBitsQuantizer).
from . import graphopt_contenders  # noqa: E402,F401
from . import peers  # noqa: E402,F401

DEFAULT_CONTENDERS = DEFAULT_CONTENDERS + graphopt_contenders.QDQ_CONTENDERS
