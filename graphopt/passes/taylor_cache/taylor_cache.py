"""The Taylor-cache pass: find the block stack of a one-step denoiser, choose the regions of a level, lower them
(`if`, `split` or `lite`), record the schedule in the model's metadata, and check a few trajectories.

The pass fits nothing and reads no verification sample: the labels of at most `CHECK_LABELS` fit samples give the
per-step and final-sample errors of its report; the pipeline verifies on the verification labels through
TrajectoryVerifier (the same sampler, full model against cached model, from the same noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...analysis.blocks import BlockStack, NoBlockStack, find_block_stack
from ...analysis.depgraph import DependencyGraph
from ...core.calibration import InputSet
from ...core.editing import has_subgraph
from ...core.errors import InputError
from ...core.model import Model
from ...core.numerics import Tolerance
from ...core.runtime import make_session
from ..base import Context, Decision, Pass, PassResult, register
from .ddim import sampler_roles, timesteps
from .lower import lower_if, with_meta
from .plan import LEVELS, Region, regions, targets_for
from .schedule import Schedule
from .session import TaylorCacheSession, node_arg
from .verify import TrajectoryVerifier

LOWERINGS = ("if", "split", "lite")
CHECK_LABELS = 8
CHECK_SEED = 1_000_003  # the pass's own check trajectories use other noise than the verifier's


@register
@dataclass(frozen=True)
class TaylorCache(Pass):
    """TaylorSeer / CG-Taylor feature forecasting across sampler steps, as graph state (lossy)."""

    name = "taylor_cache"
    description = "forecast transformer blocks across diffusion steps (TaylorSeer / CG-Taylor), state as graph I/O (lossy)"
    exact = False

    level: str = "module"      # module (TaylorSeer: attention/MLP before the gate) | block (residuals) | last (CG-Taylor)
    lowering: str = "if"       # if (one model) | split (region models, driver decides) | lite (driver forecasts the output)
    order: int = 2             # Taylor order (0: reuse, FORA)
    interval: int = 4          # fixed schedule: one full step then interval - 1 forecast steps
    warmup: int = 2            # first steps always full
    tail: int = 1              # last steps always full
    threshold: float | None = None  # CG-Taylor gate: forecast when block 0's relative forecast error is below it
    gate_order: int = 3        # order of block 0's own forecast (the gate's reference)
    steps: int = 50            # sampler steps per trajectory (the schedule's length)
    # the verifier's sampler: DDIM with this guidance (1: none) and null class
    guidance: float = 1.0
    null_class: int | None = None
    max_sample_error: float = 0.15  # relative L2 of the final samples against full compute from the same noise

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.lowering not in LOWERINGS:
            raise ValueError(f"lowering must be one of {', '.join(LOWERINGS)}, got {self.lowering!r}")
        if self.lowering == "lite" and self.threshold is not None:
            raise ValueError("the gate needs block 0 in the graph: lowering=lite has no gate (use if or split)")
        self.schedule()
        timesteps(self.steps)
        if not self.max_sample_error > 0:
            raise ValueError(f"max_sample_error must be positive, got {self.max_sample_error}")
        if self.guidance != 1.0 and self.null_class is None:
            raise ValueError("guidance needs null_class (the label of 'no class')")

    def schedule(self) -> Schedule:
        return Schedule(self.steps, self.interval, self.order, self.warmup, self.tail, self.threshold, self.gate_order)

    def tolerance(self) -> Tolerance:
        return Tolerance(max_rel_l2=self.max_sample_error)

    def verifier(self) -> TrajectoryVerifier:
        return TrajectoryVerifier(self.steps, self.guidance, self.null_class, seed=0)

    def preflight(self, model: Model, inputs: InputSet) -> None:
        if any(has_subgraph(n) for n in model.graph.node):
            raise InputError("the model already has If/Loop/Scan nodes (is it cached already?): taylor_cache "
                             "rewrites plain one-step denoisers")
        sampler_roles([node_arg(v) for v in model.graph.input if v.name not in model.constant_names()])
        if self.lowering != "lite":
            self.find(model)

    # ------------------------------------------------------------------ building
    def find(self, model: Model) -> tuple[DependencyGraph, BlockStack]:
        graph = DependencyGraph(model)
        try:
            return graph, find_block_stack(graph)
        except NoBlockStack as exc:
            raise InputError(f"taylor_cache needs a stack of repeated transformer blocks: {exc} "
                             "(lowering=lite needs none: it forecasts the model's output)") from None

    def plan(self, model: Model) -> tuple[BlockStack | None, list[Region], str | None]:
        if self.lowering == "lite":
            return None, [], None
        graph, stack = self.find(model)
        gate = stack.blocks[0].output if self.threshold is not None else None
        regs = regions(graph, targets_for(stack, self.level, gate is not None), {gate} if gate else set())
        empty = [r.name for r in regs if len(r.nodes) < 1]
        if empty:
            raise InputError(f"regions {', '.join(empty)} skip no node: nothing to forecast")
        return stack, regs, gate

    def build(self, model: Model) -> Model:
        """The cached model (no checks): what `run` returns, for scripts and tests."""
        return self._build(model)[0]

    def _build(self, model: Model):
        stack, regs, gate = self.plan(model)
        infos = DependencyGraph(model)._infos if regs else {}
        ranks = {}
        for t in [r.target for r in regs] + ([gate] if gate else []):
            shape = infos[t].shape if t in infos else None
            if shape is None:
                raise InputError(f"the rank of {t} is unknown (shape inference could not tell): cannot size its state")
            ranks[t] = len(shape)
        meta = {"version": 1, "lowering": self.lowering, "level": self.level if regs else "output",
                "schedule": self.schedule().to_dict(),
                "regions": [{"name": r.name, "target": r.target, "base": r.base, "rank": ranks[r.target],
                             "nodes": len(r.nodes)} for r in regs],
                "gate": {"tensor": gate, "rank": ranks[gate]} if gate else None,
                "inputs": [v.name for v in model.graph.input if v.name not in model.constant_names()],
                "outputs": model.output_names()}
        if self.lowering == "if":
            cached = lower_if(model, regs, ranks, self.order, gate, self.gate_order, meta)
        else:
            cached = with_meta(model, meta)
        return cached, stack, regs, gate

    # ------------------------------------------------------------------ the pass
    def run(self, model: Model, ctx: Context) -> PassResult:
        cached, stack, regs, gate = self._build(model)
        ctx.progress(f"taylor_cache: {stack.describe() if stack else 'lite: the output is forecast'}; "
                     f"{len(regs)} region(s), lowering {self.lowering}")
        decisions = []
        if stack is not None:
            decisions.append(Decision("block stack", "found", stack.describe()))
        check = self._check(model, cached, ctx)
        per_row = check["state_bytes_per_row"]
        for r in regs:
            decisions.append(Decision(r.name, "forecast", f"{r.target}: {len(r.nodes)} nodes skipped on forecast "
                                      f"steps; state {per_row.get(r.state, 0) / 1024:.1f} KiB per sample row"))
        if gate:
            decisions.append(Decision("gate", "block 0 always runs",
                                      f"forecast when mean|forecast - {gate}| / mean|{gate}| < {self.threshold:g}"))
        if self.lowering == "lite":
            decisions.append(Decision("model output", "forecast", "no graph change: the driver forecasts the output"))
        counters = {"steps": self.steps, "regions": len(regs),
                    "full_steps": check["full_steps"],
                    "nodes_skipped_on_forecast_steps": sum(len(r.nodes) for r in regs),
                    "state_kib_per_sample_row": round(sum(per_row.values()) / 1024, 1),
                    "check_final_sample_error": round(check["final_error"], 5),
                    "check_mean_step_error": round(float(np.mean(check["step_errors"])), 5)}
        details = {"schedule": self.schedule().to_dict(), "check": check,
                   "stack": stack.describe() if stack else None,
                   "regions": [{"name": r.name, "target": r.target, "base": r.base, "nodes": len(r.nodes)}
                               for r in regs]}
        return PassResult(cached, True, counters, decisions, details)

    def _check(self, model: Model, cached: Model, ctx: Context) -> dict:
        """Errors of a few trajectories on fit labels, from the same noise: per step the cached model's output
        against the full model's (each along its own trajectory), and the final samples."""
        verifier = self.verifier()
        feeds = (ctx.inputs.fit if ctx.inputs and ctx.inputs.fit else [])[:CHECK_LABELS]
        full_sess = make_session(model, ctx.runtime)
        cached_sess = TaylorCacheSession(cached, runtime=ctx.runtime)
        if feeds:
            labels, shape = verifier.labels(full_sess, feeds)
            labels = np.concatenate(labels)[:CHECK_LABELS]
        else:
            labels, shape = np.zeros(1, np.int64), None
        eps_full, eps_cached = _Recorder(full_sess), _Recorder(cached_sess)
        ref = verifier.sample(eps_full, labels, shape, seed=CHECK_SEED)
        new = verifier.sample(eps_cached, labels, shape, seed=CHECK_SEED)
        step_errors = [float(np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-12))
                       for a, b in zip(eps_full.outputs, eps_cached.outputs)]
        final = float(np.linalg.norm(new - ref) / max(np.linalg.norm(ref), 1e-12))
        per_row = {}
        rows = len(eps_cached.outputs[0]) if eps_cached.outputs else 1
        for name, state in cached_sess.states.items():
            per_row[name] = state.nbytes / max(1, rows)
        return {"labels": len(labels), "full_steps": cached_sess.full_steps, "schedule": cached_sess.history,
                "step_errors": step_errors, "final_error": final, "state_bytes_per_row": per_row,
                "gate_errors": cached_sess.gate_errors}


class _Recorder:
    """A session wrapper that keeps every step's first output."""

    def __init__(self, session):
        self.session, self.outputs = session, []

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    @property
    def schedule(self):
        return getattr(self.session, "schedule", None)

    def reset(self):
        if hasattr(self.session, "reset"):
            self.session.reset()
        self.outputs = []

    def run(self, names, feed):
        out = self.session.run(names, feed)
        self.outputs.append(np.asarray(out[0]))
        return out
