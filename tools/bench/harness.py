"""Run every contender on one model, in one process, on the same inputs, and tabulate the results."""

from __future__ import annotations

import contextlib
import datetime as _dt
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
    latency: Latency | None = None
    size_bytes: int | None = None
    parameters: int | None = None

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
    noise_floor: float | None = None

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
             command: str = "") -> Result:
    task = TASKS[name]
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
            with contextlib.redirect_stdout(sys.stderr):  # ORT's calibrators print progress to stdout
                opt = C.get(cname)(Path(fp32_path), calib, workdir)
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
    log(f"{name}: measuring latency of {len(live)} models interleaved (load average {load_before[0]:.2f})")
    with OtherLoad() as other:
        lats = measure_latencies([sessions[r.name] for r in live], ev.latency_feed, warmup=latency.warmup,
                                 repeats=latency.repeats, min_seconds=latency.min_seconds,
                                 max_seconds=latency.max_seconds, threads=threads)
    load_after = os.getloadavg()
    if other.fraction is not None:
        quiet += f"; other processes used {other.fraction:.0%} of the CPU while timing"
    for r, lat in zip(live, lats):
        r.latency = lat
    by_name = {r.name: r for r in rows}
    fp32_lat = by_name["fp32"].latency
    twin_lat = by_name[TWIN].latency if TWIN in by_name else None
    floor = noise_floor(fp32_lat, twin_lat)
    batch = next(iter(ev.latency_feed.values())).shape[0] if ev.latency_feed else None

    m = machine()
    header = {
        "model": name,
        "fp32 model": provenance,
        "evaluation": ev.description,
        "calibration": calib_desc,
        "latency": (f"{ev.latency_description}; ORT CPU EP, {threads} intra-op threads, 1 inter-op, graph "
                    f"optimization all; sessions measured interleaved in rounds of 5 (graphopt.core.runtime."
                    f"measure_latencies), {latency.warmup} warm-up runs each, "
                    f"{min(l.runs for l in lats) if lats else 0}+ timed runs each"),
        "batch / threads": f"batch {batch}; {threads} intra-op threads, 1 inter-op thread",
        "noise floor": floor_header(floor, fp32_lat.median_ms if fp32_lat else None,
                                    twin_lat.median_ms if twin_lat else None),
        "contenders": "; ".join(f"`{n}`: {TWIN_NOTE if n == TWIN else C.describe(n)}" for n in names),
        "ORT settings": C.ORT_SETTINGS if any(n.startswith("ort_") for n in names) else "",
        "machine": f"{m['cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']}; Python {m['python']}; "
                   f"graphopt {m['graphopt']}",
        "load average": (f"{load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f} (1/5/15 min) before "
                         f"timing, {load_after[0]:.2f} after{quiet}"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"`{command}`" if command else "",
    }
    return Result(task, rows, header, provenance, calib_desc, ev, floor)


# ------------------------------------------------------------------------------------------------------ render
def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return format(value, spec)


TABLE_COLUMNS = ["contender", "latency median (ms)", "p90 (ms)", "speed-up", "size (MB)", "params",
                 "opt. time (s)", "notes"]


def table_headers(columns: list[Column]) -> list[str]:
    return ["contender", *[c.header for c in columns], *TABLE_COLUMNS[1:]]


def render(result: Result, level: int = 2) -> str:
    h = "#" * level
    lines = [f"{h} {result.task.name}", ""]
    for key, value in result.header.items():
        if value:
            lines.append(f"- **{key}**: {value}")
    for note in result.task.notes:
        lines.append(f"- {note}")
    lines.append("")
    headers = table_headers(result.task.columns)
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join("---" if i == 0 or headers[i] == "notes" else "---:"
                                for i in range(len(headers))) + "|")
    ref = next((r for r in result.rows if r.name == "fp32" and r.latency), None)
    for r in result.rows:
        cells = [f"`{r.name}`"]
        cells += [_fmt(r.scores.get(c.key), c.fmt) for c in result.task.columns]
        if r.latency:
            speed = speedup_cell(ref.latency.median_ms if ref else None, r.latency.median_ms, result.noise_floor,
                                 is_ref=r is ref)
            cells += [f"{r.latency.median_ms:.3f}", f"{r.latency.p90_ms:.3f}", speed]
        else:
            cells += ["–", "–", "–"]
        cells += [_fmt(r.size_bytes / 1e6 if r.size_bytes is not None else None, ".3f"),
                  f"{r.parameters:,}" if r.parameters is not None else "–",
                  _fmt(r.seconds, ".1f")]
        note = f"**failed**: {r.error}" if r.failed else r.note
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
