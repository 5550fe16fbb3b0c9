"""Recovery benchmark: a lossy pass, then graphopt's `recover` pass (distillation back towards the fp32 model),
against the same pass with its least-squares refit alone, on the harness's evaluation data.

    python tools/bench/recover_bench.py --model fashion_resnet --train-threads 1 --quiet-load 1.0 --quiet-timeout 180
    python tools/bench/recover_bench.py --model mobilenet_v2   --train-threads 1 --quiet-load 1.0 --quiet-timeout 60
    python tools/bench/recover_bench.py --model minilm         --train-threads 1 --quiet-load 1.0 --quiet-timeout 60
    (--variants 'NAME:key=value,key=value;NAME2:...' replaces the model's Recover variants; --limit N evaluates on
     the first N evaluation samples only; --out PATH; results go to tools/bench/results/recover_<model>.md)

Reuses the harness unchanged (tasks, data, metrics, interleaved latency, fp32_twin noise floor, quiet-load wait,
load header): the contenders below are registered in this process only. Every graphopt row runs through
`graphopt.pipeline.Pipeline([...passes..., Recover(...)]).run(fp32, Context(inputs=InputSet(...)))`, so the
pipeline sets the original that recover distils towards and verifies every pass; the pass-alone row runs
`Pipeline([...passes...])` on the same InputSet (the passes are deterministic: the recover rows start from the
byte-identical model, checked below). Per model:

- fashion_resnet: prune -50 % MACs (prune_bench's `graphopt_prune50`: ratio=0.5, target=macs, ridge refit);
  fit = the harness's 256 calibration images, selection = 256 and verification = 64 other Fashion-MNIST
  *training* images, train_data = 4000 further training images (an .npz in a temp folder); scored on the 10k test
  images.
- mobilenet_v2: prune -30 % MACs, and qdq all-int8 (`latency_slack=0` after the cleanup recipe, as
  graphopt_qdq_all_int8), each + recover; NNCF post-training quantization (ONNX backend, default preset) on the
  same 96 calibration crops as a contender. fit = the harness's 96 calibration crops; selection, verification and
  train_data = further crops of the same 5 calibration photos (never an evaluation photo).
- minilm: lowrank whitened, param_ratio=0.7 (lowrank_bench's `whitened@0.7`), with refit=true as the least-squares
  row, + recover; fit = the 256 calibration glosses; selection / verification = further glosses of the
  `calibration` split; train_data = glosses 4000..6000 of the `train` split (not test, not the probe's 4000).

Recovery's cost per recover row: training minutes (Recover's own counter) and the pipeline's seconds, peak
resident memory of this process during the contender (VmHWM of /proc/self/status, reset through
/proc/self/clear_refs before each contender: the same counter as resource.getrusage's ru_maxrss, made per
contender), and the selection metric against steps (details["curve"] of the recover PassRecord).
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` and `models` importable
    _root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(_root / "tools"), str(_root)]
    __package__ = "bench"

from bench import contenders as C  # noqa: E402
from bench import datasets, tasks  # noqa: E402
from bench.harness import LatencyConfig, log, run_task, tree_state, write_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TMP = Path(tempfile.mkdtemp(prefix="recover_bench_"))
RECORDS: dict[str, dict] = {}  # contender -> what the extra sections need
TRAIN_THREADS = [1]  # the pipelines' RuntimeSettings (ORT sessions of the passes and the teacher; torch threads)
START_HASH: dict[str, str] = {}  # contender -> sha of the model recover started from (or the pass-alone result)

DEFAULT_VARIANTS = {
    "fashion_resnet": ("noaug:steps=1500,max_minutes=3,augment=none;noaug_lr3e-5:steps=1500,max_minutes=3,augment=none,"
                       "lr=3e-5;aug:steps=1500,max_minutes=3"),
    "mobilenet_v2": "lr3e-4:only=prune,steps=1000,max_minutes=3.5,lr=3e-4;default:only=qdq,steps=1000,max_minutes=3.5",
    "minilm": "default:;lr3e-4_3min:steps=2000,max_minutes=3,lr=3e-4",
}


# ----------------------------------------------------------------------------------------------------- memory
def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------------- data
def _cut(x: np.ndarray, size: int, name: str) -> list[dict]:
    return [{name: np.ascontiguousarray(x[i:i + size])} for i in range(0, len(x), size)]


def fashion_split(n_train: int):
    """selection / verification / train_data: Fashion-MNIST training images outside the harness's calibration
    choice (datasets.fashion_calibration(256), seed 0)."""
    images, _ = datasets.fashion_mnist("train")
    calib = set(np.random.default_rng(0).choice(len(images), size=tasks.FASHION_CALIBRATION, replace=False).tolist())
    rest = np.array([i for i in np.random.default_rng(1).permutation(len(images)) if i not in calib])
    sel, ver, tr = rest[:256], rest[256:320], rest[320:320 + n_train]
    x = lambda idx: datasets.fashion_normalize(images[np.sort(idx)])  # noqa: E731
    path = TMP / "fashion_train.npz"
    np.savez(path, image=x(tr))
    return _cut(x(sel), 32, "image"), _cut(x(ver), 32, "image"), path, (
        f"selection: 256 and verification: 64 other Fashion-MNIST training images; train_data: {n_train} further "
        f"training images (`{path.name}`, unlabeled), disjoint from calibration and from the test set")


def mobilenet_split(n_train: int):
    """Crops 96.. of the calibration photos (crops 0..95 are the harness's calibration feeds): 64 selection, 32
    verification, n_train train_data. No evaluation photo."""
    x = datasets.photo_crops("calibration", 192 + n_train)
    path = TMP / "mobilenet_train.npz"
    np.savez(path, image=x[192:])
    return _cut(x[96:160], 8, "image"), _cut(x[160:192], 8, "image"), path, (
        f"selection: 64 and verification: 32 further crops of the 5 calibration photos (crops 96..191); "
        f"train_data: {n_train} more crops of the same photos (crops 192..{191 + n_train}, `{path.name}`); no "
        "evaluation photo is ever seen")


def minilm_split(n_train: int):
    texts, _ = datasets.wordnet_glosses("calibration", 640)
    train, _ = datasets.wordnet_glosses("train", 4000 + n_train)
    train = train[4000:]
    folder = TMP / "minilm_train"
    folder.mkdir(exist_ok=True)
    encode = tasks._tokenizer()
    lengths = [len(encode([t], max_length=128)[0][0]) for t in train]
    order = np.argsort(lengths, kind="stable")  # batches of similar length: few, large row pools
    for b, i in enumerate(range(0, len(order), 64)):
        group = [train[j] for j in order[i:i + 64]]
        ids, mask = encode(group, max_length=128)
        pad = -ids.shape[1] % 8
        np.savez(folder / f"batch{b:03d}.npz", input_ids=np.pad(ids, ((0, 0), (0, pad))),
                 attention_mask=np.pad(mask, ((0, 0), (0, pad))))
    return tasks.minilm_feeds(texts[256:384], 16), tasks.minilm_feeds(texts[384:640], 16), folder, (
        f"selection: 128 and verification: 256 further glosses of the `calibration` split (256..639); train_data: "
        f"{n_train} glosses of the `train` split (4000..{3999 + n_train}: not test, not the probe's first 4000), "
        "length-sorted batches of 64 padded to a multiple of 8 tokens")


SPLITS = {"fashion_resnet": (fashion_split, 4000), "mobilenet_v2": (mobilenet_split, 384),
          "minilm": (minilm_split, 2000)}


# ------------------------------------------------------------------------------------------------ contenders
def recording_recover(started: dict) -> type:
    """The stock Recover pass, which also records in `started["sha"]` the model it starts from."""
    from graphopt.passes.recover.recover import Recover

    class _Start(Recover):
        def run(self, model, ctx):
            started["sha"] = _sha(model)
            return super().run(model, ctx)
    return _Start


def _sha(model) -> str:
    h = hashlib.sha256()
    for t in model.graph.initializer:
        h.update(t.name.encode())
        h.update(t.SerializeToString())
    for n in model.graph.node:
        h.update(n.SerializeToString())
    return h.hexdigest()[:12]


def _pipeline_row(name: str, model_name: str, passes_fn, recover_params: dict | None, split):
    """A contender: Pipeline(passes_fn() [+ Recover(**recover_params)]) on the fp32 model."""

    def build(fp32_path, feeds, workdir):
        import graphopt
        from graphopt.core.calibration import InputSet
        from graphopt.core.runtime import RuntimeSettings
        from graphopt.passes import Context
        from graphopt.pipeline import Pipeline

        selection, verification, train_path, _ = split
        passes = passes_fn()
        started = {}
        if recover_params is not None:
            params = dict(recover_params)
            if params.pop("train_data", "yes") != "none":
                params["train_data"] = str(train_path)
            passes.append(recording_recover(started)(**params))
        _reset_peak()
        t0 = time.perf_counter()
        ctx = Context(inputs=InputSet(fit=list(feeds), selection=list(selection), verification=list(verification)),
                      runtime=RuntimeSettings(intra_op_threads=TRAIN_THREADS[0], inter_op_threads=1), progress=log)
        model, report = Pipeline(passes, measure_latency=False).run(graphopt.load(fp32_path), ctx)
        seconds = time.perf_counter() - t0
        out = Path(workdir) / "model.onnx"
        model.save(out, overwrite=True)
        notes = []
        for rec in report.passes:
            if rec.name in ("prune", "lowrank", "qdq", "recover") or rec.status != "applied":
                notes.append(f"{rec.name}: {rec.status}" + (f" ({rec.reason})" if rec.reason else ""))
        rec = report.passes[-1]
        if recover_params is not None:
            RECORDS[name] = {"record": rec, "seconds": seconds, "peak_mb": _peak_mb(), "start": started.get("sha"),
                             "params": recover_params, "pass_seconds": sum(r.seconds for r in report.passes[:-1])}
            c = rec.counters
            if c:
                notes.append(f"{c.get('steps')} steps in {c.get('train_seconds')} s, best step {c.get('best_step')}; "
                             + ", ".join(f"{k}={v}" for k, v in recover_params.items()))
        else:
            START_HASH[name] = started.get("sha") or _sha(model)
        lossy = next((r for r in report.passes if r.name in ("prune", "lowrank", "qdq")), None)
        if lossy is not None and lossy.counters:
            keys = [k for k in ("pruned_groups", "prunable", "param_ratio", "factorized", "int8", "sites",
                                "measured_distortion") if k in lossy.counters]
            notes.append(", ".join(f"{k} {lossy.counters[k]}" for k in keys))
        if report.violations:
            notes.append("pipeline violations: " + "; ".join(report.violations))
        return C.Optimized(out, seconds, "; ".join(n for n in notes if n))
    return build


def _passes(model_name: str, kind: str, alone: bool = False):
    from graphopt.passes import create

    import graphopt

    def make():
        if kind == "prune":
            r = {"fashion_resnet": 0.5, "mobilenet_v2": 0.3}[model_name]
            p = create("prune", {"ratio": r, "target": "macs", "calibration_samples": 8,
                                 "sensitivity_samples": 2 if model_name == "fashion_resnet" else 8})
            if alone and model_name in RELAX_PRUNE_GUARD:
                p = _relaxed(p)
            return [p]
        if kind == "qdq":
            return [create(n) for n in graphopt.DEFAULT_RECIPE] + [create("qdq", {"latency_slack": 0.0})]
        if kind == "lowrank":
            return [create("lowrank", {"method": "whitened", "param_ratio": 0.7, "refit": True,
                                       "calibration_samples": 16, "sensitivity_samples": 4, "candidates": 24})]
        raise ValueError(kind)
    return make


RELAX_PRUNE_GUARD = {"mobilenet_v2"}
RELAX_NOTE = ("on MobileNetV2 the pruned model (1.4 % agreement) fails the pipeline's lossy guard (cosine >= 0.9, "
              "relative L2 <= 0.45), so the pipeline would roll prune back when nothing follows it; to show what "
              "the pass alone gives, this row runs it as a bench-local subclass whose own tolerance() is only 'no "
              "new NaN/Inf' (the recover rows need no such thing: a lossy pass followed by recover is only checked "
              "for validity and NaN/Inf until the recovery)")


def _relaxed(p):
    """The stock prune pass, with its per-pass guard reduced to 'no new NaN/Inf' (see RELAX_NOTE)."""
    from graphopt.core.numerics import Tolerance

    cls = type(p)

    class _PruneGuardAfterRecovery(cls):
        def tolerance(self):
            return Tolerance()

    import dataclasses

    return _PruneGuardAfterRecovery(**{f.name: getattr(p, f.name) for f in dataclasses.fields(p)})


PASS_DOCS = {
    "prune": "prune -{pct} % MACs (ratio={r}, target=macs, ridge least-squares refit, calibration_samples=8)",
    "qdq": "cleanup recipe + qdq all-int8 (latency_slack=0, bias correction on: graphopt_qdq_all_int8)",
    "lowrank": "lowrank whitened SVD, param_ratio=0.7 (30 % fewer parameters in the factorized layers), "
               "least-squares refit of the second factor (refit=true)",
}


def _parse_variants(text: str) -> list[tuple[str, dict]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, spec = part.partition(":")
        params = {}
        for kv in filter(None, spec.split(",")):
            k, _, v = kv.partition("=")
            k, v = k.strip(), v.strip()
            for cast in (int, float):
                try:
                    v = cast(v)
                    break
                except ValueError:
                    pass
            params[k] = v
        out.append((name.strip(), params))
    return out


def register(model_name: str, variants: list[tuple[str, dict]], split, nncf: bool = True) -> list[str]:
    kinds = {"fashion_resnet": ["prune"], "mobilenet_v2": ["prune", "qdq"], "minilm": ["lowrank"]}[model_name]
    names = []
    for kind in kinds:
        doc = PASS_DOCS[kind].format(pct={"fashion_resnet": 50, "mobilenet_v2": 30}.get(model_name),
                                     r={"fashion_resnet": 0.5, "mobilenet_v2": 0.3}.get(model_name))
        alone = f"{kind}_refit_only"
        fn = _pipeline_row(alone, model_name, _passes(model_name, kind, alone=True), None, split)
        if kind == "prune" and model_name in RELAX_PRUNE_GUARD:
            doc += "; " + RELAX_NOTE
        fn.__doc__ = f"Pipeline([{doc}]): the pass with its least-squares refit alone, no recovery"
        C.contender(alone)(fn)
        names.append(alone)
        for vname, params in variants:
            params = dict(params)
            if params.pop("only", kind) != kind:  # `only=prune`: a variant for one pass of the model
                continue
            name = f"{kind}+recover_{vname}"
            fn = _pipeline_row(name, model_name, _passes(model_name, kind), params, split)
            fn.__doc__ = (f"Pipeline([{doc}, Recover({', '.join(f'{k}={v}' for k, v in params.items())})])"
                          + ("" if params.get("train_data") == "none" else ", train_data as below"))
            C.contender(name)(fn)
            names.append(name)
        if kind == "qdq" and nncf:  # the peer of tools/bench/peers.py (registered with the other contenders)
            names.append("nncf_ptq")
    return names


# ------------------------------------------------------------------------------------------------- sections
TREE = tree_state()


def sections(result, split_desc: str) -> str:
    rows = {r.name: r for r in result.rows}
    keys = [c.key for c in result.task.columns]
    fmt = {c.key: c.fmt for c in result.task.columns}
    lines = ["", "## Recovery: before and after on the evaluation data, and its cost", "",
             f"- **graphopt tree**: {TREE}",
             f"- **pipelines' threads**: RuntimeSettings(intra_op_threads={TRAIN_THREADS[0]}) for the passes, "
             f"recover's teacher session and torch (torch.set_num_threads); evaluation and timing use the header's "
             "threads",
             f"- **recovery data**: fit = the harness's calibration feeds (above); {split_desc}",
             "- **before** = the pass-alone row (`*_refit_only`, the same deterministic pass on the same InputSet); "
             "the recover row's starting model is checked byte for byte against it (initializers + nodes sha)",
             "- **peak RSS**: VmHWM of this process during the contender (pass + recovery + the pipeline's checks), "
             "reset through /proc/self/clear_refs before each contender (what resource.getrusage's ru_maxrss "
             "reports, made per contender); it includes the loaded data sets, the teacher's and student's sessions",
             "- **training minutes**: Recover's own `train_seconds` (training loop incl. selection evaluations); "
             "**pipeline s**: the whole contender, pass + recovery + verification", "",
             "| row | start = pass-alone model | " + " | ".join(f"{c.header} before → after" for c in
                                                            result.task.columns)
             + " | status | steps (best) | stopped | training min | pipeline s | peak RSS (MB) |",
             "|---|---|" + "---|" * len(keys) + "---|---:|---|---:|---:|---:|"]
    for name, info in RECORDS.items():
        r = rows.get(name)
        kind = name.split("+")[0]
        base = rows.get(f"{kind}_refit_only")
        rec = info["record"]
        c = rec.counters or {}
        same = ("yes" if info["start"] and info["start"] == START_HASH.get(f"{kind}_refit_only") else
                f"no ({info['start']} vs {START_HASH.get(f'{kind}_refit_only')})")
        cells = [f"`{name}`", same]
        for k in keys:
            b = base.scores.get(k) if base else None
            a = r.scores.get(k) if r else None
            cells.append(f"{format(b, fmt[k]) if b is not None else '–'} → {format(a, fmt[k]) if a is not None else '–'}")
        cells += [rec.status + (f": {rec.reason}" if rec.reason else ""),
                  f"{c.get('steps', '–')} ({c.get('best_step', '–')})", rec.details.get("stopped", "–") if rec.details
                  else "–", f"{c['train_seconds'] / 60:.2f}" if "train_seconds" in c else "–",
                  f"{info['seconds']:.0f}", f"{info['peak_mb']:.0f}" if info["peak_mb"] else "–"]
        lines.append("| " + " | ".join(str(x).replace("|", "\\|") for x in cells) + " |")
    for name, info in RECORDS.items():
        rec = info["record"]
        curve = (rec.details or {}).get("curve") or []
        lines += ["", f"### `{name}`: selection metric against steps (report.passes[-1].details[\"curve\"])", ""]
        if not curve:
            lines.append(f"no curve: recover {rec.status}" + (f" ({rec.reason})" if rec.reason else ""))
            continue
        outs = list(curve[0]["selection_metric"])
        lines.append("| step | train loss | selection loss | " + " | ".join(f"selection {o}" for o in outs) + " |")
        lines.append("|---:|---:|---:|" + "---:|" * len(outs))
        for pt in curve:
            tl = pt["train_loss"]
            lines.append(f"| {pt['step']} | {'–' if tl is None else f'{tl:.5f}'} | {pt['selection_loss']:.5f} | "
                         + " | ".join(f"{v:.4f}" for v in pt["selection_metric"].values()) + " |")
        d = rec.details
        lines.append("")
        lines.append(f"training rows {d.get('training_rows')}, augmentation {d.get('augmentation') or 'none'}, "
                     f"{len(d.get('trained', []))} tensors trained ({(rec.counters or {}).get('trained_parameters')} "
                     f"parameters), intermediates matched: {len(d.get('intermediates', []))}; stopped: "
                     f"{d.get('stopped')}")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/bench/recover_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=sorted(DEFAULT_VARIANTS))
    p.add_argument("--variants", help="NAME:key=value,...;NAME2:... Recover variants (default: per model)")
    p.add_argument("--train-rows", type=int, help="rows of train_data (default: per model)")
    p.add_argument("--no-nncf", action="store_true")
    p.add_argument("--only", help="comma list of contenders to run (after registration), e.g. for a quick try")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of the evaluation and timing sessions")
    p.add_argument("--train-threads", type=int, default=1, help="intra-op threads of the pipelines (passes, "
                   "recover's teacher session and torch; 2 torch threads ran 14x slower on the shared 2-core machine)")
    p.add_argument("--limit", type=int, help="evaluate on the first N evaluation samples only")
    p.add_argument("--quiet-load", type=float, metavar="LOAD")
    p.add_argument("--quiet-timeout", type=float, default=300.0)
    p.add_argument("--latency-seconds", type=float, default=3.0)
    p.add_argument("--out", type=Path)
    p.add_argument("--notes", type=Path, help="a markdown file appended to the results (tuning record)")
    args = p.parse_args(argv)
    TRAIN_THREADS[0] = args.train_threads
    split_fn, n_train = SPLITS[args.model]
    split = split_fn(args.train_rows or n_train)
    variants = _parse_variants(args.variants or DEFAULT_VARIANTS[args.model])
    names = register(args.model, variants, split, nncf=not args.no_nncf)
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    latency = LatencyConfig(min_seconds=args.latency_seconds, max_seconds=max(30.0, 10 * args.latency_seconds),
                            quiet_load=args.quiet_load, quiet_timeout=args.quiet_timeout)
    command = "python " + shlex.join(["tools/bench/recover_bench.py", *(argv if argv is not None else sys.argv[1:])])
    result = run_task(args.model, names, threads=args.threads, limit=args.limit, latency=latency, command=command)
    text = result.markdown(level=1).replace(f"# {args.model}", f"# recover: {args.model}", 1)
    text += sections(result, split[3])
    if args.notes and args.notes.is_file():
        text += "\n" + args.notes.read_text()
    out = args.out or RESULTS / f"recover_{args.model}.md"
    write_atomic(out, text)
    print(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
