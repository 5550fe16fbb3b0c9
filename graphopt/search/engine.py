"""The search: find a recipe (passes and their settings) that meets a cost budget and a fidelity floor.

1. Each searched family is tried alone at its own levels (`Pass.search_levels`): every level is built as a whole
   model and measured. That is the family's frontier: measured speed-up (or size) against measured fidelity loss.
2. A recovery after the structure points that lost much and could reach the cost with quantization: measured.
3. Compositions in a fixed order, structure (layermerge / prune / lowrank) -> recover -> quantize, are predicted
   from the measured points (speed-ups multiply, sizes scale, losses add), and a shortlist of those predicted to
   meet the budget is built and measured, most accurate first.
4. Where a composition meets the cost but not the floor, a recovery after it is tried ("if it pays": it is a new
   point and only counts if its own figures are better).
Every figure a choice reads is measured on the *selection* samples: builds fit on the fit samples, check their
passes on the selection samples, and never see the verification samples, on which only the chosen model is
verified at the end. The front is the set of measured points no other point beats on both cost and loss.

Timing: builds may run side by side (a process pool or Ray), but every latency on the front is measured here, on
this machine, one candidate at a time, interleaved with a session of the original model, and only while no
build is running: builds go out in waves of at most one per worker, and the wave is timed once all of it is
back. Builds running side by side get the cores split between them (`worker_runtime`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core.calibration import describe_feed
from ..core.errors import UsageError
from ..core.model import Model
from ..core.numerics import compare_outputs
from ..core.runtime import make_session, measure_latencies, run
from ..passes import DEFAULT_RECIPE, REGISTRY, Context, create
from .build import Built, Cache, InProcess, Job, Pool, RayTasks, default_cache_dir, pack_inputs, worker_runtime
from .objective import Budget, Fidelity

DEFAULT_MAX_MINUTES = 20.0
MAX_COMPOSED = 8  # compositions built at most (the time bound usually comes first)
RECOVER_MINUTES = 2.0  # training time of each recovery a search tries
CONFIRMED = 6  # candidates within the floor timed again at the end, together
MAX_RECOVERED = 3  # recoveries tried per stage (after structure; after compositions that miss the floor)


def searchable() -> list[str]:
    return sorted(n for n, c in REGISTRY.items() if c.search_role)


@dataclass
class Point:
    """One candidate: its recipe and what was measured of it on the selection samples."""

    id: int  # 1, 2, ...: the number the progress lines, tables and plot show
    recipe: tuple[str, ...]  # the passes after the cleanup prefix
    stage: str  # single | composed | recovered
    status: str = "pending"  # measured | failed | not built (time)
    reason: str = ""
    latency_ms: float | None = None
    original_ms: float | None = None
    speedup: float | None = None
    size_mb: float | None = None
    fidelity: Fidelity | None = None
    loss: float | None = None
    cost_violations: list[str] = field(default_factory=list)
    floor_violations: list[str] = field(default_factory=list)
    predicted: dict | None = None  # compositions: what the single points predicted
    build_seconds: float = 0.0
    cached: bool = False
    on_front: bool = False
    first_speedup: float | None = None  # the first timing, when _confirm timed it again
    built: Built | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return " -> ".join(self.recipe) or "cleanup only"

    @property
    def families(self) -> list[str]:
        return [s.split(":")[0] for s in self.recipe]

    @property
    def measured(self) -> bool:
        return self.status == "measured"

    @property
    def feasible(self) -> bool:
        return self.measured and not self.cost_violations and not self.floor_violations

    def to_dict(self) -> dict:
        return {"id": self.id, "recipe": list(self.recipe), "label": self.label, "stage": self.stage,
                "status": self.status, "reason": self.reason, "latency_ms": self.latency_ms,
                "original_ms": self.original_ms, "speedup": self.speedup, "first_speedup": self.first_speedup,
                "size_mb": self.size_mb,
                "selection": self.fidelity.to_dict() if self.fidelity else None, "loss": _finite(self.loss),
                "meets_cost": self.measured and not self.cost_violations,
                "meets_floor": self.measured and not self.floor_violations,
                "cost_violations": self.cost_violations, "floor_violations": self.floor_violations,
                "predicted": self.predicted, "build_seconds": round(self.build_seconds, 2), "cached": self.cached,
                "built_by": self.built.worker if self.built else "",
                "on_front": self.on_front}


@dataclass
class SearchResult:
    budget: Budget
    points: list[Point]
    chosen: Point | None  # the feasible point with the least loss; None when nothing met the budget
    best_reachable: list[Point]  # when nothing did: the fastest within the floor, the most faithful within cost
    families: dict[str, str]  # family -> why it got what it got
    executor: str
    seconds: float
    first_valid_seconds: float | None
    stopped_by_time: bool
    max_minutes: float
    cost_axis: str
    latency_shape: dict | None
    notes: list[str] = field(default_factory=list)

    @property
    def front(self) -> list[Point]:
        return [p for p in self.points if p.on_front]

    def to_dict(self) -> dict:
        return {"budget": self.budget.to_dict(), "budget_text": self.budget.describe(),
                "loss_axis": self.budget.loss_name, "cost_axis": self.cost_axis,
                "loss_floor": self.budget.loss_floor(), "latency_shape": self.latency_shape,
                "chosen": self.chosen.id if self.chosen else None,
                "best_reachable": [p.id for p in self.best_reachable],
                "points": [p.to_dict() for p in self.points], "front": [p.id for p in self.front],
                "families": self.families, "executor": self.executor, "seconds": round(self.seconds, 1),
                "first_valid_seconds": None if self.first_valid_seconds is None else round(self.first_valid_seconds, 1),
                "stopped_by_time": self.stopped_by_time, "max_minutes": self.max_minutes, "notes": self.notes}


def pareto(points: list[Point], cost_of) -> None:
    """Mark the measured points no other measured point beats: at most its cost and its loss, and better in one."""
    measured = [p for p in points if p.measured and p.loss is not None and math.isfinite(p.loss)]
    for p in points:
        p.on_front = False
    for p in measured:
        cp = cost_of(p)
        p.on_front = not any((cost_of(q) <= cp and q.loss <= p.loss) and (cost_of(q) < cp or q.loss < p.loss)
                             for q in measured if q is not p)


class Search:
    def __init__(self, model: Model, ctx: Context, budget: Budget, *, families: list[str] | None = None,
                 max_minutes: float = DEFAULT_MAX_MINUTES, workers: int = 1, ray: str | None = None,
                 cache_dir: Path | None | bool = None):
        inputs = ctx.inputs
        if inputs is None or not (inputs.fit and inputs.verification):
            raise UsageError("a search needs input samples (fit, selection and verification)")
        if inputs.overlapping:
            raise UsageError("a search needs more than one input sample: it fits, selects and verifies on "
                             "disjoint samples (give more with --calib)")
        families = list(families or searchable())
        unknown = [f for f in families if f not in REGISTRY or not REGISTRY[f].search_role]
        if unknown:
            raise UsageError(f"--passes: {', '.join(unknown)} cannot be searched; searchable: "
                             f"{', '.join(searchable())}")
        if not max_minutes > 0:
            raise UsageError(f"--max-minutes must be positive, got {max_minutes}")
        if workers < 1:
            raise UsageError(f"--workers must be at least 1, got {workers}")
        scores = ctx.class_scores(model)
        if (budget.min_agreement is not None or budget.max_drop is not None) and not scores:
            raise UsageError(f"--min-agreement and --max-drop need a class-score output, and "
                             f"{', '.join(model.output_names())} is not one (say --output-kind NAME=scores if it "
                             "is, or bound --min-cosine)")
        if budget.max_drop is not None and inputs.labels is None:
            raise UsageError("--max-drop needs labels: an integer array 'labels' (one per row) in the --calib .npz "
                             "beside the inputs")
        self.model, self.ctx, self.budget, self.families = model, ctx, budget, families
        self.scores = scores
        self.max_minutes, self.workers, self.ray = max_minutes, workers, ray
        self.model_bytes = model.to_bytes()
        self.inputs_blob = pack_inputs(inputs)
        root = default_cache_dir() if cache_dir is None else (None if cache_dir is False else Path(cache_dir))
        self.cache = Cache(root, self.model_bytes, self.inputs_blob)
        self.selection = inputs.for_selection
        self.selection_labels = None
        if inputs.labels is not None:
            self.selection_labels = inputs.labels["selection" if inputs.selection else "fit"]
        # a Ray task asks for one CPU, so each build gets one thread; pool workers split this machine's cores
        self.job_runtime = worker_runtime(ctx.runtime, (os.cpu_count() or 1) if ray is not None else workers)
        self.points: list[Point] = []
        self.first_valid: float | None = None
        self.stopped_by_time = False
        self.notes: list[str] = []

    # -------------------------------------------------------------------------------------------- the search
    def run(self) -> SearchResult:
        say = self.ctx.progress
        self.started = time.perf_counter()
        self.deadline = self.started + 60.0 * self.max_minutes
        executor = self._executor()
        say(f"search: {self.budget.describe()}; families {', '.join(self.families)}; builds {executor.name}; "
            f"at most {self.max_minutes:g} min")
        self.original_session = make_session(self.model, self.ctx.runtime)
        self.original_outputs = run(self.original_session, self.selection)
        self.feed = self.ctx.latency_feed(self.model)
        self.speed = self._speed_target()
        try:
            floor = {k: v for k, v in self.budget.to_dict().items()
                     if k in ("max_drop", "min_agreement", "min_cosine") and v is not None}
            # quantization alone first: under a tight time bound its frontier is the one to have, and it tells
            # the structure families what speed-up is left to them
            for role in ("quantize", "structure"):
                speed = self.speed if role == "quantize" else self._left_to_structure()
                levels = [c.spec() for f in self.families if REGISTRY[f].search_role == role
                          for c in REGISTRY[f].search_levels(speed, self.budget.max_size_mb, floor)]
                self._evaluate(executor, [(s,) for s in levels], "single")
            self._evaluate(executor, self._recovered_structure(), "recovered")
            self._evaluate(executor, self._compositions(), "composed")
            self._evaluate(executor, self._recoveries(), "recovered")
        finally:
            executor.close()
        self._confirm()
        cost_of = self._cost_of
        pareto(self.points, cost_of)
        feasible = [p for p in self.points if p.feasible]
        chosen = min(feasible, key=lambda p: (p.loss, cost_of(p))) if feasible else None
        reachable = []
        if chosen is None:
            within_floor = [p for p in self.points if p.measured and not p.floor_violations]
            within_cost = [p for p in self.points if p.measured and not p.cost_violations]
            if within_floor:
                reachable.append(min(within_floor, key=cost_of))
            if within_cost:
                best = min(within_cost, key=lambda p: p.loss)
                if best not in reachable:
                    reachable.append(best)
        return SearchResult(self.budget, self.points, chosen, reachable, self._explain(chosen), executor.name,
                            time.perf_counter() - self.started,
                            None if self.first_valid is None else self.first_valid - self.started,
                            self.stopped_by_time, self.max_minutes, self._cost_axis(),
                            describe_feed(self.feed), self.notes)

    def _executor(self):
        if self.ray is not None:
            return RayTasks(self.ray, self.model_bytes, self.inputs_blob)
        if self.workers > 1:
            return Pool(self.workers, self.model_bytes, self.inputs_blob)
        return InProcess(self.model_bytes, self.inputs_blob, self._build_progress)

    def _build_progress(self, message: str) -> None:
        self.ctx.progress(f"    {message}")

    def _speed_target(self) -> float | None:
        if self.budget.target_speedup is not None:
            return self.budget.target_speedup
        if self.budget.max_latency_ms is not None:
            lat = measure_latencies([self.original_session], self.feed, threads=self.ctx.runtime.intra_op_threads)
            self.notes.append(f"the original measured {lat[0].median_ms:.3f} ms: the latency bound is a "
                              f"{lat[0].median_ms / self.budget.max_latency_ms:.2f}x speed-up")
            return max(1.0, lat[0].median_ms / self.budget.max_latency_ms)
        return None

    def _cost_axis(self) -> str:
        b = self.budget
        return "size (MB)" if b.target_speedup is None and b.max_latency_ms is None else "speed-up"

    def _cost_of(self, p: Point) -> float:
        """Lower is better: the size for a size-only budget, else the inverse speed-up."""
        if self._cost_axis() == "size (MB)":
            return p.size_mb
        return 1.0 / p.speedup if p.speedup else math.inf

    def _known(self, recipe: tuple[str, ...]) -> bool:
        return any(p.recipe == recipe for p in self.points)

    # --------------------------------------------------------------------------------------- compositions
    def _structure_front(self) -> list[Point]:
        """Measured structure points (alone or recovered) that no other structure point beats."""
        structure = [p for p in self.points if p.measured and p.stage in ("single", "recovered")
                     and REGISTRY[p.families[0]].search_role == "structure"
                     and all(REGISTRY[f].search_role != "quantize" for f in p.families)]
        pareto(structure, self._cost_of)
        return [p for p in structure if p.on_front]

    def _quantized(self) -> list[Point]:
        return [p for p in self.points if p.measured and p.stage == "single"
                and REGISTRY[p.families[0]].search_role == "quantize"]

    def _reaches(self, speedup: float, size: float) -> bool:
        """Whether a predicted point is near enough the cost budget to be worth building."""
        return (self.speed is None or speedup >= 0.9 * self.speed) and \
            (self.budget.max_size_mb is None or size <= 1.1 * self.budget.max_size_mb)

    def _recovered_structure(self) -> list[tuple[str, ...]]:
        """A recovery after the structure points that lost more than a quarter of the floor and that, with the
        fastest quantized level, could reach the cost budget: least loss first."""
        if "recover" not in self.families:
            return []
        quantized = self._quantized()
        q_speed = max([q.speedup for q in quantized], default=1.0)
        q_size = min([q.size_mb / (self.model.byte_size() / 1e6) for q in quantized], default=1.0)
        floor = self.budget.loss_floor()
        todo = sorted((p for p in self._structure_front() if p.stage == "single" and p.loss > 0.25 * floor
                       and self._reaches(p.speedup * max(1.0, q_speed), p.size_mb * min(1.0, q_size))),
                      key=lambda p: p.loss)
        recipes = [p.recipe + (self._recover_spec(),) for p in todo]
        return [r for r in recipes if not self._known(r)][:MAX_RECOVERED]

    def _compositions(self) -> list[tuple[str, ...]]:
        """Structure (alone or recovered) x quantize, predicted from the measured points (speed-ups multiply,
        sizes scale, losses add); the ones predicted to meet the budget, most accurate first."""
        floor = self.budget.loss_floor()
        original_mb = self.model.byte_size() / 1e6
        candidates = []
        for s in self._structure_front():
            for q in self._quantized():
                recipe = s.recipe + q.recipe
                speedup, loss = s.speedup * q.speedup, s.loss + q.loss
                size = s.size_mb * q.size_mb / original_mb
                if not self._known(recipe) and self._reaches(speedup, size) and loss <= 1.5 * floor:
                    candidates.append((loss, -speedup, recipe, {"speedup": round(speedup, 3), "loss": loss,
                                                                "size_mb": round(size, 3)}))
        candidates.sort(key=lambda c: (c[0], c[1]))
        self._predicted = {c[2]: c[3] for c in candidates}
        return [c[2] for c in candidates[:MAX_COMPOSED]]

    def _recoveries(self) -> list[tuple[str, ...]]:
        """A recovery after measured compositions that meet the cost but miss the floor, nearest the floor first
        (it counts only where its own measured figures are better)."""
        if "recover" not in self.families:
            return []
        near = sorted((p for p in self.points if p.measured and p.stage == "composed" and not p.cost_violations
                       and p.floor_violations), key=lambda p: p.loss)
        recipes = [p.recipe + (self._recover_spec(),) for p in near]
        return [r for r in recipes if not self._known(r)][:MAX_RECOVERED]

    def _recover_spec(self) -> str:
        # fixed (not derived from the time bound), so that a re-run with another bound finds it in the cache
        return create("recover", {"max_minutes": RECOVER_MINUTES}).spec()

    def _left_to_structure(self) -> float | None:
        """The speed-up the structure families must bring on top of the fastest quantized point within the
        floor (the whole target when there is none)."""
        if self.speed is None:
            return None
        within = [q.speedup for q in self._quantized() if not q.floor_violations]
        return max(1.1, self.speed / max([1.0] + within))

    # ----------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, executor, recipes: list[tuple[str, ...]], stage: str) -> None:
        """Build (in waves of one per worker) and measure each recipe, until the time bound."""
        say = self.ctx.progress
        predicted = getattr(self, "_predicted", {}) if stage == "composed" else {}
        pending = [Point(len(self.points) + i + 1, r, stage, predicted=predicted.get(r)) for i, r in enumerate(recipes)]
        self.points += pending
        wave = max(1, executor.workers)
        for start in range(0, len(pending), wave):
            if time.perf_counter() >= self.deadline:
                for p in pending[start:]:
                    p.status, p.reason = "not built", f"the time bound ({self.max_minutes:g} min) was reached"
                self.stopped_by_time = True
                say(f"search: time bound reached; {len(pending) - start} {stage} candidates not built")
                return
            points = pending[start:start + wave]
            jobs = [self._job(p.recipe) for p in points]
            fresh = [(p, j) for p, j in zip(points, jobs) if not self._from_cache(p, j)]
            for p, _ in fresh:
                say(f"search: [{p.id}] building {p.label}")
            for (p, job), built in zip(fresh, executor.map([j for _, j in fresh])):
                p.built, p.build_seconds = built, built.seconds
                self.cache.put(job, built)
            for p in points:  # timed only now: no build is running
                self._measure(p)
                say(f"search: [{p.id}] {p.label}: {self._describe(p)}")
                if p.feasible and self.first_valid is None:
                    self.first_valid = time.perf_counter()

    def _confirm(self) -> None:
        """Time the candidates within the floor again, the fastest first (at most CONFIRMED), all in one
        interleaved measurement with the original and longer: one noisy first timing must not decide the
        choice. Their figures on the front are these."""
        within = sorted((p for p in self.points if p.measured and not p.floor_violations),
                        key=lambda p: -p.speedup)[:CONFIRMED]
        if not within:
            return
        self.ctx.progress(f"search: timing the {len(within)} fastest candidates within the floor again, together")
        sessions = [self.original_session] + [make_session(built_model(p.built), self.ctx.runtime) for p in within]
        lat = measure_latencies(sessions, self.feed, threads=self.ctx.runtime.intra_op_threads, min_seconds=1.0,
                                max_seconds=10.0)
        for p, t in zip(within, lat[1:]):
            p.first_speedup = p.speedup
            p.original_ms, p.latency_ms = lat[0].median_ms, t.median_ms
            p.speedup = p.original_ms / p.latency_ms
            p.cost_violations = self.budget.cost_violations(p.speedup, p.latency_ms, p.size_mb)
            if p.feasible and self.first_valid is None:
                self.first_valid = time.perf_counter()
        self.notes.append(f"the {len(within)} fastest candidates within the floor were timed again together with "
                          "the original; their speed-ups are from that measurement (the first one in "
                          "'first_speedup')")

    def _job(self, recipe: tuple[str, ...]) -> Job:
        return Job(tuple(DEFAULT_RECIPE) + recipe, self.job_runtime, self.ctx.latency_batch, self.ctx.latency_shapes,
                   dict(self.ctx.output_kinds), self.ctx.seed)

    def _from_cache(self, p: Point, job: Job) -> bool:
        built = self.cache.get(job)
        if built is None:
            return False
        p.built, p.build_seconds, p.cached = built, built.seconds, True
        return True

    def _measure(self, p: Point) -> None:
        built = p.built
        if built.model_bytes is None:
            p.status, p.reason = "failed", built.error
            return
        rolled = [r for r in built.report["passes"] if r["status"] == "rolled back"]
        if rolled:
            p.status = "failed"
            p.reason = "; ".join(f"{r['name']} rolled back: {r['reason']}" for r in rolled)
            return
        try:
            session = make_session(built_model(built), self.ctx.runtime)
            outputs = run(session, self.selection)
            metrics = compare_outputs(self.original_outputs, outputs, self.scores)
        except Exception as exc:  # a candidate that does not run is a failed candidate, not a failed search
            p.status, p.reason = "failed", f"onnxruntime: {str(exc).strip().splitlines()[0]}"
            return
        lat = measure_latencies([self.original_session, session], self.feed, threads=self.ctx.runtime.intra_op_threads)
        p.original_ms, p.latency_ms = lat[0].median_ms, lat[1].median_ms
        p.speedup = p.original_ms / p.latency_ms
        p.size_mb = len(built.model_bytes) / 1e6
        p.fidelity = Fidelity.of(metrics, outputs, self.original_outputs, self.selection_labels, self.scores)
        p.loss = self.budget.loss(p.fidelity)
        p.cost_violations = self.budget.cost_violations(p.speedup, p.latency_ms, p.size_mb)
        p.floor_violations = self.budget.fidelity_violations(p.fidelity)
        p.status = "measured"

    def _describe(self, p: Point) -> str:
        if not p.measured:
            return f"{p.status}: {p.reason}"
        f = p.fidelity
        figures = [f"{p.speedup:.2f}x ({p.latency_ms:.3f} ms)", f"{p.size_mb:.2f} MB", f"cosine {f.cosine:.4f}"]
        if f.agreement is not None:
            figures.append(f"agreement {f.agreement:.2%}")
        if f.drop is not None:
            figures.append(f"accuracy {f.accuracy:.2f}% ({-f.drop:+.2f} pt)")
        verdict = "meets the budget" if p.feasible else "; ".join(p.cost_violations + p.floor_violations)
        return ", ".join(figures) + f" on selection; built in {p.build_seconds:.1f} s" \
            + (" (cached)" if p.cached else "") + f" -- {verdict}"

    # ---------------------------------------------------------------------------------------- explanation
    def _explain(self, chosen: Point | None) -> dict[str, str]:
        out = {}
        for family in self.families:
            mine = [p for p in self.points if family in p.families]
            alone = [p for p in mine if p.stage == "single"]
            measured = [p for p in alone if p.measured]
            if REGISTRY[family].search_role == "recover":
                used = [p for p in mine if p.measured]
                gains = []
                for p in used:
                    before = next((q for q in self.points if q.measured and q.recipe == p.recipe[:-1]), None)
                    if before is not None and p.recipe[-1].startswith("recover"):
                        gains.append(f"{before.label}: loss {_loss(before)} -> {_loss(p)}")
                text = (f"tried after {len(mine)} candidates" + (f" ({'; '.join(gains)})" if gains else "")
                        if mine else "not tried: no structure point lost enough to need it, or no time was left")
            elif not alone or all(p.status == "not built" for p in alone):
                text = "not tried (the time bound came first)"
            elif not measured:
                text = "not applicable: " + alone[0].reason
            else:
                best = min(measured, key=lambda p: p.loss)
                fastest = min(measured, key=self._cost_of)
                text = (f"alone: {len(measured)} of {len(alone)} levels measured; fastest {fastest.label} "
                        f"{fastest.speedup:.2f}x at loss {_loss(fastest)}, most faithful {best.label} "
                        f"{best.speedup:.2f}x at loss {_loss(best)}")
            if chosen is not None:
                step = next((s for s in chosen.recipe if s.split(":")[0] == family), None)
                if step:
                    text += f". Chosen: {step}, in the most faithful recipe that met the budget"
                else:
                    text += ". Not in the chosen recipe: the chosen point met the budget with less loss without it"
            out[family] = text
        return out


def built_model(built: Built) -> Model:
    import onnx

    return Model.from_proto(onnx.load_from_string(built.model_bytes))


def _loss(p: Point) -> str:
    return "-" if p.loss is None else f"{p.loss:.4g}"


def _finite(x):
    return None if x is None or not math.isfinite(x) else x


def search(model: Model, ctx: Context, budget: Budget, **kw) -> SearchResult:
    """Find a recipe for `model` within `budget` (see the module docstring); `ctx.inputs` must be split three ways."""
    return Search(model, ctx, budget, **kw).run()


__all__ = ["Search", "SearchResult", "Point", "pareto", "search", "searchable", "built_model", "verify_choice", "DEFAULT_MAX_MINUTES"]


def verify_choice(model: Model, point: Point, ctx: Context, result: SearchResult, measure_latency: bool = True):
    """The chosen candidate against the original on every verification sample (no build and no choice read
    them): numerics (and at a second size where inputs are dynamic), accuracy against labels, latency and the
    budget. Returns (model, Report)."""
    from ..core.calibration import second_size_feeds, shapes_text
    from ..passes.base import DEFAULT_VERIFIER
    from ..report import ModelStats, PassRecord, Report

    budget, inputs = result.budget, ctx.inputs
    candidate = built_model(point.built)
    scores = ctx.class_scores(model)
    feeds = inputs.verification
    ctx.progress(f"verifying the chosen candidate on {len(feeds)} verification samples")
    ref_session, new_session = make_session(model, ctx.runtime), make_session(candidate, ctx.runtime)
    ref_out, new_out = run(ref_session, feeds), run(new_session, feeds)
    metrics = compare_outputs(ref_out, new_out, scores)
    resized, note = second_size_feeds(model, feeds)
    if resized:
        metrics += compare_outputs(run(ref_session, resized), run(new_session, resized), scores,
                                   suffix=f" @ {shapes_text(resized[0])}")
    labels = inputs.labels["verification"] if inputs.labels is not None else None
    fidelity = Fidelity.of(metrics, new_out, ref_out, labels, scores)
    report = Report(before=ModelStats.of(model), tolerance=budget.tolerance(), inputs=inputs.counts(),
                    runtime=ctx.runtime)
    report.inputs["second_size"] = note if resized else f"none ({note})"
    report.passes = [PassRecord.from_dict(d) for d in point.built.report["passes"]]
    report.after = ModelStats.of(candidate)
    report.metrics = metrics
    report.violations = budget.tolerance().violations(metrics)
    if fidelity.drop is not None:
        report.accuracy = {"original": fidelity.accuracy_original, "optimized": fidelity.accuracy,
                           "drop": fidelity.drop, "samples": sum(len(x) for x in labels)}
        if budget.max_drop is not None and not fidelity.drop <= budget.max_drop:
            report.violations.append(f"accuracy drop {fidelity.drop:.2f} points > {budget.max_drop:g}")
    if measure_latency:
        ctx.progress("measuring latency (original, then the chosen candidate)")
        report.latency_shape, report.latency_before, report.latency_after = \
            DEFAULT_VERIFIER.latencies(model, candidate, ctx)
    latency_ms = report.latency_after.median_ms if report.latency_after else None
    report.violations += [f"at verification: {v}" for v in budget.cost_violations(
        report.speedup, latency_ms, candidate.byte_size() / 1e6)]
    report.search = result.to_dict()
    report.search["verified"] = point.id
    report.seconds = result.seconds
    applied = [r.spec for r in report.passes if r.status == "applied"]
    return candidate.with_provenance(applied), report
