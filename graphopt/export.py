"""Export a torch.nn.Module to ONNX and prove in onnxruntime that the file computes what torch computes.

    result = graphopt.export(module, {"image": ((1, 3, 224, 224), "float32")}, "model.onnx", dynamic={"image": 0})

Steps: build example inputs, run the module in torch (eval mode), export it with the legacy TorchScript exporter
(`torch.onnx.export(..., dynamo=False)`; the dynamo exporter needs onnxscript), load the result with graphopt's
checks, then run torch and onnxruntime on the same inputs twice and compare every output:

1. on the example inputs;
2. on a second input set in which every dynamic axis has twice its size (doubling keeps sizes divisible by
   whatever the model needs, such as a stride), with fresh random values and attention masks that end in zeros.
   The tracer records one path through the Python code; this check catches control flow on shapes or values that
   it froze, and axes that were declared dynamic but baked in as constants. Without dynamic axes, the second set
   has the same shapes and fresh values.

An output passes when its largest absolute error is at most `atol` (default 1e-4) OR its relative L2 error
||ort - torch|| / ||torch|| is at most `rtol` (default 1e-4): the relative bound judges outputs of any scale
(float32 round-off in a deep model grows with the output's magnitude), the absolute one outputs whose reference is
(near) zero, where a relative error means nothing. Integer and bool outputs must match exactly, and onnxruntime
must not produce NaN/Inf where torch did not. The file is written (atomically, by `Model.save`) only when every
check passed, unless `force=True`.

Generated inputs (a `(shape, dtype)` pair instead of a tensor), seeded: floats standard normal; integers random
token ids in [0, 1000) (fewer for int8/uint8); inputs whose name contains "mask" all ones in the first set and
ones ending in zeros (a different number of zeros per row) in the second; names containing "token_type" zeros.
A `(shape, dtype, (low, high))` triple draws values uniformly from [low, high) instead (integers: the ids an
embedding of `high` rows accepts; CLI `--input tokens=2x7:int64:0..50`). A torch.Tensor or numpy array is used as
it is (CLI `--example FILE.npz`), repeated along its dynamic axes for the second check.

Inputs are passed by keyword when every name is a parameter of the module's `forward` (so `input_ids` and
`attention_mask` reach the right parameters whatever order they are given in, and the ONNX inputs follow
`forward`'s order); otherwise positionally, in the order given. Dynamic axes get symbolic names
`{input}_dim{axis}`.

torch (and numpy, onnx, onnxruntime) are imported inside the functions only: `import graphopt` works without
torch and stays cheap, and graphopt/__init__ imports this module eagerly (so that `graphopt.export` is the
function, not this module).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from typing import TYPE_CHECKING

from .core.errors import InputError, UsageError, VerificationError

if TYPE_CHECKING:
    import numpy as np

    from .core.model import Model

# numpy, onnx and onnxruntime are imported inside the functions, like torch: graphopt/__init__ imports this module,
# and `import graphopt` must stay cheap (the console script catches a Ctrl-C only once it runs, graphopt/_entry.py)

DEFAULT_OPSET = 17
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
TOKEN_ID_HIGH = 1000  # generated integer inputs are token ids in [0, TOKEN_ID_HIGH)
INSTALL_HINT = "pip install graphopt[torch]"

# --input dtype spellings -> torch dtype attribute names
DTYPES = {
    "float32": "float32", "float": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "half": "float16", "fp16": "float16", "f16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "double": "float64", "fp64": "float64", "f64": "float64",
    "int64": "int64", "long": "int64", "i64": "int64",
    "int32": "int32", "int": "int32", "i32": "int32",
    "int16": "int16", "int8": "int8", "uint8": "uint8",
    "bool": "bool",
}


@dataclass
class ExportResult:
    """What `export` produced: the model (what was, or would be, written), where it went, and the checks."""

    model: Model
    path: Path | None  # None when nothing was written (no path given)
    checks: list[dict]  # one dict per torch-vs-onnxruntime check, with per-output metrics
    passed: bool
    warnings: list[str] = field(default_factory=list)  # torch's warnings during export (tracer's first), deduplicated


@dataclass(frozen=True)
class _Input:
    name: str
    shape: tuple[int, ...]
    dtype: str  # canonical torch dtype name
    tensor: Any = None  # a user-given torch.Tensor, or None for generated values
    value_range: tuple | None = None  # generated values drawn from [low, high) instead of the defaults


# ------------------------------------------------------------------------------------------- parsing
_NUMBER = r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?"


def parse_input_option(text: str) -> tuple[str, tuple[int, ...], str, tuple | None]:
    """`image=1x3x224x224`, `input_ids=1x128:int64` or `tokens=2x7:int64:0..50` -> (name, shape, dtype name,
    (low, high) or None); the range is half-open, [low, high)."""
    m = re.fullmatch(r"\s*([^=\s]+)\s*=\s*(\d+(?:x\d+)*)\s*(?::\s*([A-Za-z][A-Za-z0-9_]*)\s*)?"
                     rf"(?::\s*({_NUMBER})\s*\.\.\s*({_NUMBER})\s*)?", text)
    if not m:
        raise UsageError(f"--input {text!r}: expected NAME=SHAPE[:DTYPE[:LOW..HIGH]] such as image=1x3x224x224, "
                         "input_ids=1x128:int64 or input_ids=1x128:int64:0..30522")
    name, dims, dtype = m.group(1), m.group(2), (m.group(3) or "float32")
    shape = tuple(int(d) for d in dims.split("x"))
    if any(d < 1 for d in shape):
        raise UsageError(f"--input {text!r}: every dim must be at least 1")
    dtype = _dtype_name(dtype, f"--input {text!r}")
    value_range = None
    if m.group(4) is not None:
        value_range = _check_range(name, dtype, (float(m.group(4)), float(m.group(5))), f"--input {text!r}")
    return name, shape, dtype, value_range


def parse_input_spec(text: str) -> tuple[str, tuple[int, ...], str]:
    """`image=1x3x224x224` or `input_ids=1x128:int64` -> (name, shape, dtype name); see parse_input_option for
    the form with a value range."""
    return parse_input_option(text)[:3]


def _check_range(name: str, dtype: str, value_range, where: str) -> tuple:
    """(low, high) checked against the dtype: ints for integer inputs, low < high; bool takes none."""
    try:
        low, high = value_range
    except (TypeError, ValueError):
        raise UsageError(f"{where}: the value range must be a (low, high) pair, got {value_range!r}") from None
    if dtype == "bool":
        raise UsageError(f"{where}: a bool input takes no value range")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise UsageError(f"{where}: the value range needs numbers LOW < HIGH (values are drawn from [LOW, HIGH))")
    if dtype.startswith(("int", "uint")):
        import numpy as np

        if not (float(low).is_integer() and float(high).is_integer()):
            raise UsageError(f"{where}: an integer input needs a whole-number range, got {low}..{high}")
        info = np.iinfo(dtype)
        if low < info.min or high - 1 > info.max:
            raise UsageError(f"{where}: {int(low)}..{int(high)} does not fit {dtype} ({info.min}..{info.max + 1})")
        return int(low), int(high)
    return float(low), float(high)


def parse_dynamic_spec(text: str) -> tuple[str, int]:
    """`image=0` -> ("image", 0)."""
    m = re.fullmatch(r"\s*([^=\s]+)\s*=\s*(-?\d+)\s*", text)
    if not m:
        raise UsageError(f"--dynamic {text!r}: expected NAME=AXIS such as image=0")
    return m.group(1), int(m.group(2))


def _dtype_name(dtype, where: str) -> str:
    if not isinstance(dtype, str):  # a torch.dtype or numpy dtype
        dtype = str(dtype).removeprefix("torch.")
    key = dtype.strip().lower()
    if key not in DTYPES:
        raise UsageError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(sorted(set(DTYPES.values())))})")
    return DTYPES[key]


def _normalize_dynamic(dynamic: Mapping[str, Any] | None, shapes: Mapping[str, tuple[int, ...]]
                       ) -> dict[str, list[int]]:
    """{name: axis or axes} -> {name: sorted non-negative axes}, checked against the inputs' ranks."""
    out: dict[str, list[int]] = {}
    for name, axes in (dynamic or {}).items():
        if name not in shapes:
            raise UsageError(f"--dynamic {name}: no input is named {name!r} (inputs: {', '.join(shapes)})")
        rank = len(shapes[name])
        for axis in ([axes] if isinstance(axes, int) else list(axes)):
            if isinstance(axis, bool) or not isinstance(axis, int):
                raise UsageError(f"--dynamic {name}: axis {axis!r} is not an integer")
            if not -rank <= axis < rank:
                raise UsageError(f"--dynamic {name}={axis}: axis out of range, input {name!r} has {rank} dims "
                                 f"(axes 0..{rank - 1})")
            normalized = axis % rank
            if normalized not in out.setdefault(name, []):
                out[name].append(normalized)
        out[name].sort()
    return {k: v for k, v in out.items() if v}


def dim_name(input_name: str, axis: int) -> str:
    return f"{input_name}_dim{axis}"


def _fmt_shape(shape) -> str:
    return "x".join(map(str, shape)) if len(shape) else "scalar"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


# ------------------------------------------------------------------------------------------- torch and callables
def import_torch():
    try:
        import torch
    except ImportError as exc:
        raise UsageError(f"torch is not installed (or failed to import: {_first_line(exc)}); "
                         f"exporting needs it: {INSTALL_HINT}") from None
    return torch


def load_module(target: str, progress: Callable[[str], None] | None = None):
    """`package.module:callable` -> the torch.nn.Module that calling it with no arguments returns.

    The current working directory is importable (as with `python -m`). `callable` may be dotted (`Class.build`);
    an attribute that already is a Module instance is used as it is.
    """
    say = progress or (lambda message: None)
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path \
            or not all(p.isidentifier() for p in module_name.split(".") + attr_path.split(".")):
        raise UsageError(f"{target!r}: expected MODULE:CALLABLE such as models.mobilenet_v2:build")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    say(f"importing {module_name}")
    try:
        py_module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise InputError(f"{target}: no module named {missing!r} (looked in the current folder {cwd} and on "
                             "sys.path)") from None
        if missing == "torch" or missing.startswith("torch."):
            raise UsageError(f"torch is not installed (importing {module_name} needs it): {INSTALL_HINT}") from None
        raise InputError(f"importing {module_name} failed: {_first_line(exc)}") from None
    except Exception as exc:  # the user's module raised while being imported: show what, not our traceback
        raise InputError(f"importing {module_name} failed: {_first_line(exc)}") from None
    obj: Any = py_module
    walked = module_name
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{target}: {walked!r} has no attribute {part!r}"
                             + _available(obj, py_module is obj))
        obj = getattr(obj, part)
        walked += (":" if walked == module_name else ".") + part
    if _is_torch_module(obj):
        return obj
    if not callable(obj):
        raise InputError(f"{target}: is {_describe(obj)}, not a callable that returns a torch.nn.Module")
    say(f"calling {attr_path}()")
    try:
        built = obj()
    except Exception as exc:
        raise InputError(f"calling {target}() failed: {_first_line(exc)}") from None
    if not _is_torch_module(built):
        raise InputError(f"{target}() returned {_describe(built)}, not a torch.nn.Module")
    return built


def _is_torch_module(obj) -> bool:
    torch = sys.modules.get("torch")  # if nothing imported torch yet, nothing can be a torch Module
    return torch is not None and isinstance(obj, torch.nn.Module)


def _available(obj, is_module: bool) -> str:
    if not is_module:
        return ""
    names = [n for n, v in vars(obj).items() if not n.startswith("_") and callable(v)
             and getattr(v, "__module__", None) == obj.__name__]
    return f" (it defines: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})" if names else ""


def _describe(value) -> str:
    text = repr(value)
    text = " ".join(text.split())
    if len(text) > 60:
        text = text[:57] + "..."
    kind = type(value).__name__
    return f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind} ({text})" if value is not None else "None"


# ------------------------------------------------------------------------------------------- inputs
def _resolve_inputs(torch, inputs: Mapping[str, Any]) -> list[_Input]:
    import numpy as np

    if not isinstance(inputs, Mapping) or not inputs:
        raise UsageError("inputs must be a non-empty mapping of input name -> torch.Tensor or (shape, dtype)")
    out = []
    for name, value in inputs.items():
        if not isinstance(name, str) or not name:
            raise UsageError(f"input name {name!r} is not a non-empty string")
        if isinstance(value, np.ndarray):  # an array, e.g. from --example
            value = torch.from_numpy(value.copy())
        if isinstance(value, torch.Tensor):
            out.append(_Input(name, tuple(value.shape), _dtype_name(value.dtype, f"input {name!r}"), value))
            continue
        if not (isinstance(value, (tuple, list)) and len(value) in (2, 3)):
            raise UsageError(f"input {name!r}: expected a torch.Tensor, a numpy array, a (shape, dtype) pair or a "
                             f"(shape, dtype, (low, high)) triple, got {_describe(value)}")
        shape, dtype = value[:2]
        if isinstance(shape, int) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                                             for d in shape):
            raise UsageError(f"input {name!r}: shape {shape!r} must be a tuple of positive ints")
        dtype = _dtype_name(dtype, f"input {name!r}")
        value_range = _check_range(name, dtype, value[2], f"input {name!r}") if len(value) == 3 else None
        out.append(_Input(name, tuple(shape), dtype, value_range=value_range))
    return out


def _generate(torch, spec: _Input, shape: tuple[int, ...], generator, second: bool):
    dtype = getattr(torch, spec.dtype)
    lowered = spec.name.lower()
    if spec.value_range is not None:  # the user's range beats every guess from the name
        low, high = spec.value_range
        if dtype.is_floating_point:
            return (torch.rand(shape, generator=generator) * (high - low) + low).to(dtype)
        return torch.randint(low, high, shape, generator=generator, dtype=dtype)
    if "mask" in lowered:
        mask = torch.ones(shape, dtype=dtype)
        if second and len(shape) >= 1 and shape[-1] >= 2:
            rows = mask.reshape(-1, shape[-1])
            length = shape[-1]
            for r in range(rows.shape[0]):  # padding at the end, a different amount per row, at least one kept
                zeros = min(length - 1, max(1, length // 4) + r)
                rows[r, length - zeros:] = 0
        return mask
    if "token_type" in lowered or "segment" in lowered:
        return torch.zeros(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
    high = min(TOKEN_ID_HIGH, int(torch.iinfo(dtype).max) + 1)
    return torch.randint(0, high, shape, generator=generator, dtype=dtype)


def _grow(torch, tensor, axes: list[int]):
    """A user tensor with each dynamic axis doubled, by repeating it along the axis (values stay valid)."""
    for axis in axes:
        tensor = torch.cat([tensor, tensor], dim=axis)
    return tensor


def _input_sets(torch, specs: list[_Input], dynamic: dict[str, list[int]], seed: int):
    gen1 = torch.Generator().manual_seed(seed)
    gen2 = torch.Generator().manual_seed(seed + 1)
    first, second = {}, {}
    for spec in specs:
        axes = dynamic.get(spec.name, [])
        new_shape = tuple(d * 2 if i in axes else d for i, d in enumerate(spec.shape))
        if spec.tensor is not None:
            first[spec.name] = spec.tensor.detach()
            second[spec.name] = _grow(torch, spec.tensor.detach(), axes)
        else:
            first[spec.name] = _generate(torch, spec, spec.shape, gen1, second=False)
            second[spec.name] = _generate(torch, spec, new_shape, gen2, second=True)
    # with no dynamic axes and only user tensors, the second set would repeat the first
    same = not dynamic and all(s.tensor is not None for s in specs)
    return first, (None if same else second)


def _binding(module, names: list[str]) -> tuple[bool, list[str]]:
    """(by keyword?, names in the order the exporter will number the ONNX inputs)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False, names
    named = [p for p, v in params.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
    if all(n in named for n in names):
        return True, sorted(names, key=named.index)
    positional = [p for p, v in params.items() if v.kind in (v.POSITIONAL_ONLY, v.POSITIONAL_OR_KEYWORD)]
    for i, n in enumerate(names):
        if n in positional and positional.index(n) != i:
            raise UsageError(f"input {n!r} is parameter {positional.index(n) + 1} of forward() but was given "
                             f"as input {i + 1}; name every input after forward()'s parameters "
                             f"({', '.join(named)}) or give them in its order")
    return False, names


def _call(module, feed: dict, by_keyword: bool, order: list[str]):
    if by_keyword:
        return module(**{n: feed[n] for n in order})
    return module(*(feed[n] for n in order))


def _flatten(torch, value, where="forward()") -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(torch, v, where)]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _flatten(torch, v, where)]
    if value is None:
        return []
    raise UsageError(f"{where} returned {_describe(value)} among its outputs; only tensors (in tuples, lists, "
                     "dicts) can be exported")


def _to_numpy(torch, tensor) -> np.ndarray:
    tensor = tensor.detach().to("cpu")
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def _feed_numpy(torch, feed: dict) -> dict[str, np.ndarray]:
    return {k: _to_numpy(torch, v) for k, v in feed.items()}


def _shapes(feed: dict) -> str:
    return ", ".join(f"{k}={_fmt_shape(tuple(v.shape))}" for k, v in feed.items())


# ------------------------------------------------------------------------------------------- export
def export(module, inputs: Mapping[str, Any], path: str | os.PathLike | None = None, *,
           dynamic: Mapping[str, int | Sequence[int]] | None = None, opset: int = DEFAULT_OPSET,
           output_names: Sequence[str] | None = None, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
           overwrite: bool = False, force: bool = False, seed: int = 0,
           progress: Callable[[str], None] | None = None) -> ExportResult:
    """Export `module` to ONNX, check it in onnxruntime against torch, and write it to `path` if given.

    `inputs` maps each input name (in `forward`'s order, unless every name is a `forward` parameter) to a
    torch.Tensor or a `(shape, dtype)` pair such as `((1, 128), "int64")` for generated values. `dynamic` maps an
    input name to the axis or axes that may change size. Raises VerificationError (with the numbers, and the
    ExportResult as `.result`) when onnxruntime disagrees with torch beyond `atol`/`rtol`, in which case nothing
    is written unless `force=True`; then the result comes back with `passed=False`.
    """
    from .core.model import MIN_OPSET
    from .core.runtime import RuntimeSettings, make_session

    say = progress or (lambda message: None)
    torch = import_torch()
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"export() needs a torch.nn.Module, got {_describe(module)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise UsageError(f"opset must be an integer of at least {MIN_OPSET}, got {opset!r}")
    for key, value in (("atol", atol), ("rtol", rtol)):
        if not (isinstance(value, (int, float)) and value >= 0):
            raise UsageError(f"{key} must be a non-negative number, got {value!r}")
    specs = _resolve_inputs(torch, inputs)
    dyn = _normalize_dynamic(dynamic, {s.name: s.shape for s in specs})
    out_path = Path(path) if path is not None else None
    if out_path is not None:
        _check_output_path(out_path, overwrite)

    module.eval()
    by_keyword, order = _binding(module, [s.name for s in specs])
    device = next(iter(module.parameters()), torch.empty(0)).device
    first, second = _input_sets(torch, specs, dyn, seed)
    first = {n: first[n].to(device) for n in order}
    if second is not None:
        second = {n: second[n].to(device) for n in order}

    say(f"running the module in torch on {_shapes(first)}")
    try:
        with torch.no_grad():
            reference = _flatten(torch, _call(module, first, by_keyword, order))
    except UsageError:
        raise
    except Exception as exc:
        raise InputError(f"torch could not run the module on the example inputs ({_shapes(first)}): "
                         f"{_first_line(exc)}{_index_hint(exc, specs)}") from None
    if not reference:
        raise UsageError("forward() returned no tensors; there is nothing to export")
    names = _output_names(output_names, len(reference), order)

    dynamic_axes = {n: {a: dim_name(n, a) for a in axes} for n, axes in dyn.items()}
    say(f"exporting with torch.onnx (TorchScript tracer, opset {opset}"
        + (f", dynamic {', '.join(f'{n}[{a}]' for n, axes in dyn.items() for a in axes)}" if dyn else "") + ")")
    model, export_warnings = _torch_export(torch, module, first, by_keyword, order, names, dynamic_axes, opset)
    for text in export_warnings[:3]:
        say(f"torch warned: {text}")
    if len(export_warnings) > 3:
        say(f"... and {len(export_warnings) - 3} more warnings")
    say(f"exported {len(model.graph.node)} nodes, {model.parameter_count():,} parameters")

    # fatal-only ORT log: a run that fails is reported by us, in one line, not also by ORT's logger on stderr
    session = make_session(model, RuntimeSettings(log_severity=4))
    integer_outputs = {n for n, t in zip(names, reference)
                       if not (t.dtype.is_floating_point or t.dtype.is_complex)}
    sets = [("example inputs", first, reference)]
    if second is not None:
        sets.append(("dynamic axes doubled" if dyn else "fresh values", second, None))
    checks = []
    for i, (label, feed, ref) in enumerate(sets, 1):
        say(f"check {i}/{len(sets)}: torch vs onnxruntime on {label} ({_shapes(feed)})")
        if ref is None:
            try:
                with torch.no_grad():
                    ref = _flatten(torch, _call(module, feed, by_keyword, order))
            except Exception as exc:
                hint = _index_hint(exc, specs) or ("; is every axis given with --dynamic really free, and is it "
                                                   "given for every input that shares it?")
                raise InputError(f"torch itself cannot run the module on the second check's inputs "
                                 f"({_shapes(feed)}, every dynamic axis doubled): {_first_line(exc)}{hint}") from None
        checks.append(_check(torch, label, feed, ref, names, session, atol, rtol, integer_outputs))

    passed = all(c["passed"] for c in checks)
    result = ExportResult(model=model, path=None, checks=checks, passed=passed, warnings=export_warnings)
    if not passed and not force:
        exc = VerificationError(_failure_message(checks, atol, rtol, export_warnings)
                                + (f"; nothing written to {out_path} (--force writes it)" if out_path else ""))
        exc.result = result
        raise exc
    if out_path is not None:
        model.save(out_path, overwrite=overwrite)
        result.path = out_path
    return result


def _index_hint(exc: BaseException, specs: list[_Input]) -> str:
    """When torch fails on an index (an embedding lookup past the table's end), name the generated integer inputs
    whose values were a guess, and how to give their range or real values."""
    if not (isinstance(exc, IndexError) or "index out of range" in str(exc)):
        return ""
    guessed = [s for s in specs if s.tensor is None and s.value_range is None and s.dtype.startswith(("int", "uint"))
               and not any(k in s.name.lower() for k in ("mask", "token_type", "segment"))]
    if not guessed:
        return ""
    forms = " ".join(f"--input {s.name}={_fmt_shape(s.shape)}:{s.dtype}:0..N" for s in guessed)
    return (f"; the generated integer input{'s' if len(guessed) > 1 else ''} "
            f"{', '.join(repr(s.name) for s in guessed)} held token ids in [0, {TOKEN_ID_HIGH}): give the valid "
            f"range with {forms} (N: the rows of the table it indexes), or real values with --example FILE.npz "
            "(from Python: a (shape, dtype, (0, N)) triple or a tensor)")


def _check_output_path(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists; pass --overwrite (overwrite=True) to replace it")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected an .onnx file name")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: output folder does not exist")


def _output_names(given: Sequence[str] | None, count: int, input_names: list[str]) -> list[str]:
    if given is None or len(given) == 0:
        return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    names = list(given)
    if len(names) != count:
        raise UsageError(f"{len(names)} output names given ({', '.join(names)}) but forward() returns {count} "
                         "tensors")
    clash = [n for n in names if n in input_names or names.count(n) > 1 or not n]
    if clash:
        raise UsageError(f"output names must be unique, non-empty and differ from the inputs: {clash[0]!r}")
    return names


def _torch_export(torch, module, feed, by_keyword, order, names, dynamic_axes, opset) -> tuple[Model, list[str]]:
    from .core.model import Model

    args, kwargs = ((), {n: feed[n] for n in order}) if by_keyword else (tuple(feed[n] for n in order), None)
    with tempfile.TemporaryDirectory(prefix="graphopt-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings(record=True) as caught, _quiet_fds():
            warnings.simplefilter("always")
            try:
                torch.onnx.export(module, args, str(onnx_path), kwargs=kwargs, input_names=list(order),
                                  output_names=names, dynamic_axes=dynamic_axes or None, opset_version=opset,
                                  do_constant_folding=True, dynamo=False)
            except Exception as exc:
                raise InputError(f"torch.onnx.export failed: {_first_line(exc)}") from None
        try:
            loaded = Model.load(onnx_path)  # checker, opset and external-data checks; Constants to initializers
        except InputError as exc:
            raise InputError(f"torch exported a model graphopt cannot use: "
                             f"{str(exc).replace(str(onnx_path) + ': ', '')}") from None
    tracer, other = [], []  # the tracer's own warnings first: they name what it could not record
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning)):
            continue
        text = " ".join(str(w.message).split())
        kind = tracer if issubclass(w.category, torch.jit.TracerWarning) else other
        if text and text not in tracer + other:
            kind.append(text)
    return Model(loaded.proto), tracer + other  # no source: the temporary file is gone


@contextlib.contextmanager
def _quiet_fds():
    """Swallow what torch's C++ side writes straight to file descriptors 1 and 2 (the exporter dumps its whole IR
    graph when it fails), so that errors stay one line; Python warnings are caught separately."""
    with contextlib.ExitStack() as stack:
        for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
            try:
                stream.flush()
                saved = os.dup(fd)
            except (OSError, ValueError, AttributeError):
                continue
            sink = stack.enter_context(tempfile.TemporaryFile())
            os.dup2(sink.fileno(), fd)
            stack.callback(_restore_fd, stream, fd, saved)
        yield


def _restore_fd(stream, fd: int, saved: int) -> None:
    try:
        stream.flush()
    except (OSError, ValueError, AttributeError):
        pass
    os.dup2(saved, fd)
    os.close(saved)


def _check(torch, label, feed, reference, names, session, atol, rtol, integer_outputs) -> dict:
    from .core.numerics import compare_outputs
    from .core.runtime import run

    check = {"check": label, "inputs": {k: list(v.shape) for k, v in feed.items()}, "passed": False,
             "error": None, "outputs": []}
    if len(reference) != len(names):
        check["error"] = (f"forward() returned {len(reference)} tensors here but {len(names)} when it was "
                          "exported (Python control flow the tracer froze)")
        return check
    ref = {n: _to_numpy(torch, t) for n, t in zip(names, reference)}
    try:
        got = run(session, [_feed_numpy(torch, feed)])[0]
    except InputError as exc:  # onnxruntime cannot run the export on inputs torch handles: a disagreement
        check["error"] = str(exc)
        return check
    try:
        metrics = compare_outputs([ref], [{n: got[n] for n in names if n in got}])
    except ValueError as exc:
        check["error"] = str(exc)
        return check
    for m in metrics:
        ok = m.nonfinite_new <= m.nonfinite_ref and (
            m.max_abs == 0 if m.name in integer_outputs else (m.max_abs <= atol or m.rel_l2 <= rtol))
        check["outputs"].append({**m.to_dict(), "passed": bool(ok)})
    check["passed"] = all(o["passed"] for o in check["outputs"])
    return check


def _failure_message(checks: list[dict], atol: float, rtol: float, export_warnings: list[str]) -> str:
    parts = []
    for i, c in enumerate(checks, 1):
        if c["passed"]:
            continue
        where = f"check {i} ({c['check']}: {', '.join(f'{k}={_fmt_shape(s)}' for k, s in c['inputs'].items())})"
        if c["error"]:
            parts.append(f"{where}: {c['error']}")
            continue
        bad = [f"{o['name']}: max abs {o['max_abs']:.3g}, rel L2 {o['rel_l2']:.3g}"
               + (f", {o['nonfinite_new']} NaN/Inf (torch: {o['nonfinite_ref']})"
                  if o["nonfinite_new"] > o["nonfinite_ref"] else "")
               for o in c["outputs"] if not o["passed"]]
        parts.append(f"{where}: " + "; ".join(bad))
    text = ("onnxruntime disagrees with torch: " + "; ".join(parts)
            + f" (bound per output: max abs <= {atol:g} or rel L2 <= {rtol:g}; integer outputs exact)")
    if export_warnings:
        hint = export_warnings[0]
        text += f"; torch warned during export: {hint[:200]}{'...' if len(hint) > 200 else ''}"
    return text


__all__ = ["ExportResult", "export", "load_module", "parse_input_spec", "parse_input_option", "parse_dynamic_spec",
           "import_torch",
           "DEFAULT_OPSET", "DEFAULT_ATOL", "DEFAULT_RTOL"]
