"""DDIM sampling around a one-step noise predictor: an onnxruntime session or a TaylorCacheSession alike.

The model's inputs are found by role: the noised sample (the float input of rank >= 3), the timestep (rank 1,
named like `t`/`time`, else the float one) and the class label (the integer rank-1 input, optional). Noise is fixed
by `seed`: x_T is the first draw of `np.random.default_rng(seed)`, then one draw per step when eta > 0, so two
runs with the same seed and labels see the same noise whatever session they call.

Schedule: linear betas 1e-4 .. 0.02 over T = 1000 training steps (DiT's and DDPM's), `steps` timesteps evenly
spaced from T-1 down to 0. Classifier-free guidance (`guidance` != 1) runs the conditional and the unconditional
(`null_class`) halves as one batch of 2B. With `clip_x0` the predicted x_0 is clipped to [-1, 1] and eps
re-derived from it (pixel-space DDIM).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...core.errors import UsageError

T = 1000
BETA_START, BETA_END = 1e-4, 0.02

StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def alphas_cumprod(num_steps: int = T) -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(BETA_START, BETA_END, num_steps, dtype=np.float64))


def timesteps(steps: int, num_steps: int = T) -> np.ndarray:
    """`steps` timesteps evenly spaced from T-1 down to 0 (int64, descending, distinct)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_steps:
        raise UsageError(f"steps must be an integer in [1, {num_steps}], got {steps!r}")
    ts = np.round(np.linspace(num_steps - 1, 0, steps)).astype(np.int64)
    if len(np.unique(ts)) != steps:
        raise UsageError(f"{steps} steps do not give distinct timesteps")
    return ts


def ddim_loop(step_fn: StepFn, labels, steps: int = 50, seed: int = 0, guidance: float = 1.0, eta: float = 0.0,
              shape: tuple[int, ...] = (1, 28, 28), clip_x0: bool = True, null_class: int | None = None,
              callback: Callable[[int, int, np.ndarray], None] | None = None) -> np.ndarray:
    """DDIM over `step_fn(x, t, y) -> eps`. Returns x_0 float32 [B, *shape]."""
    if guidance != 1.0 and null_class is None:
        raise UsageError("classifier-free guidance needs null_class (the label of 'no class')")
    ac = alphas_cumprod()
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(y), *shape)).astype(np.float32)
    ts = timesteps(steps)
    for i, t in enumerate(ts):
        if callback is not None:
            callback(i, int(t), x)
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = guided_eps(step_fn, x, int(t), y, guidance, null_class).astype(np.float64)
        xd = x.astype(np.float64)
        x0 = (xd - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)
        if clip_x0:
            x0 = np.clip(x0, -1.0, 1.0)
            eps = (xd - np.sqrt(a_t) * x0) / np.sqrt(1.0 - a_t)
        sigma = eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        x_prev = np.sqrt(a_prev) * x0 + np.sqrt(max(1.0 - a_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x_prev = x_prev + sigma * rng.standard_normal(x.shape)
        x = x_prev.astype(np.float32)
    return x


def guided_eps(step_fn: StepFn, x, t: int, y, guidance: float, null_class) -> np.ndarray:
    """eps at one step; with classifier-free guidance, conditional and unconditional halves as one batch."""
    b = x.shape[0]
    if guidance == 1.0:
        return np.asarray(step_fn(x, np.full(b, t, np.float32), y), dtype=np.float32)
    eps = np.asarray(step_fn(np.concatenate([x, x]), np.full(2 * b, t, np.float32),
                             np.concatenate([y, np.full(b, null_class, np.int64)])), dtype=np.float32)
    cond, uncond = eps[:b], eps[b:]
    return uncond + np.float32(guidance) * (cond - uncond)


def sampler_roles(inputs) -> tuple[str, str, str | None]:
    """(sample, timestep, label) input names from a session's get_inputs() (NodeArg-like: name, type, shape)."""
    sample = [a for a in inputs if "float" in a.type and len(a.shape or ()) >= 3]
    rank1 = [a for a in inputs if len(a.shape or ()) == 1]
    if len(sample) != 1 or not rank1 or len(inputs) > 3:
        raise UsageError("not a one-step denoiser: expected a float sample input of rank >= 3, a rank-1 timestep "
                         "and optionally a rank-1 integer label; the inputs are "
                         + ", ".join(f"{a.name} {a.type} {list(a.shape or [])}" for a in inputs))
    named = [a for a in rank1 if a.name.lower() in ("t", "timestep", "timesteps", "time") or "time" in a.name.lower()]
    floats = [a for a in rank1 if "float" in a.type]
    timestep = (named or floats or rank1)[0]
    labels = [a for a in rank1 if a is not timestep and "int" in a.type]
    return sample[0].name, timestep.name, labels[0].name if labels else None


def session_step_fn(session) -> tuple[StepFn, tuple[int, ...] | None]:
    """A step function over anything with onnxruntime's run/get_inputs/get_outputs, and the sample's shape."""
    args = session.get_inputs()
    sample, timestep, label = sampler_roles(args)
    by_name = {a.name: a for a in args}
    t_dtype = np.int64 if "int" in by_name[timestep].type else np.float32
    dims = tuple(by_name[sample].shape[1:])
    shape = dims if all(isinstance(d, int) and d > 0 for d in dims) else None
    out = session.get_outputs()[0].name

    def step(x, t, y):
        feed = {sample: np.ascontiguousarray(x, np.float32), timestep: np.asarray(t).astype(t_dtype)}
        if label is not None:
            feed[label] = np.asarray(y, np.int64)
        return session.run([out], feed)[0]

    return step, shape


def ddim_sample(session, labels, steps: int = 50, seed: int = 0, guidance: float = 1.0, eta: float = 0.0,
                null_class: int | None = None, shape: tuple[int, ...] | None = None, clip_x0: bool = True,
                callback: Callable[[int, int, np.ndarray], None] | None = None) -> np.ndarray:
    """DDIM samples for `labels` (one per sample) through `session`: an onnxruntime.InferenceSession or a
    graphopt.TaylorCacheSession (reset first, so each call is one trajectory)."""
    step, declared = session_step_fn(session)
    shape = shape or declared
    if shape is None:
        raise UsageError("the sample input has dynamic spatial dims: give shape= (without the batch dim)")
    schedule = getattr(session, "schedule", None)
    if schedule is not None and schedule.steps != steps:
        raise UsageError(f"the session's schedule has {schedule.steps} steps and the sampler was asked for {steps}: "
                         f"give TaylorCacheSession(..., steps={steps})")
    if hasattr(session, "reset"):
        session.reset()
    return ddim_loop(step, labels, steps, seed, guidance, eta, tuple(shape), clip_x0, null_class, callback)
