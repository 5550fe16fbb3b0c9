"""Taylor-cache benchmark: graphopt's `taylor_cache` pass (FORA, TaylorSeer, CG-Taylor, three lowerings) on the
project's own Fashion-MNIST DiT, against full compute and against plain DDIM with fewer steps (the honest baseline).

    python tools/bench/taylor_bench.py --quiet-load 1.0 --quiet-timeout 600
    (smoke test: python tools/bench/taylor_bench.py --classes 0,1 --limit-per-class 4 --timing-repeats 2 \
        --out /tmp/taylor_smoke.md; --contenders 'full,ddim-*,fora-3' keeps only matching rows (fnmatch; `full`,
     the reference, always runs); --list prints the contenders and exits; --reuse-samples takes a contender's
     quality samples from build/bench/taylor_dit/samples/ when its model file, settings and plan are unchanged)

Results: tools/bench/results/taylor_dit.md (+ .json with every raw number, .png: FID and accuracy against
wall-clock, _grid.png: samples per contender), or beside --out.

Model: models/dit.py with models/weights/dit_fashion.pt (**the project's own weights**, trained here by
tools/train_dit.py), exported to ONNX as tools/eval_dit_samples.py's export_dit does (legacy exporter, opset 17,
dynamic batch) into build/bench/taylor_dit/dit.onnx. Sampling: DDIM, eta 0, classifier-free guidance 4.0 (as
trained; null class 10; conditional + unconditional halves in one batch of 2B rows), `graphopt.ddim_sample` for
every contender (models/dit_sampler.ddim_sample over the plain session when graphopt has none; the two are compared
on the full model in the run). Every contender starts from the same noise and labels: quality batch i holds labels
plan[i*B:(i+1)*B] (classes interleaved, --batch-labels B) and seed --seed + i; the timing trajectories use
--timing-seed.

Contenders (cached rows: `TaylorCache(...).build(graphopt.load(dit.onnx))`, run by `TaylorCacheSession`; all with
steps 50, --warmup full steps first and --tail full steps last):
1. `full`: plain onnxruntime session, 50 steps (the reference of every error figure);
2. `ddim-K` (--ddim-steps): plain session, K steps;
3. `fora-N`: FORA, order-0 reuse every N steps: level=module, order=0, interval=N (lowering if);
4. `taylorseer-N{n}-O{o}`: TaylorSeer, fixed interval n, Taylor order o, level=module (lowering if); N4-O4 is the
   TaylorSeer reference setting;
5. `cg-taylor-{thr}` (--cg-thresholds): CG-Taylor, level=last, order 1, gate_order 3, gate threshold thr (interval
   ignored; the CG-Taylor DiT reference uses 0.008 on a different model);
6. `last-N4-O2-{if,split,lite}`: the three lowerings at one schedule (level=last, interval 4, order 2).

Metrics per contender: full-compute steps per trajectory (`sess.full_steps`; K for plain rows), the final sample's
error against `full` from the same noise (mean per-sample relative L2, models/dit_sampler.relative_error), the
Fashion ResNet's class accuracy on the samples (fraction classified as the class asked for; uint8 via
dit_sampler.to_uint8, bench.datasets.fashion_normalize), and FID on the same ResNet's 128-d penultimate features
against the 10k Fashion-MNIST test images (tools/bench/fid.py; **not Inception: not comparable with published
FIDs**), --limit-per-class samples per class (200 x 10 = 2000 by default).

Timing (separate from the quality runs, which are long): one whole trajectory (sampler loop included) per
contender at each --timing-batches size (labels, CFG doubles the rows: 16 -> 32 rows, 1 -> 2 rows), contenders
interleaved round-robin (the starting contender rotates every repeat), one untimed warm-up trajectory each,
--timing-repeats repeats, median; `full_twin` is the full model again in a second, separately built plain session:
its distance from `full` is the noise floor. --threads intra-op threads (2), 1 inter-op thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import fnmatch
import hashlib
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` and `models` importable
    _root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(_root / "tools"), str(_root)]
    __package__ = "bench"

from bench import fid as F  # noqa: E402
from bench.datasets import FASHION_CLASSES  # noqa: E402
from bench.harness import OtherLoad, log, tree_state, wait_for_quiet  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
WORK = ROOT / "build" / "bench" / "taylor_dit"
GUIDANCE, NULL_CLASS, STEPS = 4.0, 10, 50
TWIN = "full_twin"


# ------------------------------------------------------------------------------------------------ contenders
@dataclasses.dataclass
class Spec:
    name: str
    family: str  # full | ddim | fora | taylorseer | cg-taylor | lowering
    steps: int = STEPS
    cache: dict | None = None  # TaylorCache keyword arguments; None: a plain onnxruntime session

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def settings(self) -> str:
        if not self.cached:
            return f"plain session, {self.steps} steps"
        return "TaylorCache(" + ", ".join(f"{k}={v!r}" for k, v in self.cache.items()) + ")"


FAMILY_LABEL = {"full": "full compute (50 steps)", "ddim": "DDIM, fewer steps (plain)", "fora": "FORA (order 0)",
                "taylorseer": "TaylorSeer (module, fixed interval)", "cg-taylor": "CG-Taylor (last, gated)",
                "lowering": "lowerings (last, N4, O2)"}


def all_specs(args) -> list[Spec]:
    base = {"steps": STEPS, "warmup": args.warmup, "tail": args.tail}
    specs = [Spec("full", "full")]
    specs += [Spec(f"ddim-{k}", "ddim", steps=k) for k in args.ddim_steps]
    specs += [Spec(f"fora-{n}", "fora", cache=dict(level="module", lowering="if", order=0, interval=n, **base))
              for n in args.fora_intervals]
    specs += [Spec(f"taylorseer-N{n}-O{o}", "taylorseer",
                   cache=dict(level="module", lowering="if", order=o, interval=n, **base))
              for n, o in args.taylorseer]
    specs += [Spec(f"cg-taylor-{thr:g}", "cg-taylor",
                   cache=dict(level="last", lowering="if", order=1, threshold=thr, gate_order=3, **base))
              for thr in args.cg_thresholds]
    specs += [Spec(f"last-N4-O2-{low}", "lowering", cache=dict(level="last", lowering=low, order=2, interval=4, **base))
              for low in ("if", "split", "lite")]
    return specs


def select(specs: list[Spec], pattern: str | None) -> list[Spec]:
    if not pattern:
        return specs
    pats = [p.strip() for p in pattern.split(",") if p.strip()]
    unknown = [p for p in pats if not any(fnmatch.fnmatchcase(s.name, p) for s in specs)]
    if unknown:
        raise SystemExit(f"--contenders: {unknown} match no contender; known: {[s.name for s in specs]}")
    return [s for s in specs if s.name == "full" or any(fnmatch.fnmatchcase(s.name, p) for p in pats)]


# ------------------------------------------------------------------------------------------------ the API
class Api:
    """graphopt's taylor_cache API, or what stands in for it while it is missing."""

    def __init__(self) -> None:
        self.error = None
        self.TaylorCache = self.TaylorCacheSession = self.ddim_sample = None
        try:
            import graphopt
            from graphopt.passes.taylor_cache import TaylorCache

            self.TaylorCache = TaylorCache
            self.TaylorCacheSession = graphopt.TaylorCacheSession
            self.ddim_sample = graphopt.ddim_sample
        except (ImportError, AttributeError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    @property
    def sampler(self) -> str:
        return "graphopt.ddim_sample" if self.ddim_sample else "models.dit_sampler.ddim_sample(onnx_step_fn(...))"

    def sample(self, sess, labels: np.ndarray, steps: int, seed: int) -> np.ndarray:
        if self.ddim_sample is not None:
            return np.asarray(self.ddim_sample(sess, labels, steps=steps, seed=seed, guidance=GUIDANCE,
                                               null_class=NULL_CLASS), np.float32)
        from models import dit_sampler

        return dit_sampler.ddim_sample(dit_sampler.onnx_step_fn(sess), labels, steps=steps, seed=seed,
                                       guidance=GUIDANCE, eta=0.0, null_class=NULL_CLASS)


def full_steps_of(sess, spec: Spec):
    """(count, detail) of the steps that ran in full in the session's last trajectory."""
    if not spec.cached:
        return spec.steps, None
    fs = getattr(sess, "full_steps", None)
    if fs is None:
        return None, None
    if isinstance(fs, (int, np.integer)):
        return int(fs), None
    fs = [int(v) for v in fs]
    if set(fs) <= {0, 1} and len(fs) == spec.steps:  # a per-step mask
        return int(sum(fs)), fs
    return len(fs), fs  # step indices


# ------------------------------------------------------------------------------------------------ helpers
def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def plain_session(path: Path, threads: int):
    from graphopt.core.runtime import RuntimeSettings, session_options
    import onnxruntime as ort

    opts = session_options(RuntimeSettings(intra_op_threads=threads, inter_op_threads=1))
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export(path: Path, threads: int) -> dict:
    """The DiT exported as eval_dit_samples.export_dit does; checked against torch on one CFG-sized batch."""
    import torch

    from eval_dit_samples import export_dit
    from models import dit

    model = dit.build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    export_dit(model, str(tmp))
    os.replace(tmp, path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    t = np.array([999, 999, 500, 500, 20, 20, 0, 0], np.float32)
    y = np.array([0, 10, 3, 10, 7, 10, 9, 10], np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    got = plain_session(path, threads).run(["eps"], {"x": x, "t": t, "y": y})[0]
    return {"path": str(path.relative_to(ROOT)), "bytes": path.stat().st_size, "sha": sha(path),
            "weights_sha": sha(dit.WEIGHTS), "max_abs_diff_vs_torch": float(np.abs(ref - got).max())}


def parse_classes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    if not out or any(not 0 <= c <= 9 for c in out) or len(set(out)) != len(out):
        raise SystemExit(f"--classes: need distinct classes in 0..9, got {text!r}")
    return out


def plan(classes: list[int], per_class: int, batch: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """The quality batches: labels (classes interleaved: c0, c1, ..., c0, c1, ...) and one seed per batch."""
    labels = np.tile(np.asarray(classes, np.int64), per_class)
    return [(labels[i:i + batch], seed + k) for k, i in enumerate(range(0, len(labels), batch))]


def median(xs) -> float | None:
    return float(np.median(xs)) if len(xs) else None


# ------------------------------------------------------------------------------------------------ build
def build_contender(spec: Spec, api: Api, dit_path: Path, threads: int) -> dict:
    """The session of one contender (plain sessions are shared by `full` and the ddim rows)."""
    if not spec.cached:
        return {"path": dit_path, "seconds": 0.0}
    if api.TaylorCache is None:
        raise RuntimeError(f"graphopt's taylor_cache API is missing ({api.error})")
    import graphopt

    out = WORK / "models" / f"{spec.name}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = api.TaylorCache(**spec.cache).build(graphopt.load(dit_path))
    if out.exists():
        out.unlink()
    model.save(out)
    seconds = time.perf_counter() - t0
    return {"path": out, "seconds": seconds, "bytes": out.stat().st_size, "sha": sha(out)}


def open_session(spec: Spec, api: Api, built: dict, threads: int, plain_cache: dict):
    if not spec.cached:
        key = str(built["path"])
        if key not in plain_cache:
            plain_cache[key] = plain_session(built["path"], threads)
        return plain_cache[key]
    return api.TaylorCacheSession(str(built["path"]), threads=threads)


# ------------------------------------------------------------------------------------------------ quality
def quality_run(spec: Spec, sess, api: Api, batches, reuse_key: str | None) -> dict:
    """Samples for every quality batch (or the saved ones, when --reuse-samples and the key matches)."""
    store = WORK / "samples" / f"{spec.name}.npz"
    if reuse_key is not None and store.exists():
        with np.load(store, allow_pickle=False) as z:
            if str(z["key"]) == reuse_key:
                log(f"{spec.name}: reusing the samples in {store.relative_to(ROOT)}")
                return {"x": z["x"], "full_steps": [None if v < 0 else int(v) for v in z["full_steps"]],
                        "batch_seconds": [float(v) for v in z["batch_seconds"]], "reused": True}
    xs, steps, secs = [], [], []
    t_all = time.perf_counter()
    for k, (labels, seed) in enumerate(batches):
        t0 = time.perf_counter()
        xs.append(api.sample(sess, labels, spec.steps, seed))
        secs.append(time.perf_counter() - t0)
        steps.append(full_steps_of(sess, spec)[0])
        if k == 0 or (k + 1) % 5 == 0 or k + 1 == len(batches):
            log(f"{spec.name}: batch {k + 1}/{len(batches)} ({time.perf_counter() - t_all:.0f} s; full steps "
                f"{steps[-1]})")
    x = np.concatenate(xs)
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_name(f".{store.stem}.tmp.npz")
    np.savez(tmp, x=x, full_steps=np.array([-1 if v is None else v for v in steps]),
             batch_seconds=np.array(secs), key=np.array(reuse_key or ""))
    os.replace(tmp, store)
    return {"x": x, "full_steps": steps, "batch_seconds": secs, "reused": False}


def score(x: np.ndarray, labels: np.ndarray, x_full: np.ndarray, extractor, ref_stats, classes) -> dict:
    from models import dit_sampler

    u8 = dit_sampler.to_uint8(x)
    feats, logits = extractor(u8)
    pred = logits.argmax(1)
    err = dit_sampler.relative_error(x, x_full)
    return {
        "n": int(len(x)),
        "accuracy": float((pred == labels).mean()),
        "per_class_accuracy": {int(c): float((pred[labels == c] == c).mean()) for c in classes},
        "fid": F.frechet_distance(*F.statistics(feats), *ref_stats),
        "fid_bootstrap_sd": F.bootstrap_sd(feats, ref_stats, n=20),
        "error_mean": float(err.mean()), "error_median": float(np.median(err)), "error_max": float(err.max()),
        "errors": [float(e) for e in err],
        "finite": bool(np.isfinite(x).all()),
    }, u8


# ------------------------------------------------------------------------------------------------ timing
def timing(runs: list[tuple[str, Spec, object]], api: Api, batch_sizes: list[int], repeats: int, seed: int) -> dict:
    """Whole trajectories, contenders interleaved round-robin; returns name -> {batch: {"seconds": [...], ...}}."""
    out = {name: {str(b): {"seconds": [], "full_steps": []} for b in batch_sizes} for name, _, _ in runs}
    labels = {b: np.arange(b, dtype=np.int64) % 10 for b in batch_sizes}
    for b in batch_sizes:  # warm-up: one untimed trajectory each
        for name, spec, sess in runs:
            api.sample(sess, labels[b], spec.steps, seed)
    t_start = time.perf_counter()
    for r in range(repeats):
        for b in batch_sizes:
            order = runs[r % len(runs):] + runs[:r % len(runs)]
            for name, spec, sess in order:
                t0 = time.perf_counter()
                api.sample(sess, labels[b], spec.steps, seed)
                dt = time.perf_counter() - t0
                out[name][str(b)]["seconds"].append(dt)
                out[name][str(b)]["full_steps"].append(full_steps_of(sess, spec)[0])
        log(f"timing: repeat {r + 1}/{repeats} done ({time.perf_counter() - t_start:.0f} s)")
    for name in out:
        for b in out[name]:
            out[name][b]["median_s"] = median(out[name][b]["seconds"])
    return out


# ------------------------------------------------------------------------------------------------ comparisons
def ddim_curve(rows: dict, key: str, batch: str) -> list[tuple[float, float, str]]:
    """(wall s, value, name) of the plain rows (ddim-K and full), sorted by wall-clock."""
    pts = []
    for name, r in rows.items():
        if r["spec"].family in ("ddim", "full") and r.get("quality") and r.get("timing"):
            t = r["timing"].get(batch, {}).get("median_s")
            v = r["quality"].get(key)
            if t is not None and v is not None:
                pts.append((t, v, name))
    return sorted(pts)


def at_wall_clock(curve, t: float) -> tuple[float | None, str]:
    """The DDIM curve's value at wall-clock t: linear between the two DDIM points around t, else the nearest."""
    if not curve:
        return None, "no DDIM point"
    if t <= curve[0][0]:
        return curve[0][1], f"nearest: `{curve[0][2]}` (every DDIM point is slower)"
    if t >= curve[-1][0]:
        return curve[-1][1], f"nearest: `{curve[-1][2]}`"
    for (t0, v0, n0), (t1, v1, n1) in zip(curve, curve[1:]):
        if t0 <= t <= t1:
            w = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
            return v0 + w * (v1 - v0), f"between `{n0}` and `{n1}`"
    return None, "?"


def ddim_steps_at(rows: dict, batch: str, t: float) -> float | None:
    """The (fractional) DDIM step count with wall-clock t at this batch, from full's per-step time (linear)."""
    pts = [(r["spec"].steps, r["timing"][batch]["median_s"]) for r in rows.values()
           if r["spec"].family in ("ddim", "full") and r.get("timing") and r["timing"].get(batch, {}).get("median_s")]
    if len(pts) < 2:
        return None
    k, s = np.array(pts, np.float64).T
    slope, icpt = np.polyfit(k, s, 1)
    return float((t - icpt) / slope) if slope > 0 else None


# ------------------------------------------------------------------------------------------------ images
def _savefig(fig, path: Path, dpi: int) -> None:
    from graphopt.core.files import write_atomic

    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def plot(rows: dict, batch: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"full": ("*", "k"), "ddim": ("o", "C0"), "fora": ("s", "C1"), "taylorseer": ("^", "C2"),
               "cg-taylor": ("D", "C3"), "lowering": ("v", "C4")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "fid", "FID (Fashion ResNet features; lower is better)"),
                           (axes[1], "accuracy", "class accuracy of the samples (%)")):
        scale = 100.0 if key == "accuracy" else 1.0
        curve = ddim_curve(rows, key, batch)
        if curve:
            ax.plot([p[0] for p in curve], [p[1] * scale for p in curve], "-", color="C0", alpha=0.5, lw=1)
        seen = set()
        for name, r in rows.items():
            q, tm = r.get("quality"), r.get("timing")
            if not q or not tm or tm.get(batch, {}).get("median_s") is None:
                continue
            fam = r["spec"].family
            m, c = markers[fam]
            ax.scatter([tm[batch]["median_s"]], [q[key] * scale], marker=m, color=c, s=90 if fam == "full" else 45,
                       zorder=3, label=FAMILY_LABEL[fam] if fam not in seen else None)
            seen.add(fam)
            short = name.replace("taylorseer-", "ts-").replace("cg-taylor-", "cg-").replace("last-N4-O2-", "last-")
            ax.annotate(short, (tm[batch]["median_s"], q[key] * scale), textcoords="offset points", xytext=(4, 3),
                        fontsize=6.5, color=c)
        ax.set_xlabel(f"wall-clock per trajectory (s), batch {batch} labels ({2 * int(batch)} rows with CFG), "
                      "onnxruntime")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _savefig(fig, path, 110)
    plt.close(fig)


def grid(samples: dict[str, np.ndarray], labels: np.ndarray, classes: list[int], per: int, path: Path) -> None:
    """One row per contender: `per` samples of each class (the first ones of the plan: same noise in every row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    idx = np.concatenate([np.flatnonzero(labels == c)[:per] for c in classes])
    per_eff = min(per, min(int((labels == c).sum()) for c in classes))
    cell, gap = 28, 2
    cols = len(idx)
    h = len(names) * (cell + gap) + gap
    w = cols * (cell + gap) + gap + (len(classes) - 1) * 4
    img = np.full((h, w), 90, np.uint8)
    xpos = []
    for j in range(cols):
        xpos.append(gap + j * (cell + gap) + (j // per_eff) * 4)
    for i, n in enumerate(names):
        y0 = gap + i * (cell + gap)
        for j, k in enumerate(idx):
            img[y0:y0 + cell, xpos[j]:xpos[j] + cell] = samples[n][k]
    dpi = 100
    fig = plt.figure(figsize=(w * 2 / dpi + 1.9, h * 2 / dpi + 0.5), dpi=dpi)
    ax = fig.add_axes([1.8 / (w * 2 / dpi + 1.9), 0.05 / (h * 2 / dpi + 0.5), w * 2 / dpi / (w * 2 / dpi + 1.9),
                       h * 2 / dpi / (h * 2 / dpi + 0.5)])
    ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest", aspect="equal")
    ax.set_yticks([gap + i * (cell + gap) + cell / 2 for i in range(len(names))])
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xticks([xpos[g * per_eff] + (per_eff * (cell + gap)) / 2 for g in range(len(classes))])
    ax.set_xticklabels([FASHION_CLASSES[c] for c in classes], fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    _savefig(fig, path, dpi)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ report
def _f(v, spec: str, default: str = "–") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return default
    return format(v, spec)


def steps_cell(q: dict | None) -> str:
    if not q:
        return "–"
    fs = [v for v in q["full_steps"] if v is not None]
    if not fs:
        return "?"
    lo, hi, mean = min(fs), max(fs), float(np.mean(fs))
    return f"{mean:.1f}" if lo == hi and mean == int(mean) else f"{mean:.1f} ({lo}–{hi})"


def render(data: dict, rows: dict, png: Path | None, grid_png: Path | None, out: Path) -> str:
    h = data["header"]
    tb = data["timing_batches"]
    b_main = str(tb[0]) if tb else None
    full_t = {b: rows["full"].get("timing", {}).get(str(b), {}).get("median_s") for b in tb}
    twin = data.get("timing", {}).get(TWIN, {})
    floors = {}
    for b in tb:
        t_full, t_twin = full_t[b], twin.get(str(b), {}).get("median_s")
        floors[b] = abs(t_twin / t_full - 1.0) if t_full and t_twin else None

    lines = ["# taylor_cache: the project's DiT on Fashion-MNIST", ""]
    for k, v in h.items():
        if v:
            lines.append(f"- **{k}**: {v}")
    lines.append(f"- **noise floor**: `{TWIN}` (the full model in a second plain session, timed in the same "
                 "interleaved run) against `full`: " + "; ".join(
                     f"batch {b}: {_f(floors[b], '.1%')}" for b in tb) + " apart; a wall-clock difference within "
                 "it is a tie (marked \"(tie)\"). One run's floor, itself noisy.")
    lines.append("")

    # ---- main table
    bcols = "".join(f" wall b{b} (s) | speed-up b{b} |" for b in tb)
    lines += [f"| contender | settings | full steps / trajectory |{bcols} rel. L2 error vs full (mean / max) | "
              "class accuracy | FID (± bootstrap sd) | build (s) | quality run (s) | notes |",
              "|---|---|---:|" + "---:|---:|" * len(tb) + "---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        spec, q, tm = r["spec"], r.get("quality"), r.get("timing") or {}
        cells = [f"`{name}`", spec.settings(), steps_cell(q)]
        for b in tb:
            t = tm.get(str(b), {}).get("median_s")
            cells.append(_f(t, ".3f"))
            if t and full_t[b]:
                s = full_t[b] / t
                tie = name != "full" and floors[b] is not None and abs(t / full_t[b] - 1) <= floors[b]
                cells.append(f"{s:.2f}×" + (" (tie)" if tie else ""))
            else:
                cells.append("–")
        if q:
            cells += [f"{q['error_mean']:.4f} / {q['error_max']:.4f}", f"{q['accuracy']:.1%}",
                      f"{q['fid']:.3f} ± {q['fid_bootstrap_sd']:.3f}"]
        else:
            cells += ["–", "–", "–"]
        cells += [_f(r.get("build_seconds"), ".1f"), _f(sum(q["batch_seconds"]) if q else None, ".0f")]
        notes = []
        if r.get("error"):
            notes.append(f"**failed**: {r['error']}")
        if q and q.get("reused"):
            notes.append("samples reused (--reuse-samples)")
        if q and not q.get("finite", True):
            notes.append("**non-finite samples**")
        cells.append("; ".join(notes).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"`{TWIN}`: " + ", ".join(f"batch {b}: {_f(twin.get(str(b), {}).get('median_s'), '.3f')} s"
                                       for b in tb) + " (timing only).", ""]
    n = rows["full"]["quality"]["n"] if rows["full"].get("quality") else 0
    if n < 2000:
        lines += [f"**Smoke-size run: {n} samples per contender.** FID on fewer than 2,000 samples (and with fewer "
                  "samples than the 128 feature dimensions, a singular covariance) is dominated by its bias and "
                  "noise: do not read the FID column.", ""]

    # ---- equal wall-clock
    if b_main is not None:
        lines += ["## Against DDIM with fewer steps at equal wall-clock", "",
                  "Each cached contender against the plain DDIM curve (the `ddim-K` rows and `full`) at the same "
                  "median wall-clock, interpolated linearly between the two DDIM points around it (or the nearest "
                  "one outside the measured range). *DDIM steps at equal time*: the step count a plain trajectory "
                  "of this wall-clock would have (a line fitted to the plain rows' wall-clock against steps). A "
                  "cached contender wins when its FID is lower than DDIM's at the same time; FID differences "
                  "within about two bootstrap sd are not a clear win either way.", ""]
        hdr = "| contender | full steps |"
        for b in tb:
            hdr += f" wall b{b} (s) | DDIM steps at equal time b{b} | DDIM FID at equal time b{b} | verdict b{b} |"
        hdr += " FID | accuracy | DDIM accuracy at equal time (b" + b_main + ") |"
        lines += [hdr, "|---|---:|" + "---:|---:|---:|---|" * len(tb) + "---:|---:|---:|"]
        wins_ddim, wins_cache = [], []
        for name, r in rows.items():
            spec, q, tm = r["spec"], r.get("quality"), r.get("timing") or {}
            if not spec.cached or not q:
                continue
            cells = [f"`{name}`", steps_cell(q)]
            for b in tb:
                t = tm.get(str(b), {}).get("median_s")
                if t is None:
                    cells += ["–", "–", "–", "–"]
                    continue
                v, how = at_wall_clock(ddim_curve(rows, "fid", str(b)), t)
                k = ddim_steps_at(rows, str(b), t)
                if v is None:
                    verdict = "–"
                else:
                    sd = q["fid_bootstrap_sd"]
                    if q["fid"] < v:
                        verdict = "cached wins" + (" (within 2 sd)" if v - q["fid"] <= 2 * sd else "")
                        if str(b) == b_main:
                            wins_cache.append(name)
                    else:
                        verdict = "**DDIM-fewer-steps wins**" + (" (within 2 sd)" if q["fid"] - v <= 2 * sd else "")
                        if str(b) == b_main:
                            wins_ddim.append(name)
                cells += [f"{t:.3f}", _f(k, ".1f"), f"{_f(v, '.3f')} ({how})", verdict]
            va, _ = at_wall_clock(ddim_curve(rows, "accuracy", b_main), tm.get(b_main, {}).get("median_s") or 0.0)
            cells += [f"{q['fid']:.3f}", f"{q['accuracy']:.1%}", _f(va, ".1%")]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"At batch {b_main} (the main timing): "
                  + (f"**DDIM with fewer steps beats {', '.join(f'`{n}`' for n in wins_ddim)}** at equal "
                     "wall-clock" if wins_ddim else "no cached contender is beaten by DDIM at equal wall-clock")
                  + ("; " + ", ".join(f"`{n}`" for n in wins_cache) + " beat DDIM" if wins_cache else
                     "; no cached contender beats DDIM") + ".", ""]

    # ---- lowerings
    low = {k: rows.get(f"last-N4-O2-{k}") for k in ("if", "split", "lite")}
    if any(low.values()):
        lines += ["## Lowerings at one schedule (level=last, interval 4, order 2)", "",
                  "| lowering | " + " | ".join(f"wall b{b} (s)" for b in tb) + " | if / split | full steps | "
                  "rel. L2 error vs full | rel. L2 vs `last-N4-O2-if` samples (max) | FID |",
                  "|---|" + "---:|" * len(tb) + "---|---:|---:|---:|---:|"]
        x_if = data["_samples"].get("last-N4-O2-if")
        for k, r in low.items():
            if r is None:
                continue
            q, tm = r.get("quality"), r.get("timing") or {}
            cells = [f"`{k}`"] + [_f(tm.get(str(b), {}).get("median_s"), ".3f") for b in tb]
            ratio = []
            if k == "split" and low["if"] and low["if"].get("timing") and tm:
                for b in tb:
                    a, s = low["if"]["timing"].get(str(b), {}).get("median_s"), tm.get(str(b), {}).get("median_s")
                    if a and s:
                        ratio.append(f"b{b}: {a / s:.3f} (" + ("within 5 %: met" if a / s <= 1.05 else
                                                               "**more than 5 % slower: missed**") + ")")
            cells.append("; ".join(ratio) or "")
            xs = data["_samples"].get(f"last-N4-O2-{k}")
            d = None
            if xs is not None and x_if is not None and len(xs) == len(x_if):
                from models import dit_sampler

                d = float(dit_sampler.relative_error(xs, x_if).max())
            cells += [steps_cell(q), _f(q["error_mean"] if q else None, ".4f"), _f(d, ".2e"),
                      _f(q["fid"] if q else None, ".3f")]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Target: `if` within 5 % of `split` in wall-clock (ratio if / split <= 1.05); the noise floor "
                  "above says how far two sessions of one model measured apart.", ""]

    # ---- per-class accuracy
    classes = data["classes"]
    lines += ["## Class accuracy per class", "",
              "| contender | " + " | ".join(FASHION_CLASSES[c] for c in classes) + " |",
              "|---|" + "---:|" * len(classes)]
    for name, r in rows.items():
        q = r.get("quality")
        if q:
            lines.append(f"| `{name}` | " + " | ".join(f"{q['per_class_accuracy'][c]:.0%}" for c in classes) + " |")
    lines.append("")

    # ---- FID scale and checks
    fs = data["fid_scale"]
    lines += ["## FID scale and checks", "",
              f"- FID here uses this project's Fashion ResNet (`models.fashion_resnet.build()`, "
              f"{fs['test_accuracy']:.2%} on the test set in this run) as the feature extractor: its 128-d globally "
              "pooled features before `fc`. **Not Inception: these values are not comparable with published FIDs.** "
              "Reference: all 10k Fashion-MNIST test images. FID = ||mu1-mu2||^2 + Tr(S1+S2-2 sqrtm(S1 S2)) "
              "(scipy.linalg.sqrtm, real part; tools/bench/fid.py).",
              f"- Scale: FID(test first 5k, test last 5k) = {fs['fid_test_half_vs_half']:.4f}; FID(10k training "
              f"images, test) = {_f(fs.get('fid_train10k_vs_test'), '.4f')}; FID(test, test) = "
              f"{fs['fid_test_vs_itself']:.1e}; total variance Tr(S_test) = {fs['trace_cov_test']:.3f}. With "
              f"{n} generated samples against 10k, a contender's FID also carries the small-sample bias "
              "(the same for every contender: same n). *± sd*: standard deviation over 20 bootstrap resamples of "
              "the generated set.",
              f"- Sampler check: {data['sampler_check']}",
              f"- Export check: {data['export']['path']} ({data['export']['bytes'] / 1e6:.2f} MB), max |torch - "
              f"onnxruntime| on eps = {data['export']['max_abs_diff_vs_torch']:.2e} (8 rows, t in 0..999, with and "
              "without the null class).", ""]
    if png is not None:
        lines += [f"![FID and accuracy against wall-clock]({os.path.relpath(png, out.parent)})", ""]
    if grid_png is not None:
        lines += [f"Samples (`{grid_png.name}`): one row per contender, the first {data['grid_per_class']} samples "
                  "of each class of the plan (same noise and labels in every row).", "",
                  f"![samples]({os.path.relpath(grid_png, out.parent)})", ""]
    errs = [(n, r) for n, r in rows.items() if r.get("traceback")]
    if errs:
        lines += ["## Failures", ""]
        for n, r in errs:
            tb_lines = r["traceback"].strip().splitlines()
            lines += [f"- `{n}`: {r['error']}", "", "  ```", *("  " + t for t in tb_lines[-8:]), "  ```", ""]
    lines.append(f"Whole run: {data['seconds'] / 60:.1f} min wall.")
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _pairs(text: str) -> list[tuple[int, int]]:
    """'N4-O1,N5-O2' -> [(4, 1), (5, 2)]."""
    import re

    out = []
    for part in text.split(","):
        if part.strip():
            m = re.fullmatch(r"N(\d+)-O(\d+)", part.strip(), re.IGNORECASE)
            if not m:
                raise argparse.ArgumentTypeError(f"expected N<interval>-O<order>, got {part!r}")
            out.append((int(m.group(1)), int(m.group(2))))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/bench/taylor_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", default="0-9", help="classes to sample, e.g. 0-9 or 0,1")
    p.add_argument("--limit-per-class", type=int, default=200, help="samples per class per contender")
    p.add_argument("--batch-labels", type=int, default=100, help="labels per quality batch (CFG: twice the rows)")
    p.add_argument("--seed", type=int, default=0, help="quality batch i uses seed + i")
    p.add_argument("--timing-repeats", type=int, default=7, help="0: no timing")
    p.add_argument("--timing-batches", default="16,1", help="labels per timed trajectory (CFG doubles the rows); "
                   "the first is the main one (plot, equal-wall-clock verdicts)")
    p.add_argument("--timing-seed", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every session (and torch's)")
    p.add_argument("--contenders", help="comma list of names or fnmatch patterns (full always runs)")
    p.add_argument("--ddim-steps", type=_ints, default=_ints("10,13,17,20,25,33"))
    p.add_argument("--fora-intervals", type=_ints, default=_ints("3,4"))
    p.add_argument("--taylorseer", type=_pairs, default=_pairs("N4-O1,N4-O2,N5-O1,N5-O2,N4-O4"),
                   help="interval-order pairs of the TaylorSeer rows, e.g. N4-O1,N5-O2")
    p.add_argument("--cg-thresholds", type=_floats, default=_floats("0.02,0.05,0.1,0.2"))
    p.add_argument("--warmup", type=int, default=2, help="full steps at the start of every cached trajectory")
    p.add_argument("--tail", type=int, default=1, help="full steps at the end of every cached trajectory")
    p.add_argument("--grid-per-class", type=int, default=4)
    p.add_argument("--quiet-load", type=float, metavar="LOAD", help="wait for the 1-minute load average to fall "
                   "below LOAD before timing")
    p.add_argument("--quiet-timeout", type=float, default=600.0)
    p.add_argument("--reuse-samples", action="store_true")
    p.add_argument("--list", action="store_true", help="print the contenders and their settings, and exit")
    p.add_argument("--out", type=Path, default=RESULTS / "taylor_dit.md")
    args = p.parse_args(argv)
    specs = select(all_specs(args), args.contenders)
    if args.list:
        for s in specs:
            print(f"{s.name:<24} {s.settings()}")
        return 0
    classes = parse_classes(args.classes)
    batch_sizes = _ints(args.timing_batches) if args.timing_repeats > 0 else []

    import torch

    torch.set_num_threads(args.threads)
    command = "python " + shlex.join(["tools/bench/taylor_bench.py", *(argv if argv is not None else sys.argv[1:])])
    t_run = time.perf_counter()
    api = Api()
    log(f"sampler: {api.sampler}" + (f"; taylor_cache API missing ({api.error})" if api.error else ""))
    tree = tree_state()

    dit_path = WORK / "dit.onnx"
    exp = export(dit_path, args.threads)
    log(f"exported {exp['path']} ({exp['bytes'] / 1e6:.2f} MB), max |torch - ORT| {exp['max_abs_diff_vs_torch']:.2e}")

    extractor = F.FeatureExtractor()
    log("FID reference: features of the 10k test images")
    test = F.test_set_features(extractor)
    fid_scale = F.self_check(extractor, test=test)
    ref_stats = F.statistics(test[0])

    batches = plan(classes, args.limit_per_class, args.batch_labels, args.seed)
    labels_all = np.concatenate([b[0] for b in batches])
    plan_key = hashlib.sha256(labels_all.tobytes() + repr([s for _, s in batches]).encode()).hexdigest()[:16]
    log(f"quality plan: {len(labels_all)} samples per contender (classes {classes}, {args.limit_per_class} each) "
        f"in {len(batches)} batches of up to {args.batch_labels} labels ({2 * args.batch_labels} rows with CFG)")

    rows: dict[str, dict] = {}
    plain_cache: dict = {}
    sessions: dict[str, object] = {}
    samples_u8: dict[str, np.ndarray] = {}
    samples_x: dict[str, np.ndarray] = {}
    x_full = None
    sampler_check = "not run"
    for spec in specs:
        r = rows.setdefault(spec.name, {"spec": spec})
        try:
            built = build_contender(spec, api, dit_path, args.threads)
            r["build_seconds"] = built["seconds"]
            r["model"] = {k: (str(Path(v).relative_to(ROOT)) if k == "path" else v) for k, v in built.items()
                          if k != "seconds"}
            sess = open_session(spec, api, built, args.threads, plain_cache)
            sessions[spec.name] = sess
            if spec.cached:
                r["session_info"] = {k: repr(getattr(sess, k)) for k in ("interval", "order", "threshold", "warmup",
                                                                            "tail", "steps", "level", "lowering")
                                     if hasattr(sess, k)}
            if spec.name == "full" and api.ddim_sample is not None:
                from models import dit_sampler

                lab, seed = batches[0][0][:8], batches[0][1]
                a = api.sample(sess, lab, STEPS, seed)
                b = dit_sampler.ddim_sample(dit_sampler.onnx_step_fn(sess), lab, steps=STEPS, seed=seed,
                                            guidance=GUIDANCE, eta=0.0, null_class=NULL_CLASS)
                sampler_check = (f"graphopt.ddim_sample against models/dit_sampler.ddim_sample(onnx_step_fn(...)) on "
                                 f"the plain full session, {len(lab)} labels: max |difference| "
                                 f"{float(np.abs(a - b).max()):.2e}")
                log(sampler_check)
            elif spec.name == "full":
                sampler_check = "graphopt.ddim_sample missing: every row used models/dit_sampler.ddim_sample"
            key = json.dumps({"spec": dataclasses.asdict(spec), "model": r["model"].get("sha", exp["sha"]),
                              "plan": plan_key, "sampler": api.sampler, "guidance": GUIDANCE})
            t0 = time.perf_counter()
            run = quality_run(spec, sess, api, batches, key if args.reuse_samples else None)
            if spec.name == "full":
                x_full = run["x"]
            q, u8 = score(run["x"], labels_all, x_full, extractor, ref_stats, classes)
            q.update(full_steps=run["full_steps"], batch_seconds=run["batch_seconds"], reused=run["reused"])
            r["quality"] = q
            samples_u8[spec.name] = u8
            samples_x[spec.name] = run["x"]
            log(f"{spec.name}: accuracy {q['accuracy']:.1%}, FID {q['fid']:.3f}, error {q['error_mean']:.4f}, full "
                f"steps {steps_cell(q)} ({time.perf_counter() - t0:.0f} s)")
        except Exception as exc:  # a contender that fails is a result, not a crash
            r["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            r["traceback"] = traceback.format_exc()
            sessions.pop(spec.name, None)
            log(f"{spec.name} FAILED: {r['error']}")
            if spec.name == "full":
                raise

    timing_data: dict = {}
    quiet = ""
    load_before = load_after = os.getloadavg()
    other = None
    if batch_sizes:
        runs = [(n, rows[n]["spec"], s) for n, s in sessions.items()]
        runs.insert(1, (TWIN, rows["full"]["spec"], plain_session(dit_path, args.threads)))
        if args.quiet_load is not None:
            log(f"waiting for the 1-minute load average to fall below {args.quiet_load:g} "
                f"(now {os.getloadavg()[0]:.2f})")
            waited, ok = wait_for_quiet(args.quiet_load, args.quiet_timeout)
            quiet = (f"; timing started after waiting {waited:.0f} s for the 1-minute load average to fall below "
                     f"{args.quiet_load:g}" if ok else f"; the load average did not fall below {args.quiet_load:g} "
                     f"within {waited:.0f} s: timed on a busy machine")
        load_before = os.getloadavg()
        log(f"timing {len(runs)} sessions, batches {batch_sizes}, {args.timing_repeats} repeats "
            f"(load {load_before[0]:.2f})")
        with OtherLoad() as other:
            timing_data = timing(runs, api, batch_sizes, args.timing_repeats, args.timing_seed)
        load_after = os.getloadavg()
        for n, tdat in timing_data.items():
            if n in rows:
                rows[n]["timing"] = tdat
    if other is not None and getattr(other, "fraction", None) is not None:
        quiet += f"; other processes used {other.fraction:.0%} of the CPU while timing"

    from graphopt.report import machine

    m = machine()
    header = {
        "model": "models/dit.py (class-conditional DiT, patch 4, depth 6, width 128; 1.87M parameters) with "
                 "models/weights/dit_fashion.pt: **the project's own weights** (trained here by tools/train_dit.py, "
                 "models/weights/README.md)",
        "ONNX": f"`{exp['path']}` exported as tools/eval_dit_samples.py's export_dit (legacy exporter, opset 17, "
                f"dynamic batch), sha {exp['sha']}; weights sha {exp['weights_sha']}",
        "sampling": f"DDIM, eta 0, classifier-free guidance {GUIDANCE} (null class {NULL_CLASS}; 2B rows per call), "
                    f"50 steps unless the row says K; {api.sampler}",
        "quality set": f"{len(labels_all)} samples per contender: classes {classes}, {args.limit_per_class} each, "
                       f"interleaved, {len(batches)} batches of up to {args.batch_labels} labels "
                       f"({2 * args.batch_labels} rows), batch i seed {args.seed} + i: the same noise and labels for "
                       "every contender",
        "timing": (f"one whole trajectory (sampler loop included) per contender at batch "
                   f"{' and '.join(f'{b} label(s) ({2 * b} rows)' for b in batch_sizes)}, contenders round-robin "
                   f"(start rotating), 1 warm-up trajectory each, {args.timing_repeats} repeats, median; seed "
                   f"{args.timing_seed}; labels 0, 1, ... mod 10" if batch_sizes else "not run"),
        "batch / threads": f"timing batches {batch_sizes} labels; {args.threads} intra-op threads, 1 inter-op thread, "
                           f"ORT CPU EP; torch {args.threads} threads (classifier)",
        "cached schedule": f"steps 50, warmup {args.warmup}, tail {args.tail} (full steps at the start and end of "
                           "every cached trajectory)",
        "graphopt tree": tree,
        "machine": f"{m['cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']}; torch {torch.__version__}; "
                   f"Python {m['python']}; graphopt {m['graphopt']}",
        "load average": (f"{load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f} (1/5/15 min) before "
                         f"timing, {load_after[0]:.2f} after{quiet}"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"`{command}`",
    }

    out = args.out
    png = out.with_suffix(".png")
    grid_png = out.with_name(out.stem + "_grid.png")
    data = {"header": header, "timing_batches": batch_sizes, "classes": classes, "fid_scale": fid_scale,
            "export": exp, "sampler_check": sampler_check, "grid_per_class": args.grid_per_class,
            "timing": timing_data, "_samples": samples_x}
    if batch_sizes and any(r.get("quality") for r in rows.values()):
        try:
            plot(rows, str(batch_sizes[0]), png, f"Taylor caching on the project's DiT (Fashion-MNIST): "
                 f"{len(labels_all)} samples per contender, {args.threads} threads")
            log(f"wrote {png}")
        except Exception as exc:
            log(f"plot failed: {exc}")
            png = None
    else:
        png = None
    if samples_u8:
        grid(samples_u8, labels_all, classes, args.grid_per_class, grid_png)
        log(f"wrote {grid_png}")
    else:
        grid_png = None
    data["seconds"] = time.perf_counter() - t_run
    text = render(data, rows, png, grid_png, out)

    from graphopt.core.files import write_text_atomic

    raw = {k: v for k, v in data.items() if k != "_samples"}
    raw["labels"] = [int(v) for v in labels_all]
    raw["seeds"] = [int(s) for _, s in batches]
    raw["contenders"] = {n: {"spec": dataclasses.asdict(r["spec"]), **{k: v for k, v in r.items()
                                                                        if k not in ("spec",)}}
                         for n, r in rows.items()}
    write_text_atomic(out.with_suffix(".json"), json.dumps(raw, indent=1, default=str))
    write_text_atomic(out, text)
    print(text)
    log(f"wrote {out} and {out.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
