"""Run passes in order, verify each result in onnxruntime, roll back what breaks it, and verify the end result
against the original with the user's bound.

Two levels of checks:
- each pass against its own input, with its own bound: an exact pass keeps the strict default (relative L2
  <= 1e-4) in any pipeline; a lossy pass gets the guard (cosine >= 0.9, relative L2 <= 0.45); when the user
  gave bounds, a pass must also keep the model within them against the original, else it is rolled back;
- the end result against the original, with the user's bound (default: strict when every pass is exact, the
  guard otherwise).
A pass judged against the original (`recover`) is compared with the original before and after it, and rolled back
if it moved the model further away; the lossy passes before it only have to give a valid model without new
NaN/Inf, and the user's bounds apply from the recovery on.
Both run on the *verification* samples, which no pass reads; per-pass checks on up to 32 of them, the final
check on all. Models with dynamic dims are also checked at a second size (see second_size_feeds).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass

import onnx

from .core.calibration import InputSet, second_size_feeds, shapes_text
from .core.errors import GraphoptError, InputError, UsageError, VerificationError
from .core.model import Model
from .core.numerics import OutputMetrics, Tolerance, compare_outputs
from .core.runtime import make_session
from .passes.base import DEFAULT_VERIFIER, Context, Pass, PassResult, Verifier
from .report import ModelStats, PassRecord, Report

MAX_VERIFY_SAMPLES_PER_PASS = 32  # per-pass checks use a subset; the final check uses every verification sample
MIN_VERIFICATION_SAMPLES = 16  # below this a lossy run warns: its figures rest on too few samples


@dataclass
class Pipeline:
    passes: list[Pass]
    tolerance: Tolerance | None = None  # the user's bound on the end result; None: strict, or the lossy guard
    measure_latency: bool = True
    strict: bool = False  # a pass that fails verification fails the run instead of being rolled back
    allow_few_samples: bool = False  # let a lossy run verify on a single sample (which the passes also read)
    # False: a lossy pass only has to give a valid model without new NaN/Inf (a search judges its candidates
    # against the user's floor itself, and a stronger level must be measured, not rolled back)
    pass_guard: bool = True

    def __post_init__(self):
        for p in self.passes:
            if not isinstance(p, Pass):
                raise UsageError(f"{p!r} is not a graphopt pass")
        if self.tolerance is not None and not self.tolerance.is_set():
            self.tolerance = None

    @property
    def lossy(self) -> bool:
        return any(not p.exact for p in self.passes)

    def final_tolerance(self) -> Tolerance:
        return self.tolerance or Tolerance.default_for(lossy=self.lossy)

    def run(self, model: Model, ctx: Context) -> tuple[Model, Report]:
        inputs = ctx.inputs
        if inputs is None or not inputs.verification:
            raise UsageError("the pipeline needs inputs to verify against (Context.inputs)")
        started = time.perf_counter()
        for p in self.passes:
            p.preflight(model, inputs)
        warnings = self._check_samples(inputs)
        for w in warnings:
            print(f"graphopt: warning: {w}", file=sys.stderr)
        tolerance = self.final_tolerance()
        scores = ctx.class_scores(model)
        if tolerance.min_top1_agreement is not None and not scores:
            raise UsageError(f"--min-agreement needs a class-score output, and {', '.join(model.output_names())} "
                             "is not one (say --output-kind NAME=scores if it is, or bound --min-cosine/--max-error)")

        verification = inputs.verification
        resized, resized_note = second_size_feeds(model, verification)
        _session_or_error(model, ctx, "the input model")
        ctx.progress(f"running the original model on {len(verification)} verification samples"
                     + (f" (and {len(resized)} at a second size: {resized_note})" if resized else ""))
        checks = _Checks(ctx, scores, verification, resized, model)
        original = checks.original_outputs()
        if resized and original.resized is None:
            resized_note = f"skipped: the original model does not run at {resized_note}"
            checks.resized = []
        report = Report(before=ModelStats.of(model), tolerance=tolerance, inputs=inputs.counts(),
                        runtime=ctx.runtime, warnings=warnings)
        report.inputs["second_size"] = resized_note if checks.resized else f"none ({resized_note})"

        if ctx.original is None:
            ctx = dataclasses.replace(ctx, original=model)
        current, current_out = model, original
        for i, p in enumerate(self.passes, 1):
            ctx.progress(f"[{i}/{len(self.passes)}] {p}")
            # a chain followed by a recovery is held to the user's bounds only after the recovery
            recovery_follows = any(q.judged_against == "original" for q in self.passes[i:])
            record, current, current_out = self._apply(p, current, current_out, model, checks, ctx,
                                                       recovery_follows)
            report.passes.append(record)
            if record.status == "rolled back" and self.strict:
                raise VerificationError(f"pass {p.name} failed verification: {record.reason}")

        verifier = next((p.verifier() for p in reversed(self.passes)
                         if p.verifier() is not DEFAULT_VERIFIER and _applied(report, p)), DEFAULT_VERIFIER)
        ctx.progress(f"verifying the final model on every verification sample ({verifier.name})")
        report.metrics = checks.compare(model, current, verifier, limit=None)
        report.violations = tolerance.violations(report.metrics)
        lossy = [r for p, r in zip(self.passes, report.passes) if not p.exact]
        if lossy and not any(r.status == "applied" for r in lossy) and any(r.status == "rolled back" for r in lossy):
            report.violations.append("every lossy pass asked for was rolled back ("
                                     + "; ".join(f"{r.name}: {r.reason}" for r in lossy) + "): the model is unchanged")
        report.after = ModelStats.of(current)
        if self.measure_latency:
            ctx.progress(f"measuring latency (original, then optimized; {verifier.name})")
            report.latency_shape, report.latency_before, report.latency_after = verifier.latencies(model, current, ctx)
        report.seconds = time.perf_counter() - started
        applied = [str(r.spec) for r in report.passes if r.status == "applied"]
        return current.with_provenance(applied), report

    def _check_samples(self, inputs: InputSet) -> list[str]:
        if not self.lossy:
            return []
        if inputs.overlapping and not self.allow_few_samples:
            raise UsageError("a lossy pass needs more than one input sample: with one, the passes would fit, select "
                             "and be verified on the same sample (give more with --calib, or say "
                             "--allow-few-samples to accept that)")
        warnings = []
        if inputs.overlapping:
            warnings.append("one input sample: fitting, selection and verification all used it (--allow-few-samples)")
        elif len(inputs.verification) < MIN_VERIFICATION_SAMPLES:
            warnings.append(f"only {len(inputs.verification)} verification samples (fewer than "
                            f"{MIN_VERIFICATION_SAMPLES}): the reported figures are rough; give more inputs")
        if inputs.synthetic:
            warnings.append("synthetic random inputs: a lossy pass's figures on them say little about real data")
        return warnings

    def _apply(self, p: Pass, model: Model, model_out, original: Model, checks: "_Checks", ctx: Context,
               recovery_follows: bool = False):
        t0 = time.perf_counter()
        record = PassRecord(name=p.name, spec=str(p), exact=p.exact)
        try:
            result: PassResult = p.run(model, ctx)
        except GraphoptError:  # deliberate: bad parameters, bad input, a budget out of reach
            raise
        except Exception as exc:  # a pass bug must not cost the user the other passes' work
            record.status, record.reason = "rolled back", f"pass raised {type(exc).__name__}: {exc}"
            record.seconds = time.perf_counter() - t0
            return record, model, model_out
        record.counters, record.decisions, record.details = result.counters, result.decisions, result.details
        if not result.changed:
            record.status = "unchanged"
            record.seconds = time.perf_counter() - t0
            return record, model, model_out
        # a lossy pass that a recovery follows only has to produce a valid model without new NaN/Inf: how far it
        # may stray is judged after the recovery
        own = Tolerance() if (recovery_follows or not self.pass_guard) and not p.exact else p.tolerance()
        record.tolerance = own.describe()
        verifier = p.verifier()
        problem, candidate_out = checks.validate(result.model, verifier)
        if not problem and p.judged_against == "original":
            # against the original, before and after: it must move the model closer, not only stay in the guard
            reference = checks.original_outputs()
            record.metrics_before = checks.compare_outputs(reference, model_out)
            record.metrics = checks.compare_outputs(reference, candidate_out)
            problem = "; ".join(own.violations(record.metrics) + _moved_away(record.metrics_before, record.metrics))
        elif not problem:
            reference = model_out if verifier is DEFAULT_VERIFIER else checks.reference_outputs(model, verifier)
            record.metrics = checks.compare_outputs(reference, candidate_out)
            problem = "; ".join(own.violations(record.metrics))
        if not problem and self.tolerance is not None and not recovery_follows:
            # the user's bound is on the end result: a pass that already breaks it is not kept
            against = checks.compare(original, result.model, p.verifier())
            record.metrics_vs_original = against
            problem = "; ".join(f"against the original: {v}" for v in self.tolerance.violations(against))
        record.seconds = time.perf_counter() - t0
        if problem:
            record.status, record.reason = "rolled back", problem
            return record, model, model_out
        record.status = "applied"
        return record, result.model, candidate_out


def _moved_away(before: list[OutputMetrics], after: list[OutputMetrics]) -> list[str]:
    """Outputs that ended further from the original than they started: class scores with a lower top-1
    agreement (a distilled model matches softmax scores, which ignore a shift of the logits, so their L2 error
    says little), other outputs with a larger relative L2 error."""
    out = []
    for b, a in zip(before, after):
        if a.top1_agreement is not None and b.top1_agreement is not None:
            if a.top1_agreement < b.top1_agreement:
                out.append(f"{a.name} moved away from the original (top-1 agreement {b.top1_agreement:.2%} -> "
                           f"{a.top1_agreement:.2%})")
        elif a.rel_l2 > b.rel_l2:
            out.append(f"{a.name} moved away from the original (relative L2 {b.rel_l2:.4g} -> {a.rel_l2:.4g})")
    return out


def _applied(report: Report, p: Pass) -> bool:
    return any(r.spec == str(p) and r.status == "applied" for r in report.passes)


@dataclass
class _Outputs:
    main: list  # per verification feed (up to the per-pass limit)
    resized: list | None  # per second-size feed; None when the model did not run on them


class _Checks:
    """Runs models on the verification feeds (and the second-size feeds) and compares them."""

    def __init__(self, ctx: Context, scores, feeds, resized, original: Model):
        self.ctx, self.scores, self.feeds, self.resized, self.original = ctx, scores, feeds, resized, original
        self._original_outputs: dict = {}  # (verifier, limit) -> the original's outputs, computed once

    def outputs(self, model: Model, verifier: Verifier, limit: int | None = MAX_VERIFY_SAMPLES_PER_PASS) -> _Outputs:
        main = verifier.outputs(model, self.feeds[:limit], self.ctx)
        resized = None
        if self.resized:
            try:
                resized = verifier.outputs(model, self.resized, self.ctx)
            except Exception:  # the caller decides what a model that cannot take the second size means
                resized = None
        return _Outputs(main, resized)

    def original_outputs(self) -> _Outputs:
        key = (DEFAULT_VERIFIER.name, MAX_VERIFY_SAMPLES_PER_PASS)
        if key not in self._original_outputs:
            self._original_outputs[key] = self.outputs(self.original, DEFAULT_VERIFIER)
        return self._original_outputs[key]

    def validate(self, candidate: Model, verifier: Verifier = DEFAULT_VERIFIER) -> tuple[str, _Outputs | None]:
        """Empty string when the candidate is valid ONNX and runs (as `verifier` runs it) on both sizes; else why
        not."""
        try:
            if candidate.byte_size() < 2**31:
                onnx.checker.check_model(candidate.proto)
        except onnx.checker.ValidationError as exc:
            return f"onnx.checker rejected the result: {str(exc).strip().splitlines()[0]}", None
        try:
            out = self.outputs(candidate, verifier)
        except (GraphoptError, ValueError) as exc:
            return f"the result does not run in onnxruntime: {exc}", None
        except Exception as exc:  # ORT session creation errors
            return f"onnxruntime rejected the result: {str(exc).strip().splitlines()[0]}", None
        if self.resized and out.resized is None:
            return f"the result does not run at a second input size ({shapes_text(self.resized[0])})", None
        return "", out

    def compare_outputs(self, reference: _Outputs, candidate: _Outputs) -> list[OutputMetrics]:
        metrics = compare_outputs(reference.main, candidate.main, self.scores)
        if self.resized and reference.resized is not None and candidate.resized is not None:
            metrics += compare_outputs(reference.resized, candidate.resized, self.scores,
                                       suffix=f" @ {shapes_text(self.resized[0])}")
        return metrics

    def reference_outputs(self, reference: Model, verifier: Verifier,
                          limit: int | None = MAX_VERIFY_SAMPLES_PER_PASS) -> _Outputs:
        """The reference's outputs as `verifier` runs it (the original's computed once)."""
        if reference is not self.original:
            return self.outputs(reference, verifier, limit)
        key = (verifier.name, limit)
        if key not in self._original_outputs:
            self._original_outputs[key] = self.outputs(reference, verifier, limit)
        return self._original_outputs[key]

    def compare(self, reference: Model, candidate: Model, verifier: Verifier,
                limit: int | None = MAX_VERIFY_SAMPLES_PER_PASS) -> list[OutputMetrics]:
        ref = self.reference_outputs(reference, verifier, limit)
        try:
            return self.compare_outputs(ref, self.outputs(candidate, verifier, limit))
        except ValueError as exc:
            raise VerificationError(f"cannot compare the outputs: {exc}") from None


def _session_or_error(model: Model, ctx: Context, what: str):
    try:
        return make_session(model, ctx.runtime)
    except Exception as exc:
        raise InputError(f"onnxruntime cannot load {what}: {str(exc).strip().splitlines()[0]}") from None
