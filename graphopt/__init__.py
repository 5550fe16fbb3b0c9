"""graphopt: rewrite ONNX graphs to be smaller and faster, and prove in onnxruntime that they still compute
what the original did.

    import graphopt
    model = graphopt.load("model.onnx")
    optimized, report = graphopt.optimize(model, calibration="inputs.npz")
    optimized.save("model.opt.onnx")

Importing the package is cheap: onnx, onnxruntime and numpy load on first use of a name below (module-level
`__getattr__`), so that the console script can catch a Ctrl-C while they load (graphopt/_entry.py).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Callable, Sequence

from ._version import __version__
from .core.errors import GraphoptError, InputError, UsageError, VerificationError
# export.py imports torch and the heavy stack only when called; importing it here binds the function over the
# submodule of the same name, so that `graphopt.export(...)` is the function however the submodule was reached
from .export import ExportResult, export

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers
    from .core.model import Model
    from .core.numerics import Tolerance
    from .core.runtime import RuntimeSettings
    from .passes import Pass
    from .report import Report

# public name -> module that defines it, imported on first access
_LAZY = {
    "InputSet": ".core.calibration", "prepare_inputs": ".core.calibration",
    "Model": ".core.model", "load": ".core.model",
    "Tolerance": ".core.numerics",
    "RuntimeSettings": ".core.runtime",
    "Pipeline": ".pipeline",
    "Report": ".report",
    "TaylorCacheSession": ".passes.taylor_cache", "ddim_sample": ".passes.taylor_cache",
    **{name: ".passes" for name in ("DEFAULT_RECIPE", "REGISTRY", "Context", "Pass", "PassResult", "create",
                                    "parse_pass_spec", "QDQ", "FoldBatchNorm", "FoldConstants", "LowRank", "Prune", "Recover",
                                    "RemoveDead", "RemoveIdentity", "LayerMerge", "TaylorCache")},
}
_SUBPACKAGES = {"core", "analysis", "passes", "pipeline", "report", "recipe", "cli"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBPACKAGES:  # `import graphopt; graphopt.passes.REGISTRY` worked when the import was eager
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def resolve_passes(passes: Sequence[Pass | str] | None) -> list[Pass]:
    """Pass objects, or names / `name:key=value` strings looked up in the registry; None means the default."""
    from .passes import DEFAULT_RECIPE, Pass, create, parse_pass_spec

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
    from .core.calibration import prepare_inputs
    from .core.model import Model, load
    from .core.runtime import RuntimeSettings
    from .passes import Context
    from .pipeline import Pipeline

    if not isinstance(model, Model):
        model = load(model)
    inputs = prepare_inputs(model, calibration, input_shapes=input_shapes, seed=seed)
    ctx = Context(inputs=inputs, runtime=runtime or RuntimeSettings(), seed=seed,
                  progress=progress or (lambda message: None), latency_batch=latency_batch,
                  output_kinds=dict(output_kinds or {}))
    pipeline = Pipeline(resolve_passes(passes), tolerance, measure_latency, strict, allow_few_samples)
    return pipeline.run(model, ctx)


__all__ = ["__version__", "load", "optimize", "Model", "Pipeline", "Context", "Pass", "PassResult", "Report",
           "Tolerance", "RuntimeSettings", "InputSet", "REGISTRY", "DEFAULT_RECIPE", "QDQ", "Prune", "LowRank", "Recover", "FoldBatchNorm",
           "FoldConstants", "RemoveDead", "RemoveIdentity", "GraphoptError", "InputError", "UsageError",
           "VerificationError", "resolve_passes", "export", "ExportResult", "LayerMerge", "TaylorCache", "TaylorCacheSession",
           "ddim_sample"]
