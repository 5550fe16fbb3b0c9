"""Mixed-precision QDQ: per-site int8 or float, chosen from measured sensitivity and latency under a budget.

Steps: find the sites (Conv/MatMul/Gemm with constant weights); calibrate activation ranges by streaming the
calibration inputs (bounded memory, the range method chosen per tensor); build the all-int8 model; measure each
site's sensitivity (output distortion on calibration inputs when only that site is int8) and its latency cost
(how much slower the all-int8 model gets when only that site stays float, measured in onnxruntime); let the
shared allocator choose the least-distortion assignment that meets the latency budget; rewrite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..allocate import BudgetInfeasible, Option, Site as AllocSite, allocate
from ..errors import InputError, UsageError
from ..model import Model
from ..numerics import looks_like_class_scores
from ..qdq_rewrite import MIN_OPSET, find_sites, make_plan, needed_statistics, rewrite
from ..runtime import make_session, measure_latencies, run
from .base import Context, Decision, Pass, PassResult, register

PRECISIONS = ("fp32", "int8")


@register
@dataclass(frozen=True)
class QDQ(Pass):
    """Quantize Conv/MatMul/Gemm sites to int8 where it pays, keep the sensitive ones in float."""

    name = "qdq"
    description = "mixed-precision int8 QDQ from measured sensitivity and latency (lossy)"
    exact = False

    target_speedup: float | None = None  # latency budget: fp32 latency / target_speedup
    latency_slack: float = 0.10  # default budget: at most this much slower than the all-int8 model
    calibration_samples: int = 64
    sensitivity_samples: int = 16
    overrides: str | None = None  # JSON {site: "fp32" | "int8"} applied after the allocation

    def __post_init__(self):
        if self.target_speedup is not None and not self.target_speedup > 0:
            raise ValueError(f"target_speedup must be positive, got {self.target_speedup}")
        if not self.latency_slack >= 0:
            raise ValueError(f"latency_slack must be >= 0, got {self.latency_slack}")
        if self.calibration_samples < 1 or self.sensitivity_samples < 1:
            raise ValueError("calibration_samples and sensitivity_samples must be at least 1")

    def run(self, model: Model, ctx: Context) -> PassResult:
        from ..capture import collect_stats

        if model.opset < MIN_OPSET:
            return PassResult(model, False, decisions=[Decision("model", "skipped",
                                                                f"opset {model.opset} < {MIN_OPSET}")])
        sites = find_sites(model)
        usable = [s for s in sites if not s.reason]
        decisions = [Decision(s.node, "skipped", s.reason) for s in sites if s.reason]
        if not usable:
            return PassResult(model, False, decisions=decisions)
        if ctx.inputs is None or ctx.inputs.synthetic:
            raise UsageError("the qdq pass needs real calibration data (--calib)")
        calib = ctx.inputs.calibration[: self.calibration_samples]
        ctx.progress(f"qdq: calibrating {len(needed_statistics(model, sites))} tensors on {len(calib)} samples")
        stats = collect_stats(model, needed_statistics(model, sites), calib, settings=ctx.runtime)
        ranges = {}
        for name, st in stats.items():
            choice = st.best_range(qmin=0, qmax=255, symmetric=False)
            ranges[name] = (choice.lo, choice.hi)
        all_int8 = {s.node for s in usable}
        probe = calib[: self.sensitivity_samples]
        reference = run(make_session(model, ctx.runtime), probe)

        ctx.progress(f"qdq: sensitivity of {len(usable)} sites")
        sensitivity = {}
        for s in usable:
            candidate = rewrite(model, sites, make_plan(model, sites, {s.node}, ranges))
            sensitivity[s.node] = distortion(reference, run(make_session(candidate, ctx.runtime), probe))

        ctx.progress("qdq: latency of each site kept in float (against the all-int8 model)")
        base = rewrite(model, sites, make_plan(model, sites, all_int8, ranges))
        loo = [rewrite(model, sites, make_plan(model, sites, all_int8 - {s.node}, ranges)) for s in usable]
        sessions = [make_session(model, ctx.runtime), make_session(base, ctx.runtime)]
        sessions += [make_session(m, ctx.runtime) for m in loo]
        lat = measure_latencies(sessions, probe[0], warmup=3, repeats=20, min_seconds=0.2, max_seconds=2.0)
        fp32_ms, int8_ms = lat[0].median_ms, lat[1].median_ms
        keep_cost = {s.node: max(0.0, l.median_ms - int8_ms) for s, l in zip(usable, lat[2:])}

        target_ms = fp32_ms / self.target_speedup if self.target_speedup else int8_ms * (1 + self.latency_slack)
        alloc_sites = [AllocSite(s.node, (Option("int8", 0.0, sensitivity[s.node]),
                                          Option("fp32", keep_cost[s.node], 0.0))) for s in usable]
        budget = target_ms - int8_ms
        try:
            allocation = allocate(alloc_sites, budget)
        except BudgetInfeasible:
            raise UsageError(f"target speed-up {self.target_speedup} is out of reach: fp32 {fp32_ms:.3f} ms, "
                             f"all-int8 {int8_ms:.3f} ms (best {fp32_ms / int8_ms:.2f}x)") from None
        chosen = {name: o.label for name, o in allocation.choice.items()}
        chosen.update(self._overrides(usable))
        int8 = {name for name, label in chosen.items() if label == "int8"}
        plan = make_plan(model, sites, int8, ranges)
        result = rewrite(model, sites, plan)
        for s in usable:
            reason = (f"sensitivity {sensitivity[s.node]:.3g}, float costs +{keep_cost[s.node]:.3f} ms; "
                      f"range {stats[s.activation].best_range(qmin=0, qmax=255, symmetric=False).method}"
                      if s.activation in stats else f"sensitivity {sensitivity[s.node]:.3g}")
            if s.node in plan.bias_adjusted:
                reason += f"; weight scale raised on {plan.bias_adjusted[s.node]} channels for int32 bias"
            decisions.append(Decision(s.node, chosen[s.node], reason))
        counters = {"sites": len(usable), "int8": len(int8), "fp32": len(usable) - len(int8),
                    "predicted_distortion": round(allocation.distortion, 6), "fp32_ms": round(fp32_ms, 3),
                    "all_int8_ms": round(int8_ms, 3), "target_ms": round(target_ms, 3)}
        return PassResult(result, bool(int8), counters, decisions)

    def _overrides(self, usable) -> dict[str, str]:
        if not self.overrides:
            return {}
        path = Path(self.overrides)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read overrides: {exc}") from None
        names = {s.node for s in usable}
        bad = {k: v for k, v in data.items() if k not in names or v not in PRECISIONS}
        if bad:
            raise UsageError(f"{path}: unknown sites or precisions {bad} (precisions: {', '.join(PRECISIONS)})")
        return dict(data)


def distortion(reference: list[dict], candidate: list[dict]) -> float:
    """Mean KL(softmax(ref) || softmax(new)) for class scores, else normalised MSE, over all outputs."""
    total = 0.0
    for ref, new in zip(reference, candidate):
        for name, r in ref.items():
            n = new[name]
            if looks_like_class_scores(r):
                p, q = _log_softmax(r), _log_softmax(n)
                total += float(np.mean(np.sum(np.exp(p) * (p - q), axis=1)))
            else:
                r64 = r.astype(np.float64)
                total += float(np.sum((r64 - n) ** 2) / max(np.sum(r64**2), 1e-30))
    return total / max(len(reference), 1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


__all__ = ["QDQ", "distortion"]
