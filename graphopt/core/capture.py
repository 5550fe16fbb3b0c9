"""Activation statistics with bounded memory, and per-tensor choice of a quantization range.

`collect_stats` runs a model once per calibration sample with the requested intermediate tensors as extra graph
outputs, folds every value into a `TensorStats` and drops the arrays, so memory does not grow with the number of
samples (onnxruntime's histogram calibrators keep every activation of every sample until the end).

`TensorStats` keeps a float-like histogram rather than a linear one: per sign, `octaves` powers of two below the
largest magnitude seen are each cut into `per_octave` equal buckets, and below them one linear zone of
`per_octave` buckets reaches down to zero (like float subnormals). A linear histogram loses the bulk of a tensor
the moment one outlier is 1e4 times larger (all of the bulk falls into one or two bins); here the relative
resolution is 1/per_octave over a dynamic range of 2**octaves. Every bucket edge is a small integer times a power
of two, so edges are exact in float64. When a larger magnitude arrives the top exponent rises by d: the lowest d
octaves and the old linear zone merge into the new linear zone, whose buckets are 2**d times wider, so old
buckets nest exactly into new ones and counts are merged, never re-estimated. Exact zeros are counted apart
(they are always quantized exactly, since every range holds 0).

Range methods, all working on the histogram (values inside a bucket are taken as uniform between its edges,
clipped to the exact min and max):
- "minmax": the observed range.
- "percentile": drops `(100 - percentile)`% of the values, split between the two tails of two-signed data, all
  from the tail of one-signed data, from the |x| tail when symmetric.
- "entropy": TensorRT's KL-divergence threshold search: for a candidate range, the reference distribution is
  the range cut into 8 fine bins per quantization level with the clipped-off mass folded into the end bins; its
  quantized version merges each level's fine bins and spreads the level's mass (without the clipped-off mass)
  evenly over the non-empty ones. Exact zeros are left out (they are exact at any range).
- "mse": the range minimising `quant_mse`, the expected squared error of quantize-dequantize (rounding inside
  the range, clipping outside), integrated exactly over each bucket.
Ranges always hold 0. Entropy and mse search a geometric grid of 64 candidates per end (from the median
magnitude of that side to its extreme), refine around the best one, and for two-signed asymmetric data
alternate between the two ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
from onnx import helper, numpy_helper

from .errors import InputError
from .model import Model
from .runtime import RuntimeSettings, make_session
from .shapes import tensor_infos

METHODS = ("minmax", "percentile", "entropy", "mse")
_CHUNK = 1 << 20  # values folded per step: bounds the temporaries of one update
_FLOAT_DTYPES = {"float16", "float32", "float64"}
_GRID = 64  # candidates per end in the entropy / mse searches
_REFINE = 16  # candidates between the neighbours of the best grid point
_FINE_PER_LEVEL = 8  # entropy: fine bins per quantization level


# ----------------------------------------------------------------------------------------- scale / zero point
def scale_zero_point(lo: float, hi: float, qmin: int, qmax: int, symmetric: bool = False) -> tuple[float, int]:
    """Scale and zero point for [lo, hi] as onnxruntime computes them (0 is added to the range first).

    Asymmetric: scale = (hi - lo) / (qmax - qmin), zero_point = round(qmin - lo / scale) clamped to [qmin, qmax].
    Symmetric: the range becomes [-a, a] with a = max(|lo|, |hi|) and the zero point is the midpoint of
    [qmin, qmax] (0 for int8, 128 for uint8). A range of width 0 gets scale 1, zero point 0.
    """
    s, zp = _scale_zp(np.asarray([lo], float), np.asarray([hi], float), qmin, qmax, symmetric)
    return float(np.float32(s[0])), int(zp[0])


def _scale_zp(lo: np.ndarray, hi: np.ndarray, qmin: int, qmax: int, symmetric: bool):
    if not qmin < qmax or qmin > 0 or qmax < 0:
        raise ValueError(f"need qmin <= 0 <= qmax and qmin < qmax, got qmin={qmin}, qmax={qmax}")
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    if symmetric:
        a = np.maximum(-lo, hi)
        lo, hi = -a, a
    scale = (hi - lo) / float(qmax - qmin)
    if symmetric:
        zp = np.full(scale.shape, np.round((qmin + qmax) / 2.0))
    else:
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.round(qmin - lo / safe), qmin, qmax)
    tiny = scale < np.finfo(np.float32).tiny
    return np.where(tiny, 1.0, scale), np.where(tiny, 0.0, zp)


# --------------------------------------------------------------------------------------------- range choice
@dataclass(frozen=True)
class RangeChoice:
    """The range picked for one tensor, the method that gave it, and what every method would have given."""

    lo: float
    hi: float
    method: str
    mse: float  # expected squared quantization error per value at this range (from the histogram)
    scale: float
    zero_point: int
    candidates: dict[str, tuple[float, float, float]]  # method -> (lo, hi, mse)


# --------------------------------------------------------------------------------------------- statistics
@dataclass
class TensorStats:
    """Running statistics of one float tensor over all calibration samples; raw values are never kept.

    `hist[i]` counts the finite values in [edges[i], edges[i + 1]) (see the module docstring for the buckets).
    Values are folded in as float32 (float16 and integers up to 2**24 exactly; float64 rounded, and counted as
    non-finite beyond the float32 range).
    """

    name: str
    per_octave: int = 32  # buckets per power of two (a power of two itself)
    octaves: int = 31  # powers of two resolved below the largest magnitude; below them one linear zone
    count: int = 0  # finite values seen
    zeros: int = 0  # of which exactly zero
    nonfinite: int = 0  # NaN and +-Inf seen, left out of everything else
    min: float = math.inf
    max: float = -math.inf
    hist: np.ndarray = field(default=None, repr=False)
    top: int | None = None  # every finite value v has -2**top <= v < 2**top (None: only zeros so far)

    def __post_init__(self):
        p = self.per_octave.bit_length() - 1
        if self.per_octave < 1 or self.per_octave != 1 << p or self.per_octave > 1 << 20:
            raise ValueError(f"per_octave must be a power of two, got {self.per_octave}")
        if not 1 <= self.octaves <= 200:
            raise ValueError(f"octaves must be between 1 and 200, got {self.octaves}")
        self._p = p
        self._half = self.per_octave * (self.octaves + 1)  # buckets per sign
        if self.hist is None:
            self.hist = np.zeros(2 * self._half, np.int64)

    # ---------------------------------------------------------------------------------------- buckets
    @property
    def bins(self) -> int:
        return 2 * self._half

    @property
    def edges(self) -> np.ndarray:
        """The 2 * half + 1 bucket edges, ascending, exact in float64; the middle one is 0."""
        pos = self._magnitude_edges(self.top if self.top is not None else 0)
        return np.concatenate([-pos[::-1], pos[1:]])

    def _magnitude_edges(self, top: int) -> np.ndarray:
        m, k, p = self.per_octave, self.octaves, self._p
        j = np.arange(self._half + 1)
        octave = np.maximum(j // m - 1, 0)
        mant = np.where(j < m, j, m + j % m)
        return np.ldexp(mant.astype(float), np.where(j < m, top - k - p, top - k + octave - p))

    def _magnitude_index(self, y: np.ndarray, top: int) -> np.ndarray:
        """Bucket (0 .. half-1) of magnitudes 0 <= y < 2**top, float64 (used to re-bin old buckets)."""
        m, k, p = self.per_octave, self.octaves, self._p
        frac, exp = np.frexp(y)  # y = frac * 2**exp, frac in [0.5, 1)
        octave_idx = m * (exp - 1 - (top - k) + 1) + np.floor(np.ldexp(frac, p + 1) - m).astype(np.int64)
        linear_idx = np.floor(np.ldexp(y, -(top - k - p))).astype(np.int64)
        return np.where(y < math.ldexp(1.0, top - k), linear_idx, octave_idx)

    def _retop(self, new_top: int) -> None:
        """Raise the top exponent; old buckets nest exactly into the new, wider ones."""
        if self.top is not None and new_top <= self.top:
            return
        if self.top is not None:
            used = np.flatnonzero(self.hist)
            edges = self._magnitude_edges(self.top)
            half = self._half
            neg = used < half
            j = np.where(neg, half - 1 - used, used - half)  # magnitude bucket of each used position
            mid = (edges[j] + edges[j + 1]) / 2  # strictly inside the old bucket, so inside one new one
            new_j = self._magnitude_index(mid, new_top)
            new_pos = np.where(neg, half - 1 - new_j, half + new_j)
            self.hist = np.bincount(new_pos, weights=self.hist[used], minlength=self.bins).astype(np.int64)
        self.top = new_top

    # ----------------------------------------------------------------------------------------- update
    def update(self, values) -> None:
        """Fold an array of values in (any shape); NaN/Inf are counted in `nonfinite` and otherwise ignored."""
        arr = np.asarray(values)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"{self.name}: cannot collect statistics of a {arr.dtype} array")
        flat = arr.reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            self._update_chunk(np.ascontiguousarray(flat[start:start + _CHUNK], dtype=np.float32))

    def _update_chunk(self, x: np.ndarray) -> None:
        x = x + np.float32(0.0)  # a fresh copy in which -0.0 has become +0.0
        bits = x.view(np.int32)
        mag = bits & np.int32(0x7FFFFFFF)
        bad = mag >= np.int32(0x7F800000)  # exponent all ones: Inf or NaN
        if bad.any():
            self.nonfinite += int(np.count_nonzero(bad))
            keep = ~bad
            x, bits, mag = x[keep], bits[keep], mag[keep]
        if x.size == 0:
            return
        self.count += x.size
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        self.zeros += int(np.count_nonzero(mag == 0))
        sign = bits >> 31  # -1 for negative values, 0 otherwise
        # A negative bucket holds magnitudes in (lo, hi]: look a magnitude up as its float32 predecessor.
        key = mag + sign
        kmax = int(key.max())
        if kmax > 0:
            self._retop(math.frexp(float(np.int32(kmax).view(np.float32)))[1])
        if self.top is None:  # zeros only: they sit in the first positive bucket at any top
            self.hist[self._half] += x.size
            return
        k, p, top = self.octaves, self._p, self.top
        if top - k < -126:  # tiny values (max below ~1e-29): the float32 tricks below fail among subnormals
            y = np.abs(x.astype(float))
            y = np.where(sign < 0, np.nextafter(y, 0.0), y)
            idx = self._magnitude_index(y, top).astype(np.int32)
            self.hist += np.bincount((idx ^ sign) + self._half, minlength=self.bins)
            return
        # In the octaves, (exponent << p) | (top p mantissa bits) of the float32 is the bucket, up to an offset;
        # in the linear zone below 2**(top - k) that index is < m and the bucket is floor(key / width) instead.
        base = (top - k + 126) << p
        idx = key >> (23 - p)
        np.maximum(idx, base, out=idx)
        idx -= base  # the octave bucket (>= m); below m in the linear zone, where zero gets 0 exactly
        threshold = (top - k + 127) << 23  # float32 bits of 2**(top - k), where the linear zone ends
        small = (key - 1).view(np.uint32) < np.uint32(threshold - 1)  # 0 < key < threshold
        if small.any():
            linear = np.ldexp(key[small].view(np.float32), -(top - k - p))  # exact: scaled by a power of two
            idx[small] = linear.astype(np.int32)  # floor(|x| / bucket width), < m
        idx ^= sign  # negative side: -1 - idx
        idx += self._half
        self.hist += np.bincount(idx, minlength=self.bins)

    # ---------------------------------------------------------------------------------- distribution
    def _pieces(self, zeros: bool = True):
        """(u, v, c): nonempty buckets as uniform pieces clipped to [min, max]; point masses have u == v.

        Exact zeros are taken out of the bucket that holds them and, with zeros=True, form the point (0, 0, zeros).
        """
        counts = self.hist.astype(float)
        if self.zeros:
            counts[self._half] -= self.zeros
        used = np.flatnonzero(counts > 0)
        edges = self.edges
        u = np.maximum(edges[used], self.min)
        v = np.minimum(edges[used + 1], self.max)
        c = counts[used]
        if zeros and self.zeros:
            at = np.searchsorted(used, self._half)
            u, v, c = np.insert(u, at, 0.0), np.insert(v, at, 0.0), np.insert(c, at, float(self.zeros))
        return u, np.maximum(v, u), c

    def _cdf_parts(self, zeros: bool):
        u, v, c = self._pieces(zeros)
        point = v <= u
        cont_u, cont_v, cont_c = u[~point], v[~point], c[~point]
        xs = np.empty(2 * cont_u.size)
        xs[0::2], xs[1::2] = cont_u, cont_v
        cum = np.cumsum(cont_c)
        fs = np.empty_like(xs)
        fs[0::2], fs[1::2] = cum - cont_c, cum
        return xs, fs, u[point], c[point]

    @staticmethod
    def _cdf(x, parts, left=False):
        """P(X <= x) as a count (P(X < x) with left=True), X piecewise uniform plus point masses."""
        xs, fs, pts, pm = parts
        x = np.asarray(x, float)
        out = np.interp(x, xs, fs) if xs.size else np.zeros(x.shape)
        if pts.size:
            hit = pts < x[..., None] if left else pts <= x[..., None]
            out = out + (hit * pm).sum(-1)
        return out

    def _quantile_from(self, target: float, knots: np.ndarray, f_right: np.ndarray, f_left: np.ndarray) -> float:
        """The value at which a cdf (given at knots, linear between them) first reaches `target` counts."""
        i = int(np.searchsorted(f_right, target, side="left"))
        if i >= knots.size:
            return float(knots[-1])
        if i == 0 or f_left[i] < target:  # the target falls into a point mass at knots[i]
            return float(knots[i])
        f0, f1 = f_right[i - 1], f_left[i]
        t = 0.0 if f1 <= f0 else (target - f0) / (f1 - f0)
        return float(knots[i - 1] + t * (knots[i] - knots[i - 1]))

    def quantile(self, q: float) -> float:
        """Value below which a fraction q of the finite values lie (from the histogram)."""
        parts = self._cdf_parts(zeros=True)
        knots = np.unique(np.concatenate([parts[0], parts[2]]))
        return self._quantile_from(q * self.count, knots, self._cdf(knots, parts), self._cdf(knots, parts, True))

    def abs_quantile(self, q: float, *, zeros: bool = True) -> float:
        """Value below which a fraction q of the |values| lie (of the nonzero ones with zeros=False)."""
        parts = self._cdf_parts(zeros=zeros)
        knots = np.unique(np.abs(np.concatenate([parts[0], parts[2]])))
        f_right = self._cdf(knots, parts) - self._cdf(-knots, parts, left=True)
        f_left = self._cdf(knots, parts, left=True) - self._cdf(-knots, parts)
        total = self.count - (0 if zeros else self.zeros)
        return self._quantile_from(q * total, knots, f_right, f_left)

    # -------------------------------------------------------------------------------------- error
    def quant_mse(self, lo: float, hi: float, *, qmin: int = 0, qmax: int = 255, symmetric: bool = False) -> float:
        """Expected squared error per value of quantize-dequantize at [lo, hi] over this distribution."""
        return float(self._mse_many(np.asarray([lo], float), np.asarray([hi], float), qmin, qmax, symmetric)[0])

    def _mse_many(self, los, his, qmin, qmax, symmetric) -> np.ndarray:
        if self.count == 0:
            return np.zeros(los.shape)
        scale, zp = _scale_zp(los, his, qmin, qmax, symmetric)
        s = scale[:, None]
        qlow, qhigh = (qmin - zp)[:, None], (qmax - zp)[:, None]  # the grid in units of s: integers
        low, high = qlow * s, qhigh * s  # the representable extremes
        u, v, c = self._pieces(zeros=False)  # exact zeros are exact at any range: no error
        point = v <= u
        err = np.zeros(scale.shape)
        if point.any():  # point masses: the error at the point itself
            x, n = u[point], c[point]
            r = np.clip(np.round(x / s), qlow, qhigh) * s
            err += ((x - r) ** 2 * n).sum(axis=1)
            u, v, c = u[~point], v[~point], c[~point]
        # clipping below `low` and above `high`: the integral of (x - bound)^2 over the part outside
        d1, d2 = np.minimum(u - low, 0.0), np.minimum(v - low, 0.0)
        e1, e2 = np.maximum(u - high, 0.0), np.maximum(v - high, 0.0)
        outside = (d2 ** 3 - d1 ** 3 + e2 ** 3 - e1 ** 3) / 3.0
        # rounding inside: the integral of (x - s * round(x / s))^2 over the part inside, in units of s
        ya = np.clip(u / s, qlow, qhigh)
        yb = np.clip(v / s, qlow, qhigh)
        fa, fb = np.floor(ya), np.floor(yb)
        inside = s ** 3 * ((fb - fa) / 12.0 + _g(yb - fb) - _g(ya - fa))
        err += ((outside + inside) @ (c / (v - u)))
        return err / self.count

    # -------------------------------------------------------------------------------------- ranges
    def range(self, method: str, *, qmin: int = 0, qmax: int = 255, symmetric: bool = False,
              **params) -> tuple[float, float]:
        """The clipping range [lo, hi] (lo <= 0 <= hi) that `method` picks for this tensor."""
        if method not in METHODS:
            raise ValueError(f"unknown range method {method!r}; choose from {', '.join(METHODS)}")
        allowed = {"percentile"} if method == "percentile" else set()
        if set(params) - allowed:
            raise TypeError(f"method {method!r} takes no parameter(s) {sorted(set(params) - allowed)}")
        _scale_zp(np.zeros(1), np.zeros(1), qmin, qmax, symmetric)  # validates qmin / qmax
        if self.count == 0:
            return 0.0, 0.0
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if symmetric:
            a = max(-lo, hi)
            lo, hi = -a, a
        if method == "minmax" or lo == hi or self.count == self.zeros:
            return float(lo), float(hi)
        if method == "percentile":
            return self._percentile_range(float(params.get("percentile", 99.99)), symmetric)
        levels = qmax - qmin + 1
        if method == "entropy":
            parts = self._cdf_parts(zeros=False)
            if symmetric:
                objective = lambda los, his: self._kl_many(los, his, (levels + 1) // 2, parts, folded=True)
            else:
                objective = lambda los, his: self._kl_many(los, his, levels, parts, folded=False)
        else:
            objective = lambda los, his: self._mse_many(los, his, qmin, qmax, symmetric)
        return self._search(objective, lo, hi, symmetric)

    def _percentile_range(self, percentile: float, symmetric: bool) -> tuple[float, float]:
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        q = percentile / 100.0
        if symmetric:
            a = self.abs_quantile(q)
            return -a, a
        if self.min >= 0:
            return 0.0, max(self.quantile(q), 0.0)
        if self.max <= 0:
            return min(self.quantile(1.0 - q), 0.0), 0.0
        cut = (1.0 - q) / 2.0
        return min(self.quantile(cut), 0.0), max(self.quantile(1.0 - cut), 0.0)

    def _search(self, objective, lo: float, hi: float, symmetric: bool) -> tuple[float, float]:
        """Minimise objective(los, his) over clipping ranges: grid then refinement, per end."""
        if symmetric:
            floor = self.abs_quantile(0.5, zeros=False)
            a = _line_search(lambda t: objective(-t, t), floor, hi)
            return -a, a
        # Two-signed data: the upper end with the lower one at the minimum, then the lower end, then the upper
        # end again (a further round changes the error by less than 1e-4 on skewed heavy-tailed data).
        ends = ("hi", "lo", "hi") if lo < 0 < hi else ("hi",) if hi > 0 else ("lo",)
        hi_floor = self._side_median(positive=True) if hi > 0 else 0.0
        lo_floor = self._side_median(positive=False) if lo < 0 else 0.0
        for end in ends:
            if end == "hi":
                hi = _line_search(lambda t: objective(np.full(t.shape, lo), t), hi_floor, self.max)
            else:
                lo = -_line_search(lambda t: objective(-t, np.full(t.shape, hi)), lo_floor, -self.min)
        return lo, hi

    def _side_median(self, positive: bool) -> float:
        """Median magnitude of the strictly positive (or strictly negative) values."""
        parts = self._cdf_parts(zeros=True)
        below_zero = float(self._cdf(0.0, parts, left=True))
        if positive:
            above = self.count - float(self._cdf(0.0, parts))
            return self.quantile((self.count - above / 2.0) / self.count)
        return -self.quantile(below_zero / 2.0 / self.count)

    def _kl_many(self, los, his, levels: int, parts, folded: bool) -> np.ndarray:
        """TensorRT-style KL divergence between the clipped distribution and its quantized version."""
        total = self.count - self.zeros
        out = np.empty(los.shape)
        r = _FINE_PER_LEVEL
        steps = np.linspace(0.0, 1.0, levels * r + 1)
        for i, (lo, hi) in enumerate(zip(los, his)):
            if folded:
                t = hi * steps
                cum = self._cdf(t, parts) - self._cdf(-t, parts, left=True)  # P(|X| <= t), zeros left out
            else:
                t = lo + (hi - lo) * steps
                cum = self._cdf(t, parts)
            sliced = np.diff(cum)  # mass in (t[i], t[i + 1]]
            under = 0.0 if folded else float(self._cdf(lo, parts, left=True))
            sliced[0] += cum[0] - under  # mass at t[0] itself
            over = total - cum[-1]
            ref = sliced.copy()
            ref[0] += under
            ref[-1] += over
            nonzero = ref > 0
            groups = sliced.reshape(levels, r).sum(1)
            n_nonzero = nonzero.reshape(levels, r).sum(1)
            quant = np.where(nonzero, np.repeat(groups / np.maximum(n_nonzero, 1), r), 0.0)
            out[i] = _kl(ref, quant)
        return out

    # ------------------------------------------------------------------------------------- choice
    def best_range(self, *, qmin: int = 0, qmax: int = 255, symmetric: bool = False,
                   methods: Iterable[str] = METHODS) -> RangeChoice:
        """Evaluate every method and keep the range with the lowest `quant_mse` (ties: the earlier method)."""
        candidates = {}
        for method in methods:
            lo, hi = self.range(method, qmin=qmin, qmax=qmax, symmetric=symmetric)
            candidates[method] = (lo, hi, self.quant_mse(lo, hi, qmin=qmin, qmax=qmax, symmetric=symmetric))
        if not candidates:
            raise ValueError("best_range needs at least one method")
        method = min(candidates, key=lambda m: candidates[m][2])  # min keeps the first of equals
        lo, hi, mse = candidates[method]
        scale, zp = scale_zero_point(lo, hi, qmin, qmax, symmetric)
        return RangeChoice(lo, hi, method, mse, scale, zp, candidates)


def _g(f):
    """Integral of (y - round(y))^2 for y from 0 to f, f in [0, 1): f^3/3 up to 1/2, then 1/12 - (1 - f)^3/3."""
    h = np.minimum(f, 1.0 - f)
    return 1.0 / 24.0 + np.copysign(1.0 / 24.0 - h ** 3 / 3.0, f - 0.5)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    ps, qs = p.sum(), q.sum()
    if ps <= 0 or qs <= 0:
        return math.inf
    p, q = p / ps, q / qs
    mask = p > 0
    if np.any(q[mask] <= 0):
        return math.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _line_search(objective: Callable[[np.ndarray], np.ndarray], floor: float, top: float) -> float:
    """argmin over t in [floor, top] of objective(t): a geometric grid, then a linear grid around the best."""
    if not 0.0 < floor < top:
        return top
    grid = np.geomspace(floor, top, _GRID)
    grid[-1] = top
    errors = objective(grid)
    if not np.isfinite(errors).any():
        return top
    i = int(np.argmin(errors))
    left, right = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    fine = np.linspace(left, right, _REFINE + 2)[1:-1]
    fine_err = objective(fine)
    j = int(np.argmin(fine_err))
    return float(fine[j]) if fine_err[j] < errors[i] else float(grid[i])


# --------------------------------------------------------------------------------------------- collection
class StatsMap(dict):
    """{tensor name: TensorStats}, plus the tensors that were skipped and why, and how many samples ran."""

    def __init__(self, *args, skipped: dict[str, str] | None = None, samples: int = 0, **kw):
        super().__init__(*args, **kw)
        self.skipped: dict[str, str] = dict(skipped or {})
        self.samples = samples


def collect_stats(model, tensors: Iterable[str], samples, *, settings: RuntimeSettings | None = None,
                  per_octave: int = 32, octaves: int = 31,
                  progress: Callable[[str], None] | None = None) -> StatsMap:
    """Statistics of the named tensors over every sample, holding one sample's activations at a time.

    `samples` is any iterable of feeds ({input name: array}), or an object with onnxruntime's
    CalibrationDataReader protocol (`get_next()` until None). One copy of the model is made with the requested
    intermediate tensors as extra graph outputs and run in one session. Graph inputs are read from the feed and
    constant initializers from their value. Tensors that are not float (float16/32/64), whose type cannot be
    determined, or that do not exist in the top-level graph are skipped; `result.skipped` says why.
    """
    model = model if isinstance(model, Model) else Model.from_proto(model)
    graph = model.graph
    wanted = list(dict.fromkeys(tensors))
    infos = tensor_infos(model.proto)
    produced = {o for n in graph.node for o in n.output if o}
    inputs = {i.name for i in graph.input}
    inits = model.initializers()

    result = StatsMap()
    fetch, from_feed = [], []
    for name in wanted:
        info = infos.get(name)
        known = name in produced or name in inputs or name in inits
        if not known:
            result.skipped[name] = "no such tensor in the top-level graph"
        elif info is None or info.dtype is None:
            result.skipped[name] = "element type unknown (no value_info, and shape inference could not tell)"
        elif info.dtype not in _FLOAT_DTYPES:
            result.skipped[name] = f"not a float16/float32/float64 tensor ({info.dtype})"
        else:
            result[name] = TensorStats(name, per_octave=per_octave, octaves=octaves)
            if name in inits:
                result[name].update(numpy_helper.to_array(inits[name]))
            elif name in inputs:
                from_feed.append(name)
            else:
                fetch.append(name)

    if not (fetch or from_feed):  # nothing to run: the source is left unread
        return result
    n = 0
    for n, (feed, values) in enumerate(stream_tensors(model, fetch, samples, settings=settings), start=1):
        for name in from_feed:
            if name not in feed:
                raise InputError(f"sample {n}: feeds {sorted(feed)}, no value for input {name!r}")
            result[name].update(feed[name])
        for name, value in values.items():
            result[name].update(value)
        del values, feed  # hold no sample while waiting for the next one
        if progress is not None and n % 16 == 0:
            progress(f"calibrating: {n} samples")
    if n == 0:
        raise InputError("no calibration samples: the sample source was empty")
    if progress is not None and n % 16:
        progress(f"calibrating: {n} samples")
    result.samples = n
    return result


def with_outputs(model: Model, names: list[str]) -> Model:
    """A copy of the model with the named intermediate tensors as extra graph outputs (their dtype from shape
    inference, float32 where it cannot tell)."""
    infos = tensor_infos(model.proto)
    outputs = {o.name for o in model.graph.output}
    augmented = model.copy()
    for name in names:
        if name not in outputs:
            dtype = infos[name].dtype if name in infos and infos[name].dtype else "float32"
            elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            augmented.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    return augmented


def stream_tensors(model: Model, names: list[str], samples, *, settings: RuntimeSettings | None = None):
    """Yield (feed, {name: value}) for every sample, running one copy of the model with the named intermediate
    tensors as extra outputs; nothing is kept between samples. `samples` is an iterable of feeds or a
    CalibrationDataReader."""
    session = make_session(with_outputs(model, names), settings) if names else None
    stream = iter(samples.get_next, None) if hasattr(samples, "get_next") else iter(samples)
    for n, feed in enumerate(stream, start=1):
        if session is None:
            yield feed, {}
            continue
        try:
            values = session.run(names, dict(feed))
        except Exception as exc:  # ORT raises its own types: say which sample and why, in one line
            shapes = {k: tuple(np.shape(v)) for k, v in feed.items()}
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"sample {n}: onnxruntime could not run the model on inputs {shapes}: "
                             f"{first}") from None
        yield feed, dict(zip(names, values))


__all__ = ["TensorStats", "stream_tensors", "with_outputs", "RangeChoice", "StatsMap", "collect_stats", "scale_zero_point", "METHODS"]
