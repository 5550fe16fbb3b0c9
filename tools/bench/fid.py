"""FID on the Fashion ResNet's penultimate features (not Inception: values are not comparable with published FIDs).

The feature extractor is this project's own Fashion-MNIST classifier (``models.fashion_resnet.build()``, 91.99 %
test accuracy, ``models/weights/README.md``): the 128-d globally average-pooled features, i.e. the input of its
``fc`` layer, of uint8 images [N, 28, 28] normalised with ``bench.datasets.fashion_normalize``. One forward pass
gives both the features and the logits (a forward hook on ``fc``), so the generated-sample benchmark scores class
accuracy and FID from the same run.

    FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))

with mu, S the mean and covariance (float64, ``np.cov``, N - 1) of each feature set and ``scipy.linalg.sqrtm``
(its real part; when the product is singular, S1 and S2 get 1e-6 on the diagonal first, as pytorch-fid does).
The reference set for the DiT benchmark is the 10k Fashion-MNIST test images.

Self-check (run from the repository root; ~30 s on 2 threads):

    python tools/bench/fid.py [--threads 2]

prints FID(test, test) (~0), FID(test first half, second half) (small: the sampling noise of 5k-vs-5k), the
total variance Tr(S_test) of the test features and FID(10k training images, test) for scale, and exits 1 unless
FID(test, test) < 1e-6, 0 <= FID(half, half) < 1 % of Tr(S_test), fc(features) reproduces the logits and the
classifier's test accuracy is above 90 %.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` and `models` importable
    _root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(_root / "tools"), str(_root)]
    __package__ = "bench"

from bench.datasets import fashion_mnist, fashion_normalize  # noqa: E402

FEATURE_DIM = 128


class FeatureExtractor:
    """The Fashion ResNet, returning (penultimate features [N, 128] float64, logits [N, 10] float32)."""

    def __init__(self, classifier=None, batch: int = 500) -> None:
        import torch

        from models import fashion_resnet

        self.torch = torch
        self.model = classifier if classifier is not None else fashion_resnet.build()
        self.model.eval()
        self.batch = batch
        self._captured: list = []
        self.model.fc.register_forward_hook(lambda mod, inp, out: self._captured.append(inp[0].detach()))

    def __call__(self, images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images_u8 = np.asarray(images_u8)
        if images_u8.dtype != np.uint8 or images_u8.ndim != 3 or images_u8.shape[1:] != (28, 28):
            raise ValueError(f"expected uint8 [N, 28, 28] images, got {images_u8.dtype} {images_u8.shape}")
        feats, logits = [], []
        with self.torch.no_grad():
            for i in range(0, len(images_u8), self.batch):
                x = self.torch.from_numpy(fashion_normalize(images_u8[i:i + self.batch]))
                self._captured.clear()
                logits.append(self.model(x).numpy())
                (f,) = self._captured
                feats.append(f.numpy().astype(np.float64))
        if not feats:
            return np.zeros((0, FEATURE_DIM)), np.zeros((0, 10), np.float32)
        return np.concatenate(feats), np.concatenate(logits)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need [N >= 2, D] features, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), real part of scipy's sqrtm."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*statistics(features_a), *statistics(features_b))


def bootstrap_sd(features: np.ndarray, reference_stats: tuple[np.ndarray, np.ndarray], n: int = 20,
                 seed: int = 0) -> float:
    """Standard deviation of the FID over `n` bootstrap resamples of the generated features (against fixed
    reference statistics): a rough size of the sampling noise of one FID figure."""
    rng = np.random.default_rng(seed)
    vals = [frechet_distance(*statistics(features[rng.integers(0, len(features), len(features))]), *reference_stats)
            for _ in range(n)]
    return float(np.std(vals, ddof=1))


def test_set_features(extractor: FeatureExtractor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [10000, 128], logits, labels) of the Fashion-MNIST test images."""
    images, labels = fashion_mnist("test")
    feats, logits = extractor(images)
    return feats, logits, labels


def self_check(extractor: FeatureExtractor | None = None, with_train: bool = True, test=None) -> dict:
    """FID(test, test), FID(test half, other half), FID(train 10k, test); and the classifier's test accuracy
    from the same forward pass (checks the hook took the features that `fc` turns into the logits). `test`: the
    output of test_set_features, if already computed."""
    extractor = extractor or FeatureExtractor()
    feats, logits, labels = test if test is not None else test_set_features(extractor)
    fc = extractor.model.fc
    recomputed = feats @ fc.weight.detach().numpy().T.astype(np.float64) + fc.bias.detach().numpy()
    out = {
        "test_accuracy": float((logits.argmax(1) == labels).mean()),
        "fc_of_features_max_abs_diff": float(np.abs(recomputed - logits).max()),
        "fid_test_vs_itself": fid(feats, feats),
        "fid_test_half_vs_half": fid(feats[:5000], feats[5000:]),
        "trace_cov_test": float(np.trace(statistics(feats)[1])),
    }
    if with_train:
        train, _ = fashion_mnist("train")
        idx = np.sort(np.random.default_rng(0).choice(len(train), 10_000, replace=False))
        out["fid_train10k_vs_test"] = fid(extractor(train[idx])[0], feats)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/bench/fid.py", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    r = self_check()
    for k, v in r.items():
        print(f"{k}: {v:.6g}")
    print(f"({time.perf_counter() - t0:.1f} s, {args.threads} torch threads)")
    # "small": two halves of one distribution differ by well under 1 % of the features' total variance
    ok = (abs(r["fid_test_vs_itself"]) < 1e-6 and 0 <= r["fid_test_half_vs_half"] < 0.01 * r["trace_cov_test"]
          and r["fc_of_features_max_abs_diff"] < 1e-3 and r["test_accuracy"] > 0.9)
    print("self-check " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
