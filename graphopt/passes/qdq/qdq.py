"""Mixed-precision QDQ: per-site int8 or float, chosen from measured sensitivity and latency under a budget.

Steps: find the sites (Conv/MatMul/Gemm with constant weights); calibrate activation ranges by streaming the
calibration inputs (bounded memory, the range method chosen per tensor); measure each site's sensitivity (output
distortion on calibration inputs when only that site is int8) and its latency cost (how much slower the all-int8
model gets when only that site stays float, measured in onnxruntime); let the shared allocator choose the
least-distortion assignment that meets the latency budget; rewrite; report what onnxruntime actually fused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...analysis.allocate import Allocation, Boundary, BudgetInfeasible, Option, SiteOptions, allocate
from ...core.errors import InputError, UsageError
from ...core.model import Model
from ...core.numerics import output_distortion as distortion
from . import smooth
from .bias_correction import bias_shifts
from .dynamic import DYNAMIC_OPS, to_dynamic
from .int4 import BLOCK_SIZE, MIN_OPSET as INT4_OPSET, constant_tables, to_int4, to_opset
from .sites import MIN_OPSET, QuantSite, find_sites, make_plan, needed_statistics, rewrite
from ...core.runtime import kernels, make_session, measure_latencies, run
from ..base import Context, Decision, Pass, PassResult, register

PRECISIONS = ("fp32", "int8")
MAX_LIVE_SESSIONS = 8  # latency measurement: sessions alive at once (MiniLM: ~90 MB each)
ACTIVATION_MODES = ("static", "dynamic")
INTEGER_KERNELS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
                   "DynamicQuantizeMatMul"}


@register
@dataclass(frozen=True)
class QDQ(Pass):
    """Quantize Conv/MatMul/Gemm sites to int8 where it pays, keep the sensitive ones in float."""

    name = "qdq"
    description = "mixed-precision int8 QDQ from measured sensitivity and latency (lossy)"
    exact = False

    target_speedup: float | None = None  # latency budget: fp32 latency / target_speedup
    latency_slack: float = 0.10  # default budget: at most this much slower than the all-int8 model
    max_size_mb: float | None = None  # size budget: the model's serialized size, in MB (10^6 bytes)
    # "dynamic": MatMul/Gemm sites compute their activation scale at run time (DynamicQuantizeMatMul; Conv stays
    # static): slower than static, much more accurate where activations have outliers (transformers)
    activations: str = "static"
    smoothing: bool = True  # dynamic sites: move activation outliers into the weights where that measures better
    # size budgets only: also offer int4 weight-only (blocked DequantizeLinear, opset 21) for MatMul weights
    # (onnxruntime runs MatMulNBits) and constant Gather tables such as embeddings
    int4: bool = False
    bias_correction: bool = True  # static int8 sites: restore each output channel's mean (see bias_correction.py)
    calibration_samples: int = 64
    sensitivity_samples: int = 16  # rows (batch entries), not feeds: a batched feed counts as its batch size
    overrides: str | None = None  # JSON {site: "fp32" | "int8"} applied after the allocation
    # Accuracy-target mode: the fastest assignment whose measured metric on the selection samples meets these.
    min_agreement: float | None = None  # top-1 agreement with the original (class-score outputs)
    max_error: float | None = None  # relative L2 error of every output

    def __post_init__(self):
        if self.target_speedup is not None and not self.target_speedup > 0:
            raise ValueError(f"target_speedup must be positive, got {self.target_speedup}")
        if not self.latency_slack >= 0:
            raise ValueError(f"latency_slack must be >= 0, got {self.latency_slack}")
        if self.calibration_samples < 1 or self.sensitivity_samples < 1:
            raise ValueError("calibration_samples and sensitivity_samples must be at least 1")
        if self.min_agreement is not None and not 0 < self.min_agreement <= 1:
            raise ValueError(f"min_agreement must be in (0, 1], got {self.min_agreement}")
        if self.max_error is not None and not self.max_error > 0:
            raise ValueError(f"max_error must be positive, got {self.max_error}")
        if self.activations not in ACTIVATION_MODES:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, got {self.activations!r}")
        if self.max_size_mb is not None and not self.max_size_mb > 0:
            raise ValueError(f"max_size_mb must be positive, got {self.max_size_mb}")
        if self.int4 and self.max_size_mb is None:
            raise ValueError("int4 needs a size budget (max_size_mb): on this CPU int4 weights make a model smaller, "
                             "not faster than int8")
        budgets = [self.target_speedup is not None, self.max_size_mb is not None,
                   self.min_agreement is not None or self.max_error is not None]
        if sum(budgets) > 1:
            raise ValueError("give one budget: a latency budget (target_speedup), a size budget (max_size_mb) "
                             "or an accuracy target (min_agreement / max_error)")

    def run(self, model: Model, ctx: Context) -> PassResult:
        if model.opset < MIN_OPSET:
            return PassResult(model, False, decisions=[Decision("model", "skipped",
                                                                f"opset {model.opset} < {MIN_OPSET}")])
        decisions = []
        if self.int4 and model.opset < INT4_OPSET:
            model = to_opset(model, INT4_OPSET)  # if onnx cannot convert it, the pipeline rolls back with why
            decisions.append(Decision("model", f"opset {INT4_OPSET}", "converted for int4 DequantizeLinear"))
        sites = find_sites(model)
        usable = [s for s in sites if not s.reason]
        decisions += [Decision(s.node, "skipped", s.reason) for s in sites if s.reason]
        if not usable:
            return PassResult(model, False, decisions=decisions)
        if ctx.inputs is None or ctx.inputs.synthetic:
            raise UsageError("the qdq pass needs real calibration data (--calib)")
        if self.min_agreement is not None and not ctx.class_scores(model):
            raise UsageError(f"qdq: min_agreement needs a class-score output, and {', '.join(model.output_names())} "
                             "is not one (say --output-kind NAME=scores if it is, or use max_error)")
        overrides = self._overrides(usable)

        dynamic = {s.node for s in usable if s.op_type in DYNAMIC_OPS} if self.activations == "dynamic" else set()
        calib = ctx.inputs.fit[: self.calibration_samples]
        notes: dict[str, str] = {}
        if dynamic and self.smoothing:
            ctx.progress(f"qdq: choosing activation smoothing for {len(dynamic)} dynamic sites")
            plans = smooth.plan(model, [s for s in usable if s.node in dynamic], calib, settings=ctx.runtime)
            model = smooth.apply(model, sites, plans)
            sites = find_sites(model)
            usable = [s for s in sites if not s.reason]
            notes = {name: p.describe() for p in plans for name in p.sites}
        ranges, methods = self._calibrate(model, [s for s in sites if s.node not in dynamic], calib, ctx)
        probe = first_rows(calib, self.sensitivity_samples)
        reference = run(make_session(model, ctx.runtime), probe)
        scores = ctx.class_scores(model)

        by_name = {s.node: s for s in sites}
        tables = constant_tables(model) if self.int4 else []
        int4_axis = {s.node: 0 for s in usable if s.op_type == "MatMul"} if self.int4 else {}
        int4_axis.update({t.node: 1 for t in tables})
        weight_of = {s.node: s.weight for s in usable + tables}

        shifts = {}
        if self.bias_correction:
            ctx.progress("qdq: bias correction (channel means of the site inputs, float and fake-quantized)")
            static_sites = {s.node for s in usable} - dynamic
            tensors = make_plan(model, sites, static_sites, ranges).tensors
            shifts = bias_shifts(model, sites, static_sites, tensors, calib, settings=ctx.runtime)

        def plan_for(int8: set[str]):
            plan = make_plan(model, sites, int8, ranges)
            plan.bias_shift = {n: shifts[n] for n in int8 if n in shifts}
            return plan

        def build(int8: set[str], int4: set[str] = frozenset()) -> Model:
            static = rewrite(model, sites, plan_for(int8 - dynamic))
            out = to_dynamic(static, [by_name[n] for n in sorted(int8 & dynamic)]) if int8 & dynamic else static
            return to_int4(out, {weight_of[n]: int4_axis[n] for n in sorted(int4)}) if int4 else out

        def measure(int8: set[str], int4: set[str] = frozenset()) -> float:
            return distortion(reference, run(make_session(build(int8, int4), ctx.runtime), probe), scores)

        ctx.progress(f"qdq: sensitivity of {len(usable)} sites on {len(probe)} samples")
        sensitivity = {s.node: measure({s.node}) for s in usable}
        sensitivity4 = {n: measure(set(), {n}) for n in int4_axis}
        all_int8 = {s.node for s in usable}
        frontier: list[dict] = []
        budget_counters: dict[str, float] = {}
        if self.max_size_mb is not None:
            allocation, keep_cost = self._size_allocation(usable, tables, sensitivity, sensitivity4, build,
                                                          budget_counters)
        else:
            allocation, keep_cost = self._latency_allocation(usable, sensitivity, build, all_int8, model, overrides,
                                                             ctx, probe, frontier, budget_counters)
        chosen = {name: o.label for name, o in allocation.choice.items()}
        chosen.update(overrides)
        int8 = {name for name, label in chosen.items() if label == "int8"}
        int4 = {name for name, label in chosen.items() if label == "int4"}
        plan = plan_for(int8 - dynamic)
        result = build(int8, int4)
        measured = distortion(reference, run(make_session(result, ctx.runtime), probe), scores)
        ran = kernels(result, ctx.runtime)
        predicted = sum(sensitivity[n] for n in int8) + sum(sensitivity4[n] for n in int4)
        for t in tables:
            label = chosen[t.node]
            decisions.append(Decision(t.node, label, f"embedding table {t.macs:,} values; int4 sensitivity "
                                                     f"{sensitivity4[t.node]:.3g}; float: {keep_cost[t.node]}"))
        for s in usable:
            label = "int8-dynamic" if chosen[s.node] == "int8" and s.node in dynamic else chosen[s.node]
            decisions.append(self._decision(s, label, sensitivity, keep_cost, methods, plan, ran, notes.get(s.node)))
        counters = {"sites": len(usable) + len(tables), "int8": len(int8), "fp32": len(chosen) - len(int8) - len(int4),
                    "fused": sum(1 for n in int8 if ran.get(n) in INTEGER_KERNELS),
                    **({"int4": len(int4), "int4_fused": sum(1 for n in int4 if ran.get(n) == "MatMulNBits")}
                       if self.int4 else {}),
                    "predicted_distortion": round(predicted, 6), "measured_distortion": round(measured, 6),
                    **budget_counters}
        details = {"frontier": frontier} if frontier else {}
        return PassResult(result, bool(int8 or int4), counters, decisions, details)

    def _latency_allocation(self, usable, sensitivity, build, all_int8, model, overrides, ctx, probe, frontier,
                            counters):
        """Options priced in milliseconds: each site's cost of staying float, measured against the all-int8
        model; budget from target_speedup, or the all-int8 latency plus latency_slack."""
        ctx.progress("qdq: latency of each site kept in float, against the all-int8 model")
        feed = ctx.latency_feed(model)
        ends = [make_session(m, ctx.runtime) for m in (model, build(all_int8))]
        fp32_ms, int8_ms = (l.median_ms for l in measure_latencies(ends, feed, min_seconds=0.5))
        accuracy_mode = self.min_agreement is not None or self.max_error is not None
        if self.target_speedup is None and self.latency_slack == 0 and not accuracy_mode:
            # no room for any float site: every site int8, nothing more to measure
            counters.update(fp32_ms=round(fp32_ms, 3), all_int8_ms=round(int8_ms, 3), target_ms=round(int8_ms, 3))
            options = _options(usable, sensitivity, {s.node: 0.0 for s in usable})
            choice = {o.name: o.options[0] for o in options}
            return (Allocation(choice, 0.0, sum(o.distortion for o in choice.values()), 0.0, "no float budget"),
                    {s.node: "not measured (latency_slack 0)" for s in usable})
        # one site left float at a time, against the all-int8 model timed in the same interleaved round; a bounded
        # number of sessions is alive at once (each holds a copy of the weights)
        loo = {}
        for start in range(0, len(usable), MAX_LIVE_SESSIONS - 1):
            chunk = usable[start:start + MAX_LIVE_SESSIONS - 1]
            sessions = [ends[1]] + [make_session(build(all_int8 - {s.node}), ctx.runtime) for s in chunk]
            lat = measure_latencies(sessions, feed, warmup=5, repeats=30, min_seconds=0.2, max_seconds=2.0)
            loo.update({s.node: max(0.0, l.median_ms - lat[0].median_ms) for s, l in zip(chunk, lat[1:])})
            del sessions
        del ends
        keep_cost, boundaries, beta = island_costs(model, usable, loo, fp32_ms - int8_ms)
        options = _options(usable, sensitivity, keep_cost)
        if self.min_agreement is not None or self.max_error is not None:
            allocation = self._search(options, boundaries, build, overrides, ctx, frontier)
            target_ms = int8_ms + allocation.budget
        else:
            target_ms = fp32_ms / self.target_speedup if self.target_speedup else int8_ms * (1 + self.latency_slack)
            if fp32_ms <= target_ms and not self.target_speedup:
                ctx.progress(f"qdq: the float model ({fp32_ms:.3f} ms) is faster than all-int8 ({int8_ms:.3f} ms); "
                             "every site stays float (give max_size_mb to quantize for size)")
            try:
                allocation = allocate(options, target_ms - int8_ms, boundaries=boundaries)
            except BudgetInfeasible as exc:
                raise BudgetInfeasible(exc.budget, exc.best_cost, (
                    f"target speed-up {self.target_speedup}x needs {target_ms:.3f} ms; the fastest assignment "
                    f"(all int8) measured {int8_ms:.3f} ms against fp32 {fp32_ms:.3f} ms, "
                    f"{fp32_ms / int8_ms:.2f}x")) from None
            allocation = self._check_latency(allocation, options, build, target_ms / int8_ms, ctx, feed, frontier)
        counters.update(fp32_ms=round(fp32_ms, 3), all_int8_ms=round(int8_ms, 3), target_ms=round(target_ms, 3))
        return allocation, {n: f"{c:+.3f} ms, +{beta:.3f} ms per int8 neighbour (alone: +{loo[n]:.3f} ms)"
                            for n, c in keep_cost.items()}

    def _size_allocation(self, usable, tables, sensitivity, sensitivity4, build, counters):
        """Options priced in bytes per weight element: fp32 4, int8 1, int4 0.625 (half a byte and a float scale
        per block of 32), each relative to the site's smallest. The built model's size is checked, and while it
        is over the budget the site whose next smaller option adds the least distortion per byte saved takes it."""
        per_element = {"fp32": 4.0, "int8": 1.0, "int4": 0.5 + 4.0 / BLOCK_SIZE}
        sites = []
        for s in usable + tables:
            labels = (["int8"] if s.op_type != "Gather" else []) + (["int4"] if s.node in sensitivity4 else []) + \
                ["fp32"]
            dist = {"fp32": 0.0, "int8": sensitivity.get(s.node), "int4": sensitivity4.get(s.node)}
            low = min(per_element[label] for label in labels)
            sites.append(SiteOptions(s.node, tuple(Option(label, (per_element[label] - low) * s.macs, dist[label])
                                                 for label in labels)))
        smallest_choice = {site.name: min(site.options, key=lambda o: o.cost) for site in sites}

        def size(choice) -> int:
            labels = {n: o.label for n, o in choice.items()}
            return build({n for n, l in labels.items() if l == "int8"},
                         {n for n, l in labels.items() if l == "int4"}).byte_size()

        budget = self.max_size_mb * 1e6
        smallest = size(smallest_choice)
        if smallest > budget:
            raise BudgetInfeasible(budget, smallest, f"max_size_mb {self.max_size_mb:g} is below the smallest "
                                                     f"assignment's {smallest / 1e6:.3f} MB")
        allocation = allocate(sites, budget - smallest)
        choice = dict(allocation.choice)
        while size(choice) > budget:  # the byte model is approximate: step down where it costs the least
            steps = []
            for site in sites:
                current = choice[site.name]
                cheaper = [o for o in site.options if o.cost < current.cost]
                for o in cheaper:
                    steps.append(((o.distortion - current.distortion) / (current.cost - o.cost), site.name, o))
            if not steps:
                break
            _, name, option = min(steps, key=lambda t: t[0])
            choice[name] = option
        counters.update(smallest_mb=round(smallest / 1e6, 4), max_size_mb=self.max_size_mb)
        allocation = Allocation(choice, sum(o.cost for o in choice.values()),
                                sum(o.distortion for o in choice.values()), allocation.budget, allocation.method)
        extra = {site.name: site.options[[o.label for o in site.options].index("fp32")].cost for site in sites}
        return allocation, {n: f"+{c / 1e6:.3f} MB over its smallest form" for n, c in extra.items()}

    def _check_latency(self, allocation, options, build, target_ratio: float, ctx: Context, feed, frontier):
        """Measure the chosen assignment against the all-int8 model, interleaved, so that the check holds however
        busy the machine is: it must stay within `target_ratio` times the all-int8 latency. Float islands can cost
        more than the sum of their single-site costs (onnxruntime converts layouts between them and the integer
        kernels), so when the measurement misses the target, keep only the k most sensitive of the chosen float sites, with k the largest that measures
        within the target (bisected, assuming more float sites are never faster)."""
        sensitivity = {o.name: o.options[0].distortion for o in options}
        floats = sorted((n for n, o in allocation.choice.items() if o.label == "fp32"), key=sensitivity.get,
                        reverse=True)
        base = make_session(build({o.name for o in options}), ctx.runtime)

        def fits(k: int) -> bool:
            int8 = {o.name for o in options} - set(floats[:k])
            lat = measure_latencies([base, make_session(build(int8), ctx.runtime)], feed, min_seconds=0.3)
            ratio = lat[1].median_ms / lat[0].median_ms
            ok = ratio <= target_ratio
            frontier.append({"float_sites": k, "measured_ms": round(lat[1].median_ms, 4),
                             "all_int8_ms": round(lat[0].median_ms, 4), "ratio_to_all_int8": round(ratio, 4),
                             "target_ratio": round(target_ratio, 4), "meets_target": ok})
            ctx.progress(f"qdq: {k} float sites measure {ratio:.3f}x the all-int8 latency "
                         f"(target {target_ratio:.3f}x)")
            return ok

        if floats and not fits(len(floats)):
            lo, hi = 0, len(floats)  # fits(lo) assumed (all int8 is the fastest), fits(hi) is false
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            floats = floats[:lo]
        choice = {o.name: o.options[1] if o.name in floats else o.options[0] for o in options}
        return type(allocation)(choice, sum(o.cost for o in choice.values()),
                                sum(o.distortion for o in choice.values()), allocation.budget, allocation.method)

    def _search(self, options: list[SiteOptions], boundaries, build, overrides, ctx: Context, frontier: list[dict]):
        """Bisect the latency budget for the cheapest allocation whose measured metric meets the target."""
        from ...core.numerics import compare_outputs

        selection = ctx.inputs.for_selection  # never the verification samples the report quotes
        scores = ctx.class_scores(build(set()))
        reference = run(make_session(build(set()), ctx.runtime), selection)

        def meets(allocation) -> bool:
            int8 = {n for n, o in allocation.choice.items() if o.label == "int8"}
            int8 = {n for n in int8 if overrides.get(n, "int8") == "int8"} | \
                {n for n, v in overrides.items() if v == "int8"}
            metrics = compare_outputs(reference, run(make_session(build(int8), ctx.runtime), selection), scores)
            agreement = min((m.top1_agreement for m in metrics if m.top1_agreement is not None), default=None)
            error = max(m.rel_l2 for m in metrics)
            ok = (self.max_error is None or error <= self.max_error) and \
                 (self.min_agreement is None or (agreement is not None and agreement >= self.min_agreement))
            frontier.append({"budget_ms": round(allocation.budget, 4), "float_sites": len(allocation.choice) - len(int8),
                             "predicted_distortion": allocation.distortion, "rel_l2": error,
                             "top1_agreement": agreement, "meets_target": ok})
            ctx.progress(f"qdq: budget +{allocation.budget:.3f} ms -> rel L2 {error:.4f}"
                         + (f", agreement {agreement:.2%}" if agreement is not None else ""))
            return ok

        lo, hi = 0.0, sum(max(0.0, o.options[1].cost) for o in options) + sum(b.cost for b in boundaries)
        best = allocate(options, hi, boundaries=boundaries)
        if not meets(best):
            raise BudgetInfeasible(hi, hi, "the accuracy target is not met even with every site in float")
        cheapest = allocate(options, lo, boundaries=boundaries)
        if meets(cheapest):
            return cheapest
        for _ in range(6):
            mid = (lo + hi) / 2
            candidate = allocate(options, mid, boundaries=boundaries)
            if meets(candidate):
                hi, best = mid, candidate
            else:
                lo = mid
        return best

    def _calibrate(self, model: Model, sites: list[QuantSite], calib, ctx: Context):
        from ...core.capture import collect_stats

        tensors = needed_statistics(model, sites)
        if not tensors:
            return {}, {}
        ctx.progress(f"qdq: calibrating {len(tensors)} tensors on {len(calib)} samples")
        stats = collect_stats(model, tensors, calib, settings=ctx.runtime)
        missing = [t for t in tensors if t not in stats]
        if missing:
            raise InputError(f"could not calibrate tensors {missing[:5]}: {getattr(stats, 'skipped', {})}")
        ranges, methods = {}, {}
        for name, st in stats.items():
            choice = st.best_range(qmin=0, qmax=255, symmetric=False)
            ranges[name], methods[name] = (choice.lo, choice.hi), choice.method
        return ranges, methods

    @staticmethod
    def _decision(s: QuantSite, label, sensitivity, keep_cost, methods, plan, ran, note: str | None) -> Decision:
        parts = [f"sensitivity {sensitivity[s.node]:.3g}", f"float: {keep_cost[s.node]}"]
        if s.activation in methods and label != "int8-dynamic":
            parts.append(f"input range by {methods[s.activation]}")
        if label.startswith("int8") or label == "int4":
            parts.append(f"ORT runs {ran.get(s.node, 'it fused away')}")
        if note:
            parts.append(note)
        if s.node in plan.bias_shift:
            parts.append(f"bias corrected (mean shift up to {np.abs(plan.bias_shift[s.node]).max():.2g})")
        if s.node in plan.bias_adjusted:
            parts.append(f"weight scale raised on {plan.bias_adjusted[s.node]} channels for the int32 bias")
        return Decision(s.node, label, "; ".join(parts))

    def _overrides(self, usable: list[QuantSite]) -> dict[str, str]:
        if not self.overrides:
            return {}
        path = Path(self.overrides)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read overrides: {exc}") from None
        names = {s.node for s in usable}
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a JSON object {{site: precision}}")
        bad = {k: v for k, v in data.items() if k not in names or v not in PRECISIONS}
        if bad:
            raise UsageError(f"{path}: unknown sites or precisions {bad} (precisions: {', '.join(PRECISIONS)})")
        return dict(data)


def island_costs(model: Model, usable: list[QuantSite], loo: dict[str, float], float_minus_int8_ms: float):
    """Split each site's measured cost of staying float alone (`loo`) into its own compute and the conversions at
    its two borders with int8 neighbours, so that a run of neighbouring float sites pays the borders once.

    Own compute: the float-minus-int8 latency of the whole model shared by weight size; border cost beta: the median
    over sites of (alone - own) / 2. Returns (float option cost per site, Boundary list between consecutive sites
    in graph order, beta). A site reading a graph input or ending the graph has a float neighbour already, so its
    float option saves one border (its cost is own - beta)."""
    total = sum(s.macs for s in usable) or 1
    own = {s.node: max(0.0, float_minus_int8_ms) * s.macs / total for s in usable}
    beta = float(np.median([max(0.0, (loo[s.node] - own[s.node]) / 2) for s in usable]))
    inputs = {i.name for i in model.graph.input}
    cost = dict(own)
    for s in usable:
        if s.activation in inputs:
            cost[s.node] -= beta
    cost[usable[-1].node] -= beta
    boundaries = [Boundary(a.node, b.node, "fp32", beta) for a, b in zip(usable, usable[1:])]
    return cost, boundaries, beta


def first_rows(feeds: list[dict[str, np.ndarray]], rows: int) -> list[dict[str, np.ndarray]]:
    """The first feeds that together hold at least `rows` samples along the leading axis (at least one feed)."""
    out, total = [], 0
    for feed in feeds:
        out.append(feed)
        sizes = {a.shape[0] for a in feed.values() if a.ndim}
        total += sizes.pop() if len(sizes) == 1 else 1
        if total >= rows:
            break
    return out


def _options(usable: list[QuantSite], sensitivity: dict, keep_cost: dict) -> list[SiteOptions]:
    return [SiteOptions(s.node, (Option("int8", 0.0, sensitivity[s.node]), Option("fp32", keep_cost[s.node], 0.0)))
            for s in usable]
