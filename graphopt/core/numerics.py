"""Compare the outputs of two models on the same inputs, and decide whether the difference is acceptable."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .errors import UsageError


@dataclass(frozen=True)
class OutputMetrics:
    """How far one output of the candidate is from the reference, over all compared samples."""

    name: str
    max_abs: float
    mean_abs: float
    rel_l2: float  # ||new - ref|| / ||ref||
    cosine: float  # mean over samples of the cosine similarity of the flattened outputs
    top1_agreement: float | None  # fraction of rows whose argmax agrees, for outputs that look like class scores
    nonfinite_ref: int  # NaN/Inf count in the reference
    nonfinite_new: int  # NaN/Inf count in the candidate
    samples: int

    def to_dict(self) -> dict:
        return asdict(self)


OUTPUT_KINDS = ("scores", "other")
_SCORE_NAMES = ("logit", "score", "prob", "class", "label", "pred")
_OTHER_NAMES = ("embed", "feature", "hidden", "pool", "latent", "eps", "noise")
_SCORE_PRODUCERS = {"Gemm", "Softmax", "LogSoftmax"}


def class_score_outputs(model, kinds: dict[str, str] | None = None) -> frozenset[str]:
    """The outputs that are class scores, for which top-1 agreement and a softmax KL mean something: those the
    user names (`kinds`: output -> "scores" | "other"), else 2-D float outputs with at least two columns whose
    name says so (logits, scores, probs, ...) or that come straight from a classifier head (Gemm, Softmax,
    LogSoftmax) and are not named like an embedding. A [batch, 384] sentence embedding is not class scores."""
    from onnx import TensorProto

    kinds = dict(kinds or {})
    graph = model.graph
    unknown = set(kinds) - {o.name for o in graph.output}
    if unknown:
        raise UsageError(f"--output-kind names {sorted(unknown)}, which are not model outputs "
                         f"({', '.join(o.name for o in graph.output)})")
    for name, kind in kinds.items():
        if kind not in OUTPUT_KINDS:
            raise UsageError(f"--output-kind {name}={kind}: the kind must be one of {', '.join(OUTPUT_KINDS)}")
    producer = {out: n.op_type for n in graph.node for out in n.output}
    scores = set()
    for o in graph.output:
        if o.name in kinds:
            if kinds[o.name] == "scores":
                scores.add(o.name)
            continue
        tt = o.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        floating = tt.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
        if not (floating and len(dims) == 2 and (dims[1] is None or dims[1] >= 2)):
            continue
        lower = o.name.lower()
        if any(h in lower for h in _OTHER_NAMES):
            continue
        if any(h in lower for h in _SCORE_NAMES) or producer.get(o.name) in _SCORE_PRODUCERS:
            scores.add(o.name)
    return frozenset(scores)


def compare_outputs(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]],
                    scores: frozenset[str] | set[str] = frozenset(), suffix: str = "") -> list[OutputMetrics]:
    """Per-output error statistics between two runs over the same list of feeds; top-1 agreement for the
    outputs named in `scores` (see class_score_outputs). `suffix` is appended to the reported names."""
    if len(reference) != len(candidate):
        raise ValueError("reference and candidate ran on different numbers of samples")
    if not reference:
        return []
    names = list(reference[0])
    missing = [n for n in names if n not in candidate[0]]
    if missing:
        raise ValueError(f"candidate model lacks outputs {missing}")
    return [_compare_one(name, [r[name] for r in reference], [c[name] for c in candidate], name in scores, suffix)
            for name in names]


def _compare_one(name: str, refs: list[np.ndarray], news: list[np.ndarray], scores: bool, suffix: str
                 ) -> OutputMetrics:
    max_abs = 0.0
    abs_sum = 0.0
    count = 0
    diff_sq = 0.0
    ref_sq = 0.0
    cosines = []
    agree = total_rows = 0
    bad_ref = bad_new = 0
    for ref, new in zip(refs, news):
        if ref.shape != new.shape:
            raise ValueError(f"output {name!r}: shape {new.shape} differs from the reference's {ref.shape}")
        if not (np.issubdtype(ref.dtype, np.number) or ref.dtype == np.bool_):
            raise ValueError(f"output {name!r}: cannot compare dtype {ref.dtype}")
        r = ref.astype(np.float64).ravel()
        n = new.astype(np.float64).ravel()
        bad_ref += int(np.count_nonzero(~np.isfinite(r)))
        bad_new += int(np.count_nonzero(~np.isfinite(n)))
        ok = np.isfinite(r) & np.isfinite(n)
        d = np.abs(r[ok] - n[ok])
        if d.size:
            max_abs = max(max_abs, float(d.max()))
            abs_sum += float(d.sum())
        count += d.size
        diff_sq += float((d**2).sum())
        ref_sq += float((r[ok] ** 2).sum())
        nr, nn = np.linalg.norm(r[ok]), np.linalg.norm(n[ok])
        if nr > 0 and nn > 0:
            cosines.append(float(r[ok] @ n[ok] / (nr * nn)))
        elif nr == 0 and nn == 0:
            cosines.append(1.0)
        else:
            cosines.append(0.0)
        if scores and ref.ndim == 2:
            agree += int(np.count_nonzero(ref.argmax(axis=1) == new.argmax(axis=1)))
            total_rows += ref.shape[0]
    rel = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
    return OutputMetrics(
        name=name + suffix, max_abs=max_abs, mean_abs=abs_sum / count if count else 0.0, rel_l2=rel,
        cosine=float(np.mean(cosines)) if cosines else 1.0,
        top1_agreement=(agree / total_rows) if total_rows else None,
        nonfinite_ref=bad_ref, nonfinite_new=bad_new, samples=len(refs))


@dataclass(frozen=True)
class Tolerance:
    """When a candidate counts as computing what the original did. `None` leaves a check off; a new NaN/Inf
    always fails. The bounds given are the whole criterion: `Tolerance(min_cosine=0.95)` checks cosine only.
    `Tolerance.exact()` suits exact rewrites in float32 (BN folding, dead code, constant folding): relative L2
    error at most 1e-4 of the output's norm; `default_for(lossy=True)` is the guard for lossy passes.
    """

    max_rel_l2: float | None = None
    max_abs: float | None = None
    min_cosine: float | None = None
    min_top1_agreement: float | None = None

    def __post_init__(self):
        for key in ("max_rel_l2", "max_abs"):
            v = getattr(self, key)
            if v is not None and not (v >= 0):
                raise UsageError(f"{key} must be a non-negative number, got {v}")
        for key in ("min_cosine", "min_top1_agreement"):
            v = getattr(self, key)
            if v is not None and not (-1.0 <= v <= 1.0 if key == "min_cosine" else 0.0 <= v <= 1.0):
                raise UsageError(f"{key} out of range: {v}")

    def violations(self, metrics: list[OutputMetrics]) -> list[str]:
        """Human-readable reasons the candidate fails; empty when it passes."""
        out = []
        for m in metrics:
            if m.nonfinite_new > m.nonfinite_ref:
                out.append(f"{m.name}: {m.nonfinite_new} NaN/Inf values (reference has {m.nonfinite_ref})")
            if self.max_rel_l2 is not None and not m.rel_l2 <= self.max_rel_l2:
                out.append(f"{m.name}: relative L2 error {m.rel_l2:.3g} > {self.max_rel_l2:.3g}")
            if self.max_abs is not None and not m.max_abs <= self.max_abs:
                out.append(f"{m.name}: max abs error {m.max_abs:.3g} > {self.max_abs:.3g}")
            if self.min_cosine is not None and not m.cosine >= self.min_cosine:
                out.append(f"{m.name}: cosine {m.cosine:.6f} < {self.min_cosine}")
            if self.min_top1_agreement is not None and m.top1_agreement is not None \
                    and not m.top1_agreement >= self.min_top1_agreement:
                out.append(f"{m.name}: top-1 agreement {m.top1_agreement:.2%} < {self.min_top1_agreement:.2%}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def default_for(cls, lossy: bool) -> "Tolerance":
        """Exact rewrites: the strict defaults. Lossy passes (their own budgets set the quality): only a guard
        that catches a broken result: cosine at least 0.9, relative L2 at most 0.45 (cosine alone cannot see a
        scale error: 1.5x the reference has cosine 1 and relative L2 0.5), no new NaN/Inf."""
        return cls(max_rel_l2=LOSSY_GUARD_REL_L2, min_cosine=LOSSY_GUARD_COSINE) if lossy else cls.exact()

    @classmethod
    def exact(cls) -> "Tolerance":
        return cls(max_rel_l2=EXACT_REL_L2)

    def is_set(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def describe(self) -> str:
        parts = [f"relative L2 <= {self.max_rel_l2:g}" if self.max_rel_l2 is not None else "",
                 f"max abs <= {self.max_abs:g}" if self.max_abs is not None else "",
                 f"cosine >= {self.min_cosine:g}" if self.min_cosine is not None else "",
                 f"top-1 agreement >= {self.min_top1_agreement:g}" if self.min_top1_agreement is not None else ""]
        return ", ".join(p for p in parts if p) or "no new NaN/Inf"


EXACT_REL_L2 = 1e-4
LOSSY_GUARD_COSINE = 0.9
LOSSY_GUARD_REL_L2 = 0.45


def output_distortion(reference: list[dict], candidate: list[dict], scores: frozenset[str] | set[str] = frozenset()
                      ) -> float:
    """How far a compressed model's outputs are from the original's, as the lossy passes score options: mean
    KL(softmax(ref) || softmax(new)) for class scores, else normalised MSE, summed over outputs, averaged over
    feeds."""
    total = 0.0
    for ref, new in zip(reference, candidate):
        for name, r in ref.items():
            r64, n64 = r.astype(np.float64), new[name].astype(np.float64)
            if name in scores and r.ndim == 2:
                p, q = _log_softmax(r64), _log_softmax(n64)
                total += float(np.mean(np.sum(np.exp(p) * (p - q), axis=1)))
            else:
                total += float(np.sum((r64 - n64) ** 2) / max(np.sum(r64**2), 1e-30))
    return total / max(len(reference), 1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


_ROWS_PER_STEP = 1 << 14  # rows folded into a Gram matrix per step: bounds the buffered and float64 temporaries


class Gram:
    """Running XᵀX (float64) of the rows fed to it. Rows are buffered (up to a bounded count) so that samples
    with few rows each are folded in as one matrix product rather than many rank-few updates."""

    def __init__(self, n: int):
        self._xtx = np.zeros((n, n), np.float64)
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self.rows = 0

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.float32).reshape(-1, self._xtx.shape[0])
        rows = rows[np.isfinite(rows).all(axis=1)]
        self.rows += len(rows)
        self._pending.append(rows.copy())
        self._pending_rows += len(rows)
        if self._pending_rows >= _ROWS_PER_STEP:
            self._flush()

    @property
    def xtx(self) -> np.ndarray:
        self._flush()
        return self._xtx

    def _flush(self) -> None:
        if not self._pending:
            return
        rows = np.concatenate(self._pending)
        self._pending, self._pending_rows = [], 0
        for start in range(0, len(rows), _ROWS_PER_STEP):
            chunk = rows[start:start + _ROWS_PER_STEP].astype(np.float64)
            self._xtx += chunk.T @ chunk
