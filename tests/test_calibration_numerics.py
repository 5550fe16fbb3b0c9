"""Calibration sources, the calibration/validation split, synthetic feeds, output comparison and tolerances."""

from __future__ import annotations

import numpy as np
import pytest
from builders import fvi, make
from onnx import TensorProto, helper

from graphopt.core.calibration import load_samples, parse_shapes, split_samples, synthetic_samples
from graphopt.core.errors import InputError, UsageError
from graphopt.core.model import Model
from graphopt.core.numerics import Tolerance, compare_outputs


def _two_input_model(batch="N"):
    nodes = [helper.make_node("Add", ["a", "b"], ["y"])]
    return Model(make(nodes, [fvi("a", [batch, 3]), fvi("b", [batch, 3])], [fvi("y", [batch, 3])]))


def test_npz_is_cut_into_samples_along_the_batch_axis(tmp_path):
    np.savez(tmp_path / "d.npz", a=np.zeros((10, 3), np.float32), b=np.ones((10, 3), np.float64))
    samples = load_samples(tmp_path / "d.npz", _two_input_model(), batch_size=2)
    assert len(samples) == 5 and samples[0]["a"].shape == (2, 3)
    assert samples[0]["b"].dtype == np.float32, "float64 data is cast to the input's dtype"


def test_explicit_samples_axis_and_folder_of_npy(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 1, 3), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((4, 1, 3), np.float32))
    samples = load_samples(tmp_path, _two_input_model())
    assert len(samples) == 4 and samples[3]["b"].shape == (1, 3)


class Reader:
    """Follows onnxruntime.quantization.CalibrationDataReader."""

    def __init__(self, n):
        self.items = iter([{"a": np.full((1, 3), i, np.float32), "b": np.zeros((1, 3), np.float32)}
                           for i in range(n)])

    def get_next(self):
        return next(self.items, None)


def test_calibration_data_reader_protocol():
    samples = load_samples(Reader(6), _two_input_model())
    assert [s["a"][0, 0] for s in samples] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("arrays,match", [
    ({"a": np.zeros((2, 3), np.float32)}, "do not match"),
    ({"a": np.zeros((2, 4), np.float32), "b": np.zeros((2, 4), np.float32)}, "expects"),
    ({"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 3), np.float32)}, "different numbers"),
    ({"a": np.zeros((2, 3), np.complex64), "b": np.zeros((2, 3), np.float32)}, "expects float32"),
])
def test_bad_calibration_data_is_a_clear_error(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(InputError, match=match):
        load_samples(tmp_path / "d.npz", _two_input_model())


def test_split_keeps_fit_selection_and_verification_apart():
    samples = [{"a": np.full((1,), i)} for i in range(40)]
    split = split_samples(samples, seed=1)
    fit, sel, ver = ({int(s["a"][0]) for s in part} for part in (split.fit, split.selection, split.verification))
    assert (len(fit), len(sel), len(ver)) == (17, 10, 13)  # small sets keep min(16, n // 3) for verification
    assert not fit & sel and not fit & ver and not sel & ver and len(fit | sel | ver) == 40
    big = split_samples([{"a": np.full((1,), i)} for i in range(1000)], seed=0)
    assert (len(big.fit), len(big.selection), len(big.verification)) == (744, 128, 128)
    two = split_samples(samples[:2])
    assert len(two.fit) == 1 and two.selection == [] and two.for_selection is two.fit and not two.overlapping
    one = split_samples(samples[:1])
    assert one.overlapping and one.fit == one.verification


def test_synthetic_feeds_respect_dtypes_and_need_unknown_dims():
    nodes = [helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)]
    model = Model(make(nodes, [fvi("ids", ["B", 8], TensorProto.INT64)], [fvi("y", ["B", 8])]))
    with pytest.raises(InputError, match="--input-shape ids=Nx8"):
        synthetic_samples(model, 2)
    feeds = synthetic_samples(model, 2, parse_shapes(["ids=3x8"]))
    assert feeds[0]["ids"].dtype == np.int64 and feeds[0]["ids"].shape == (3, 8)
    with pytest.raises(UsageError, match="does not fit"):
        synthetic_samples(model, 1, {"ids": (3, 9)})
    with pytest.raises(UsageError, match="expected NAME="):
        parse_shapes(["ids:3x8"])


def test_compare_outputs_metrics():
    ref = [{"logits": np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)}]
    new = [{"logits": np.array([[1.0, 2.0, 3.5], [1.0, 2.0, 3.0]], np.float32)}]
    (m,) = compare_outputs(ref, new, scores={"logits"})
    assert m.max_abs == pytest.approx(2.0)
    assert m.mean_abs == pytest.approx(4.5 / 6)
    assert m.rel_l2 == pytest.approx(np.sqrt(0.25 + 8) / np.sqrt(28))
    assert m.top1_agreement == 0.5
    assert 0 < m.cosine < 1


def test_tolerance_reports_each_violation_and_nan():
    ref = [{"y": np.ones((2, 4), np.float32)}]
    new = [{"y": np.array([[1, 1, 1, np.nan], [1, 1, 1, 2]], np.float32)}]
    metrics = compare_outputs(ref, new)
    problems = Tolerance(max_rel_l2=1e-3, max_abs=0.5).violations(metrics)
    assert any("NaN/Inf" in p for p in problems)
    assert any("relative L2" in p for p in problems) and any("max abs" in p for p in problems)
    assert Tolerance(max_rel_l2=None).violations(compare_outputs(ref, ref)) == []
    with pytest.raises(UsageError):
        Tolerance(min_top1_agreement=1.5)
