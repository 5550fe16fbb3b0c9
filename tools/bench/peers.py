"""Peer optimizers as benchmark contenders (registered when bench.contenders is imported): NNCF's post-training
quantization (ONNX backend) and onnxruntime's MatMulNBitsQuantizer (int4 weight-only, for MiniLM).

Each peer runs as its library ships it, on the same calibration feeds as every other contender, and its model is
timed in onnxruntime's CPU provider like every row. The note of each row says which ORT kernels its quantized ops
became (`peer_kernels`): NNCF's int8 uses signed activations and is not always fused by ORT's CPU provider.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from pathlib import Path

from .contenders import CONTENDERS, Feed, FeedReader, Optimized, contender

TRANSFORMERS = {"minilm"}  # tasks NNCF is told are transformers (model_type=nncf.ModelType.TRANSFORMER)


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "not installed"


def nncf_version() -> str:
    return _version("nncf")


# ---------------------------------------------------------------------------------------------------- kernels
_QUANTIZED = ("QLinear", "Integer", "QGemm", "NBits", "BlockQuantized", "QuantizeLinear", "DequantizeLinear",
              "DynamicQuantize", "QAttention", "QEmbed")
_FLOAT = ("Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "Attention", "Gather")


def peer_kernels(path: Path) -> str:
    """What ORT's CPU provider runs for a model's quantized and heavy ops after its graph optimizations, as counts,
    e.g. "ORT CPU kernels: 52 QLinearConv, 1 QGemm; float: 0". Read, as graphopt.core.runtime.kernels does, from
    the optimized model ORT writes at the 'extended' level (before the CPU-specific layout rewrites); straight from
    the file, since not every peer's file passes graphopt.load's checks (ORT's GPTQ omits the com.microsoft opset)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    try:
        with tempfile.TemporaryDirectory() as tmp:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            ops = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath,
                                                       load_external_data=False).graph.node)
    except Exception as exc:  # the note is a courtesy; never fail a row for it
        return f"ORT kernels unavailable ({type(exc).__name__})"
    quantized = [f"{n} {op}" for op, n in ops.most_common() if any(k in op for k in _QUANTIZED)]
    heavy = [f"{n} {op}" for op, n in ops.most_common() if op in _FLOAT]
    return f"ORT CPU kernels: {', '.join(quantized) or 'no quantized op'}; float: {', '.join(heavy) or 'none'}"


# ------------------------------------------------------------------------------------------------------- NNCF
def nncf_rows(feeds: list[Feed]) -> list[Feed]:
    """The calibration feeds one item per entry ([1, ...] slices, each keeping its feed's padding), as NNCF's
    Dataset is meant to be fed; subset_size is then the number of calibration items."""
    return [{k: v[i:i + 1] for k, v in f.items()} for f in feeds for i in range(len(next(iter(f.values()))))]


def nncf_quantize(fp32_path: Path, feeds: list[Feed], workdir: Path, *, preset: str | None = None,
                  transformer: bool = False) -> Optimized:
    """`nncf.quantize` (ONNX backend) on the fp32 ModelProto with subset_size = every calibration item, NNCF's
    defaults otherwise (fast_bias_correction=True, target_device ANY); `preset` None, "performance" or "mixed";
    `transformer`: model_type=nncf.ModelType.TRANSFORMER."""
    import nncf
    import onnx

    t0 = time.perf_counter()
    model = onnx.load(str(fp32_path))
    rows = nncf_rows(feeds)
    kw = {}
    if preset is not None:
        kw["preset"] = {"performance": nncf.QuantizationPreset.PERFORMANCE,
                        "mixed": nncf.QuantizationPreset.MIXED}[preset]
    if transformer:
        kw["model_type"] = nncf.ModelType.TRANSFORMER
    quantized = nncf.quantize(model, nncf.Dataset(rows), subset_size=len(rows), **kw)
    out = Path(workdir) / "model.onnx"
    onnx.save(quantized, str(out))
    seconds = time.perf_counter() - t0
    resolved = preset or ("mixed" if transformer else "performance")
    settings = (f"preset={resolved}" + (" (NNCF's default)" if preset is None else "")
                + (", model_type=TRANSFORMER" if transformer else "") + ", fast_bias_correction=True")
    return Optimized(out, seconds, f"nncf {nncf_version()} `nncf.quantize` (ONNX backend, {settings}, "
                                   f"subset_size={len(rows)}) on the {len(rows)} calibration items, one per entry; "
                                   + peer_kernels(out))


@contender("nncf_ptq")
def _nncf_ptq(fp32_path: Path, feeds: list[Feed], workdir: Path, task: str = "") -> Optimized:
    return nncf_quantize(fp32_path, feeds, workdir, transformer=task in TRANSFORMERS)


@contender("nncf_ptq_mixed")
def _nncf_ptq_mixed(fp32_path: Path, feeds: list[Feed], workdir: Path, task: str = "") -> Optimized:
    return nncf_quantize(fp32_path, feeds, workdir, preset="mixed", transformer=task in TRANSFORMERS)


CONTENDERS["nncf_ptq"].__doc__ = (
    f"NNCF {nncf_version()} post-training quantization, ONNX backend: `nncf.quantize` on the fp32 ModelProto at its "
    "defaults (preset None = PERFORMANCE: symmetric int8 weights and activations, or MIXED for a transformer; "
    "fast_bias_correction=True; target_device ANY), subset_size = all calibration items, fed one item per entry; "
    "MiniLM with model_type=TRANSFORMER; int8 as NNCF writes it (signed activations), run by ORT's CPU provider")
CONTENDERS["nncf_ptq_mixed"].__doc__ = (
    f"NNCF {nncf_version()} `nncf.quantize` as `nncf_ptq` with preset=nncf.QuantizationPreset.MIXED (symmetric "
    "weights, asymmetric activations); for MiniLM (model_type=TRANSFORMER) MIXED is already NNCF's default, so this "
    "row has the same settings as `nncf_ptq`")


# ---------------------------------------------------------------------------------- ORT MatMulNBitsQuantizer
NBITS_BLOCK = 32  # as graphopt's int4 MiniLM: MatMul weights and the word-embedding table in blocks of 32
NBITS_ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 activations (the fastest CPU path)


def ort_nbits(fp32_path: Path, feeds: list[Feed], workdir: Path, algorithm: str) -> Optimized:
    """onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer(bits=4, block_size=32,
    is_symmetric=True, accuracy_level=4, QOperator format) with the given algorithm config; saved with the weights
    inside the .onnx file."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb  # needs the onnx_ir package

    t0 = time.perf_counter()
    fp32_path, workdir = Path(fp32_path).resolve(), Path(workdir).resolve()
    model = onnx.load(str(fp32_path))
    note = ""
    if algorithm == "rtn" and model.opset_import and min(o.version for o in model.opset_import
                                                        if o.domain in ("", "ai.onnx")) < 21:
        # an int4 Gather needs opset 21: the quantizer only rewrites the opset number (its own warning: "the
        # generated model may not be a valid model"; the export's ReduceL2 keeps its opset-17 `axes` attribute and
        # ORT rejects it), so the model is converted to opset 21 first, as that warning asks of its user
        from onnx import version_converter

        opset = min(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        model = version_converter.convert_version(model, 21)
        note = f"fp32 model converted from opset {opset} to 21 (onnx.version_converter) first; "
    if algorithm == "rtn":
        config = mnb.DefaultWeightOnlyQuantConfig(
            block_size=NBITS_BLOCK, is_symmetric=True, accuracy_level=NBITS_ACCURACY_LEVEL,
            quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul", "Gather"),
            quant_axes=(("MatMul", 0), ("Gather", 1)), bits=4)
    elif algorithm == "hqq":  # HQQ: asymmetric with float zero points, no accuracy_level, MatMul only
        config = mnb.HQQWeightOnlyQuantConfig(block_size=NBITS_BLOCK, bits=4, quant_format=QuantFormat.QOperator,
                                              op_types_to_quantize=("MatMul",))
    elif algorithm == "gptq":  # group size, symmetry and accuracy level come from the quantizer's own arguments
        config = mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=FeedReader(feeds),
                                               quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",))
    else:
        raise ValueError(f"unknown MatMulNBits algorithm {algorithm!r}")
    quantizer = mnb.MatMulNBitsQuantizer(model, bits=4, block_size=NBITS_BLOCK, is_symmetric=True,
                                         accuracy_level=NBITS_ACCURACY_LEVEL, quant_format=QuantFormat.QOperator,
                                         algo_config=config)
    log = logging.getLogger(mnb.__name__)
    level = log.level
    log.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        with contextlib.chdir(workdir):  # in case a step leaves temporary files in the cwd
            quantizer.process()
    finally:
        log.setLevel(level)
    out = workdir / "model.onnx"
    quantizer.model.save_model_to_file(str(out), False)
    return Optimized(out, time.perf_counter() - t0, f"onnxruntime {_version('onnxruntime')} MatMulNBitsQuantizer; "
                                                    + note + peer_kernels(out))


def _nbits(algorithm: str, doc: str):
    def build(fp32_path: Path, feeds: list[Feed], workdir: Path) -> Optimized:
        return ort_nbits(fp32_path, feeds, workdir, algorithm)
    build.__doc__ = doc
    return build


contender("ort_nbits_rtn")(_nbits(
    "rtn", "ORT MatMulNBitsQuantizer, DefaultWeightOnlyQuantConfig (round to nearest): int4, block_size=32, "
           "is_symmetric=True, accuracy_level=4, QOperator, op_types_to_quantize MatMul and Gather (quant_axes "
           "MatMul 0, Gather 1: MatMulNBits and GatherBlockQuantized for every constant MatMul weight and "
           "embedding table); the model converted to opset 21 first (onnx.version_converter: the int4 Gather "
           "needs it); no calibration"))
contender("ort_nbits_hqq")(_nbits(
    "hqq", "ORT MatMulNBitsQuantizer, HQQWeightOnlyQuantConfig: int4, block_size=32, QOperator, MatMul only (ORT's "
           "HQQ raises NotImplementedError on Gather), asymmetric with float zero points (HQQ has no symmetric "
           "mode) and no accuracy_level (HQQ's MatMulNBits nodes leave it unset: float compute); no calibration"))
contender("ort_nbits_gptq")(_nbits(
    "gptq", "ORT MatMulNBitsQuantizer, GPTQWeightOnlyQuantConfig on the calibration feeds (a CalibrationDataReader, "
            "one feed per batch): int4, group (block) size 32, symmetric, accuracy_level=4, QOperator, MatMul only "
            "(ORT's GPTQ path quantizes MatMul weights only); GPTQ's own settings at ORT's defaults (percdamp=0.01, "
            "column block_size=128, actorder=False, mse=False, perchannel=True)"))
