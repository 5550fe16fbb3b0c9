"""The mathematics of merging a span of convs into one: composition, residual folding, exactness, refit.

A `ConvMap` is an affine, shift-equivariant map y[o, i] = sum_c,u W[o, c, u] x[c, i*s + u - pad] + b[o]. Two of
them compose into one (the full convolution of their kernels, the bias pushed through the second's spatial sum),
two with the same stride add (a residual join), and a 1x1 identity is the identity shortcut, so the centre tap
gets +1 when it is folded. Depthwise kernels are expanded to dense diagonal ones and come back as depthwise when
the result is still diagonal.

Composition is exact in the interior always, and at the border too when no conv after the first pads a tensor
that is not zero where the merged conv's padding is (k x k -> 1x1 always is): the original pads the intermediate
tensor with zeros, the merged conv pads the input, so a bias, or the first conv's response to the border, no
longer sees zeros. `border_exact` says which case a span is in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core.conv import patches
from .spans import Chain, Conv


@dataclass
class ConvMap:
    weight: np.ndarray  # [Cout, Cin, kh, kw] dense, float64
    bias: np.ndarray  # [Cout]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right

    @classmethod
    def of(cls, conv: Conv) -> "ConvMap":
        w = conv.weight.astype(np.float64)
        if conv.group > 1:  # depthwise: dense diagonal kernel
            dense = np.zeros((conv.cout, conv.cin) + w.shape[2:])
            dense[np.arange(conv.cout), np.arange(conv.cin)] = w[:, 0]
            w = dense
        b = conv.bias.astype(np.float64) if conv.bias is not None else np.zeros(conv.cout)
        return cls(w, b, tuple(conv.strides), tuple(conv.pads))

    @classmethod
    def identity(cls, channels: int) -> "ConvMap":
        return cls(np.eye(channels)[:, :, None, None], np.zeros(channels), (1, 1), (0, 0, 0, 0))

    @property
    def kernel(self) -> tuple[int, int]:
        return self.weight.shape[2], self.weight.shape[3]

    def then(self, second: "ConvMap") -> "ConvMap":
        """This map followed by `second` (which reads this map's output)."""
        a, b = self, second
        (sh, sw), (kh, kw) = a.strides, a.kernel
        bh, bw = b.kernel
        out = np.zeros((b.weight.shape[0], a.weight.shape[1], kh + sh * (bh - 1), kw + sw * (bw - 1)))
        for p in range(bh):
            for q in range(bw):
                out[:, :, sh * p:sh * p + kh, sw * q:sw * q + kw] += np.einsum("om,mcyx->ocyx", b.weight[:, :, p, q],
                                                                               a.weight)
        bias = b.weight.sum(axis=(2, 3)) @ a.bias + b.bias
        strides = (sh * b.strides[0], sw * b.strides[1])
        pads = (a.pads[0] + sh * b.pads[0], a.pads[1] + sw * b.pads[1],
                a.pads[2] + sh * b.pads[2], a.pads[3] + sw * b.pads[3])
        return ConvMap(out, bias, strides, pads)

    def plus(self, other: "ConvMap") -> "ConvMap":
        """The sum of two maps of the same input and stride (a residual Add): kernels aligned on the input grid."""
        if self.strides != other.strides or self.weight.shape[:2] != other.weight.shape[:2]:
            raise ValueError("a residual join of maps with different strides or channels")
        size, begin, end = [], [], []
        for axis in (0, 1):
            lo = min(-self.pads[axis], -other.pads[axis])
            hi = max(self.kernel[axis] - 1 - self.pads[axis], other.kernel[axis] - 1 - other.pads[axis])
            size.append(hi - lo + 1)
            begin.append(-lo)
            end.append(max(m.pads[axis + 2] + (hi - lo + 1 - m.kernel[axis]) - (-lo - m.pads[axis])
                           for m in (self, other)))
        w = np.zeros(self.weight.shape[:2] + tuple(size))
        for m in (self, other):
            y, x = begin[0] - m.pads[0], begin[1] - m.pads[1]
            w[:, :, y:y + m.kernel[0], x:x + m.kernel[1]] += m.weight
        return ConvMap(w, self.bias + other.bias, self.strides, (begin[0], begin[1], end[0], end[1]))

    @property
    def diagonal(self) -> bool:
        if self.weight.shape[0] != self.weight.shape[1]:
            return False
        off = self.weight.copy()
        idx = np.arange(self.weight.shape[0])
        off[idx, idx] = 0
        return not off.any()

    def onnx_weight(self, depthwise: bool) -> np.ndarray:
        if depthwise:
            idx = np.arange(self.weight.shape[0])
            return self.weight[idx, idx][:, None].astype(np.float32)
        return self.weight.astype(np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Reference evaluation in numpy (dense): x [N, C, H, W] -> [N, Cout, H', W'] (tests use ORT instead)."""
        n, _, h, w = x.shape
        cols = patches(x.astype(np.float64), self.kernel, self.strides, self.pads, (1, 1))
        y = cols @ self.weight.reshape(self.weight.shape[0], -1).T + self.bias
        ho = (h + self.pads[0] + self.pads[2] - self.kernel[0]) // self.strides[0] + 1
        wo = (w + self.pads[1] + self.pads[3] - self.kernel[1]) // self.strides[1] + 1
        return y.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)


@dataclass(frozen=True)
class MergePlan:
    """How a span is merged: the convs kept (the others become identity), and what the result is."""

    kept: tuple[int, ...]  # chain positions whose conv counts towards K (LayerMerge's kept convs); the others go
    kernel: tuple[int, int]
    depthwise: bool
    folds_skip: bool  # a residual shortcut is folded into the kernel
    exact: bool  # no activation removed and the composition is exact at the border too

    @property
    def label(self) -> str:
        k = f"{self.kernel[0]}x{self.kernel[1]}" + (" dw" if self.depthwise else "")
        return f"merge {k}" + (" exact" if self.exact else "")


def compose_span(chain: Chain, st: int, end: int) -> ConvMap:
    """The linear map from position st to the pre-activation output of position end with every activation in
    between removed and the shortcuts inside the span folded in. A skip from outside the span (its Add at `end`) is
    not part of the map: the merged conv keeps that Add after it."""
    return _compose(chain, st, end)[0]


def border_exact(chain: Chain, st: int, end: int) -> bool:
    """Whether the composition is exact at the border too: every padded conv reads a tensor whose padding ring the
    merged conv reproduces, i.e. everything before it in the span maps zeros to zeros pixel by pixel (a 1x1 map
    with no padding and no bias). So k x k -> 1x1 is exact, 3x3 p1 -> 3x3 p1 and 1x1 (with a bias) -> 3x3 p1 are
    exact only in the interior."""
    return _compose(chain, st, end)[1]


def _compose(chain: Chain, st: int, end: int) -> tuple[ConvMap, bool]:
    maps: dict[int, ConvMap] = {st: ConvMap.identity(chain.units[st].conv.cin)}
    exact = True
    for t in range(st + 1, end + 1):
        u = chain.units[t - 1]
        before = maps[t - 1]
        if any(u.conv.pads) and (before.kernel != (1, 1) or any(before.pads) or before.bias.any()):
            exact = False
        m = before.then(ConvMap.of(u.conv))
        if u.skip_from is not None and u.skip_from >= st:
            shortcut = maps[u.skip_from]
            if u.projection is not None:
                if any(u.projection.pads) and (shortcut.kernel != (1, 1) or any(shortcut.pads)
                                               or shortcut.bias.any()):
                    exact = False
                shortcut = shortcut.then(ConvMap.of(u.projection))
            m = m.plus(shortcut)
        maps[t] = m
    return maps[end], exact


def centre(m: ConvMap, kernel: tuple[int, int]) -> ConvMap | None:
    """The central `kernel` window of a map (the start of a refit to a smaller merged kernel); None when the
    smaller kernel would need negative padding to keep the output size."""
    ch, cw = (m.kernel[0] - kernel[0]) // 2, (m.kernel[1] - kernel[1]) // 2
    extra_h, extra_w = m.kernel[0] - kernel[0] - ch, m.kernel[1] - kernel[1] - cw
    pads = (m.pads[0] - ch, m.pads[1] - cw, m.pads[2] - extra_h, m.pads[3] - extra_w)
    if min(pads) < 0:
        return None
    w = m.weight[:, :, ch:ch + kernel[0], cw:cw + kernel[1]]
    return ConvMap(np.ascontiguousarray(w), m.bias.copy(), m.strides, pads)


def plans_for(chain: Chain, st: int, end: int, max_kernel: int) -> list[MergePlan]:
    """Candidate merged convs for a span. Several units: LayerMerge's set, for each conv type (kernel, depthwise)
    how many of its convs stay (at least the irreducible ones: Cin != Cout or strided; the concrete convs are those
    with the largest L1 norm), one plan per distinct merged kernel K = 1 + sum(k - 1) over the kept convs. One
    unit: its conv as it is, and for a k x k conv also a 1x1 refit (removing the conv, as LayerMerge removes a
    reducible one, but fitted so that it also works when channels change)."""
    positions = list(range(st + 1, end + 1))
    units = [chain.units[t - 1] for t in positions]
    folds = any(u.skip_from is not None and u.skip_from >= st for u in units)
    depthwise = all(u.conv.depthwise for u in units) and not any(u.projection is not None for u in units)
    no_act_removed = all(u.act is None for u in units[:-1])
    full = (1 + sum(u.conv.kernel[0] - 1 for u in units), 1 + sum(u.conv.kernel[1] - 1 for u in units))
    if len(units) == 1:
        plans = [MergePlan(tuple(positions), full, depthwise, False, True)]
        if full != (1, 1):
            plans.append(MergePlan((), (1, 1), depthwise, False, False))
        return plans
    types: dict[tuple, list[int]] = {}
    for t, u in zip(positions, units):
        types.setdefault((u.conv.kernel, u.conv.depthwise), []).append(t)
    choices = []
    for members in types.values():
        fixed = [t for t in members if not chain.units[t - 1].conv.reducible]
        free = sorted((t for t in members if t not in fixed),
                      key=lambda t: -float(np.abs(chain.units[t - 1].conv.weight).sum()))
        choices.append([tuple(sorted(fixed + free[:n])) for n in range(len(free) + 1)])
    plans: dict[tuple, MergePlan] = {}
    for combo in _product(choices):
        kept = tuple(sorted(t for part in combo for t in part))
        convs = [chain.units[t - 1].conv for t in kept]
        k = (1 + sum(c.kernel[0] - 1 for c in convs), 1 + sum(c.kernel[1] - 1 for c in convs))
        if max(k) > max_kernel:
            continue
        exact = no_act_removed and k == full and border_exact(chain, st, end)
        best = plans.get(k)
        if best is None or len(kept) > len(best.kept):
            plans[k] = MergePlan(kept, k, depthwise, folds, exact)
    return sorted(plans.values(), key=lambda p: p.kernel)


def _product(lists):
    out = [()]
    for options in lists:
        out = [prev + (o,) for prev in out for o in options]
    return out


# ------------------------------------------------------------------------------------------------------ refit
def refit(start: ConvMap, depthwise: bool, xs: list[np.ndarray], ys: list[np.ndarray], *, rows: int = 16384,
          ridge: float = 1e-3, max_columns: int = 4608, seed: int = 0) -> tuple[ConvMap, bool]:
    """Ridge least squares of the merged conv to the original span's output (`ys`, pre-activation) from its input
    (`xs`), pulled towards the composition `start`. Returns the fitted map and whether the fit ran (it is skipped
    when the dense system would have more than `max_columns` unknowns per output channel)."""
    rng = np.random.default_rng(seed)
    k, s, p = start.kernel, start.strides, start.pads
    cout, cin = start.weight.shape[:2]
    per = max(16, rows // max(len(xs), 1))
    if depthwise:
        return _refit_depthwise(start, xs, ys, per, ridge, rng), True
    d = cin * k[0] * k[1]
    if d > max_columns:
        return start, False
    ata = np.zeros((d + 1, d + 1))
    aty = np.zeros((d + 1, cout))
    for x, y in zip(xs, ys):
        a = patches(x.astype(np.float64), k, s, p, (1, 1))
        t = y.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, cout)
        if a.shape[0] > per:
            idx = rng.choice(a.shape[0], per, replace=False)
            a, t = a[idx], t[idx]
        a = np.hstack([a, np.ones((a.shape[0], 1))])
        ata += a.T @ a
        aty += a.T @ t
    w0 = np.vstack([start.weight.reshape(cout, -1).T, start.bias[None]])
    theta = _ridge_solve(ata, aty, w0, ridge)
    if theta is None:
        return start, False
    return ConvMap(theta[:d].T.reshape(start.weight.shape), theta[d], s, p), True


def _refit_depthwise(start: ConvMap, xs, ys, per, ridge, rng) -> ConvMap:
    k, s, p = start.kernel, start.strides, start.pads
    c = start.weight.shape[0]
    kk = k[0] * k[1]
    ata = np.zeros((c, kk + 1, kk + 1))
    aty = np.zeros((c, kk + 1))
    for x, y in zip(xs, ys):
        a = patches(x.astype(np.float64), k, s, p, (1, 1)).reshape(-1, c, kk)
        t = y.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, c)
        if a.shape[0] > per:
            idx = rng.choice(a.shape[0], per, replace=False)
            a, t = a[idx], t[idx]
        a = np.concatenate([a, np.ones(a.shape[:2] + (1,))], axis=2)
        ata += np.einsum("ncx,ncy->cxy", a, a)
        aty += np.einsum("ncx,nc->cx", a, t)
    idx = np.arange(c)
    w0 = np.concatenate([start.weight[idx, idx].reshape(c, kk), start.bias[:, None]], axis=1)
    w = start.weight.copy()
    b = start.bias.copy()
    for ch in range(c):
        theta = _ridge_solve(ata[ch], aty[ch][:, None], w0[ch][:, None], ridge)
        if theta is not None:
            w[ch, ch] = theta[:kk, 0].reshape(k)
            b[ch] = theta[kk, 0]
    return ConvMap(w, b, s, p)


def _ridge_solve(ata, aty, w0, ridge):
    d = ata.shape[0] - 1
    lam = ridge * float(np.trace(ata[:d, :d])) / max(d, 1) + 1e-12
    reg = np.zeros_like(ata)
    reg[np.arange(d), np.arange(d)] = lam  # the intercept is not pulled
    try:
        return np.linalg.solve(ata + reg, aty + reg @ w0)
    except np.linalg.LinAlgError:
        return None


__all__ = ["ConvMap", "MergePlan", "border_exact", "centre", "compose_span", "plans_for", "refit"]
