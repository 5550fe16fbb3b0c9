"""The pass contract, the context passes run in, and the registry that makes passes reachable by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np

from ..core.calibration import InputSet, describe_feed, latency_feed
from ..core.errors import UsageError
from ..core.model import Model
from ..core.numerics import Tolerance, class_score_outputs
from ..core.runtime import Feed, Latency, RuntimeSettings, make_session, measure_latencies, run


@dataclass
class Decision:
    """One thing a pass did or declined to do at one site, and why."""

    site: str
    action: str  # e.g. "folded", "removed", "skipped"
    reason: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PassResult:
    model: Model
    changed: bool
    counters: dict[str, float] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # anything else for the JSON report (tables, frontiers)


@dataclass
class Context:
    """What every pass may use: inputs (fit / selection / verification: a pass reads the first two only),
    runtime settings, the latency shape, a seed and a progress callback."""

    inputs: InputSet | None = None
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    seed: int = 0
    progress: Callable[[str], None] = lambda message: None
    # every latency figure (budgets, searches, the report) is measured at this shape: `latency_batch` rows on a
    # dynamic batch axis, or exactly `latency_shapes` per input
    latency_batch: int = 1
    latency_shapes: dict[str, tuple[int, ...]] | None = None
    # output name -> "scores" | "other": which outputs are class scores (agreement, KL); the rest by heuristic
    output_kinds: dict[str, str] = field(default_factory=dict)
    # the pipeline's input model, before any pass: what `recover` distils towards (the pipeline sets it)
    original: Model | None = None

    def class_scores(self, model: Model) -> frozenset[str]:
        return class_score_outputs(model, self.output_kinds)

    def latency_feed(self, model: Model) -> Feed:
        if self.inputs is None:
            raise UsageError("latency needs input samples (Context.inputs)")
        samples = self.inputs.fit or self.inputs.verification
        return latency_feed(model, samples, batch=self.latency_batch, shapes=self.latency_shapes)


class Verifier:
    """How the pipeline runs a model to compare it with another, and how it times it: the default is one
    onnxruntime call per feed, and its outputs are compared. A pass whose result must be judged otherwise (the Taylor cache, on whole sampler
    trajectories) brings its own: `outputs` must run the pass's input model and its result alike, and return one
    {name: array} per feed; the pipeline compares those with its bounds."""

    name: str = "one onnxruntime call per feed"

    def outputs(self, model: Model, feeds: list[Feed], ctx: Context) -> list[dict[str, np.ndarray]]:
        return run(make_session(model, ctx.runtime), feeds)

    def latencies(self, before: Model, after: Model, ctx: Context) -> tuple[dict, Latency, Latency]:
        """(what was timed, latency of `before`, of `after`): one call at the latency shape, interleaved."""
        feed = ctx.latency_feed(before)
        lat = measure_latencies([make_session(before, ctx.runtime), make_session(after, ctx.runtime)], feed,
                                threads=ctx.runtime.intra_op_threads)
        return describe_feed(feed), lat[0], lat[1]


DEFAULT_VERIFIER = Verifier()


class Pass:
    """Base class. Subclasses are frozen dataclasses whose fields are the pass's validated parameters."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    exact: ClassVar[bool] = True  # lossy passes get a looser default verification bound
    # "input": the result is checked against the pass's own input; "original": against the pipeline's original
    # (recover, which moves the model back towards it), and then the user's bounds wait for it
    judged_against: ClassVar[str] = "input"
    # where a search (graphopt.search) places this family in a recipe: "structure" (first), "recover" (after
    # a lossy step), "quantize" (last), or "" (never searched)
    search_role: ClassVar[str] = ""

    def run(self, model: Model, ctx: Context) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def search_levels(cls, speedup: float | None, size_mb: float | None, floor: dict) -> list["Pass"]:
        """The settings a search tries of this family for a whole-model speed-up target and/or size budget and a
        fidelity floor (`floor`: max_drop in accuracy points, min_agreement, min_cosine; the ones given),
        spanning its range from light to strong; each is built and measured as a whole model."""
        return []

    def preflight(self, model: Model, inputs: InputSet) -> None:
        """Raise a GraphoptError before any pass runs when this pass cannot run on this model and these inputs
        (a missing optional dependency, an input it refuses), so the user hears it before minutes of work."""

    def tolerance(self) -> Tolerance:
        """The bound this pass's result must keep against its own input: strict for exact rewrites, a guard
        that catches a broken result for lossy ones (the user's bound is on the pipeline's end result)."""
        return Tolerance.default_for(lossy=not self.exact)

    def verifier(self) -> Verifier:
        return DEFAULT_VERIFIER

    def params(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def spec(self) -> str:
        """`name:key=value,...` with only the parameters that differ from their defaults (what `create` and
        `--pass` read back)."""
        fields = {f.name: f for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else {}
        changed = {k: v for k, v in self.params().items()
                   if fields[k].default is dataclasses.MISSING or v != fields[k].default}
        args = ",".join(f"{k}={v}" for k, v in changed.items())
        return f"{self.name}:{args}" if args else self.name

    def __str__(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}:{args}" if args else self.name


def speedup_levels(target: float | None) -> list[float]:
    """The speed-ups a structure family is tried at for the speed-up it must bring (a search passes what the
    quantized levels leave to it): the steps within a factor 1.6 of it, at least the nearest one; the first few
    for a size-only budget."""
    steps = (1.25, 1.5, 2.0, 3.0, 4.0, 6.0)
    if target is None:
        return list(steps[:3])
    near = [s for s in steps if target / 1.6 <= s <= target * 1.6]
    return near or [min(steps, key=lambda s: abs(s - target))]


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """`[#####.....]` for progress messages of long steps."""
    filled = int(width * done / max(1, total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY:
        raise TypeError(f"two passes are named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def create(name: str, params: dict | None = None) -> Pass:
    """Build a registered pass from its name and raw parameters (strings from the CLI, values from TOML)."""
    params = dict(params or {})
    if name not in REGISTRY:
        raise UsageError(f"unknown pass {name!r}; known passes: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise UsageError(f"pass {name!r} has no parameter {', '.join(unknown)} (its parameters: {known})")
    converted = {k: _convert(name, k, v, fields[k]) for k, v in params.items()}
    try:
        return cls(**converted)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"pass {name!r}: {exc}") from None


def _convert(pass_name: str, key: str, value, f: dataclasses.Field):
    """Turn a CLI string into the field's type (TOML values already have types)."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    optional = "None" in kind
    kind = kind.split("|")[0].strip()
    if not isinstance(value, str) or kind == "str":
        return value
    if optional and value.lower() == "none":
        return None
    try:
        if kind == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except ValueError:
        raise UsageError(f"pass {pass_name!r}: parameter {key}={value!r} is not a valid {kind}") from None
    return value


def parse_pass_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`name:key=value,key=value` (the CLI's --pass syntax) -> (name, params)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise UsageError(f"--pass {spec!r}: missing pass name")
    params = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--pass {spec!r}: expected key=value, got {item!r}")
        params[key.strip()] = value.strip()
    return name, params
