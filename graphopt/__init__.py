"""graphopt: rewrite ONNX graphs to be smaller and faster, and prove in onnxruntime that they still compute
what the original did.

    import graphopt
    model = graphopt.load("model.onnx")
    optimized, report = graphopt.optimize(model, calibration="inputs.npz")
    optimized.save("model.opt.onnx")
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from ._version import __version__
from .core.calibration import InputSet, prepare_inputs
from .core.errors import GraphoptError, InputError, UsageError, VerificationError
from .export import ExportResult, export  # imports torch only when called; binds the function over the submodule
from .core.model import Model, load
from .core.numerics import Tolerance
from .passes import DEFAULT_RECIPE, REGISTRY, Context, Pass, PassResult, create, parse_pass_spec
from .passes import QDQ, FoldBatchNorm, FoldConstants, LowRank, Prune, RemoveDead, RemoveIdentity
from .pipeline import Pipeline
from .report import Report
from .core.runtime import RuntimeSettings


def resolve_passes(passes: Sequence[Pass | str] | None) -> list[Pass]:
    """Pass objects, or names / `name:key=value` strings looked up in the registry; None means the default."""
    specs = DEFAULT_RECIPE if passes is None else passes
    out = []
    for p in specs:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, str):
            out.append(create(*parse_pass_spec(p)))
        else:
            raise UsageError(f"{p!r} is neither a pass nor a pass name")
    return out


def optimize(model: Model | str | os.PathLike, passes: Sequence[Pass | str] | None = None, calibration=None, *,
             tolerance: Tolerance | None = None, input_shapes: dict | None = None,
             runtime: RuntimeSettings | None = None, seed: int = 0, measure_latency: bool = True,
             strict: bool = False, progress: Callable[[str], None] | None = None, latency_batch: int = 1,
             output_kinds: dict[str, str] | None = None, allow_few_samples: bool = False) -> tuple[Model, Report]:
    """Run passes (default: the cleanup recipe) and verify the result against the original in onnxruntime.

    `calibration` is a path (.npz, .npy, folder) or an onnxruntime CalibrationDataReader; without it, synthetic
    inputs are used (and `input_shapes` must fill any unknown dims). Returns the optimized model and the report;
    check `report.passed` before shipping the model.
    """
    if not isinstance(model, Model):
        model = load(model)
    inputs = prepare_inputs(model, calibration, input_shapes=input_shapes, seed=seed)
    ctx = Context(inputs=inputs, runtime=runtime or RuntimeSettings(), seed=seed,
                  progress=progress or (lambda message: None), latency_batch=latency_batch,
                  output_kinds=dict(output_kinds or {}))
    pipeline = Pipeline(resolve_passes(passes), tolerance, measure_latency, strict, allow_few_samples)
    return pipeline.run(model, ctx)


__all__ = ["__version__", "load", "optimize", "Model", "Pipeline", "Context", "Pass", "PassResult", "Report",
           "Tolerance", "RuntimeSettings", "InputSet", "REGISTRY", "DEFAULT_RECIPE", "QDQ", "Prune", "LowRank", "FoldBatchNorm",
           "FoldConstants", "RemoveDead", "RemoveIdentity", "GraphoptError", "InputError", "UsageError",
           "VerificationError", "resolve_passes", "export", "ExportResult"]
