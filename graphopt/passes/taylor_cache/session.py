"""TaylorCacheSession: a drop-in for onnxruntime.InferenceSession in a sampler loop, for a cached model.

It shows only the original model's inputs and outputs. Each `run` is one sampler step, in order; `reset()` starts a
new trajectory (`ddim_sample` calls it). The session owns the schedule (read from the model's metadata, which the
pass writes; keyword arguments override it), the step index, the finite differences and the state: in the `if`
lowering it feeds the factors back from the `.next` outputs, in `split` and `lite` it keeps them in numpy. On the
CPU provider the state is a small numpy array per region that onnxruntime reads in place, so there is no IOBinding
here; a device provider would bind the `.next` outputs to the next step's inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnxruntime as ort

from ...core.errors import InputError, UsageError
from ...core.model import Model
from ...core.runtime import RuntimeSettings, make_session, session_options
from .lower import (COEF, DID_FULL, FULL, GATE, GATE_COEF, GATE_ERROR, GATE_INV_DELTA, INV_DELTA, THRESHOLD, Part,
                    read_meta, split_parts)
from .plan import Region
from .schedule import Schedule, StepClock, empty_state, forecast, gate_error, refresh


@dataclass(frozen=True)
class Arg:
    """What get_inputs()/get_outputs() return (onnxruntime's NodeArg fields)."""

    name: str
    type: str
    shape: list


class TaylorCacheSession:
    def __init__(self, model, steps: int | None = None, *, interval: int | None = None, order: int | None = None,
                 threshold: float | None = None, warmup: int | None = None, tail: int | None = None,
                 gate_order: int | None = None, threads: int | None = None,
                 runtime: RuntimeSettings | None = None):
        self.model = _as_model(model)
        meta = read_meta(self.model.proto)
        if meta is None:
            raise InputError("not a Taylor-cache model (no graphopt.taylor_cache metadata): build it with "
                             "`graphopt optimize MODEL --pass taylor_cache -o OUT`")
        self.meta = meta
        self.lowering = meta["lowering"]
        built = Schedule(**meta["schedule"])
        asked = {k: v for k, v in dict(steps=steps, interval=interval, order=order, threshold=threshold,
                                        warmup=warmup, tail=tail, gate_order=gate_order).items() if v is not None}
        self.schedule = replace(built, **asked)
        if self.lowering == "if":
            if self.schedule.order > built.order:
                raise UsageError(f"this model holds Taylor factors up to order {built.order}: order "
                                 f"{self.schedule.order} needs a model built with order={self.schedule.order}")
            if self.schedule.gate_order > built.gate_order:
                raise UsageError(f"this model's gate holds factors up to order {built.gate_order}")
        if self.schedule.gated and not built.gated:
            raise UsageError("this model was built without the CG-Taylor gate: rebuild it with threshold= to gate")
        self.built = built
        self.regions = [Region(r["name"], r["target"], r["base"], ()) for r in meta["regions"]]
        self.ranks = {r["name"]: r["rank"] for r in meta["regions"]}
        self.gate = meta.get("gate")
        self.runtime = runtime or RuntimeSettings(**({"intra_op_threads": threads} if threads else {}))
        g = self.model.graph
        self._inputs = [node_arg(v) for v in g.input if v.name in meta["inputs"]]
        self._outputs = [node_arg(v) for v in g.output if v.name in meta["outputs"]]
        if self.lowering in ("if", "lite"):
            self._session = make_session(self.model, self.runtime)
        else:
            from .plan import regions as find_regions  # the partition is recomputed from the stored targets
            from ...analysis.depgraph import DependencyGraph

            keep = {self.gate["tensor"]} if self.gate else set()
            regs = find_regions(DependencyGraph(self.model), [(r.name, r.target, r.base) for r in self.regions], keep)
            self.parts: list[Part] = split_parts(self.model, regs, keep)
            self._part_sessions = [_part_session(p, self.runtime) for p in self.parts]
        self.reset()

    # ------------------------------------------------------------------ onnxruntime's face
    def get_inputs(self) -> list[Arg]:
        return list(self._inputs)

    def get_outputs(self) -> list[Arg]:
        return list(self._outputs)

    def reset(self) -> None:
        """Start a new trajectory: step 0, no cached state."""
        self.clock = StepClock(self.schedule)
        self.states: dict[str, np.ndarray] = {}
        self.gate_errors: list[float | None] = []
        self._shapes: dict[str, tuple] | None = None

    @property
    def full_steps(self) -> int:
        """Steps of the current (or last) trajectory that ran in full."""
        return sum(self.clock.history)

    @property
    def history(self) -> list[bool]:
        return list(self.clock.history)

    def run(self, output_names, input_feed: dict, run_options=None) -> list[np.ndarray]:
        feed = self._checked(input_feed)
        self.clock.check_next()
        try:
            values, full = getattr(self, f"_step_{self.lowering}")(feed)
        except ort.capi.onnxruntime_pybind11_state.Fail as exc:  # pragma: no cover - ORT's own message, one line
            raise InputError(f"onnxruntime failed at step {self.clock.step}: {str(exc).splitlines()[0]}") from None
        self.clock.advance(full)
        names = output_names or [o.name for o in self._outputs]
        unknown = [n for n in names if n not in values or n not in self.meta["outputs"]]
        if unknown:
            raise UsageError(f"unknown output(s) {', '.join(unknown)}; the model's outputs: "
                             f"{', '.join(self.meta['outputs'])}")
        return [values[n] for n in names]

    def _checked(self, input_feed: dict) -> dict:
        owned = [k for k in input_feed if k.startswith("taylor.")]
        if owned:
            raise UsageError(f"{', '.join(owned)}: the cache's state is owned by the session; feed only the model's "
                             f"inputs ({', '.join(self.meta['inputs'])})")
        missing = [k for k in self.meta["inputs"] if k not in input_feed]
        extra = [k for k in input_feed if k not in self.meta["inputs"]]
        if missing or extra:
            raise UsageError(f"inputs {', '.join(self.meta['inputs'])} expected; missing {missing or 'none'}, "
                             f"unknown {extra or 'none'}")
        feed = {k: np.asarray(v) for k, v in input_feed.items()}
        shapes = {k: v.shape for k, v in feed.items()}
        if self._shapes is not None and shapes != self._shapes:
            changed = next(k for k in shapes if shapes[k] != self._shapes[k])
            raise UsageError(f"input {changed} changed shape from {list(self._shapes[changed])} to "
                             f"{list(shapes[changed])} within a trajectory (the cached state has the old shape): "
                             "call reset() before a trajectory of another batch")
        self._shapes = shapes
        return feed

    # ------------------------------------------------------------------ lowerings
    def _orders(self, gate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """coef and inv_delta at this step: the `if` model's state has the built size (entries above the asked
        order are zero, so those factors stay zero), split and lite keep just the asked order."""
        asked = self.schedule.gate_order if gate else self.schedule.order
        size = (self.built.gate_order if gate else self.built.order) if self.lowering == "if" else asked
        coef, inv = self.clock.coef(size), self.clock.inv_delta(size)
        coef[asked + 1:] = 0
        inv[asked:] = 0
        return coef, inv

    def _state(self, name: str, order: int, rank: int) -> np.ndarray:
        return self.states.get(name, empty_state(order, rank))

    def _step_if(self, feed: dict):
        i = self.clock.step
        coef, inv = self._orders()
        feed = dict(feed)
        feed[FULL] = np.array([self.schedule.forced_full(i)])
        feed[COEF] = coef
        if self.built.order:
            feed[INV_DELTA] = inv
        for r in self.regions:
            feed[r.state] = self._state(r.state, self.built.order, self.ranks[r.name])
        if self.gate:
            gcoef, ginv = self._orders(gate=True)
            feed[GATE] = self._state(GATE, self.built.gate_order, self.gate["rank"])
            feed[GATE_COEF] = gcoef
            feed[THRESHOLD] = np.array([self.schedule.threshold], np.float32)
            if self.built.gate_order:
                feed[GATE_INV_DELTA] = ginv
        names = [o.name for o in self._session.get_outputs()]
        values = dict(zip(names, self._session.run(None, feed)))
        full = bool(values[DID_FULL].reshape(-1)[0])
        if full:  # a forecast step returns empty states: the factors did not change
            for r in self.regions:
                self.states[r.state] = values[r.state_out]
        if self.gate:
            self.states[GATE] = values[GATE + ".next"]
            self.gate_errors.append(float(values[GATE_ERROR]))
        return values, full

    def _step_split(self, feed: dict):
        i = self.clock.step
        coef, inv = self._orders()
        full = None if self.gate else self.schedule.forced_full(i)
        values = dict(feed)
        for part, sess in zip(self.parts, self._part_sessions):
            if part.region is not None:
                if full is None:
                    raise UsageError("internal error: a region runs before the gate decided")  # pragma: no cover
                r = self.regions[part.region]
                if not full:
                    f = forecast(self._state(r.state, self.schedule.order, self.ranks[r.name]), coef)
                    values[r.target] = (values[r.base] + f) if r.base else f
                    continue
            values.update(zip(part.outputs, sess.run(part.outputs, {k: values[k] for k in part.inputs})))
            if part.region is not None:
                r = self.regions[part.region]
                residual = values[r.target] - values[r.base] if r.base else values[r.target]
                self.states[r.state] = refresh(self._state(r.state, self.schedule.order, self.ranks[r.name]),
                                               residual, inv)
            elif full is None and self.gate["tensor"] in values:
                full = self._gate(values[self.gate["tensor"]], i)
        return values, bool(full)

    def _gate(self, y0: np.ndarray, i: int) -> bool:
        gcoef, ginv = self._orders(gate=True)
        state = self._state(GATE, self.schedule.gate_order, self.gate["rank"])
        err = gate_error(forecast(state, gcoef), y0)
        self.gate_errors.append(err)
        full = self.schedule.forced_full(i) or not err < self.schedule.threshold
        if full:
            self.states[GATE] = refresh(state, y0, ginv)
        return full

    def _step_lite(self, feed: dict):
        i = self.clock.step
        coef, inv = self._orders()
        full = self.schedule.forced_full(i)
        if full:
            names = [o.name for o in self._outputs]
            values = dict(zip(names, self._session.run(names, feed)))
            for n in names:
                self.states[n] = refresh(self._state(n, self.schedule.order, values[n].ndim), values[n], inv)
            return values, True
        return {n: forecast(s, coef) for n, s in self.states.items()}, False


def _part_session(part: Part, runtime: RuntimeSettings) -> ort.InferenceSession:
    """A session for one split part. Its thread pool does not spin-wait after a run: the parts run one after
    the other, and spinning pools of idle parts would take the cores from the part that runs."""
    opts = session_options(runtime)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(part.proto.SerializeToString(), opts, providers=list(runtime.providers))


def _as_model(model) -> Model:
    if isinstance(model, Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return Model.from_proto(model)
    if isinstance(model, (str, os.PathLike)):
        return Model.load(model)
    raise UsageError(f"TaylorCacheSession takes a path, a graphopt Model or an onnx.ModelProto, not {type(model).__name__}")


def node_arg(vi: onnx.ValueInfoProto) -> Arg:
    """onnxruntime's NodeArg fields of a declared graph input or output."""
    tt = vi.type.tensor_type
    elem = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    type_name = {"float32": "float", "float64": "double"}.get(elem, elem)
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return Arg(vi.name, f"tensor({type_name})", shape)
