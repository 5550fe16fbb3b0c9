"""Low-rank factorization: replace a weight by two thinner ones where that pays, with ranks chosen under a budget.

Steps: find the sites (graphopt/lowrank_rewrite.py); stream the calibration inputs once to get each site's input
Gram matrix XᵀX; decompose every weight (plain SVD or whitened by XᵀX, graphopt/lowrank.py); offer ranks strictly
below the break-even rank r < m·n/(m+n); score each rank by output distortion; time each site alone in
onnxruntime at its original shape and at each rank; choose ranks (fixed by `rank` / `rank_ratio` / `energy`, or
with the shared allocator under `target_speedup`, `param_ratio` or `max_params`); rewrite; measure.

Distortion of a rank: the site's relative output error on the calibration inputs, ‖X(W − AB)‖²/‖XW‖² (exact,
from XᵀX), times the site's gain from that error to the model's output distortion, measured once per site by
running the whole model with only that site factorized at a probe rank (the sum over sites is what the
allocator minimises, like the qdq pass's sensitivities).

A factorization is kept only where it is better than the original layer in what the budget counts: measured
latency for `target_speedup` (slower ranks are refused with their timings), parameters otherwise (guaranteed
below break-even); `require_faster=true` adds the latency condition to any budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...analysis.allocate import BudgetInfeasible, Option, SiteOptions, allocate
from ...core.errors import UsageError
from .factorize import METHODS, Spectrum, single_threaded_blas, breakeven_rank, decompose, factored_params, max_useful_rank
from .rewrite import FactorSite, collect_grams, find_sites, micro_site, rewrite, site_model, weight_matrix
from ...core.model import Model
from ...core.numerics import output_distortion
from ...core.runtime import make_session, measure_latencies, run
from ..base import Context, Decision, Pass, PassResult, register, speedup_levels

BUDGETS = ("target_speedup", "param_ratio", "max_params", "energy", "rank", "rank_ratio")
DEFAULT_ENERGY = 0.95
REFINE_ROUNDS = 3  # target_speedup: re-allocations when the whole model measures slower than predicted


@register
@dataclass(frozen=True)
class LowRank(Pass):
    """Factorize Gemm/MatMul/Conv weights into two thinner ones where it pays, at ranks chosen under a budget."""

    name = "lowrank"
    description = "low-rank factorization (plain or activation-aware SVD), ranks under a budget (lossy)"
    exact = False

    search_role: ClassVar[str] = "structure"

    @classmethod
    def search_levels(cls, speedup, size_mb, floor):
        return [cls(target_speedup=s) for s in speedup_levels(speedup)]

    method: str = "whitened"  # svd | whitened
    refit: bool = False  # least-squares refit of the second factor on the calibration inputs
    # One budget (none given: energy = 0.95):
    target_speedup: float | None = None  # whole-model latency: original / target_speedup
    param_ratio: float | None = None  # parameters of the factorizable layers: at most this fraction of before
    max_params: int | None = None  # parameters of the whole model
    energy: float | None = None  # per layer: the smallest rank keeping this fraction of Σσ²
    rank: int | None = None  # the same rank everywhere
    rank_ratio: float | None = None  # per layer: this fraction of its full rank min(m, n)
    require_faster: bool | None = None  # keep only factorizations measured faster (default: for target_speedup)
    candidates: int = 12  # ranks offered per site to the allocator
    damping: float = 0.01  # whitening: λ = damping × mean diagonal of XᵀX
    calibration_samples: int = 32
    sensitivity_samples: int = 8
    latency_margin: float = 0.02  # "faster" means at least this fraction faster than the original layer

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        given = [b for b in BUDGETS if getattr(self, b) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget, not {' and '.join(given)} (budgets: {', '.join(BUDGETS)})")
        checks = [
            (self.target_speedup, lambda v: v > 0, "target_speedup must be positive"),
            (self.param_ratio, lambda v: 0 < v < 1, "param_ratio must be between 0 and 1 (exclusive)"),
            (self.max_params, lambda v: isinstance(v, int) and v > 0, "max_params must be a positive integer"),
            (self.energy, lambda v: 0 < v <= 1, "energy must be in (0, 1]"),
            (self.rank, lambda v: isinstance(v, int) and v >= 1, "rank must be an integer >= 1"),
            (self.rank_ratio, lambda v: 0 < v < 1, "rank_ratio must be between 0 and 1 (exclusive)"),
        ]
        for value, ok, message in checks:
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and math.isfinite(value) and ok(value)):
                raise ValueError(f"{message}, got {value!r}")
        if not (isinstance(self.candidates, int) and 1 <= self.candidates <= 64):
            raise ValueError(f"candidates must be an integer from 1 to 64, got {self.candidates!r}")
        if not 0 <= self.damping < 1e3:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if self.calibration_samples < 1 or self.sensitivity_samples < 1:
            raise ValueError("calibration_samples and sensitivity_samples must be at least 1")
        if not 0 <= self.latency_margin < 1:
            raise ValueError(f"latency_margin must be in [0, 1), got {self.latency_margin}")

    # ------------------------------------------------------------------------------------------------ run
    @property
    def budget(self) -> str:
        return next((b for b in BUDGETS if getattr(self, b) is not None), "energy")

    @property
    def faster_only(self) -> bool:
        return self.require_faster if self.require_faster is not None else self.budget == "target_speedup"

    def run(self, model: Model, ctx: Context) -> PassResult:
        with single_threaded_blas():  # onnxruntime keeps its own threads; this only calms numpy's BLAS
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: Context) -> PassResult:
        sites = find_sites(model)
        decisions = [Decision(s.node, "skipped", s.reason) for s in sites if s.reason]
        usable = []
        for s in sites:
            if s.reason:
                continue
            if max_useful_rank(s.n_in, s.n_out) < 1:
                decisions.append(Decision(s.node, "skipped", f"{s.shape_text}: no rank is below the break-even "
                                          f"rank {breakeven_rank(s.n_in, s.n_out):.1f}"))
            else:
                usable.append(s)
        if not usable:
            return PassResult(model, False, decisions=decisions)
        self._check_inputs(ctx)
        calib = ctx.inputs.fit[: self.calibration_samples]
        ctx.progress(f"lowrank: input covariance of {len(usable)} sites on {len(calib)} samples")
        grams, first = collect_grams(model, usable, calib, ctx.runtime, ctx.progress, ctx.latency_feed(model))

        ctx.progress(f"lowrank: {self.method} decomposition of {len(usable)} weights")
        plans = self._plans(model, usable, grams, first, decisions)
        if not plans:
            return PassResult(model, False, decisions=decisions)

        probe = calib[: self.sensitivity_samples]
        reference = run(make_session(model, ctx.runtime), probe)
        allocating = self.budget in ("target_speedup", "param_ratio", "max_params")
        if allocating:
            self._sensitivities(model, usable, plans, probe, reference, ctx)
        if self.faster_only or self.budget == "target_speedup":
            ctx.progress(f"lowrank: timing {len(plans)} sites alone at {sum(len(p.ranks) for p in plans.values())} "
                         "ranks")
            for p in plans.values():
                self._time(model, p, p.ranks, ctx)

        counters: dict[str, float] = {}
        if allocating:
            chosen = self._allocate(model, plans, probe, ctx, counters)
        else:
            chosen = {n: p.ranks[0] for n, p in plans.items()}
            if self.faster_only:
                chosen = {n: r for n, r in chosen.items() if self._faster(plans[n], r)}
        # Latency before/after of every factorized site, for the report (already timed where it mattered).
        for n, r in chosen.items():
            if r not in plans[n].ms:
                self._time(model, plans[n], [r], ctx)

        result = rewrite(model, usable, {n: plans[n].spectrum.factors(r) for n, r in chosen.items()})
        measured = (output_distortion(reference, run(make_session(result, ctx.runtime), probe), ctx.class_scores(model))
                    if chosen else 0.0)
        for n, p in plans.items():
            decisions.append(self._decision(p, chosen.get(n)))
        # Parameters of every site where some rank pays (the same denominator whatever the budget).
        before = sum(s.params for s in usable)
        after = before - sum(p.site.params - factored_params(p.site.n_in, p.site.n_out, chosen[n])
                             for n, p in plans.items() if n in chosen)
        counters.update({
            "sites": len(sites), "candidates": len(usable), "factorized": len(chosen),
            "params_before": before, "params_after": after, "param_ratio": round(after / before, 4),
            "predicted_distortion": round(sum(plans[n].distortion(r) for n, r in chosen.items()), 6)
            if allocating else None,
            "measured_distortion": round(measured, 6)})
        counters = {k: v for k, v in counters.items() if v is not None}
        details = {"method": self.method, "refit": self.refit, "budget": self.budget,
                   "sites": [p.row(chosen.get(n)) for n, p in plans.items()]}
        return PassResult(result, bool(chosen), counters, decisions, details)

    # ----------------------------------------------------------------------------------------- pieces
    def _check_inputs(self, ctx: Context) -> None:
        if ctx.inputs is None or not ctx.inputs.fit:
            raise UsageError("the lowrank pass needs calibration inputs (--calib)")
        needs_data = self.method == "whitened" or self.refit or self.budget in ("target_speedup", "param_ratio",
                                                                                   "max_params")
        if needs_data and ctx.inputs.synthetic:
            raise UsageError(f"the lowrank pass needs real calibration data (--calib) for method={self.method}"
                             f"{', refit' if self.refit else ''} and budget {self.budget}; only method=svd with a "
                             "fixed rank, rank_ratio or energy runs on synthetic inputs")

    def _plans(self, model, usable, grams, first, decisions) -> dict:
        plans = {}
        for s in usable:
            gram = grams[s.gram_key()]
            spectrum = decompose(weight_matrix(model, s), self.method, gram.xtx, damping=self.damping,
                                 refit=self.refit, rows=gram.rows)
            ranks, why_not = self._ranks(s, spectrum)
            if not ranks:
                decisions.append(Decision(s.node, "skipped", why_not))
                continue
            plans[s.node] = RankPlan(s, spectrum, ranks, spectrum.errors(ranks), first[s.activation])
        return plans

    def _ranks(self, s: FactorSite, spectrum: Spectrum) -> tuple[list[int], str]:
        """Ranks offered for this site (all below break-even), or none and why."""
        r_max = max_useful_rank(s.n_in, s.n_out)
        be = breakeven_rank(s.n_in, s.n_out)
        mode = self.budget
        if mode in ("target_speedup", "param_ratio", "max_params"):
            return rank_grid(r_max, self.candidates), ""
        if mode == "rank":
            r = self.rank
            what = f"rank {r}"
        elif mode == "rank_ratio":
            r = max(1, round(self.rank_ratio * spectrum.full_rank))
            what = f"rank_ratio {self.rank_ratio} gives rank {r}"
        else:
            tau = self.energy if self.energy is not None else DEFAULT_ENERGY
            r = _round_up(spectrum.rank_for_energy(tau), _multiple(r_max), spectrum.full_rank)
            what = f"energy {tau:g} needs rank {r}"
        if r > r_max:
            return [], f"{s.shape_text}: {what}, not below the break-even rank {be:.1f}"
        return [int(r)], ""

    def _sensitivities(self, model, usable, plans, probe, reference, ctx: Context) -> None:
        """Gain from a site's layer error to the model's output distortion, measured at one probe rank."""
        ctx.progress(f"lowrank: output distortion of {len(plans)} sites on {len(probe)} samples")
        scores = ctx.class_scores(model)
        for p in plans.values():
            nonzero = [r for r in p.ranks if p.errors[r] > 1e-12]
            if not nonzero:
                p.gain = 0.0
                continue
            r = nonzero[(len(nonzero) - 1) // 2]
            candidate = rewrite(model, usable, {p.site.node: p.spectrum.factors(r)})
            d = output_distortion(reference, run(make_session(candidate, ctx.runtime), probe), scores)
            p.gain, p.probe = d / p.errors[r], (r, d)

    def _time(self, model: Model, p: "RankPlan", ranks: list[int], ctx: Context) -> None:
        """The site alone, original and at `ranks`, timed interleaved in onnxruntime on its real input."""
        micro = site_model(model, p.site, p.x.shape)
        msite = micro_site(p.site)
        sessions = [make_session(micro, ctx.runtime)]
        sessions += [make_session(rewrite(micro, [msite], {msite.node: p.spectrum.factors(r)}), ctx.runtime)
                     for r in ranks]
        lat = measure_latencies(sessions, {"x": p.x}, warmup=3, repeats=20, min_seconds=0.05, max_seconds=0.5)
        if p.original_ms is None:
            p.original_ms = lat[0].median_ms
        for r, l in zip(ranks, lat[1:]):
            p.ms[r] = l.median_ms

    def _faster(self, p: "RankPlan", r: int) -> bool:
        return p.ms.get(r, math.inf) < p.original_ms * (1 - self.latency_margin)

    def _allocate(self, model: Model, plans: dict, probe, ctx: Context, counters: dict) -> dict[str, int]:
        def site(p: "RankPlan", cost, ranks) -> SiteOptions:
            return SiteOptions(p.site.node, (Option("original", cost(None), 0.0),) +
                             tuple(Option(f"rank={r}", cost(r), p.distortion(r)) for r in ranks))

        if self.budget != "target_speedup":
            ranks = {n: [r for r in p.ranks if not self.faster_only or self._faster(p, r)] for n, p in plans.items()}
            total = sum(p.site.params for p in plans.values())  # every usable site has a plan here
            if self.budget == "param_ratio":
                budget = self.param_ratio * total
                what = f"param_ratio {self.param_ratio:g}"
            else:
                budget = self.max_params - (model.parameter_count() - total)
                what = f"max_params {self.max_params:,}"
            options = [site(p, lambda r, p=p: p.site.params if r is None else
                            factored_params(p.site.n_in, p.site.n_out, r), ranks[n]) for n, p in plans.items()]
            try:
                allocation = allocate(options, budget)
            except BudgetInfeasible as exc:
                best = exc.best_cost
                raise BudgetInfeasible(budget, best, (
                    f"{what} needs at most {max(budget, 0):,.0f} parameters in the {len(plans)} factorizable layers "
                    f"({total:,} now); the smallest reachable with ranks below break-even is {best:,.0f} "
                    f"(param_ratio {best / total:.3f}, model {model.parameter_count() - total + best:,.0f})")) from None
            return _ranks_of(allocation)

        # Latency: site costs are their measured times alone; the model's time is predicted as its measured
        # time minus the sum of the sites' savings, then checked by measuring the rewritten model.
        options = [site(p, lambda r, p=p: p.original_ms if r is None else p.ms[r],
                        [r for r in p.ranks if self._faster(p, r)]) for p in plans.values()]
        base = make_session(model, ctx.runtime)
        feed = ctx.latency_feed(model)
        t0 = measure_latencies([base], feed, min_seconds=0.5)[0].median_ms
        sum_sites = sum(p.original_ms for p in plans.values())
        target_ms = t0 / self.target_speedup
        budget = sum_sites - (t0 - target_ms)
        best_saving = sum(p.original_ms - min(o.cost for o in a.options) for p, a in zip(plans.values(), options))
        try:
            allocation = allocate(options, budget)
        except BudgetInfeasible:
            raise BudgetInfeasible(budget, sum_sites - best_saving, (
                f"target speed-up {self.target_speedup:g}x needs {target_ms:.3f} ms against {t0:.3f} ms measured; "
                f"factorizing every site at its fastest measured rank saves at most {best_saving:.3f} ms, "
                f"a predicted {t0 / max(t0 - best_saving, 1e-9):.2f}x")) from None
        tries = []
        for attempt in range(REFINE_ROUNDS + 1):
            chosen = _ranks_of(allocation)
            candidate = rewrite(model, list(p.site for p in plans.values()),
                                {n: plans[n].spectrum.factors(r) for n, r in chosen.items()})
            lat = measure_latencies([base, make_session(candidate, ctx.runtime)], feed, min_seconds=0.5)
            speedup = lat[0].median_ms / lat[1].median_ms
            tries.append({"budget_ms": round(budget, 4), "factorized": len(chosen), "original_ms": round(lat[0].median_ms, 4),
                          "measured_ms": round(lat[1].median_ms, 4), "speedup": round(speedup, 4)})
            ctx.progress(f"lowrank: {len(chosen)} sites factorized measure {speedup:.2f}x "
                         f"(target {self.target_speedup:g}x)")
            if speedup >= self.target_speedup:
                counters.update({"original_ms": tries[-1]["original_ms"], "measured_ms": tries[-1]["measured_ms"],
                                 "measured_speedup": round(speedup, 3), "target_speedup": self.target_speedup})
                return chosen
            # Tighten the site budget by the measured shortfall and try again.
            budget -= lat[1].median_ms - lat[0].median_ms / self.target_speedup
            try:
                allocation = allocate(options, budget)
            except BudgetInfeasible:
                break
        best = max(tries, key=lambda t: t["speedup"])
        raise BudgetInfeasible(budget, best["measured_ms"], (
            f"target speed-up {self.target_speedup:g}x not reached: the best allocation measured "
            f"{best['speedup']:.2f}x ({best['measured_ms']:.3f} ms against {best['original_ms']:.3f} ms, "
            f"{best['factorized']} sites factorized) after {len(tries)} measured tries"))

    def _decision(self, p: "RankPlan", rank: int | None) -> Decision:
        s, be = p.site, breakeven_rank(p.site.n_in, p.site.n_out)
        timing = (lambda r: f"measured {p.original_ms:.4f} ms -> {p.ms[r]:.4f} ms alone") if p.original_ms else None
        if rank is not None:
            parts = [f"{s.shape_text}: rank {rank} of {p.spectrum.full_rank} (break-even {be:.1f})",
                     f"energy kept {p.spectrum.energy(rank):.2%}", f"layer output error {p.errors[rank]:.3g}"]
            if p.gain is not None:
                parts.append(f"predicted model distortion {p.distortion(rank):.3g}")
            if timing:
                parts.append(timing(rank))
            return Decision(s.node, "factorized", "; ".join(parts))
        if self.faster_only and p.ms and not any(self._faster(p, r) for r in p.ranks):
            fastest = min(p.ms, key=p.ms.get)
            return Decision(s.node, "kept", f"{s.shape_text}: every rank is slower than the original layer alone "
                            f"(fastest: rank {fastest} measured {p.ms[fastest]:.4f} ms vs original "
                            f"{p.original_ms:.4f} ms, margin {self.latency_margin:.0%})")
        return Decision(s.node, "kept", f"{s.shape_text}: the budget is met at less distortion without it "
                        f"(lowest offered rank {p.ranks[0]}: layer output error {p.errors[p.ranks[0]]:.3g})")


@dataclass
class RankPlan:
    """One site's decomposition, the ranks offered, their errors and timings: what the rank choice reads."""

    site: FactorSite
    spectrum: Spectrum
    ranks: list[int]
    errors: dict[int, float]
    x: np.ndarray  # the site's input at the latency shape (the feed of its micro-model timings)
    gain: float | None = None
    probe: tuple[int, float] | None = None
    original_ms: float | None = None
    ms: dict = None

    def __post_init__(self):
        self.ms = {}

    def distortion(self, rank: int) -> float:
        return (self.gain or 0.0) * self.errors[rank]

    def row(self, rank: int | None) -> dict:
        s = self.site
        row = {"site": s.node, "op": s.shape_text, "full_rank": self.spectrum.full_rank,
               "breakeven": round(breakeven_rank(s.n_in, s.n_out), 1), "rank": rank,
               "params_before": s.params,
               "params_after": factored_params(s.n_in, s.n_out, rank) if rank else s.params}
        if rank:
            row.update(energy=round(self.spectrum.energy(rank), 5), layer_error=self.errors[rank])
            if self.gain is not None:
                row["distortion"] = self.distortion(rank)
            if rank in self.ms:
                row.update(latency_before_ms=round(self.original_ms, 5), latency_after_ms=round(self.ms[rank], 5))
        if self.probe:
            row["probe"] = {"rank": self.probe[0], "model_distortion": self.probe[1]}
        if self.ms:
            row["timings_ms"] = {"original": round(self.original_ms, 5),
                                 **{str(r): round(v, 5) for r, v in sorted(self.ms.items())}}
        return row


# --------------------------------------------------------------------------------------------------- helpers
def rank_grid(r_max: int, candidates: int) -> list[int]:
    """`candidates` ranks spread evenly up to r_max, rounded to multiples of 8 (4, 1 for small layers): SIMD-friendly
    widths run faster for the same parameters."""
    mult = _multiple(r_max)
    ranks = set()
    for f in np.linspace(1.0 / candidates, 1.0, candidates):
        r = int(round(f * r_max / mult)) * mult
        ranks.add(min(max(r, min(mult, r_max)), r_max - r_max % mult if r_max >= mult else r_max))
    return sorted(r for r in ranks if r >= 1)


def _multiple(r_max: int) -> int:
    return 8 if r_max >= 64 else 4 if r_max >= 16 else 1


def _round_up(r: int, mult: int, cap: int) -> int:
    return min(cap, -(-r // mult) * mult)


def _ranks_of(allocation) -> dict[str, int]:
    return {n: int(o.label.split("=")[1]) for n, o in allocation.choice.items() if o.label != "original"}
