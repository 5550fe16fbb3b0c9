#!/usr/bin/env python3
"""Train the residual CNN in ``models/fashion_resnet.py`` on Fashion-MNIST.

The weights written to ``models/weights/fashion_resnet.pt`` are the project's own: trained from scratch by this
script (fixed seeds, CPU, 2 threads) on the 60k Fashion-MNIST training images, not taken from any third-party
checkpoint. Augmentation: random crop with 2-pixel zero padding and random horizontal flip. Optimiser: AdamW with
a one-cycle learning-rate schedule, label smoothing 0.05, convolutions under bfloat16 autocast (``--no-bf16`` to
turn off; weights and optimiser state are float32, and so are evaluation and the saved state dict).

The run is ``--epochs`` epochs unless they do not fit in ``--max-minutes``: the learning rate follows
progress = max(step fraction, time fraction), so a slow (shared) machine gets a compressed schedule that still
anneals fully within the time limit. The state dict (float32) is written atomically and the test accuracy (10k) is printed, in
torch and in onnxruntime (legacy exporter, opset 17).

Run from the repository root:  python tools/train_fashion_resnet.py [--epochs 5] [--max-minutes 24]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench.datasets import FASHION_MEAN, FASHION_STD, fashion_mnist, fashion_normalize  # noqa: E402
from models.fashion_resnet import WEIGHTS, FashionResNet  # noqa: E402
from graphopt.core.files import write_atomic  # noqa: E402

SEED = 20261122
PAD = 2


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (pad 2 with the normalised value of a black pixel) and random horizontal flip, per sample."""
    n, _, h, w = x.shape
    background = (0.0 - FASHION_MEAN) / FASHION_STD
    padded = F.pad(x, (PAD, PAD, PAD, PAD), value=background)
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]          # [n, h, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]          # [n, 1, w]
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out).contiguous()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def atomic_save(obj, path: Path) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def lr_at(progress: float, peak: float, warm: float = 0.2) -> float:
    """One-cycle shape over progress in [0, 1]: linear warm-up from peak/25, then cosine down to peak/1e4."""
    if progress < warm:
        return peak / 25 + (peak - peak / 25) * progress / warm
    q = min(1.0, (progress - warm) / (1.0 - warm))
    return peak / 1e4 + (peak - peak / 1e4) * 0.5 * (1.0 + math.cos(math.pi * q))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args) -> tuple[float, float]:
    """Returns (epochs run, wall seconds).

    The learning-rate schedule follows progress = max(steps / (epochs * steps_per_epoch), elapsed / budget), and
    training ends when progress reaches 1: on a machine slowed down by other work the schedule is compressed so
    that it still anneals fully inside ``--max-minutes`` (fewer steps), instead of being cut off at a high rate.
    """
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = (len(x) + args.batch_size - 1) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    budget = args.max_minutes * 60.0
    t_start = time.time()
    step, epoch, progress = 0, 0, 0.0
    while progress < 1.0:
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(x), generator=gen)
        total_loss, correct, seen = 0.0, 0, 0
        for i in range(0, len(x), args.batch_size):
            progress = max(step / total_steps, (time.time() - t_start) / budget)
            if progress >= 1.0:
                break
            lr = lr_at(progress, args.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = perm[i:i + args.batch_size]
            xb = augment(x[idx], gen).to(memory_format=torch.channels_last)
            yb = y[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(xb)
            logits = logits.float()
            loss = F.cross_entropy(logits, yb, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total_loss += loss.item() * len(xb)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(xb)
            if step % 100 == 0:
                print(f"  step {step}/{total_steps} lr {lr:.2e} progress {progress:.3f} "
                      f"({(time.time() - t_start) / step:.2f}s/step)", flush=True)
        epoch += 1
        if seen:
            print(f"epoch {epoch}: {seen} images, loss {total_loss / seen:.4f} train acc {correct / seen:.4f} "
                  f"({time.time() - t0:.0f}s, total {(time.time() - t_start) / 60:.1f} min)", flush=True)
    return step / steps_per_epoch, time.time() - t_start


def ort_accuracy(model: nn.Module, x_test: np.ndarray, y_test: np.ndarray) -> tuple[float, float]:
    """Export with the legacy exporter (opset 17) to a temp dir; (ORT accuracy, max |torch - ORT| on 1000)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fashion_resnet.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (torch.from_numpy(x_test[:1]),), path, dynamo=False, opset_version=17,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        logits = np.concatenate([sess.run(["logits"], {"image": x_test[i:i + 1000]})[0]
                                 for i in range(0, len(x_test), 1000)])
    torch_logits = predict(model, torch.from_numpy(x_test[:1000])).numpy()
    return float((logits.argmax(1) == y_test).mean()), float(np.abs(torch_logits - logits[:1000]).max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--max-minutes", type=float, default=24.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--label-smoothing", type=float, default=0.05)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bfloat16 autocast in training (weights and optimiser stay float32); ~1.8x faster on this "
                         "CPU (AVX512-BF16). Evaluation and the saved weights are float32")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--out", default=str(WEIGHTS))
    ap.add_argument("--min-accuracy", type=float, default=0.90, help="exit 1 below this test accuracy")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    seed_everything(args.seed)
    train_img, train_lbl = fashion_mnist("train")
    test_img, test_lbl = fashion_mnist("test")
    x_train, y_train = torch.from_numpy(fashion_normalize(train_img)), torch.from_numpy(train_lbl)
    x_test_np = fashion_normalize(test_img)

    model = FashionResNet().to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"FashionResNet: {n_params} parameters; train {tuple(x_train.shape)}", flush=True)
    epochs, wall = train(model, x_train, y_train, args)
    print(f"training: {epochs:.2f} epochs, {wall / 60:.1f} min", flush=True)

    model = model.to(memory_format=torch.contiguous_format).eval()
    acc = float((predict(model, torch.from_numpy(x_test_np)).argmax(1).numpy() == test_lbl).mean())
    acc1k = float((predict(model, torch.from_numpy(x_test_np[:1000])).argmax(1).numpy() == test_lbl[:1000]).mean())
    print(f"torch test accuracy (10k): {acc:.4f}; first 1000: {acc1k:.4f}", flush=True)

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out = Path(args.out)
    atomic_save(state, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)", flush=True)

    ort_acc, max_diff = ort_accuracy(model, x_test_np, test_lbl)
    print(f"ORT test accuracy (10k): {ort_acc:.4f}; max |torch - ORT| logits (1000 images): {max_diff:.2e}")
    print(f"TEST ACCURACY (10k): {acc:.4f}")
    return 0 if acc >= args.min_accuracy else 1


if __name__ == "__main__":
    sys.exit(main())
