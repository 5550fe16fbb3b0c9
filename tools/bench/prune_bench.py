"""Structured pruning benchmark: graphopt's prune pass against Torch-Pruning, no fine-tuning on either side.

    python tools/bench/prune_bench.py --model fashion_resnet --quiet-load 1.0   # -> results/prune_fashion_resnet.md
    python tools/bench/prune_bench.py --model mobilenet_v2
    python tools/bench/prune_bench.py --model minilm
    python tools/bench/prune_bench.py --analysis                               # -> results/prune_analysis.md

Reuses the harness (tasks, data sets, metrics, interleaved latency, noise floor, load header) unchanged: the
contenders below are registered in this process only. Torch-Pruning (PyPI `torch-pruning`, extra `bench`) prunes
the torch model (the classifier ignored) with
- its MagnitudeImportance (group L2, data-free), a per-layer uniform ratio or global pruning (`global_pruning=True`:
  one threshold over all groups), the like-for-like peer of graphopt's `importance=magnitude,refit=false`;
- its TaylorImportance (|w · dL/dw|, first order), uniform or global, with the gradients of the cross-entropy
  between the model and the fp32 model's own top-1 predictions on the same calibration feeds graphopt's pass gets
  (no labels: neither side reads one);
its channel ratio is bisected until the MAC reduction, counted by graphopt's counter on the exported ONNX graph
(the same counter, on the same kind of graph, as graphopt's rows), matches the target; the result is exported
with graphopt.export. graphopt's prune pass works on the fp32 ONNX export with the task's calibration feeds.
Every row's notes give its MAC reduction from that one counter (`onnx_macs`). Nobody fine-tunes.
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


def onnx_macs(model, feed: dict) -> float:
    """MACs of one run on `feed`, counted on the ONNX graph by the counter graphopt's prune pass uses
    (`graphopt.passes.prune.prune._node_macs`: Conv, ConvTranspose, Gemm, MatMul), with the shapes of one real
    run in onnxruntime. `model`: a path, an onnx ModelProto or a graphopt Model."""
    import onnx

    from graphopt.core.capture import stream_tensors
    from graphopt.core.model import Model
    from graphopt.passes.prune.prune import _node_macs

    if isinstance(model, (str, Path)):
        model = Model.load(model)
    elif isinstance(model, onnx.ModelProto):
        model = Model(model)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    wanted = list(dict.fromkeys(t for n in nodes for t in (n.input[0], n.input[1], n.output[0])
                                if t not in inits and t not in feed))
    shapes = {k: tuple(v.shape) for k, v in feed.items()}
    shapes.update({k: tuple(t.dims) for k, t in inits.items()})
    for _, values in stream_tensors(model, wanted, [feed]):
        shapes.update({k: tuple(v.shape) for k, v in values.items()})
    return sum(_node_macs(n, shapes, inits) for n in nodes)


def _one_row(feeds) -> dict:
    return {k: np.ascontiguousarray(v[:1]) for k, v in feeds[0].items()}


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
        row = _one_row(feeds)
        macs = 1 - onnx_macs(out, row) / onnx_macs(fp32_path, row)
        note = (f"MACs -{macs:.1%} (onnx_macs), {c['pruned_groups']}/{c['prunable']} prunable groups cut "
                f"({c['groups']} groups), analysis {c['analysis_seconds']:.2f} s; "
                + ", ".join(f"{k}={v}" for k, v in spec.items()))
        return C.Optimized(out, time.perf_counter() - t0, note)
    return build


def _torch_pruning(model_name: str, reduction: float, importance: str = "magnitude", global_pruning: bool = False):
    def build(fp32_path, feeds, workdir):
        import importlib
        import io

        import onnx
        import torch
        import torch_pruning as tp

        import graphopt

        t0 = time.perf_counter()
        module = importlib.import_module(f"models.{model_name}")
        base = module.build().eval()
        spec = module.EXPORT
        (input_name, (shape, _dtype)), = spec["inputs"].items()
        example = torch.randn(*shape)
        row = _one_row(feeds)
        macs0 = onnx_macs(fp32_path, row)
        if importance == "taylor":  # gradients on the calibration feeds, against the fp32 model's own top-1
            base.zero_grad()
            for feed in feeds:
                x = torch.from_numpy(feed[input_name])
                with torch.no_grad():
                    target = base(x).argmax(1)
                torch.nn.functional.cross_entropy(base(x), target).backward()
            grads = {n: p.grad.detach().clone() for n, p in base.named_parameters() if p.grad is not None}

        def prune(ratio):
            net = copy.deepcopy(base)
            if importance == "taylor":
                for n, p in net.named_parameters():
                    p.grad = grads[n].clone() if n in grads else None
                imp = tp.importance.TaylorImportance()
            else:
                imp = tp.importance.MagnitudeImportance(p=2)
            last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]  # the classifier stays
            pruner = tp.pruner.MetaPruner(net, example, importance=imp, pruning_ratio=ratio,
                                          global_pruning=global_pruning, ignored_layers=[last])
            pruner.step()
            net.zero_grad(set_to_none=True)
            buf = io.BytesIO()  # a plain export, only to count MACs on the ONNX graph with graphopt's counter
            with torch.no_grad():
                torch.onnx.export(net.eval(), (example,), buf, input_names=[input_name], opset_version=17,
                                  dynamo=False)
            return net, 1 - onnx_macs(onnx.load_from_string(buf.getvalue()), row) / macs0

        lo, hi = 0.0, 0.95
        for _ in range(11):  # bisect the channel ratio until the MAC reduction matches ours
            mid = (lo + hi) / 2
            _, got = prune(mid)
            lo, hi = (mid, hi) if got < reduction else (lo, mid)
        net, _ = prune(hi)
        out = workdir / "model.onnx"
        graphopt.export(net.eval(), spec["inputs"], out, dynamic=spec.get("dynamic"), opset=17,
                        output_names=spec.get("outputs"), overwrite=True)
        got = 1 - onnx_macs(out, row) / macs0
        how = "global threshold" if global_pruning else "per-layer uniform"
        return C.Optimized(out, time.perf_counter() - t0,
                           f"MACs -{got:.1%} (onnx_macs), {importance} importance, {how}, channel ratio {hi:.3f}")
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
            f"graphopt_prune{pct}_magnitude": ("graphopt prune, magnitude importance, no refit (like for like with "
                                               "TP's magnitude rows)",
                                               dict(common, importance="magnitude", refit=False)),
            f"graphopt_prune{pct}_magnitude_refit": ("graphopt prune, magnitude importance + ridge refit",
                                                     dict(common, importance="magnitude")),
        }
        for name, (doc, params) in variants.items():
            fn = _ours(r, "macs", **params)
            fn.__doc__ = f"{doc}, -{pct} % MACs"
            C.contender(name)(fn)
            names.append(name)
        for suffix, imp, glob, doc in (
                ("", "magnitude", False, "MagnitudeImportance (L2, data-free), per-layer uniform ratio"),
                ("_global", "magnitude", True, "MagnitudeImportance (L2, data-free), global pruning"),
                ("_taylor", "taylor", False, "TaylorImportance on the calibration feeds, per-layer uniform ratio"),
                ("_taylor_global", "taylor", True, "TaylorImportance on the calibration feeds, global pruning")):
            fn = _torch_pruning(model_name, r, imp, glob)
            fn.__doc__ = f"Torch-Pruning {_tp_version()} {doc}, ratio bisected to -{pct} % MACs (onnx_macs), exported"
            C.contender(f"torch_pruning{pct}{suffix}")(fn)
            names.append(f"torch_pruning{pct}{suffix}")
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
