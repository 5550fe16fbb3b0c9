"""The `graphopt` command line: optimize, export, inspect, compare, bench.

Exit codes: 0 success, 1 verification failed, 2 bad usage or bad input. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

from rich.console import Console

from . import __version__
from .core.calibration import ConversionNote, input_specs, latency_feed, parse_shapes, prepare_inputs
from .analysis.allocate import BudgetInfeasible
from .analysis.depgraph import DependencyGraph
from .core.errors import GraphoptError, InputError, UsageError, VerificationError
from .core.model import Model
from .core.numerics import Tolerance, class_score_outputs, compare_outputs
from .passes import DEFAULT_RECIPE, REGISTRY, Context, create, parse_pass_spec
from .recipe import load_recipe, passes_markdown, passes_taking, passes_text
from .core.runtime import RuntimeSettings, make_session, measure_latency, run

EXAMPLES = """\
examples:
  graphopt optimize model.onnx -o model.opt.onnx --calib inputs.npz
  graphopt optimize model.onnx --pass fold_batchnorm --pass remove_dead --report report.json
  graphopt optimize bert.onnx --input-shape input_ids=1x128 --input-shape attention_mask=1x128
  graphopt optimize model.onnx --recipe recipe.toml --max-error 1e-3
  graphopt optimize model.onnx --target-speedup 2 --min-agreement 0.9 --calib crops.npz   # search a recipe
  graphopt inspect model.onnx
  graphopt compare model.onnx model.opt.onnx --calib inputs.npz
  graphopt bench model.onnx --threads 1
  graphopt export models.mobilenet_v2:build --input image=1x3x224x224 --dynamic image=0 -o mnv2.onnx
  graphopt passes                       # every pass's parameters, with their defaults

exit codes: 0 success, 1 verification failed, 2 bad usage or bad input
"""


EXPORT_EXAMPLES = """\
examples:
  graphopt export models.mobilenet_v2:build --input image=1x3x224x224 --dynamic image=0 -o mnv2.onnx
  graphopt export models.minilm:build --input input_ids=1x128:int64 --input attention_mask=1x128:int64 \\
      --dynamic input_ids=0 --dynamic input_ids=1 --dynamic attention_mask=0 --dynamic attention_mask=1 -o m.onnx
  graphopt export tiny:build --input tokens=2x7:int64:0..50 -o tiny.onnx     # ids for a 50-row embedding
  graphopt export tiny:build --example inputs.npz -o tiny.onnx               # real inputs, keyed by name

torch and onnxruntime run on the example inputs and again with every dynamic axis doubled; each output must
reach max abs error <= --atol or relative L2 error <= --rtol (integer outputs: exact). Generated inputs:
floats standard normal, integers token ids in [0, 1000) unless --input gives LOW..HIGH (values in [LOW, HIGH)),
names containing "mask" ones (ending in zeros in the second check). Arrays from --example are used as they are
(repeated along dynamic axes in the second check). Nothing is written when a check fails, unless --force.

exit codes: 0 success, 1 onnxruntime disagrees with torch, 2 bad usage or bad input
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

    def latency_args(p):
        p.add_argument("--latency-batch", type=int, default=1, metavar="N",
                       help="measure every latency (budgets, searches, the report) with N rows on a dynamic batch "
                            "axis (default 1)")
        p.add_argument("--latency-shape", action="append", default=[], metavar="NAME=SHAPE",
                       help="measure latency at exactly this input shape, e.g. input_ids=16x128 (repeatable)")

    def tolerance_args(p):
        p.add_argument("--max-error", type=float, metavar="X",
                       help="largest relative L2 error per output (default 1e-4 for exact passes; lossy passes "
                            "default to a guard: cosine >= 0.9)")
        p.add_argument("--max-abs-error", type=float, metavar="X", help="largest absolute error per output")
        p.add_argument("--min-cosine", type=float, metavar="X", help="smallest cosine similarity per output")
        p.add_argument("--min-agreement", type=float, metavar="X",
                       help="smallest top-1 agreement for class-score outputs (0..1)")
        p.add_argument("--output-kind", action="append", default=[], metavar="NAME=scores|other",
                       help="say whether an output is class scores (top-1 agreement and KL apply) or not; by "
                            "default decided from its name, shape and the op producing it")

    opt = sub.add_parser("optimize", help="run passes and write a verified model", epilog=EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    opt.add_argument("model", help="input .onnx file (never modified, unless -o names it and --overwrite is given)")
    opt.add_argument("-o", "--output", help="output .onnx file (default: INPUT.opt.onnx)")
    opt.add_argument("--pass", dest="passes", action="append", default=[], metavar="NAME[:key=value,...]",
                     help=f"a pass to run, repeatable, in order (default: {' '.join(DEFAULT_RECIPE)}); "
                          f"known: {', '.join(sorted(REGISTRY))}")
    opt.add_argument("--recipe", metavar="FILE.toml", help="passes and verification bounds from a TOML file")
    # which passes take each budget comes from the registry, so the help follows the passes
    opt.add_argument("--target-speedup", type=float, metavar="X",
                     help=f"latency budget for the passes that take one ({', '.join(passes_taking('target_speedup'))}"
                          "): X times faster than the input")
    opt.add_argument("--max-size-mb", type=float, metavar="MB",
                     help=f"size budget for the passes that take one ({', '.join(passes_taking('max_size_mb'))}): "
                          "the output at most MB megabytes")
    opt.add_argument("--max-latency-ms", type=float, metavar="MS",
                     help="latency budget in ms at the latency shape (a search; layermerge takes it too)")
    search = opt.add_argument_group(
        "search (a budget and a fidelity floor with no --pass or --recipe: graphopt finds the recipe)")
    search.add_argument("--max-drop", type=float, metavar="PT",
                        help="fidelity floor: top-1 accuracy points lost at most, against the 'labels' array of "
                             "the --calib .npz")
    search.add_argument("--passes", dest="search_passes", metavar="A,B,...",
                        help="families the search may use (default: all searchable: "
                             "layermerge,lowrank,prune,qdq,recover)")
    search.add_argument("--max-minutes", type=float, metavar="M",
                        help="time bound of the search (default 20); a build already running finishes")
    search.add_argument("--workers", type=int, metavar="N",
                        help="builds side by side in a process pool (default 1; their passes share the cores; "
                             "every latency on the front is still timed one candidate at a time)")
    search.add_argument("--ray", metavar="ADDRESS",
                        help="run the builds as Ray tasks on the cluster at ADDRESS ('auto': the running local "
                             "cluster; 'local': start one on this machine)")
    search.add_argument("--cache-dir", metavar="DIR",
                        help="where built candidates are kept for a re-run (default ~/.cache/graphopt/search)")
    search.add_argument("--no-cache", action="store_true", help="build every candidate afresh and keep none")
    opt.add_argument("--train-data", metavar="FILE|FOLDER",
                     help=f"further unlabeled inputs for the passes that train ({', '.join(passes_taking('train_data'))})"
                          ": .npz/.npy or a folder of them, besides the --calib fit samples; samples equal to "
                          "verification samples are left out")
    inputs_args(opt)
    latency_args(opt)
    tolerance_args(opt)
    opt.add_argument("--allow-few-samples", action="store_true",
                     help="let a lossy run go on with a single input sample (fit, selection and verification "
                          "then all read it)")
    opt.add_argument("--report", metavar="FILE.json", help="write the full report as JSON (never over an input; "
                                                            "an existing file only with --overwrite)")
    opt.add_argument("--report-html", metavar="FILE.html",
                     help="write the report as one self-contained HTML page (the front plot needs matplotlib)")
    opt.add_argument("--force", action="store_true", help="write the output even if verification fails")
    opt.add_argument("--overwrite", action="store_true", help="replace an existing output or report file")
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
    latency_args(bench)
    bench.add_argument("--warmup", type=int, default=10)
    bench.add_argument("--repeats", type=int, default=100)

    lst = sub.add_parser("passes", help="list every pass and its parameters, with their defaults")
    lst.add_argument("--markdown", action="store_true", help="the README's table (Markdown)")

    exp = sub.add_parser("export", help="export a torch module to ONNX, checked against torch in onnxruntime",
                         epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    exp.add_argument("target", metavar="MODULE:CALLABLE",
                     help="a callable taking no arguments that returns the torch.nn.Module (the current folder is "
                          "importable)")
    exp.add_argument("--input", dest="inputs", action="append", default=[], metavar="NAME=SHAPE[:DTYPE[:LOW..HIGH]]",
                     help="a generated input, repeatable, in forward()'s order unless every name is a forward() "
                          "parameter; DTYPE float32 (default), float16, float64, int64, int32, bool, ...; LOW..HIGH "
                          "draws values from [LOW, HIGH), e.g. tokens=2x7:int64:0..50 for a 50-row embedding")
    exp.add_argument("--example", metavar="FILE.npz",
                     help="example inputs from an .npz keyed by input name (before any --input, in the file's "
                          "order)")
    exp.add_argument("--dynamic", action="append", default=[], metavar="NAME=AXIS",
                     help="an axis of an input that may change size, repeatable (symbolic dim NAME_dimAXIS)")
    exp.add_argument("-o", dest="export_path", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    exp.add_argument("--output-name", dest="output_names", action="append", default=[], metavar="NAME",
                     help="name of forward()'s next output tensor, repeatable (default: output, or output_0, ...)")
    exp.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    exp.add_argument("--atol", type=float, default=1e-4, metavar="X",
                     help="an output passes when its max abs error <= X (default 1e-4) ...")
    exp.add_argument("--rtol", type=float, default=1e-4, metavar="X",
                     help="... or its relative L2 error <= X (default 1e-4)")
    exp.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    exp.add_argument("--force", action="store_true", help="write the file even if the check fails")
    exp.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"optimize": cmd_optimize, "inspect": cmd_inspect, "compare": cmd_compare,
                "bench": cmd_bench, "export": cmd_export, "passes": cmd_passes}[args.command](args)
    except VerificationError as exc:
        _error_line(f"graphopt: verification failed: {exc}")
        return 1
    except BudgetInfeasible as exc:
        _error_line(f"graphopt: budget out of reach: {exc}")
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


def _tolerance(args, base: dict | None = None) -> Tolerance | None:
    """Bounds from the recipe, then the flags; None when neither sets any (the pipeline picks its default)."""
    fields = dict(base or {})
    for flag, key in (("max_error", "max_rel_l2"), ("max_abs_error", "max_abs"), ("min_cosine", "min_cosine"),
                      ("min_agreement", "min_top1_agreement")):
        if getattr(args, flag) is not None:
            fields[key] = getattr(args, flag)
    return Tolerance(**fields) if fields else None


def _latency(args) -> dict:
    if args.latency_batch < 1:
        raise UsageError("--latency-batch must be at least 1")
    return {"latency_batch": args.latency_batch, "latency_shapes": parse_shapes(args.latency_shape, "--latency-shape")}


def _output_kinds(args) -> dict[str, str]:
    kinds = {}
    for item in args.output_kind:
        name, eq, kind = item.partition("=")
        if not eq or not name:
            raise UsageError(f"--output-kind {item!r}: expected NAME=scores or NAME=other")
        kinds[name] = kind
    return kinds


def _inputs(args, model: Model):
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    return prepare_inputs(model, args.calib, input_shapes=parse_shapes(args.input_shape),
                          batch_size=args.batch_size, seed=args.seed)


def _output_path(args) -> Path:
    src = Path(args.model)
    out = Path(args.output) if args.output else src.with_name(src.stem + ".opt.onnx")
    if out.is_dir():  # --overwrite cannot make a folder a file: say so before any work
        raise InputError(f"{out}: is a folder; -o names the output .onnx file")
    if out.resolve() == src.resolve() and not args.overwrite:
        raise InputError(f"{out}: is the input model; choose another -o or pass --overwrite")
    for flag, other in (("--calib", args.calib), ("--recipe", args.recipe)):
        if other and out.resolve() == Path(other).resolve():
            raise InputError(f"{out}: is the {flag} file; choose another -o")
    if out.exists() and not args.overwrite:
        raise InputError(f"{out}: already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: output folder does not exist")
    return out


def _report_path(args, out: Path, flag: str = "--report") -> Path | None:
    """--report (or --report-html), checked before any work: the report must never replace an input or the
    output model (it is written first, so the model would silently be lost), nor an existing file without
    --overwrite."""
    given = getattr(args, flag.lstrip("-").replace("-", "_"))
    if not given:
        return None
    report = Path(given)
    if report.is_dir():
        raise InputError(f"{report}: is a folder; {flag} names the file to write")
    others = [("the input model", args.model), ("the --calib file", args.calib), ("the --recipe file", args.recipe),
              ("the output model (-o)", out)]
    if flag == "--report-html":
        others.append(("the --report file", args.report))
    for what, other in others:
        if other and report.resolve() == Path(other).resolve():
            raise InputError(f"{report}: is {what}; {flag} needs a file of its own")
    if report.exists() and not args.overwrite:
        raise InputError(f"{report}: already exists; pass --overwrite to replace it")
    if not report.resolve().parent.is_dir():
        raise InputError(f"{given}: the report's folder does not exist")
    return report


def _default_batch(args, model: Model) -> str | None:
    """Without --calib, a dynamic batch dim (axis 0) that --input-shape does not give becomes 1, so that
    `graphopt bench model.onnx` works on a model exported with a dynamic batch; other unknown dims still need
    --input-shape. Adds the shapes to args.input_shape and returns the note that says so (None if nothing)."""
    if args.calib is not None:
        return None
    given = parse_shapes(args.input_shape)
    chosen = []
    for spec in input_specs(model):
        dims = spec.shape
        if spec.name in given or not dims or _known(dims[0]) or not all(_known(d) for d in dims[1:]):
            continue
        shape = "x".join(map(str, (1, *dims[1:])))
        args.input_shape.append(f"{spec.name}={shape}")
        chosen.append(f"{spec.name}={shape}")
    if not chosen:
        return None
    return (f"synthetic inputs at batch 1 on the dynamic batch axis ({', '.join(chosen)}); --input-shape or "
            "--calib sets another")


def _known(dim) -> bool:
    return isinstance(dim, int) and dim > 0


@contextlib.contextmanager
def _conversion_notes(note):
    """Pass calibration's ConversionNote warnings (one per converted input) to `note` as one line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionNote)
        yield
    for w in caught:
        if issubclass(w.category, ConversionNote):
            note(f"note: {w.message}")
        else:  # not ours: show it as Python would have
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _stderr_note(message: str) -> None:
    _error_line(f"graphopt: {message}")


def cmd_optimize(args) -> int:
    from .pipeline import Pipeline

    say = _progress(args.quiet)
    out_path = _output_path(args)
    _report_path(args, out_path)
    _report_path(args, out_path, "--report-html")
    budget_given = any(v is not None for v in (args.target_speedup, args.max_latency_ms, args.max_size_mb))
    if budget_given and not args.passes and not args.recipe:
        return cmd_search(args, out_path, say)
    search_only = [flag for flag, v in (("--max-drop", args.max_drop), ("--passes", args.search_passes),
                                        ("--max-minutes", args.max_minutes), ("--workers", args.workers),
                                        ("--ray", args.ray), ("--cache-dir", args.cache_dir),
                                        ("--no-cache", args.no_cache or None)) if v is not None]
    if search_only:
        raise UsageError(f"{', '.join(search_only)} belong to a search: give a budget (--target-speedup, "
                         "--max-latency-ms or --max-size-mb) and no --pass or --recipe")
    recipe_tolerance: dict = {}
    if args.recipe and args.passes:
        raise UsageError("give passes with --pass or with --recipe, not both")
    if args.recipe:
        passes, recipe_tolerance = load_recipe(args.recipe)
    else:
        passes = [create(*parse_pass_spec(s)) for s in (args.passes or DEFAULT_RECIPE)]
    if args.target_speedup is not None:
        passes = [_with_default(p, "target_speedup", args.target_speedup) for p in passes]
    if args.max_size_mb is not None:
        passes = [_with_default(p, "max_size_mb", args.max_size_mb) for p in passes]
    if args.max_latency_ms is not None:
        passes = [_with_default(p, "max_latency_ms", args.max_latency_ms) for p in passes]
    if args.train_data is not None:
        if not any(hasattr(p, "train_data") for p in passes):
            raise UsageError(f"--train-data is for the passes that train ({', '.join(passes_taking('train_data'))}), "
                             "and none is asked for")
        if not Path(args.train_data).exists():
            raise InputError(f"{args.train_data}: no such file or folder (--train-data)")
        passes = [_with_default(p, "train_data", args.train_data) for p in passes]
    tolerance = _tolerance(args, recipe_tolerance)
    runtime = _runtime(args)
    say(f"loading {args.model}")
    model = Model.load(args.model)
    batch_note = _default_batch(args, model)
    with _conversion_notes(say):
        inputs = _inputs(args, model)
    if inputs.synthetic:
        say("no --calib given: verifying on synthetic random inputs" + (f"; {batch_note}" if batch_note else ""))
    ctx = Context(inputs=inputs, runtime=runtime, seed=args.seed, progress=say, **_latency(args),
                  output_kinds=_output_kinds(args))
    optimized, report = Pipeline(passes, tolerance, not args.no_latency, args.strict,
                                 args.allow_few_samples).run(model, ctx)

    console = Console(highlight=False)
    return _finish(args, optimized, report, out_path, console, say)


def _finish(args, optimized, report, out_path: Path, console, say) -> int:
    """Show the report, write the report files, then the model if it passed (or --force); the exit code."""
    report.render(console)
    _write_reports(args, report, say)
    if not report.passed and not args.force:
        raise VerificationError("; ".join(report.violations) + f" (nothing written to {out_path}; --force writes)")
    optimized.save(out_path, external_data=args.external_data or None, overwrite=True)
    console.print(f"wrote {out_path}" + ("" if report.passed else " (verification failed, written by --force)"))
    return 0 if report.passed else 1


def _write_reports(args, report, say) -> None:
    if args.report:
        report.write_json(args.report)
        say(f"report written to {args.report}")
    if args.report_html:
        from .report_html import write_html

        write_html(report.to_dict(), args.report_html, title=f"graphopt: {Path(args.model).name}")
        say(f"HTML report written to {args.report_html}")


def cmd_search(args, out_path: Path, say) -> int:
    """A budget and a fidelity floor, no recipe: search one (graphopt.search), verify the chosen candidate on
    the verification samples, write it. Exit 1 with the front and the best reachable points when nothing met the
    budget."""
    from .report import ModelStats, Report, render_search
    from .search import DEFAULT_MAX_MINUTES, Budget, Search, verify_choice

    if args.max_error is not None or args.max_abs_error is not None:
        raise UsageError("a search's fidelity floor is --max-drop, --min-agreement or --min-cosine (--max-error and "
                         "--max-abs-error bound a given recipe)")
    if args.train_data is not None:
        raise UsageError("--train-data goes with a given recipe (--pass recover:...), not with a search")
    if args.strict:
        raise UsageError("--strict goes with a given recipe: a search rolls nothing back, it measures candidates")
    budget = Budget(target_speedup=args.target_speedup, max_latency_ms=args.max_latency_ms,
                    max_size_mb=args.max_size_mb, max_drop=args.max_drop, min_agreement=args.min_agreement,
                    min_cosine=args.min_cosine)
    families = [f.strip() for f in args.search_passes.split(",") if f.strip()] if args.search_passes else None
    if args.no_cache and args.cache_dir:
        raise UsageError("--no-cache and --cache-dir contradict each other")
    cache = False if args.no_cache else args.cache_dir
    runtime = _runtime(args)
    say(f"loading {args.model}")
    model = Model.load(args.model)
    if args.calib is None:
        raise UsageError("a search needs real inputs: give --calib (its samples are split into fit, selection and "
                         "verification)")
    with _conversion_notes(say):
        inputs = _inputs(args, model)
    ctx = Context(inputs=inputs, runtime=runtime, seed=args.seed, progress=say, **_latency(args),
                  output_kinds=_output_kinds(args))
    search = Search(model, ctx, budget, families=families,
                    max_minutes=DEFAULT_MAX_MINUTES if args.max_minutes is None else args.max_minutes,
                    workers=args.workers or 1, ray=args.ray, cache_dir=cache)
    result = search.run()
    point = result.chosen or (result.best_reachable[0] if args.force and result.best_reachable else None)
    console = Console(highlight=False)
    if point is None:
        report = Report(before=ModelStats.of(model), tolerance=budget.tolerance(), inputs=inputs.counts(),
                        runtime=runtime, seconds=result.seconds, search=result.to_dict())
        report.violations = ["no candidate met the budget on the selection samples"]
        render_search(console, report.search)
        _write_reports(args, report, say)
        reach = "; ".join(f"[{p.id}] {p.label}: {p.speedup:.2f}x, {budget.loss_name} {p.loss:.4g}"
                          for p in result.best_reachable) or "nothing was measured"
        raise VerificationError(f"no candidate met {budget.describe()} (best reachable: {reach}; nothing written to "
                                f"{out_path})")
    optimized, report = verify_choice(model, point, ctx, result, measure_latency=not args.no_latency)
    if point is not result.chosen:
        report.violations.insert(0, "no candidate met the budget on the selection samples; this is the fastest "
                                    "within the floor, written by --force")
    return _finish(args, optimized, report, out_path, console, say)


def _with_default(p, key: str, value):
    """The pass with `key` set to `value` if it has that parameter and the user did not set it already."""
    fields = {f.name: f for f in dataclasses.fields(p)} if dataclasses.is_dataclass(p) else {}
    if key not in fields or getattr(p, key) != fields[key].default:
        return p
    try:
        return dataclasses.replace(p, **{key: value})
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--{key.replace('_', '-')}: {exc}") from None


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
    groups = Table(title="channel groups (what the prune pass may remove)")
    for col in ("group", "size", "producers", "frozen because"):
        groups.add_column(col, justify="right" if col == "size" else "left")
    for g in info["channel_groups"]:
        producers = g["producers"][0] + (f" +{len(g['producers']) - 1}" if len(g["producers"]) > 1 else "") \
            if g["producers"] else "-"
        size = f"{g['size']}" + (f" ({g['size'] // g['block']} heads of {g['block']})" if g["block"] > 1 else "")
        reasons = g["frozen"].split("; ") if g["frozen"] else []
        why = "; ".join(reasons[:2]) + (f" (+{len(reasons) - 2} more)" if len(reasons) > 2 else "")
        groups.add_row(str(g["id"]), size, producers, why or "[green]prunable[/green]")
    console.print(groups)
    _print_layermerge(console, info["layermerge"])
    return 0


def _print_layermerge(console, lm: dict) -> None:
    """Positions, skips, breaks and valid spans: what the layermerge pass may merge."""
    from rich.table import Table

    for i, chain in enumerate(lm["chains"]):
        table = Table(title=f"layermerge chain {i} (input {chain['input']}): positions")
        for col in ("pos", "conv", "kernel/stride", "channels", "skip from", "activation", "break after"):
            table.add_column(col)
        for u in chain["units"]:
            k, s = u["kernel"], u["stride"]
            skip = "-" if u["skip_from"] is None else str(u["skip_from"]) + (" (projection)" if u["projection"]
                                                                             else "")
            if u["external_add"]:
                skip = "outside the chain"
            table.add_row(str(u["position"]), u["conv"], f"{k[0]}x{k[1]}/{s[0]}" + (" dw" if u["depthwise"] else ""),
                          f"{u['channels'][0]}->{u['channels'][1]}", skip, u["activation"] or "-",
                          chain["breaks"].get(str(u["position"]), ""))
        console.print(table)
        spans = " ".join(f"({a},{b}]" for a, b in chain["spans"]) or "none"
        console.print(f"valid spans of two or more units: {spans}")
    for note in lm["notes"]:
        console.print(f"layermerge: {note}")


def inspect_model(model: Model) -> dict:
    dg = DependencyGraph(model)

    def tensor(name):
        t = dg.tensor(name)
        return {"name": name, "dtype": t.dtype, "shape": list(t.shape) if t.shape is not None else None}

    return {"ir_version": model.proto.ir_version, "producer": model.proto.producer_name,
            "opsets": {o.domain: o.version for o in model.proto.opset_import},
            "nodes": len(model.graph.node), "parameters": model.parameter_count(), "bytes": model.byte_size(),
            "inputs": [tensor(n) for n in model.input_names()],
            "outputs": [tensor(n) for n in model.output_names()],
            "op_counts": dict(model.op_counts()), "graph": dg.summary(),
            "channel_groups": _channel_groups(model), "layermerge": _layermerge_structure(model)}


def _layermerge_structure(model: Model) -> dict:
    from .passes.layermerge.spans import find_structure

    try:
        return find_structure(model).summary()
    except Exception as exc:  # the listing is informative: never let it break inspect
        return {"chains": [], "notes": [f"span analysis failed: {type(exc).__name__}: {exc}"], "multi_unit_spans": 0}


def _channel_groups(model: Model) -> list[dict]:
    from .analysis.channel_groups import analyse

    try:
        return analyse(model).summary()
    except Exception as exc:  # the listing is informative: never let it break inspect
        return [{"id": -1, "size": 0, "block": 1, "producers": [], "consumers": [],
                 "frozen": f"channel-group analysis failed: {type(exc).__name__}: {exc}"}]


def cmd_compare(args) -> int:
    from rich.table import Table

    a, b = Model.load(args.model_a), Model.load(args.model_b)
    if sorted(a.input_names()) != sorted(b.input_names()):
        raise InputError(f"the models take different inputs: {a.input_names()} vs {b.input_names()}")
    runtime = _runtime(args)
    batch_note = _default_batch(args, a)
    with _conversion_notes(_stderr_note):
        inputs = _inputs(args, a)
    if batch_note:
        _stderr_note(f"note: {batch_note}")
    feeds = inputs.fit + inputs.selection + inputs.verification  # nothing was fitted: compare on every sample
    scores = class_score_outputs(a, _output_kinds(args))
    try:
        metrics = compare_outputs(run(make_session(a, runtime), feeds), run(make_session(b, runtime), feeds), scores)
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
    violations = (_tolerance(args) or Tolerance.exact()).violations(metrics)
    if violations:
        raise VerificationError("; ".join(violations))
    console.print("[green]within tolerance[/green]")
    return 0


def cmd_bench(args) -> int:
    if args.repeats < 1 or args.warmup < 0:
        raise UsageError("--repeats must be at least 1 and --warmup at least 0")
    model = Model.load(args.model)
    runtime = _runtime(args)
    batch_note = _default_batch(args, model)
    with _conversion_notes(_stderr_note):
        inputs = _inputs(args, model)
    if batch_note:
        _stderr_note(f"note: {batch_note}")
    session = make_session(model, runtime)
    lat_args = _latency(args)
    feed = latency_feed(model, inputs.fit or inputs.verification, batch=lat_args["latency_batch"],
                        shapes=lat_args["latency_shapes"])
    lat = measure_latency(session, feed, warmup=args.warmup, repeats=args.repeats,
                          max_seconds=60.0, threads=runtime.intra_op_threads)
    shapes = ", ".join(f"{k}={'x'.join(map(str, v.shape))}" for k, v in feed.items())
    print(f"{args.model}: median {lat.median_ms:.3f} ms, p90 {lat.p90_ms:.3f} ms, mean {lat.mean_ms:.3f} ms "
          f"over {lat.runs} runs ({lat.threads} thread{'' if lat.threads == 1 else 's'}, inputs {shapes}"
          + (", synthetic" if inputs.synthetic else "") + ")")
    return 0


def cmd_passes(args) -> int:
    print(passes_markdown() if args.markdown else passes_text())
    return 0


def cmd_export(args) -> int:
    from .core.calibration import _read_npz  # the same plain-words errors as --calib
    from .export import export, load_module, parse_dynamic_spec, parse_input_option

    # everything that needs no torch and no user code is checked first: mistakes fail in a fraction of a second
    if not args.inputs and not args.example:
        raise UsageError("give the module's inputs with --input NAME=SHAPE[:DTYPE] or --example FILE.npz")
    inputs: dict = {}  # name -> numpy array (from --example) or (shape, dtype[, (low, high)])
    from_file: set[str] = set()
    if args.example:
        example = Path(args.example)
        if not example.is_file():
            raise InputError(f"{example}: no such file")
        if example.suffix != ".npz":
            raise InputError(f"{example}: --example takes an .npz of arrays keyed by input name")
        inputs.update(_read_npz(example))
        if not inputs:
            raise InputError(f"{example}: holds no arrays")
        from_file = set(inputs)
    for item in args.inputs:
        name, shape, dtype, value_range = parse_input_option(item)
        if name in inputs:
            raise UsageError(f"--input {name} is given twice" if name not in from_file
                             else f"--input {name}: {args.example} already gives it")
        inputs[name] = (shape, dtype) if value_range is None else (shape, dtype, value_range)
    names = list(inputs)
    ranks = {n: (v.ndim if hasattr(v, "ndim") else len(v[0])) for n, v in inputs.items()}
    dynamic: dict[str, list[int]] = {}
    for item in args.dynamic:
        name, axis = parse_dynamic_spec(item)
        if name not in names:
            raise UsageError(f"--dynamic {item}: no input is named {name!r} (inputs: {', '.join(names)})")
        rank = ranks[name]
        if not -rank <= axis < rank:
            raise UsageError(f"--dynamic {item}: axis out of range, input {name!r} has {rank} dims "
                             f"(axes 0..{rank - 1})")
        dynamic.setdefault(name, []).append(axis)
    if args.opset < 7:
        raise UsageError(f"--opset {args.opset}: graphopt needs opset 7 or newer")
    if not (args.atol >= 0 and args.rtol >= 0):
        raise UsageError("--atol and --rtol must be non-negative numbers")
    out_path = Path(args.export_path)
    if out_path.is_dir():
        raise InputError(f"{out_path}: is a folder; -o names the .onnx file to write")
    if out_path.exists() and not args.overwrite:
        raise InputError(f"{out_path}: already exists; pass --overwrite to replace it")
    if not out_path.resolve().parent.is_dir():
        raise InputError(f"{out_path.parent}: output folder does not exist")

    say = _progress(args.quiet)
    module = load_module(args.target, progress=say)
    console = Console(highlight=False)
    try:
        result = export(module, inputs, out_path, dynamic=dynamic,
                        opset=args.opset, output_names=args.output_names or None, atol=args.atol, rtol=args.rtol,
                        overwrite=args.overwrite, force=args.force, seed=args.seed, progress=say)
    except VerificationError as exc:
        if getattr(exc, "result", None) is not None:
            _render_export_checks(console, exc.result)
        raise
    _render_export_checks(console, result)
    console.print(f"wrote {out_path}" + ("" if result.passed else " (onnxruntime disagrees with torch, written "
                                                                   "by --force)"))
    return 0 if result.passed else 1


def _render_export_checks(console: Console, result) -> None:
    from rich.table import Table

    table = Table(title="torch vs onnxruntime")
    for col in ("check", "output", "max abs", "rel L2", "NaN/Inf", "ok"):
        table.add_column(col, justify="right" if col in ("max abs", "rel L2", "NaN/Inf") else "left")
    for i, c in enumerate(result.checks, 1):
        if c["error"]:
            table.add_row(f"{i}", "-", "-", "-", "-", "[red]no[/red]")
        for o in c["outputs"]:
            table.add_row(f"{i}", o["name"], f"{o['max_abs']:.3g}", f"{o['rel_l2']:.3g}", str(o["nonfinite_new"]),
                          "yes" if o["passed"] else "[red]no[/red]")
    console.print(table)
    for i, c in enumerate(result.checks, 1):
        shapes = ", ".join(f"{k}={'x'.join(map(str, s))}" for k, s in c["inputs"].items())
        console.print(f"check {i}, {c['check']}: {shapes}" + (f": {c['error']}" if c["error"] else ""),
                      markup=False)

if __name__ == "__main__":
    sys.exit(main())
