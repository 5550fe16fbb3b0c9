"""Search benchmark: `graphopt.search` under one budget per model, its chosen recipe against fp32, the best single
pass of the same search and Microsoft Olive, on the harness's evaluation data; then the same search again under a
second budget with the same build cache.

    python tools/bench/search_bench.py --model fashion_resnet --max-minutes 15    # -> results/search_fashion_resnet.*
    python tools/bench/search_bench.py --model mobilenet_v2 --max-minutes 15
    python tools/bench/search_bench.py --model minilm --max-minutes 15
    (--limit N: evaluate on the first N evaluation samples only (smoke tests); --quiet-load / --quiet-timeout: the
     load-average wait before each search and each timing (default 1.5 / 120 s); --no-olive; --no-rerun;
     --warm-cache keeps the build cache of an earlier run (default: the first search starts from an empty one);
     --out-dir PATH (default tools/bench/results))

Per model, in one process:

1. the fp32 ONNX model from the harness (`tasks.py`, cached export);
2. the search's inputs, split by `graphopt.core.calibration.split_samples` (seed 0) into fit / selection /
   verification (`INPUTS`; none of them is in the evaluation set):
   - fashion_resnet: 1024 Fashion-MNIST *training* images (seeded choice), 512 feeds of 2, with their labels
     (selection and verification 256 images each: an accuracy drop resolves to 0.39 pt; feeds of 2, not 8,
     because the passes count their fit samples in feeds);
   - mobilenet_v2: 192 crops of the 5 calibration photos, 24 feeds of 8;
   - minilm: 512 WordNet `calibration` glosses, 32 feeds of 16; latency shape [1, 128] (the harness's);
3. `Search(model, ctx, BUDGETS[model], families=FAMILY_ORDER, max_minutes=...,
   cache_dir=build/bench/<model>/search_cache)` with 2 intra-op threads, after waiting for a quiet machine
   (`FAMILY_ORDER` puts qdq first: see there; `--families default` is the search's own order); the chosen point is verified with `verify_choice` on the
   verification split (which no build and no choice read);
4. the harness (`harness.run_task`, unchanged: evaluation, interleaved latency at batch 1 and 16 with the
   `fp32_twin` noise floor, the quiet-load wait, the machine/load header) on these contenders:
   - `search_chosen`: the search's chosen model (if none met the budget: `search_best_reachable`, its fastest
     point within the fidelity floor, marked as missing the budget);
   - `best_single`: among the search's single-family points (one pass after the cleanup recipe) that are within
     the floor on the selection split, the fastest (measured speed-up on selection);
   - `olive_static` (and, for MiniLM, `olive_dynamic`): Microsoft Olive 0.13.0's `OnnxStaticQuantization`
     (`OnnxDynamicQuantization`) at its defaults, a workflow run offline in a subprocess on the same fit +
     selection feeds (Olive is installed with `pip install --no-deps --target build/olive_env olive-ai==0.13.0
     <its missing dependencies>`, outside the project's environment; the subprocess gets it on PYTHONPATH);
5. the same search with `RERUN_BUDGETS[model]` and the same cache folder: its wall time, builds and cache hits.

Writes results/search_<model>.md (table, search cost, rerun, every point of the search), search_<model>.json
(`SearchResult.to_dict()` plus `verification` and `rerun`), search_<model>.png (`graphopt.report_html.front_png`;
point numbers in the plot and the tables are the search's 1-based candidate numbers) and, where some candidates lie
far above the floor, search_<model>_zoom.png without them (`--replot` redraws both from the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` and `models` importable
    _root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(_root / "tools"), str(_root)]
    __package__ = "bench"

from bench import contenders as C  # noqa: E402
from bench import datasets, tasks  # noqa: E402
from bench.harness import CACHE, LatencyConfig, log, run_task, tree_state, wait_for_quiet, write_atomic  # noqa: E402

from graphopt.core.calibration import split_samples  # noqa: E402
from graphopt.core.model import Model  # noqa: E402
from graphopt.core.runtime import RuntimeSettings  # noqa: E402
from graphopt.passes import Context  # noqa: E402
from graphopt.search import Budget, Search, verify_choice  # noqa: E402

REPO = tasks.REPO
TREE_AT_START = tree_state()  # graphopt is imported above; another engineer edits it while benchmarks run
RESULTS = Path(__file__).resolve().parent / "results"
OLIVE_ENV = REPO / "build" / "olive_env"
THREADS = 2

BUDGETS = {
    "fashion_resnet": Budget(target_speedup=4, max_drop=1.0),
    "mobilenet_v2": Budget(target_speedup=2, min_agreement=0.9),
    "minilm": Budget(target_speedup=2, min_cosine=0.99),
    "fashion_cnn": Budget(target_speedup=2, max_drop=1.0),  # smoke tests on the bundled model
}
RERUN_BUDGETS = {
    "fashion_resnet": Budget(target_speedup=3, max_drop=1.0),
    "mobilenet_v2": Budget(target_speedup=1.5, min_agreement=0.9),
    "minilm": Budget(target_speedup=1.5, min_cosine=0.99),
    "fashion_cnn": Budget(target_speedup=1.5, max_drop=1.0),
}
# The single points are built family by family in this order. The search's own order (families=None) is
# alphabetical: layermerge first, whose five levels alone took about 3 min each on Fashion ResNet on a busy machine,
# so under a 15 min bound qdq (the one family that reaches 3x alone there) came last or not at all.
FAMILY_ORDER = ("qdq", "prune", "lowrank", "layermerge", "recover")
METRIC = {"fashion_resnet": "accuracy", "fashion_cnn": "accuracy", "mobilenet_v2": "agreement", "minilm": "cosine"}


# ------------------------------------------------------------------------------------------------ search inputs
def _fashion_inputs(n: int = 1024, batch: int = 2, seed: int = 0):
    images, labels = datasets.fashion_mnist("train")
    idx = np.sort(np.random.default_rng(seed).choice(len(images), size=n, replace=False))
    x, y = datasets.fashion_normalize(images[idx]), labels[idx]
    feeds = [{"image": np.ascontiguousarray(x[i:i + batch])} for i in range(0, n, batch)]
    return feeds, [y[i:i + batch] for i in range(0, n, batch)], None, (
        f"{n} Fashion-MNIST *training* images (seeded choice, seed {seed}) in {n // batch} feeds of {batch}, with "
        "their labels")


def _mobilenet_inputs(n: int = 192, batch: int = 8):
    x = datasets.photo_crops("calibration", n)
    names = ", ".join(datasets.PHOTO_SPLITS["calibration"])
    return tasks.batches({"image": x}, batch), None, None, (
        f"{n} crops ({n // batch} feeds of {batch}) of the {len(datasets.PHOTO_SPLITS['calibration'])} calibration "
        f"photos ({names}), 224x224, ImageNet-normalised")


def _minilm_inputs(n: int = 512, batch: int = 16):
    texts, _ = datasets.wordnet_glosses("calibration", n)
    shape = (1, tasks.MINILM_LATENCY_TOKENS)
    return tasks.minilm_feeds(texts, batch), None, {"input_ids": shape, "attention_mask": shape}, (
        f"{n} WordNet noun glosses, split \"calibration\", {n // batch} feeds of {batch} (each padded to its "
        f"longest gloss); the search's latency shape [1, {tasks.MINILM_LATENCY_TOKENS}] (the harness's)")


INPUTS = {"fashion_resnet": _fashion_inputs, "fashion_cnn": lambda: _fashion_inputs(512, 2),
          "mobilenet_v2": _mobilenet_inputs, "minilm": _minilm_inputs}


# ------------------------------------------------------------------------------------------------------ search
def _counts(result) -> dict:
    pts = result.points
    built = [p for p in pts if p.built is not None and not p.cached]
    return {"points": len(pts), "built": len(built), "cached": sum(p.cached for p in pts),
            "not_built": sum(p.status == "not built" for p in pts),
            "measured": sum(p.measured for p in pts), "failed": sum(p.status == "failed" for p in pts),
            "build_seconds": round(sum(p.build_seconds for p in built), 1)}


def run_search(model: Model, ctx: Context, budget: Budget, max_minutes: float, cache_dir: Path, quiet,
               families: list[str] | None) -> dict:
    waited, ok = wait_for_quiet(*quiet)
    load = os.getloadavg()
    log(f"search ({budget.describe()}): waited {waited:.0f} s for the load average (quiet: {ok}; now {load[0]:.2f})")
    t0 = time.perf_counter()
    result = Search(model, ctx, budget, families=families, max_minutes=max_minutes, workers=1,
                    cache_dir=cache_dir).run()
    wall = time.perf_counter() - t0
    return {"result": result, "wall": wall, "waited": waited, "quiet": ok, "load_before": load,
            "load_after": os.getloadavg(), "counts": _counts(result)}


def best_single(result):
    """The fastest single-family point within the floor on the selection split."""
    ok = [p for p in result.points if p.stage == "single" and p.measured and not p.floor_violations and p.speedup]
    return max(ok, key=lambda p: p.speedup) if ok else None


def _verification_summary(report) -> dict:
    d = report.to_dict()
    m = report.metrics
    return {"passed": report.passed, "violations": report.violations, "speedup": report.speedup,
            "cosine": min((x.cosine for x in m), default=None),
            "agreement": min((x.top1_agreement for x in m if x.top1_agreement is not None), default=None),
            "samples": m[0].samples if m else None, "accuracy": report.accuracy, "inputs": d["inputs"],
            "latency": d["latency"]}


# ------------------------------------------------------------------------------------------------------- Olive
OLIVE_DATA = '''
import numpy as np
import torch
from olive.data.registry import Registry


@Registry.register_dataset()
def graphopt_feeds(data_dir=None, path=None, **kwargs):
    with np.load(path) as z:
        count = len({k.split("/", 1)[0] for k in z.files})
        names = sorted({k.split("/", 1)[1] for k in z.files})
        return [{n: torch.from_numpy(z[f"{i}/{n}"]) for n in names} for i in range(count)]


@Registry.register_dataloader()
def graphopt_feed_loader(dataset, batch_size=None, **kwargs):
    return [(feed, 0) for feed in dataset]  # one calibration step per feed, as the harness's ORT peers
'''
OLIVE_RUN = '''
import sys
from olive.workflows import run
run(sys.argv[1])
'''


def olive_version() -> str | None:
    dist = list(OLIVE_ENV.glob("olive_ai-*.dist-info"))
    return dist[0].name[len("olive_ai-"):-len(".dist-info")] if dist else None


def olive_contender(kind: str, feeds: list[dict]):
    """An Olive workflow (one pass at its defaults) run in a subprocess with build/olive_env on PYTHONPATH."""
    pass_type = {"static": "OnnxStaticQuantization", "dynamic": "OnnxDynamicQuantization"}[kind]

    def fn(fp32_path: Path, _feeds, workdir: Path) -> C.Optimized:
        if olive_version() is None:
            raise RuntimeError(f"Olive is not installed in {tasks._rel(OLIVE_ENV)} (see this script's docstring)")
        np.savez(workdir / "feeds.npz", **{f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
        (workdir / "olive_data.py").write_text(OLIVE_DATA)
        (workdir / "olive_run.py").write_text(OLIVE_RUN)
        quant = {"type": pass_type}
        config = {"input_model": {"type": "ONNXModel", "model_path": str(fp32_path)},
                  "systems": {"local": {"type": "LocalSystem", "accelerators": [
                      {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
                  "passes": {"quant": quant}, "host": "local", "target": "local",
                  "output_dir": str(workdir / "out"), "cache_dir": str(workdir / "cache"), "log_severity_level": 1,
                  "evaluate_input_model": False}
        if kind == "static":
            config["data_configs"] = [{"name": "calib", "user_script": str(workdir / "olive_data.py"),
                                       "load_dataset_config": {"type": "graphopt_feeds",
                                                               "path": str(workdir / "feeds.npz")},
                                       "dataloader_config": {"type": "graphopt_feed_loader"}}]
            quant["data_config"] = "calib"
        (workdir / "config.json").write_text(json.dumps(config, indent=1))
        env = dict(os.environ, PYTHONPATH=str(OLIVE_ENV), OLIVE_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(THREADS))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(workdir / "olive_run.py"), str(workdir / "config.json")],
                              cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - t0
        (workdir / "olive.log").write_text(proc.stdout + proc.stderr)
        out = workdir / "out" / "model.onnx"
        if proc.returncode != 0 or not out.is_file():
            lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
            err = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines
                       else f"exit {proc.returncode}")
            raise RuntimeError(f"Olive {pass_type}: {err.strip()[:300]}")
        m = re.search(r"Pass quant:\S+ finished in ([0-9.]+) seconds", proc.stdout + proc.stderr)
        seconds = float(m.group(1)) if m else wall
        note = (f"Olive {olive_version()} `{pass_type}` at its defaults (workflow: {pass_type} with "
                f"{'the same fit + selection feeds as data_config' if kind == 'static' else 'no data'}); opt. time "
                f"= Olive's pass time ({wall:.0f} s with the subprocess and Olive's start-up)")
        return C.Optimized(out, seconds, note)

    fn.__doc__ = (f"Microsoft Olive {olive_version() or '0.13.0'} {pass_type} at its defaults "
                  f"({'S8S8 QDQ, per-tensor MinMax, quant_preprocess' if kind == 'static' else 'QInt8 weights'}), "
                  "offline workflow in a subprocess")
    return fn


def file_contender(path: Path, seconds: float, note: str, doc: str):
    def fn(fp32_path: Path, _feeds, workdir: Path) -> C.Optimized:
        return C.Optimized(path, seconds, note)

    fn.__doc__ = doc
    return fn


# ------------------------------------------------------------------------------------------------------ render
def _f(x, spec=".3f", none="–"):
    return none if x is None else format(x, spec)


def _loss_text(result, p) -> str:
    if p.loss is None:
        return "–"
    if result.budget.max_drop is not None:
        return f"{p.loss:+.2f} pt"
    return f"{p.loss:.4f}"


def points_table(result) -> list[str]:
    lines = [f"| # | recipe (after the cleanup recipe) | stage | status | speed-up (sel.) | {result.budget.loss_name} "
             "(sel.) | size (MB) | build (s) | cached | front | verdict |", "|---:|---|---|---|---:|---:|---:|---:|---|---|---|"]
    for p in result.points:
        if p.measured:
            verdict = "meets the budget" if p.feasible else "; ".join(p.cost_violations + p.floor_violations)
        else:
            verdict = p.reason
        verdict = verdict.replace("|", "\\|").replace("\n", " ")
        if len(verdict) > 220:
            verdict = verdict[:217] + "..."
        mark = " **chosen**" if result.chosen is p else ""
        lines.append(f"| {p.id} | `{p.label}`{mark} | {p.stage} | {p.status} | {_f(p.speedup, '.2f')} | "
                     f"{_loss_text(result, p)} | {_f(p.size_mb, '.2f')} | {p.build_seconds:.1f} | "
                     f"{'yes' if p.cached else ''} | {'yes' if p.on_front else ''} | {verdict} |")
    return lines


def cost_text(run: dict) -> str:
    r, c = run["result"], run["counts"]
    first = ("no point met the budget" if r.first_valid_seconds is None else
             f"first point within the budget after {r.first_valid_seconds:.0f} s")
    stop = "the time bound stopped it" if r.stopped_by_time else "every planned candidate was built"
    return (f"{r.seconds:.0f} s in all (bound {r.max_minutes:g} min; {stop}); {first}; {c['points']} candidates: {c['built']} built ({c['build_seconds']:.0f} s of building), "
            f"{c['cached']} from the cache, {c['not_built']} not built (time), {c['failed']} failed; started after "
            f"waiting {run['waited']:.0f} s for a load average below the threshold ("
            f"{'reached' if run['quiet'] else 'not reached: ran on a busy machine'}), load "
            f"{run['load_before'][0]:.2f} before, {run['load_after'][0]:.2f} after")


def render(name, harness_md, main, rerun, verification, chosen_row, single, inputs_desc, args, split, olive_note,
           goals) -> str:
    r = main["result"]
    lines = [harness_md.rstrip(), ""]
    lines += ["### The search", "",
              f"- **budget**: {r.budget.describe()} (speed-up measured by the search at its latency shape "
              f"{r.latency_shape}, {THREADS} intra-op threads; fidelity on the selection split)",
              f"- **search inputs**: {inputs_desc}; `split_samples(seed=0)`: {split}; the evaluation set above "
              "is none of them",
              f"- **graphopt tree** (when this process imported graphopt): {TREE_AT_START}",
              f"- **families**: {', '.join(main['families'])}; builds {r.executor}; cache "
              f"`{tasks._rel(main['cache_dir'])}` ({'emptied before this search' if main['cold'] else 'kept from an earlier run'})",
              f"- **cost**: {cost_text(main)}",
              ]
    if r.chosen is not None:
        lines.append(f"- **chosen**: [{r.chosen.id}] `{r.chosen.label}` (selection: {r.chosen.speedup:.2f}x, "
                     f"{r.budget.loss_name} {_loss_text(r, r.chosen)})")
    else:
        reach = "; ".join(f"[{p.id}] `{p.label}` {p.speedup:.2f}x, {_loss_text(r, p)}" for p in r.best_reachable)
        lines.append(f"- **chosen**: none: no candidate met the budget on the selection split; best reachable: "
                     f"{reach or 'none'}. The `search_best_reachable` row is its fastest point within the floor and "
                     "**does not meet the budget**")
    if verification:
        v = verification
        acc = v.get("accuracy") or {}
        figs = [f"cosine {v['cosine']:.5f}" if v.get("cosine") is not None else "",
                f"top-1 agreement {v['agreement']:.2%}" if v.get("agreement") is not None else "",
                f"accuracy {acc['original']:.2f}% -> {acc['optimized']:.2f}% ({acc['optimized'] - acc['original']:+.2f} pt, "
                f"{acc['samples']} samples)" if acc else "",
                f"speed-up {v['speedup']:.2f}x" if v.get("speedup") else ""]
        lines.append(f"- **verification** (`verify_choice`, {v['samples']} verification feeds no build or choice read): "
                     + ", ".join(x for x in figs if x) + "; "
                     + ("passed" if v["passed"] else "FAILED: " + "; ".join(v["violations"])))
    if single is not None:
        lines.append(f"- **best single pass** (`best_single`): [{single.id}] `{single.label}`, the fastest "
                     f"single-family point within the floor on selection ({single.speedup:.2f}x, "
                     f"{_loss_text(r, single)})"
                     + (f": the same point as `{chosen_row}`" if single is r.chosen or (
                         r.chosen is None and r.best_reachable and single is r.best_reachable[0]) else ""))
    if olive_note:
        lines.append(f"- **Olive**: {olive_note}")
    for g in goals:
        lines.append(f"- **goal**: {g}")
    lines.append("- **per family** (the search's own explanation):")
    for fam, text in r.families.items():
        lines.append(f"  - `{fam}`: {text}")
    if r.notes:
        lines.append(f"- **search notes**: {'; '.join(r.notes)}")
    lines.append("")
    if rerun is not None:
        rr = rerun["result"]
        ch = rr.chosen
        lines += ["### Re-run with another budget, same cache", "",
                  f"- **budget**: {rr.budget.describe()}; the same inputs, threads and cache folder",
                  f"- **cost**: {cost_text(rerun)}; the first search took {r.seconds:.0f} s "
                  f"({rr.seconds / r.seconds:.0%} of it)",
                  f"- **the cache**: its {rerun['counts']['cached']} cached candidates had taken "
                  f"{sum(p.build_seconds for p in rr.points if p.cached):.0f} s of building in the first search; "
                  f"everything in the re-run but its {rerun['counts']['built']} new builds (re-timing every "
                  f"candidate, the cache reads, timing the original) took "
                  f"{rr.seconds - rerun['counts']['build_seconds']:.0f} s",
                  "- **chosen**: " + (f"[{ch.id}] `{ch.label}` (selection {ch.speedup:.2f}x, "
                                      f"{_loss_text(rr, ch)})" if ch else
                                      "none; best reachable: " + "; ".join(f"[{p.id}] `{p.label}` "
                                                                           f"{p.speedup:.2f}x, {_loss_text(rr, p)}"
                                                                           for p in rr.best_reachable)),
                  "- a cached candidate is not rebuilt but is timed again (its speed-up is measured anew), so its "
                  "figures can differ slightly from the first search's", ""]
    lines += ["### Every candidate of the search", "",
              f"Measured on the selection split; `#` is the candidate number in the plot "
              f"(`search_{name}.png`; `search_{name}_zoom.png`, where it exists, leaves out the candidates whose loss "
              f"is above 4x the floor). {r.budget.loss_name}: lower is better.", ""]
    lines += points_table(r)
    lines.append("")
    if rerun is not None:
        lines += ["Re-run:", ""] + points_table(rerun["result"]) + [""]
    lines += [f"Command: `{args.command}`", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main
def _budget(text: str) -> Budget:
    return Budget(**{k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=sorted(INPUTS))
    ap.add_argument("--max-minutes", type=float, default=15.0)
    ap.add_argument("--rerun-max-minutes", type=float, default=None, help="default: --max-minutes")
    ap.add_argument("--budget", default=None, help="key=value,... replacing BUDGETS[model] (smoke tests)")
    ap.add_argument("--rerun-budget", default=None, help="key=value,... replacing RERUN_BUDGETS[model]")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--quiet-load", type=float, default=1.5)
    ap.add_argument("--quiet-timeout", type=float, default=120.0)
    ap.add_argument("--no-olive", action="store_true")
    ap.add_argument("--no-rerun", action="store_true")
    ap.add_argument("--warm-cache", action="store_true")
    ap.add_argument("--families", default=",".join(FAMILY_ORDER),
                    help="comma-separated, in the order their single points are built; 'default': the search's own "
                         "(every searchable family, alphabetical)")
    ap.add_argument("--latency-batches", default="1,16")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--replot", action="store_true", help="only redraw the plots from results/search_<model>.json")
    args = ap.parse_args(argv)
    if args.replot:
        plots(args.model, args.out_dir)
        return 0
    args.command = "python tools/bench/search_bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    name = args.model
    if args.budget:
        BUDGETS[name] = _budget(args.budget)
    if args.rerun_budget:
        RERUN_BUDGETS[name] = _budget(args.rerun_budget)
    quiet = (args.quiet_load, args.quiet_timeout)
    task = tasks.TASKS[name]
    fp32_path, _ = task.fp32(CACHE / name, False)
    model = Model.load(fp32_path)
    feeds, labels, shapes, inputs_desc = INPUTS[name]()
    inputs = split_samples(feeds, 0, labels=labels)
    rows = lambda part: sum(len(next(iter(f.values()))) for f in part)  # noqa: E731
    split = ", ".join(f"{k} {len(getattr(inputs, k))} feeds ({rows(getattr(inputs, k))} rows)"
                      for k in ("fit", "selection", "verification"))
    log(f"{name}: search inputs {inputs_desc}; {split}")
    ctx = Context(inputs=inputs, runtime=RuntimeSettings(intra_op_threads=THREADS, inter_op_threads=1),
                  progress=log, latency_shapes=shapes)
    families = None if args.families == "default" else args.families.split(",")
    cache_dir = CACHE / name / "search_cache"
    if not args.warm_cache:
        shutil.rmtree(cache_dir, ignore_errors=True)
    main_run = run_search(model, ctx, BUDGETS[name], args.max_minutes, cache_dir, quiet, families) | {
        "cache_dir": cache_dir, "cold": not args.warm_cache}
    result = main_run["result"]
    main_run["families"] = list(result.families)
    log(f"{name}: search done in {result.seconds:.0f} s; {main_run['counts']}")

    work = CACHE / name / "search_bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    verification, contender_names = None, []
    point = result.chosen or (result.best_reachable[0] if result.best_reachable else None)
    chosen_row = None
    if point is not None:
        chosen_row = "search_chosen" if result.chosen is not None else "search_best_reachable"
        if result.chosen is not None:
            try:
                _, report = verify_choice(model, result.chosen, ctx, result)
                verification = _verification_summary(report)
            except Exception as exc:  # noqa: BLE001 -- recorded, the table still runs
                verification = {"passed": False, "violations": [f"verify_choice raised {type(exc).__name__}: {exc}"],
                                "samples": None}
        path = work / f"{chosen_row}.onnx"
        path.write_bytes(point.built.model_bytes)
        miss = "" if result.chosen is not None else " **does not meet the budget** (the search chose nothing);"
        note = (f"[{point.id}] `{point.label}`;{miss} opt. time = the whole search "
                f"({main_run['counts']['built']} builds)")
        doc = ("graphopt.search's chosen model" if result.chosen is not None else
               "graphopt.search chose nothing: its fastest point within the floor, NOT meeting the budget")
        C.contender(chosen_row)(file_contender(path, result.seconds, note, doc))
        contender_names.append(chosen_row)
    single = best_single(result)
    if single is not None:
        path = work / "best_single.onnx"
        path.write_bytes(single.built.model_bytes)
        same = f" (the same point as `{chosen_row}`)" if single is point else ""
        note = f"[{single.id}] `{single.label}`{same}; opt. time = its build"
        C.contender("best_single")(file_contender(
            path, single.build_seconds, note, "the search's fastest single-family point within the floor on selection"))
        contender_names.append("best_single")
    olive_note = ""
    if not args.no_olive:
        olive_feeds = list(inputs.fit) + list(inputs.selection)
        kinds = ["static", "dynamic"] if name == "minilm" else ["static"]
        for kind in kinds:
            C.contender(f"olive_{kind}")(olive_contender(kind, olive_feeds))
            contender_names.append(f"olive_{kind}")
        olive_note = (f"{olive_version() or 'not installed'}; calibrated on the search's fit + selection feeds "
                      f"({len(olive_feeds)} feeds)" if "static" in kinds else "")

    search_task = dataclasses.replace(task, calibration=lambda: (feeds, inputs_desc + " (the search's inputs; "
                                                                 "Olive calibrates on its fit + selection feeds)"),
                                      extra_contenders=[])
    tasks.TASKS[name] = search_task
    batches = tuple(int(b) for b in args.latency_batches.split(","))
    harness = run_task(name, contender_names, threads=THREADS, limit=args.limit,
                       latency=LatencyConfig(quiet_load=args.quiet_load, quiet_timeout=args.quiet_timeout),
                       command=args.command, latency_batches=batches)
    by = {r.name: r for r in harness.rows}

    goals = []
    if name == "minilm" and chosen_row in by and by[chosen_row].scores:
        drop = 100 * (by["fp32"].scores["probe"] - by[chosen_row].scores["probe"])
        goals.append(f"probe drop {drop:+.2f} pt on the evaluation set (goal <= 1 pt): "
                     f"{'met' if drop <= 1.0 else 'missed'}")
    if name in ("fashion_resnet", "fashion_cnn") and chosen_row in by and by[chosen_row].scores:
        drop = 100 * (by["fp32"].scores["accuracy"] - by[chosen_row].scores["accuracy"])
        goals.append(f"accuracy drop {drop:+.2f} pt on the evaluation set (budget <= {BUDGETS[name].max_drop:g} pt): "
                     f"{'met' if drop <= BUDGETS[name].max_drop else 'missed'}")

    rerun = None
    if not args.no_rerun:
        rerun = run_search(model, ctx, RERUN_BUDGETS[name], args.rerun_max_minutes or args.max_minutes, cache_dir,
                           quiet, families)
        log(f"{name}: re-run done in {rerun['result'].seconds:.0f} s; {rerun['counts']}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    md = render(name, harness.markdown(), main_run, rerun, verification, chosen_row, single, inputs_desc, args,
                split, olive_note, goals)
    write_atomic(args.out_dir / f"search_{name}.md", md)
    data = result.to_dict() | {"verification": verification, "counts": main_run["counts"],
                               "rerun": None if rerun is None else rerun["result"].to_dict() | {
                                   "counts": rerun["counts"]}}
    write_atomic(args.out_dir / f"search_{name}.json", json.dumps(data, indent=1, default=str) + "\n")
    plots(name, args.out_dir)
    print(md)
    return 0


def zoomed(d: dict, factor: float = 4.0) -> tuple[dict, list[int]]:
    """The search's dict without the points whose loss is above `factor` x the floor (they squash the region near
    the floor), and their 1-based numbers."""
    limit = factor * d["loss_floor"]
    out = [p for p in d["points"] if p["status"] == "measured" and p["loss"] is not None and p["loss"] > limit]
    drop = {p["id"] for p in out}
    return d | {"points": [p for p in d["points"] if p["id"] not in drop]}, [i + 1 for i in sorted(drop)]


def plots(name: str, out_dir: Path) -> None:
    """search_<name>.png: graphopt's front_png of the whole search; search_<name>_zoom.png: the same without the
    points far above the floor. Redrawn from search_<name>.json (`--replot`)."""
    from graphopt.report_html import front_png

    d = json.loads((out_dir / f"search_{name}.json").read_text())
    d.pop("rerun", None)
    png = front_png(d)
    if png:
        (out_dir / f"search_{name}.png").write_bytes(png)
    z, dropped = zoomed(d)
    if dropped and (png := front_png(z)):
        (out_dir / f"search_{name}_zoom.png").write_bytes(png)
        log(f"{name}: zoomed plot without candidates {dropped} (loss above 4x the floor)")


if __name__ == "__main__":
    sys.exit(main())
