"""The `recover` pass: train the current model's weights back towards the pipeline's original model by
knowledge distillation on the user's own inputs (fit samples, optionally augmented, plus `train_data`), with
early stopping on the selection samples; the best parameters write back under the same initializer names."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from onnx import numpy_helper

from ...core.calibration import load_samples
from ...core.capture import stream_tensors, with_outputs
from ...core.errors import UsageError
from ...core.model import Model
from ...core.numerics import Tolerance
from ...core.runtime import Feed, make_session
from ...core.shapes import tensor_infos
from ..base import Context, Decision, Pass, PassResult, register

TRAIN_MODES = ("changed", "all")
MATCH_MODES = ("outputs", "intermediate")
MAX_MATCHED = 8  # intermediate tensors matched at most (spread along the graph)


@register
@dataclass(frozen=True)
class Recover(Pass):
    """Distil the current model towards the original (lossy pass whose result is judged against the original)."""

    name = "recover"
    description = "knowledge distillation back towards the original model on the calibration inputs"
    exact = False
    judged_against: ClassVar[str] = "original"

    search_role: ClassVar[str] = "recover"

    steps: int = 400  # step budget
    max_minutes: float = 3.0  # time budget for training (the pipeline's checks come on top)
    lr: float = 1e-4  # AdamW peak learning rate (cosine decay after a short warm-up)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (towards zero, not towards the original)
    batch_size: int = 32  # rows per step
    train: str = "changed"  # changed: only initializers the rewrite changed or added | all: every float weight
    match: str = "outputs"  # outputs | intermediate: also match up to 8 tensors present in both graphs
    intermediate_weight: float = 1.0  # weight of the matched intermediates in the loss, beside the outputs
    temperature: float = 1.0  # softening of class scores in the KL loss
    # auto: crop,flip on photo-sized image inputs (>= 64 pixels a side), none on small ones (measured on Fashion-MNIST
    # 28x28: crops and mixing hurt) | none | a comma list of crop, flip, mix
    augment: str = "auto"
    train_data: str | None = None  # a further .npz/.npy file or folder of unlabeled inputs to train on
    eval_every: int = 0  # steps between selection evaluations; 0: about 20 evaluations over the budget
    patience: int = 6  # evaluations without a better selection loss before stopping

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes} (a time budget of 0 trains "
                             "nothing)")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("lr must be positive and weight_decay at least 0")
        if self.batch_size < 1 or self.patience < 1 or self.eval_every < 0:
            raise ValueError("batch_size and patience must be at least 1, eval_every at least 0")
        if self.train not in TRAIN_MODES:
            raise ValueError(f"train must be one of {', '.join(TRAIN_MODES)}, got {self.train!r}")
        if self.match not in MATCH_MODES:
            raise ValueError(f"match must be one of {', '.join(MATCH_MODES)}, got {self.match!r}")
        if not self.temperature > 0 or self.intermediate_weight < 0:
            raise ValueError("temperature must be positive and intermediate_weight at least 0")
        kinds = self.augmentations()
        unknown = set(kinds) - {"crop", "flip", "mix"}
        if unknown:
            raise ValueError(f"augment: unknown {', '.join(sorted(unknown))} (auto, none, or crop,flip,mix)")

    def augmentations(self, feed: Feed | None = None) -> tuple[str, ...]:
        if self.augment == "auto":
            big = feed is not None and any(min(feed[n].shape[2:]) >= 64 for n in image_inputs(feed))
            return ("crop", "flip") if big else ()
        if self.augment == "none":
            return ()
        return tuple(a.strip() for a in self.augment.replace("+", ",").split(",") if a.strip())

    def tolerance(self) -> Tolerance:
        """No fixed bound: the pipeline holds the result to "closer to the original than its input was" (a
        recovery from a badly broken model can help a lot and still sit outside the lossy guard); NaN/Inf fail."""
        return Tolerance()

    def preflight(self, model: Model, inputs) -> None:
        from ...core import torch_exec  # without torch, its import is the one-line install advice

        _check_inputs(inputs)
        torch_exec.refuse_unsupported(model)  # the ops of the original; run() checks the rewritten model

    def run(self, model: Model, ctx: Context) -> PassResult:
        from ...core import torch_exec  # first: without torch, its import is the one-line install advice
        from . import distill

        import torch

        teacher_model = ctx.original
        if teacher_model is None:
            raise UsageError("recover needs the original model to distil from: run it in a pipeline after a lossy "
                             "pass (or give Context(original=...))")
        inputs = ctx.inputs
        _check_inputs(inputs)
        torch.manual_seed(ctx.seed)
        rng = np.random.default_rng(ctx.seed)
        decisions: list[Decision] = []

        student = torch_exec.TorchGraph(model, trainable=())
        trainable = self._trainable(model, teacher_model, student)
        if not trainable:
            return PassResult(model, False, decisions=[Decision("model", "skipped", "no parameter differs from "
                                                                "the original: nothing to recover")])
        for name, p in student.named_onnx_parameters():
            p.requires_grad_(name in trainable)
        params = student.trainable_parameters()

        fit = list(inputs.fit)
        extra, dropped = self._train_data(model, inputs)
        fit += extra
        if dropped:
            decisions.append(Decision("train_data", "skipped", f"{dropped} samples equal to verification samples "
                                                               "left out (recovery never sees those)"))
        scores = ctx.class_scores(model) & set(teacher_model.output_names())
        outputs = [n for n in model.output_names() if n in set(teacher_model.output_names())]
        intermediates = self._matched(model, teacher_model, fit[0]) if self.match == "intermediate" else []
        objective = distill.Objective(outputs, frozenset(scores), intermediates, self.intermediate_weight,
                                      self.temperature)
        teacher = _Teacher(teacher_model, outputs + intermediates, ctx)

        rows = distill.Rows(fit, rng)
        images = image_inputs(fit[0])
        kinds = self.augmentations(fit[0]) if images else ()
        if self.augment not in ("auto", "none") and not images:
            raise UsageError(f"recover: augment={self.augment} needs image inputs (float NCHW, >= 16 pixels a "
                             "side), and this model has none")

        def next_batch() -> Feed:
            batch = rows.batch(self.batch_size)
            return distill.augment(batch, images, kinds, rng) if kinds else batch

        selection_feeds = inputs.for_selection
        selection = [(f, {k: torch.from_numpy(v) for k, v in teacher(f, outputs).items()})
                     for f in _batched(selection_feeds, self.batch_size)]
        budget = distill.Budget(self.steps, self.max_minutes * 60.0, self.eval_every, self.patience)
        ctx.progress(f"recover: {rows.count} training rows" + (f" (+{', '.join(kinds)} augmentation)" if kinds else "")
                     + f", {sum(len(next(iter(f.values()))) for f in selection_feeds)} selection rows"
                     + (" (no selection split: the fit samples)" if not inputs.selection else "")
                     + (f", matching {len(intermediates)} intermediate tensors" if intermediates else ""))
        threads = torch.get_num_threads()
        torch.set_num_threads(ctx.runtime.intra_op_threads)  # the same threads as the sessions; restored after
        try:
            history = distill.train(student, params, teacher, next_batch, selection, objective, budget, self.lr,
                                    self.weight_decay, ctx.progress)
        finally:
            torch.set_num_threads(threads)

        before, best = history.before, history.best
        counters = {"steps": history.steps, "train_seconds": round(history.seconds, 1),
                    "trained_tensors": len(params), "trained_parameters": int(sum(p.numel() for p in params)),
                    "best_step": history.best_step, "selection_loss_before": round(before["selection_loss"], 5),
                    "selection_loss_after": round(best["selection_loss"], 5)}
        for name, value in before["selection_metric"].items():
            key = "agreement" if name in scores else "cosine"
            counters[f"selection_{key}_before"] = round(value, 4)
            counters[f"selection_{key}_after"] = round(best["selection_metric"][name], 4)
        details = {"stopped": history.stopped, "curve": history.curve, "training_rows": rows.count,
                   "augmentation": list(kinds), "intermediates": intermediates, "trained": sorted(trainable)}
        decisions.append(Decision("training", "stopped", history.stopped))
        if history.best_step == 0:
            decisions.append(Decision("model", "kept", "no step improved the selection loss: the model is unchanged"))
            return PassResult(model, False, counters, decisions, details)
        return PassResult(student.write_back(), True, counters, decisions, details)

    def _trainable(self, model: Model, original: Model, graph) -> set[str]:
        """Initializers to train: float weights (and integer weights' master copies) that the rewrite changed or
        added, or every one (train=all); never a QuantizeLinear/DequantizeLinear scale or zero point."""
        quant = {x for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                 for x in n.input[1:]}
        names = [n for n, _ in graph.named_onnx_parameters() if n not in quant]
        if self.train == "all":
            return set(names)
        before = original.initializers()
        now = model.initializers()
        changed = set()
        for name in names:
            old = before.get(name)
            if old is None or old.dims != now[name].dims or old.data_type != now[name].data_type \
                    or not np.array_equal(numpy_helper.to_array(old), numpy_helper.to_array(now[name])):
                changed.add(name)
        return changed

    def _train_data(self, model: Model, inputs) -> tuple[list[Feed], int]:
        if self.train_data is None:
            return [], 0
        extra = load_samples(self.train_data, model)
        held = {_digest(f) for f in inputs.verification}
        kept = [f for f in extra if _digest(f) not in held]
        return kept, len(extra) - len(kept)

    def _matched(self, model: Model, original: Model, feed: Feed) -> list[str]:
        """Up to MAX_MATCHED float tensors computed by both graphs with the same shape (on one fit sample),
        spread evenly along the current graph's order; graph inputs, outputs and constants left out."""
        ours = _shapes(model, feed)
        theirs = _shapes(original, feed)
        skip = set(model.output_names()) | set(model.input_names()) | model.constant_names()
        order = [o for n in model.graph.node for o in n.output]
        common = [t for t in order if t in ours and t not in skip and theirs.get(t) == ours[t]]
        if len(common) <= MAX_MATCHED:
            return common
        picks = np.linspace(0, len(common) - 1, MAX_MATCHED + 1)[1:].round().astype(int)
        return [common[i] for i in picks]


def _check_inputs(inputs) -> None:
    if inputs is None or not inputs.fit or inputs.synthetic:
        raise UsageError("recover trains on the model's real inputs: give calibration samples with --calib "
                         "(random synthetic inputs teach it nothing about real data)")


class _Teacher:
    """The original model in onnxruntime, with the matched intermediate tensors as extra outputs. A model whose
    inputs have a fixed batch size runs batch by batch of that size."""

    def __init__(self, model: Model, names: list[str], ctx: Context):
        self.session = make_session(with_outputs(model, names), ctx.runtime)
        dims = [i.shape[0] for i in self.session.get_inputs() if i.shape]
        self.fixed = next((d for d in dims if isinstance(d, int) and d > 0), None)
        self.names = names

    def __call__(self, feed: Feed, names: list[str] | None = None) -> dict[str, np.ndarray]:
        names = names or self.names
        rows = len(next(iter(feed.values())))
        step = self.fixed or rows
        parts = [self.session.run(names, {k: v[i:i + step] for k, v in feed.items()}) for i in range(0, rows, step)]
        return {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(names)}


def _shapes(model: Model, feed: Feed) -> dict[str, tuple]:
    """The shape of every float32 tensor the model computes on `feed` (one onnxruntime run with all of them as
    outputs; tensors whose type shape inference cannot tell are left out)."""
    infos = tensor_infos(model.proto)
    outputs = set(model.output_names())
    names = [o for n in model.graph.node for o in n.output if o and o not in outputs
             and infos.get(o) is not None and infos[o].dtype == "float32"]
    _, values = next(stream_tensors(model, names, [feed]))
    return {n: v.shape for n, v in values.items()}


def image_inputs(feed: Feed) -> list[str]:
    """Inputs that look like images: float [N, C, H, W] with 1-4 channels and at least 16 pixels a side."""
    return [k for k, v in feed.items() if v.ndim == 4 and v.dtype.kind == "f" and v.shape[1] <= 4
            and min(v.shape[2:]) >= 16]


def _batched(feeds: list[Feed], size: int) -> list[Feed]:
    """Feeds of equal shapes concatenated into batches of about `size` rows (for evaluation)."""
    out, group, rows, key = [], [], 0, None
    for f in feeds:
        k = tuple((n, v.shape[1:]) for n, v in sorted(f.items()))
        if group and (k != key or rows >= size):
            out.append({n: np.concatenate([g[n] for g in group]) for n in group[0]})
            group, rows = [], 0
        group.append(f)
        key = k
        rows += len(next(iter(f.values())))
    if group:
        out.append({n: np.concatenate([g[n] for g in group]) for n in group[0]})
    return out


def _digest(feed: Feed) -> str:
    h = hashlib.sha1()
    for k, v in sorted(feed.items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()
