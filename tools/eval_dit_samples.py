#!/usr/bin/env python3
"""Check that the trained DiT's samples are recognisable: export, sample through onnxruntime, classify.

1. Export ``models.dit.build()`` with the legacy exporter (dynamo=False, opset 17, dynamic batch) to a temp dir.
2. Sample ``--per-class`` images for each of the 10 classes with DDIM (``--steps``, eta 0, classifier-free
   guidance ``--guidance``) through the ONNX step function of ``models/dit_sampler.py``.
3. Classify them with the residual CNN (``models.fashion_resnet.build()``, torch) and print the accuracy per class
   (fraction classified as the class they were generated for) and overall.
4. Write a PNG grid (one row per class, ``--grid-cols`` samples each) to ``--png``
   (default models/weights/dit_samples.png), with PIL when available, else a tiny zlib writer.

Run from the repository root:  python tools/eval_dit_samples.py [--per-class 50 --steps 50 --guidance 4.0]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.datasets import FASHION_CLASSES, fashion_normalize  # noqa: E402
from models import dit, dit_sampler, fashion_resnet  # noqa: E402
from graphopt.core.files import write_atomic  # noqa: E402


def export_dit(model: torch.nn.Module, path: str) -> None:
    spec = dit.EXPORT
    args = tuple(torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in spec["inputs"].values())
    dynamic = {name: {ax: "batch" for ax in axes} for name, axes in spec["dynamic"].items()}
    dynamic.update({name: {0: "batch"} for name in spec["outputs"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, args, path, dynamo=False, opset_version=17, input_names=list(spec["inputs"]),
                          output_names=spec["outputs"], dynamic_axes=dynamic)


def write_png(path: Path, gray: np.ndarray) -> None:
    """8-bit grayscale PNG, atomically."""

    def writer(tmp: str) -> None:
        try:
            from PIL import Image

            Image.fromarray(np.ascontiguousarray(gray, np.uint8)).save(tmp, format="PNG")  # 2-D uint8 -> mode L
        except ImportError:
            h, w = gray.shape
            raw = b"".join(b"\x00" + gray[r].tobytes() for r in range(h))

            def chunk(kind: bytes, data: bytes) -> bytes:
                return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

            with open(tmp, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                        + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))

    write_atomic(path, writer)


def grid_image(samples_u8: np.ndarray, rows: int, cols: int, scale: int = 2, gap: int = 2) -> np.ndarray:
    """samples [rows*cols, 28, 28] (row-major) -> one uint8 image, upscaled ``scale``x, ``gap`` px separators."""
    h, w = samples_u8.shape[1:]
    cell_h, cell_w = h * scale + gap, w * scale + gap
    out = np.full((rows * cell_h + gap, cols * cell_w + gap), 128, np.uint8)
    for k, img in enumerate(samples_u8):
        r, c = divmod(k, cols)
        big = np.kron(img, np.ones((scale, scale), np.uint8))
        out[gap + r * cell_h: gap + r * cell_h + h * scale, gap + c * cell_w: gap + c * cell_w + w * scale] = big
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid-cols", type=int, default=16)
    ap.add_argument("--png", default=str(ROOT / "models" / "weights" / "dit_samples.png"))
    ap.add_argument("--json", default=None, help="also write the accuracies to this JSON file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = dit.build()
    classifier = fashion_resnet.build()
    import onnxruntime as ort

    per_class: dict[str, float] = {}
    samples_by_class = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dit.onnx")
        export_dit(model, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        step_fn = dit_sampler.onnx_step_fn(ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]))
        print(f"exported DiT to ONNX ({os.path.getsize(path) / 1e6:.1f} MB); sampling {args.per_class}/class, "
              f"DDIM {args.steps} steps, guidance {args.guidance}", flush=True)
        correct_total = 0
        for c in range(10):
            y = np.full(args.per_class, c, np.int64)
            x = dit_sampler.ddim_sample(step_fn, y, steps=args.steps, seed=args.seed + c, guidance=args.guidance)
            u8 = dit_sampler.to_uint8(x)
            samples_by_class.append(u8)
            with torch.no_grad():
                pred = classifier(torch.from_numpy(fashion_normalize(u8))).argmax(1).numpy()
            acc = float((pred == c).mean())
            correct_total += int((pred == c).sum())
            per_class[FASHION_CLASSES[c]] = acc
            print(f"class {c} {FASHION_CLASSES[c]:<12} accuracy {acc:.3f}  ({time.time() - t0:.0f}s)", flush=True)
    overall = correct_total / (10 * args.per_class)

    print("\n| class | classifier accuracy on generated samples |\n|---|---|")
    for name, acc in per_class.items():
        print(f"| {name} | {acc * 100:.0f} % |")
    print(f"| **overall** | **{overall * 100:.1f} %** |")
    print(f"({args.per_class} samples/class, DDIM {args.steps} steps eta 0, guidance {args.guidance}, seeds "
          f"{args.seed}..{args.seed + 9}; {time.time() - t0:.0f}s)")

    cols = min(args.grid_cols, args.per_class)
    grid = grid_image(np.concatenate([s[:cols] for s in samples_by_class]), rows=10, cols=cols)
    write_png(Path(args.png), grid)
    print(f"wrote {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps({"per_class": per_class, "overall": overall, "steps": args.steps,
                                               "guidance": args.guidance, "per_class_n": args.per_class}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
