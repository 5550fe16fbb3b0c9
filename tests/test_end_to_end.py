"""`graphopt optimize` with the cleanup recipe on the bundled trained model and on torch-exported models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from builders import bert_like, resnet_like, torch_export

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def graphopt(*args):
    exe = shutil.which("graphopt")
    cmd = [exe] if exe else [sys.executable, "-m", "graphopt.cli"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=300)


def _optimize_and_check(model_path: Path, tmp_path: Path, *extra) -> dict:
    out, report = tmp_path / "opt.onnx", tmp_path / "report.json"
    proc = graphopt("optimize", model_path, "-o", out, "--report", report, "-q", *extra)
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(onnx.load(out))
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    data = json.loads(report.read_text())
    assert data["verification"]["passed"]
    for metric in data["verification"]["metrics"]:
        assert metric["max_abs"] < 1e-4, metric
    return data


def test_bundled_fashion_mnist_model_with_its_real_test_images(tmp_path):
    data = _optimize_and_check(EXAMPLES / "fashion_cnn.onnx", tmp_path, "--calib", EXAMPLES / "fashion_test.npz")
    assert data["before"]["op_counts"].get("BatchNormalization", 0) > 0
    assert "BatchNormalization" not in data["after"]["op_counts"]
    assert data["inputs"]["synthetic"] is False and data["inputs"]["verification_samples"] >= 64
    # The optimized model keeps the trained model's accuracy on the bundled labelled images.
    labels = np.load(EXAMPLES / "fashion_test_labels.npy")
    images = np.load(EXAMPLES / "fashion_test.npz")["image"]
    preds = {}
    for name in ("fashion_cnn.onnx", "opt"):
        path = EXAMPLES / name if name != "opt" else tmp_path / "opt.onnx"
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        preds[name] = sess.run(None, {"image": images})[0].argmax(1)
    assert (preds["opt"] == preds["fashion_cnn.onnx"]).all()
    assert (preds["opt"] == labels).mean() > 0.85


def test_torchvision_style_resnet(tmp_path):
    path = tmp_path / "resnet.onnx"
    onnx.save(torch_export(resnet_like(), (torch.randn(2, 3, 16, 16),), ["image"], ["logits"],
                           {"image": {0: "b"}, "logits": {0: "b"}}), path)
    data = _optimize_and_check(path, tmp_path, "--input-shape", "image=2x3x16x16")
    assert data["before"]["op_counts"]["BatchNormalization"] == 6
    assert "BatchNormalization" not in data["after"]["op_counts"]


def test_bert_style_encoder_with_token_inputs(tmp_path):
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    dyn = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, "embedding": {0: "b"}}
    path = tmp_path / "bert.onnx"
    onnx.save(torch_export(bert_like(), (ids, mask), ["input_ids", "attention_mask"], ["embedding"], dyn), path)
    data = _optimize_and_check(path, tmp_path, "--input-shape", "input_ids=2x16",
                               "--input-shape", "attention_mask=2x16")
    assert data["before"]["op_counts"]["Identity"] > 0 and "Identity" not in data["after"]["op_counts"]
    assert data["after"]["nodes"] < data["before"]["nodes"]


@pytest.fixture(scope="module")
def optimized_bert(tmp_path_factory):
    """The BERT-style encoder exported at sequence length 16 and optimized once through the CLI; the tests below
    feed the same optimized file other sequence lengths."""
    tmp_path = tmp_path_factory.mktemp("bert_seq")
    ids = torch.randint(0, 100, (1, 16))
    mask = torch.ones(1, 16, dtype=torch.int64)
    dyn = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}}
    module = bert_like()
    path = tmp_path / "bert.onnx"
    onnx.save(torch_export(module, (ids, mask), ["input_ids", "attention_mask"], ["embedding"], dyn), path)
    proc = graphopt("optimize", path, "-o", tmp_path / "opt.onnx", "-q", "--no-latency",
                    "--input-shape", "input_ids=1x16", "--input-shape", "attention_mask=1x16")
    return module, tmp_path / "opt.onnx", proc


@pytest.mark.parametrize("seq", [7, 33])
def test_optimized_bert_still_accepts_other_sequence_lengths(optimized_bert, seq):
    module, opt, proc = optimized_bert
    assert proc.returncode == 0, proc.stderr
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 100, (3, seq)).astype(np.int64),
             "attention_mask": np.ones((3, seq), np.int64)}
    sess = ort.InferenceSession(str(opt), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = module(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()
    np.testing.assert_allclose(sess.run(None, feeds)[0], expected, rtol=1e-4, atol=1e-5)
