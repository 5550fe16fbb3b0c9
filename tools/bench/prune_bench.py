"""Structured pruning benchmark: graphopt's prune pass against Torch-Pruning, no fine-tuning on either side.

    python tools/bench/prune_bench.py --model fashion_resnet --quiet-load 1.0   # -> results/prune_fashion_resnet.md
    python tools/bench/prune_bench.py --model mobilenet_v2
    python tools/bench/prune_bench.py --model minilm
    python tools/bench/prune_bench.py --analysis                               # -> results/prune_analysis.md

Reuses the harness (tasks, data sets, metrics, interleaved latency, load header) unchanged: the contenders below
are registered in this process only. Torch-Pruning (PyPI `torch-pruning`, extra `bench`) prunes the torch model
with group L2 magnitude importance (its MagnitudeImportance, per-layer uniform ratio, the classifier ignored),
with the ratio bisected until its MACs (tp.utils.count_ops_and_params) match the same reduction; the result is
exported with graphopt.export. graphopt's prune pass works on the fp32 ONNX export with the task's calibration
feeds. Nobody fine-tunes.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

if __package__ in (None, ""):  # run as a script: make `bench` and `models` importable
    _root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(_root / "tools"), str(_root)]
    __package__ = "bench"

from bench import contenders as C  # noqa: E402
from bench.harness import LatencyConfig, log, run_task, write_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAC_REDUCTION = {"fashion_resnet": 0.5, "mobilenet_v2": 0.3}
CHANNEL_REDUCTION = {"minilm": 0.25}


def _ours(ratio: float, target: str, **params):
    def build(fp32_path, feeds, workdir):
        from graphopt.core.calibration import InputSet
        from graphopt.core.model import Model
        from graphopt.passes import Context, create
        from graphopt.core.runtime import RuntimeSettings

        t0 = time.perf_counter()
        model = Model.load(fp32_path)
        ctx = Context(inputs=InputSet(fit=list(feeds), selection=[], verification=list(feeds[:1])), runtime=RuntimeSettings(intra_op_threads=2),
                      progress=log)
        spec = {"ratio": ratio, "target": target, **params}
        result = create("prune", spec).run(model, ctx)
        out = workdir / "model.onnx"
        result.model.save(out, overwrite=True)
        c = result.counters
        note = (f"MACs -{c['macs_reduction']:.1%}, {c['pruned_groups']}/{c['prunable']} prunable groups cut "
                f"({c['groups']} groups), analysis {c['analysis_seconds']:.2f} s; "
                + ", ".join(f"{k}={v}" for k, v in spec.items()))
        return C.Optimized(out, time.perf_counter() - t0, note)
    return build


def _torch_pruning(model_name: str, reduction: float):
    def build(fp32_path, feeds, workdir):
        import importlib

        import torch
        import torch_pruning as tp

        import graphopt

        t0 = time.perf_counter()
        module = importlib.import_module(f"models.{model_name}")
        base = module.build().eval()
        spec = module.EXPORT
        shape = next(iter(spec["inputs"].values()))[0]
        example = torch.randn(*shape)
        macs0, _ = tp.utils.count_ops_and_params(base, example)

        def prune(ratio):
            net = copy.deepcopy(base)
            last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]  # the classifier stays
            pruner = tp.pruner.MetaPruner(net, example, importance=tp.importance.MagnitudeImportance(p=2),
                                          pruning_ratio=ratio, ignored_layers=[last])
            pruner.step()
            macs, _ = tp.utils.count_ops_and_params(net, example)
            return net, 1 - macs / macs0

        lo, hi = 0.0, 0.95
        for _ in range(14):  # bisect the channel ratio until the MAC reduction matches ours
            mid = (lo + hi) / 2
            _, got = prune(mid)
            lo, hi = (mid, hi) if got < reduction else (lo, mid)
        net, got = prune(hi)
        out = workdir / "model.onnx"
        graphopt.export(net.eval(), spec["inputs"], out, dynamic=spec.get("dynamic"), opset=17,
                        output_names=spec.get("outputs"), overwrite=True)
        return C.Optimized(out, time.perf_counter() - t0,
                           f"MACs -{got:.1%} (tp.utils.count_ops_and_params), channel ratio {hi:.3f} per layer")
    return build


def register(model_name: str) -> list[str]:
    """Register this benchmark's contenders for one model (in this process only); returns their names."""
    names = []
    if model_name in MAC_REDUCTION:
        r = MAC_REDUCTION[model_name]
        pct = int(round(r * 100))
        common = {"calibration_samples": 8, "sensitivity_samples": 2 if model_name == "fashion_resnet" else 8}
        variants = {
            f"graphopt_prune{pct}": ("graphopt prune, measured-distortion allocation + ridge refit", dict(common)),
            f"graphopt_prune{pct}_noreft": ("graphopt prune, measured-distortion allocation, no refit",
                                            dict(common, refit=False)),
            f"graphopt_prune{pct}_magnitude": ("graphopt prune, magnitude importance, no refit (like TP)",
                                               dict(common, importance="magnitude", refit=False)),
        }
        for name, (doc, params) in variants.items():
            fn = _ours(r, "macs", **params)
            fn.__doc__ = f"{doc}, -{pct} % MACs"
            C.contender(name)(fn)
            names.append(name)
        fn = _torch_pruning(model_name, r)
        fn.__doc__ = (f"Torch-Pruning {_tp_version()} MagnitudeImportance (L2, per-layer uniform ratio bisected to "
                      f"-{pct} % MACs), exported")
        C.contender(f"torch_pruning{pct}")(fn)
        names.append(f"torch_pruning{pct}")
    if model_name in CHANNEL_REDUCTION:
        r = CHANNEL_REDUCTION[model_name]
        pct = int(round(r * 100))
        for name, doc, params in (
                (f"graphopt_prune{pct}ch", "refit", {}),
                (f"graphopt_prune{pct}ch_noreft", "no refit", {"refit": False})):
            fn = _ours(r, "channels", calibration_samples=8, sensitivity_samples=4, **params)
            fn.__doc__ = (f"graphopt prune, {pct} % of the prunable channels (heads of 32, MLP channels) removed, "
                          f"measured-distortion allocation, {doc}")
            C.contender(name)(fn)
            names.append(name)
    return names


def _tp_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch-pruning")
    except Exception:
        return "?"


def analysis_timing(nodes: int = 10_000, repeats: int = 3) -> str:
    from graphopt.analysis.channel_groups import analyse
    from graphopt.core.shapes import tensor_infos
    from graphopt.report import machine

    model = big_graph(nodes)
    rows = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        infos = tensor_infos(model.proto)
        t1 = time.perf_counter()
        cg = analyse(model, infos)
        t2 = time.perf_counter()
        rows.append((t1 - t0, t2 - t1, t2 - t0))
    groups = cg.groups()
    m = machine()
    load = os.getloadavg()
    med = [statistics.median(r[i] for r in rows) for i in range(3)]
    return "\n".join([
        "# prune: channel-group analysis of a 10,000-node graph", "",
        f"- **graph**: `tools/bench/prune_bench.py:big_graph({nodes})`: {len(model.graph.node)} nodes "
        "(conv3x3-relu-conv1x1-add residual blocks, width 8, 4x4)",
        f"- **machine**: {m['cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']}; Python {m['python']}",
        f"- **load average**: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)",
        f"- **date**: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "- **command**: `python tools/bench/prune_bench.py --analysis`", "",
        "| step | median of 3 (s) |", "|---|---:|",
        f"| ONNX shape inference (`tensor_infos`) | {med[0]:.3f} |",
        f"| channel groups (union-find walk) | {med[1]:.3f} |",
        f"| total | {med[2]:.3f} |", "",
        f"{len(groups)} groups, {sum(g.prunable for g in groups)} prunable, "
        f"{sum(g.frozen for g in groups)} frozen (goal: under 2 s in total).", ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/bench/prune_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["fashion_resnet", "mobilenet_v2", "minilm"])
    p.add_argument("--analysis", action="store_true", help="time the group analysis of a 10,000-node graph")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, help="evaluate on the first N evaluation samples only")
    p.add_argument("--quiet-load", type=float, metavar="LOAD")
    p.add_argument("--quiet-timeout", type=float, default=600.0)
    p.add_argument("--latency-seconds", type=float, default=3.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.analysis:
        text = analysis_timing()
        write_atomic(args.out or RESULTS / "prune_analysis.md", text)
        print(text)
    if args.model:
        names = register(args.model)
        latency = LatencyConfig(min_seconds=args.latency_seconds, max_seconds=max(30.0, 10 * args.latency_seconds),
                                quiet_load=args.quiet_load, quiet_timeout=args.quiet_timeout)
        command = "python tools/bench/prune_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
        result = run_task(args.model, names, threads=args.threads, limit=args.limit, latency=latency,
                          command=command)
        text = result.markdown(level=1).replace(f"# {args.model}", f"# prune: {args.model}", 1)
        out = args.out or RESULTS / f"prune_{args.model}.md"
        write_atomic(out, text)
        print(text)
        log(f"wrote {out}")
    return 0


def big_graph(nodes: int = 10_000, width: int = 8, seed: int = 0):
    """A residual conv net of about `nodes` nodes (conv3x3-relu-conv1x1-add blocks), random weights."""
    from graphopt.core.model import Model

    rng = np.random.default_rng(seed)
    inits, graph_nodes = [], []
    cur = "x"
    for i in range(max(1, nodes // 4)):
        w1, b1, w2 = f"w{i}a", f"b{i}a", f"w{i}b"
        inits += [numpy_helper.from_array((rng.standard_normal((width, width, 3, 3)) * 0.1).astype(np.float32), w1),
                  numpy_helper.from_array(np.zeros(width, np.float32), b1),
                  numpy_helper.from_array((rng.standard_normal((width, width, 1, 1)) * 0.1).astype(np.float32), w2)]
        graph_nodes += [helper.make_node("Conv", [cur, w1, b1], [f"c{i}"], name=f"conv{i}a", pads=[1, 1, 1, 1]),
                        helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
                        helper.make_node("Conv", [f"r{i}", w2], [f"d{i}"], name=f"conv{i}b"),
                        helper.make_node("Add", [cur, f"d{i}"], [f"s{i}"], name=f"add{i}")]
        cur = f"s{i}"
    graph_nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    graph = helper.make_graph(graph_nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 [1, width, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width, 4, 4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return Model(proto)


if __name__ == "__main__":
    sys.exit(main())
