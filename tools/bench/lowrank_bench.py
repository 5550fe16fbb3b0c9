#!/usr/bin/env python
"""Benchmark of the lowrank pass: plain vs whitened SVD at the same parameter budget, allocated vs uniform ranks.

    python tools/bench/lowrank_bench.py --model minilm          [--ratios 0.7] [--limit N]
    python tools/bench/lowrank_bench.py --model mnist_cnn       [--ratios 0.8,0.6,0.4]
    python tools/bench/lowrank_bench.py --model fashion_resnet  [--ratios 0.8,0.6,0.4]
    (--quiet-load 1.5 --quiet-timeout 300: wait for a quiet machine before timing)

For each parameter ratio ρ (parameters of the factorizable layers after / before) the contenders are:
- `svd-uniform@ρ`, `whitened-uniform@ρ`: the same rank in every layer (`rank=r`), r the largest uniform rank
  whose parameter count fits ρ (layers where r does not pay stay as they are), reaching a ratio ρ' ≤ ρ;
- `svd@ρ`, `whitened@ρ`: the pass with `param_ratio=ρ'` (the uniform baseline's own parameter count), ranks
  chosen per layer by the shared allocator;
plus, with `--target-speedups X` (default 1.3 for fashion_resnet), `whitened@speedup=X`: the pass at its default
method with `target_speedup=X` (whole-model latency measured by the pass); plus the fp32 model and `fp32_twin` (the
same fp32 model in a second, separately built session, timed in the same interleaved run: its distance from 1.00×
is the table's noise floor, and a speed-up within it is marked a tie). Each is scored on the task's evaluation set (tools/bench/tasks.py; MNIST CNN: scikit-learn
digits, calibrated on the first 256 and scored on the other 1541) and timed interleaved with the others on the
task's batch-1 latency input. Results go to tools/bench/results/lowrank_<model>.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parents[1]
for _p in (str(_REPO), str(_REPO / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

from bench import datasets, metrics, tasks  # noqa: E402
from bench.harness import (CACHE, TWIN, TWIN_NOTE, OtherLoad, floor_header, is_tie, log,  # noqa: E402
                           wait_for_quiet, write_atomic)
from graphopt.core.calibration import InputSet  # noqa: E402
from graphopt.passes.lowrank.factorize import max_useful_rank  # noqa: E402
from graphopt.passes.lowrank.rewrite import find_sites  # noqa: E402
from graphopt.core.model import Model  # noqa: E402
from graphopt.passes import Context, create  # noqa: E402
from graphopt.report import machine  # noqa: E402
from graphopt.core.runtime import RuntimeSettings, make_session, measure_latencies  # noqa: E402

RESULTS = _HERE / "results"


@dataclass
class Row:
    name: str
    model: Model
    seconds: float = 0.0
    counters: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    latency_ms: float | None = None
    note: str = ""


# ------------------------------------------------------------------------------------------------ the tasks
def mnist_task(limit):
    """MNIST CNN (real weights) on scikit-learn digits: first 256 digits calibrate, the rest evaluate."""
    x, y = datasets.digits_28x28()
    calib = tasks.batches({"image": x[:256]}, 32)
    xe, ye = x[256:], y[256:]
    if limit:
        xe, ye = xe[:limit], ye[:limit]

    def score(ref, cand):
        return {"accuracy": metrics.top1_accuracy(cand, ye), "agreement": metrics.top1_agreement(ref, cand),
                "kl": metrics.mean_kl(ref, cand)}

    ev = tasks.Evaluation(tasks.batches({"image": xe}, 500), {"image": xe[:1].copy()},
                          lambda out, feed: next(iter(out.values())), score,
                          f"scikit-learn digits 256.. ({len(ye)} images, 8x8 -> 28x28 MNIST-like)",
                          "one digit, `image` [1, 1, 28, 28]")
    return calib, "the first 256 scikit-learn digits (batches of 32)", ev


def fashion_task(limit):
    calib, desc = tasks._fashion_calibration()
    ev = tasks._fashion_evaluation(limit)
    score = ev.score

    def score_kl(ref, cand):
        return {**score(ref, cand), "kl": metrics.mean_kl(ref, cand)}
    ev.score = score_kl
    return calib, desc, ev


def minilm_task(limit):
    calib, desc = tasks._minilm_calibration()
    ev = tasks._minilm_evaluation(limit)
    score = ev.score

    def score_err(ref, cand):
        out = score(ref, cand)
        return {**out, "one_minus_cos": 1.0 - out["cosine"]}
    ev.score = score_err
    return calib, desc, ev


MODELS = {
    "mnist_cnn": (mnist_task, [("accuracy", "top-1 acc", ".2%"), ("agreement", "agree w/ fp32", ".2%"),
                               ("kl", "mean KL(fp32‖c)", ".4f")]),
    "fashion_resnet": (fashion_task, [("accuracy", "top-1 acc", ".2%"), ("agreement", "agree w/ fp32", ".2%"),
                                      ("kl", "mean KL(fp32‖c)", ".4f")]),
    "minilm": (minilm_task, [("one_minus_cos", "1 − cosine to fp32", ".5f"), ("probe", "probe acc", ".2%")]),
}


# ------------------------------------------------------------------------------------------------ contenders
def uniform_rank(model: Model, ratio: float) -> tuple[int, float]:
    """The largest rank r such that every factorizable layer at rank r (where r pays) fits ratio × params, and
    the parameter ratio it actually reaches (the allocated contenders get exactly that budget)."""
    sites = [s for s in find_sites(model) if not s.reason and max_useful_rank(s.n_in, s.n_out) >= 1]
    total = sum(s.params for s in sites)
    best = (1, 1.0)
    for r in range(1, max(min(s.n_in, s.n_out) for s in sites) + 1):
        used = sum(r * (s.n_in + s.n_out) if r <= max_useful_rank(s.n_in, s.n_out) else s.params for s in sites)
        if used <= ratio * total:
            best = (r, used / total)
    return best


def build(model: Model, params: dict, calib, settings: RuntimeSettings) -> tuple[Model, dict, float]:
    ctx = Context(inputs=InputSet(fit=calib, selection=[], verification=calib[:2]), runtime=settings, progress=log)
    t0 = time.perf_counter()
    result = create("lowrank", {k: str(v) for k, v in params.items()}).run(model, ctx)
    return result.model, result.counters, time.perf_counter() - t0


def evaluate(model: Model, ev, settings) -> np.ndarray:
    session = make_session(model, settings)
    names = [o.name for o in session.get_outputs()]
    parts = [np.asarray(ev.rows(dict(zip(names, session.run(names, f))), f)) for f in ev.feeds]
    return np.concatenate(parts)


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--ratios", default=None, help="comma-separated param ratios (default: 0.7 for minilm, "
                                                   "0.8,0.6,0.4 otherwise)")
    ap.add_argument("--methods", default="svd,whitened")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--calibration-samples", type=int, default=16)
    ap.add_argument("--sensitivity-samples", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=24, help="ranks offered per site to the allocator")
    ap.add_argument("--target-speedups", default=None, help="comma-separated target_speedup runs of the pass "
                                                            "(default: 1.3 for fashion_resnet, none otherwise)")
    ap.add_argument("--latency-seconds", type=float, default=2.0)
    ap.add_argument("--quiet-load", type=float, default=None)
    ap.add_argument("--quiet-timeout", type=float, default=300.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    command = "python " + shlex.join(["tools/bench/lowrank_bench.py", *(argv if argv is not None else sys.argv[1:])])
    ratios = [float(r) for r in (args.ratios or ("0.7" if args.model == "minilm" else "0.8,0.6,0.4")).split(",")]
    methods = args.methods.split(",")
    settings = RuntimeSettings(intra_op_threads=args.threads, inter_op_threads=1)

    task_fn, columns = MODELS[args.model]
    fp32_path, provenance = tasks.exported(args.model, CACHE / args.model, False)
    model = Model.load(fp32_path)
    calib, calib_desc, ev = task_fn(args.limit)
    log(f"{args.model}: {len(calib)} calibration feeds; evaluation: {ev.description}")

    rows = [Row("fp32", model), Row(TWIN, model, note=TWIN_NOTE)]
    for ratio in ratios:
        r_uniform, reached = uniform_rank(model, ratio)
        log(f"{args.model}: ratio {ratio:g}: uniform rank {r_uniform} reaches {reached:.4f}")
        for method in methods:
            common = {"method": method, "calibration_samples": args.calibration_samples,
                      "sensitivity_samples": args.sensitivity_samples, "candidates": args.candidates}
            for name, extra in ((f"{method}@{ratio:g}", {"param_ratio": round(reached, 6)}),
                                (f"{method}-uniform@{ratio:g}", {"rank": r_uniform})):
                log(f"{args.model}: building {name}")
                try:
                    m, counters, secs = build(model, {**common, **extra}, calib, settings)
                    rows.append(Row(name, m, secs, counters, note=f"rank {r_uniform} everywhere" if "rank" in extra
                                    else "allocated ranks"))
                except Exception as exc:  # a failed contender is a result
                    log(f"{args.model}: {name} FAILED: {exc}")
                    rows.append(Row(name, model, note=f"**failed**: {str(exc).splitlines()[0][:200]}"))
                    rows[-1].counters = {"failed": True}

    speedups = args.target_speedups if args.target_speedups is not None else \
        ("1.3" if args.model == "fashion_resnet" else "")
    for target in [float(t) for t in speedups.split(",") if t.strip()]:
        name = f"whitened@speedup={target:g}"
        log(f"{args.model}: building {name}")
        params = {"method": "whitened", "target_speedup": target, "calibration_samples": args.calibration_samples,
                  "sensitivity_samples": args.sensitivity_samples, "candidates": args.candidates}
        try:
            m, counters, secs = build(model, params, calib, settings)
            rows.append(Row(name, m, secs, counters, note=f"target_speedup={target:g} (the pass measured "
                                                          f"{counters.get('measured_speedup', '?')}x on its own)"))
        except Exception as exc:  # a failed contender is a result
            log(f"{args.model}: {name} FAILED: {exc}")
            rows.append(Row(name, model, note=f"**failed**: {str(exc).splitlines()[0][:200]}"))
            rows[-1].counters = {"failed": True}

    outputs = {}
    for row in rows:
        if row.counters.get("failed"):
            continue
        if row.name == TWIN:
            continue
        log(f"{args.model}: evaluating {row.name}")
        outputs[row.name] = evaluate(row.model, ev, settings)
        row.scores = ev.score(outputs["fp32"], outputs[row.name])

    live = [r for r in rows if r.name in outputs or r.name == TWIN]
    quiet = ""
    if args.quiet_load is not None:
        waited, ok = wait_for_quiet(args.quiet_load, args.quiet_timeout)
        quiet = (f"; timing started after waiting {waited:.0f} s for the 1-minute load average to fall below "
                 f"{args.quiet_load:g}" if ok else f"; the 1-minute load average did not fall below "
                 f"{args.quiet_load:g} within {waited:.0f} s: timed on a busy machine")
    load_before = os.getloadavg()
    log(f"{args.model}: timing {len(live)} models interleaved (load average {load_before[0]:.2f})")
    with OtherLoad() as other:
        lats = measure_latencies([make_session(r.model, settings) for r in live], ev.latency_feed, warmup=10,
                                 repeats=50, min_seconds=args.latency_seconds, max_seconds=10 * args.latency_seconds)
    load_after = os.getloadavg()[0]
    if other.fraction is not None:
        quiet += f"; other processes used {other.fraction:.0%} of the CPU while timing"
    for r, lat in zip(live, lats):
        r.latency_ms = lat.median_ms
    floor = abs(rows[1].latency_ms / rows[0].latency_ms - 1.0) if rows[1].latency_ms and rows[0].latency_ms else None

    m = machine()
    header = {
        "model": f"{args.model}: {provenance}",
        "evaluation": ev.description,
        "calibration": f"{calib_desc}; the pass used {min(args.calibration_samples, len(calib))} feeds for XᵀX and "
                       f"{args.sensitivity_samples} for the per-site output distortion",
        "latency": f"{ev.latency_description}; ORT CPU EP, {args.threads} intra-op threads; all models interleaved "
                   f"(graphopt.core.runtime.measure_latencies), {min(l.runs for l in lats)}+ timed runs each, median",
        "batch / threads": f"batch {next(iter(ev.latency_feed.values())).shape[0]}; {args.threads} intra-op threads, "
                           "1 inter-op thread",
        "noise floor": floor_header(floor, rows[0].latency_ms, rows[1].latency_ms),
        "machine": f"{m['cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']}; Python {m['python']}; "
                   f"graphopt {m['graphopt']}",
        "load average": f"{load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f} (1/5/15 min) before "
                        f"timing, {load_after:.2f} after{quiet}",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"`{command}`",
    }
    text = render(args.model, header, rows, columns, floor)
    out = Path(args.out) if args.out else RESULTS / f"lowrank_{args.model}.md"
    write_atomic(out, text)
    print(text)
    return 0


def render(name: str, header: dict, rows: list[Row], columns, floor: float | None = None) -> str:
    lines = [f"# lowrank: {name}", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items() if v]
    lines.append("- **params (layers)**: parameters of the factorizable layers after / before the pass; "
                 "**params (model)**: every initializer element")
    lines.append("")
    heads = ["contender", *[c[1] for c in columns], "params (layers)", "ratio", "params (model)",
             "factorized", "latency median (ms)", "speed-up", "pass time (s)", "notes"]
    lines.append("| " + " | ".join(heads) + " |")
    lines.append("|---|" + "|".join("---:" for _ in heads[1:-1]) + "|---|")
    ref = rows[0].latency_ms
    for r in rows:
        c = r.counters
        cells = [f"`{r.name}`"]
        cells += [format(r.scores[k], f) if k in r.scores else "–" for k, _, f in columns]
        if "params_after" in c:
            cells += [f"{c['params_after']:,} / {c['params_before']:,}", f"{c['param_ratio']:.3f}"]
        else:
            cells += ["–", "–"]
        cells.append(f"{r.model.parameter_count():,}")
        cells.append(f"{c['factorized']}/{c['candidates']}" if "factorized" in c else "–")
        cells.append(f"{r.latency_ms:.3f}" if r.latency_ms else "–")
        tie = r is not rows[0] and r.latency_ms and ref and is_tie(r.latency_ms, ref, floor)
        cells.append((f"{ref / r.latency_ms:.2f}×" + (" (tie)" if tie else "")) if r.latency_ms and ref else "–")
        cells.append(f"{r.seconds:.1f}" if r.seconds else "–")
        cells.append(r.note)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
