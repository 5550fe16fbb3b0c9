#!/usr/bin/env python
"""Benchmark contenders (fp32, onnxruntime static quantization, later graphopt's passes) on the reference models.

    python tools/bench/run.py --model mobilenet_v2 [--contenders fp32,ort_minmax,ort_percentile,ort_entropy]
                              [--threads 2] [--out tools/bench/results/mobilenet_v2.md] [--limit N]
                              [--latency-batches 1,16]
    python tools/bench/run.py --all        # fashion_resnet, mobilenet_v2, minilm -> tools/bench/RESULTS.md

Every contender runs in this one process on the same calibration and evaluation inputs; latencies of all of them
are measured interleaved, once per --latency-batches size (batch 1 and 16 by default), each with its own fp32_twin
noise floor. The table is printed and written atomically to --out. See tools/bench/README.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parents[1]
for _p in (str(_REPO), str(_REPO / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench import contenders as C  # noqa: E402
from bench.harness import CACHE, LatencyConfig, log, run_task, write_atomic  # noqa: E402
from bench.tasks import REQUIRED, TASKS  # noqa: E402

RESULTS_DIR = _HERE / "results"
COMBINED = _HERE / "RESULTS.md"


def _command(argv: list[str]) -> str:
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0].endswith("run.py") else _HERE / "run.py"
    try:
        script_s = str(script.relative_to(_REPO))
    except ValueError:
        script_s = str(script)
    return "python " + shlex.join([script_s, *argv])


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/bench/run.py", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", choices=sorted(TASKS))
    what.add_argument("--all", action="store_true", help=f"run {', '.join(REQUIRED)} and write {COMBINED.name}")
    what.add_argument("--combine", action="store_true",
                      help=f"write {COMBINED.name} from the committed results/MODEL.md of {', '.join(REQUIRED)} "
                           "(each run on its own with --model), without running anything")
    p.add_argument("--contenders", help=f"comma-separated (default: {','.join(C.DEFAULT_CONTENDERS)} plus each model's "
                                        f"own extras); known: {', '.join(sorted(C.CONTENDERS))} (fp32 is always "
                                        "included)")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads for every session (default 2)")
    p.add_argument("--out", type=Path, help="markdown file (default tools/bench/results/MODEL.md; with --all, "
                                            "the combined file, default tools/bench/RESULTS.md)")
    p.add_argument("--limit", type=int, help="evaluate on the first N evaluation samples only (quick runs, tests)")
    p.add_argument("--rebuild", action="store_true", help="re-export the fp32 models even if cached")
    p.add_argument("--cache", type=Path, default=CACHE, help="export/work folder (default build/bench)")
    p.add_argument("--latency-seconds", type=float, default=3.0,
                   help="minimum timed seconds per model in the latency measurement (default 3)")
    p.add_argument("--latency-warmup", type=int, default=20)
    p.add_argument("--latency-batches", default="1,16", metavar="B,B",
                   help="batch sizes to time every contender at, each its own interleaved measurement with its own "
                        "fp32_twin noise floor (default 1,16; e.g. 1,16,256 for fashion_resnet)")
    p.add_argument("--quiet-load", type=float, metavar="LOAD",
                   help="before each latency measurement, wait until the 1-minute load average is below LOAD "
                        "(the CPU is shared; e.g. 1.0 for figures you commit)")
    p.add_argument("--quiet-timeout", type=float, default=1800.0, metavar="S",
                   help="wait at most S seconds for --quiet-load, then time anyway and say so (default 1800)")
    args = p.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()] if args.contenders else None
    unknown = [c for c in args.contenders or () if c not in C.CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(sorted(C.CONTENDERS))}")
    if args.threads < 1:
        p.error("--threads must be at least 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    try:
        args.latency_batches = tuple(dict.fromkeys(int(b) for b in args.latency_batches.split(",") if b.strip()))
    except ValueError:
        p.error(f"--latency-batches: comma-separated integers, got {args.latency_batches!r}")
    if not args.latency_batches or min(args.latency_batches) < 1:
        p.error("--latency-batches: at least one batch size, each at least 1")
    return args


def _contenders(args, model: str) -> list[str]:
    """--contenders as given, else the defaults plus the model's own peers (e.g. quantize_dynamic for MiniLM)."""
    if args.contenders is not None:
        return args.contenders
    return list(C.DEFAULT_CONTENDERS) + [c for c in TASKS[model].extra_contenders if c not in C.DEFAULT_CONTENDERS]


def _preamble(produced_by: str) -> str:
    return "\n".join([
        "# graphopt benchmark: reference models",
        "",
        f"Produced by {produced_by}; one section per model, each also in `tools/bench/results/MODEL.md`. Speed-up "
        "is fp32 median latency / contender median latency, measured in the same process, interleaved, at each "
        "batch size of the section's header (columns bB: batch B). `fp32_twin` is a second session of the "
        "unchanged fp32 model timed in the same run: how far it lands from 1.00× at a batch size is that batch's "
        "noise floor, and a speed-up within it is marked \"(tie)\". Size is the ONNX file on disk; "
        "params is the sum of initializer element counts; opt. time is what building the contender took (ORT: "
        "quant_pre_process + calibration + quantization). MobileNetV2 is evaluated on photos calibration never "
        "saw."])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    command = _command(argv)
    latency = LatencyConfig(warmup=args.latency_warmup, min_seconds=args.latency_seconds,
                            max_seconds=max(30.0, 10 * args.latency_seconds), quiet_load=args.quiet_load,
                            quiet_timeout=args.quiet_timeout)
    kw = dict(threads=args.threads, limit=args.limit, rebuild=args.rebuild, latency=latency, cache=args.cache,
              command=command, latency_batches=args.latency_batches)
    if args.model:
        result = run_task(args.model, _contenders(args, args.model), **kw)
        text = result.markdown(level=1)
        out = args.out or RESULTS_DIR / f"{args.model}.md"
        write_atomic(out, text)
        print(text)
        log(f"wrote {out}")
        return 0

    if args.combine:
        sections = []
        for name in REQUIRED:
            path = RESULTS_DIR / f"{name}.md"
            text = path.read_text() if path.is_file() else f"# {name}\n\n**Not benchmarked**: {path.name} is missing\n"
            sections.append("\n".join("#" + line if line.startswith("# ") else line for line in text.splitlines()))
        text = "\n".join([_preamble(f"`python tools/bench/run.py --model MODEL ...` (each section's own command)"),
                          "", *sections, ""])
        write_atomic(args.out or COMBINED, text)
        log(f"wrote {args.out or COMBINED}")
        return 0

    sections = []
    for name in REQUIRED:
        try:
            result = run_task(name, _contenders(args, name), **kw)
        except Exception as exc:  # a model that could not be built: say so and benchmark the others
            log(f"{name}: not benchmarked: {type(exc).__name__}: {exc}")
            sections.append(f"## {name}\n\n**Not benchmarked**: {type(exc).__name__}: {exc}\n")
            continue
        write_atomic(RESULTS_DIR / f"{name}.md", result.markdown(level=1))
        sections.append(result.markdown(level=2))
    text = "\n".join([_preamble(f"`{command}`"), "", *sections])
    out = args.out or COMBINED
    write_atomic(out, text)
    print(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
