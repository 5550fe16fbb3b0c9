"""LayerMerge depth compression: which activations and convs to remove, chosen by a segment DP on measured tables.

Steps: find chains, positions, skips, breaks and valid spans (spans.py); give every span its candidates (keep the
unit; merge the span into one conv of kernel K; drop a whole residual block); time each candidate in onnxruntime
(T) and measure the output distortion of the model with only that span replaced, the merged conv refitted by
least squares to the original span's output (I); solve min sum I subject to sum T <= budget by the segment DP of
the shared allocator; build the model, measure its latency, and tighten the budget when the tables' sum
under-predicted it. `recover` afterwards trains the merged model back towards the original.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np
from onnx import numpy_helper

from ...analysis.allocate import BudgetInfeasible, Option, Segment, allocate_segments
from ...core.capture import stream_tensors
from ...core.editing import has_subgraph
from ...core.errors import UsageError
from ...core.model import Model
from ...core.numerics import output_distortion
from ...core.runtime import make_session, measure_latencies, run
from ..base import Context, Decision, Pass, PassResult, progress_bar, register, speedup_levels
from .build import Replacement, apply
from .merge import ConvMap, MergePlan, centre, compose_span, plans_for, refit
from .spans import Chain, Structure, find_structure
from .tables import LatencyTable

MENUS = ("merge", "exact", "blocks")


@dataclass
class Candidate:
    """One option of one span: what it does, what it costs (T) and what it loses (I)."""

    chain: int
    st: int
    end: int
    kind: str  # keep | merge | drop
    plan: MergePlan | None = None
    conv: ConvMap | None = None
    ms: float = 0.0
    distortion: float = 0.0
    refitted: bool = False
    macs: float = 0.0

    @property
    def label(self) -> str:
        if self.kind == "keep":
            return "keep"
        if self.kind == "drop":
            return "drop block"
        return self.plan.label

    def replacement(self) -> Replacement | None:
        if self.kind == "keep":
            return None
        return Replacement(self.chain, self.st, self.end, self.kind, self.conv,
                           bool(self.plan and self.plan.depthwise))


@register
@dataclass(frozen=True)
class LayerMerge(Pass):
    """Merge spans of convs across removed activations (LayerMerge), chosen by DP under a measured latency budget."""

    name = "layermerge"
    description = "depth compression: merge conv spans, drop activations/blocks, DP on measured latency (lossy)"
    exact = False

    search_role: ClassVar[str] = "structure"

    @classmethod
    def search_levels(cls, speedup, size_mb, floor):
        return [cls(target_speedup=s) for s in speedup_levels(speedup)]

    # measured onnxruntime speed-up at the latency batch; default 1.5, and for menu=exact none (the fastest exact cover)
    target_speedup: float | None = None
    max_latency_ms: float | None = None  # replaces target_speedup
    menu: str = "merge"  # merge (LayerMerge) | exact (only merges that remove no activation) | blocks (depth pruning)
    max_units: int = 6  # longest span, in units
    max_kernel: int = 7  # largest merged kernel
    max_mac_growth: float = 4.0  # skip merged convs with more than this many times the span's MACs
    refit: bool = True  # least-squares refit of lossy merged convs to the original span's output
    ridge: float = 1e-3  # ridge strength of the refit, towards the composed kernel, relative to mean diag(X^T X)
    fit_samples: int = 64  # calibration samples for the refit (fewer when their activations would not fit in memory)
    sensitivity_samples: int = 8  # samples the importance table (fit) and each build (selection) are judged on
    refit_rows: int = 16384  # output positions x samples per refit
    cache_dir: str | None = None  # where the latency table is cached (default ~/.cache/graphopt)

    def __post_init__(self):
        if self.menu not in MENUS:
            raise ValueError(f"menu must be one of {', '.join(MENUS)}, got {self.menu!r}")
        if self.target_speedup is None and self.max_latency_ms is None and self.menu != "exact":
            object.__setattr__(self, "target_speedup", 1.5)
        if self.target_speedup is not None and not self.target_speedup > 1:
            raise ValueError(f"target_speedup must be above 1, got {self.target_speedup}")
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise ValueError(f"max_latency_ms must be positive, got {self.max_latency_ms}")
        if self.max_units < 1 or self.max_kernel < 1 or not self.max_mac_growth > 0:
            raise ValueError("max_units and max_kernel must be >= 1, max_mac_growth > 0")
        if self.fit_samples < 1 or self.sensitivity_samples < 1 or self.refit_rows < 16:
            raise ValueError("fit_samples and sensitivity_samples must be >= 1, refit_rows >= 16")

    def preflight(self, model: Model, inputs) -> None:
        sub = next((n for n in model.graph.node if has_subgraph(n)), None)
        if sub is not None:
            raise UsageError(f"layermerge does not handle models with control flow: {sub.op_type} node {sub.name!r} "
                             "holds a subgraph")
        if not any(n.op_type == "Conv" for n in model.graph.node):
            raise UsageError("layermerge needs a CNN: this model has no Conv node")
        if inputs is not None and inputs.synthetic:
            raise UsageError("layermerge measures importance and refits on real data: give calibration samples "
                             "(--calib)")

    # ------------------------------------------------------------------------------------------------- run
    def run(self, model: Model, ctx: Context) -> PassResult:
        self.preflight(model, ctx.inputs)
        structure = find_structure(model, self.max_units)
        chains = structure.chains
        if not chains:
            raise UsageError("layermerge found no conv it can merge: " + "; ".join(structure.notes[:3]))
        ctx.progress(f"layermerge: {len(chains)} chains, {sum(c.length for c in chains)} positions, "
                     f"{len(structure.spans)} valid spans")
        latency_feed = ctx.latency_feed(model)
        shapes = _shapes(model, chains, latency_feed, ctx)
        candidates = self._candidates(structure, shapes)
        table = LatencyTable(ctx.runtime, None if self.cache_dir is None else Path(self.cache_dir))
        self._time(model, chains, candidates, shapes, table, ctx)
        table.save()
        original = make_session(model, ctx.runtime)
        whole = measure_latencies([original], latency_feed, warmup=5, repeats=30, min_seconds=0.5,
                                  max_seconds=4.0)[0].median_ms
        keep_ms = sum(c.ms for c in candidates if c.kind == "keep")
        # what lies outside the chains; isolated timings and a whole model disagree by more than this on a busy
        # machine, so it is clipped and the measured builds correct the rest
        rest = min(max(whole - keep_ms, 0.0), 0.5 * whole)
        self._importance(model, chains, candidates, ctx.inputs.fit, ctx)
        chosen, result, probes = self._choose(model, chains, candidates, keep_ms, rest, whole, latency_feed, ctx)
        changed = any(c.kind != "keep" for c in chosen)
        best = next(p for p in probes if p.get("chosen"))
        counters = {"chains": len(chains), "positions": sum(c.length for c in chains),
                    "valid_spans": len(structure.spans), "candidates": len(candidates),
                    "merged_spans": sum(c.kind == "merge" for c in chosen),
                    "dropped_blocks": sum(c.kind == "drop" for c in chosen),
                    "removed_activations": sum(_removed_acts(chains[c.chain], c) for c in chosen),
                    "removed_convs": sum(_removed_convs(chains[c.chain], c) for c in chosen),
                    "latency_before_ms": round(best.get("original_ms", whole), 4),
                    "latency_after_ms": round(best.get("measured_ms", whole), 4),
                    "speedup": round(best.get("speedup", 1.0), 3),
                    "predicted_distortion": round(sum(c.distortion for c in chosen), 6),
                    "table_entries": len(candidates), "latency_cache_hits": table.hits,
                    "latency_timed": table.misses,
                    "latency_table_error": round(float(np.mean([abs(p["latency_error"]) for p in probes])), 4),
                    "distortion_table_ratio": round(best["composite_distortion"] / max(best["table_distortion"],
                                                                                       1e-12), 3)}
        decisions = []
        for c in chosen:
            if c.kind == "keep" and c.end - c.st == 1:
                continue
            decisions.append(Decision(_span_label(chains[c.chain], c), c.kind if c.kind != "merge" else "merged",
                                      _describe(chains[c.chain], c)))
        details = {"structure": structure.summary(), "probes": probes,
                   "chosen": [_row(chains, c) for c in chosen],
                   "table": [_row(chains, c) for c in candidates],
                   "latency_rest_ms": round(rest, 4), "latency_overhead_ms": round(table.overhead_ms(), 4)}
        return PassResult(result, changed, counters, decisions, details)

    # ------------------------------------------------------------------------------------------ candidates
    def _candidates(self, structure: Structure, shapes: dict) -> list[Candidate]:
        """Per span: keep (one unit as it is), merge (per plan, menu=merge; only exact plans, menu=exact) and drop
        (a whole residual block with an identity shortcut; menus merge and blocks)."""
        out = []
        for span in structure.spans:
            c = structure.chains[span.chain]
            st, end = span.st, span.end
            base = _span_macs(c, st, end, shapes)
            if end - st == 1:
                out.append(Candidate(span.chain, st, end, "keep", macs=base))
            if self.menu != "blocks":
                full = compose_span(c, st, end)
                for plan in plans_for(c, st, end, self.max_kernel):
                    if (end - st == 1 and plan.kernel == c.units[st].conv.kernel) or (
                            self.menu == "exact" and not plan.exact):
                        continue  # the unit as it is (the keep candidate), or a lossy plan on the exact menu
                    conv = centre(full, plan.kernel)
                    if conv is None:
                        continue
                    macs = _map_macs(conv, plan.depthwise, shapes[c.position(end)])
                    if macs <= self.max_mac_growth * base:
                        out.append(Candidate(span.chain, st, end, "merge", plan, conv, macs=macs))
            if self.menu != "exact" and (st, end) in c.skips() and c.units[end - 1].projection is None:
                out.append(Candidate(span.chain, st, end, "drop"))
        return out

    def _time(self, model, chains, candidates, shapes, table: LatencyTable, ctx) -> None:
        inits = model.initializers()
        nodes = {n.name: n for n in model.graph.node}
        for i, cand in enumerate(candidates, start=1):
            c = chains[cand.chain]
            last = c.units[cand.end - 1]
            act = nodes[last.act] if last.act else None
            consts = {t: numpy_helper.to_array(inits[t]) for t in (act.input[1:] if act else []) if t in inits}
            in_shape = shapes[c.position(cand.st)]
            keeps_add = bool(last.add) and not (last.skip_from is not None and last.skip_from >= cand.st)
            if cand.kind == "keep":
                conv = last.conv
                ms = table.conv_ms(in_shape, conv.weight.shape, conv.strides, conv.pads, conv.group, bool(last.add),
                                   act, consts)
            elif cand.kind == "drop":
                ms = table.conv_ms(in_shape, None, None, None, 1, False, act, consts) if act else 0.0
            else:
                w = cand.conv.onnx_weight(cand.plan.depthwise)
                ms = table.conv_ms(in_shape, w.shape, cand.conv.strides, cand.conv.pads,
                                   w.shape[0] if cand.plan.depthwise else 1, keeps_add, act, consts)
            for t in range(cand.st + 1, cand.end + 1):  # a projection shortcut the span does not fold stays
                u = c.units[t - 1]
                if u.projection is not None and (cand.kind == "keep" or u.skip_from < cand.st):
                    p = u.projection
                    ms += table.conv_ms(shapes[c.position(u.skip_from)], p.weight.shape, p.strides, p.pads, p.group,
                                        False, None, {})
            cand.ms = ms
            if i % 10 == 0 or i == len(candidates):
                ctx.progress(f"layermerge: latency table {progress_bar(i, len(candidates))} {i}/{len(candidates)} "
                             f"({table.hits} cached)")

    def _importance(self, model, chains, candidates, fit, ctx) -> None:
        lossy = [c for c in candidates if c.kind != "keep"]
        if not lossy:
            return
        probe = fit[: self.sensitivity_samples]
        reference = run(make_session(model, ctx.runtime), probe)
        scores = ctx.class_scores(model)
        acts = self._activations(model, chains, lossy, fit, ctx) if self.refit else {}
        for i, cand in enumerate(lossy, start=1):
            if cand.kind == "merge" and self.refit and not cand.plan.exact:
                c = chains[cand.chain]
                xs = acts[c.position(cand.st)]
                ys = acts[_target(c, cand.st, cand.end)]
                cand.conv, cand.refitted = refit(cand.conv, cand.plan.depthwise, xs, ys, rows=self.refit_rows,
                                                 ridge=self.ridge)
            candidate = apply(model, chains, [cand.replacement()])
            cand.distortion = output_distortion(reference, run(make_session(candidate, ctx.runtime), probe), scores)
            if i % 5 == 0 or i == len(lossy):
                ctx.progress(f"layermerge: importance table {progress_bar(i, len(lossy))} {i}/{len(lossy)}")

    def _activations(self, model, chains, lossy, fit, ctx) -> dict[str, list[np.ndarray]]:
        """The refit's inputs and targets on calibration samples, as many samples as fit in about 1 GB."""
        wanted = set()
        for cand in lossy:
            if cand.kind == "merge" and not cand.plan.exact:
                c = chains[cand.chain]
                wanted |= {c.position(cand.st), _target(c, cand.st, cand.end)}
        wanted -= set(model.input_names())
        names = sorted(wanted)
        out: dict[str, list[np.ndarray]] = {n: [] for n in names}
        inputs = {n: [] for n in model.input_names() if any(c.input == n for c in chains)}
        budget, used = 1 << 30, 0
        for feed, values in stream_tensors(model, names, fit[: self.fit_samples], settings=ctx.runtime):
            for n, v in values.items():
                out[n].append(v)
                used += v.nbytes
            for n in inputs:
                out.setdefault(n, []).append(feed[n])
            if used > budget:
                break
        ctx.progress(f"layermerge: refit activations of {len(next(iter(out.values()), []))} samples "
                     f"({used / 1e6:.0f} MB)")
        return out

    def _refit_in_sequence(self, model, chains, chosen, ctx) -> tuple[list[Candidate], Model]:
        """Refit the chosen merged convs again, in order, each from the activations the merged model really feeds
        it (the earlier spans already merged) to the original span's output, so that errors do not compound
        (the table's fits all read the original activations). Returns new candidates, so the table keeps its own."""
        chosen = [dataclasses.replace(c) for c in chosen]
        feeds = ctx.inputs.fit[: self.fit_samples]
        result = apply(model, chains, [r for r in (x.replacement() for x in chosen) if r is not None])
        for cand in chosen:
            if not cand.refitted:
                continue
            c = chains[cand.chain]
            x_name, y_name = c.position(cand.st), _target(c, cand.st, cand.end)
            ys = _bounded(v[y_name] for _, v in stream_tensors(model, [y_name], feeds, settings=ctx.runtime))
            xs = [feed[x_name] for feed in feeds[:len(ys)]] if x_name in model.input_names() else \
                [v[x_name] for _, v in stream_tensors(result, [x_name], feeds[:len(ys)], settings=ctx.runtime)]
            start = centre(compose_span(c, cand.st, cand.end), cand.plan.kernel)
            cand.conv, _ = refit(start, cand.plan.depthwise, xs, ys, rows=self.refit_rows, ridge=self.ridge)
            result = apply(model, chains, [r for r in (x.replacement() for x in chosen) if r is not None])
        return chosen, result

    def _choose(self, model, chains, candidates, keep_ms, rest, whole, feed, ctx):
        """Solve the DP for a budget, build the model, measure it against the original (interleaved), and correct
        the budget by the measured shortfall or slack: the tables are timed in isolation, so their sum predicts a
        whole model only roughly. Among the builds that meet the target, the least distortion on the selection
        samples wins."""
        offsets, total = [], 0
        for c in chains:
            offsets.append(total)
            total += c.length
        by_span: dict[tuple, list] = {}
        for i, cand in enumerate(candidates):
            by_span.setdefault((offsets[cand.chain] + cand.st, offsets[cand.chain] + cand.end), []).append(i)
        fastest_only = self.target_speedup is None and self.max_latency_ms is None  # exact menu, no budget
        segments = [Segment(a, b, tuple(Option(str(i), candidates[i].ms,
                                               candidates[i].ms if fastest_only else candidates[i].distortion)
                                        for i in idx))
                    for (a, b), idx in by_span.items()]
        original = make_session(model, ctx.runtime)
        selection = ctx.inputs.for_selection[: self.sensitivity_samples]
        reference = run(original, selection)
        scores = ctx.class_scores(model)
        if fastest_only:
            target = None
        elif self.max_latency_ms is not None:
            target = whole / self.max_latency_ms  # as a speed-up over the original measured now
        else:
            target = self.target_speedup
        aim = target or 1e9  # the predicted speed-up asked of the DP; corrected after each build
        probes, met = [], []
        seen = set()
        for attempt in range(8):
            # fastest only: every option's "distortion" is its cost, so any budget above the original's finds the
            # fastest cover
            budget = 2 * keep_ms + 1e-9 if fastest_only else (keep_ms + rest) / aim - rest
            try:
                alloc = allocate_segments(total, segments, budget if budget > 0 else 1e-12)
            except BudgetInfeasible as exc:
                if attempt == 0:
                    fastest = (keep_ms + rest) / (exc.best_cost + rest)
                    raise BudgetInfeasible(1 / target, 1 / fastest, (
                        f"layermerge: {target:.2f}x is out of reach: the fastest choice among the "
                        f"{len(candidates)} table entries predicts {fastest:.2f}x; best reachable speed-up about "
                        "that")) from None
                break
            chosen = [candidates[int(o.label)] for _, o in alloc.choice]
            key = tuple(id(c) for c in chosen)
            if key in seen:
                break
            seen.add(key)
            built = apply(model, chains, [r for r in (c.replacement() for c in chosen) if r is not None])
            # the importance table's additivity: this composite with the table's own fits, against the sum
            composite = output_distortion(reference, run(make_session(built, ctx.runtime), selection), scores)
            if self.refit and any(c.refitted for c in chosen):
                chosen, built = self._refit_in_sequence(model, chains, chosen, ctx)
            session = make_session(built, ctx.runtime)
            lat = measure_latencies([original, session], feed, warmup=5, repeats=30, min_seconds=1.0,
                                    max_seconds=6.0)
            speedup = first = lat[0].median_ms / lat[1].median_ms
            if target is not None and speedup >= target:
                # confirm on a longer interleaved run: the builds that meet the target on one short measurement
                # include lucky ones, and the least distorted of those would be picked
                lat = measure_latencies([original, session], feed, warmup=5, repeats=100, min_seconds=3.0,
                                        max_seconds=10.0)
                speedup = lat[0].median_ms / lat[1].median_ms
            predicted = (keep_ms + rest) / (alloc.cost + rest)
            distortion = output_distortion(reference, run(session, selection), scores)
            probes.append({"predicted_speedup": round(predicted, 3), "speedup": round(speedup, 3),
                           "first_speedup": round(first, 3),
                           "table_ms": round(alloc.cost + rest, 4), "original_ms": round(lat[0].median_ms, 4),
                           "measured_ms": round(lat[1].median_ms, 4),
                           # the tables' additivity: their predicted speed-up against the measured one (a ratio
                           # of two interleaved timings, so the machine's drift since the tables cancels)
                           "latency_error": round(predicted / speedup - 1, 4),
                           "table_distortion": round(sum(c.distortion for c in chosen), 6),
                           "composite_distortion": round(composite, 6),
                           "selection_distortion": round(distortion, 6),  # after the refit in sequence
                           "spans_changed": sum(c.kind != "keep" for c in chosen)})
            ctx.progress(f"layermerge: build {attempt + 1}: {probes[-1]['spans_changed']} spans changed, predicted "
                         f"{predicted:.2f}x, measured {speedup:.2f}x ({lat[0].median_ms:.3f} -> "
                         f"{lat[1].median_ms:.3f} ms), distortion {distortion:.3g} (table sum "
                         f"{probes[-1]['table_distortion']:.3g}, as built {composite:.3g})")
            if fastest_only:
                met.append((distortion, len(probes) - 1, chosen, built))
                break
            if speedup >= target:
                met.append((distortion, len(probes) - 1, chosen, built))
                if speedup <= target * 1.05:
                    break
            # what the tables must promise for `target`: their over-promise so far (geometric mean over the builds,
            # steadier than the last one alone on a noisy machine), times the target
            ratios = [p["predicted_speedup"] / p["speedup"] for p in probes]
            aim = max(1.0 + 1e-6, target * float(np.exp(np.mean(np.log(ratios)))))
        if not met:
            best = max(probes, key=lambda p: p["speedup"]) if probes else None
            reach = f"{best['speedup']:.2f}x measured" if best else "nothing"
            raise BudgetInfeasible(1 / target, 1 / best["speedup"] if best else 1.0, (
                f"layermerge: the target {target:.2f}x was not met in {len(probes)} builds; best reachable: "
                f"{reach} (the builds are in the JSON report)"))
        distortion, index, chosen, built = min(met, key=lambda m: m[0])
        probes[index]["chosen"] = True
        return chosen, built, probes


# ------------------------------------------------------------------------------------------------- helpers
def _bounded(arrays) -> list[np.ndarray]:
    """As many of the arrays as fit in half a gigabyte (at least one): the refit's samples, bounded in memory."""
    out, used = [], 0
    for a in arrays:
        out.append(a)
        used += a.nbytes
        if used > 1 << 29:
            break
    return out


def _target(c: Chain, st: int, end: int) -> str:
    """The tensor a merged span's conv must reproduce: before the activation, and before an Add it keeps."""
    u = c.units[end - 1]
    if u.add and (u.skip_from is None or u.skip_from < st):
        return u.conv_output
    return u.pre_act


def _shapes(model: Model, chains: list[Chain], feed, ctx) -> dict[str, tuple]:
    names = set()
    for c in chains:
        names |= {c.position(j) for j in range(c.length + 1)}
    names -= set(feed)
    shapes = {k: tuple(v.shape) for k, v in feed.items()}
    for _, values in stream_tensors(model, sorted(names), [feed], settings=ctx.runtime):
        shapes.update({k: tuple(v.shape) for k, v in values.items()})
    return shapes


def _map_macs(m: ConvMap, depthwise: bool, out_shape: tuple) -> float:
    per_pixel = m.weight.shape[0] * m.kernel[0] * m.kernel[1] * (1 if depthwise else m.weight.shape[1])
    return float(per_pixel * np.prod(out_shape[2:]) * out_shape[0])


def _span_macs(c: Chain, st: int, end: int, shapes: dict) -> float:
    total = 0.0
    for t in range(st + 1, end + 1):
        for conv in filter(None, (c.units[t - 1].conv, c.units[t - 1].projection)):
            out = shapes[c.position(t)]
            total += conv.cout * conv.kernel[0] * conv.kernel[1] * (conv.cin // conv.group) * np.prod(out[2:]) * out[0]
    return total


def _removed_acts(c: Chain, cand: Candidate) -> int:
    """Activations inside the span (the one at its end stays)."""
    return 0 if cand.kind == "keep" else sum(1 for u in c.units[cand.st:cand.end - 1] if u.act)


def _removed_convs(c: Chain, cand: Candidate) -> int:
    if cand.kind == "keep":
        return 0
    n = cand.end - cand.st
    return n if cand.kind == "drop" else n - 1


def _span_label(c: Chain, cand: Candidate) -> str:
    return f"({cand.st}, {cand.end}] {c.units[cand.st].conv.node} .. {c.units[cand.end - 1].conv.node}"


def _describe(c: Chain, cand: Candidate) -> str:
    kernels = "+".join(f"{u.conv.kernel[0]}x{u.conv.kernel[1]}" + ("dw" if u.conv.depthwise else "")
                       for u in c.units[cand.st:cand.end])
    what = {"drop": "whole residual block dropped", "keep": "kept"}.get(cand.kind) or (
        f"{kernels} -> {cand.plan.label}" + (", refitted" if cand.refitted else "")
        + (f", {_removed_acts(c, cand)} activations removed" if _removed_acts(c, cand) else ""))
    return f"{what}; table T {cand.ms:.4f} ms, I (distortion) {cand.distortion:.3g}"


def _row(chains, cand: Candidate) -> dict:
    return {"chain": cand.chain, "st": cand.st, "end": cand.end, "option": cand.label, "ms": round(cand.ms, 5),
            "distortion": round(cand.distortion, 6), "macs": cand.macs, "refitted": cand.refitted}


__all__ = ["LayerMerge", "Candidate"]
