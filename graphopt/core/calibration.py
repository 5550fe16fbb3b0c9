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
import warnings
import zipfile
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


def parse_shapes(items: Iterable[str], flag: str = "--input-shape") -> dict[str, tuple[int, ...]]:
    """`name=1x3x224x224` strings from the command line -> {name: shape}."""
    shapes = {}
    for item in items:
        m = re.fullmatch(r"([^=]+)=(\d+(?:[x,]\d+)*)", item.strip())
        if not m:
            raise UsageError(f"{flag} {item!r}: expected NAME=DIMxDIMx... such as image=1x3x224x224")
        shapes[m.group(1)] = tuple(int(d) for d in re.split(r"[x,]", m.group(2)))
    return shapes


# ------------------------------------------------------------------------------ loading samples
class ConversionNote(UserWarning):
    """Calibration data of another dtype than the input's was converted (value-preserving, or float rounding).
    Issued once per input; the CLI prints it as a note on stderr."""


LABELS = "labels"  # an .npz array of this name that is not a model input: one class label per row


def load_samples(source, model, *, batch_size: int | None = None, limit: int | None = None) -> list[Feed]:
    """Read samples from a path, a CalibrationDataReader or a list of feeds ({input name: array}) and check them
    against the model's inputs: shapes, finite values, and dtypes (converted when no value changes, or from one
    float type to another, with one ConversionNote per input; refused otherwise)."""
    return load_labelled(source, model, batch_size=batch_size, limit=limit)[0]


def load_labelled(source, model, *, batch_size: int | None = None, limit: int | None = None
                  ) -> tuple[list[Feed], list[np.ndarray] | None]:
    """`load_samples`, and the class labels an .npz carries beside the inputs (an integer array `labels`, one
    per row), cut like the samples: one array per sample; None when the data has no labels."""
    specs = {s.name: s for s in input_specs(model)}
    labels = None
    if hasattr(source, "get_next"):
        samples = _from_reader(source, limit)
    elif isinstance(source, (list, tuple)):
        if not all(isinstance(item, dict) for item in source):
            raise InputError("calibration data given as a list must hold feeds: {input name: array}")
        samples = [{k: np.asarray(v) for k, v in item.items()} for item in source]
    else:
        samples, labels = _from_path(Path(source), specs, batch_size)
    if limit is not None:
        samples = samples[:limit]
        labels = labels[:limit] if labels is not None else None
    if not samples:
        raise InputError(f"{source if isinstance(source, (str, Path)) else 'the calibration data'}: holds no samples")
    converted: dict[str, str] = {}  # input -> what was converted, said once however many samples
    for i, sample in enumerate(samples):
        samples[i] = _checked(sample, specs, source, i, converted)
    for name, what in converted.items():
        warnings.warn(f"calibration input {name!r}: {what}", ConversionNote, stacklevel=2)
    return samples, labels


def _from_reader(reader: CalibrationDataReader, limit: int | None) -> list[Feed]:
    samples = []
    while limit is None or len(samples) < limit:
        item = reader.get_next()
        if item is None:
            break
        samples.append({k: np.asarray(v) for k, v in item.items()})
    return samples


def _from_path(path: Path, specs: dict[str, InputSpec], batch_size: int | None
               ) -> tuple[list[Feed], list[np.ndarray] | None]:
    """Samples, and their labels where every .npz read carries them."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        npz = sorted(path.glob("*.npz"))
        npy = sorted(path.glob("*.npy"))
        if npz:
            return _joined([_split_labelled(_read_npz(f), specs, batch_size, f) for f in npz])
        if not npy:
            raise InputError(f"{path}: folder holds no .npy or .npz files")
        by_name = {f.stem: f for f in npy}
        if set(specs) <= set(by_name):
            return _split({name: _read_npy(by_name[name]) for name in specs}, specs, batch_size, path), None
        if len(specs) == 1:
            (name,) = specs
            return [s for f in npy for s in _split({name: _read_npy(f)}, specs, batch_size, f)], None
        raise InputError(f"{path}: expected files named after the model inputs: "
                         + ", ".join(f"{n}.npy" for n in specs))
    if path.suffix == ".npz":
        return _split_labelled(_read_npz(path), specs, batch_size, path)
    if path.suffix == ".npy":
        if len(specs) != 1:
            raise InputError(f"{path}: a single .npy only fits a model with one input; this one has "
                             f"{len(specs)} ({', '.join(specs)}); use an .npz keyed by input name")
        return _split({next(iter(specs)): _read_npy(path)}, specs, batch_size, path), None
    raise InputError(f"{path}: calibration data must be .npz, .npy or a folder of them")


_NPY_MAGIC = b"\x93NUMPY"
_OBJECT_HINT = "graphopt reads plain numeric arrays only, never pickled objects"


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    # numpy's own errors here advise allow_pickle=True, which is never the fix: say what the file is instead
    if not zipfile.is_zipfile(path):
        head = path.read_bytes()[:6] if path.is_file() else b""
        if head == _NPY_MAGIC:
            raise InputError(f"{path}: is a single .npy array, not an .npz archive; name it .npy (single-input "
                             "models) or save it with numpy.savez(path, INPUT_NAME=array)")
        raise InputError(f"{path}: is not an .npz file (an .npz is a zip archive of arrays, as numpy.savez "
                         "writes; this file is not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as exc:
        if "pickle" in str(exc) or "Object arrays" in str(exc):
            raise InputError(f"{path}: holds an object array; {_OBJECT_HINT} (save numeric arrays with "
                             "numpy.savez)") from None
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):  # a zip member that is no .npy array
            raise InputError(f"{path}: member {key!r} is not a numpy array; an .npz holds one .npy array per "
                             "input, as numpy.savez writes")
    return arrays


def _read_npy(path: Path) -> np.ndarray:
    head = path.read_bytes()[:6] if path.is_file() else b""
    if head != _NPY_MAGIC:
        kind = "an .npz archive (name it .npz)" if zipfile.is_zipfile(path) else "not a numpy array file"
        raise InputError(f"{path}: is {kind}; a .npy holds one array, as numpy.save writes")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc) or "Object arrays" in str(exc):
            raise InputError(f"{path}: holds an object array; {_OBJECT_HINT}") from None
        raise InputError(f"{path}: not a readable .npy file ({exc})") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})") from None


def _split_labelled(arrays: dict[str, np.ndarray], specs: dict[str, InputSpec], batch_size: int | None, origin
                    ) -> tuple[list[Feed], list[np.ndarray] | None]:
    labels = arrays.pop(LABELS) if LABELS in arrays and LABELS not in specs else None
    samples = _split(arrays, specs, batch_size, origin)
    if labels is None:
        return samples, None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{origin}: {LABELS!r} must be a 1-D integer array of class labels, one per row (it is "
                         f"{labels.dtype} {list(labels.shape)})")
    first = next(iter(specs))
    given = arrays[first]
    samples_axis = given.ndim == len(specs[first].shape) + 1 and given.ndim >= 2  # [samples, batch, ...]
    total = given.shape[0] * given.shape[1] if samples_axis else len(given)
    if len(labels) != total:
        raise InputError(f"{origin}: {len(labels)} labels for {total} rows of input")
    rows = [_rows(s, specs) for s in samples]  # rows a --batch-size leaves over are dropped with their labels
    cut = np.cumsum([0] + rows)
    return samples, [labels[a:b] for a, b in zip(cut[:-1], cut[1:])]


def _rows(sample: Feed, specs: dict[str, InputSpec]) -> int:
    """Rows (batch entries) in a sample: the first input's leading dim, or 1 when it has none."""
    arr = sample[next(iter(specs))]
    return int(arr.shape[0]) if np.ndim(arr) >= 1 else 1


def _joined(parts: list[tuple[list[Feed], list | None]]) -> tuple[list[Feed], list | None]:
    """Samples of several files in order; labels only when every file has them."""
    samples = [s for feeds, _ in parts for s in feeds]
    labelled = all(lab is not None for _, lab in parts)
    return samples, ([x for _, lab in parts for x in lab] if labelled else None)


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


def _checked(sample: Feed, specs: dict[str, InputSpec], origin, index: int = 0,
             converted: dict[str, str] | None = None) -> Feed:
    """The sample with each array in its input's dtype; `converted` collects what was converted, per input."""
    where = f"{origin if isinstance(origin, (str, Path)) else 'calibration data'}: sample {index} (counting from 0)"
    if set(sample) != set(specs):
        raise InputError(f"{where} feeds {sorted(sample)}, the model needs {sorted(specs)}")
    out = {}
    for name, arr in sample.items():
        spec = specs[name]
        if len(arr.shape) != len(spec.shape) or any(isinstance(d, int) and d > 0 and d != a
                                                    for d, a in zip(spec.shape, arr.shape)):
            raise InputError(f"{where}: input {name!r} has shape {tuple(arr.shape)}, the model expects "
                             f"{_fmt_shape(spec.shape)}")
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():  # would poison every range and comparison
            bad = int(arr.size - np.isfinite(arr).sum())
            raise InputError(f"{where}: input {name!r} holds {bad} NaN/Inf value{'s' if bad > 1 else ''}; "
                             "calibration data must be finite")
        if arr.dtype != spec.dtype:
            arr = _converted(arr, spec, where)
            if converted is not None:
                converted.setdefault(name, f"{sample[name].dtype} data converted to {spec.dtype}, the input's type"
                                     + (" (rounded to its precision)" if sample[name].dtype.kind == "f"
                                        and spec.dtype.kind == "f" else " (no value changed)"))
        out[name] = np.ascontiguousarray(arr)
    return out


def _converted(arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    """`arr` in the input's dtype: float to float (rounding only), or any conversion that changes no value;
    anything else (fractions to integers, ids past float32's exact range, out-of-range integers) is refused."""
    refuse = InputError(f"{where}: input {spec.name!r} is {arr.dtype}, the model expects {spec.dtype}, and "
                        f"converting would change values; save the data as {spec.dtype}")
    if arr.dtype.kind not in "biuf" or spec.dtype.kind not in "biuf":  # complex, strings, objects
        raise InputError(f"{where}: input {spec.name!r} is {arr.dtype}, the model expects {spec.dtype}")
    with np.errstate(all="ignore"):
        out = arr.astype(spec.dtype)
        if arr.dtype.kind == "f" and spec.dtype.kind == "f":
            if not np.isfinite(out).all():
                raise InputError(f"{where}: input {spec.name!r} has values beyond {spec.dtype}'s range")
            return out
        if not np.array_equal(out.astype(arr.dtype), arr):
            raise refuse
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


# ------------------------------------------------------------------------------ latency shape
def latency_feed(model, samples: list[Feed], *, batch: int = 1, shapes: dict[str, tuple] | None = None) -> Feed:
    """One feed at the shape every latency figure is measured at: `batch` rows along each input's dynamic batch
    axis (rows taken from successive samples, real data), or the exact `shapes` given per input (axes cut or
    tiled). Inputs with a fixed batch keep it."""
    if not samples:
        raise UsageError("latency needs at least one input sample")
    if batch < 1:
        raise UsageError(f"the latency batch must be at least 1, got {batch}")
    shapes = shapes or {}
    specs = {s.name: s for s in input_specs(model)}
    unknown = set(shapes) - set(specs)
    if unknown:
        raise UsageError(f"--latency-shape names {sorted(unknown)}, which are not model inputs ({', '.join(specs)})")
    feed = {}
    for name, spec in specs.items():
        first = samples[0][name]
        if name in shapes:
            target = tuple(shapes[name])
            if len(target) != len(spec.shape) or any(isinstance(d, int) and d > 0 and d != t
                                                      for d, t in zip(spec.shape, target)):
                raise UsageError(f"--latency-shape {name}={_fmt_shape(target)} does not fit the input's shape "
                                 f"{_fmt_shape(spec.shape)}")
        elif first.ndim and not (isinstance(spec.shape[0], int) and spec.shape[0] > 0):
            target = (batch,) + first.shape[1:]
        else:
            target = first.shape
        if first.ndim:  # rows from successive samples of the same row shape: real, distinct data
            first = np.concatenate([s[name] for s in samples if s[name].shape[1:] == first.shape[1:]])
        feed[name] = np.ascontiguousarray(_cut_or_tile(first, target))
    return feed


def _cut_or_tile(arr: np.ndarray, target: tuple) -> np.ndarray:
    for axis, n in enumerate(target):
        have = arr.shape[axis]
        if have < n:
            arr = np.concatenate([arr] * -(-n // have), axis=axis)
        arr = np.take(arr, range(n), axis=axis) if arr.shape[axis] != n else arr
    return arr


def describe_feed(feed: Feed) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in feed.items()}


def shapes_text(shapes: dict) -> str:
    """`x 2x8, mask 2x8` for a feed or a {name: shape} dict, as reports and messages quote shapes."""
    return ", ".join(f"{k} {'x'.join(map(str, getattr(v, 'shape', v)))}" for k, v in shapes.items())


# ------------------------------------------------------------------------------ a second shape
def second_size_feeds(model, feeds: list[Feed], count: int = 8) -> tuple[list[Feed], str]:
    """Feeds at another size than the given ones, for models with dynamic dims (a rewrite of Reshape, Slice or
    Split constants is only exercised by a shape it was not traced at): the batch doubled by joining two samples
    along a dynamic batch axis, and token (integer) inputs' dynamic non-batch axes shortened by a quarter (all
    inputs sharing that dim name alike). Returns ([], why not) when the model has no such dims."""
    specs = input_specs(model)
    batch = [s.name for s in specs if s.shape and not (isinstance(s.shape[0], int) and s.shape[0] > 0)]
    seq: dict[str, list[tuple[str, int]]] = {}  # dim name -> (input, axis)
    for spec in specs:
        if np.issubdtype(spec.dtype, np.integer):
            for axis, d in enumerate(spec.shape[1:], 1):
                if not (isinstance(d, int) and d > 0):
                    seq.setdefault(str(d or f"{spec.name}:{axis}"), []).append((spec.name, axis))
    if not (batch or seq) or not feeds:
        return [], "the model has no dynamic batch or sequence dims"
    out = []
    pairs = [(feeds[i], feeds[(i + 1) % len(feeds)]) for i in range(min(count, len(feeds)))] if batch else \
        [(f, None) for f in feeds[:count]]
    for a, b in pairs:
        feed = {}
        for name, arr in a.items():
            if b is not None and name in batch and b[name].shape[1:] == arr.shape[1:]:
                arr = np.concatenate([arr, b[name]])
            feed[name] = arr
        for uses in seq.values():
            length = min(feed[name].shape[axis] for name, axis in uses)
            if length >= 2:
                for name, axis in uses:
                    feed[name] = np.ascontiguousarray(np.take(feed[name], range(length - length // 4), axis=axis))
        out.append(feed)
    return out, shapes_text(out[0])


# ------------------------------------------------------------------------------ split
@dataclass(frozen=True)
class InputSet:
    """Samples in three disjoint parts, so that no reported figure is measured on data a pass has read:

    - `fit`: what passes fit on (calibration ranges, refits, sensitivity, importance);
    - `selection`: what a search that picks among candidates judges them on (accuracy targets, the latency
      search's tightening); empty for tiny sets, where `for_selection` falls back to `fit`;
    - `verification`: what the pipeline verifies and reports on; never read by a pass.

    `overlapping` is true when there were too few samples to hold any out (one sample: all three are it).
    `labels`, when the data carries class labels: {"fit" | "selection" | "verification": one array per sample}."""

    fit: list[Feed]
    selection: list[Feed]
    verification: list[Feed]
    synthetic: bool = False
    overlapping: bool = False
    labels: dict[str, list[np.ndarray]] | None = None

    @property
    def for_selection(self) -> list[Feed]:
        return self.selection or self.fit

    def counts(self) -> dict:
        return {"fit_samples": len(self.fit), "selection_samples": len(self.selection),
                "verification_samples": len(self.verification),
                "selection_from": "selection" if self.selection else "fit",
                "overlapping": self.overlapping, "synthetic": self.synthetic, "labelled": self.labels is not None}


def split_samples(samples: list[Feed], seed: int = 0, *, verification_fraction: float = 0.25,
                  selection_fraction: float = 0.25, max_verification: int = 128, max_selection: int = 128,
                  synthetic: bool = False, labels: list[np.ndarray] | None = None) -> InputSet:
    """Shuffle once with `seed`, then cut verification, selection and fit (the rest) apart. Small sets keep at
    least min(16, n // 3) samples for verification, so that its figures mean something."""
    if not (0.0 < verification_fraction < 1.0 and 0.0 <= selection_fraction < 1.0
            and verification_fraction + selection_fraction < 1.0):
        raise UsageError("verification_fraction and selection_fraction must be in [0, 1) and sum below 1")
    n = len(samples)
    if labels is not None and len(labels) != n:
        raise UsageError(f"{len(labels)} label arrays for {n} samples")
    if n == 1:  # nothing to hold out: the pipeline refuses lossy runs on this unless told otherwise
        one = {"fit": labels, "selection": [], "verification": labels} if labels is not None else None
        return InputSet(samples, [], samples, synthetic, overlapping=True, labels=one)
    order = np.random.default_rng(seed).permutation(n)
    n_ver = min(max_verification, max(1, round(n * verification_fraction), min(16, n // 3)))
    n_sel = min(max_selection, max(1 if n >= 3 else 0, round(n * selection_fraction))) if selection_fraction else 0
    n_sel = max(0, min(n_sel, n - n_ver - 1))
    pick = [samples[i] for i in order]
    parts = {"fit": slice(n_ver + n_sel, None), "selection": slice(n_ver, n_ver + n_sel), "verification": slice(0, n_ver)}
    cut = None
    if labels is not None:
        ordered = [labels[i] for i in order]
        cut = {k: ordered[s] for k, s in parts.items()}
    return InputSet(fit=pick[parts["fit"]], selection=pick[parts["selection"]],
                    verification=pick[parts["verification"]], synthetic=synthetic, labels=cut)


def prepare_inputs(model, calib=None, *, input_shapes: dict | None = None, batch_size: int | None = None,
                   synthetic_count: int = 8, seed: int = 0) -> InputSet:
    """Calibration data when given, else synthetic feeds (flagged, so reports can say so), split three ways."""
    if calib is not None:
        samples, labels = load_labelled(calib, model, batch_size=batch_size)
        return split_samples(samples, seed, labels=labels)
    samples = synthetic_samples(model, synthetic_count, input_shapes, seed)
    return split_samples(samples, seed, synthetic=True)


__all__ = ["InputSet", "InputSpec", "CalibrationDataReader", "ConversionNote", "load_samples", "load_labelled", "synthetic_samples",
           "split_samples", "prepare_inputs", "parse_shapes", "input_specs", "latency_feed", "describe_feed", "shapes_text", "second_size_feeds"]
