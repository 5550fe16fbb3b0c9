"""Task metrics for the benchmark: how good a contender's outputs are, on their own and against the fp32 model.

All functions take numpy arrays with one row per sample and compute in float64, so that the figures do not depend
on the order in which batches were run.
"""

from __future__ import annotations

import numpy as np


def _rows(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected [samples, features], got shape {x.shape}")
    return x


def _same_rows(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax is the label."""
    logits = _rows(logits, "logits")
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(logits):
        raise ValueError(f"{len(logits)} rows of logits but {len(labels)} labels")
    return float(np.mean(logits.argmax(axis=1) == labels)) if len(labels) else float("nan")


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Fraction of rows whose argmax is the same in both (top-1 agreement with the fp32 model)."""
    reference, candidate = _rows(reference, "reference"), _rows(candidate, "candidate")
    _same_rows(reference, candidate)
    return float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1))) if len(reference) else float("nan")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = _rows(logits, "logits")
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def mean_kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(candidate)), in nats."""
    reference, candidate = _rows(reference, "reference"), _rows(candidate, "candidate")
    _same_rows(reference, candidate)
    lp, lq = log_softmax(reference), log_softmax(candidate)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    return float(np.mean(np.maximum(kl, 0.0)))  # rounding can make a zero KL a tiny negative


def mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over rows of the cosine similarity between two embeddings of the same sample (1 when both are zero)."""
    reference, candidate = _rows(reference, "reference"), _rows(candidate, "candidate")
    _same_rows(reference, candidate)
    nr, nc = np.linalg.norm(reference, axis=1), np.linalg.norm(candidate, axis=1)
    dot = (reference * candidate).sum(axis=1)
    both = (nr > 0) & (nc > 0)
    cos = np.where(both, dot / np.where(both, nr * nc, 1.0), np.where((nr == 0) & (nc == 0), 1.0, 0.0))
    return float(np.mean(cos))


def probe_predict(embeddings: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Class predictions of a fixed linear probe: argmax(X W + b). W is [features, classes]."""
    x = _rows(embeddings, "embeddings")
    w = np.asarray(weight, np.float64)
    b = np.asarray(bias, np.float64).reshape(-1)
    if w.shape != (x.shape[1], b.shape[0]):
        raise ValueError(f"probe weight {w.shape} does not fit embeddings of width {x.shape[1]} and bias {b.shape}")
    return (x @ w + b).argmax(axis=1)


def probe_accuracy(embeddings: np.ndarray, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> float:
    """Accuracy of a fixed linear probe (argmax(X W + b)) on the given embeddings."""
    pred = probe_predict(embeddings, weight, bias)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(pred):
        raise ValueError(f"{len(pred)} embeddings but {len(labels)} labels")
    return float(np.mean(pred == labels)) if len(labels) else float("nan")


def relative_errors(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-sample ||candidate - reference|| / ||reference|| over all non-batch axes (e.g. DiT samples against a
    reference sampler's output). A zero reference gives 0 if the candidate is zero too, else inf."""
    reference = np.asarray(reference, np.float64)
    candidate = np.asarray(candidate, np.float64)
    _same_rows(reference, candidate)
    r = reference.reshape(len(reference), -1)
    d = candidate.reshape(len(candidate), -1) - r
    num, den = np.linalg.norm(d, axis=1), np.linalg.norm(r, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num == 0, 0.0, np.inf))
    return rel


def mean_relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean of relative_errors: the per-sample relative L2 error, averaged."""
    rel = relative_errors(reference, candidate)
    return float(np.mean(rel)) if len(rel) else float("nan")


def sample_class_accuracy(classifier_logits: np.ndarray, intended_labels: np.ndarray) -> float:
    """Generated samples judged by a classifier: the fraction the classifier assigns to the class they were
    generated for (class-conditional DiT samples scored by the Fashion-MNIST classifier)."""
    return top1_accuracy(classifier_logits, intended_labels)
