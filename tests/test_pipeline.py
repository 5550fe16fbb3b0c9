"""The verified pipeline: passes run in order, broken results are rolled back with the reason, recipes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from builders import bn_inits, bn_node, fvi, init, make
from onnx import helper

import graphopt
from graphopt.core.errors import UsageError, VerificationError
from graphopt.core.model import Model
from graphopt.passes import Context, Pass, PassResult, create
from graphopt.pipeline import Pipeline
from graphopt.recipe import load_recipe


def _model(seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             bn_node("bn", "c", "b"), helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    return Model(make(nodes, [fvi("x", [1, 3, 8, 8])], [fvi("y", [1, 4])], [init("w", w)] + bn_inits("bn", 4, rng)))


@dataclass(frozen=True)
class ScaleOutput(Pass):
    """Deliberately wrong: multiplies the first output by a factor."""

    name = "scale_output"
    factor: float = 2.0

    def run(self, model, ctx):
        out = model.copy()
        g = out.graph
        y = g.output[0].name
        for n in g.node:
            for i, o in enumerate(n.output):
                if o == y:
                    n.output[i] = "pre_scale"
        g.initializer.append(onnx.numpy_helper.from_array(np.array(self.factor, np.float32), "factor"))
        g.node.append(helper.make_node("Mul", ["pre_scale", "factor"], [y], name="scale"))
        return PassResult(out, True, {"scaled": 1})


@dataclass(frozen=True)
class Crash(Pass):
    name = "crash"

    def run(self, model, ctx):
        raise RuntimeError("boom")


@dataclass(frozen=True)
class Invalid(Pass):
    name = "invalid"

    def run(self, model, ctx):
        out = model.copy()
        out.graph.node.append(helper.make_node("Relu", ["no_such_tensor"], ["z"], name="dangling"))
        out.graph.output.append(fvi("z", [1]))
        return PassResult(out, True)


def _ctx(model):
    from graphopt.core.calibration import prepare_inputs

    return Context(inputs=prepare_inputs(model, None, synthetic_count=6))


def test_broken_passes_are_rolled_back_with_the_reason_and_good_ones_kept():
    model = _model()
    passes = [ScaleOutput(), Crash(), Invalid(), create("fold_batchnorm")]
    optimized, report = Pipeline(passes, measure_latency=False).run(model, _ctx(model))
    status = {r.name: (r.status, r.reason) for r in report.passes}
    assert status["scale_output"][0] == "rolled back" and "relative L2" in status["scale_output"][1]
    assert status["crash"] == ("rolled back", "pass raised RuntimeError: boom")
    assert status["invalid"][0] == "rolled back" and "checker" in status["invalid"][1]
    assert status["fold_batchnorm"][0] == "applied"
    assert report.passed and [n.op_type for n in optimized.graph.node] == ["Conv", "Relu", "GlobalAveragePool",
                                                                           "Flatten"]
    record = [p for p in optimized.proto.metadata_props if p.key == "graphopt"][0].value
    assert "fold_batchnorm" in record and "scale_output" not in record


def test_strict_mode_fails_instead_of_rolling_back():
    model = _model()
    with pytest.raises(VerificationError, match="scale_output"):
        Pipeline([ScaleOutput()], measure_latency=False, strict=True).run(model, _ctx(model))


@dataclass(frozen=True)
class LossyScale(ScaleOutput):
    name = "lossy_scale"
    exact = False


def test_a_loose_user_bound_accepts_a_lossy_change_but_the_guard_sees_a_scale_error():
    model = _model()
    tol = graphopt.Tolerance(max_rel_l2=None, min_cosine=0.99)
    _, report = Pipeline([LossyScale(factor=1.05)], tolerance=tol, measure_latency=False).run(model, _ctx(model))
    assert report.passes[0].status == "applied" and report.passed
    assert report.metrics[0].rel_l2 == pytest.approx(0.05, rel=1e-4)
    # cosine is 1 for any scale: the lossy guard's relative L2 bound is what rolls a 1.5x error back
    _, report = Pipeline([LossyScale(factor=1.5)], tolerance=tol, measure_latency=False).run(model, _ctx(model))
    assert report.passes[0].status == "rolled back" and "relative L2 error 0.5" in report.passes[0].reason


def test_python_api_defaults_to_the_cleanup_recipe_and_measures_latency(tmp_path):
    model = _model()
    optimized, report = graphopt.optimize(model)
    assert [p.name for p in report.passes] == list(graphopt.DEFAULT_RECIPE)
    assert report.passed
    before, after = report.latency_before, report.latency_after
    # timed in interleaved rounds: both records hold the same number of runs
    assert before.runs == after.runs >= 5
    for lat in (before, after):
        assert lat.median_ms <= lat.p90_ms and lat.threads == graphopt.RuntimeSettings().intra_op_threads
    assert report.speedup == pytest.approx(before.median_ms / after.median_ms)
    assert report.latency_shape == {"x": [1, 3, 8, 8]}
    assert report.before.op_counts["BatchNormalization"] == 1 and "BatchNormalization" not in report.after.op_counts
    assert report.inputs["synthetic"] is True
    report.write_json(tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text().startswith("{")


def test_recipe_files(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[verify]\nmax_error = 1e-3\n\n[[pass]]\nname = "fold_batchnorm"\n\n[[pass]]\n'
                    'name = "remove_dead"\n')
    passes, tol = load_recipe(good)
    assert [p.name for p in passes] == ["fold_batchnorm", "remove_dead"] and tol == {"max_rel_l2": 1e-3}
    for text, match in [('[[pass]]\nname = "nope"\n', "unknown pass 'nope'"),
                        ('[[pass]]\nname = "remove_dead"\nratio = 0.5\n', "no parameter ratio"),
                        ('[[pass]]\nname = \n', "not valid TOML"),
                        ('[verify]\nmax_err = 1\n[[pass]]\nname = "remove_dead"\n', "unknown \\[verify\\]")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(UsageError, match=match):
            load_recipe(bad)
