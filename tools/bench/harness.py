"""Run every contender on one model, in one process, on the same inputs, and tabulate the results."""

from __future__ import annotations

import contextlib
import datetime as _dt
import inspect
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from graphopt.report import machine
from graphopt.core.runtime import Latency, RuntimeSettings, measure_latencies, session_options

from . import contenders as C
from .tasks import REPO, TASKS, Column, Evaluation, Task, _rel

CACHE = REPO / "build" / "bench"
TWIN = "fp32_twin"  # the fp32 file again in a second, separately built session: the timing noise floor
TWIN_NOTE = ("the fp32 file again, in a second session built separately and timed in the same interleaved run: "
             "its distance from 1.00× is the noise floor")


def noise_floor(fp32: Latency | None, twin: Latency | None) -> float | None:
    """|twin median / fp32 median - 1|: how far two sessions of the same model measured apart in one run."""
    if fp32 is None or twin is None or fp32.median_ms <= 0:
        return None
    return abs(twin.median_ms / fp32.median_ms - 1.0)


def is_tie(a_ms: float, b_ms: float, floor: float | None) -> bool:
    """Two median latencies are a tie when they differ by no more than the measured noise floor."""
    return floor is not None and b_ms > 0 and abs(a_ms / b_ms - 1.0) <= floor


def speedup_cell(ref_ms: float | None, ms: float | None, floor: float | None, *, is_ref: bool = False) -> str:
    """fp32 median / contender median, `(tie)` when the two are within the noise floor."""
    if not ref_ms or not ms:
        return "–"
    text = f"{ref_ms / ms:.2f}×"
    return text if is_ref or not is_tie(ms, ref_ms, floor) else text + " (tie)"


def floor_header(floor: float | None, fp32_ms: float | None, twin_ms: float | None) -> str:
    if floor is None:
        return ""
    return (f"`{TWIN}` (a second session of the unchanged fp32 model, in the same interleaved run) measured "
            f"{twin_ms:.3f} ms against `fp32`'s {fp32_ms:.3f} ms, {floor:.1%} apart: a median-latency difference of "
            f"at most {floor:.1%} is a tie (speed-up marked \"(tie)\"); one run's floor, itself noisy")


def floors_header(floors: dict[int, float | None], fp32: dict[int, Latency | None],
                  twin: dict[int, Latency | None]) -> str:
    """The noise floor of each latency batch, in one line."""
    parts = [f"batch {b}: `{TWIN}` {twin[b].median_ms:.3f} ms against `fp32`'s {fp32[b].median_ms:.3f} ms, "
             f"{f:.1%} apart" for b, f in floors.items() if f is not None]
    if not parts:
        return ""
    return (f"`{TWIN}` (a second session of the unchanged fp32 model, in the same interleaved run) measured "
            + "; ".join(parts) + ": at each batch, a median-latency difference within that batch's floor is a tie "
            "(speed-up marked \"(tie)\"); one run's floors, themselves noisy")


@dataclass
class LatencyConfig:
    warmup: int = 20
    repeats: int = 100
    min_seconds: float = 3.0
    max_seconds: float = 30.0
    quiet_load: float | None = None  # wait until the 1-minute load average is below this before timing
    quiet_timeout: float = 1800.0  # ... for at most this many seconds


def _cpu_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (all cores), from /proc/stat; None if unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How much of the machine's CPU other processes used over a stretch of time: busy CPU time of the whole
    machine (/proc/stat) minus this process's own, divided by wall time x cores."""

    def __enter__(self):
        self._busy, self._own, self._wall = _cpu_busy_seconds(), time.process_time(), time.monotonic()
        return self

    def __exit__(self, *exc):
        busy, own, wall = _cpu_busy_seconds(), time.process_time(), time.monotonic()
        if busy is None or self._busy is None or wall <= self._wall:
            self.fraction = None
        else:
            other = (busy - self._busy) - (own - self._own)
            self.fraction = max(0.0, other) / ((wall - self._wall) * (os.cpu_count() or 1))
        return False


def wait_for_quiet(threshold: float, timeout: float, poll: float = 5.0) -> tuple[float, bool]:
    """Sleep until the 1-minute load average is below `threshold` (this process's own earlier work counts too, so
    it also lets that decay). Returns (seconds waited, whether the machine became quiet)."""
    t0 = time.monotonic()
    while os.getloadavg()[0] >= threshold:
        if time.monotonic() - t0 >= timeout:
            return time.monotonic() - t0, False
        time.sleep(poll)
    return time.monotonic() - t0, True


@dataclass
class Row:
    name: str
    path: Path | None = None
    seconds: float | None = None
    note: str = ""
    error: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    latency: Latency | None = None  # at the first latency batch (batch 1 unless told otherwise)
    size_bytes: int | None = None
    parameters: int | None = None
    latencies: dict[int, Latency] = field(default_factory=dict)  # batch -> latency
    latency_errors: dict[int, str] = field(default_factory=dict)  # batch -> why it could not be timed there

    @property
    def failed(self) -> bool:
        return bool(self.error)


@dataclass
class Result:
    task: Task
    rows: list[Row]
    header: dict[str, str]
    fp32_provenance: str
    calibration: str
    evaluation: Evaluation
    noise_floor: float | None = None  # at the first latency batch
    latency_batches: tuple[int, ...] = (1,)
    noise_floors: dict[int, float | None] = field(default_factory=dict)  # batch -> noise floor

    def markdown(self, level: int = 2) -> str:
        return render(self, level)


def model_size(path: Path) -> int:
    """Bytes on disk: the .onnx file plus any external-data files it names."""
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    seen = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                f = path.parent / entry.value
                if f.is_file():
                    total += f.stat().st_size
    return total


def parameter_count(path: Path) -> int:
    """Sum of the element counts of all initializers (main graph and subgraphs)."""
    model = onnx.load(str(path), load_external_data=False)

    def count(graph: onnx.GraphProto) -> int:
        n = sum(int(np.prod(t.dims, dtype=np.int64)) for t in graph.initializer)
        n += sum(int(np.prod(t.values.dims, dtype=np.int64)) for t in graph.sparse_initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    n += count(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    n += sum(count(g) for g in attr.graphs)
        return n

    return count(model.graph)


def _session(path: Path, settings: RuntimeSettings) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(settings), providers=list(settings.providers))


def _evaluate(session: ort.InferenceSession, ev: Evaluation) -> np.ndarray:
    names = [o.name for o in session.get_outputs()]
    parts = []
    for feed in ev.feeds:
        out = dict(zip(names, session.run(names, feed)))
        parts.append(np.asarray(ev.rows(out, feed)))
    return np.concatenate(parts, axis=0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_task(name: str, contender_names: list[str], *, threads: int = 2, limit: int | None = None,
             rebuild: bool = False, latency: LatencyConfig | None = None, cache: Path = CACHE,
             command: str = "", latency_batches: tuple[int, ...] = (1,)) -> Result:
    """Build, score and time every contender. Latency is measured at each of `latency_batches` (one interleaved
    measurement per batch size, each with its own fp32_twin noise floor); `Row.latency` is the first batch's."""
    task = TASKS[name]
    latency_batches = tuple(dict.fromkeys(int(b) for b in latency_batches)) or (1,)
    latency = latency or LatencyConfig()
    settings = RuntimeSettings(intra_op_threads=threads, inter_op_threads=1)
    names = list(dict.fromkeys(["fp32", TWIN, *contender_names]))  # fp32 is always there: the reference
    for n in names:
        if n != TWIN:
            C.get(n)  # unknown names fail before any work

    model_cache = cache / name
    fp32_path, provenance = task.fp32(model_cache, rebuild)
    log(f"{name}: fp32 model {_rel(fp32_path)}")
    calib, calib_desc = task.calibration()
    ev = task.evaluation(limit)
    log(f"{name}: {len(calib)} calibration feeds; evaluation: {ev.description}")

    rows: list[Row] = []
    sessions: dict[str, ort.InferenceSession] = {}
    outputs: dict[str, np.ndarray] = {}
    for cname in names:
        row = Row(cname)
        rows.append(row)
        if cname == TWIN:  # same file as fp32, so the same outputs: timed, not scored again
            row.path, row.seconds, row.note = rows[0].path, 0.0, TWIN_NOTE
            row.size_bytes, row.parameters = rows[0].size_bytes, rows[0].parameters
            sessions[cname] = _session(row.path, settings)
            continue
        workdir = model_cache / "contenders" / cname
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        log(f"{name}: building {cname}")
        try:
            fn = C.get(cname)
            extra = {"task": name} if "task" in inspect.signature(fn).parameters else {}  # peers tuned per model
            with contextlib.redirect_stdout(sys.stderr):  # ORT's calibrators print progress to stdout
                opt = fn(Path(fp32_path), calib, workdir, **extra)
            opt = C.Optimized(*opt) if not isinstance(opt, C.Optimized) else opt
            row.path, row.seconds, row.note = Path(opt.path), float(opt.seconds), opt.note
            row.size_bytes = model_size(row.path)
            row.parameters = parameter_count(row.path)
            sessions[cname] = _session(row.path, settings)
            outputs[cname] = _evaluate(sessions[cname], ev)
        except Exception as exc:  # a contender that fails on this model is a result, not a crash
            row.error = _first_line(exc)
            sessions.pop(cname, None)
            log(f"{name}: {cname} FAILED: {row.error}")
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
            if cname == "fp32":
                raise
    reference = outputs["fp32"]
    for row in rows:
        if row.name in outputs:
            row.scores = ev.score(reference, outputs[row.name])

    live = [r for r in rows if r.name in sessions]
    quiet = ""
    if latency.quiet_load is not None:
        log(f"{name}: waiting for the 1-minute load average to fall below {latency.quiet_load:g} "
            f"(now {os.getloadavg()[0]:.2f})")
        waited, ok = wait_for_quiet(latency.quiet_load, latency.quiet_timeout)
        quiet = (f"; timing started after waiting {waited:.0f} s for the 1-minute load average to fall below "
                 f"{latency.quiet_load:g}" if ok else
                 f"; the 1-minute load average did not fall below {latency.quiet_load:g} within {waited:.0f} s: "
                 "timed on a busy machine")
    load_before = os.getloadavg()
    by_name = {r.name: r for r in rows}
    floors: dict[int, float | None] = {}
    runs: dict[int, int] = {}
    with OtherLoad() as other:
        for b in latency_batches:
            feed = ev.latency_feed_of(b)
            timed = []
            for r in live:  # a model that cannot run this batch (e.g. a fixed batch size) is left out of it
                try:
                    sessions[r.name].run(None, feed)
                    timed.append(r)
                except Exception as exc:
                    r.latency_errors[b] = _first_line(exc)
                    log(f"{name}: {r.name} cannot be timed at batch {b}: {r.latency_errors[b]}")
            log(f"{name}: measuring latency of {len(timed)} models interleaved at batch {b} "
                f"(load average {os.getloadavg()[0]:.2f})")
            lats = measure_latencies([sessions[r.name] for r in timed], feed, warmup=latency.warmup,
                                     repeats=latency.repeats, min_seconds=latency.min_seconds,
                                     max_seconds=latency.max_seconds, threads=threads) if timed else []
            for r, lat in zip(timed, lats):
                r.latencies[b] = lat
            runs[b] = min((l.runs for l in lats), default=0)
            fp32_b, twin_b = by_name["fp32"].latencies.get(b), by_name[TWIN].latencies.get(b)
            floors[b] = noise_floor(fp32_b, twin_b)
    load_after = os.getloadavg()
    if other.fraction is not None:
        quiet += f"; other processes used {other.fraction:.0%} of the CPU while timing"
    first = latency_batches[0]
    for r in rows:
        r.latency = r.latencies.get(first)
    fp32_lat = by_name["fp32"].latency
    twin_lat = by_name[TWIN].latency if TWIN in by_name else None
    floor = floors.get(first)
    if len(latency_batches) == 1:
        batch = next(iter(ev.latency_feed_of(first).values())).shape[0]
        latency_text = (f"{ev.latency_description_of(first)}; ORT CPU EP, {threads} intra-op threads, 1 inter-op, "
                        f"graph optimization all; sessions measured interleaved in rounds of 5 (graphopt.core.runtime."
                        f"measure_latencies), {latency.warmup} warm-up runs each, {runs[first]}+ timed runs each")
        batch_text = f"batch {batch}; {threads} intra-op threads, 1 inter-op thread"
        floor_text = floor_header(floor, fp32_lat.median_ms if fp32_lat else None,
                                  twin_lat.median_ms if twin_lat else None)
    else:
        latency_text = ("; ".join(f"batch {b}: {ev.latency_description_of(b)}" for b in latency_batches)
                        + f". ORT CPU EP, {threads} intra-op threads, 1 inter-op, graph optimization all; one "
                        "measurement per batch size, its sessions interleaved in rounds of 5 (graphopt.core.runtime."
                        f"measure_latencies), {latency.warmup} warm-up runs each; timed runs each: "
                        + ", ".join(f"{runs[b]}+ at batch {b}" for b in latency_batches))
        batch_text = (f"batches {', '.join(map(str, latency_batches))} (columns \"bB\"); {threads} intra-op "
                      "threads, 1 inter-op thread")
        floor_text = floors_header(floors, {b: by_name["fp32"].latencies.get(b) for b in latency_batches},
                                   {b: by_name[TWIN].latencies.get(b) for b in latency_batches})

    m = machine()
    header = {
        "model": name,
        "fp32 model": provenance,
        "evaluation": ev.description,
        "calibration": calib_desc,
        "latency": latency_text,
        "batch / threads": batch_text,
        "noise floor": floor_text,
        "contenders": "; ".join(f"`{n}`: {TWIN_NOTE if n == TWIN else C.describe(n)}" for n in names),
        "ORT settings": C.ORT_SETTINGS if any(n.startswith("ort_") for n in names) else "",
        "machine": f"{m['cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']}; Python {m['python']}; "
                   f"graphopt {m['graphopt']}",
        "load average": (f"{load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f} (1/5/15 min) before "
                         f"timing, {load_after[0]:.2f} after{quiet}"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"`{command}`" if command else "",
    }
    return Result(task, rows, header, provenance, calib_desc, ev, floor, latency_batches, floors)


# ------------------------------------------------------------------------------------------------------ render
def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return format(value, spec)


TABLE_COLUMNS = ["contender", "latency median (ms)", "p90 (ms)", "speed-up", "size (MB)", "params",
                 "opt. time (s)", "notes"]


def latency_headers(batches: tuple[int, ...] = (1,)) -> list[str]:
    """The latency columns: one batch as before (median, p90, speed-up); several: median and speed-up per batch,
    p90 for the first batch only (the table is wide enough)."""
    if len(batches) == 1:
        return TABLE_COLUMNS[1:4]
    out = []
    for i, b in enumerate(batches):
        out += [f"latency b{b} (ms)", *([f"p90 b{b} (ms)"] if i == 0 else []), f"speed-up b{b}"]
    return out


def table_headers(columns: list[Column], batches: tuple[int, ...] = (1,)) -> list[str]:
    return ["contender", *[c.header for c in columns], *latency_headers(batches), *TABLE_COLUMNS[4:]]


def _latency_cells(result: Result, r: Row, ref: Row | None) -> list[str]:
    def at(row: Row | None, b: int) -> Latency | None:
        if row is None:
            return None
        return row.latencies.get(b) or (row.latency if len(result.latency_batches) == 1 else None)

    cells = []
    for i, b in enumerate(result.latency_batches):
        lat, ref_lat = at(r, b), at(ref, b)
        if lat:
            floor = result.noise_floors.get(b, result.noise_floor if i == 0 else None)
            speed = speedup_cell(ref_lat.median_ms if ref_lat else None, lat.median_ms, floor, is_ref=r is ref)
            cells += [f"{lat.median_ms:.3f}", *([f"{lat.p90_ms:.3f}"] if i == 0 else []), speed]
        else:
            cells += ["–", *(["–"] if i == 0 else []), "–"]
    return cells


def render(result: Result, level: int = 2) -> str:
    h = "#" * level
    lines = [f"{h} {result.task.name}", ""]
    for key, value in result.header.items():
        if value:
            lines.append(f"- **{key}**: {value}")
    for note in result.task.notes:
        lines.append(f"- {note}")
    lines.append("")
    headers = table_headers(result.task.columns, result.latency_batches)
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join("---" if i == 0 or headers[i] == "notes" else "---:"
                                for i in range(len(headers))) + "|")
    ref = next((r for r in result.rows if r.name == "fp32" and r.latency), None)
    for r in result.rows:
        cells = [f"`{r.name}`"]
        cells += [_fmt(r.scores.get(c.key), c.fmt) for c in result.task.columns]
        cells += _latency_cells(result, r, ref)
        cells += [_fmt(r.size_bytes / 1e6 if r.size_bytes is not None else None, ".3f"),
                  f"{r.parameters:,}" if r.parameters is not None else "–",
                  _fmt(r.seconds, ".1f")]
        note = f"**failed**: {r.error}" if r.failed else r.note
        if r.latency_errors and not r.failed:
            note = "; ".join([note] * bool(note) + [f"not timed at batch {b}: {e}" for b, e in
                                                    r.latency_errors.items()])
        cells.append(note.replace("|", "\\|").replace("\n", " "))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    from graphopt.core.files import write_text_atomic

    write_text_atomic(path, text)


def tree_state() -> str:
    """The commit and the uncommitted edits under graphopt/ this run imported (another engineer edits them)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "graphopt"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (git unavailable)"
    files = [line[3:] for line in dirty if line.strip()]
    return f"commit {head}" + (f", with uncommitted edits (at the start of the run) in {', '.join(files)}" if files
                               else ", clean")
