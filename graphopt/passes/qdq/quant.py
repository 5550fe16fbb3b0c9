"""Integer quantization arithmetic shared by the quantization passes: weights, biases, activation scales.

Conventions follow what onnxruntime's CPU integer kernels expect: activations asymmetric uint8, weights symmetric
int8 per output channel (zero-point 0), biases int32 with scale = activation scale x weight scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core.runtime import int8_weight_qmax

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class QParams:
    scale: np.ndarray  # float32, scalar or per channel
    zero_point: np.ndarray  # uint8 / int8 / int4 container, same shape as scale
    axis: int | None = None  # per-channel axis, None for per-tensor


def activation_qparams(lo: float, hi: float) -> QParams:
    """uint8 asymmetric parameters for the range [lo, hi]; the range is widened to hold 0 exactly."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-12:
        hi = lo + 1e-6
    scale = (hi - lo) / 255.0
    zero_point = int(np.clip(round(-lo / scale), 0, 255))
    return QParams(np.array(scale, np.float32), np.array(zero_point, np.uint8))


def weight_qparams(w: np.ndarray, axis: int, qmax: int | None = None) -> QParams:
    """Symmetric int8 scales per channel along `axis` (max |w| maps to qmax; by default what this machine's
    integer kernels take without overflow, see int8_weight_qmax)."""
    qmax = qmax or int8_weight_qmax()
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=reduce_axes) if reduce_axes else np.abs(w)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    return QParams(scale, np.zeros(scale.shape, np.int8), axis)


def quantize_weight(w: np.ndarray, q: QParams, qmax: int | None = None) -> np.ndarray:
    qmax = qmax or int8_weight_qmax()
    shape = [1] * w.ndim
    shape[q.axis] = -1
    return np.clip(np.round(w / q.scale.reshape(shape)), -qmax, qmax).astype(np.int8)


def guard_bias_overflow(bias: np.ndarray, input_scale: float, weight: QParams) -> tuple[QParams, int]:
    """Raise the weight scale of channels whose int32 bias (bias / (input_scale * weight_scale)) would overflow.

    The integer kernels read the bias with scale input_scale x weight_scale, so the weight scale is what must
    change (as onnxruntime's quantizer does). Returns the safe parameters and how many channels were raised.
    """
    needed = np.abs(bias.astype(np.float64)) / (float(input_scale) * (INT32_MAX // 2))
    raise_ = needed > weight.scale
    if not raise_.any():
        return weight, 0
    scale = np.where(raise_, needed, weight.scale).astype(np.float32)
    return QParams(scale, weight.zero_point, weight.axis), int(raise_.sum())


def quantize_bias(bias: np.ndarray, input_scale: float, weight: QParams) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias and its per-channel scale input_scale x weight_scale (call guard_bias_overflow first)."""
    scale = (np.float32(input_scale) * weight.scale).astype(np.float32)
    q = np.round(bias.astype(np.float64) / scale.astype(np.float64))
    if np.abs(q).max(initial=0) > INT32_MAX:
        raise ValueError("bias overflows int32: guard_bias_overflow was not applied")
    return q.astype(np.int32), scale
