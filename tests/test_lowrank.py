"""Low-rank factorization: exact at full rank, conv geometry, whitening beats plain SVD on correlated inputs,
break-even and latency refusals, budgets, CLI exit codes, and lowrank -> qdq in one verified pipeline."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import fashion_split, fvi, init, make, run_ort
from onnx import helper

import graphopt
from graphopt.analysis.allocate import BudgetInfeasible
from graphopt.core.calibration import InputSet
from graphopt.core.conv import conv_pads, patches
from graphopt.passes.lowrank.factorize import breakeven_rank, conv_matrix, decompose, max_useful_rank
from graphopt.passes.lowrank.rewrite import collect_grams, find_sites, rewrite, weight_matrix
from graphopt.core.model import Model
from graphopt.passes import Context, create
from graphopt.passes.lowrank import lowrank as lowrank_pass
from graphopt.core.runtime import Latency

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def randn(*shape, scale=1.0, rng: np.random.Generator | int = 6):
    """Standard-normal float32 values from `rng` (a Generator, or a seed): give each test its own Generator, so
    that successive calls differ and no test's numbers depend on which tests ran before."""
    return (np.random.default_rng(rng).standard_normal(shape) * scale).astype(np.float32)


_MIX: dict[int, np.ndarray] = {}


def correlated(n_rows: int, n: int, decay: float = 0.85, rng: np.random.Generator | int = 6) -> np.ndarray:
    """Rows whose features are strongly correlated, with a few large-variance directions (like activations);
    one fixed mixing per width, so later calls with the same Generator draw more rows from the same
    distribution (a seed draws the same rows every time)."""
    mix = _MIX.setdefault(n, np.random.default_rng(n).standard_normal((n, n)) * decay ** np.arange(n)[:, None])
    return (np.random.default_rng(rng).standard_normal((n_rows, n)) @ mix).astype(np.float32)


def ctx_for(samples, synthetic=False):
    return Context(inputs=InputSet(fit=samples, selection=[], verification=samples, synthetic=synthetic))


def full_rank_factors(model: Model, sites):
    out = {}
    for s in sites:
        if s.reason:
            continue
        spectrum = decompose(weight_matrix(model, s), "svd")
        out[s.node] = spectrum.factors(spectrum.full_rank)
    return out


# ------------------------------------------------------------------------------------------------- the math
@pytest.mark.parametrize("method,refit", [("svd", False), ("svd", True), ("whitened", False), ("whitened", True)])
def test_full_rank_reconstructs_the_weight_exactly(method, refit):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 40))
    x = correlated(500, 24, rng=rng)
    spectrum = decompose(w, method, x.T.astype(np.float64) @ x, refit=refit)
    a, b = spectrum.factors(spectrum.full_rank)
    np.testing.assert_allclose(a.astype(np.float64) @ b, w, rtol=1e-5, atol=1e-5)
    assert spectrum.errors([spectrum.full_rank])[spectrum.full_rank] < 1e-10
    assert spectrum.energy(spectrum.full_rank) == pytest.approx(1.0)


def test_closed_form_errors_match_the_direct_computation():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 16))
    x = correlated(800, 32, rng=rng).astype(np.float64)
    for method, refit in (("svd", False), ("svd", True), ("whitened", False)):
        spectrum = decompose(w, method, x.T @ x, refit=refit, damping=1e-3)
        for r, err in spectrum.errors([3, 8]).items():
            a, b = spectrum.factors(r)
            direct = np.sum((x @ w - x @ a.astype(np.float64) @ b) ** 2) / np.sum((x @ w) ** 2)
            assert err == pytest.approx(direct, rel=1e-3)


def test_whitened_svd_beats_plain_svd_on_correlated_inputs():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 64))
    x = correlated(4000, 64, rng=rng).astype(np.float64)
    cov = x.T @ x
    plain = decompose(w, "svd", cov).errors([8, 16])
    white = decompose(w, "whitened", cov, damping=1e-4).errors([8, 16])
    refit = decompose(w, "svd", cov, refit=True).errors([8, 16])
    for r in (8, 16):
        assert white[r] < 0.5 * plain[r], (r, white[r], plain[r])
        assert refit[r] < plain[r]
    # held-out rows from the same distribution agree (the whitening is not overfitting the calibration rows)
    held = correlated(2000, 64, rng=rng).astype(np.float64)
    errs = {}
    for method in ("svd", "whitened"):
        a, b = decompose(w, method, cov, damping=1e-4).factors(8)
        errs[method] = np.sum((held @ w - held @ a.astype(np.float64) @ b) ** 2) / np.sum((held @ w) ** 2)
    assert errs["whitened"] < 0.5 * errs["svd"]


def test_break_even_rank():
    assert breakeven_rank(384, 384) == 192 and max_useful_rank(384, 384) == 191
    assert breakeven_rank(3 * 3 * 64, 128) == pytest.approx(576 * 128 / 704)
    assert max_useful_rank(1, 8) == 0  # 8/9: nothing pays


# ------------------------------------------------------------------------------------------- conv geometry
@pytest.mark.parametrize("attrs", [
    {"strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"strides": [1, 2], "pads": [0, 2, 1, 0], "dilations": [2, 1]},
    {"strides": [2, 1], "auto_pad": "SAME_UPPER"},  # ORT refuses dilation with SAME_*
    {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    {"auto_pad": "VALID", "dilations": [1, 3]},
])
def test_conv_factorization_keeps_stride_padding_and_dilation(attrs):
    rng = np.random.default_rng(4)
    w, bias = randn(12, 5, 3, 3, rng=rng), randn(12, rng=rng)
    x = randn(2, 5, 11, 10, rng=rng)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], **attrs)
    model = Model(make([node], [fvi("x", [2, 5, 11, 10])], [fvi("y", None)], [init("w", w), init("b", bias)]))
    ref = run_ort(model.proto, {"x": x})[0]
    # im2col with the same geometry reproduces the conv
    pads = conv_pads(x.shape[2:], (3, 3), attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1]),
                     attrs.get("pads"), attrs.get("auto_pad", "NOTSET"))
    cols = patches(x, (3, 3), attrs.get("strides", [1, 1]), pads, attrs.get("dilations", [1, 1]))
    n, c, ho, wo = ref.shape
    via_patches = (cols @ conv_matrix(w) + bias).reshape(n, ho, wo, c).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(via_patches, ref, rtol=1e-4, atol=1e-4)
    # full rank: the k×k conv with r filters + 1×1 conv computes the same thing
    sites = find_sites(model)
    new = rewrite(model, sites, full_rank_factors(model, sites))
    assert [n.op_type for n in new.graph.node] == ["Conv", "Conv"]
    first, second = new.graph.node
    assert {a.name: helper.get_attribute_value(a) for a in second.attribute}["kernel_shape"] == [1, 1]
    assert list(second.input)[2] == "b", "the bias moves to the 1x1 conv"
    np.testing.assert_allclose(run_ort(new.proto, {"x": x})[0], ref, rtol=1e-4, atol=1e-4)


def test_matmul_both_orientations_and_gemm_with_transb_alpha_beta_are_exact_at_full_rank():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm_right"),
             helper.make_node("Gemm", ["h1", "w2", "c2"], ["h2"], name="gemm", transB=1, alpha=0.7, beta=1.3),
             helper.make_node("Reshape", ["h2", "shape"], ["h3"], name="reshape"),
             helper.make_node("MatMul", ["w3", "h3"], ["y"], name="mm_left")]
    rng = np.random.default_rng(5)
    inits = [init("w1", randn(16, 12, rng=rng)), init("w2", randn(10, 12, rng=rng)), init("c2", randn(10, rng=rng)),
             init("shape", np.array([5, 8], np.int64)), init("w3", randn(7, 5, rng=rng))]
    model = Model(make(nodes, [fvi("x", [4, 16])], [fvi("y", [7, 8])], inits))
    sites = find_sites(model)
    assert {s.node: (s.n_in, s.n_out, s.weight_first) for s in sites} == {
        "mm_right": (16, 12, False), "gemm": (12, 10, False), "mm_left": (5, 7, True)}
    x = randn(4, 16, rng=rng)
    new = rewrite(model, sites, full_rank_factors(model, sites))
    assert len(new.graph.node) == 7 and "w1" not in new.initializers()
    np.testing.assert_allclose(run_ort(new.proto, {"x": x})[0], run_ort(model.proto, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)


def test_refused_sites_say_why():
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="grouped", group=2, kernel_shape=[3, 3]),
             helper.make_node("Flatten", ["a"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2"], ["g"], name="trans_a_gemm", transA=1),
             helper.make_node("MatMul", ["f", "shared"], ["m1"], name="shared1"),
             helper.make_node("MatMul", ["f", "shared"], ["m2"], name="shared2"),
             helper.make_node("MatMul", ["f", "wi"], ["m3"], name="weight_input")]
    rng = np.random.default_rng(7)
    inits = [init("w", randn(4, 2, 3, 3, rng=rng)), init("w2", randn(2, 3, rng=rng)),
             init("shared", randn(36, 3, rng=rng))]
    model = Model(make(nodes, [fvi("x", [2, 4, 5, 5]), fvi("wi", [36, 3])],
                       [fvi(n, None) for n in ("g", "m1", "m2", "m3")], inits))
    reasons = {s.node: s.reason for s in find_sites(model)}
    assert "grouped" in reasons["grouped"] and "transA" in reasons["trans_a_gemm"]
    assert "shared" in reasons["shared1"] and "constant initializer" in reasons["weight_input"]


# ------------------------------------------------------------------------------------------------- the pass
def mlp(n_in=96, hidden=96, n_out=48, seed: int = 8):
    """x -> MatMul -> Relu -> Gemm(transB) -> y; weights with a decaying spectrum (random: structure only)."""
    rng = np.random.default_rng(seed)

    def lowish(m, n):
        return (rng.standard_normal((m, n)) * 0.9 ** np.arange(n)).astype(np.float32) @ \
            np.linalg.qr(rng.standard_normal((n, n)))[0].astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)]
    inits = [init("w1", lowish(n_in, hidden)), init("w2", lowish(n_out, hidden)), init("b2", randn(n_out, rng=rng))]
    return Model(make(nodes, [fvi("x", ["n", n_in])], [fvi("y", ["n", n_out])], inits))


def mlp_samples(n=12, rows=64, n_in=96, seed: int = 9):
    rng = np.random.default_rng(seed)
    return [{"x": correlated(rows, n_in, rng=rng)} for _ in range(n)]


def test_fixed_rank_and_break_even_refusal():
    model, samples = mlp(n_in=96, hidden=96, n_out=8), mlp_samples()
    result = create("lowrank", {"rank": "40", "method": "svd"}).run(model, ctx_for(samples))
    actions = {d.site: (d.action, d.reason) for d in result.decisions}
    assert actions["fc1"][0] == "factorized" and "rank 40 of 96" in actions["fc1"][1]
    assert actions["fc2"][0] == "skipped" and "break-even rank 7.4" in actions["fc2"][1]  # 96·8/104
    assert (result.counters["params_before"], result.counters["params_after"]) == (96 * 104, 40 * 192 + 96 * 8)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["MatMul", "MatMul", "Relu", "Gemm"]


def test_whitened_pass_beats_plain_svd_in_measured_output_distortion():
    model, samples, held = mlp(), mlp_samples(), mlp_samples(4, seed=10)  # the pass reads `samples` only
    ref = [run_ort(model.proto, f)[0] for f in held]
    got, held_err = {}, {}
    for method in ("svd", "whitened"):
        r = create("lowrank", {"rank_ratio": "0.15", "method": method}).run(model, ctx_for(samples))
        got[method] = r.counters["measured_distortion"]
        new = [run_ort(r.model.proto, f)[0] for f in held]
        num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(ref, new))
        held_err[method] = num / sum(float(np.sum(a ** 2)) for a in ref)
    assert got["whitened"] < 0.5 * got["svd"], got
    assert held_err["whitened"] < 0.5 * held_err["svd"], held_err  # and on rows it did not fit on


def test_param_budget_is_met_and_out_of_reach_budget_reports_the_best_figure():
    model, samples = mlp(), mlp_samples()
    result = create("lowrank", {"param_ratio": "0.6"}).run(model, ctx_for(samples))
    assert result.counters["params_after"] <= 0.6 * result.counters["params_before"]
    assert all("distortion" in row for row in result.details["sites"] if row["rank"])
    with pytest.raises(BudgetInfeasible, match="smallest reachable"):
        create("lowrank", {"param_ratio": "0.01"}).run(model, ctx_for(samples))


def _fake_timer(slow_sites: set[str]):
    """measure_latencies stand-in: a factorized micro-model of a slow site times 2x its original."""
    def fake(sessions, feed, **kw):
        out = []
        for i, s in enumerate(sessions):
            inputs = [i.name for i in s.get_inputs()]
            factorized = i > 0
            ms = 1.0
            if factorized and inputs == ["x"]:
                slow = any(o for o in slow_sites if feed["x"].shape[-1] == o)
                ms = 2.0 if slow else 0.5
            out.append(Latency(ms, ms, ms, 10, 1))
        return out
    return fake


def test_factorizations_measured_slower_are_refused_with_the_timings(monkeypatch):
    model, samples = mlp(n_in=80), mlp_samples(n_in=80)
    monkeypatch.setattr(lowrank_pass, "measure_latencies", _fake_timer({80}))  # fc1 reads 80 features
    result = create("lowrank", {"rank": "16", "require_faster": "true"}).run(model, ctx_for(samples))
    decisions = {d.site: d for d in result.decisions}
    assert decisions["fc1"].action == "kept"
    assert "slower than the original" in decisions["fc1"].reason
    assert "rank 16 measured 2.0000 ms vs original 1.0000 ms" in decisions["fc1"].reason
    assert decisions["fc2"].action == "factorized"


def test_target_speedup_out_of_reach_reports_the_best_reachable_speedup():
    model, samples = mlp(), mlp_samples()
    with pytest.raises(BudgetInfeasible, match=r"at most .* ms, a predicted .*x"):
        create("lowrank", {"target_speedup": "50"}).run(model, ctx_for(samples))


@pytest.mark.parametrize("params,match", [
    ({"method": "tucker"}, "method must be one of"), ({"rank": "0"}, "rank must be"),
    ({"rank_ratio": "1.5"}, "rank_ratio"), ({"param_ratio": "0"}, "param_ratio"), ({"energy": "2"}, "energy"),
    ({"rank": "8", "param_ratio": "0.5"}, "one budget"), ({"candidates": "0"}, "candidates"),
])
def test_invalid_parameters_are_usage_errors(params, match):
    with pytest.raises(graphopt.UsageError, match=match):
        create("lowrank", params)


def test_whitening_needs_real_calibration_data():
    model = mlp()
    with pytest.raises(graphopt.UsageError, match="real calibration data"):
        create("lowrank", {"rank": "8"}).run(model, ctx_for(mlp_samples(2), synthetic=True))
    # plain SVD at a fixed rank runs on synthetic inputs
    result = create("lowrank", {"rank": "8", "method": "svd"}).run(model, ctx_for(mlp_samples(2), synthetic=True))
    assert result.changed


def test_gram_matrices_are_shared_and_streamed():
    model = mlp()
    sites = [s for s in find_sites(model) if not s.reason]
    samples = mlp_samples(5, rows=7)
    grams, first = collect_grams(model, sites, samples)
    x = np.concatenate([s["x"] for s in samples]).astype(np.float64)
    key = next(s.gram_key() for s in sites if s.node == "fc1")
    np.testing.assert_allclose(grams[key].xtx, x.T @ x, rtol=1e-6)
    assert grams[key].rows == 35 and first["x"].shape == (7, 96)
    # the timing feed's activations are captured (intermediate ones too) and not counted in the Gram matrices
    timing = {"x": correlated(3, 96)}
    grams, first = collect_grams(model, sites, samples, timing_feed=timing)
    np.testing.assert_allclose(grams[key].xtx, x.T @ x, rtol=1e-6)
    assert grams[key].rows == 35 and np.array_equal(first["x"], timing["x"])
    w1 = onnx.numpy_helper.to_array(model.initializers()["w1"])
    np.testing.assert_allclose(first["r"], np.maximum(timing["x"] @ w1, 0), rtol=1e-4, atol=1e-4)
    assert grams[next(s.gram_key() for s in sites if s.node == "fc2")].rows == 35


# ---------------------------------------------------------------------------------------- real model, CLI
def _cli(*args, timeout=300):
    exe = shutil.which("graphopt")
    cmd = [exe] if exe else [sys.executable, "-m", "graphopt.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout)


def test_cli_exit_codes(tmp_path):
    out = tmp_path / "m.onnx"
    common = ["optimize", str(EXAMPLES / "fashion_cnn.onnx"), "-o", str(out), "-q", "--no-latency",
              "--calib", str(EXAMPLES / "fashion_test.npz")]
    bad = _cli(*common, "--pass", "lowrank:method=cp")
    assert bad.returncode == 2 and "method must be one of" in bad.stderr and "Traceback" not in bad.stderr
    bad = _cli(*common, "--pass", "lowrank:rank=-3")
    assert bad.returncode == 2 and "rank must be" in bad.stderr
    far = _cli(*common, "--pass", "lowrank:param_ratio=0.01,calibration_samples=8")
    assert far.returncode == 1 and "budget out of reach" in far.stderr and "smallest reachable" in far.stderr
    assert len(far.stderr.strip().splitlines()) == 1 and not out.exists()


def test_lowrank_then_qdq_on_the_bundled_model_is_verified(tmp_path):
    import json

    from graphopt.passes.qdq.sites import find_sites as qdq_sites
    from graphopt.core.runtime import make_session

    model = graphopt.load(EXAMPLES / "fashion_cnn.onnx")
    inputs, images, labels = fashion_split()  # scored below on the held-out images only, which no pass reads
    lowrank = create("lowrank", {"param_ratio": "0.8", "calibration_samples": "16"})
    # qdq's own choice depends on timings (a loaded machine can make int8 look slower); force every site of the
    # factorized model to int8 so the test checks the composition, not the machine's load.
    dry = lowrank.run(model, Context(inputs=inputs))
    overrides = tmp_path / "int8.json"
    overrides.write_text(json.dumps({s.node: "int8" for s in qdq_sites(dry.model) if not s.reason}))
    qdq = create("qdq", {"calibration_samples": "16", "sensitivity_samples": "8", "overrides": str(overrides)})
    optimized, report = graphopt.Pipeline([lowrank, qdq], measure_latency=False).run(model, Context(inputs=inputs))
    assert [(r.name, r.status) for r in report.passes] == [("lowrank", "applied"), ("qdq", "applied")], \
        [(r.name, r.status, r.reason) for r in report.passes]
    assert report.passed
    assert any("lowrank" in n.name for n in optimized.graph.node)
    assert any(n.op_type == "QuantizeLinear" for n in optimized.graph.node)
    assert report.metrics[0].samples == len(images), "the pipeline verified on the held-out images"
    ref = make_session(model).run(None, {"image": images})[0].argmax(1)
    new = make_session(optimized).run(None, {"image": images})[0].argmax(1)
    assert (new == ref).mean() >= 0.95 and (new == labels).mean() >= (ref == labels).mean() - 0.03


def test_gemm_below_opset_11_rewrites_to_a_valid_model():
    """C was a required Gemm input before opset 11: the C-less first half of the rewrite must not be a Gemm."""
    rng = np.random.default_rng(31)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0)
    inits = [init("w", rng.standard_normal((10, 12)).astype(np.float32)),
             init("c", rng.standard_normal(10).astype(np.float32))]
    model = Model(make([node], [fvi("x", [4, 12])], [fvi("y", [4, 10])], inits, opset=9, ir_version=4))
    sites = find_sites(model)
    new = rewrite(model, sites, full_rank_factors(model, sites))
    onnx.checker.check_model(new.proto, full_check=True)
    x = rng.standard_normal((4, 12)).astype(np.float32)
    np.testing.assert_allclose(run_ort(new.proto, {"x": x})[0], run_ort(model.proto, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)
