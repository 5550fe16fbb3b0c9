"""DDIM and DDPM sampling in numpy around a one-step noise predictor ``eps = step_fn(x, t, y)``.

``step_fn`` takes x float32 [B, 1, H, W], t float32 [B] (timestep in [0, T-1]) and y int64 [B], and returns eps
float32 [B, 1, H, W]. ``onnx_step_fn`` wraps an onnxruntime session of the exported DiT (inputs ``x``, ``t``,
``y``; output ``eps``) and ``torch_step_fn`` a torch module, so that the same sampler runs both and the results
can be compared sample by sample.

Noise is fixed by ``seed``: the initial x_T comes first from ``np.random.default_rng(seed)``, then (DDPM, or DDIM
with eta > 0) one draw per step in step order. Two runs with the same seed, labels, steps and guidance therefore
see the same noise, whatever step function they call: this is how a cached/approximate step function (e.g.
Taylor caching) is judged against the full-compute one (``relative_error`` per sample).

Classifier-free guidance (``guidance`` != 1): the conditional and the unconditional (null-class) halves run as one
batch of 2B, ``eps = eps_u + guidance * (eps_c - eps_u)``.

Schedule: linear betas 1e-4 .. 0.02 over T = 1000 steps (the one ``tools/train_dit.py`` trains with). Samples
are in [-1, 1]; ``to_uint8`` maps them to pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from graphopt.passes.taylor_cache.ddim import ddim_loop, guided_eps

T = 1000
BETA_START, BETA_END = 1e-4, 0.02
NULL_CLASS = 10

StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def betas(num_steps: int = T) -> np.ndarray:
    return np.linspace(BETA_START, BETA_END, num_steps, dtype=np.float64)


def alphas_cumprod(num_steps: int = T) -> np.ndarray:
    return np.cumprod(1.0 - betas(num_steps))


def timesteps(steps: int, num_steps: int = T) -> np.ndarray:
    """``steps`` timesteps evenly spaced from T-1 down to 0 (int64, descending, distinct)."""
    if not 1 <= steps <= num_steps:
        raise ValueError(f"steps must be in [1, {num_steps}], got {steps}")
    ts = np.round(np.linspace(num_steps - 1, 0, steps)).astype(np.int64)
    if len(np.unique(ts)) != steps:
        raise ValueError(f"{steps} steps do not give distinct timesteps")
    return ts


def _start(y, seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(y), *shape)).astype(np.float32)
    return x, y, rng


def ddim_sample(step_fn: StepFn, y, steps: int = 50, seed: int = 0, guidance: float = 1.0, eta: float = 0.0,
                shape: tuple[int, ...] = (1, 28, 28), clip_x0: bool = True, null_class: int = NULL_CLASS,
                callback: Callable[[int, int, np.ndarray], None] | None = None) -> np.ndarray:
    """DDIM (eta = 0: deterministic given the initial noise): graphopt's sampler loop (the one shipped with the
    Taylor cache, graphopt.ddim_sample, which takes a session) over a step function. Returns x_0 [B, *shape].

    ``callback(i, t, x)`` (optional) is called before each model call with the step index, timestep and x_t.
    With ``clip_x0`` the predicted x_0 is clipped to [-1, 1] and eps re-derived from it (pixel-space DDIM).
    """
    return ddim_loop(step_fn, y, steps, seed, guidance, eta, shape, clip_x0, null_class, callback)


def ddpm_sample(step_fn: StepFn, y, steps: int = T, seed: int = 0, guidance: float = 1.0,
                shape: tuple[int, ...] = (1, 28, 28), clip_x0: bool = True, null_class: int = NULL_CLASS,
                callback: Callable[[int, int, np.ndarray], None] | None = None) -> np.ndarray:
    """Ancestral DDPM sampling; ``steps`` < T samples on an evenly respaced subsequence (betas recomputed)."""
    ac = alphas_cumprod()
    x, y, rng = _start(y, seed, shape)
    ts = timesteps(steps)
    for i, t in enumerate(ts):
        if callback is not None:
            callback(i, int(t), x)
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else 1.0
        beta = 1.0 - a_t / a_prev
        eps = guided_eps(step_fn, x, int(t), y, guidance, null_class).astype(np.float64)
        xd = x.astype(np.float64)
        x0 = (xd - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)
        if clip_x0:
            x0 = np.clip(x0, -1.0, 1.0)
        mean = (np.sqrt(a_prev) * beta / (1.0 - a_t)) * x0 + (np.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a_t)) * xd
        if i + 1 < len(ts):
            var = beta * (1.0 - a_prev) / (1.0 - a_t)
            mean = mean + np.sqrt(var) * rng.standard_normal(x.shape)
        x = mean.astype(np.float32)
    return x


def onnx_step_fn(path_or_session, threads: int | None = None) -> StepFn:
    """Step function over an onnxruntime session (or a path to the exported DiT: inputs x, t, y; output eps)."""
    if isinstance(path_or_session, (str, Path)):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path_or_session), opts, providers=["CPUExecutionProvider"])
    else:
        sess = path_or_session
    names = {i.name: i.type for i in sess.get_inputs()}
    t_dtype = np.int64 if names.get("t") == "tensor(int64)" else np.float32
    out = sess.get_outputs()[0].name

    def step(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        feed = {"x": np.ascontiguousarray(x, np.float32), "t": np.asarray(t).astype(t_dtype),
                "y": np.asarray(y, np.int64)}
        return sess.run([out], feed)[0]

    return step


def torch_step_fn(module) -> StepFn:
    """Step function over a torch module ``module(x, t, y) -> eps`` (run under no_grad, in its current mode)."""
    import torch

    def step(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            eps = module(torch.from_numpy(np.ascontiguousarray(x, np.float32)),
                         torch.from_numpy(np.asarray(t, np.float32)), torch.from_numpy(np.asarray(y, np.int64)))
        return eps.numpy()

    return step


def relative_error(approx: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-sample relative L2 error ||approx - reference|| / ||reference|| (shape [B])."""
    a = approx.reshape(len(approx), -1).astype(np.float64)
    r = reference.reshape(len(reference), -1).astype(np.float64)
    return np.linalg.norm(a - r, axis=1) / np.maximum(np.linalg.norm(r, axis=1), 1e-12)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Samples in [-1, 1], [B, 1, H, W] -> uint8 [B, H, W]."""
    return np.clip(np.round((x[:, 0] + 1.0) * 127.5), 0, 255).astype(np.uint8)
