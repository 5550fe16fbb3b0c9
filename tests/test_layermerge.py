"""layermerge: spans found in the graph (with a reason for every break), the merge rules (exact where they can be,
interior-only where they cannot, checked in onnxruntime against the unmerged span), the segment DP against brute
force, the importance refit on real weights, the whole pass, and bad input with clear messages."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import fashion_split, fvi, init, make
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from graphopt.analysis.allocate import BudgetInfeasible, Option, Segment, allocate_segments
from graphopt.core.calibration import InputSet
from graphopt.core.errors import UsageError
from graphopt.core.model import Model
from graphopt.core.numerics import output_distortion
from graphopt.core.runtime import RuntimeSettings, make_session, run
from graphopt.passes.base import Context
from graphopt.passes.layermerge.build import Replacement, apply
from graphopt.passes.layermerge.layermerge import LayerMerge
from graphopt.passes.layermerge.merge import border_exact, centre, compose_span, plans_for, refit
from graphopt.passes.layermerge.spans import find_structure, span_problem

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ builders
def chain_model(cin: int, hw: int, layers: list[dict], seed: int = 0, batch: int = 2) -> Model:
    """x -> [Conv (-> Add skip) (-> act)] * n. A layer: cout, k, s (stride), p (pad), g ("dw" for depthwise),
    bias (bool or 'zero'), act (op name or None), skip (source position), proj (1x1 stride of a projection conv)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    positions, channels = ["x"], [cin]
    for j, L in enumerate(layers, start=1):
        c_in = channels[-1]
        k, s, p = L.get("k", 3), L.get("s", 1), L.get("p", L.get("k", 3) // 2)
        dw = L.get("g") == "dw"
        cout = c_in if dw else L["cout"]
        w = rng.standard_normal((cout, 1 if dw else c_in, k, k)) / np.sqrt((1 if dw else c_in) * k * k)
        inputs = [positions[-1], f"w{j}"]
        inits.append(init(f"w{j}", w.astype(np.float32)))
        if L.get("bias", True):
            b = np.zeros(cout) if L.get("bias") == "zero" else rng.uniform(-0.5, 0.5, cout)
            inits.append(init(f"b{j}", b.astype(np.float32)))
            inputs.append(f"b{j}")
        out = f"c{j}"
        nodes.append(helper.make_node("Conv", inputs, [out], name=f"conv{j}", kernel_shape=[k, k], strides=[s, s],
                                      pads=[p] * 4, group=cout if dw else 1))
        if L.get("skip") is not None:
            src = positions[L["skip"]]
            if L.get("proj"):
                ps = L["proj"]
                pw = rng.standard_normal((cout, channels[L["skip"]], 1, 1)) / np.sqrt(channels[L["skip"]])
                inits += [init(f"pw{j}", pw.astype(np.float32)), init(f"pb{j}", rng.uniform(-.5, .5, cout)
                                                                        .astype(np.float32))]
                nodes.append(helper.make_node("Conv", [src, f"pw{j}", f"pb{j}"], [f"proj{j}"], name=f"proj{j}",
                                              kernel_shape=[1, 1], strides=[ps, ps]))
                src = f"proj{j}"
            nodes.append(helper.make_node("Add", [out, src], [f"a{j}"], name=f"add{j}"))
            out = f"a{j}"
        if L.get("act"):
            nodes.append(helper.make_node(L["act"], [out], [f"y{j}"], name=f"act{j}"))
            out = f"y{j}"
        positions.append(out)
        channels.append(cout)
    proto = make(nodes, [fvi("x", [batch, cin, hw, hw])], [fvi(positions[-1], None)], inits)
    return Model.from_proto(proto)


def feed_for(model: Model, seed: int = 1) -> dict:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def merged(model: Model, st: int, end: int, plan_kernel=None):
    """The model with span (st, end] of chain 0 merged (composition, no refit), and the plan used."""
    s = find_structure(model)
    c = s.chains[0]
    plans = plans_for(c, st, end, 99)
    plan = plans[-1] if plan_kernel is None else next(p for p in plans if p.kernel == plan_kernel)  # default: all convs
    conv = centre(compose_span(c, st, end), plan.kernel)
    return apply(model, s.chains, [Replacement(0, st, end, "merge", conv, plan.depthwise)]), plan


def errors(model: Model, new: Model, margin: int) -> tuple[float, float]:
    """Max abs difference in the interior (`margin` pixels in from every side) and on the border ring."""
    feed = feed_for(model)
    a = run(make_session(model), [feed])[0]
    b = run(make_session(new), [feed])[0]
    (name,) = a
    d = np.abs(a[name] - b[name])
    inner = d[:, :, margin:d.shape[2] - margin, margin:d.shape[3] - margin]
    ring = d.copy()
    ring[:, :, margin:d.shape[2] - margin, margin:d.shape[3] - margin] = 0
    return float(inner.max()), float(ring.max())


# ---------------------------------------------------------------------------------------------- merge rules
EXACT = 1e-4


def test_kxk_then_1x1_is_exact_with_stride_and_padding():
    m = chain_model(4, 9, [dict(cout=6, k=3, s=2, p=1), dict(cout=5, k=1, act="Relu")])
    new, plan = merged(m, 0, 2)
    assert plan.exact and plan.kernel == (3, 3)
    assert errors(m, new, 0)[0] < EXACT
    assert [n.op_type for n in new.graph.node] == ["Conv", "Relu"]


def test_3x3_p1_then_3x3_p1_is_exact_only_in_the_interior():
    m = chain_model(3, 10, [dict(cout=4, k=3, p=1), dict(cout=4, k=3, p=1)])
    new, plan = merged(m, 0, 2)
    assert plan.kernel == (5, 5) and not plan.exact and not border_exact(find_structure(m).chains[0], 0, 2)
    inner, border = errors(m, new, 2)
    assert inner < EXACT
    assert border > 1e-2, "the border error is real: zero padding of the intermediate is not reproduced"
    print(f"3x3 p1 -> 3x3 p1 merged into 5x5 p2: interior error {inner:.2e}, border error {border:.3f}")


def test_padding_moved_to_the_first_conv_is_exact_everywhere():
    m = chain_model(3, 10, [dict(cout=4, k=3, p=2), dict(cout=4, k=3, p=0)])
    new, plan = merged(m, 0, 2)
    assert plan.exact
    assert errors(m, new, 0)[0] < EXACT


def test_bias_before_a_padded_conv_breaks_the_border_and_zero_bias_does_not():
    with_bias = chain_model(3, 8, [dict(cout=4, k=1, p=0), dict(cout=4, k=3, p=1)])
    new, plan = merged(with_bias, 0, 2)
    assert not plan.exact
    inner, border = errors(with_bias, new, 1)
    assert inner < EXACT and border > 1e-2
    no_bias = chain_model(3, 8, [dict(cout=4, k=1, p=0, bias="zero"), dict(cout=4, k=3, p=1)])
    new, plan = merged(no_bias, 0, 2)
    assert plan.exact
    assert errors(no_bias, new, 0)[0] < EXACT


def test_depthwise_chain_stays_depthwise_and_mixed_becomes_dense():
    m = chain_model(5, 9, [dict(g="dw", k=3, p=1), dict(g="dw", k=3, p=0)])
    new, plan = merged(m, 0, 2)
    assert plan.depthwise and plan.exact
    (conv,) = [n for n in new.graph.node if n.op_type == "Conv"]
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "group")) == 5
    assert errors(m, new, 0)[0] < EXACT
    mixed = chain_model(4, 9, [dict(cout=6, k=1, p=0), dict(g="dw", k=3, p=0), dict(cout=4, k=1, p=0)])
    new, plan = merged(mixed, 0, 3)
    assert not plan.depthwise and plan.exact and plan.kernel == (3, 3)
    assert errors(mixed, new, 0)[0] < EXACT


def test_identity_shortcut_folds_into_the_centre_tap():
    m = chain_model(4, 8, [dict(cout=4, k=3, p=1), dict(cout=4, k=1, skip=0, act="Relu")])
    s = find_structure(m)
    assert s.chains[0].skips() == [(0, 2)]
    new, plan = merged(m, 0, 2)
    assert plan.folds_skip and plan.exact
    assert errors(m, new, 0)[0] < EXACT
    assert "Add" not in {n.op_type for n in new.graph.node}


def test_projection_shortcut_adds_to_the_centre_tap():
    m = chain_model(4, 9, [dict(cout=6, k=3, s=2, p=1), dict(cout=6, k=1, skip=0, proj=2, act="Relu")])
    s = find_structure(m)
    assert s.chains[0].units[1].projection is not None
    new, plan = merged(m, 0, 2)
    assert plan.exact and plan.folds_skip
    assert errors(m, new, 0)[0] < EXACT
    assert [n.op_type for n in new.graph.node] == ["Conv", "Relu"]  # the projection conv went too


def test_span_inside_a_branch_keeps_the_add():
    m = chain_model(4, 8, [dict(cout=4, k=1, act="Relu"), dict(cout=4, k=3, act="Relu"), dict(cout=4, k=1),
                           dict(cout=4, k=1, skip=1)])
    new, plan = merged(m, 2, 4)  # the skip comes from position 1, before the span: its Add stays after the merge
    assert plan.exact and not plan.folds_skip
    assert errors(m, new, 0)[0] < EXACT
    assert [n.op_type for n in new.graph.node].count("Add") == 1


# -------------------------------------------------------------------------------------------------- spans
def test_breaks_have_reasons():
    # position 1 is also read by a Concat (a second branch): no span may pass it
    m = chain_model(3, 8, [dict(cout=4, k=3, act="Relu"), dict(cout=4, k=3, act="Relu"), dict(cout=4, k=1)])
    g = m.proto.graph
    g.node.append(helper.make_node("Concat", ["y1", g.output[0].name], ["cat"], axis=1, name="cat"))
    g.output.append(fvi("cat", None))
    s = find_structure(m)
    c = s.chains[0]
    assert c.breaks == {1: "also read by Concat cat"}
    assert "position 1 is a break (also read by Concat cat)" in span_problem(c, 0, 2)
    assert span_problem(c, 1, 3) == ""


def test_residual_block_may_not_be_cut_and_stride_rule():
    m = chain_model(4, 8, [dict(cout=4, k=1, act="Relu"), dict(cout=4, k=3, act="Relu"),
                           dict(cout=4, k=1, skip=1, act="Relu"), dict(cout=8, k=3, s=2, act="Relu"),
                           dict(cout=8, k=3, act="Relu")])
    c = find_structure(m).chains[0]
    assert "cuts the residual block (1, 3] in half (its source is inside the span)" in span_problem(c, 0, 2)
    assert "cuts the residual block (1, 3] in half (its Add is inside the span)" in span_problem(c, 2, 4)
    assert span_problem(c, 0, 3) == "" and span_problem(c, 1, 3) == ""
    assert "follows a strided conv" in span_problem(c, 3, 5)


def test_batchnorm_not_folded_is_reported():
    m = chain_model(3, 8, [dict(cout=4, k=3)])
    g = m.proto.graph
    out = g.output[0].name
    from builders import bn_inits, bn_node
    g.node.append(bn_node("bn", out, "bn_out"))
    g.initializer.extend(bn_inits("bn", 4))
    g.output[0].name = "bn_out"
    s = find_structure(Model.from_proto(m.proto))
    assert any("fold it first" in n for n in s.notes)


def _export(module_name: str, tmp_path) -> Model:
    import importlib

    import graphopt

    sys.path[:0] = [str(ROOT)]
    mod = importlib.import_module(f"models.{module_name}")
    try:
        net = mod.build()
    except Exception as exc:  # a weight package that is not installed
        pytest.skip(f"models.{module_name}: {exc}")
    spec = mod.EXPORT
    path = tmp_path / f"{module_name}.onnx"
    graphopt.export(net, spec["inputs"], path, dynamic=spec.get("dynamic"), output_names=spec["outputs"])
    return Model.load(path)


@pytest.fixture(scope="module")
def fashion_resnet(tmp_path_factory):
    return _export("fashion_resnet", tmp_path_factory.mktemp("lm_fr"))


def test_spans_of_fashion_resnet(fashion_resnet):
    s = find_structure(fashion_resnet)
    (c,) = s.chains
    assert c.length == 13 and c.input == fashion_resnet.input_names()[0]
    assert c.skips() == [(1, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]
    assert [t for t, u in enumerate(c.units, 1) if u.projection is not None] == [7, 11]
    assert [t for t, u in enumerate(c.units, 1) if u.conv.strides != (1, 1)] == [6, 10]
    assert not c.breaks
    assert "follows a strided conv" in s.rejected[(0, 5, 7)]
    assert "cuts the residual block" in s.rejected[(0, 2, 4)]
    multi = {(x.st, x.end) for x in s.spans if x.end - x.st > 1}
    assert {(1, 3), (3, 5), (1, 5), (7, 9), (11, 13)} <= multi


def test_spans_of_mobilenet_v2(tmp_path):
    m = _export("mobilenet_v2", tmp_path)
    s = find_structure(m)
    (c,) = s.chains
    assert c.length == 52
    assert len(c.skips()) == 10 and all(t - s_ == 3 for s_, t in c.skips())  # inverted residual blocks
    assert sum(u.conv.depthwise for u in c.units) == 17
    assert sum(u.act is None for u in c.units) == 17  # the linear bottlenecks
    assert not c.breaks
    assert s.notes == []
    summary = s.summary()
    assert summary["multi_unit_spans"] > 50


def test_mnist_cnn_breaks_at_every_maxpool(tmp_path):
    m = _export("mnist_cnn", tmp_path)
    s = find_structure(m)
    assert [c.length for c in s.chains] == [1, 1, 1]
    assert sum("MaxPool" in n and "no merge rule" in n for n in s.notes) == 2
    assert all(x.end - x.st == 1 for x in s.spans)


def test_dit_patch_embedding_is_one_unit(tmp_path):
    m = _export("dit", tmp_path)
    s = find_structure(m)
    assert [c.length for c in s.chains] == [1]  # the patch embedding; the transformer has no conv
    u = s.chains[0].units[0]
    assert u.conv.strides == u.conv.kernel and u.act is None


# random chains: every valid span builds, and exact plans reproduce the original in onnxruntime
@st.composite
def random_chain(draw):
    cin = draw(st.sampled_from([2, 3, 4]))
    hw = draw(st.sampled_from([6, 8, 9]))
    layers, chans, sizes = [], [cin], [hw]
    for j in range(draw(st.integers(2, 6))):
        kind = draw(st.sampled_from(["dense", "dense", "dw", "pw"]))
        k = 1 if kind == "pw" else 3
        stride = 2 if (kind == "dense" and sizes[-1] >= 6 and draw(st.booleans()) and draw(st.booleans())) else 1
        p = draw(st.sampled_from([0, k // 2])) if stride == 1 else 1
        if sizes[-1] + 2 * p - k < 2:
            p = k // 2
        cout = chans[-1] if kind == "dw" else draw(st.sampled_from([chans[-1], 3, 4, 5]))
        L = dict(cout=cout, k=k, s=stride, p=p, g="dw" if kind == "dw" else 1,
                 bias=draw(st.sampled_from([True, "zero"])), act=draw(st.sampled_from([None, "Relu", "Relu"])))
        size = (sizes[-1] + 2 * p - k) // stride + 1
        sources = [i for i in range(len(chans)) if chans[i] == cout and sizes[i] == size and i < len(chans) - 1]
        if sources and draw(st.booleans()):
            L["skip"] = draw(st.sampled_from(sources))
        layers.append(L)
        chans.append(cout)
        sizes.append(size)
    return cin, hw, layers, draw(st.integers(0, 10_000))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_chain())
def test_random_chains_every_span_builds_and_exact_plans_are_exact(spec):
    cin, hw, layers, seed = spec
    m = chain_model(cin, hw, layers, seed)
    s = find_structure(m)
    assert [c.length for c in s.chains] == [len(layers)]
    c = s.chains[0]
    feed = feed_for(m)
    ref = run(make_session(m), [feed])[0]
    (name,) = ref
    for span in s.spans:
        assert span_problem(c, span.st, span.end) == ""
        full = compose_span(c, span.st, span.end)
        for plan in plans_for(c, span.st, span.end, 99):
            conv = centre(full, plan.kernel)
            if conv is None:
                continue
            new = apply(m, s.chains, [Replacement(0, span.st, span.end, "merge", conv, plan.depthwise)])
            out = run(make_session(new), [feed])[0][name]
            assert out.shape == ref[name].shape
            if plan.exact and span.end - span.st > 1:
                np.testing.assert_allclose(out, ref[name], atol=1e-4, rtol=1e-4)


def test_dropped_block_keeps_its_position_name_for_the_next_span():
    m = chain_model(4, 8, [dict(cout=4, k=3, act="Relu"), dict(cout=4, k=1), dict(cout=4, k=1, skip=1),
                           dict(cout=4, k=1), dict(cout=5, k=1, act="Relu")])
    s = find_structure(m)
    c = s.chains[0]
    conv = centre(compose_span(c, 3, 5), (1, 1))
    new = apply(m, s.chains, [Replacement(0, 1, 3, "drop"), Replacement(0, 3, 5, "merge", conv, False)])
    assert c.position(3) in {o for n in new.graph.node for o in n.output}
    # the result is the original with the residual branch removed, then the exact merge
    without_branch = chain_model(4, 8, [dict(cout=4, k=3, act="Relu"), dict(cout=4, k=1),
                                        dict(cout=5, k=1, act="Relu")])
    for name in ("w1", "b1"):
        dict((t.name, t) for t in without_branch.graph.initializer)[name].CopyFrom(m.initializers()[name])
    for src, dst in (("w4", "w2"), ("b4", "b2"), ("w5", "w3"), ("b5", "b3")):
        t = dict((t.name, t) for t in without_branch.graph.initializer)[dst]
        t.CopyFrom(m.initializers()[src])
        t.name = dst
    feed = feed_for(m)
    a = run(make_session(new), [feed])[0]
    b = run(make_session(without_branch), [feed])[0]
    np.testing.assert_allclose(next(iter(a.values())), next(iter(b.values())), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------- DP
def _brute_force(length, segments, budget):
    best = None

    def walk(pos, cost, dist, path):
        nonlocal best
        if pos == length:
            if cost <= budget + 1e-9 and (best is None or dist < best[0] - 1e-12):
                best = (dist, cost, path)
            return
        for seg in segments:
            if seg.start == pos:
                for o in seg.options:
                    walk(seg.end, cost + o.cost, dist + o.distortion, path + [(seg.start, seg.end, o.label)])
    walk(0, 0.0, 0.0, [])
    return best


@pytest.mark.parametrize("seed", range(40))
def test_segment_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    length = int(rng.integers(1, 7))
    segments = []
    for a, b in itertools.combinations(range(length + 1), 2):
        if b - a == 1 or rng.random() < 0.5:
            segments.append(Segment(a, b, tuple(Option(f"{a}-{b}-{k}", float(rng.integers(1, 9)),
                                                       float(rng.uniform(0, 3)))
                                                for k in range(int(rng.integers(1, 4))))))
    budget = float(rng.integers(length, 8 * length))
    best = _brute_force(length, segments, budget)
    try:
        alloc = allocate_segments(length, segments, budget, resolution=int(budget))  # integer costs: exact grid
    except BudgetInfeasible as exc:
        assert best is None
        assert exc.best_cost > budget
        return
    assert best is not None
    assert alloc.cost <= budget
    assert alloc.distortion == pytest.approx(best[0], abs=1e-9)
    ends = [seg.end for seg, _ in alloc.choice]
    starts = [seg.start for seg, _ in alloc.choice]
    assert starts[0] == 0 and ends[-1] == length and starts[1:] == ends[:-1]  # an exact cover


def test_segment_dp_default_resolution_stays_within_budget_and_near_optimal():
    rng = np.random.default_rng(7)
    length = 6
    segments = [Segment(a, b, tuple(Option(str(k), float(rng.uniform(0.1, 2)), float(rng.uniform(0, 1)))
                                    for k in range(3)))
                for a, b in itertools.combinations(range(length + 1), 2) if b - a <= 3]
    budget = 4.0
    alloc = allocate_segments(length, segments, budget)
    best = _brute_force(length, segments, budget)
    assert alloc.cost <= budget and alloc.distortion <= best[0] + 0.05


def test_segment_dp_refuses_bad_problems():
    with pytest.raises(UsageError, match="do not cover"):
        allocate_segments(3, [Segment(0, 1, (Option("a", 1, 0),))], 10)
    with pytest.raises(BudgetInfeasible) as info:
        allocate_segments(1, [Segment(0, 1, (Option("a", 5, 0),))], 2)
    assert info.value.best_cost == 5


# --------------------------------------------------------------------------------- real weights: importance
def test_refit_lowers_the_distortion_of_lossy_merges(fashion_resnet):
    """On the project's Fashion ResNet: for every merged span that removes an activation, the least-squares
    refit to the original span's output (fitted on 64 images) gives a lower distortion on 128 other images than
    the plain composition."""
    inputs, held, _ = fashion_split(64, 32)
    held = held[:128]  # the 128 other images the docstring names (none of them read by the refit)
    s = find_structure(fashion_resnet)
    c = s.chains[0]
    reference = run(make_session(fashion_resnet), [{"image": held}])
    acts = {}
    names = sorted({c.position(j) for j in range(1, c.length + 1)} | {u.pre_act for u in c.units}
                   | {u.conv_output for u in c.units})
    from graphopt.core.capture import stream_tensors
    for feed, values in stream_tensors(fashion_resnet, names, inputs.fit):
        for k, v in values.items():
            acts.setdefault(k, []).append(v)
        acts.setdefault(c.input, []).append(feed[c.input])
    better = total = 0
    for span in [x for x in s.spans if x.end - x.st == 2]:
        full = compose_span(c, span.st, span.end)
        for plan in plans_for(c, span.st, span.end, 5):
            start = centre(full, plan.kernel)
            if start is None:
                continue
            target = c.units[span.end - 1].pre_act
            fitted, ran = refit(start, plan.depthwise, acts[c.position(span.st)], acts[target])
            assert ran
            d = [output_distortion(reference, run(make_session(apply(fashion_resnet, s.chains, [
                Replacement(0, span.st, span.end, "merge", m, plan.depthwise)])), [{"image": held}]),
                frozenset(fashion_resnet.output_names())) for m in (start, fitted)]
            total += 1
            better += d[1] < d[0]
    assert total >= 8 and better == total


# --------------------------------------------------------------------------------------------- the pass
class _Untouchable(dict):
    """A feed that fails the test if anything reads it."""

    def _fail(self, *args, **kwargs):
        raise AssertionError("layermerge read a verification sample")

    __getitem__ = __iter__ = keys = values = items = get = __len__ = _fail


def test_pass_meets_its_target_and_reports_every_span(fashion_resnet, tmp_path):
    inputs, held, _ = fashion_split(96, 32)
    guarded = InputSet(fit=inputs.fit, selection=inputs.selection,
                       verification=[_Untouchable(f) for f in inputs.verification[:8]])
    ctx = Context(inputs=guarded, runtime=RuntimeSettings(intra_op_threads=1))
    p = LayerMerge(target_speedup=1.2, cache_dir=str(tmp_path / "cache"), fit_samples=32)
    result = p.run(fashion_resnet, ctx)
    assert result.changed
    chosen = next(x for x in result.details["probes"] if x.get("chosen"))
    assert chosen["speedup"] >= 1.2 and result.counters["speedup"] == chosen["speedup"]
    assert result.counters["latency_timed"] > 0
    ops = result.model.op_counts()
    assert ops["Conv"] < fashion_resnet.op_counts()["Conv"]
    # every changed span is in the report with the table entries behind it
    changed = [r for r in result.details["chosen"] if r["option"] != "keep"]
    assert len(result.decisions) == len(changed) > 0
    for d in result.decisions:
        assert "table T" in d.reason and "I (distortion)" in d.reason
    # the result runs and stays a usable classifier on images no step read
    before = run(make_session(fashion_resnet), [{"image": held}])[0]["logits"].argmax(1)
    after = run(make_session(result.model), [{"image": held}])[0]["logits"].argmax(1)
    assert (before == after).mean() > 0.5
    # a second run finds every latency entry in the disk cache
    again = p.run(fashion_resnet, ctx)
    assert again.counters["latency_timed"] == 0 and again.counters["latency_cache_hits"] > 0


def test_exact_menu_changes_nothing_it_cannot_reproduce():
    m = chain_model(4, 8, [dict(cout=6, k=3, act="Relu"), dict(cout=6, k=1), dict(cout=6, k=1, act="Relu"),
                           dict(cout=4, k=3, act="Relu")])
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)} for _ in range(12)]
    inputs = InputSet(fit=feeds[:6], selection=feeds[6:9], verification=feeds[9:])
    result = LayerMerge(menu="exact").run(m, Context(inputs=inputs, runtime=RuntimeSettings(intra_op_threads=1)))
    ref = run(make_session(m), feeds[9:])
    new = run(make_session(result.model), feeds[9:])
    for a, b in zip(ref, new):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], atol=1e-4, rtol=1e-4)
    assert all(r["option"] in ("keep", "merge 1x1 exact") for r in result.details["chosen"])
    # with nothing exact to merge (an activation after every conv) it keeps everything and says so
    plain = chain_model(4, 8, [dict(cout=6, k=3, act="Relu"), dict(cout=4, k=3, act="Relu")])
    result = LayerMerge(menu="exact").run(plain, Context(inputs=inputs, runtime=RuntimeSettings(intra_op_threads=1)))
    assert not result.changed and result.counters["merged_spans"] == 0


# ------------------------------------------------------------------------------------------------ bad input
def _cli(*args):
    from test_cli import graphopt
    return graphopt(*args)


def test_model_without_convs_is_refused(tmp_path):
    proto = make([helper.make_node("Relu", ["x"], ["y"])], [fvi("x", [1, 4])], [fvi("y", None)])
    with pytest.raises(UsageError, match="no Conv node"):
        LayerMerge().preflight(Model.from_proto(proto), None)


def test_model_with_control_flow_is_refused():
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], [fvi("t", None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [fvi("e", None)])
    m = chain_model(3, 8, [dict(cout=4, k=3, act="Relu")])
    g = m.proto.graph
    g.input.append(fvi("cond", [], onnx.TensorProto.BOOL))
    g.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=other, name="if0"))
    g.output.append(fvi("z", None))
    with pytest.raises(UsageError, match="control flow: If node 'if0'"):
        LayerMerge().preflight(Model.from_proto(m.proto), None)


def test_budget_below_the_fastest_option_names_the_best_reachable(tmp_path):
    m = chain_model(4, 8, [dict(cout=4, k=3, act="Relu"), dict(cout=4, k=3, act="Relu")])
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)} for _ in range(12)]
    inputs = InputSet(fit=feeds[:6], selection=feeds[6:9], verification=feeds[9:])
    with pytest.raises(BudgetInfeasible, match=r"50.00x is out of reach: the fastest choice .* predicts"):
        LayerMerge(target_speedup=50, cache_dir=str(tmp_path)).run(m, Context(inputs=inputs))


def test_cli_bad_input_is_one_line_and_nothing_written(tmp_path):
    proto = make([helper.make_node("Relu", ["x"], ["y"])], [fvi("x", [1, 4])], [fvi("y", [1, 4])])
    src = tmp_path / "relu.onnx"
    onnx.save(proto, src)
    np.savez(tmp_path / "calib.npz", x=np.ones((8, 1, 4), np.float32))
    out = tmp_path / "out.onnx"
    r = _cli("optimize", str(src), "-o", str(out), "-q", "--pass", "layermerge", "--calib", str(tmp_path / "calib.npz"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "no Conv node" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    r = _cli("optimize", str(src), "-o", str(out), "--pass", "layermerge:menu=fancy")
    assert r.returncode == 2 and "menu must be one of merge, exact, blocks" in r.stderr


def test_inspect_shows_positions_spans_and_breaks(fashion_resnet, tmp_path):
    path = tmp_path / "fr.onnx"
    fashion_resnet.save(path)
    r = _cli("inspect", str(path))
    assert r.returncode == 0, r.stderr
    assert "layermerge chain 0" in r.stdout and "valid spans of two or more units: " in r.stdout
    assert "(1,3]" in r.stdout
    r = _cli("inspect", str(path), "--json")
    import json
    lm = json.loads(r.stdout)["layermerge"]
    assert len(lm["chains"][0]["units"]) == 13 and lm["chains"][0]["units"][6]["projection"]
