"""Low-rank factorization math: W ≈ A·B for every rank at once, plain or activation-aware.

Every weight is handled in one orientation, `y = x @ W` with W [n_in, n_out] (MatMul's; Gemm with transB, the
weight-first MatMul and Conv are brought to it by the caller, a Conv through its im2col patches). A rank-r
factorization is A [n_in, r] @ B [r, n_out].

- Plain truncated SVD: W = U S Vᵀ, A = U_r √S_r, B = √S_r V_rᵀ (√S split into both factors so neither carries
  the whole dynamic range, which keeps float32 products well conditioned).
- Whitened ("activation-aware", SVD-LLM style): with C = XᵀX the Gram matrix of the calibration inputs,
  ‖X W − X A B‖_F = ‖Lᵀ (W − A B)‖_F for C = L Lᵀ, so the best rank-r factorization in the data's metric is the
  truncated SVD of Lᵀ W mapped back by L⁻ᵀ: A = L⁻ᵀ U_r √S_r, B = √S_r V_rᵀ. C gets a small damping
  (`damping` × mean diagonal) so that directions the calibration data never excited are not amplified.
- Refit: B re-solved by least squares against the undamped C for the chosen A, B = (AᵀCA)⁻¹ AᵀCW (makes plain
  SVD data-aware; removes the damping's bias from the whitened one).

`Spectrum` keeps one decomposition and answers, for any rank, the factors, the energy kept and the relative
output error on the calibration inputs, ‖X(W − AB)‖² / ‖XW‖², in closed form (no per-rank matrix products).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

METHODS = ("svd", "whitened")


@contextlib.contextmanager
def single_threaded_blas():
    """Run the BLAS/LAPACK calls inside on one thread (through threadpoolctl, when installed). OpenBLAS's threads
    spin while waiting for each other: on a busy 2-core machine a 384×384 Cholesky took 0.7 s with its default
    threads against 4 ms on one."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def breakeven_rank(n_in: int, n_out: int) -> float:
    """Rank at which r·(n_in + n_out) equals n_in·n_out: a factorization pays (in MACs and parameters) only below it."""
    return n_in * n_out / (n_in + n_out)


def max_useful_rank(n_in: int, n_out: int) -> int:
    """The largest rank strictly below the break-even rank (0 when no rank pays)."""
    return max(0, math.ceil(breakeven_rank(n_in, n_out)) - 1)


def factored_params(n_in: int, n_out: int, rank: int) -> int:
    return rank * (n_in + n_out)


@dataclass
class Spectrum:
    """One weight's decomposition: `basis` Φ [n_in, k], `s` [k] descending, `right` V [k, n_out], with
    W = Φ diag(s) V exactly (up to float64 rounding) for k = min(n_in, n_out)."""

    weight: np.ndarray  # float64 [n_in, n_out]
    basis: np.ndarray
    s: np.ndarray
    right: np.ndarray
    cov: np.ndarray | None  # undamped XᵀX, None: the identity (error measured in weight space)
    refit: bool = False
    method: str = "svd"

    @property
    def full_rank(self) -> int:
        return len(self.s)

    def energy(self, rank: int) -> float:
        """Fraction of Σ s² kept (in the whitened space for the whitened method)."""
        sq = self.s**2
        total = float(sq.sum())
        return float(sq[:rank].sum() / total) if total > 0 else 1.0

    def rank_for_energy(self, energy: float) -> int:
        """The smallest rank keeping at least `energy` of Σ s²."""
        sq = self.s**2
        total = float(sq.sum())
        if total <= 0:
            return 1
        kept = np.cumsum(sq) / total
        return int(min(len(sq), np.searchsorted(kept, energy - 1e-12) + 1))

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(A [n_in, r], B [r, n_out]) in float32."""
        rank = self._check(rank)
        root = np.sqrt(self.s[:rank])
        a = (self.basis[:, :rank] * root).astype(np.float32)
        if self.refit:  # solved for the float32 A actually stored, so B also absorbs A's rounding
            b = _least_squares(a.astype(np.float64), self._root(), self.weight)
        else:
            b = root[:, None] * self.right[:rank]
        return a, b.astype(np.float32)

    def errors(self, ranks) -> dict[int, float]:
        """Relative output error ‖X(W − A_r B_r)‖² / ‖XW‖² on the calibration inputs, for each rank."""
        c = self._c()
        total = float(np.einsum("ij,ij->", self.weight, c @ self.weight))
        if total <= 0:
            return {int(r): 0.0 for r in ranks}
        out = {}
        if self.refit:  # B optimal for span(A_r) = span(Φ_r): error = total − ‖projection‖²
            cphi = c @ self.basis
            p = self.basis.T @ cphi
            q = cphi.T @ self.weight
            for r in ranks:
                r = self._check(r)
                sol = np.linalg.lstsq(p[:r, :r], q[:r], rcond=None)[0]
                out[int(r)] = max(0.0, (total - float(np.einsum("ij,ij->", q[:r], sol))) / total)
        else:  # W − A_r B_r = Σ_{i>r} φ_i s_i v_iᵀ with orthonormal v_i
            g = np.einsum("ij,ij->j", self.basis, c @ self.basis)
            tail = (self.s**2 * g)[::-1].cumsum()[::-1]
            for r in ranks:
                r = self._check(r)
                out[int(r)] = max(0.0, float(tail[r]) / total) if r < len(tail) else 0.0
        return out

    def _root(self) -> np.ndarray:
        """R with RᵀR = C (from its eigendecomposition; no damping): least squares on R·A, better conditioned than
        the normal equations AᵀCA."""
        if getattr(self, "_r", None) is None:
            vals, vecs = np.linalg.eigh(self._c())
            self._r = np.sqrt(np.clip(vals, 0, None))[:, None] * vecs.T
        return self._r

    def _c(self) -> np.ndarray:
        return self.cov if self.cov is not None else np.eye(self.weight.shape[0])

    def _check(self, rank: int) -> int:
        if not 1 <= int(rank) <= self.full_rank:
            raise ValueError(f"rank must be between 1 and {self.full_rank}, got {rank}")
        return int(rank)


def decompose(weight: np.ndarray, method: str = "svd", cov: np.ndarray | None = None, *, damping: float = 0.01,
              refit: bool = False, rows: int | None = None) -> Spectrum:
    """Decompose W [n_in, n_out]; `cov` is XᵀX of the layer's inputs (needed by "whitened" and by `refit`).

    `rows`, the number of input rows behind `cov`, shrinks it toward a scaled identity by n_in / (n_in + rows):
    a Gram matrix of fewer rows than inputs is singular, and whitening by it would fit those rows exactly and
    report no error while doing badly on any other input (a 3136-input Gemm calibrated on 16 images). The
    shrunk matrix is used for the whitening, the refit and the error estimates alike."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    w = np.asarray(weight, np.float64)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    if cov is not None:
        cov = np.asarray(cov, np.float64)
        if cov.shape != (w.shape[0], w.shape[0]):
            raise ValueError(f"covariance shape {cov.shape} does not match the weight's {w.shape[0]} inputs")
    if (method == "whitened" or refit) and cov is None:
        raise ValueError(f"method {method!r}{' with refit' if refit else ''} needs the input covariance")
    if cov is not None and rows is not None:
        n = cov.shape[0]
        alpha = n / (n + max(int(rows), 0))
        cov = (1 - alpha) * cov + alpha * (float(np.trace(cov)) / n) * np.eye(n)
    if method == "svd":
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        return Spectrum(w, u, s, vt, cov, refit, method)
    lower = _cholesky(cov, damping)
    u, s, vt = np.linalg.svd(lower.T @ w, full_matrices=False)
    from scipy.linalg import solve_triangular

    basis = solve_triangular(lower.T, u, lower=False)  # L⁻ᵀ U
    return Spectrum(w, basis, s, vt, cov, refit, method)


def _cholesky(cov: np.ndarray, damping: float) -> np.ndarray:
    """Lower L with L Lᵀ = C + λI, λ = damping × mean diagonal, raised tenfold until C + λI is positive definite."""
    n = cov.shape[0]
    scale = float(np.trace(cov)) / n if n else 0.0
    scale = scale if scale > 0 else 1.0
    lam = damping * scale
    for _ in range(12):
        try:
            return np.linalg.cholesky(cov + lam * np.eye(n))
        except np.linalg.LinAlgError:
            lam = max(lam * 10, 1e-10 * scale)
    raise ValueError("the input covariance is not positive definite even after damping (NaN in the activations?)")


def _least_squares(a: np.ndarray, root: np.ndarray, w: np.ndarray) -> np.ndarray:
    """argmin_B ‖X(W − A B)‖ = argmin_B ‖R(W − A B)‖ for RᵀR = XᵀX (minimum-norm where the data leave B free)."""
    return np.linalg.lstsq(root @ a, root @ w, rcond=None)[0]


# ------------------------------------------------------------------------------------------------ convolution
def conv_matrix(weight: np.ndarray) -> np.ndarray:
    """Conv weight [C_out, C_in, kh, kw] -> the im2col matrix [C_in·kh·kw, C_out] (patch order C_in, kh, kw)."""
    return weight.reshape(weight.shape[0], -1).T


def conv_factors(a: np.ndarray, b: np.ndarray, weight_shape) -> tuple[np.ndarray, np.ndarray]:
    """(A [C_in·kh·kw, r], B [r, C_out]) -> (k×k conv weight [r, C_in, kh, kw], 1×1 conv weight [C_out, r, 1, 1])."""
    c_out, c_in, kh, kw = weight_shape
    r = a.shape[1]
    first = np.ascontiguousarray(a.T.reshape(r, c_in, kh, kw))
    second = np.ascontiguousarray(b.T.reshape(c_out, r, 1, 1))
    return first, second


__all__ = ["METHODS", "single_threaded_blas", "Spectrum", "decompose", "breakeven_rank", "max_useful_rank", "factored_params",
           "conv_matrix", "conv_factors"]
