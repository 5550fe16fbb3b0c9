"""How the pipeline judges a result: the three-way sample split, per-pass bounds, the user's bound, class scores,
a second input size for dynamic dims, the verifier hook, sample-count warnings and the latency shape."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from builders import fvi, init, make
from onnx import helper

import graphopt
from graphopt.core.calibration import InputSet, latency_feed, second_size_feeds, split_samples
from graphopt.core.errors import UsageError
from graphopt.core.model import Model
from graphopt.core.numerics import Tolerance, class_score_outputs
from graphopt.passes import Context, Pass, PassResult, create
from graphopt.passes.base import Verifier
from graphopt.pipeline import Pipeline


def _classifier(batch="N", seed=0):
    """x [N, 8] -> Gemm -> Relu -> Gemm -> logits [N, 5], with a Reshape that a wrong rewrite can break."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["flat"], name="reshape"),
             helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], name="fc2")]
    inits = [init("w1", rng.standard_normal((8, 16)).astype(np.float32)), init("b1", np.zeros(16, np.float32)),
             init("shape", np.array([-1, 16], np.int64)),
             init("w2", rng.standard_normal((16, 5)).astype(np.float32)), init("b2", np.zeros(5, np.float32))]
    proto = make(nodes, [fvi("x", [batch, 8])], [fvi("logits", [batch, 5])], inits)
    proto.graph.node[0].attribute.append(helper.make_attribute("transB", 0))
    return Model(proto)


def _samples(n, rows=1, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows, 8)).astype(np.float32)} for _ in range(n)]


def _ctx(model, n=48, **kw):
    return Context(inputs=split_samples(_samples(n), seed=0), **kw)


def _edit_initializer(model: Model, name: str, fn) -> Model:
    out = model.copy()
    for t in out.graph.initializer:
        if t.name == name:
            t.CopyFrom(onnx.numpy_helper.from_array(fn(onnx.numpy_helper.to_array(t)), name))
    return out


@dataclass(frozen=True)
class Perturb(Pass):
    """Lossy stand-in: multiplies fc2's weight by (1 + noise * N(0, 1)) elementwise, and its output by `scale`."""

    name = "perturb"
    exact = False
    noise: float = 0.1
    scale: float = 1.0

    def run(self, model, ctx):
        rng = np.random.default_rng(0)
        out = _edit_initializer(model, "w2", lambda w: (w * (1 + self.noise * rng.standard_normal(w.shape))
                                                        * self.scale).astype(np.float32))
        out = _edit_initializer(out, "b2", lambda b: (b * self.scale).astype(np.float32))
        return PassResult(out, True)


@dataclass(frozen=True)
class ExactButWrong(Pass):
    """Claims to be exact, changes the output by a relative 1e-3."""

    name = "exact_but_wrong"

    def run(self, model, ctx):
        return PassResult(_edit_initializer(model, "w2", lambda w: (w * 1.001).astype(np.float32)), True)


@dataclass(frozen=True)
class BatchOneReshape(Pass):
    """Exact at batch 1, broken at any other batch: the Reshape's -1 becomes a fixed 1 (what a wrong rewrite of a
    shape constant does)."""

    name = "batch_one_reshape"

    def run(self, model, ctx):
        return PassResult(_edit_initializer(model, "shape", lambda s: np.array([1, 16], np.int64)), True)


def test_the_report_names_the_three_sample_counts():
    model = _classifier()
    _, report = Pipeline([Perturb(noise=0.01)], measure_latency=False).run(model, _ctx(model))
    assert {k: report.inputs[k] for k in ("fit_samples", "selection_samples", "verification_samples")} == \
        {"fit_samples": 20, "selection_samples": 12, "verification_samples": 16}
    assert report.metrics[0].samples == 16 and report.warnings == []


def test_an_exact_pass_keeps_its_strict_bound_in_a_lossy_pipeline():
    model = _classifier()
    _, report = Pipeline([Perturb(noise=0.01), ExactButWrong()], measure_latency=False).run(model, _ctx(model))
    status = {r.name: r for r in report.passes}
    assert status["perturb"].status == "applied"
    assert status["exact_but_wrong"].status == "rolled back" and "relative L2" in status["exact_but_wrong"].reason
    assert status["exact_but_wrong"].tolerance == "relative L2 <= 0.0001"


def test_the_users_bound_is_the_bound_for_a_lossy_pass():
    model = _classifier()
    lossy = Perturb(noise=0.2)
    _, report = Pipeline([lossy], measure_latency=False).run(model, _ctx(model))
    m = report.metrics[0]
    assert report.passes[0].status == "applied" and 0.05 < m.rel_l2 < 0.45 and m.cosine < 0.999
    # a cosine bound the result meets: passes, although its relative L2 is far above the exact default 1e-4
    _, report = Pipeline([lossy], Tolerance(max_rel_l2=None, min_cosine=m.cosine - 0.01),
                         measure_latency=False).run(model, _ctx(model))
    assert report.passes[0].status == "applied" and report.passed
    # a bound it misses: rolled back, and the run fails because every lossy pass asked for was rolled back
    _, report = Pipeline([lossy], Tolerance(max_rel_l2=None, min_cosine=0.99999),
                         measure_latency=False).run(model, _ctx(model))
    assert report.passes[0].status == "rolled back" and "against the original" in report.passes[0].reason
    assert not report.passed and any("every lossy pass" in v for v in report.violations)


def test_top1_agreement_only_for_class_scores():
    model = _classifier()
    assert class_score_outputs(model) == {"logits"}
    renamed = model.copy()
    renamed.graph.output[0].name = "embedding"
    renamed.graph.node[-1].output[0] = "embedding"
    assert class_score_outputs(renamed) == set()
    assert class_score_outputs(renamed, {"embedding": "scores"}) == {"embedding"}
    with pytest.raises(UsageError, match="not model outputs"):
        class_score_outputs(renamed, {"logits": "scores"})
    _, report = Pipeline([Perturb(noise=0.01)], measure_latency=False).run(renamed, _ctx(renamed))
    assert report.metrics[0].top1_agreement is None
    with pytest.raises(UsageError, match="needs a class-score output"):
        Pipeline([Perturb()], Tolerance(max_rel_l2=None, min_top1_agreement=0.9),
                 measure_latency=False).run(renamed, _ctx(renamed))


def test_dynamic_batch_is_verified_at_a_second_size():
    model = _classifier()
    feeds, note = second_size_feeds(model, _samples(4))
    assert feeds[0]["x"].shape == (2, 8) and "x 2x8" in note
    np.testing.assert_array_equal(feeds[0]["x"], np.concatenate([_samples(4)[0]["x"], _samples(4)[1]["x"]]))
    _, report = Pipeline([BatchOneReshape()], measure_latency=False).run(model, _ctx(model))
    assert report.passes[0].status == "rolled back" and "second input size" in report.passes[0].reason
    fixed = _classifier(batch=1)  # a static model has no second size: the same rewrite is exact there
    assert second_size_feeds(fixed, _samples(4))[0] == []
    _, report = Pipeline([BatchOneReshape()], measure_latency=False).run(fixed, _ctx(fixed))
    assert report.passes[0].status == "applied" and report.inputs["second_size"].startswith("none")


def test_token_inputs_get_a_shorter_sequence():
    nodes = [helper.make_node("Cast", ["ids"], ["f"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "mask_f"], ["y"]), helper.make_node("Cast", ["mask"], ["mask_f"],
                                                                                 to=onnx.TensorProto.FLOAT)]
    proto = make(nodes, [fvi("ids", ["B", "S"], onnx.TensorProto.INT64), fvi("mask", ["B", "S"], onnx.TensorProto.INT64)],
                 [fvi("y", ["B", "S"])])
    feeds = [{"ids": np.arange(16, dtype=np.int64).reshape(1, 16), "mask": np.ones((1, 16), np.int64)}] * 2
    resized, _ = second_size_feeds(Model(proto), feeds)
    assert resized[0]["ids"].shape == (2, 12) and resized[0]["mask"].shape == (2, 12)


@dataclass
class CountingVerifier(Verifier):
    """Judges a model by the sum of its outputs over two calls (a stand-in for a sampler trajectory)."""

    name: str = "sum of two calls"
    calls: int = 0

    def outputs(self, model, feeds, ctx):
        self.calls += 1
        first = super().outputs(model, feeds, ctx)
        return [{"total": 2 * o["logits"]} for o in first]


_VERIFIER = CountingVerifier()


@dataclass(frozen=True)
class PerturbWithVerifier(Perturb):
    name = "perturb_with_verifier"

    def verifier(self):
        return _VERIFIER


def test_a_pass_can_bring_its_own_verifier():
    model = _classifier()
    _VERIFIER.calls = 0
    _, report = Pipeline([PerturbWithVerifier(noise=0.01)], measure_latency=False).run(model, _ctx(model))
    assert report.passes[0].status == "applied"
    for metrics in (report.passes[0].metrics, report.metrics):  # the verifier's outputs, at both input sizes
        assert [m.name for m in metrics] == ["total", "total @ x 2x8"]
    assert _VERIFIER.calls >= 4  # per pass: its input and its result; final: the original and the result


def test_few_samples_warn_and_one_sample_is_refused_for_lossy_runs():
    model = _classifier()
    one = Context(inputs=split_samples(_samples(1)))
    with pytest.raises(UsageError, match="--allow-few-samples"):
        Pipeline([Perturb(noise=0.01)], measure_latency=False).run(model, one)
    _, report = Pipeline([Perturb(noise=0.01)], measure_latency=False, allow_few_samples=True).run(model, one)
    assert any("one input sample" in w for w in report.warnings)
    _, report = Pipeline([create("remove_dead")], measure_latency=False).run(model, one)  # exact: no objection
    assert report.warnings == []
    _, report = Pipeline([Perturb(noise=0.01)], measure_latency=False).run(model, _ctx(model, n=12))
    assert any("fewer than 16" in w for w in report.warnings)


def test_latency_is_measured_at_one_stated_shape():
    model = _classifier()
    samples = _samples(6)
    feed = latency_feed(model, samples, batch=4)
    np.testing.assert_array_equal(feed["x"], np.concatenate([s["x"] for s in samples[:4]]))
    assert latency_feed(model, samples, shapes={"x": (3, 8)})["x"].shape == (3, 8)
    with pytest.raises(UsageError, match="does not fit"):
        latency_feed(model, samples, shapes={"x": (3, 9)})
    assert latency_feed(_classifier(batch=1), samples, batch=4)["x"].shape == (1, 8)  # a fixed batch stays
    _, report = Pipeline([create("remove_dead")]).run(model, _ctx(model, latency_batch=4))
    assert report.latency_shape == {"x": [4, 8]} and report.latency_before.runs >= 5


class _Untouchable(list):
    """A verification list that fails the test when a pass reads it."""

    def _fail(self, *a, **k):
        raise AssertionError("a pass read the verification samples")

    __iter__ = __getitem__ = __len__ = __bool__ = _fail


@pytest.mark.parametrize("spec", ["qdq:min_agreement=0.9,sensitivity_samples=4",
                                  "prune:ratio=0.3,importance=distortion",
                                  "lowrank:param_ratio=0.8"])
def test_no_pass_reads_the_verification_samples(spec):
    rng = np.random.default_rng(2)
    model = _classifier()
    w = rng.standard_normal((16, 16)).astype(np.float32)  # a second hidden layer, so prune has a free group
    g = model.graph
    g.node[2].output[0] = "flat0"
    g.node.insert(3, helper.make_node("MatMul", ["flat0", "w_mid"], ["flat"], name="mid"))
    g.initializer.append(init("w_mid", w))
    inputs = split_samples(_samples(48, rows=4), seed=0)
    guarded = InputSet(fit=inputs.fit, selection=inputs.selection, verification=_Untouchable())
    ctx = Context(inputs=guarded, runtime=graphopt.RuntimeSettings(intra_op_threads=1))
    from graphopt.passes.base import parse_pass_spec

    result = create(*parse_pass_spec(spec)).run(model, ctx)
    if spec.startswith("qdq"):  # on this tiny model float is the fastest: the search ran, on selection samples
        assert result.details["frontier"], "the accuracy search measured candidates (reading verification raises)"
    else:
        assert result.changed


def test_cli_a_users_bound_replaces_the_exact_default_and_a_rolled_back_lossy_run_exits_1(tmp_path):
    """`prune:ratio=0.5 --min-cosine 0.95` on the bundled model: cosine ~0.97, relative L2 ~0.25: applied, exit 0
    (it used to be rolled back for relative L2 > 1e-4 and still say "verification passed"). With a bound it
    misses, the only lossy pass is rolled back and the run exits 1 without writing."""
    import subprocess
    from pathlib import Path

    examples = Path(__file__).resolve().parent.parent / "examples"
    base = ["graphopt", "optimize", str(examples / "fashion_cnn.onnx"), "--pass", "prune:ratio=0.5",
            "--calib", str(examples / "fashion_test.npz"), "--no-latency", "-q"]
    out = tmp_path / "p.onnx"
    ok = subprocess.run(base + ["--min-cosine", "0.95", "-o", str(out), "--report", str(tmp_path / "r.json")],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    import json

    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passes"][0]["status"] == "applied" and data["tolerance"]["max_rel_l2"] is None
    assert data["verification"]["metrics"][0]["rel_l2"] > 1e-4 and out.exists()
    missed = subprocess.run(base + ["--min-cosine", "0.9999", "-o", str(tmp_path / "q.onnx")],
                            capture_output=True, text=True, timeout=300)
    assert missed.returncode == 1 and "every lossy pass asked for was rolled back" in missed.stderr
    assert not (tmp_path / "q.onnx").exists()
