"""Run passes in order, verify each result in onnxruntime against the original, roll back what breaks it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import onnx

from .calibration import InputSet
from .errors import GraphoptError, InputError, UsageError, VerificationError
from .model import Model
from .numerics import OutputMetrics, Tolerance, compare_outputs
from .passes.base import Context, Pass, PassResult
from .report import ModelStats, PassRecord, Report
from .runtime import make_session, measure_latencies, run

MAX_VERIFY_SAMPLES_PER_PASS = 32  # per-pass checks use a subset; the final check uses every validation sample


@dataclass
class Pipeline:
    passes: list[Pass]
    tolerance: Tolerance | None = None  # None: strict for exact passes, a guard when any pass is lossy
    measure_latency: bool = True
    strict: bool = False  # a pass that fails verification fails the run instead of being rolled back

    def __post_init__(self):
        for p in self.passes:
            if not isinstance(p, Pass):
                raise UsageError(f"{p!r} is not a graphopt pass")
        if self.tolerance is None:
            self.tolerance = Tolerance.default_for(lossy=any(not p.exact for p in self.passes))

    def run(self, model: Model, ctx: Context) -> tuple[Model, Report]:
        if ctx.inputs is None or not ctx.inputs.validation:
            raise UsageError("the pipeline needs inputs to verify against (Context.inputs)")
        started = time.perf_counter()
        validation = ctx.inputs.validation
        ctx.progress(f"running the original model on {len(validation)} validation samples")
        original_session = _session_or_error(model, ctx, "the input model")
        reference = run(original_session, validation)
        report = Report(before=ModelStats.of(model), tolerance=self.tolerance, inputs=_describe(ctx.inputs),
                        runtime=ctx.runtime)

        current = model
        for i, p in enumerate(self.passes, 1):
            ctx.progress(f"[{i}/{len(self.passes)}] {p}")
            record, current = self._apply(p, current, ctx, validation[:MAX_VERIFY_SAMPLES_PER_PASS],
                                          reference[:MAX_VERIFY_SAMPLES_PER_PASS])
            report.passes.append(record)
            if record.status == "rolled back" and self.strict:
                raise VerificationError(f"pass {p.name} failed verification: {record.reason}")

        ctx.progress("verifying the final model on every validation sample")
        final_session = make_session(current, ctx.runtime)
        report.metrics = compare_outputs(reference, run(final_session, validation))
        report.violations = self.tolerance.violations(report.metrics)
        report.after = ModelStats.of(current)
        if self.measure_latency:
            ctx.progress("measuring latency (original, then optimized)")
            report.latency_before, report.latency_after = measure_latencies(
                [original_session, final_session], validation[0], threads=ctx.runtime.intra_op_threads)
        report.seconds = time.perf_counter() - started
        applied = [str(r.spec) for r in report.passes if r.status == "applied"]
        return current.with_provenance(applied), report

    def _apply(self, p: Pass, model: Model, ctx: Context, feeds, reference) -> tuple[PassRecord, Model]:
        t0 = time.perf_counter()
        record = PassRecord(name=p.name, spec=str(p))
        try:
            result: PassResult = p.run(model, ctx)
        except GraphoptError:  # deliberate: bad parameters, bad input, a budget out of reach
            raise
        except Exception as exc:  # a pass bug must not cost the user the other passes' work
            record.status, record.reason = "rolled back", f"pass raised {type(exc).__name__}: {exc}"
            record.seconds = time.perf_counter() - t0
            return record, model
        record.counters, record.decisions, record.details = result.counters, result.decisions, result.details
        if not result.changed:
            record.status = "unchanged"
            record.seconds = time.perf_counter() - t0
            return record, model
        problem, metrics = _verify(result.model, ctx, feeds, reference, self.tolerance)
        record.metrics = metrics
        record.seconds = time.perf_counter() - t0
        if problem:
            record.status, record.reason = "rolled back", problem
            return record, model
        record.status = "applied"
        return record, result.model


def _verify(candidate: Model, ctx: Context, feeds, reference, tolerance: Tolerance
            ) -> tuple[str, list[OutputMetrics]]:
    """Empty string when the candidate is valid ONNX, runs in ORT and stays within tolerance; else why not."""
    try:
        if candidate.byte_size() < 2**31:
            onnx.checker.check_model(candidate.proto)
    except onnx.checker.ValidationError as exc:
        return f"onnx.checker rejected the result: {str(exc).strip().splitlines()[0]}", []
    try:
        session = make_session(candidate, ctx.runtime)
        outputs = run(session, feeds)
        metrics = compare_outputs(reference, outputs)
    except (GraphoptError, ValueError) as exc:
        return f"the result does not run in onnxruntime: {exc}", []
    except Exception as exc:  # ORT session creation errors
        return f"onnxruntime rejected the result: {str(exc).strip().splitlines()[0]}", []
    violations = tolerance.violations(metrics)
    return ("; ".join(violations), metrics) if violations else ("", metrics)


def _session_or_error(model: Model, ctx: Context, what: str):
    try:
        return make_session(model, ctx.runtime)
    except Exception as exc:
        raise InputError(f"onnxruntime cannot load {what}: {str(exc).strip().splitlines()[0]}") from None


def _describe(inputs: InputSet) -> dict:
    return {"calibration_samples": len(inputs.calibration), "validation_samples": len(inputs.validation),
            "synthetic": inputs.synthetic}
