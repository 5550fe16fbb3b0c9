"""What the user asks of a search: a cost budget (speed-up, latency or size) and a fidelity floor (accuracy drop
against labels, top-1 agreement or cosine against the original), and how one candidate is scored against them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..core.errors import UsageError
from ..core.numerics import OutputMetrics, Tolerance


@dataclass(frozen=True)
class Budget:
    target_speedup: float | None = None  # measured onnxruntime speed-up at the latency shape
    max_latency_ms: float | None = None
    max_size_mb: float | None = None  # serialized model, 10^6 bytes
    max_drop: float | None = None  # top-1 accuracy points lost against the labels the data carries
    min_agreement: float | None = None  # top-1 agreement with the original (class-score outputs)
    min_cosine: float | None = None  # cosine with the original, every output

    def __post_init__(self):
        for key in ("target_speedup", "max_latency_ms", "max_size_mb"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise UsageError(f"--{key.replace('_', '-')} must be positive, got {v}")
        if self.target_speedup is not None and self.target_speedup < 1:
            raise UsageError(f"--target-speedup {self.target_speedup}: a speed-up below 1 asks for a slower model")
        if self.max_drop is not None and not 0 <= self.max_drop <= 100:
            raise UsageError(f"--max-drop is in accuracy points (0..100), got {self.max_drop}")
        Tolerance(min_cosine=self.min_cosine, min_top1_agreement=self.min_agreement)  # validates both ranges
        if not self.has_cost():
            raise UsageError("a search needs a cost budget: --target-speedup, --max-latency-ms or --max-size-mb")
        if not self.has_floor():
            raise UsageError("a search needs a fidelity floor: --max-drop (with labels in --calib), "
                             "--min-agreement or --min-cosine")

    def has_cost(self) -> bool:
        return any(v is not None for v in (self.target_speedup, self.max_latency_ms, self.max_size_mb))

    def has_floor(self) -> bool:
        return any(v is not None for v in (self.max_drop, self.min_agreement, self.min_cosine))

    @property
    def loss_name(self) -> str:
        """The fidelity figure the front is drawn on: the first floor given, in this order."""
        if self.max_drop is not None:
            return "accuracy drop (points)"
        if self.min_agreement is not None:
            return "1 - top-1 agreement"
        return "1 - cosine"

    def describe(self) -> str:
        parts = [f"speed-up >= {self.target_speedup:g}x" if self.target_speedup is not None else "",
                 f"latency <= {self.max_latency_ms:g} ms" if self.max_latency_ms is not None else "",
                 f"size <= {self.max_size_mb:g} MB" if self.max_size_mb is not None else "",
                 f"accuracy drop <= {self.max_drop:g} points" if self.max_drop is not None else "",
                 f"top-1 agreement >= {self.min_agreement:g}" if self.min_agreement is not None else "",
                 f"cosine >= {self.min_cosine:g}" if self.min_cosine is not None else ""]
        return ", ".join(p for p in parts if p)

    def to_dict(self) -> dict:
        return asdict(self)

    def tolerance(self) -> Tolerance:
        """The floor as the pipeline's bound on the end result (the accuracy drop is checked beside it)."""
        return Tolerance(min_cosine=self.min_cosine, min_top1_agreement=self.min_agreement)

    def cost_violations(self, speedup: float | None, latency_ms: float | None, size_mb: float) -> list[str]:
        """What misses the cost budget; a speed-up or latency that was not measured (None) is not judged."""
        out = []
        if self.target_speedup is not None and speedup is not None and not speedup >= self.target_speedup:
            out.append(f"speed-up {speedup:.2f}x < {self.target_speedup:g}x")
        if self.max_latency_ms is not None and latency_ms is not None and not latency_ms <= self.max_latency_ms:
            out.append(f"latency {latency_ms:.3f} ms > {self.max_latency_ms:g} ms")
        if self.max_size_mb is not None and not size_mb <= self.max_size_mb:
            out.append(f"size {size_mb:.3f} MB > {self.max_size_mb:g} MB")
        return out

    def fidelity_violations(self, fidelity: "Fidelity") -> list[str]:
        out = [f"{n} new NaN/Inf values" for n in [fidelity.nonfinite] if n]
        if self.max_drop is not None:
            if fidelity.drop is None:
                out.append("no accuracy: the data has no labels or the model no class-score output")
            elif not fidelity.drop <= self.max_drop:
                out.append(f"accuracy drop {fidelity.drop:.2f} points > {self.max_drop:g}")
        if self.min_agreement is not None:
            if fidelity.agreement is None:
                out.append("no top-1 agreement: the model has no class-score output")
            elif not fidelity.agreement >= self.min_agreement:
                out.append(f"top-1 agreement {fidelity.agreement:.2%} < {self.min_agreement:.2%}")
        if self.min_cosine is not None and not fidelity.cosine >= self.min_cosine:
            out.append(f"cosine {fidelity.cosine:.4f} < {self.min_cosine:g}")
        return out

    def loss(self, fidelity: "Fidelity") -> float:
        """The front's fidelity axis, lower is better (NaN/Inf and missing figures count as the worst)."""
        if fidelity.nonfinite:
            return float("inf")
        if self.max_drop is not None:
            return float("inf") if fidelity.drop is None else fidelity.drop
        if self.min_agreement is not None:
            return float("inf") if fidelity.agreement is None else 1.0 - fidelity.agreement
        return 1.0 - fidelity.cosine

    def loss_floor(self) -> float:
        """The largest loss the floor accepts, on the front's axis."""
        if self.max_drop is not None:
            return self.max_drop
        if self.min_agreement is not None:
            return 1.0 - self.min_agreement
        return 1.0 - self.min_cosine


@dataclass(frozen=True)
class Fidelity:
    """A candidate against the original on one split: the worst output's cosine and top-1 agreement, and top-1
    accuracy against labels (with the original's) where the data has them."""

    samples: int
    cosine: float
    rel_l2: float
    agreement: float | None
    accuracy: float | None = None  # percent
    accuracy_original: float | None = None
    nonfinite: int = 0

    @property
    def drop(self) -> float | None:
        if self.accuracy is None or self.accuracy_original is None:
            return None
        return self.accuracy_original - self.accuracy

    def to_dict(self) -> dict:
        return {**asdict(self), "drop": self.drop}

    @classmethod
    def of(cls, metrics: list[OutputMetrics], candidate_outputs: list[dict] | None = None,
           original_outputs: list[dict] | None = None, labels: list[np.ndarray] | None = None,
           scores: frozenset[str] = frozenset()) -> "Fidelity":
        agreements = [m.top1_agreement for m in metrics if m.top1_agreement is not None]
        accuracy = accuracy_original = None
        name = next((n for n in (original_outputs or [{}])[0] if n in scores), None)
        if labels is not None and name is not None and candidate_outputs is not None:
            accuracy = top1_accuracy([o[name] for o in candidate_outputs], labels)
            accuracy_original = top1_accuracy([o[name] for o in original_outputs], labels)
        return cls(samples=metrics[0].samples if metrics else 0, cosine=min(m.cosine for m in metrics),
                   rel_l2=max(m.rel_l2 for m in metrics), agreement=min(agreements) if agreements else None,
                   accuracy=accuracy, accuracy_original=accuracy_original,
                   nonfinite=sum(max(0, m.nonfinite_new - m.nonfinite_ref) for m in metrics))


def top1_accuracy(scores: list[np.ndarray], labels: list[np.ndarray]) -> float:
    """Percent of rows whose argmax is the label."""
    hits = sum(int(np.count_nonzero(s.reshape(len(lab), -1).argmax(axis=1) == lab)) for s, lab in zip(scores, labels))
    return 100.0 * hits / max(1, sum(len(lab) for lab in labels))
