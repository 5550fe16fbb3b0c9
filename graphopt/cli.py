"""The `graphopt` command line: optimize, inspect, compare, bench.

Exit codes: 0 success, 1 verification failed, 2 bad usage or bad input. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from rich.console import Console

from . import __version__
from .calibration import parse_shapes, prepare_inputs
from .errors import GraphoptError, InputError, UsageError, VerificationError
from .model import Model
from .numerics import Tolerance, compare_outputs
from .passes import DEFAULT_RECIPE, REGISTRY, Context, create, parse_pass_spec
from .recipe import load_recipe
from .runtime import RuntimeSettings, make_session, measure_latency, run

EXAMPLES = """\
examples:
  graphopt optimize model.onnx -o model.opt.onnx --calib inputs.npz
  graphopt optimize model.onnx --pass fold_batchnorm --pass remove_dead --report report.json
  graphopt optimize bert.onnx --input-shape input_ids=1x128 --input-shape attention_mask=1x128
  graphopt optimize model.onnx --recipe recipe.toml --max-error 1e-3
  graphopt inspect model.onnx
  graphopt compare model.onnx model.opt.onnx --calib inputs.npz
  graphopt bench model.onnx --threads 1

exit codes: 0 success, 1 verification failed, 2 bad usage or bad input
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like our own errors
        self.exit(2, f"graphopt: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphopt", description="Optimize ONNX models and verify them in onnxruntime.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"graphopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def inputs_args(p):
        p.add_argument("--calib", metavar="PATH", help=".npz / .npy file or folder of them, keyed by input name")
        p.add_argument("--input-shape", action="append", default=[], metavar="NAME=SHAPE",
                       help="shape for synthetic inputs with unknown dims, e.g. image=1x3x224x224")
        p.add_argument("--batch-size", type=int, help="cut calibration arrays into samples of this batch size")
        p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
        p.add_argument("--custom-op-library", action="append", default=[], metavar="LIB.so",
                       help="register a shared library with onnxruntime for custom-domain ops, repeatable")
        p.add_argument("--seed", type=int, default=0)

    def tolerance_args(p):
        p.add_argument("--max-error", type=float, metavar="X",
                       help="largest relative L2 error per output (default 1e-4)")
        p.add_argument("--max-abs-error", type=float, metavar="X", help="largest absolute error per output")
        p.add_argument("--min-cosine", type=float, metavar="X", help="smallest cosine similarity per output")
        p.add_argument("--min-agreement", type=float, metavar="X",
                       help="smallest top-1 agreement for class-score outputs (0..1)")

    opt = sub.add_parser("optimize", help="run passes and write a verified model", epilog=EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    opt.add_argument("model", help="input .onnx file (never modified, unless -o names it and --overwrite is given)")
    opt.add_argument("-o", "--output", help="output .onnx file (default: INPUT.opt.onnx)")
    opt.add_argument("--pass", dest="passes", action="append", default=[], metavar="NAME[:key=value,...]",
                     help=f"a pass to run, repeatable, in order (default: {' '.join(DEFAULT_RECIPE)}); "
                          f"known: {', '.join(sorted(REGISTRY))}")
    opt.add_argument("--recipe", metavar="FILE.toml", help="passes and verification bounds from a TOML file")
    inputs_args(opt)
    tolerance_args(opt)
    opt.add_argument("--report", metavar="FILE.json", help="write the full report as JSON")
    opt.add_argument("--force", action="store_true", help="write the output even if verification fails")
    opt.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    opt.add_argument("--external-data", action="store_true", help="store weights in OUTPUT.data")
    opt.add_argument("--strict", action="store_true", help="fail instead of rolling back a pass that breaks")
    opt.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    opt.add_argument("-q", "--quiet", action="store_true", help="no progress messages")

    ins = sub.add_parser("inspect", help="ops, parameters, inputs and outputs, graph structure")
    ins.add_argument("model")
    ins.add_argument("--json", action="store_true", help="print JSON instead of tables")

    cmp_ = sub.add_parser("compare", help="run two models on the same inputs and compare their outputs")
    cmp_.add_argument("model_a")
    cmp_.add_argument("model_b")
    inputs_args(cmp_)
    tolerance_args(cmp_)

    bench = sub.add_parser("bench", help="measure onnxruntime latency")
    bench.add_argument("model")
    inputs_args(bench)
    bench.add_argument("--warmup", type=int, default=10)
    bench.add_argument("--repeats", type=int, default=100)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"optimize": cmd_optimize, "inspect": cmd_inspect, "compare": cmd_compare,
                "bench": cmd_bench}[args.command](args)
    except VerificationError as exc:
        _error_line(f"graphopt: verification failed: {exc}")
        return 1
    except GraphoptError as exc:
        _error_line(f"graphopt: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _error_line("graphopt: interrupted; nothing was written")
        return 130


def _error_line(text: str) -> None:
    """Exactly one line on stderr, however long (no terminal wrapping), so scripts can read it."""
    sys.stderr.write(" ".join(text.split()) + "\n")


# ------------------------------------------------------------------------------------------- commands
def _progress(quiet: bool):
    err = Console(stderr=True, highlight=False)
    start = time.perf_counter()

    def say(message: str) -> None:
        if not quiet:
            err.print(f"[dim]{time.perf_counter() - start:7.1f}s[/dim] {message}", markup=True)
    return say


def _runtime(args) -> RuntimeSettings:
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be at least 1")
    settings = RuntimeSettings(custom_op_libraries=tuple(args.custom_op_library))
    if args.threads is not None:
        settings = dataclasses.replace(settings, intra_op_threads=args.threads)
    return settings


def _tolerance(args, base: dict | None = None) -> Tolerance:
    fields = dict(base or {})
    for flag, key in (("max_error", "max_rel_l2"), ("max_abs_error", "max_abs"), ("min_cosine", "min_cosine"),
                      ("min_agreement", "min_top1_agreement")):
        if getattr(args, flag) is not None:
            fields[key] = getattr(args, flag)
    return Tolerance(**fields)


def _inputs(args, model: Model):
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    return prepare_inputs(model, args.calib, input_shapes=parse_shapes(args.input_shape),
                          batch_size=args.batch_size, seed=args.seed)


def _output_path(args) -> Path:
    src = Path(args.model)
    out = Path(args.output) if args.output else src.with_name(src.stem + ".opt.onnx")
    if out.resolve() == src.resolve() and not args.overwrite:
        raise InputError(f"{out}: is the input model; choose another -o or pass --overwrite")
    if out.exists() and not args.overwrite:
        raise InputError(f"{out}: already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: output folder does not exist")
    return out


def cmd_optimize(args) -> int:
    from .pipeline import Pipeline

    say = _progress(args.quiet)
    out_path = _output_path(args)
    if args.report and not Path(args.report).resolve().parent.is_dir():
        raise InputError(f"{args.report}: the report's folder does not exist")
    recipe_tolerance: dict = {}
    if args.recipe and args.passes:
        raise UsageError("give passes with --pass or with --recipe, not both")
    if args.recipe:
        passes, recipe_tolerance = load_recipe(args.recipe)
    else:
        passes = [create(*parse_pass_spec(s)) for s in (args.passes or DEFAULT_RECIPE)]
    tolerance = _tolerance(args, recipe_tolerance)
    runtime = _runtime(args)
    say(f"loading {args.model}")
    model = Model.load(args.model)
    inputs = _inputs(args, model)
    if inputs.synthetic:
        say("no --calib given: verifying on synthetic random inputs")
    ctx = Context(inputs=inputs, runtime=runtime, seed=args.seed, progress=say)
    optimized, report = Pipeline(passes, tolerance, not args.no_latency, args.strict).run(model, ctx)

    console = Console(highlight=False)
    report.render(console)
    if args.report:
        report.write_json(args.report)
        say(f"report written to {args.report}")
    if not report.passed and not args.force:
        raise VerificationError("; ".join(report.violations) + f" (nothing written to {out_path}; --force writes)")
    optimized.save(out_path, external_data=args.external_data or None, overwrite=True)
    console.print(f"wrote {out_path}" + ("" if report.passed else " (verification failed, written by --force)"))
    return 0 if report.passed else 1


def cmd_inspect(args) -> int:
    model = Model.load(args.model)
    info = inspect_model(model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.table import Table

    console = Console(highlight=False)
    console.print(f"[bold]{args.model}[/bold]  ir_version {info['ir_version']}, opsets "
                  + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in info["opsets"].items())
                  + (f", producer {info['producer']}" if info["producer"] else ""))
    console.print(f"{info['nodes']} nodes, {info['parameters']:,} parameters, {info['bytes'] / 1e6:.3f} MB")
    io = Table(title="inputs and outputs")
    for col in ("", "name", "dtype", "shape"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            io.add_row(kind[:-1], t["name"], str(t["dtype"]), str(t["shape"]))
    console.print(io)
    ops = Table(title="operators")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in sorted(info["op_counts"].items(), key=lambda kv: -kv[1]):
        ops.add_row(op, str(n))
    console.print(ops)
    graph = Table(title="dependency graph")
    graph.add_column("finding")
    graph.add_column("value", justify="right")
    for k, v in info["graph"].items():
        graph.add_row(k.replace("_", " "), str(v))
    console.print(graph)
    return 0


def inspect_model(model: Model) -> dict:
    dg = model.dependency_graph()

    def tensor(name):
        t = dg.tensor(name)
        return {"name": name, "dtype": t.dtype, "shape": list(t.shape) if t.shape is not None else None}

    return {"ir_version": model.proto.ir_version, "producer": model.proto.producer_name,
            "opsets": {o.domain: o.version for o in model.proto.opset_import},
            "nodes": len(model.graph.node), "parameters": model.parameter_count(), "bytes": model.byte_size(),
            "inputs": [tensor(n) for n in model.input_names()],
            "outputs": [tensor(n) for n in model.output_names()],
            "op_counts": dict(model.op_counts()), "graph": dg.summary()}


def cmd_compare(args) -> int:
    from rich.table import Table

    a, b = Model.load(args.model_a), Model.load(args.model_b)
    if sorted(a.input_names()) != sorted(b.input_names()):
        raise InputError(f"the models take different inputs: {a.input_names()} vs {b.input_names()}")
    runtime = _runtime(args)
    inputs = _inputs(args, a)
    feeds = inputs.calibration + inputs.validation
    try:
        metrics = compare_outputs(run(make_session(a, runtime), feeds), run(make_session(b, runtime), feeds))
    except ValueError as exc:
        raise InputError(str(exc)) from None
    table = Table(title=f"{args.model_b} vs {args.model_a} on {len(feeds)} samples"
                        + (" (synthetic)" if inputs.synthetic else ""))
    for col in ("output", "max abs", "mean abs", "rel L2", "cosine", "top-1 agree", "NaN/Inf"):
        table.add_column(col, justify="right")
    for m in metrics:
        table.add_row(m.name, f"{m.max_abs:.3g}", f"{m.mean_abs:.3g}", f"{m.rel_l2:.3g}", f"{m.cosine:.6f}",
                      "-" if m.top1_agreement is None else f"{m.top1_agreement:.2%}", str(m.nonfinite_new))
    console = Console(highlight=False)
    console.print(table)
    violations = _tolerance(args).violations(metrics)
    if violations:
        raise VerificationError("; ".join(violations))
    console.print("[green]within tolerance[/green]")
    return 0


def cmd_bench(args) -> int:
    if args.repeats < 1 or args.warmup < 0:
        raise UsageError("--repeats must be at least 1 and --warmup at least 0")
    model = Model.load(args.model)
    runtime = _runtime(args)
    inputs = _inputs(args, model)
    session = make_session(model, runtime)
    lat = measure_latency(session, inputs.validation[0], warmup=args.warmup, repeats=args.repeats,
                          max_seconds=60.0, threads=runtime.intra_op_threads)
    shapes = ", ".join(f"{k}={'x'.join(map(str, v.shape))}" for k, v in inputs.validation[0].items())
    print(f"{args.model}: median {lat.median_ms:.3f} ms, p90 {lat.p90_ms:.3f} ms, mean {lat.mean_ms:.3f} ms "
          f"over {lat.runs} runs ({lat.threads} threads, inputs {shapes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
