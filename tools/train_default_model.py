#!/usr/bin/env python3
"""Train graphopt's bundled default model: a small CNN on Fashion-MNIST.

The weights in ``examples/fashion_cnn.onnx`` are the project's own: they were
trained from scratch by this script (fixed seeds, CPU only) on the
Fashion-MNIST training set, not taken from any third-party checkpoint.

Outputs (written atomically into ``--out-dir``, default ``examples``):

* ``fashion_cnn.onnx``          - the model, exported with the legacy
  TorchScript exporter (opset 17, no constant folding, so the
  BatchNormalization nodes stay in the graph for graphopt to fold);
  input ``image`` [batch,1,28,28] float32 (normalised), output ``logits``
  [batch,10].
* ``fashion_test.npz``          - ``image``: the first 512 test
  images, normalised, float32, shape (512,1,28,28); ``labels``: their int64
  labels (graphopt reads them for ``--max-drop``).
* ``fashion_test_labels.npy``   - their int64 labels.

The dataset is read from /usr/share/datasets/fashion-mnist (install it with
``tools/setup_material.sh``).
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from graphopt.core.files import write_atomic

DATA_DIR = "/usr/share/datasets/fashion-mnist"
MEAN = 0.2860
STD = 0.3530
N_BUNDLED = 512
SEED = 20240601


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,28,28], labels int64 [N]) for 'train' or 't10k'."""
    img_path = os.path.join(DATA_DIR, f"{split}-images-idx3-ubyte.gz")
    lbl_path = os.path.join(DATA_DIR, f"{split}-labels-idx1-ubyte.gz")
    for p in (img_path, lbl_path):
        if not os.path.exists(p):
            sys.exit(f"missing {p}; run tools/setup_material.sh first")
    with gzip.open(img_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(lbl_path) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    if len(images) != len(labels):
        sys.exit(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,1,28,28], (x/255 - MEAN)/STD."""
    x = images.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    return ((x - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)


class FashionCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(64 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        return self.fc(x)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
          batch_size: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(x), generator=gen)
        total_loss = 0.0
        correct = 0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = x[idx], y[idx]
            # light augmentation: random horizontal flip (Fashion-MNIST items
            # are roughly left/right symmetric)
            flip = torch.rand(len(xb), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(xb)
            correct += (logits.argmax(1) == yb).sum().item()
        print(f"epoch {epoch + 1}/{epochs}: loss {total_loss / len(x):.4f} "
              f"train acc {correct / len(x):.4f} ({time.time() - t0:.1f}s)",
              flush=True)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    model.eval()

    def writer(tmp: str) -> None:
        with warnings.catch_warnings():
            # the legacy exporter is used on purpose; silence its deprecation notice
            warnings.simplefilter("ignore", DeprecationWarning)
            _export(tmp)

    def _export(tmp: str) -> None:
        torch.onnx.export(
            model, (example,), tmp,
            dynamo=False,
            opset_version=17,
            do_constant_folding=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )

    write_atomic(path, writer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out-dir", default="examples")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--min-accuracy", type=float, default=0.90,
                    help="exit non-zero if test accuracy is below this")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    seed_everything(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)

    train_img, train_lbl = load_split("train")
    test_img, test_lbl = load_split("t10k")
    x_train = torch.from_numpy(normalise(train_img))
    y_train = torch.from_numpy(train_lbl)
    x_test_np = normalise(test_img)
    x_test = torch.from_numpy(x_test_np)
    print(f"train {tuple(x_train.shape)}, test {tuple(x_test.shape)}", flush=True)

    model = FashionCNN()
    t0 = time.time()
    train(model, x_train, y_train, args.epochs, args.batch_size, args.lr, args.seed)
    print(f"training took {time.time() - t0:.1f}s", flush=True)

    model.eval()
    torch_logits = predict(model, x_test).numpy()
    torch_pred = torch_logits.argmax(1)
    torch_acc = float((torch_pred == test_lbl).mean())
    print(f"torch test accuracy (10k): {torch_acc:.4f}", flush=True)

    # --- write outputs ---------------------------------------------------
    onnx_path = os.path.join(args.out_dir, "fashion_cnn.onnx")
    npz_path = os.path.join(args.out_dir, "fashion_test.npz")
    lbl_path = os.path.join(args.out_dir, "fashion_test_labels.npy")

    export_onnx(model, x_test[:2].clone(), onnx_path)

    bundled = np.ascontiguousarray(x_test_np[:N_BUNDLED], dtype=np.float32)
    bundled_lbl = np.ascontiguousarray(test_lbl[:N_BUNDLED], dtype=np.int64)

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, image=bundled, labels=bundled_lbl)  # labels: what --max-drop reads

    def write_npy(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, bundled_lbl)

    write_atomic(npz_path, write_npz)
    write_atomic(lbl_path, write_npy)

    # --- verify with onnx / onnxruntime ------------------------------------
    import onnx
    import onnxruntime as ort

    m = onnx.load(onnx_path)
    onnx.checker.check_model(m)
    op_counts: dict[str, int] = {}
    for node in m.graph.node:
        op_counts[node.op_type] = op_counts.get(node.op_type, 0) + 1
    print("onnx ops:", ", ".join(f"{k}x{v}" for k, v in sorted(op_counts.items())))
    size = os.path.getsize(onnx_path)
    print(f"{onnx_path}: {size} bytes")
    if size >= 2 * 1024 * 1024:
        print("ERROR: ONNX model is not under 2 MB", file=sys.stderr)
        return 1

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    ort_logits = np.concatenate([
        sess.run(["logits"], {"image": x_test_np[i:i + 1000]})[0]
        for i in range(0, len(x_test_np), 1000)
    ])
    ort_pred = ort_logits.argmax(1)
    ort_acc = float((ort_pred == test_lbl).mean())
    disagree = int((ort_pred != torch_pred).sum())
    print(f"torch top-1 accuracy (10k): {torch_acc:.4f}")
    print(f"ORT   top-1 accuracy (10k): {ort_acc:.4f}  "
          f"(prediction disagreements: {disagree})")

    with np.load(npz_path) as z:
        if list(z.keys()) != ["image"]:
            print(f"ERROR: {npz_path} keys {list(z.keys())}", file=sys.stderr)
            return 1
        img512 = z["image"]
    lbl512 = np.load(lbl_path)
    assert img512.shape == (N_BUNDLED, 1, 28, 28) and img512.dtype == np.float32
    assert lbl512.shape == (N_BUNDLED,) and lbl512.dtype == np.int64
    t512 = predict(model, torch.from_numpy(img512)).numpy()
    o512 = sess.run(["logits"], {"image": img512})[0]
    max_diff = float(np.abs(t512 - o512).max())
    acc512 = float((o512.argmax(1) == lbl512).mean())
    print(f"max |torch - ORT| on {N_BUNDLED} bundled images: {max_diff:.3e}")
    print(f"ORT accuracy on {N_BUNDLED} bundled images: {acc512:.4f}")
    print(f"TEST ACCURACY (10k): {ort_acc:.4f}")

    ok = True
    if torch_acc != ort_acc:
        print("ERROR: torch and ORT accuracies differ", file=sys.stderr)
        ok = False
    if not max_diff < 1e-4:
        print("ERROR: torch vs ORT max abs diff >= 1e-4", file=sys.stderr)
        ok = False
    if ort_acc < args.min_accuracy:
        print(f"ERROR: accuracy {ort_acc:.4f} < {args.min_accuracy}", file=sys.stderr)
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
