"""qdq's menu per site: a transformer gets dynamic int8 by default, GPTQ rounding beats nearest where it must, and a
budget no menu meets names the best assignment."""

from __future__ import annotations

import numpy as np
import pytest
from builders import bert_like, torch_export

import graphopt
from graphopt.analysis.allocate import BudgetInfeasible
from graphopt.core.calibration import split_samples
from graphopt.core.model import Model
from graphopt.core.runtime import Latency
from graphopt.passes import Context, create
from graphopt.passes.cleanup.cleanup import FoldConstants, RemoveIdentity
from graphopt.passes.qdq.gptq import INT4, INT8, gptq_round
from graphopt.passes.qdq.int4 import block_scales, blocked_int4, expand_scales


@pytest.fixture(scope="module")
def encoder() -> tuple[Model, list[dict]]:
    """The BERT-style test encoder (random weights: this is about the allocation, not fidelity) with one hidden
    channel of every LayerNorm scaled up 40x: the outlier features of trained transformers, which a calibrated
    static scale must cover on every call."""
    import torch

    module = bert_like(hidden=64, layers=1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight[3] *= 40.0
    ids = np.zeros((1, 12), np.int64)
    proto = torch_export(module, (torch.tensor(ids), torch.ones(1, 12, dtype=torch.int64)),
                         ["input_ids", "attention_mask"], ["embedding"],
                         {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
    model = Model.from_proto(proto)
    for p in (RemoveIdentity(), FoldConstants()):
        model = p.run(model, Context()).model
    rng = np.random.default_rng(3)
    samples = [{"input_ids": rng.integers(0, 100, (2, 12)).astype(np.int64),
                "attention_mask": np.ones((2, 12), np.int64)} for _ in range(24)]
    return model, samples


def _float_sites_timer(monkeypatch):
    """Deterministic latencies: each MatMul/Gemm still multiplying a float weight costs 1, any quantized form 0.5
    (so the static and dynamic all-int8 models tie, and the choice between them is the distortion's)."""
    from graphopt.passes.qdq import qdq as qdq_module

    real = qdq_module.make_session

    def tagged(m, settings=None):
        session = real(m, settings)
        weights = {t.name for t in m.graph.initializer if t.data_type == 1}
        quantized = set(m.initializers()) | {n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
        ops = [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm", "MatMulInteger", "MatMulNBits")]
        session.fake_ms = 1.0 + sum(1.0 if n.input[1] in weights else 0.5 for n in ops if n.input[1] in quantized)
        return session

    def timer(sessions, feed, **kw):
        return [Latency(s.fake_ms, s.fake_ms, s.fake_ms, 10, 1) for s in sessions]

    monkeypatch.setattr(qdq_module, "make_session", tagged)
    monkeypatch.setattr(qdq_module, "measure_latencies", timer)


def test_a_transformer_gets_dynamic_int8_by_default(monkeypatch, encoder):
    _float_sites_timer(monkeypatch)
    model, samples = encoder
    result = create("qdq", {"calibration_samples": "16", "sensitivity_samples": "8", "int4": "false",
                            "latency_slack": "0.0001"}).run(model, Context(inputs=split_samples(samples)))
    forms = {d.site: d.action for d in result.decisions if d.site != "model" and d.action != "skipped"}
    assert set(forms.values()) <= {"int8", "int8-dynamic"}, forms
    assert sum(f == "int8-dynamic" for f in forms.values()) > len(forms) / 2, forms
    # every site took its less sensitive int8 form: the forms tie on latency, so distortion decides
    for d in result.decisions:
        if d.action in ("int8", "int8-dynamic"):
            sens = dict(part.split() for part in d.reason.split(";")[0].removeprefix("sensitivity ").split(", "))
            assert float(sens[d.action]) == min(float(v) for v in sens.values()), d
    # "activations" is a restriction: static only gives no dynamic site, and a measurably worse model
    static = create("qdq", {"calibration_samples": "16", "sensitivity_samples": "8", "int4": "false",
                            "activations": "static", "latency_slack": "0.0001"}).run(
        model, Context(inputs=split_samples(samples)))
    assert "int8-dynamic" not in {d.action for d in static.decisions}
    assert result.counters["measured_distortion"] < static.counters["measured_distortion"]


def test_a_latency_budget_no_menu_meets_names_the_best_assignment(monkeypatch, encoder):
    _float_sites_timer(monkeypatch)
    model, samples = encoder
    with pytest.raises(BudgetInfeasible, match=r"fastest assignment is all-int8.* at .* ms .*measured: all-int8"):
        create("qdq", {"target_speedup": "50", "calibration_samples": "8", "sensitivity_samples": "4"}).run(
            model, Context(inputs=split_samples(samples)))


def _correlated(rng, mix: np.ndarray, rows: int) -> np.ndarray:
    return (rng.standard_normal((rows, len(mix))) @ mix).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_rounding_beats_nearest_on_held_out_inputs(bits):
    """Correlated inputs (as a layer's are): GPTQ's error feedback must lower the output error on inputs it did not
    see, at the same scales."""
    rng = np.random.default_rng(0)
    k, n = 128, 48
    w = rng.standard_normal((k, n)).astype(np.float32)
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)  # one input distribution, two disjoint draws
    fit, held = _correlated(rng, mix, 4000), _correlated(rng, mix, 4000)
    if bits == 4:
        scale = expand_scales(block_scales(w, axis=0), 0, k)
        nearest = blocked_int4(w, axis=0)[0]
    else:
        scale = np.broadcast_to(np.abs(w).max(axis=0) / 127, w.shape)
        nearest = np.clip(np.round(w / scale), -127, 127)
    q = gptq_round(w[None], (fit.T.astype(np.float64) @ fit)[None], scale[None], INT4 if bits == 4 else INT8)[0]
    lo, hi = INT4 if bits == 4 else INT8
    assert q.min() >= lo and q.max() <= hi
    err = lambda c: np.linalg.norm(held @ (w - c * scale)) / np.linalg.norm(held @ w)  # noqa: E731
    assert err(q) < 0.85 * err(nearest), (err(q), err(nearest))


def test_gptq_rounding_in_the_pass_on_real_images():
    """Through the pass on the bundled CNN and real images (calibration and the scored images disjoint): GPTQ's codes
    are what the model stores, and it is no worse than nearest on the held-out images."""
    from builders import EXAMPLES, fashion_split
    from graphopt.core.runtime import make_session

    model, _ = graphopt.optimize(graphopt.load(EXAMPLES / "fashion_cnn.onnx"), calibration=EXAMPLES /
                                 "fashion_test.npz", measure_latency=False)
    inputs, images, _ = fashion_split()
    ref = make_session(model).run(None, {"image": images})[0]
    errors = {}
    for rounding in ("nearest", "gptq"):
        result = create("qdq", {"latency_slack": "0", "rounding": rounding, "calibration_samples": "32",
                                "activations": "static"}).run(
            model, Context(inputs=inputs))
        assert all(("GPTQ rounding" in d.reason) == (rounding == "gptq") for d in result.decisions
                   if d.action.startswith("int8"))
        out = make_session(result.model).run(None, {"image": images})[0]
        errors[rounding] = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert errors["gptq"] <= errors["nearest"] * 1.05, errors
    with pytest.raises(graphopt.UsageError, match="rounding must be one of"):
        create("qdq", {"rounding": "stochastic"})
