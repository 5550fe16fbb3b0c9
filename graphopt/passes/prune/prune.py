"""Structured pruning (OTO-style): remove whole channel groups and attention heads, build the smaller network.

Steps: find the channel groups (`channel_groups`); rank the channels inside each group by an importance
(`magnitude`: producer weight L2 norm, normalised per layer; `activation`: mean |activation| x the consumer's
weight norm, from calibration data); give every prunable group a few options (how many channels it keeps) with a
cost (MACs, parameters or channels left: exact per group, bilinear between adjacent groups, corrected by
re-allocating) and a distortion (the sum of the removed importance, or with `importance=distortion` the output
distortion measured in onnxruntime when only that group is cut); let the shared allocator pick the least
distortion within the budget; build the pruned model exactly, folding each removed channel's mean into the
consumer's bias; then re-fit each consumer by ridge least squares on calibration activations so that its output
matches the original layer's output. `target_speedup` searches the MAC budget whose measured latency meets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from onnx import helper, numpy_helper

from ...analysis.allocate import BudgetInfeasible, Option, SiteOptions, allocate
from ...core.capture import stream_tensors
from ...core.conv import conv_patches
from ...core.editing import add_initializer, all_names, new_node, node_attrs, node_inputs, unique_name
from ...analysis.channel_groups import ChannelGroups, analyse
from ...core.errors import UsageError
from ...core.model import Model
from ...core.numerics import output_distortion
from .build import build, positions
from ...core.runtime import make_session, measure_latencies, run
from ..base import Context, Decision, Pass, PassResult, register, speedup_levels

IMPORTANCES = ("magnitude", "activation", "distortion")
TARGETS = ("macs", "params", "channels")


@register
@dataclass(frozen=True)
class Prune(Pass):
    """Remove the least important channels and heads of every prunable channel group within a budget."""

    name = "prune"
    description = "structured channel / head pruning from channel groups, with least-squares refit (lossy)"
    exact = False

    ratio: float = 0.3  # fraction of the target (MACs, parameters or channels) to remove
    target: str = "macs"  # macs | params | channels
    target_speedup: float | None = None  # measured ORT latency target; replaces ratio
    importance: str = "distortion"  # magnitude | activation | distortion
    round_to: int = 1  # kept channels a multiple of this (8 suits SIMD kernels)
    levels: int = 8  # options per group: keep 1, (levels-1)/levels, ..., 1/levels of it
    refit: bool = True  # ridge least-squares refit of the consumers of pruned channels
    ridge: float = 1e-3  # ridge strength, relative to the mean diagonal of X^T X
    calibration_samples: int = 32
    sensitivity_samples: int = 8
    refit_rows: int = 8192  # rows (positions x samples) per consumer for the refit

    search_role: ClassVar[str] = "structure"

    @classmethod
    def search_levels(cls, speedup, size_mb, floor):
        return [cls(target_speedup=s) for s in speedup_levels(speedup)]

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"unknown importance {self.importance!r}; known: {', '.join(IMPORTANCES)}")
        if self.target_speedup is not None and not self.target_speedup > 1:
            raise ValueError(f"target_speedup must be above 1, got {self.target_speedup}")
        if self.round_to < 1 or self.levels < 2:
            raise ValueError("round_to must be at least 1 and levels at least 2")
        if self.calibration_samples < 1 or self.sensitivity_samples < 1 or self.refit_rows < 16:
            raise ValueError("calibration_samples and sensitivity_samples must be >= 1, refit_rows >= 16")
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")

    # ------------------------------------------------------------------------------------------------- run
    def run(self, model: Model, ctx: Context) -> PassResult:
        cg = analyse(model)
        groups = cg.groups()
        prunable = [g for g in groups if g.prunable]
        decisions = [Decision(_label(g), "frozen", "; ".join(g.reasons)) for g in groups if g.frozen]
        ctx.progress(f"prune: {len(groups)} channel groups, {len(prunable)} prunable ({cg.seconds:.2f} s)")
        if not groups:  # no Conv/Gemm/MatMul with a constant weight: nothing this pass could ever remove
            return PassResult(model, False, decisions=[Decision("model", "skipped", "no channel groups (no "
                                                                "Conv/Gemm/MatMul with a constant weight)")])
        if not prunable:
            raise BudgetInfeasible(
                0.0, 0.0, f"no channel group can be pruned ({len(groups)} groups, all frozen: see `graphopt "
                          "inspect`); best reachable: no reduction")
        needs_data = self.importance != "magnitude" or self.refit
        if needs_data and (ctx.inputs is None or ctx.inputs.synthetic):
            raise UsageError(f"prune with importance={self.importance}"
                             + (" and refit" if self.refit else "") + " needs real calibration data (--calib); "
                             "use importance=magnitude,refit=false to prune without data")
        feeds = (ctx.inputs.fit[: self.calibration_samples] if ctx.inputs else [])
        shape_feed = feeds[0] if feeds else (ctx.latency_feed(model) if ctx.inputs else None)  # for MAC counts
        if shape_feed is None:
            raise UsageError("prune needs at least one input sample (for tensor shapes)")
        costs = Costs(model, cg, shape_feed, ctx)
        stats = _activation_stats(model, cg, prunable, feeds, ctx) if feeds else {}
        order = {g.id: _ranking(cg, g, stats, self.importance) for g in prunable}
        options = {g.id: self._options(g) for g in prunable}
        distortion = self._distortions(model, cg, prunable, order, options, stats, feeds, ctx)

        def keep_for(choice: dict[int, int]) -> dict[int, np.ndarray]:
            return {gid: _kept(order[gid], cg.group(gid).block, k) for gid, k in choice.items()
                    if k < cg.group(gid).size}

        kind = "macs" if self.target_speedup is not None else self.target
        total = costs.total(kind, {})
        floor_choice = {g.id: min(options[g.id]) for g in prunable}
        floor = costs.total(kind, keep_for(floor_choice))
        fill = {t: v["mean"] for t, v in stats.items()}
        measured: dict = {}
        if self.target_speedup is None:
            budget = (1 - self.ratio) * total
            if floor > budget * (1 + 1e-9):
                raise BudgetInfeasible(budget, floor, (
                    f"removing {self.ratio:.0%} of the {kind} is out of reach: pruning every prunable group to its "
                    f"minimum leaves {floor / total:.1%} ({len(groups) - len(prunable)} of {len(groups)} groups "
                    f"frozen); best reachable: {1 - floor / total:.1%} fewer {kind}"))
            choice = self._allocate(costs, kind, budget, prunable, options, distortion, keep_for)
        else:
            choice = self._search_speedup(model, costs, prunable, options, distortion, keep_for, fill, cg,
                                          ctx.latency_feed(model), ctx, measured, floor_choice)
        keep = keep_for(choice)
        result = build(model, cg, keep, fill)
        if self.refit and keep:
            result = refit(model, result, cg, keep, feeds, ctx, self.ridge, self.refit_rows)
        counters, details = self._report(model, result, cg, costs, keep, choice, order, stats, distortion,
                                         shape_feed, ctx, measured)
        for g in prunable:
            k = choice[g.id]
            decisions.append(Decision(_label(g), "pruned" if k < g.size else "kept",
                                      f"{g.size} -> {k} channels" + (f" (heads of {g.block})" if g.block > 1 else "")
                                      + f"; predicted distortion {distortion[g.id].get(k, 0.0):.3g}"))
        return PassResult(result, bool(keep), counters, decisions, details)

    # -------------------------------------------------------------------------------------------- options
    def _options(self, g) -> list[int]:
        """Kept-channel counts offered for a group: whole blocks, multiples of round_to when it divides."""
        unit = np.lcm(g.block, self.round_to) if g.size % np.lcm(g.block, self.round_to) == 0 else g.block
        blocks = g.size // unit
        out = {g.size}
        for i in range(1, self.levels):
            kept = int(round(blocks * (self.levels - i) / self.levels)) * unit
            if kept >= unit:
                out.add(kept)
        return sorted(out, reverse=True)

    def _distortions(self, model, cg, prunable, order, options, stats, feeds, ctx) -> dict[int, dict[int, float]]:
        out: dict[int, dict[int, float]] = {}
        if self.importance != "distortion":
            for g in prunable:
                importance = _channel_scores(cg, g, stats, self.importance)
                total = float(importance.sum()) or 1.0
                ranked = importance[order[g.id]]  # least important first
                out[g.id] = {k: float(ranked[: g.size - k].sum() / total) for k in options[g.id]}
            return out
        probe = feeds[: self.sensitivity_samples]
        reference = run(make_session(model, ctx.runtime), probe)
        fill = {t: v["mean"] for t, v in stats.items() if isinstance(t, str)}
        n = sum(len(options[g.id]) - 1 for g in prunable)
        scores = ctx.class_scores(model)
        ctx.progress(f"prune: measuring the distortion of {n} single-group cuts on {len(probe)} samples")
        for g in prunable:
            out[g.id] = {g.size: 0.0}
            for k in options[g.id][1:]:
                candidate = build(model, cg, {g.id: _kept(order[g.id], g.block, k)}, fill)
                out[g.id][k] = output_distortion(reference, run(make_session(candidate, ctx.runtime), probe), scores)
            # a bigger cut never costs less: keep the curve monotone against measurement noise
            ks = sorted(out[g.id], reverse=True)
            for a, b in zip(ks, ks[1:]):
                out[g.id][b] = max(out[g.id][b], out[g.id][a])
        return out

    def _allocate(self, costs, kind, budget, prunable, options, distortion, keep_for) -> dict[int, int]:
        """Minimum predicted distortion within the budget. Costs are exact per group and bilinear between groups;
        the linear model overestimates what two adjacent cuts save, so tighten and re-allocate until exact."""
        coef = costs.coefficients(kind)
        full_total = costs.total(kind, {})
        base = full_total - sum(coef[g.id] * g.size for g in prunable)
        target = budget
        choice = None
        for _ in range(12):
            sites = [SiteOptions(str(g.id), tuple(Option(str(k), coef[g.id] * k, distortion[g.id][k])
                                                  for k in options[g.id]))
                     for g in prunable]
            try:
                alloc = allocate(sites, target - base)
            except BudgetInfeasible:
                break
            choice = {int(name): int(o.label) for name, o in alloc.choice.items()}
            exact = costs.total(kind, keep_for(choice))
            if exact <= budget * (1 + 1e-9):
                return choice
            target -= (exact - budget) * 1.05
        # last resort: cut greedily from the allocator's answer (or the floor) until the budget holds
        choice = choice or {g.id: options[g.id][0] for g in prunable}
        while costs.total(kind, keep_for(choice)) > budget * (1 + 1e-9):
            best = None
            for g in prunable:
                k = choice[g.id]
                smaller = [x for x in options[g.id] if x < k]
                if not smaller:
                    continue
                d = distortion[g.id][smaller[0]] - distortion[g.id][k]
                gain = coef[g.id] * (k - smaller[0])
                score = d / max(gain, 1e-30)
                if best is None or score < best[0]:
                    best = (score, g.id, smaller[0])
            if best is None:
                break
            choice[best[1]] = best[2]
        return choice

    def _search_speedup(self, model, costs, prunable, options, distortion, keep_for, fill, cg, feed, ctx,
                        measured, floor_choice) -> dict[int, int]:
        """Bisect the MAC budget: the least pruning whose measured speed-up meets target_speedup."""
        original = make_session(model, ctx.runtime)
        total = costs.total("macs", {})

        def speedup(choice) -> float:
            candidate = build(model, cg, keep_for(choice), fill)
            lat = measure_latencies([original, make_session(candidate, ctx.runtime)], feed, warmup=5, repeats=30,
                                    min_seconds=0.3, max_seconds=3.0)
            s = lat[0].median_ms / lat[1].median_ms
            measured.setdefault("probes", []).append(
                {"macs_ratio": round(costs.total("macs", keep_for(choice)) / total, 4), "speedup": round(s, 3)})
            ctx.progress(f"prune: {measured['probes'][-1]['macs_ratio']:.1%} of the MACs measure {s:.2f}x")
            return s

        best = speedup(floor_choice)
        if best < self.target_speedup:
            raise BudgetInfeasible(1 / self.target_speedup, 1 / best, (
                f"target speed-up {self.target_speedup}x is out of reach: pruning every prunable group to its "
                f"minimum measures {best:.2f}x; best reachable speed-up {best:.2f}x"))
        lo, hi = costs.total("macs", keep_for(floor_choice)) / total, 1.0  # MAC fractions: lo meets the target
        chosen = floor_choice
        for _ in range(6):
            mid = (lo + hi) / 2
            choice = self._allocate(costs, "macs", mid * total, prunable, options, distortion, keep_for)
            if speedup(choice) >= self.target_speedup:
                lo, chosen = mid, choice
            else:
                hi = mid
            if hi - lo < 0.02:
                break
        return chosen

    # --------------------------------------------------------------------------------------------- report
    def _report(self, model, result, cg, costs, keep, choice, order, stats, distortion, feed, ctx, measured):
        after = Costs(result, analyse(result), feed, ctx)
        lat = measure_latencies([make_session(model, ctx.runtime), make_session(result, ctx.runtime)],
                                ctx.latency_feed(model),
                                warmup=5, repeats=30, min_seconds=0.3, max_seconds=3.0)
        counters = {"groups": len(cg.groups()), "prunable": sum(g.prunable for g in cg.groups()),
                    "pruned_groups": len(keep),
                    "macs_before": round(costs.total("macs", {})), "macs_after": round(after.total("macs", {})),
                    "params_before": model.parameter_count(), "params_after": result.parameter_count(),
                    "latency_before_ms": round(lat[0].median_ms, 4), "latency_after_ms": round(lat[1].median_ms, 4),
                    "predicted_distortion": round(sum(distortion[g][k] for g, k in choice.items()), 6),
                    "analysis_seconds": round(cg.seconds, 3)}
        counters["macs_reduction"] = round(1 - counters["macs_after"] / max(counters["macs_before"], 1), 4)
        counters["speedup"] = round(lat[0].median_ms / lat[1].median_ms, 3)
        table = []
        for g in cg.groups():
            row = {"group": g.id, "producers": g.producers, "size": g.size, "block": g.block,
                   "kept": choice.get(g.id, g.size), "frozen": "; ".join(g.reasons)}
            if g.id in choice:
                scores = _channel_scores(cg, g, stats, "activation" if stats else "magnitude")
                row["importance_mean"] = float(scores.mean())
                row["importance_removed"] = float(scores[order[g.id][: g.size - choice[g.id]]].sum()
                                                  / max(scores.sum(), 1e-30))
            table.append(row)
        details = {"groups": table, **({"speedup_search": measured["probes"]} if measured.get("probes") else {})}
        return counters, details


def _label(g) -> str:
    first = g.producers[0] if g.producers else "?"
    return f"group {g.id} ({first}{' +' + str(len(g.producers) - 1) if len(g.producers) > 1 else ''})"


def _kept(order: np.ndarray, block: int, k: int) -> np.ndarray:
    """The k channels that stay: drop whole blocks, least important first (order ranks blocks)."""
    n_blocks = len(order)
    drop = order[: n_blocks - k // block]
    kept_blocks = np.setdiff1d(np.arange(n_blocks), drop)
    return (kept_blocks[:, None] * block + np.arange(block)).ravel()


# ------------------------------------------------------------------------------------------------- importance
def _channel_scores(cg: ChannelGroups, g, stats, importance: str) -> np.ndarray:
    """One score per channel of the group (higher: more important), each layer's share normalised by its mean."""
    total = np.zeros(g.size)
    if importance != "magnitude":
        for tensor, st in stats.items():
            if not isinstance(tensor, str):
                continue
            for consumer, wnorm in st["consumers"]:
                per_pos = st["abs"] * wnorm
                per_pos = per_pos / max(per_pos.mean(), 1e-30)
                total += _to_channels(cg, tensor, per_pos, g.id)
        if total.any():
            return total
    for name in g.producers:
        plan = cg.plans.get(name)
        if plan is None or plan.kind != "producer":
            continue
        node = cg.nodes[name]
        norms = _norms(cg.array(node.input[plan.data["weight"]]), plan.data["w_out_axis"])
        total += _to_channels(cg, node.output[0], norms / max(norms.mean(), 1e-30), g.id)
    return total


def _norms(w: np.ndarray, axis: int) -> np.ndarray:
    """L2 norm of each slice of `w` along `axis`."""
    return np.sqrt(np.sum(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64) ** 2, axis=1))


def _to_channels(cg: ChannelGroups, tensor: str, per_position: np.ndarray, gid: int) -> np.ndarray:
    """Sum per-position values of a tracked tensor into the channels of group gid."""
    root = cg.find(gid)
    size = cg._size[root]
    out = np.zeros(size)
    offset = 0
    for seg in cg.tracked[tensor].layout:
        n = cg.segment_length(seg)
        if cg.find(seg.group) == root:
            vals = per_position[offset: offset + n]
            if seg.repeat.denominator == 1:
                out += vals.reshape(size, seg.repeat.numerator).sum(axis=1)
            else:
                out += np.repeat(vals / seg.repeat.denominator, seg.repeat.denominator)
        offset += n
    return out


def _ranking(cg: ChannelGroups, g, stats, importance: str) -> np.ndarray:
    """Blocks of the group, least important first."""
    scores = _channel_scores(cg, g, stats, "magnitude" if importance == "magnitude" else "activation")
    blocks = scores.reshape(g.size // g.block, g.block).sum(axis=1)
    return np.argsort(blocks, kind="stable")


def _activation_stats(model: Model, cg: ChannelGroups, prunable, feeds, ctx) -> dict:
    """Per tensor a consumer reads from a prunable group: mean and mean |x| per position on the tracked axis, and
    each consumer's incoming weight norm per position."""
    roots = {g.id for g in prunable}
    wanted: dict[str, list] = {}
    for name, plan in cg.plans.items():
        x = plan.data.get("consumes") if plan.kind == "producer" else None
        if x is None or not any(cg.find(s.group) in roots for s in cg.tracked[x].layout):
            continue
        node = cg.nodes[name]
        wanted.setdefault(x, []).append((name, _norms(cg.array(node.input[plan.data["weight"]]),
                                                      plan.data["w_in_axis"])))
    sums: dict[str, list] = {}

    def fold(values: dict[str, np.ndarray]) -> None:
        for t, v in values.items():
            axis = cg.tracked[t].axis
            moved = np.moveaxis(v.astype(np.float64), axis, -1).reshape(-1, v.shape[axis])
            s = sums.setdefault(t, [0.0, 0.0, 0])
            s[0] = s[0] + moved.sum(axis=0)
            s[1] = s[1] + np.abs(moved).sum(axis=0)
            s[2] += moved.shape[0]

    ctx.progress(f"prune: activation statistics of {len(wanted)} tensors on {len(feeds)} samples")
    for _, values in stream_tensors(model, list(wanted), feeds, settings=ctx.runtime):
        fold(values)
    return {t: {"mean": s[0] / s[2], "abs": s[1] / s[2], "consumers": wanted[t]} for t, s in sums.items()}


# ------------------------------------------------------------------------------------------------------ costs
class Costs:
    """MACs and parameters as sums of terms `amount x prod(kept fraction of tensor)`: exact for any keep set."""

    def __init__(self, model: Model, cg: ChannelGroups, feed, ctx):
        self.cg = cg
        shapes = _shapes(model, cg, feed, ctx)
        self.terms: dict[str, list[tuple[float, list[str]]]] = {"macs": [], "params": []}
        inits = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            op = node.op_type
            if op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and node.output[0] in shapes:
                macs = _node_macs(node, shapes, inits)
                if macs:
                    plan = cg.plans.get(node.name)
                    if plan is not None and plan.kind == "producer":
                        ts = [t for t in (plan.data.get("consumes"), node.output[0]) if t in cg.tracked]
                    else:
                        ts = [t for t in (node.input[0], node.output[0]) if t in cg.tracked][:1]
                        if op == "MatMul" and not ts and node.input[1] in cg.tracked:
                            ts = [node.input[1]]
                    self.terms["macs"].append((float(macs), ts))
        for name, plan in cg.plans.items():
            node = cg.nodes[name]
            by_input: dict[int, list[str]] = {}
            for idx, _, tensor in plan.slices:
                by_input.setdefault(idx, []).append(tensor)
            for idx, ts in by_input.items():
                t = inits.get(node.input[idx])
                if t is not None:
                    self.terms["params"].append((float(np.prod(t.dims)), ts))
        self.base_params = model.parameter_count() - sum(a for a, _ in self.terms["params"])
        self.lengths = {t: cg.length(tr.layout) for t, tr in cg.tracked.items()}

    def total(self, kind: str, keep: dict[int, np.ndarray]) -> float:
        if kind == "channels":
            groups = [g for g in self.cg.groups() if g.prunable]
            return float(sum(len(keep[g.id]) if g.id in keep else g.size for g in groups))
        pos = positions(self.cg, keep) if keep else {}
        total = sum(a * np.prod([len(pos[t]) / self.lengths[t] if t in pos else 1.0 for t in ts])
                    for a, ts in self.terms[kind])
        return float(total + (self.base_params if kind == "params" else 0.0))

    def coefficients(self, kind: str) -> dict[int, float]:
        """Per prunable group: cost per channel kept (all other groups whole); exact for a single group."""
        out: dict[int, float] = {}
        for g in self.cg.groups():
            if not g.prunable:
                continue
            if kind == "channels":
                out[g.id] = 1.0
                continue
            c = 0.0
            for a, ts in self.terms[kind]:
                for t in ts:
                    share = sum(float(s.repeat) for s in self.cg.tracked[t].layout if self.cg.find(s.group) == g.id)
                    c += a * share / self.lengths[t]
            out[g.id] = c
        return out


def _shapes(model: Model, cg: ChannelGroups, feed, ctx) -> dict[str, tuple]:
    """Concrete shapes of the inputs and outputs of MAC-bearing nodes, by running the model once."""
    wanted = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            wanted.extend(n for n in (node.input[0], node.input[1], node.output[0]) if n not in cg.constants)
    wanted = list(dict.fromkeys(w for w in wanted if w not in feed))
    shapes = {k: tuple(v.shape) for k, v in feed.items()}
    for _, values in stream_tensors(model, wanted, [feed], settings=ctx.runtime):
        shapes.update({k: tuple(v.shape) for k, v in values.items()})
    for name in cg.constants:
        shapes[name] = tuple(cg.inits[name].dims)
    return shapes


def _node_macs(node, shapes, inits) -> float:
    out = shapes.get(node.output[0])
    w = shapes.get(node.input[1])
    a = shapes.get(node.input[0])
    if out is None or w is None or a is None:
        return 0.0
    if node.op_type == "Conv":
        return float(np.prod(out)) * float(np.prod(w[1:]))
    if node.op_type == "ConvTranspose":
        return float(np.prod(a)) * float(np.prod(w[1:]))
    if node.op_type == "Gemm":
        trans_a = next((helper.get_attribute_value(x) for x in node.attribute if x.name == "transA"), 0)
        return float(np.prod(out)) * float(a[0] if trans_a else a[-1])
    return float(np.prod(out)) * float(a[-1])


# ------------------------------------------------------------------------------------------------------ refit
def refit(original: Model, pruned: Model, cg: ChannelGroups, keep, feeds, ctx, ridge: float, rows: int) -> Model:
    """Re-fit, in topological order, every consumer whose input lost channels: ridge least squares from the pruned
    model's input activations to the original layer's output (on the kept output channels)."""
    pos = positions(cg, keep)
    consumers = [(name, plan) for name, plan in cg.plans.items()
                 if plan.kind == "producer" and plan.data.get("consumes") in pos]
    ctx.progress(f"prune: re-fitting {len(consumers)} consumers on {len(feeds)} samples")
    rng = np.random.default_rng(0)
    current = pruned
    for name, plan in consumers:
        node = cg.nodes[name]
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        new_node = next(n for n in current.graph.node if n.name == name)
        x_new, y_orig = new_node.input[0], node.output[0]
        if node.op_type == "MatMul":  # fit up to the bias Add after it, whose constant takes the intercept
            bias_add = _bias_add(original, node)
            y_orig = bias_add.output[0] if bias_add is not None else y_orig
        out_pos = pos.get(node.output[0])
        ata = aty = None
        count = 0
        per_sample = max(16, rows // max(len(feeds), 1))
        targets = [v[y_orig] for _, v in stream_tensors(original, [y_orig], feeds, settings=ctx.runtime)]
        inputs = [v[x_new] for _, v in stream_tensors(current, [x_new], feeds, settings=ctx.runtime)]
        for x, y in zip(inputs, targets):
            a, t = _design(node, new_node, current, x, y, out_pos, rng, per_sample)
            a = np.hstack([a, np.ones((a.shape[0], 1))])
            ata = a.T @ a if ata is None else ata + a.T @ a
            aty = a.T @ t if aty is None else aty + a.T @ t
            count += a.shape[0]
        current = _apply_fit(current, new_node.name, ata, aty, ridge)
    return current


def _weights(model: Model, node) -> tuple[np.ndarray, np.ndarray | None]:
    inits = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) \
        if len(node.input) > 2 and node.input[2] in inits else None
    return w, b


def _design(node, new_node, current, x, y, out_pos, rng, per_sample):
    """Rows of (input patch, original output) at a random subset of output positions."""
    if node.op_type == "Conv":
        w, _ = _weights(current, new_node)
        patches = conv_patches(x, node_attrs(new_node), w.shape[2:])  # [N*P, C*k*k]
        target = y.reshape(y.shape[0], y.shape[1], -1).transpose(0, 2, 1)  # [N, P, M]
        target = target.reshape(-1, target.shape[-1])
    else:
        patches = x.reshape(-1, x.shape[-1])
        target = y.reshape(-1, y.shape[-1])
    if out_pos is not None:
        target = target[:, out_pos]
    if patches.shape[0] > per_sample:
        idx = rng.choice(patches.shape[0], per_sample, replace=False)
        patches, target = patches[idx], target[idx]
    return patches.astype(np.float64), target.astype(np.float64)


def _apply_fit(model: Model, name: str, ata, aty, ridge: float) -> Model:
    out = model.copy()
    node = next(n for n in out.graph.node if n.name == name)
    inits = {t.name: t for t in out.graph.initializer}
    w = numpy_helper.to_array(inits[node.input[1]])
    d = ata.shape[0] - 1
    if node.op_type == "Conv":
        w0 = w.reshape(w.shape[0], -1).T  # [C*k*k, M]
    elif node.op_type == "Gemm":
        trans_b, alpha = node_attrs(node).get("transB", 0), node_attrs(node).get("alpha", 1.0)
        w0 = (w.T if trans_b else w) * alpha
    else:
        w0 = w
    lam = ridge * float(np.trace(ata[:d, :d])) / max(d, 1)
    reg = np.zeros_like(ata)
    reg[np.arange(d), np.arange(d)] = lam
    prior = np.zeros_like(aty)
    prior[:d] = lam * w0
    try:
        theta = np.linalg.solve(ata + reg, aty + prior)
    except np.linalg.LinAlgError:
        return model
    w_fit, b_fit = theta[:d], theta[d]
    dtype = w.dtype
    if node.op_type == "Conv":
        new_w = w_fit.T.reshape(w.shape)
        _set_init(out, node, 1, new_w.astype(dtype))
        _set_bias(out, node, b_fit.astype(dtype))
    elif node.op_type == "Gemm":
        new_w = (w_fit.T if trans_b else w_fit) / alpha
        _set_init(out, node, 1, new_w.astype(dtype))
        beta = node_attrs(node).get("beta", 1.0) or 1.0
        _set_bias(out, node, (b_fit / beta).astype(dtype))
    else:
        _set_init(out, node, 1, w_fit.astype(dtype))
        add = _bias_add(out, node)
        if add is not None:  # the intercept replaces the bias (the target included the original bias)
            i = next(i for i, n in enumerate(add.input) if n != node.output[0])
            _set_init(out, add, i, b_fit.astype(dtype))
        else:  # no bias Add to take the intercept: put one after the MatMul
            _add_bias_after(out, node, b_fit.astype(dtype))
    return out


def _add_bias_after(model: Model, node, bias: np.ndarray) -> None:
    """MatMul -> y becomes MatMul -> y_refit -> Add(bias) -> y, the Add right after the MatMul (order stays
    topological)."""
    taken = all_names(model.graph)
    y = node.output[0]
    node.output[0] = unique_name(f"{y}_refit", taken)
    name = add_initializer(model.graph, f"{node.name}_refit_bias", bias, taken)
    add = new_node("Add", [node.output[0], name], [y], taken)
    nodes = list(model.graph.node)
    nodes.insert(next(i for i, n in enumerate(nodes) if n.name == node.name) + 1, add)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _bias_add(model: Model, node):
    """The Add right after a MatMul that adds a constant vector (its bias), if any."""
    users = [n for n in model.graph.node if node.output[0] in n.input]
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    inits = {t.name: t for t in model.graph.initializer}
    other = [n for n in users[0].input if n != node.output[0]]
    if len(other) != 1 or other[0] not in inits or len(inits[other[0]].dims) != 1:
        return None
    return users[0]


def _set_init(model: Model, node, index: int, value: np.ndarray) -> None:
    name = node.input[index]
    uses = sum(1 for n in model.graph.node for i in node_inputs(n) if i == name)
    if uses > 1:
        name = f"{name}_refit_{node.name}"
        node.input[index] = name
    for t in list(model.graph.initializer):
        if t.name == name:
            model.graph.initializer.remove(t)
    model.graph.initializer.append(numpy_helper.from_array(value, name))


def _set_bias(model: Model, node, value: np.ndarray) -> None:
    if len(node.input) > 2 and node.input[2]:
        old = [t for t in model.graph.initializer if t.name == node.input[2]]
        if old and len(old[0].dims) > 1:
            value = value.reshape(tuple(old[0].dims))
        _set_init(model, node, 2, value)
    else:
        name = f"{node.name}_refit_bias"
        while len(node.input) < 2:
            node.input.append("")
        node.input.append(name)
        model.graph.initializer.append(numpy_helper.from_array(value, name))
