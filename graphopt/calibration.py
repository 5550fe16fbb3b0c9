"""Model inputs for calibration and verification: files, ORT CalibrationDataReaders, or synthetic feeds.

A *sample* is one feed: {graph input name: array}. Sources:
- `.npz` file: one array per graph input, keyed by input name;
- `.npy` file: the array for a model with a single input;
- a folder of `.npy` files named after the inputs (`image.npy`), or, for a single-input model, any `.npy` files
  (each one or more samples), or a folder of `.npz` files;
- any object with onnxruntime's `CalibrationDataReader` protocol (`get_next()` returning a feed or None).

An array with one more axis than the input has a leading samples axis. An array with the input's rank is cut
along its batch axis into samples of `batch_size` (default: the model's fixed batch, else 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
from onnx import helper

from .errors import InputError, UsageError
from .runtime import Feed


class CalibrationDataReader(Protocol):  # the protocol of onnxruntime.quantization.CalibrationDataReader
    def get_next(self) -> Feed | None: ...


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple  # ints, or str / None for unknown dims
    dtype: np.dtype


def input_specs(model) -> list[InputSpec]:
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise InputError(f"input {vi.name!r} is not a tensor; graphopt feeds tensors only")
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dims, helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    return specs


def parse_shapes(items: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """`name=1x3x224x224` strings from the command line -> {name: shape}."""
    shapes = {}
    for item in items:
        m = re.fullmatch(r"([^=]+)=(\d+(?:[x,]\d+)*)", item.strip())
        if not m:
            raise UsageError(f"--input-shape {item!r}: expected NAME=DIMxDIMx... such as image=1x3x224x224")
        shapes[m.group(1)] = tuple(int(d) for d in re.split(r"[x,]", m.group(2)))
    return shapes


# ------------------------------------------------------------------------------ loading samples
def load_samples(source, model, *, batch_size: int | None = None, limit: int | None = None) -> list[Feed]:
    """Read samples from a path, a CalibrationDataReader or a list of feeds ({input name: array}) and check them
    against the model's inputs."""
    specs = {s.name: s for s in input_specs(model)}
    if hasattr(source, "get_next"):
        samples = _from_reader(source, limit)
    elif isinstance(source, (list, tuple)):
        if not all(isinstance(item, dict) for item in source):
            raise InputError("calibration data given as a list must hold feeds: {input name: array}")
        samples = [{k: np.asarray(v) for k, v in item.items()} for item in source]
    else:
        samples = _from_path(Path(source), specs, batch_size)
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise InputError(f"{source if isinstance(source, (str, Path)) else 'the calibration data'}: holds no samples")
    for i, sample in enumerate(samples):
        samples[i] = _checked(sample, specs, source)
    return samples


def _from_reader(reader: CalibrationDataReader, limit: int | None) -> list[Feed]:
    samples = []
    while limit is None or len(samples) < limit:
        item = reader.get_next()
        if item is None:
            break
        samples.append({k: np.asarray(v) for k, v in item.items()})
    return samples


def _from_path(path: Path, specs: dict[str, InputSpec], batch_size: int | None) -> list[Feed]:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        npz = sorted(path.glob("*.npz"))
        npy = sorted(path.glob("*.npy"))
        if npz:
            return [s for f in npz for s in _split(_read_npz(f), specs, batch_size, f)]
        if not npy:
            raise InputError(f"{path}: folder holds no .npy or .npz files")
        by_name = {f.stem: f for f in npy}
        if set(specs) <= set(by_name):
            return _split({name: _read_npy(by_name[name]) for name in specs}, specs, batch_size, path)
        if len(specs) == 1:
            (name,) = specs
            return [s for f in npy for s in _split({name: _read_npy(f)}, specs, batch_size, f)]
        raise InputError(f"{path}: expected files named after the model inputs: "
                         + ", ".join(f"{n}.npy" for n in specs))
    if path.suffix == ".npz":
        return _split(_read_npz(path), specs, batch_size, path)
    if path.suffix == ".npy":
        if len(specs) != 1:
            raise InputError(f"{path}: a single .npy only fits a model with one input; this one has "
                             f"{len(specs)} ({', '.join(specs)}); use an .npz keyed by input name")
        return _split({next(iter(specs)): _read_npy(path)}, specs, batch_size, path)
    raise InputError(f"{path}: calibration data must be .npz, .npy or a folder of them")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npy file ({exc})") from None


def _split(arrays: dict[str, np.ndarray], specs: dict[str, InputSpec], batch_size: int | None, origin) -> list[Feed]:
    """Cut arrays keyed by input name into per-run samples."""
    missing = set(specs) - set(arrays)
    extra = set(arrays) - set(specs)
    if missing or extra:
        raise InputError(f"{origin}: arrays {sorted(arrays)} do not match the model inputs {sorted(specs)}")
    counts = {}
    per_input = {}
    for name, arr in arrays.items():
        rank = len(specs[name].shape)
        if arr.ndim == rank + 1:  # explicit samples axis
            per_input[name] = list(arr)
        elif arr.ndim == rank and rank > 0:
            fixed = specs[name].shape[0]
            step = batch_size or (fixed if isinstance(fixed, int) and fixed > 0 else 1)
            per_input[name] = [arr[i:i + step] for i in range(0, (arr.shape[0] // step) * step, step)]
        elif rank == 0 and arr.ndim <= 1:
            per_input[name] = [np.asarray(v) for v in np.atleast_1d(arr)]
        else:
            raise InputError(f"{origin}: array {name!r} has rank {arr.ndim}, the input has rank {rank}")
        counts[name] = len(per_input[name])
    if len(set(counts.values())) > 1:
        raise InputError(f"{origin}: inputs hold different numbers of samples: {counts}")
    n = next(iter(counts.values()))
    return [{name: per_input[name][i] for name in arrays} for i in range(n)]


def _checked(sample: Feed, specs: dict[str, InputSpec], origin) -> Feed:
    if set(sample) != set(specs):
        raise InputError(f"{origin}: a sample feeds {sorted(sample)}, the model needs {sorted(specs)}")
    out = {}
    for name, arr in sample.items():
        spec = specs[name]
        if len(arr.shape) != len(spec.shape) or any(isinstance(d, int) and d > 0 and d != a
                                                    for d, a in zip(spec.shape, arr.shape)):
            raise InputError(f"{origin}: input {name!r} has shape {tuple(arr.shape)}, the model expects "
                             f"{_fmt_shape(spec.shape)}")
        if arr.dtype != spec.dtype:
            if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                raise InputError(f"{origin}: input {name!r} is {arr.dtype}, the model expects {spec.dtype}")
            arr = arr.astype(spec.dtype)
        out[name] = np.ascontiguousarray(arr)
    return out


def _fmt_shape(shape) -> str:
    return "x".join(str(d) if isinstance(d, int) and d > 0 else (d or "?") for d in shape)


# ------------------------------------------------------------------------------ synthetic feeds
def synthetic_samples(model, count: int, shapes: dict[str, tuple[int, ...]] | None = None,
                      seed: int = 0) -> list[Feed]:
    """Random feeds that respect each input's dtype. Unknown dims must be given in `shapes`."""
    shapes = shapes or {}
    specs = input_specs(model)
    unknown_names = set(shapes) - {s.name for s in specs}
    if unknown_names:
        raise UsageError(f"--input-shape names {sorted(unknown_names)}, which are not model inputs "
                         f"({', '.join(s.name for s in specs)})")
    resolved = {}
    for spec in specs:
        if spec.name in shapes:
            shape = shapes[spec.name]
            if len(shape) != len(spec.shape) or any(isinstance(d, int) and d > 0 and d != s
                                                    for d, s in zip(spec.shape, shape)):
                raise UsageError(f"--input-shape {spec.name}={_fmt_shape(shape)} does not fit the input's "
                                 f"shape {_fmt_shape(spec.shape)}")
        elif all(isinstance(d, int) and d > 0 for d in spec.shape):
            shape = spec.shape
        else:
            raise InputError(f"input {spec.name!r} has unknown dims ({_fmt_shape(spec.shape)}); give them with "
                             f"--input-shape {spec.name}=" + "x".join(
                                 str(d) if isinstance(d, int) and d > 0 else "N" for d in spec.shape)
                             + " or pass calibration data with --calib")
        resolved[spec.name] = (tuple(shape), spec.dtype)
    rng = np.random.default_rng(seed)
    return [{name: _random(name, shape, dtype, rng) for name, (shape, dtype) in resolved.items()}
            for _ in range(count)]


def _random(name: str, shape, dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    if dtype == np.bool_:
        return np.ones(shape, dtype=bool)
    if np.issubdtype(dtype, np.integer):
        if "mask" in name.lower():  # attention masks: attend everywhere
            return np.ones(shape, dtype=dtype)
        return rng.integers(0, 100, size=shape).astype(dtype)  # small non-negative ids fit any vocabulary
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    raise InputError(f"input {name!r} has dtype {dtype}, for which graphopt cannot make synthetic data; "
                     "pass --calib")


# ------------------------------------------------------------------------------ split
@dataclass(frozen=True)
class InputSet:
    """Samples split so that verification never runs only on what the passes were fitted on."""

    calibration: list[Feed]
    validation: list[Feed]
    synthetic: bool = False


def split_samples(samples: list[Feed], validation_fraction: float = 0.5, seed: int = 0,
                  max_validation: int = 128, synthetic: bool = False) -> InputSet:
    if not 0.0 < validation_fraction < 1.0:
        raise UsageError("validation_fraction must be between 0 and 1")
    if len(samples) == 1:  # nothing to hold out: the report's sample counts show it
        return InputSet(samples, samples, synthetic)
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = min(max_validation, max(1, int(round(len(samples) * validation_fraction))))
    n_val = min(n_val, len(samples) - 1)
    validation = [samples[i] for i in order[:n_val]]
    calibration = [samples[i] for i in order[n_val:]]
    return InputSet(calibration, validation, synthetic)


def prepare_inputs(model, calib=None, *, input_shapes: dict | None = None, batch_size: int | None = None,
                   synthetic_count: int = 8, seed: int = 0, validation_fraction: float = 0.5) -> InputSet:
    """Calibration data when given, else synthetic feeds (flagged, so reports can say so)."""
    if calib is not None:
        samples = load_samples(calib, model, batch_size=batch_size)
        return split_samples(samples, validation_fraction, seed)
    samples = synthetic_samples(model, synthetic_count, input_shapes, seed)
    return split_samples(samples, validation_fraction, seed, synthetic=True)


__all__ = ["InputSet", "InputSpec", "CalibrationDataReader", "load_samples", "synthetic_samples",
           "split_samples", "prepare_inputs", "parse_shapes", "input_specs"]
