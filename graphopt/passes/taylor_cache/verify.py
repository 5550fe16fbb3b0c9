"""Judging a cached model on whole sampler trajectories (the pipeline's verifier hook).

For the verification feeds, the labels they hold (or the null class when the model takes none) are sampled with
DDIM from fixed noise, once through the model as it is and once through the cached model's TaylorCacheSession;
the pipeline compares the final samples (output `sample`) with its bounds. Latency is one whole trajectory.
"""

from __future__ import annotations

import numpy as np

from ...core.runtime import Latency, make_session, measure_latencies
from ..base import Context, Verifier
from .ddim import ddim_sample, sampler_roles
from .lower import read_meta
from .session import TaylorCacheSession

SAMPLE = "sample"


def denoiser_session(model, ctx_runtime):
    """A TaylorCacheSession for a cached model, a plain onnxruntime session otherwise."""
    if read_meta(model.proto) is not None:
        return TaylorCacheSession(model, runtime=ctx_runtime)
    return make_session(model, ctx_runtime)


class TrajectoryVerifier(Verifier):
    def __init__(self, steps: int, guidance: float, null_class: int | None, seed: int):
        self.steps, self.guidance, self.null_class, self.seed = steps, guidance, null_class, seed
        self.name = f"DDIM trajectories of {steps} steps" + (f", guidance {guidance:g}" if guidance != 1 else "")

    def labels(self, session, feeds) -> tuple[list[np.ndarray], tuple[int, ...]]:
        sample, _, label = sampler_roles(session.get_inputs())
        labels = [np.asarray(f[label]).reshape(-1) if label else np.zeros(len(f[sample]), np.int64) for f in feeds]
        return labels, tuple(feeds[0][sample].shape[1:])

    def sample(self, session, labels: np.ndarray, shape: tuple[int, ...], seed: int | None = None) -> np.ndarray:
        return ddim_sample(session, labels, self.steps, self.seed if seed is None else seed, self.guidance,
                           null_class=self.null_class, shape=shape)

    def outputs(self, model, feeds, ctx: Context) -> list[dict[str, np.ndarray]]:
        if not feeds:
            return []
        session = denoiser_session(model, ctx.runtime)
        labels, shape = self.labels(session, feeds)
        x0 = self.sample(session, np.concatenate(labels), shape)
        out, at = [], 0
        for lab in labels:
            out.append({SAMPLE: x0[at: at + len(lab)]})
            at += len(lab)
        return out

    def latencies(self, before, after, ctx: Context) -> tuple[dict, Latency, Latency]:
        feeds = (ctx.inputs.fit or ctx.inputs.verification)[:1]
        sessions = [denoiser_session(m, ctx.runtime) for m in (before, after)]
        labels, shape = self.labels(sessions[0], feeds)
        lab = np.resize(np.concatenate(labels), ctx.latency_batch)
        runners = [_Trajectory(self, s, lab, shape) for s in sessions]
        lat = measure_latencies(runners, {}, warmup=1, repeats=3, min_seconds=0.0, max_seconds=10.0,
                                threads=ctx.runtime.intra_op_threads)
        return {"sample": [len(lab), *shape], "steps": [self.steps]}, lat[0], lat[1]


class _Trajectory:
    """One whole trajectory per `run`, so that the shared interleaved timer times trajectories."""

    def __init__(self, verifier: TrajectoryVerifier, session, labels, shape):
        self.verifier, self.session, self.labels, self.shape = verifier, session, labels, shape

    def get_outputs(self):
        return []

    def run(self, names, feed):
        return [self.verifier.sample(self.session, self.labels, self.shape)]
