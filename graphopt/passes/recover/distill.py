"""Knowledge distillation of a student graph (run in torch) towards a teacher model (run in onnxruntime): batches
from the fit samples, image augmentation, the losses, and the training loop with its budgets and early stopping.

The teacher's outputs are computed for every training batch (augmented batches are new inputs); the selection
samples' teacher outputs once. Nothing here sees the verification samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...core.runtime import Feed
from ..base import progress_bar


# --- data -------------------------------------------------------------------------------------------------------

class Rows:
    """The fit samples as pools of rows: feeds whose non-batch shapes agree are concatenated along axis 0, so a
    batch can take any rows of one pool (text of different lengths stays in separate pools)."""

    def __init__(self, feeds: list[Feed], rng: np.random.Generator):
        groups: dict[tuple, list[Feed]] = {}
        for f in feeds:
            key = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(f.items()))
            groups.setdefault(key, []).append(f)
        self.pools = [{k: np.concatenate([f[k] for f in fs]) for k in fs[0]} for fs in groups.values()]
        self.sizes = np.array([len(next(iter(p.values()))) for p in self.pools])
        self.rng = rng

    @property
    def count(self) -> int:
        return int(self.sizes.sum())

    def batch(self, size: int) -> Feed:
        pool = self.pools[self.rng.choice(len(self.pools), p=self.sizes / self.sizes.sum())]
        n = len(next(iter(pool.values())))
        idx = self.rng.choice(n, size=min(size, n), replace=False)
        return {k: v[idx] for k, v in pool.items()}


def augment(feed: Feed, names: list[str], kinds: tuple[str, ...], rng: np.random.Generator) -> Feed:
    """Random resized crops (35-100 % of the area, aspect 3:4-4:3, resized back), horizontal flips, and mixing
    each image with another of the batch (weight 0.5-1 on its own), on the image inputs; others pass through."""
    out = dict(feed)
    for name in names:
        x = torch.from_numpy(np.ascontiguousarray(feed[name]))
        n, _, h, w = x.shape
        if "crop" in kinds:
            crops = []
            for i in range(n):
                area = rng.uniform(0.35, 1.0) * h * w
                aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
                ch = min(h, max(2, int(round(math.sqrt(area / aspect)))))
                cw = min(w, max(2, int(round(math.sqrt(area * aspect)))))
                top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                patch = x[i:i + 1, :, top:top + ch, left:left + cw]
                crops.append(F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False))
            x = torch.cat(crops)
        if "flip" in kinds:
            flip = torch.from_numpy(rng.random(n) < 0.5)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if "mix" in kinds and n > 1:
            lam = torch.from_numpy(rng.uniform(0.5, 1.0, n).astype(np.float32))[:, None, None, None]
            x = lam * x + (1 - lam) * x[torch.from_numpy(rng.permutation(n))]
        out[name] = x.numpy().astype(feed[name].dtype)
    return out


# --- losses -----------------------------------------------------------------------------------------------------

def output_loss(student, teacher, scores: bool, temperature: float):
    """KL(teacher || student) on softened class scores, times T^2; else the squared error relative to the
    teacher's energy (scale-free, so outputs and intermediates of any size weigh alike)."""
    if scores:
        t = F.log_softmax(teacher / temperature, dim=-1)
        s = F.log_softmax(student / temperature, dim=-1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2
    return ((student - teacher) ** 2).sum() / (teacher ** 2).sum().clamp_min(1e-12)


@dataclass
class Objective:
    outputs: list[str]
    scores: frozenset[str]
    intermediates: list[str]
    intermediate_weight: float
    temperature: float

    def __call__(self, student: dict, teacher: dict, with_intermediates: bool = True):
        loss = sum(output_loss(student[n], teacher[n], n in self.scores, self.temperature) for n in self.outputs)
        if with_intermediates and self.intermediates:
            inner = sum(output_loss(student[n], teacher[n], False, 1.0) for n in self.intermediates)
            loss = loss + self.intermediate_weight * inner / len(self.intermediates)
        return loss


def agreement_or_cosine(student: dict, teacher: dict, objective: Objective) -> dict[str, float]:
    """What a person reads beside the loss: top-1 agreement for class scores, mean cosine for other outputs."""
    out = {}
    for n in objective.outputs:
        s, t = student[n], teacher[n]
        if n in objective.scores:
            out[n] = float((s.argmax(-1) == t.argmax(-1)).float().mean())
        else:
            out[n] = float(F.cosine_similarity(s.reshape(len(s), -1), t.reshape(len(t), -1)).mean())
    return out


# --- the loop ---------------------------------------------------------------------------------------------------

@dataclass
class Budget:
    steps: int
    seconds: float
    eval_every: int  # 0: about 20 evaluations over the (re-planned) schedule
    patience: int


@dataclass
class History:
    steps: int = 0
    seconds: float = 0.0
    stopped: str = ""
    best_step: int = 0
    curve: list[dict] = field(default_factory=list)  # per evaluation: step, train loss, selection loss, metric

    @property
    def before(self) -> dict:
        return self.curve[0]

    @property
    def best(self) -> dict:
        return next(c for c in self.curve if c["step"] == self.best_step)


def to_torch(feed: Feed) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}


def train(student, params: list, teacher: Callable[[Feed], dict], next_batch: Callable[[], Feed],
          selection: list[tuple[Feed, dict]], objective: Objective, budget: Budget, lr: float, weight_decay: float,
          progress: Callable[[str], None]) -> History:
    """AdamW with a short warm-up and a cosine decay over the planned steps (re-planned from the measured step
    time when the time budget binds); evaluates on the selection samples every `eval_every` steps, keeps the best
    parameters in place at the end, and stops after `patience` evaluations without improvement."""
    history = History()
    started = time.perf_counter()

    def evaluate() -> tuple[float, dict]:
        with torch.no_grad():
            total, rows, metric, parts = 0.0, 0, {}, []
            for feed, target in selection:
                out = student(to_torch(feed), objective.outputs)
                n = len(next(iter(feed.values())))
                total += float(objective(out, target, with_intermediates=False)) * n
                rows += n
                parts.append((n, agreement_or_cosine(out, target, objective)))
            for name in objective.outputs:
                metric[name] = sum(n * m[name] for n, m in parts) / rows
        return total / rows, metric

    loss0, metric0 = evaluate()
    history.curve.append({"step": 0, "train_loss": None, "selection_loss": loss0, "selection_metric": metric0})
    best_loss, best_state, stale = loss0, [p.detach().clone() for p in params], 0
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    planned = budget.steps
    warmup = max(1, min(20, planned // 20))
    running, seen, replanned = 0.0, 0, False
    progress(f"recover: {len(params)} parameter tensors to train; selection loss before {loss0:.4g}"
             + _metric_text(metric0, objective))
    step = 0
    while step < planned:
        step += 1
        scale = step / warmup if step <= warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup)
                                                                         / max(1, planned - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        feed = next_batch()
        target = teacher(feed)
        out = student(to_torch(feed), list(target))
        loss = objective(out, {k: torch.from_numpy(v) for k, v in target.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += float(loss.detach())
        seen += 1
        elapsed = time.perf_counter() - started
        if step == 3:
            clock = (step, elapsed)  # the first steps are slow (allocations): time the steps after them
        elif step >= 10 and budget.seconds < math.inf:
            # re-plan the cosine schedule to end inside the time budget (evaluations included in the step time)
            per_step = (elapsed - clock[1]) / (step - clock[0])
            planned = max(step, min(budget.steps, step + int((budget.seconds - elapsed) / per_step)))
            replanned = replanned or planned < budget.steps
        every = budget.eval_every or max(5, planned // 20)
        if step % every == 0 or step == planned or elapsed >= budget.seconds:
            sel_loss, metric = evaluate()
            history.curve.append({"step": step, "train_loss": running / seen, "selection_loss": sel_loss,
                                  "selection_metric": metric})
            progress(f"recover: step {step}/{planned} {progress_bar(step, planned)} train loss {running / seen:.4g}, "
                     f"selection loss {sel_loss:.4g}" + _metric_text(metric, objective))
            running, seen = 0.0, 0
            if sel_loss < best_loss:
                best_loss, best_state, stale, history.best_step = sel_loss, [p.detach().clone() for p in params], 0, step
            else:
                stale += 1
            if stale >= budget.patience:
                history.stopped = f"early stop: {stale} evaluations without a better selection loss"
                break
            if time.perf_counter() - started >= budget.seconds:
                history.stopped = "time budget reached"
                break
    history.stopped = history.stopped or (f"time budget reached (schedule re-planned to {planned} of "
                                          f"{budget.steps} steps)" if replanned else "step budget reached")
    history.steps, history.seconds = step, time.perf_counter() - started
    with torch.no_grad():
        for p, best in zip(params, best_state):
            p.copy_(best)
    return history


def _metric_text(metric: dict, objective: Objective) -> str:
    parts = [f"{n} {'agreement' if n in objective.scores else 'cosine'} "
             + (f"{v:.2%}" if n in objective.scores else f"{v:.4f}") for n, v in metric.items()]
    return " (" + ", ".join(parts) + ")" if parts else ""
