"""Building candidates: one recipe run through the verified pipeline on the fit and selection samples, in this
process, in a process pool, or as Ray tasks; and the on-disk cache of what was built.

A build never sees the verification samples: the pipeline inside it checks each pass on the selection samples
(its rollback guard), so the figures the final report quotes come from samples no build and no choice read.
Builds return the model's bytes and its pipeline report; timing is not done here (see engine.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .._version import __version__
from ..core.calibration import InputSet
from ..core.files import write_atomic, write_text_atomic
from ..core.model import Model
from ..core.runtime import RuntimeSettings
from ..passes.base import Context, create, parse_pass_spec
from ..report import json_plain


@dataclass(frozen=True)
class Job:
    """What one build needs besides the model and the samples (those are shipped once per worker)."""

    recipe: tuple[str, ...]  # pass specs, in order
    runtime: RuntimeSettings
    latency_batch: int = 1
    latency_shapes: dict | None = None
    output_kinds: dict = field(default_factory=dict)
    seed: int = 0


@dataclass
class Built:
    recipe: tuple[str, ...]
    model_bytes: bytes | None  # None when the build failed
    report: dict | None  # the pipeline's JSON report of the build
    error: str = ""  # why it failed (a budget out of reach, a pass refusing the model, ...)
    seconds: float = 0.0
    cached: bool = False
    worker: str = ""  # host:pid of the process that built it


def pack_inputs(inputs: InputSet) -> bytes:
    """The fit and selection samples as one .npz (the verification samples are never shipped to a build)."""
    arrays = {}
    for part in ("fit", "selection"):
        for i, feed in enumerate(getattr(inputs, part)):
            for name, value in feed.items():
                arrays[f"{part}/{i}/{name}"] = value
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack_inputs(blob: bytes) -> InputSet:
    parts: dict[str, dict[int, dict]] = {"fit": {}, "selection": {}}
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        for key in data.files:
            part, i, name = key.split("/", 2)
            parts[part].setdefault(int(i), {})[name] = data[key]
    fit = [parts["fit"][i] for i in sorted(parts["fit"])]
    selection = [parts["selection"][i] for i in sorted(parts["selection"])]
    # the builds' pipeline checks its passes on the selection samples: it never holds the verification ones
    return InputSet(fit=fit, selection=selection, verification=selection or fit)


def build(model_bytes: bytes, inputs_blob: bytes, job: Job, progress=None) -> Built:
    """Run the recipe through the verified pipeline (no latency measurement) and return the result."""
    from ..core.errors import GraphoptError
    from ..pipeline import Pipeline

    t0 = time.perf_counter()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        model = Model.from_proto(_proto(model_bytes))
        passes = [create(*parse_pass_spec(s)) for s in job.recipe]
        ctx = Context(inputs=unpack_inputs(inputs_blob), runtime=job.runtime, seed=job.seed,
                      progress=progress or (lambda m: None), latency_batch=job.latency_batch,
                      latency_shapes=job.latency_shapes, output_kinds=dict(job.output_kinds))
        out, report = Pipeline(passes, measure_latency=False, pass_guard=False).run(model, ctx)
    except GraphoptError as exc:
        return Built(job.recipe, None, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0, worker=worker)
    except Exception as exc:  # a pass bug costs this candidate, never the search
        return Built(job.recipe, None, None, f"build raised {type(exc).__name__}: {exc}", time.perf_counter() - t0,
                     worker=worker)
    return Built(job.recipe, out.to_bytes(), report.to_dict(), "", time.perf_counter() - t0, worker=worker)


def _proto(blob: bytes):
    import onnx

    return onnx.load_from_string(blob)


# ------------------------------------------------------------------------------------------------ executors
class InProcess:
    """Builds one after another in this process (the default on a machine with few cores)."""

    name = "in process"
    workers = 1

    def __init__(self, model_bytes: bytes, inputs_blob: bytes, progress):
        self.model_bytes, self.inputs_blob, self.progress = model_bytes, inputs_blob, progress

    def map(self, jobs: list[Job]):
        for job in jobs:
            yield build(self.model_bytes, self.inputs_blob, job, self.progress)

    def close(self):
        pass


_WORKER: dict = {}


def _init_worker(model_bytes: bytes, inputs_blob: bytes):
    _WORKER["model"], _WORKER["inputs"] = model_bytes, inputs_blob


def _pool_build(job: Job) -> Built:
    return build(_WORKER["model"], _WORKER["inputs"], job)


class Pool:
    """Builds in a pool of worker processes on this machine; the model and samples go to each worker once."""

    def __init__(self, workers: int, model_bytes: bytes, inputs_blob: bytes):
        import multiprocessing

        self.workers = workers
        self.name = f"process pool of {workers}"
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker, initargs=(model_bytes, inputs_blob))

    def map(self, jobs: list[Job]):
        return self.pool.map(_pool_build, jobs)

    def close(self):
        self.pool.shutdown(cancel_futures=True)


class RayTasks:
    """Builds as Ray tasks on the cluster at `address` (or in the Ray instance this process already joined);
    the model and samples are put in Ray's object store once."""

    def __init__(self, address: str, model_bytes: bytes, inputs_blob: bytes):
        from ..core.errors import UsageError

        try:
            import ray
        except ImportError:
            raise UsageError("--ray needs Ray: pip install 'graphopt[search]' (or pip install ray)") from None
        if not ray.is_initialized():
            try:  # "local": a fresh instance on this machine; "auto": the running local cluster; else its address
                ray.init(address=None if address == "local" else address, log_to_driver=False)
            except Exception as exc:
                raise UsageError(f"--ray {address}: cannot join a Ray cluster there "
                                 f"({str(exc).strip().splitlines()[0]})") from None
        self.ray = ray
        self.remote = ray.remote(num_cpus=1)(build)
        self.model_ref, self.inputs_ref = ray.put(model_bytes), ray.put(inputs_blob)
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.name = f"Ray ({self.workers} CPUs)"

    def map(self, jobs: list[Job]):
        refs = [self.remote.remote(self.model_ref, self.inputs_ref, job) for job in jobs]
        for ref in refs:  # in submission order, each as soon as it is done
            yield self.ray.get(ref)

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------------- cache
class Cache:
    """Built candidates on disk, keyed by everything a build depends on: graphopt's code, the input model,
    the fit and selection samples, the recipe and the settings the passes measure with. A re-run with another
    budget finds what an earlier run built and only times it again."""

    def __init__(self, root: Path | None, model_bytes: bytes, inputs_blob: bytes):
        self.root = root
        self.base = hashlib.sha256(CODE_DIGEST + hashlib.sha256(model_bytes).digest()
                                   + hashlib.sha256(inputs_blob).digest()).hexdigest()

    def _dir(self, job: Job) -> Path:
        key = json.dumps([self.base, list(job.recipe), job.runtime.intra_op_threads, job.runtime.graph_optimization,
                          list(job.runtime.providers), job.latency_batch,
                          sorted((job.latency_shapes or {}).items()), sorted(job.output_kinds.items()), job.seed],
                         default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.root / digest[:2] / digest

    def get(self, job: Job) -> Built | None:
        if self.root is None:
            return None
        folder = self._dir(job)
        try:
            meta = json.loads((folder / "build.json").read_text())
            blob = (folder / "model.onnx").read_bytes() if meta["error"] == "" else None
        except (OSError, ValueError, KeyError):
            return None
        return Built(job.recipe, blob, meta.get("report"), meta["error"], meta.get("seconds", 0.0), cached=True,
                     worker=meta.get("worker", ""))

    def put(self, job: Job, built: Built) -> None:
        if self.root is None:
            return
        folder = self._dir(job)
        folder.mkdir(parents=True, exist_ok=True)
        if built.model_bytes is not None:
            write_atomic(folder / "model.onnx", lambda tmp: Path(tmp).write_bytes(built.model_bytes))
        # written last: an entry without it is incomplete and is rebuilt
        write_text_atomic(folder / "build.json", json.dumps({"recipe": list(built.recipe), "error": built.error,
                                                             "seconds": built.seconds, "worker": built.worker,
                                                             "report": built.report}, default=json_plain))


def _code_digest() -> bytes:
    """graphopt's version and its source: a build made by other code is not reused (an edited checkout keeps
    its version number)."""
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(Path(__file__).resolve().parents[1].rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.digest()


CODE_DIGEST = _code_digest()  # at import: the code this process runs, even if the files change under it


def default_cache_dir() -> Path:
    return Path(os.environ.get("GRAPHOPT_CACHE", Path.home() / ".cache" / "graphopt")) / "search"


def worker_runtime(runtime: RuntimeSettings, workers: int) -> RuntimeSettings:
    """Threads per build, so that the builds running side by side (whose passes time their own choices) share
    the cores instead of fighting over them."""
    cores = os.cpu_count() or 1
    return replace(runtime, intra_op_threads=max(1, min(runtime.intra_op_threads, cores // max(1, workers))))
