"""The schedule (which sampler steps run in full) and the Taylor recursion, in numpy.

TaylorSeer's finite differences are over the *step index*: on a full step i with the previous full step j,
Δ = i - j and the factors are refreshed f0' = Y, f(m+1)' = (f(m)' - f(m)) / Δ, an order existing only once enough
full steps have been seen (after the first full step only f0: FORA's reuse). A forecast step i reads
Y = Σ f(m) · k^m / m! with k = i - j. The graph lowering computes exactly these float32 operations in this order,
so `Factors` is also the reference the tests compare the graph with: division by Δ is a multiplication by
`inv_delta`, a float32 1/Δ, whose entries are 0 for orders that do not exist yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ...core.errors import UsageError

MAX_ORDER = 6


@dataclass(frozen=True)
class Schedule:
    steps: int = 50          # sampler steps in one trajectory
    interval: int = 4        # fixed schedule: one full step, then interval - 1 forecast steps
    order: int = 2           # Taylor order of the forecast (0: reuse, FORA)
    warmup: int = 2          # first steps always full
    tail: int = 1            # last steps always full
    threshold: float | None = None  # CG-Taylor gate on block 0's forecast error; None: the fixed interval
    gate_order: int = 3      # Taylor order of block 0's own forecast (the gate's reference)

    def __post_init__(self):
        _check_int("steps", self.steps, 1)
        _check_int("interval", self.interval, 1)
        _check_int("warmup", self.warmup, 1, why=" (the first step has no cached state to forecast from)")
        _check_int("tail", self.tail, 0)
        for key in ("order", "gate_order"):
            _check_int(key, getattr(self, key), 0)
            if getattr(self, key) > MAX_ORDER:
                raise UsageError(f"{key} must be at most {MAX_ORDER}, got {getattr(self, key)}")
        if self.threshold is not None and not (self.threshold > 0 and math.isfinite(self.threshold)):
            raise UsageError(f"threshold must be a positive number (a relative error), got {self.threshold}")

    @property
    def gated(self) -> bool:
        return self.threshold is not None

    def forced_full(self, i: int) -> bool:
        """Full whatever the gate says: warm-up, tail, and (fixed schedule) every interval-th step after warm-up."""
        if i < self.warmup or i >= self.steps - self.tail:
            return True
        return not self.gated and (i - self.warmup + 1) % self.interval == 0

    def fixed_full_steps(self) -> list[int]:
        return [i for i in range(self.steps) if self.forced_full(i)]

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _check_int(key: str, value, low: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise UsageError(f"{key} must be an integer >= {low}{why}, got {value!r}")


@dataclass
class StepClock:
    """Where a trajectory is: the step index, the last full step and how many full steps ran."""

    schedule: Schedule
    step: int = 0
    last_full: int | None = None
    full_count: int = 0
    history: list[bool] = field(default_factory=list)

    def check_next(self) -> None:
        if self.step >= self.schedule.steps:
            raise UsageError(f"step {self.step + 1} of a {self.schedule.steps}-step schedule: call reset() to start a "
                             "new trajectory, or give steps= for longer ones")

    def coef(self, order: int) -> np.ndarray:
        """[k^m / m!] for m = 0..order at the current step, float32 (k = steps since the last full step)."""
        k = 0 if self.last_full is None else self.step - self.last_full
        return np.array([k ** m / math.factorial(m) for m in range(order + 1)], dtype=np.float32)

    def inv_delta(self, order: int) -> np.ndarray:
        """Per order m < `order`: 1/Δ where f(m) exists (m < full steps seen), else 0, float32."""
        if self.last_full is None:
            return np.zeros(order, np.float32)
        inv = np.float32(1.0) / np.float32(self.step - self.last_full)
        return np.array([inv if m < self.full_count else 0.0 for m in range(order)], dtype=np.float32)

    def advance(self, full: bool) -> None:
        self.history.append(bool(full))
        if full:
            self.last_full = self.step
            self.full_count += 1
        self.step += 1


def empty_state(order: int, rank: int) -> np.ndarray:
    """The state before the first full step: zeros that broadcast against any value of that rank."""
    return np.zeros((order + 1,) + (1,) * rank, np.float32)


def refresh(state: np.ndarray, value: np.ndarray, inv_delta: np.ndarray) -> np.ndarray:
    """New factors [f0', f1', ...] from the value computed at a full step (the graph's full branch does the same)."""
    value = np.asarray(value, np.float32)
    new = [value]
    for m in range(state.shape[0] - 1):
        new.append((new[m] - state[m]) * inv_delta[m])
    return np.stack(new).astype(np.float32, copy=False)


def forecast(state: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """Σ f(m) · coef[m], summed left to right in float32 (the graph's forecast branch does the same)."""
    out = state[0] * coef[0]
    for m in range(1, state.shape[0]):
        out = out + state[m] * coef[m]
    return out


def gate_error(predicted: np.ndarray, actual: np.ndarray) -> float:
    """CG-Taylor's confidence: mean |forecast - actual| / mean |actual| (float32, as the graph computes it)."""
    num = np.mean(np.abs(predicted - actual), dtype=np.float32)
    den = np.mean(np.abs(actual), dtype=np.float32)
    return float(np.float32(num) / np.float32(den))
