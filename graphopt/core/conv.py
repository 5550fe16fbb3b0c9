"""Convolution geometry on arrays: explicit pads for any auto_pad mode, and im2col patches of a 2-D conv input."""

from __future__ import annotations

import numpy as np


def conv_pads(in_hw, kernel, strides, dilations, pads=None, auto_pad: str = "NOTSET") -> list[int]:
    """Explicit [top, left, bottom, right] pads for any auto_pad mode (SAME_UPPER puts the odd pixel at the end)."""
    if auto_pad in ("NOTSET", "") and pads is not None:
        return list(pads)
    if auto_pad in ("NOTSET", "", "VALID"):
        return [0] * 4
    begin, end = [], []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return begin + end


def patches(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """im2col of x [N, C, H, W]: [N·H_out·W_out, C·kh·kw] (rows in N, H_out, W_out order; columns C, kh, kw), the
    rows a k×k conv multiplies by its weight reshaped to [C_out, C·kh·kw] and transposed."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    top, left, bottom, right = pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    ho = (h + top + bottom - (dh * (kh - 1) + 1)) // sh + 1
    wo = (w + left + right - (dw * (kw - 1) + 1)) // sw + 1
    cols = np.empty((n, c, kh, kw, ho, wo), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * ho * wo, c * kh * kw)


def conv_patches(x: np.ndarray, attrs: dict, kernel) -> np.ndarray:
    """`patches` for a 2-D Conv with these ONNX attributes (strides, pads, dilations, auto_pad; group 1)."""
    if attrs.get("group", 1) != 1 or len(kernel) != 2:
        raise ValueError("im2col handles 2-D convolutions with group 1 only")
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    strides, dilations = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
    pads = conv_pads(x.shape[2:], kernel, strides, dilations, attrs.get("pads"), auto_pad)
    return patches(x, kernel, strides, pads, dilations)


__all__ = ["conv_pads", "patches", "conv_patches"]
