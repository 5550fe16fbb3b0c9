"""What a run did and measured: a before/after table, per-pass decisions, error metrics. Terminal, JSON, markdown."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from ._version import __version__
from .core.calibration import shapes_text
from .core.files import write_text_atomic
from .core.numerics import OutputMetrics, Tolerance
from .passes.base import Decision
from .core.runtime import Latency, RuntimeSettings


@dataclass
class ModelStats:
    nodes: int
    op_counts: dict[str, int]
    parameters: int
    bytes: int

    @classmethod
    def of(cls, model) -> "ModelStats":
        counts = model.op_counts()
        return cls(sum(counts.values()), dict(sorted(counts.items())), model.parameter_count(), model.byte_size())


@dataclass
class PassRecord:
    name: str
    spec: str
    status: str = "pending"  # applied | unchanged | rolled back
    reason: str = ""
    exact: bool = True
    tolerance: str = ""  # the bound it was held to against its own input
    seconds: float = 0.0
    counters: dict = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    metrics: list[OutputMetrics] = field(default_factory=list)  # against its own input
    metrics_vs_original: list[OutputMetrics] = field(default_factory=list)  # when the user set bounds
    # passes judged against the original (recover): their input against the original; `metrics` is the result's
    metrics_before: list[OutputMetrics] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "spec": self.spec, "status": self.status, "reason": self.reason,
                "exact": self.exact, "tolerance": self.tolerance,
                "seconds": round(self.seconds, 4), "counters": self.counters, "details": self.details,
                "decisions": [d.to_dict() for d in self.decisions],
                "metrics": [m.to_dict() for m in self.metrics],
                "metrics_vs_original": [m.to_dict() for m in self.metrics_vs_original],
                "metrics_before": [m.to_dict() for m in self.metrics_before]}

    @classmethod
    def from_dict(cls, d: dict) -> "PassRecord":
        """The record `to_dict` wrote (a search's build reports come back this way)."""
        metrics = {k: [OutputMetrics(**m) for m in d.get(k, [])]
                   for k in ("metrics", "metrics_vs_original", "metrics_before")}
        return cls(name=d["name"], spec=d["spec"], status=d["status"], reason=d["reason"], exact=d["exact"],
                   tolerance=d["tolerance"], seconds=d["seconds"], counters=d["counters"], details=d["details"],
                   decisions=[Decision(**x) for x in d["decisions"]], **metrics)


def json_plain(value):
    """numpy scalars and arrays in a pass's counters or details, as JSON numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu or platform.machine(), "cores": os.cpu_count(), "onnxruntime": ort.__version__,
            "python": platform.python_version(), "graphopt": __version__}


@dataclass
class Report:
    before: ModelStats
    tolerance: Tolerance
    inputs: dict
    runtime: RuntimeSettings
    after: ModelStats | None = None
    passes: list[PassRecord] = field(default_factory=list)
    metrics: list[OutputMetrics] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    latency_before: Latency | None = None
    latency_after: Latency | None = None
    latency_shape: dict[str, list[int]] | None = None  # the feed every latency figure was measured at
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    accuracy: dict | None = None  # top-1 accuracy against labels: original, optimized, drop (points), samples
    search: dict | None = None  # a search's front, chosen point and explanation (graphopt.search)

    @property
    def passed(self) -> bool:
        return not self.violations

    @property
    def speedup(self) -> float | None:
        if self.latency_before and self.latency_after and self.latency_after.median_ms > 0:
            return self.latency_before.median_ms / self.latency_after.median_ms
        return None

    def to_dict(self) -> dict:
        return {
            "graphopt": __version__, "machine": machine(),
            "runtime": {"intra_op_threads": self.runtime.intra_op_threads,
                        "inter_op_threads": self.runtime.inter_op_threads,
                        "providers": list(self.runtime.providers)},
            "inputs": self.inputs, "tolerance": self.tolerance.to_dict(), "warnings": self.warnings,
            "verification": {"passed": self.passed, "violations": self.violations,
                             "metrics": [m.to_dict() for m in self.metrics]},
            "before": vars(self.before), "after": vars(self.after) if self.after else None,
            "latency": {"shape": self.latency_shape,
                        "before": self.latency_before.to_dict() if self.latency_before else None,
                        "after": self.latency_after.to_dict() if self.latency_after else None,
                        "speedup": self.speedup},
            "passes": [p.to_dict() for p in self.passes],
            "seconds": round(self.seconds, 3),
            "accuracy": self.accuracy,
            "search": self.search,
        }

    def write_json(self, path: str | os.PathLike) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2, default=json_plain) + "\n")

    # ------------------------------------------------------------------ terminal
    def render(self, console) -> None:
        from rich.table import Table

        if self.search:
            render_search(console, self.search)

        summary = Table(title="graphopt: before / after", show_lines=False)
        summary.add_column("")
        summary.add_column("before", justify="right")
        summary.add_column("after", justify="right")
        summary.add_column("change", justify="right")
        after = self.after or self.before
        summary.add_row("nodes", str(self.before.nodes), str(after.nodes), _delta(self.before.nodes, after.nodes))
        summary.add_row("parameters", f"{self.before.parameters:,}", f"{after.parameters:,}",
                        _delta(self.before.parameters, after.parameters))
        summary.add_row("size", _mb(self.before.bytes), _mb(after.bytes), _delta(self.before.bytes, after.bytes))
        if self.latency_before and self.latency_after:
            summary.add_row("latency median (ms)", f"{self.latency_before.median_ms:.3f}",
                            f"{self.latency_after.median_ms:.3f}", f"{self.speedup:.2f}x speed-up")
            summary.add_row("latency p90 (ms)", f"{self.latency_before.p90_ms:.3f}",
                            f"{self.latency_after.p90_ms:.3f}", "")
        for op, (b, a) in _op_changes(self.before.op_counts, after.op_counts).items():
            summary.add_row(f"  {op}", str(b), str(a), _delta(b, a))
        console.print(summary)
        if self.latency_before and self.latency_after:
            threads = self.latency_before.threads
            shape = shapes_text(self.latency_shape or {})
            console.print(f"latency: onnxruntime at {shape or 'the first sample'}, {threads} intra-op "
                          f"thread{'s' if threads != 1 else ''}, {self.latency_before.runs}+{self.latency_after.runs} "
                          "runs interleaved", markup=False)

        passes = Table(title="passes")
        for col in ("pass", "status", "time (s)", "what it did"):
            passes.add_column(col, overflow="fold")  # never cut: the settings asked for must stay visible
        for p in self.passes:
            did = ", ".join(f"{k}={_number(v)}" for k, v in p.counters.items())
            if p.reason:
                did = f"{did}; {p.reason}" if did else p.reason
            passes.add_row(p.spec, p.status, f"{p.seconds:.2f}", did)
        console.print(passes)
        for p in self.passes:
            for b, a in zip(p.metrics_before, p.metrics):  # recover: how far it moved the model back
                moved = (f"top-1 agreement {b.top1_agreement:.2%} -> {a.top1_agreement:.2%}, "
                         if a.top1_agreement is not None else "")
                console.print(f"  {p.name}: {a.name} against the original on {a.samples} verification samples: "
                              f"{moved}cosine {b.cosine:.4f} -> {a.cosine:.4f}, rel L2 {b.rel_l2:.3g} -> "
                              f"{a.rel_l2:.3g}" + ("" if p.status == "applied" else f" ({p.status})"), markup=False)
        changed = [(p.name, d) for p in self.passes for d in p.decisions
                   if d.action not in ("kept", "skipped", "frozen", "fp32", "float")]
        for name, d in changed[:12]:
            console.print(f"  {name}: {d.action} {d.site}: {d.reason}", markup=False)
        if len(changed) > 12:
            console.print(f"  ... {len(changed) - 12} more decisions in the JSON report", markup=False)
        skipped = [(p.name, d) for p in self.passes for d in p.decisions if d.action == "skipped"]
        for name, d in skipped[:20]:
            console.print(f"  [dim]{name}: skipped {d.site}: {d.reason}[/dim]")
        if len(skipped) > 20:
            console.print(f"  [dim]... {len(skipped) - 20} more skipped sites in the JSON report[/dim]")

        i = self.inputs
        console.print(f"samples: {i.get('fit_samples')} fit, {i.get('selection_samples')} selection"
                      + (" (searches used the fit samples)" if i.get("selection_from") == "fit" else "")
                      + f", {i.get('verification_samples')} verification (no pass reads them); second size: "
                      + str(i.get("second_size", "none")), markup=False)
        errors = Table(title=f"numerics vs original ({i.get('verification_samples')} verification samples"
                             + (", synthetic inputs" if i.get("synthetic") else "") + "; bound: "
                             + self.tolerance.describe() + ")")
        for col in ("output", "max abs", "mean abs", "rel L2", "cosine", "top-1 agree", "NaN/Inf"):
            errors.add_column(col, justify="right")
        for m in self.metrics:
            errors.add_row(m.name, f"{m.max_abs:.3g}", f"{m.mean_abs:.3g}", f"{m.rel_l2:.3g}", f"{m.cosine:.6f}",
                           "-" if m.top1_agreement is None else f"{m.top1_agreement:.2%}", str(m.nonfinite_new))
        console.print(errors)
        if self.accuracy:
            a = self.accuracy
            console.print(f"top-1 accuracy against the labels of {a['samples']} verification rows: original "
                          f"{a['original']:.2f} %, optimized {a['optimized']:.2f} % ({-a['drop']:+.2f} points)",
                          markup=False)
        for w in self.warnings:
            console.print(f"[yellow]warning:[/yellow] {w}")
        if self.passed:
            console.print("[green]verification passed[/green]")
        else:
            console.print("[red]verification FAILED:[/red] " + "; ".join(self.violations))


def render_search(console, s: dict) -> None:
    """A search's candidates (front marked, the chosen one first in bold), the explanation per family, its cost."""
    from rich.table import Table

    table = Table(title=f"search: {s['budget_text']} (figures on the selection samples)")
    for col in ("#", "recipe", "speed-up", "size (MB)", "cosine", "agreement", "accuracy", s["loss_axis"], "verdict"):
        table.add_column(col, overflow="fold", justify="left" if col in ("recipe", "verdict") else "right")
    for p in s["points"]:
        sel = p.get("selection") or {}
        if p["status"] != "measured":
            verdict = f"{p['status']}: {p['reason']}"
        elif p["meets_cost"] and p["meets_floor"]:
            verdict = "within budget"
        else:
            verdict = "; ".join(p["cost_violations"] + p["floor_violations"])
        marks = ("chosen, " if p["id"] == s.get("chosen") else "") + ("front" if p["on_front"] else "")
        table.add_row(str(p["id"]), p["label"], _opt(p["speedup"], "{:.2f}x"), _opt(p["size_mb"], "{:.2f}"),
                      _opt(sel.get("cosine"), "{:.4f}"), _opt(sel.get("agreement"), "{:.2%}"),
                      _opt(sel.get("accuracy"), "{:.2f}%"), _opt(p["loss"], "{:.4g}"),
                      (f"[{marks.rstrip(', ')}] " if marks else "") + verdict,
                      style="bold green" if p["id"] == s.get("chosen") else None)
    console.print(table)
    for family, why in s["families"].items():
        console.print(f"  {family}: {why}", markup=False)
    first = s.get("first_valid_seconds")
    console.print(f"search: {s['seconds']:.0f} s (bound {s['max_minutes']:g} min"
                  + ("; the bound stopped it" if s["stopped_by_time"] else "") + "), first point within the budget "
                  + (f"after {first:.0f} s" if first is not None else "never") + f"; builds {s['executor']}",
                  markup=False)
    for note in s.get("notes", []):
        console.print(f"  {note}", markup=False)


def _opt(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def _op_changes(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    ops = sorted(set(before) | set(after))
    return {op: (before.get(op, 0), after.get(op, 0)) for op in ops if before.get(op, 0) != after.get(op, 0)}


def _delta(b: float, a: float) -> str:
    if b == a:
        return ""
    if b == 0:
        return f"+{a}"
    return f"{(a - b) / b:+.1%}"


def _number(v) -> str:
    """Counters as a person reads them: whole numbers without a decimal point, with thousands separators."""
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1000:
        return f"{int(v):,}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1000:
        return f"{v:,}"
    return str(v)


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


__all__ = ["Report", "PassRecord", "ModelStats", "machine", "write_text_atomic"]
