"""Mixed-precision quantization: each site's form chosen from a menu by measured sensitivity and latency.

Sites are Conv/MatMul/Gemm with constant weights and Gather over constant tables. The menu per site: static int8
(QDQ that onnxruntime fuses into QLinearConv/QLinearMatMul/QGemm), dynamic int8 (MatMul/Gemm: the activation
scale computed per call, DynamicQuantizeMatMul), int4 weight-only (MatMul as MatMulNBits, tables as
GatherBlockQuantized) and float. Steps: smooth the dynamic-capable sites' inputs where that measures better;
calibrate activation ranges by streaming the calibration inputs; round the weights (nearest or GPTQ); measure each
site's distortion in each form alone (on calibration inputs) and each form's latency in onnxruntime; let the shared
allocator pick the least-distortion assignment within the budget (latency, size or an accuracy target); rewrite;
report what onnxruntime actually ran.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np

from ...analysis.allocate import Allocation, Boundary, BudgetInfeasible, Option, SiteOptions, allocate
from ...core.errors import InputError, UsageError
from ...core.model import Model
from ...core.numerics import output_distortion as distortion
from . import smooth
from .bias_correction import bias_shifts, refine_shifts
from .dynamic import DYNAMIC_OPS, to_dynamic
from .int4 import ACCURACY_LEVELS, BLOCK_SIZE, constant_tables, int4_reason, to_int4
from .sites import MIN_OPSET, QuantSite, find_sites, make_plan, needed_statistics, rewrite
from ...core.runtime import int8_weight_qmax, kernels, make_session, measure_latencies, run
from ..base import Context, Decision, Pass, PassResult, register

FP32, STATIC, DYNAMIC, INT4 = "fp32", "int8", "int8-dynamic", "int4"
PRECISIONS = (FP32, STATIC, DYNAMIC, INT4)  # the menu; a site offers the forms its op and the settings allow
MAX_LIVE_SESSIONS = 8  # latency measurement: sessions alive at once (MiniLM: ~90 MB each)
ACTIVATION_MODES = ("auto", "static", "dynamic")
ROUNDINGS = ("nearest", "gptq")
REFINE_ROWS = 32  # calibration rows the bias refinement runs the model on, once per int8 site
INT4_KERNELS = {"MatMulNBits", "GatherBlockQuantized"}
INTEGER_KERNELS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
                   "DynamicQuantizeMatMul"}


@register
@dataclass(frozen=True)
class QDQ(Pass):
    """Choose per Conv/MatMul/Gemm/Gather site among float, static int8, dynamic int8 and int4 weight-only."""

    name = "qdq"
    description = "mixed-precision quantization: float / static int8 / dynamic int8 / int4 per site (lossy)"
    exact = False

    search_role: ClassVar[str] = "quantize"

    @classmethod
    def search_levels(cls, speedup, size_mb, floor):
        """The fastest all-int8 form, the default slack, a more accurate one and the cheapest assignment that
        meets the floor on the selection samples (or the size budget)."""
        if size_mb is not None and speedup is None:
            return [cls(max_size_mb=size_mb)]
        levels = [cls(latency_slack=0.0), cls(), cls(latency_slack=0.25)]
        if "min_agreement" in floor or "max_drop" in floor:  # agreement bounds the drop: a changed label costs one
            agreement = max(floor.get("min_agreement", 0.0), 1.0 - floor.get("max_drop", 100.0) / 100.0)
            levels.append(cls(min_agreement=round(agreement, 4)))
        elif "min_cosine" in floor:  # cosine c of outputs with relative error e: about 1 - e^2 / 2
            levels.append(cls(max_error=round(math.sqrt(2.0 * (1.0 - floor["min_cosine"])), 4)))
        return levels

    target_speedup: float | None = None  # latency budget: fp32 latency / target_speedup
    # default budget: at most this much slower than the fastest all-int8 form (static or dynamic, measured)
    latency_slack: float = 0.10
    max_size_mb: float | None = None  # size budget: the model's serialized size, in MB (10^6 bytes)
    # a restriction of the menu: "auto" offers MatMul/Gemm sites both static int8 and dynamic int8 (activation scale
    # computed at run time: DynamicQuantizeMatMul; slower than static where static fuses, much more accurate where
    # activations have outliers, e.g. transformers); "static" or "dynamic" offers only that one (Conv is static)
    activations: str = "auto"
    smoothing: bool = True  # MatMul/Gemm inputs with outlier channels: move them into the weights where that helps
    # int4 weight-only on the menu: MatMul as MatMulNBits, embedding tables as GatherBlockQuantized
    int4: bool = True
    int4_accuracy_level: int = 4  # MatMulNBits compute type: 4 rounds activations to int8 per block (fast), 0 fp32
    rounding: str = "nearest"  # weight rounding: "nearest", or "gptq" (error feedback from the input second moment)
    bias_correction: bool = True  # static int8 sites: restore each output channel's mean (see bias_correction.py)
    calibration_samples: int = 64
    sensitivity_samples: int = 16  # rows (batch entries), not feeds: a batched feed counts as its batch size
    overrides: str | None = None  # JSON {site: "fp32" | "int8" | "int8-dynamic" | "int4"} applied after the allocation
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
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.int4_accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"int4_accuracy_level must be one of {ACCURACY_LEVELS} (MatMulNBits on the CPU: 0 or 1 "
                             f"fp32, 4 int8 activations), got {self.int4_accuracy_level}")
        if self.max_size_mb is not None and not self.max_size_mb > 0:
            raise ValueError(f"max_size_mb must be positive, got {self.max_size_mb}")
        budgets = [self.target_speedup is not None, self.max_size_mb is not None,
                   self.min_agreement is not None or self.max_error is not None]
        if sum(budgets) > 1:
            raise ValueError("give one budget: a latency budget (target_speedup), a size budget (max_size_mb) "
                             "or an accuracy target (min_agreement / max_error)")

    def menu(self, model: Model, site: QuantSite) -> tuple[str, ...]:
        """The forms `site` offers, cheapest-to-run int8 form first and float last."""
        if site.op_type == "Gather":
            return (INT4, FP32)
        forms = []
        if self.activations != "dynamic" or site.op_type not in DYNAMIC_OPS:
            forms.append(STATIC)
        if self.activations != "static" and site.op_type in DYNAMIC_OPS:
            forms.append(DYNAMIC)
        if self.int4 and not int4_reason(site, model):
            forms.append(INT4)
        return (*forms, FP32)

    def run(self, model: Model, ctx: Context) -> PassResult:
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
        if self.min_agreement is not None and not ctx.class_scores(model):
            raise UsageError(f"qdq: min_agreement needs a class-score output, and {', '.join(model.output_names())} "
                             "is not one (say --output-kind NAME=scores if it is, or use max_error)")
        calib = ctx.inputs.fit[: self.calibration_samples]
        notes: dict[str, str] = {}
        can_dynamic = [s for s in usable if DYNAMIC in self.menu(model, s)]
        if can_dynamic and self.smoothing:
            ctx.progress(f"qdq: choosing activation smoothing for {len(can_dynamic)} MatMul/Gemm sites")
            plans = smooth.plan(model, can_dynamic, calib, settings=ctx.runtime)
            model = smooth.apply(model, sites, plans)  # exact in float: every form of these sites reads it
            sites = find_sites(model)
            usable = [s for s in sites if not s.reason]
            notes = {name: p.describe() for p in plans for name in p.sites}
        tables = constant_tables(model) if self.int4 else []
        menus = {s.node: self.menu(model, s) for s in usable + tables}
        overrides = self._overrides(menus)
        by_name = {s.node: s for s in sites + tables}
        static_ok = {n for n, m in menus.items() if STATIC in m}
        ranges, methods = self._calibrate(model, [s for s in sites if s.node in static_ok or s.reason], calib, ctx)
        probe = first_rows(calib, self.sensitivity_samples)
        reference = run(make_session(model, ctx.runtime), probe)
        scores = ctx.class_scores(model)

        codes8, codes4 = {}, {}
        if self.rounding == "gptq":
            from .gptq import gptq_codes

            ctx.progress("qdq: GPTQ rounding (input second moments of every site)")
            codes8, codes4 = gptq_codes(model, usable, menus, calib, ctx.runtime, ctx.progress)
        shifts = {}  # per-site bias shifts: what each site's sensitivity is measured with
        if self.bias_correction and static_ok:
            ctx.progress("qdq: bias correction (channel means of the site inputs, float and fake-quantized)")
            tensors = make_plan(model, sites, static_ok, ranges).tensors
            shifts = bias_shifts(model, sites, static_ok, tensors, calib, settings=ctx.runtime, codes=codes8)

        def plan_for(static: set[str], bias_shift: dict | None = None):
            plan = make_plan(model, sites, static, ranges)
            bias_shift = shifts if bias_shift is None else bias_shift
            plan.bias_shift = {n: bias_shift[n] for n in static if n in bias_shift}
            return plan

        def build(assign: dict[str, str], bias_shift: dict | None = None) -> Model:
            """The model with each named site in its form (sites not named stay float)."""
            static = {n for n, f in assign.items() if f == STATIC}
            others = {n for n, f in assign.items() if f in (DYNAMIC, INT4)}
            out = rewrite(model, sites, plan_for(static, bias_shift), codes=codes8, not_float=others) \
                if static else model
            dynamic = [by_name[n] for n, f in sorted(assign.items()) if f == DYNAMIC]
            out = to_dynamic(out, dynamic, codes=codes8) if dynamic else out
            int4 = [by_name[n] for n, f in sorted(assign.items()) if f == INT4]
            return to_int4(out, int4, accuracy_level=self.int4_accuracy_level, codes=codes4) if int4 else out

        def measure(assign: dict[str, str]) -> float:
            return distortion(reference, run(make_session(build(assign), ctx.runtime), probe), scores)

        n_forms = sum(len(m) - 1 for m in menus.values())
        ctx.progress(f"qdq: sensitivity of {len(menus)} sites in {n_forms} quantized forms on {len(probe)} samples")
        sensitivity = {n: {f: (measure({n: f}) if f != FP32 else 0.0) for f in m} for n, m in menus.items()}
        frontier: list[dict] = []
        budget_counters: dict[str, float] = {}
        if self.max_size_mb is not None:
            allocation, keep_cost = self._size_allocation(usable + tables, menus, sensitivity, build,
                                                          budget_counters)
            base = None
        else:
            allocation, keep_cost, base = self._latency_allocation(usable, tables, menus, sensitivity, build, model,
                                                                   overrides, ctx, frontier, budget_counters)
        chosen = {name: o.label for name, o in allocation.choice.items()}
        chosen.update(overrides)
        static = {n for n, f in chosen.items() if f == STATIC}
        final_shift = shifts
        if shifts and static:  # against this assignment: upstream drift depends on which sites are int8
            final_shift, how = self._refined_shifts(model, sites, static, shifts, lambda sh: build(chosen, sh), calib,
                                                    probe, reference, scores, ctx)
            decisions.append(Decision("model", "bias correction", how))
        result = build(chosen, final_shift)
        measured = distortion(reference, run(make_session(result, ctx.runtime), probe), scores)
        base_form = budget_counters.get("base_form")
        if base and not overrides and self.min_agreement is None and self.max_error is None:
            # sites kept off the base form must pay for their latency in measured distortion: single-site figures
            # do not see the errors that cancel between neighbouring int8 sites
            if base != chosen:
                b_static = {n for n, f in base.items() if f == STATIC}
                b_shift = self._refined_shifts(model, sites, b_static, shifts, lambda sh: build(base, sh), calib,
                                               probe, reference, scores, ctx)[0] if shifts and b_static else shifts
                b_model = build(base, b_shift)
                b_measured = distortion(reference, run(make_session(b_model, ctx.runtime), probe), scores)
                if b_measured <= measured:
                    decisions.append(Decision("model", f"all-{base_form}", (
                        f"the chosen assignment measured distortion {measured:.3g} on the calibration rows, the faster "
                        f"all-{base_form} {b_measured:.3g}: every site takes its base form")))
                    chosen, static, final_shift, result, measured = base, b_static, b_shift, b_model, b_measured
        plan = plan_for(static, final_shift)
        ran = kernels(result, ctx.runtime)
        predicted = sum(sensitivity[n][f] for n, f in chosen.items())
        for s in usable + tables:
            decisions.append(self._decision(s, chosen[s.node], sensitivity[s.node], keep_cost, methods, plan, ran,
                                            notes.get(s.node)))
        count = {f: sum(1 for v in chosen.values() if v == f) for f in PRECISIONS}
        counters = {"sites": len(chosen), "int8": count[STATIC], "int8_dynamic": count[DYNAMIC],
                    "int4": count[INT4], "fp32": count[FP32],
                    "fused": sum(1 for n, f in chosen.items()
                                 if f in (STATIC, DYNAMIC) and ran.get(n) in INTEGER_KERNELS),
                    "int4_fused": sum(1 for n, f in chosen.items() if f == INT4 and ran.get(n) in INT4_KERNELS),
                    "predicted_distortion": round(predicted, 6), "measured_distortion": round(measured, 6),
                    **budget_counters}
        int8_note = {}
        if count[STATIC] or count[DYNAMIC]:
            qmax = int8_weight_qmax()
            counters["int8_weight_max"] = qmax
            int8_note = {"int8_weights": f"codes in [-{qmax}, {qmax}]: " + (
                "this CPU sums u8 x s8 products in 32 bits (VNNI)" if qmax == 127 else
                "this CPU has no VNNI, and onnxruntime's AVX2 integer kernels add pairs of u8 x s8 products in "
                "16 bits, which saturates with 8-bit weights (GRAPHOPT_INT8_WEIGHT_BITS=8 for a VNNI target)")}
        details = {**({"frontier": frontier} if frontier else {}), **int8_note}
        return PassResult(result, count[FP32] < len(chosen), counters, decisions, details)

    def _refined_shifts(self, model, sites, static, shifts, build, calib, probe, reference, scores, ctx):
        """The per-site bias shifts, or the ones refined against the chosen model `build(shifts)` (upstream drift
        included), whichever gives that model the lower distortion on the probe rows."""
        refined = refine_shifts(model, sites, static, shifts, build, first_rows(calib, REFINE_ROWS),
                                settings=ctx.runtime, progress=ctx.progress)
        local, seq = (distortion(reference, run(make_session(build(sh), ctx.runtime), probe), scores)
                      for sh in (shifts, refined))
        keep = seq < local
        return (refined if keep else shifts), (
            f"bias correction {'refined in graph order against this model' if keep else 'per site'}: distortion "
            f"{local:.3g} per site, {seq:.3g} refined")

    def _latency_allocation(self, usable, tables, menus, sensitivity, build, model, overrides, ctx, frontier,
                            counters):
        """Options priced in milliseconds against the base: every site in the faster all-int8 form (static or
        dynamic, measured). A site's cost of staying float is measured against the base with that site alone in
        float; its cost of another quantized form is that form's whole-model difference (every site that can in
        that form, measured) shared by weight size. Tables cost nothing in either form (GatherBlockQuantized reads
        only the gathered rows). Budget from target_speedup, or the base latency plus latency_slack.
        Returns (allocation, each site's float cost in words, the base assignment)."""
        ctx.progress("qdq: latency of the fp32 model and of each all-quantized form")
        feed = ctx.latency_feed(model)
        anchors = {}
        for form in (STATIC, DYNAMIC):
            if any(form in menus[s.node] for s in usable):
                anchors[form] = {s.node: form if form in menus[s.node] else menus[s.node][0] for s in usable}
        int8_forms = list(anchors)
        if any(INT4 in m for m in menus.values()):
            first = next(iter(anchors.values()))
            anchors[INT4] = {n: INT4 if INT4 in m else first.get(n, FP32) for n, m in menus.items()}
        sessions = [make_session(model, ctx.runtime)] + [make_session(build(a), ctx.runtime) for a in anchors.values()]
        lat = measure_latencies(sessions, feed, min_seconds=0.5)
        del sessions
        fp32_ms = lat[0].median_ms
        anchor_ms = {form: l.median_ms for form, l in zip(anchors, lat[1:])}
        base_form = min(int8_forms, key=anchor_ms.get)
        base = {n: anchors[base_form].get(n, FP32) for n in menus}  # tables stay float in the base
        base_ms = anchor_ms[base_form]
        counters.update(fp32_ms=round(fp32_ms, 3), base_ms=round(base_ms, 3), base_form=base_form,
                        **{f"all_{form.replace('-', '_')}_ms": round(ms, 3) for form, ms in anchor_ms.items()})
        accuracy_mode = self.min_agreement is not None or self.max_error is not None
        if self.target_speedup is None and self.latency_slack == 0 and not accuracy_mode:
            # no room for a slower site: the fastest all-int8 form, nothing more to measure
            counters.update(target_ms=round(base_ms, 3))
            choice = {n: Option(f, 0.0, sensitivity[n][f]) for n, f in base.items()}
            return (Allocation(choice, 0.0, sum(o.distortion for o in choice.values()), 0.0, "no slack"),
                    {n: "not measured (latency_slack 0)" for n in menus}, base)
        # one site left float at a time, against the base timed in the same interleaved round; a bounded number
        # of sessions is alive at once (each holds a copy of the weights)
        ctx.progress(f"qdq: latency of each site kept in float, against all-{base_form}")
        loo = {}
        base_session = make_session(build(base), ctx.runtime)
        for start in range(0, len(usable), MAX_LIVE_SESSIONS - 1):
            chunk = usable[start:start + MAX_LIVE_SESSIONS - 1]
            sessions = [base_session] + [make_session(build({**base, s.node: FP32}), ctx.runtime) for s in chunk]
            times = measure_latencies(sessions, feed, warmup=5, repeats=30, min_seconds=0.2, max_seconds=2.0)
            loo.update({s.node: max(0.0, t.median_ms - times[0].median_ms) for s, t in zip(chunk, times[1:])})
            del sessions
        del base_session
        keep_cost, boundaries, beta = island_costs(model, usable, loo, fp32_ms - base_ms)
        keep_cost.update({t.node: 0.0 for t in tables})
        form_cost = {}  # (site, form) -> ms, for forms other than the site's base form
        for form, assign in anchors.items():
            moved = [s for s in usable + tables if assign.get(s.node, FP32) != base[s.node] and s.op_type != "Gather"]
            total = sum(s.macs for s in moved) or 1
            for s in moved:
                form_cost[(s.node, form)] = (anchor_ms[form] - base_ms) * s.macs / total

        def cost(name: str, form: str) -> float:
            if form == base[name]:
                return 0.0
            return keep_cost[name] if form == FP32 else form_cost.get((name, form), 0.0)

        options = [SiteOptions(n, tuple(Option(f, cost(n, f), sensitivity[n][f]) for f in m)) for n, m in menus.items()]
        if accuracy_mode:
            allocation = self._search(options, boundaries, build, overrides, ctx, frontier)
            target_ms = base_ms + allocation.budget
        else:
            target_ms = fp32_ms / self.target_speedup if self.target_speedup else base_ms * (1 + self.latency_slack)
            if fp32_ms <= target_ms and not self.target_speedup:
                ctx.progress(f"qdq: the float model ({fp32_ms:.3f} ms) is faster than all-{base_form} "
                             f"({base_ms:.3f} ms); every site stays float (give max_size_mb to quantize for size)")
            try:
                allocation = allocate(options, target_ms - base_ms, boundaries=boundaries)
            except BudgetInfeasible as exc:
                fastest = min(anchor_ms, key=anchor_ms.get)
                measured = ", ".join(f"all-{f} {ms:.3f} ms ({fp32_ms / ms:.2f}x)" for f, ms in anchor_ms.items())
                raise BudgetInfeasible(exc.budget, exc.best_cost, (
                    f"target speed-up {self.target_speedup}x needs {target_ms:.3f} ms; the fastest assignment is "
                    f"all-{fastest} at {anchor_ms[fastest]:.3f} ms against fp32 {fp32_ms:.3f} ms "
                    f"({fp32_ms / anchor_ms[fastest]:.2f}x; measured: {measured})")) from None
            allocation = self._check_latency(allocation, options, base, build, target_ms / base_ms, ctx, feed,
                                             frontier)
        counters.update(target_ms=round(target_ms, 3))
        described = {n: f"{c:+.3f} ms, +{beta:.3f} ms per int8 neighbour (alone: +{loo[n]:.3f} ms)"
                     for n, c in keep_cost.items() if n in loo}
        described.update({t.node: "no latency cost either way" for t in tables})
        return allocation, described, base

    def _size_allocation(self, sites, menus, sensitivity, build, counters):
        """Options priced in bytes per weight element: fp32 4, int8 1, int4 0.625 (half a byte and a float scale
        per block of 32), each relative to the site's smallest. The built model's size is checked, and while it
        is over the budget the site whose next smaller option adds the least distortion per byte saved takes it."""
        per_element = {FP32: 4.0, STATIC: 1.0, DYNAMIC: 1.0, INT4: 0.5 + 4.0 / BLOCK_SIZE}
        options = []
        for s in sites:
            low = min(per_element[f] for f in menus[s.node])
            options.append(SiteOptions(s.node, tuple(Option(f, (per_element[f] - low) * s.macs, sensitivity[s.node][f])
                                                     for f in menus[s.node])))
        smallest_choice = {o.name: min(o.options, key=lambda x: (x.cost, x.distortion)) for o in options}

        def size(choice) -> int:
            return build({n: o.label for n, o in choice.items()}).byte_size()

        budget = self.max_size_mb * 1e6
        smallest = size(smallest_choice)
        if smallest > budget:
            raise BudgetInfeasible(budget, smallest, f"max_size_mb {self.max_size_mb:g} is below the smallest "
                                                     f"assignment's {smallest / 1e6:.3f} MB")
        allocation = allocate(options, budget - smallest)
        choice = dict(allocation.choice)
        while size(choice) > budget:  # the byte model is approximate: step down where it costs the least
            steps = []
            for site in options:
                current = choice[site.name]
                for o in site.options:
                    if o.cost < current.cost:
                        steps.append(((o.distortion - current.distortion) / (current.cost - o.cost), site.name, o))
            if not steps:
                break
            _, name, option = min(steps, key=lambda t: t[0])
            choice[name] = option
        counters.update(smallest_mb=round(smallest / 1e6, 4), max_size_mb=self.max_size_mb)
        allocation = Allocation(choice, sum(o.cost for o in choice.values()),
                                sum(o.distortion for o in choice.values()), allocation.budget, allocation.method)
        extra = {o.name: next(x.cost for x in o.options if x.label == FP32) for o in options}
        return allocation, {n: f"+{c / 1e6:.3f} MB over its smallest form" for n, c in extra.items()}

    def _check_latency(self, allocation, options, base, build, target_ratio: float, ctx: Context, feed, frontier):
        """Measure the chosen assignment against the base, interleaved, so that the check holds however busy the
        machine is: it must stay within `target_ratio` times the base latency. Float islands can cost more than
        the sum of their single-site costs (onnxruntime converts layouts between them and the integer kernels),
        so when the measurement misses the target, keep only the k sites that moved off their base form with the
        largest distortion saved, with k the largest that measures within the target (bisected, assuming fewer
        moves are never slower)."""
        by_label = {o.name: {x.label: x for x in o.options} for o in options}
        saved = {n: by_label[n][base[n]].distortion - o.distortion for n, o in allocation.choice.items()}
        moves = sorted((n for n, o in allocation.choice.items() if o.label != base[n]), key=saved.get, reverse=True)
        base_session = make_session(build(base), ctx.runtime)

        def assignment(k: int) -> dict[str, str]:
            return {**base, **{n: allocation.choice[n].label for n in moves[:k]}}

        def fits(k: int) -> bool:
            assign = assignment(k)
            lat = measure_latencies([base_session, make_session(build(assign), ctx.runtime)], feed, min_seconds=0.3)
            ratio = lat[1].median_ms / lat[0].median_ms
            ok = ratio <= target_ratio
            frontier.append({"moved_sites": k, "float_sites": sum(1 for f in assign.values() if f == FP32),
                             "measured_ms": round(lat[1].median_ms, 4), "base_ms": round(lat[0].median_ms, 4),
                             "ratio_to_base": round(ratio, 4), "target_ratio": round(target_ratio, 4),
                             "meets_target": ok})
            ctx.progress(f"qdq: {k} sites off the base form measure {ratio:.3f}x the base latency "
                         f"(target {target_ratio:.3f}x)")
            return ok

        k = len(moves)
        if moves and not fits(k):
            lo, hi = 0, k  # fits(lo) assumed (the base), fits(hi) is false
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            k = lo
        choice = {n: by_label[n][f] for n, f in assignment(k).items()}
        return type(allocation)(choice, sum(o.cost for o in choice.values()),
                                sum(o.distortion for o in choice.values()), allocation.budget, allocation.method)

    def _search(self, options: list[SiteOptions], boundaries, build, overrides, ctx: Context, frontier: list[dict]):
        """Bisect the latency budget for the cheapest allocation whose measured metric meets the target."""
        from ...core.numerics import compare_outputs

        selection = ctx.inputs.for_selection  # never the verification samples the report quotes
        scores = ctx.class_scores(build({}))
        reference = run(make_session(build({}), ctx.runtime), selection)

        def meets(allocation) -> bool:
            assign = {**{n: o.label for n, o in allocation.choice.items()}, **overrides}
            metrics = compare_outputs(reference, run(make_session(build(assign), ctx.runtime), selection), scores)
            agreement = min((m.top1_agreement for m in metrics if m.top1_agreement is not None), default=None)
            error = max(m.rel_l2 for m in metrics)
            ok = (self.max_error is None or error <= self.max_error) and \
                 (self.min_agreement is None or (agreement is not None and agreement >= self.min_agreement))
            frontier.append({"budget_ms": round(allocation.budget, 4),
                             "float_sites": sum(1 for f in assign.values() if f == FP32),
                             "predicted_distortion": allocation.distortion, "rel_l2": error,
                             "top1_agreement": agreement, "meets_target": ok})
            ctx.progress(f"qdq: budget +{allocation.budget:.3f} ms -> rel L2 {error:.4f}"
                         + (f", agreement {agreement:.2%}" if agreement is not None else ""))
            return ok

        lo = 0.0  # the base: every site in its base form
        hi = sum(max(0.0, max(x.cost for x in o.options)) for o in options) + sum(b.cost for b in boundaries)
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

    def _decision(self, s: QuantSite, label, sensitivity: dict[str, float], keep_cost, methods, plan, ran,
                  note: str | None) -> Decision:
        forms = ", ".join(f"{f} {v:.3g}" for f, v in sensitivity.items() if f != FP32)
        parts = [f"sensitivity {forms}", f"float: {keep_cost[s.node]}"]
        if label == STATIC and s.activation in methods:
            parts.append(f"input range by {methods[s.activation]}")
        if label != FP32:
            parts.append(f"ORT runs {ran.get(s.node, 'it fused away')}")
        if label == INT4 and s.op_type == "MatMul":
            parts.append(f"accuracy level {self.int4_accuracy_level}"
                         + (" (activations rounded to int8 per block, included in the sensitivity)"
                            if self.int4_accuracy_level == 4 else " (fp32 activations)"))
        if label != FP32 and self.rounding == "gptq" and s.op_type != "Gather":
            parts.append("GPTQ rounding")
        if note and label != FP32:
            parts.append(note)
        if label == STATIC and s.node in plan.bias_shift:
            parts.append(f"bias corrected (mean shift up to {np.abs(plan.bias_shift[s.node]).max():.2g})")
        if s.node in plan.bias_adjusted:
            parts.append(f"weight scale raised on {plan.bias_adjusted[s.node]} channels for the int32 bias")
        return Decision(s.node, label, "; ".join(parts))

    def _overrides(self, menus: dict[str, tuple[str, ...]]) -> dict[str, str]:
        if not self.overrides:
            return {}
        path = Path(self.overrides)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read overrides: {exc}") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a JSON object {{site: precision}}")
        bad = {k: v for k, v in data.items() if k not in menus or v not in menus[k]}
        if bad:
            offered = "; ".join(f"{k}: {', '.join(menus[k])}" for k in bad if k in menus)
            raise UsageError(f"{path}: unknown sites or forms not on their menu {bad} (precisions: "
                             f"{', '.join(PRECISIONS)}{'; offered ' + offered if offered else ''})")
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

