"""The Taylor cache: block finding, the three lowerings against the recursion, the gate, the driver, bad input.

The DiT is the project's trained one (models/weights/dit_fashion.pt); the second transformer stack (pre-norm
encoder layers from torch.nn, no adaLN) and the CNN have random weights: they test structure only.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.analysis.blocks import NoBlockStack, find_block_stack
from graphopt.analysis.depgraph import DependencyGraph
from graphopt.core.errors import InputError, UsageError
from graphopt.core.model import Model
from graphopt.passes import create
from graphopt.passes.cleanup.cleanup import FoldConstants
from graphopt.passes.taylor_cache import TaylorCache, TaylorCacheSession, ddim_sample
from graphopt.passes.taylor_cache.schedule import Schedule, StepClock, empty_state, forecast, gate_error, refresh

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
from models import dit, dit_sampler  # noqa: E402

CFG = dict(guidance=4.0, null_class=dit.NULL_CLASS)
CLI = [shutil.which("graphopt")] if shutil.which("graphopt") else [sys.executable, "-m", "graphopt.cli"]


def _export(module, args, names, path, dynamic) -> Model:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=["eps"], dynamic_axes=dynamic)
    return graphopt.load(path)


@pytest.fixture(scope="module")
def dit_model(tmp_path_factory) -> Model:
    spec = dit.EXPORT
    args = tuple(torch.zeros(s, dtype=getattr(torch, d)) for s, d in spec["inputs"].values())
    dyn = {n: {0: "batch"} for n in [*spec["inputs"], "eps"]}
    return _export(dit.build(), args, list(spec["inputs"]), tmp_path_factory.mktemp("dit") / "dit.onnx", dyn)


class _Encoder(torch.nn.Module):
    """A differently built denoiser: 8x8 image -> 16 patch tokens, timestep added to every token, three pre-norm
    torch.nn.TransformerEncoderLayer blocks (no gate, no conditioning per block), tokens back to the image."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(4, 32)
        self.temb = torch.nn.Linear(1, 32)
        self.layers = torch.nn.ModuleList([torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True,
                                                                            norm_first=True) for _ in range(3)])
        self.out = torch.nn.Linear(32, 4)
        with torch.no_grad():  # distinct weights everywhere: the exporter would share equal LayerNorm/bias tensors
            for p in self.parameters():
                p.normal_(0, 0.2)

    def forward(self, x, t):
        b = x.shape[0]
        tokens = x.reshape(b, 1, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 4)
        h = self.embed(tokens) + self.temb(t.reshape(b, 1, 1) / 1000.0)
        for layer in self.layers:
            h = layer(h)
        return self.out(h).reshape(b, 1, 8, 8)


@pytest.fixture(scope="module")
def encoder_model(tmp_path_factory) -> Model:
    net = _Encoder().eval()
    args = (torch.zeros(2, 1, 8, 8), torch.zeros(2))
    return _export(net, args, ["x", "t"], tmp_path_factory.mktemp("enc") / "enc.onnx",
                   {"x": {0: "batch"}, "t": {0: "batch"}, "eps": {0: "batch"}})


def _plain(model: Model) -> ort.InferenceSession:
    return ort.InferenceSession(model.to_bytes(), providers=["CPUExecutionProvider"])


def _with_outputs(model: Model, names: list[str]) -> Model:
    """A copy that also outputs `names` (intermediate tensors, to check them)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    proto.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return Model(proto)


# ---------------------------------------------------------------------------------------------- block finding
def test_dit_block_stack(dit_model):
    stack = find_block_stack(DependencyGraph(dit_model))
    assert len(stack.blocks) == dit.DEPTH and stack.period == 2 and stack.unmatched_segments == 0
    assert [s.kind for s in stack.blocks[0].segments] == ["attention", "mlp"]
    assert stack.stream_shape[1:] == (49, dit.HIDDEN)
    assert len(stack.context) == 1  # the conditioning c, read by every block's adaLN modulation
    for b, nxt in zip(stack.blocks, stack.blocks[1:]):
        assert b.output == nxt.input
    # the module targets are the attention / MLP outputs before the gate multiply (not the gated branch)
    seg = stack.blocks[0].segments[0]
    assert seg.module != seg.branch
    assert "6 identical blocks (attention+mlp)" in stack.describe()


def test_second_transformer_stack(encoder_model):
    stack = find_block_stack(DependencyGraph(encoder_model))
    assert len(stack.blocks) == 3 and stack.period == 2
    assert [s.kind for s in stack.blocks[0].segments] == ["attention", "mlp"]
    assert all(s.module == s.branch for b in stack.blocks for s in b.segments)  # no gate to look through
    assert stack.context == ()


def _cnn() -> Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, 8, 8])
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["b"])
    out = helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["b", 1, 8, 8])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 3, 3], np.full(9, 0.1, np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Unsqueeze", ["t", "axes"], ["tu"]),
             helper.make_node("Mul", ["r", "tu4"], ["eps"]),
             helper.make_node("Unsqueeze", ["tu", "axes3"], ["tu4"])]
    g = helper.make_graph([nodes[0], nodes[1], nodes[2], nodes[4], nodes[3]], "cnn", [x, t], [out],
                          [w, helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
                           helper.make_tensor("axes3", TensorProto.INT64, [1], [3])])
    return Model.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def test_no_block_stack_is_refused():
    with pytest.raises(NoBlockStack, match="no residual Add"):
        find_block_stack(DependencyGraph(_cnn()))
    with pytest.raises(InputError, match="needs a stack of repeated transformer blocks"):
        TaylorCache().build(_cnn())
    # lite needs no block stack: it forecasts the output
    assert TaylorCacheSession(TaylorCache(lowering="lite").build(_cnn())).lowering == "lite"


# ---------------------------------------------------------------------------------------------- the recursion
def _taylorseer_reference(values: dict[int, np.ndarray], steps: int, order: int, query: int) -> np.ndarray:
    """TaylorSeer's derivative_approximation / taylor_formula as its reference code writes them (dict of factors,
    activated steps, division by the step distance), for full steps `values` (step -> value) before `query`."""
    factors: dict[int, np.ndarray] = {}
    activated: list[int] = []
    for step in sorted(s for s in values if s <= query):
        activated.append(step)
        new = {0: values[step].astype(np.float64)}
        if len(activated) > 1:
            delta = activated[-1] - activated[-2]
            for i in range(order):
                if i in factors:
                    new[i + 1] = (new[i] - factors[i]) / delta
                else:
                    break
        factors = new
    k = query - activated[-1]
    return sum(f * k ** i / math.factorial(i) for i, f in factors.items())


def test_numpy_recursion_matches_the_reference_formula():
    rng = np.random.default_rng(0)
    sched = Schedule(steps=20, interval=3, order=3, warmup=2, tail=1)
    clock, state, values = StepClock(sched), empty_state(3, 2), {}
    for i in range(sched.steps):
        if sched.forced_full(i):
            values[i] = rng.standard_normal((2, 5)).astype(np.float32) * (1 + i)
            state = refresh(state, values[i], clock.inv_delta(3))
        else:
            np.testing.assert_allclose(forecast(state, clock.coef(3)),
                                       _taylorseer_reference(values, sched.steps, 3, i), rtol=1e-5, atol=1e-5)
        clock.advance(sched.forced_full(i))
    assert clock.history[:2] == [True, True] and clock.history[-1] and sum(clock.history) < sched.steps


def _trajectory_feeds(session, labels, steps=50):
    """The feeds a DDIM trajectory gives `session`, step by step (with guidance: 2B rows)."""
    feeds = []

    class Spy:
        def __init__(self, s):
            self.s = s
            self.schedule = getattr(s, "schedule", None)

        def get_inputs(self):
            return self.s.get_inputs()

        def get_outputs(self):
            return self.s.get_outputs()

        def reset(self):
            if hasattr(self.s, "reset"):
                self.s.reset()

        def run(self, names, feed):
            feeds.append({k: v.copy() for k, v in feed.items()})
            return self.s.run(names, feed)

    x0 = ddim_sample(Spy(session), labels, steps, seed=0, **CFG)
    return feeds, x0


def test_if_lowering_forecast_equals_numpy_and_full_equals_original(dit_model):
    """level=last, order 2, fixed interval: on forecast steps the If's output tensor is exactly the numpy formula
    on the state fed in; on full steps the state output is exactly the numpy refresh and eps equals the original."""
    p = TaylorCache(level="last", order=2, interval=3)
    target = p.plan(dit_model)[1][0].target
    cached = p.build(dit_model)
    onnx.checker.check_model(cached.proto, full_check=True)
    sess = _plain(_with_outputs(cached, [target]))
    orig = _plain(_with_outputs(dit_model, [target]))
    sched, clock = p.schedule(), StepClock(p.schedule())
    driver = TaylorCacheSession(cached)
    feeds, _ = _trajectory_feeds(driver, np.array([1, 7]))
    state = empty_state(2, 3)
    for i, feed in enumerate(feeds):
        full = sched.forced_full(i)
        coef, inv = clock.coef(2), clock.inv_delta(2)
        f = dict(feed, **{"taylor.full": np.array([full]), "taylor.coef": coef, "taylor.inv_delta": inv,
                          "taylor.last": state})
        eps, nxt, did, y = sess.run(["eps", "taylor.last.next", "taylor.did_full", target], f)
        assert bool(did[0]) == full
        if full:
            ref_eps, ref_y = orig.run(["eps", target], feed)
            np.testing.assert_allclose(eps, ref_eps, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(nxt, refresh(state, y, inv))
            np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(y, forecast(state, coef))
            assert nxt.size == 0  # unchanged factors are not copied out
            nxt = state
        state = nxt
        clock.advance(full)
    assert driver.history == [sched.forced_full(i) for i in range(sched.steps)]


@pytest.mark.parametrize("level", ["module", "block"])
def test_if_and_split_agree_step_by_step(dit_model, level):
    """The same schedule through the one-model `if` and the split parts (numpy arithmetic): the same outputs at
    every step, and the full steps of both equal the original model on the same inputs."""
    if_sess = TaylorCacheSession(TaylorCache(level=level, lowering="if").build(dit_model))
    split_sess = TaylorCacheSession(TaylorCache(level=level, lowering="split").build(dit_model))
    orig = _plain(dit_model)
    feeds, _ = _trajectory_feeds(if_sess, np.array([3, 5]))
    if_sess.reset()
    outs = [if_sess.run(["eps"], f)[0] for f in feeds]
    split_sess.reset()
    for f, o in zip(feeds, outs):
        a = split_sess.run(["eps"], f)[0]
        np.testing.assert_allclose(a, o, rtol=1e-4, atol=1e-5)
        if split_sess.history[-1]:
            np.testing.assert_allclose(a, orig.run(["eps"], f)[0], rtol=1e-5, atol=1e-5)
    assert if_sess.history == split_sess.history and 0 < if_sess.full_steps < 50


def test_lite_forecasts_the_output_exactly(dit_model):
    sess = TaylorCacheSession(TaylorCache(lowering="lite", order=1, interval=5).build(dit_model))
    orig = _plain(dit_model)
    feeds, _ = _trajectory_feeds(sess, np.array([2]))
    sess.reset()
    clock, state = StepClock(sess.schedule), empty_state(1, 4)
    for i, f in enumerate(feeds):
        out = sess.run(["eps"], f)[0]
        full = sess.schedule.forced_full(i)
        if full:
            ref = orig.run(["eps"], f)[0]
            np.testing.assert_array_equal(out, ref)
            state = refresh(state, ref, clock.inv_delta(1))
        else:
            np.testing.assert_array_equal(out, forecast(state, clock.coef(1)))
        clock.advance(full)


def test_gate_decisions_match_numpy(dit_model):
    """CG-Taylor: block 0's forecast error decides; first and last steps full; the If and split agree."""
    p = TaylorCache(level="last", threshold=0.05, order=1, gate_order=2)
    stack, regs, gate = p.plan(dit_model)
    sess = TaylorCacheSession(p.build(dit_model))
    feeds, _ = _trajectory_feeds(sess, np.array([0, 4]))
    orig = _plain(_with_outputs(dit_model, [gate]))
    sched, clock, state = sess.schedule, StepClock(sess.schedule), empty_state(2, 3)
    decisions = []
    for i, f in enumerate(feeds):
        y0 = orig.run([gate], f)[0]
        err = gate_error(forecast(state, clock.coef(2)), y0)
        np.testing.assert_allclose(sess.gate_errors[i], err, rtol=1e-4)
        full = sched.forced_full(i) or not err < sched.threshold
        if full:
            state = refresh(state, y0, clock.inv_delta(2))
        decisions.append(full)
        clock.advance(full)
    assert sess.history == decisions
    assert decisions[0] and decisions[-1] and 2 < sum(decisions) < 50
    split = TaylorCacheSession(TaylorCache(level="last", lowering="split", threshold=0.05, order=1,
                                           gate_order=2).build(dit_model))
    for f in feeds:
        split.run(["eps"], f)
    assert split.history == decisions


# ---------------------------------------------------------------------------------------------- the driver
def test_state_shapes_follow_the_dynamic_batch(dit_model):
    cached = TaylorCache(level="module", order=1).build(dit_model)
    states = [i for i in cached.graph.input if i.name.startswith("taylor.block")]
    assert len(states) == 2 * dit.DEPTH
    dims = states[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 2 and all(d.dim_param for d in dims[1:])   # order+1, then symbolic
    sess = TaylorCacheSession(cached)
    for labels in (np.array([1]), np.array([1, 2, 3])):
        ddim_sample(sess, labels, 50, seed=1, **CFG)
        assert sess.states["taylor.block0.attention"].shape == (2, 2 * len(labels), 49, dit.HIDDEN)
    # the driver shows the original model's face only
    assert [a.name for a in sess.get_inputs()] == ["x", "t", "y"]
    assert [a.name for a in sess.get_outputs()] == ["eps"]


def test_ddim_sample_matches_the_reference_sampler_and_the_cache_is_close(dit_model):
    labels = np.array([0, 1, 8, 9])
    plain = _plain(dit_model)
    ours = ddim_sample(plain, labels, 50, seed=2, **CFG)
    ref = dit_sampler.ddim_sample(dit_sampler.onnx_step_fn(plain), labels, steps=50, seed=2, guidance=4.0)
    np.testing.assert_array_equal(ours, ref)
    sess = TaylorCacheSession(TaylorCache(level="module", order=2, interval=4).build(dit_model))
    cached = ddim_sample(sess, labels, 50, seed=2, **CFG)
    err = dit_sampler.relative_error(cached, ours)
    assert sess.full_steps == 14 and np.all(err < 0.1), err


def test_constant_folding_keeps_the_if(dit_model):
    cached = TaylorCache(level="last").build(dit_model)
    folded = FoldConstants().run(cached, graphopt.Context()).model
    assert folded.op_counts()["If"] == 1 == cached.op_counts()["If"]
    assert "taylor.full" in folded.input_names()


def test_bad_input(dit_model):
    for params, message in [({"order": "-1"}, "order must be an integer >= 0"),
                            ({"interval": "0"}, "interval must be an integer >= 1"),
                            ({"warmup": "0"}, "warmup must be an integer >= 1"),
                            ({"level": "layer"}, "level must be one of"),
                            ({"lowering": "lite", "threshold": "0.1"}, "the gate needs block 0"),
                            ({"guidance": "4"}, "guidance needs null_class")]:
        with pytest.raises(UsageError, match=message):
            create("taylor_cache", params)
    sess = TaylorCacheSession(TaylorCache(level="last", steps=10).build(dit_model))
    feed = {"x": np.zeros((2, 1, 28, 28), np.float32), "t": np.full(2, 999, np.float32), "y": np.zeros(2, np.int64)}
    with pytest.raises(UsageError, match="owned by the session"):
        sess.run(None, dict(feed, **{"taylor.last": np.zeros((3, 2, 49, 128), np.float32)}))
    sess.run(None, feed)
    wrong = dict(feed, x=np.zeros((3, 1, 28, 28), np.float32))
    with pytest.raises(UsageError, match="changed shape .* call reset"):
        sess.run(None, wrong)
    for _ in range(9):
        sess.run(None, feed)
    with pytest.raises(UsageError, match="step 11 of a 10-step schedule"):
        sess.run(None, feed)
    with pytest.raises(UsageError, match="schedule has 10 steps"):
        ddim_sample(sess, np.array([1]), 50, **CFG)
    with pytest.raises(InputError, match="not a Taylor-cache model"):
        TaylorCacheSession(dit_model)
    with pytest.raises(UsageError, match="order 3 needs a model built with order=3"):
        TaylorCacheSession(TaylorCache(level="last").build(dit_model), order=3)
    with pytest.raises(UsageError, match="built without the CG-Taylor gate"):
        TaylorCacheSession(TaylorCache(level="last").build(dit_model), threshold=0.1)


# ---------------------------------------------------------------------------------------------- pipeline and CLI
def test_pipeline_verifies_on_trajectories(dit_model, tmp_path):
    rng = np.random.default_rng(0)
    n = 24
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((n, 1, 28, 28)).astype(np.float32),
             t=np.full(n, 999, np.float32), y=(np.arange(n) % 10).astype(np.int64))
    out, report = graphopt.optimize(dit_model, [TaylorCache(level="last", **CFG)], calibration=str(calib),
                                    measure_latency=False)
    assert report.passed, report.violations
    record = report.passes[0]
    assert record.status == "applied" and record.counters["full_steps"] == 14
    assert report.metrics[0].name == "sample"
    assert 0 < report.metrics[0].rel_l2 < 0.15
    assert TaylorCacheSession(out).schedule == TaylorCache(level="last").schedule()


def test_cli_writes_a_cached_model_and_refuses_a_cnn(dit_model, tmp_path):
    src = tmp_path / "dit.onnx"
    dit_model.save(src)
    out = tmp_path / "dit_cached.onnx"
    run = subprocess.run([*CLI, "optimize", str(src), "--pass", "taylor_cache:level=last,guidance=4,null_class=10",
                          "-o", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    onnx.checker.check_model(str(out))
    sess = TaylorCacheSession(out)
    x = ddim_sample(sess, np.array([3]), 50, **CFG)
    assert x.shape == (1, 1, 28, 28) and sess.full_steps == 14
    cnn = tmp_path / "cnn.onnx"
    _cnn().save(cnn)
    bad = subprocess.run([*CLI, "optimize", str(cnn), "--pass", "taylor_cache", "-o", str(tmp_path / "x.onnx")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "needs a stack of repeated transformer blocks" in bad.stderr
    assert not (tmp_path / "x.onnx").exists()
