"""Budget allocation shared by the compression passes: pick one option per site to minimise the predicted
distortion while the summed cost (latency, bytes, MACs, parameters) stays within a budget.

This is the multiple-choice knapsack problem. `allocate` solves it exactly with scipy's MILP solver (HiGHS);
`allocate_dp` solves it by dynamic programming over a discretised cost axis and is used to cross-check the MILP
and where scipy is unavailable. Sites that must take the same choice (tensors sharing a scale, branches of a
residual join) are merged first with `tie`. `allocate_segments` is the segment form (LayerMerge): options replace
whole stretches of a sequence, and the chosen stretches must cover it once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..core.errors import GraphoptError, UsageError


@dataclass(frozen=True)
class Option:
    label: str  # e.g. "fp32", "int8", "rank=32"
    cost: float  # what the budget limits, in one unit across all sites (ms, bytes, MACs)
    distortion: float  # predicted output distortion when this option is taken (additive across sites)


@dataclass(frozen=True)
class SiteOptions:
    """The options one site offers the allocator (it takes exactly one of them)."""

    name: str
    options: tuple[Option, ...]

    def __post_init__(self):
        if not self.options:
            raise UsageError(f"site {self.name!r} has no options")


@dataclass
class Allocation:
    choice: dict[str, Option]
    cost: float
    distortion: float
    budget: float
    method: str
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)  # tied site -> original sites

    def expanded(self) -> dict[str, Option]:
        """Choices per original site, undoing `tie` (each member gets its own share of the tied option)."""
        out = {}
        for name, option in self.choice.items():
            for member in self.members.get(name, (name,)):
                out[member] = option
        return out


class BudgetInfeasible(GraphoptError):
    """No combination of options meets the budget; `best_cost` is the cheapest reachable total."""

    def __init__(self, budget: float, best_cost: float, message: str | None = None):
        super().__init__(message or f"no assignment meets the budget {budget:.6g}; "
                                    f"the cheapest reachable is {best_cost:.6g}")
        self.budget = budget
        self.best_cost = best_cost


def tie(sites: Sequence[SiteOptions],
        groups: Sequence[Sequence[str]]) -> tuple[list[SiteOptions], dict[str, tuple[str, ...]]]:
    """Merge sites that must take the same option label into one site.

    A merged site offers only the labels every member offers; its cost and distortion are the members' sums.
    Returns the new site list and a map merged name -> member names.
    """
    by_name = {s.name: s for s in sites}
    members: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    merged_sites = []
    for group in groups:
        group = tuple(dict.fromkeys(group))
        unknown = [g for g in group if g not in by_name]
        if unknown:
            raise UsageError(f"tie group names unknown sites {unknown}")
        overlap = used & set(group)
        if overlap:
            raise UsageError(f"sites {sorted(overlap)} appear in two tie groups; merge those groups first")
        if len(group) == 1:
            continue
        used.update(group)
        label_sets = [{o.label for o in by_name[g].options} for g in group]
        common = [o.label for o in by_name[group[0]].options if all(o.label in s for s in label_sets)]
        if not common:
            raise UsageError(f"tied sites {list(group)} share no option")
        options = []
        for label in common:
            picked = [next(o for o in by_name[g].options if o.label == label) for g in group]
            options.append(Option(label, sum(o.cost for o in picked), sum(o.distortion for o in picked)))
        name = "+".join(group)
        merged_sites.append(SiteOptions(name, tuple(options)))
        members[name] = group
    singles = [s for s in sites if s.name not in used]
    return singles + merged_sites, members  # untied sites in the caller's order, merged ones after them


def _check(sites: Sequence[SiteOptions], budget: float) -> None:
    if not sites:
        raise UsageError("nothing to allocate: no sites")
    if not np.isfinite(budget):
        raise UsageError(f"budget must be a finite number, got {budget}")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise UsageError("site names must be unique")
    cheapest = sum(min(o.cost for o in s.options) for s in sites)
    if cheapest > budget + 1e-12 * max(1.0, abs(budget)):
        raise BudgetInfeasible(budget, cheapest)


@dataclass(frozen=True)
class Boundary:
    """A cost paid when exactly one of sites `a` and `b` takes option `label` (e.g. a layout conversion between a
    float site and an int8 neighbour)."""

    a: str
    b: str
    label: str
    cost: float


def allocate(sites: Sequence[SiteOptions], budget: float, members: dict | None = None,
             boundaries: Sequence[Boundary] = ()) -> Allocation:
    """Exact minimum-distortion choice under `sum(cost) + boundary costs <= budget` (scipy MILP / HiGHS)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    _check(sites, budget)
    sizes = [len(s.options) for s in sites]
    n = sum(sizes)
    index, start = {}, 0
    for s, k in zip(sites, sizes):
        for j, o in enumerate(s.options):
            index[(s.name, o.label)] = start + j
        start += k
    usable = [b for b in boundaries if (b.a, b.label) in index and (b.b, b.label) in index]
    m = len(usable)  # one continuous variable d >= |x_a - x_b| per boundary, after the option variables
    cost = np.array([o.cost for s in sites for o in s.options] + [b.cost for b in usable], dtype=float)
    dist = np.array([o.distortion for s in sites for o in s.options] + [0.0] * m, dtype=float)
    one_each = np.zeros((len(sites), n + m))
    start = 0
    for i, k in enumerate(sizes):
        one_each[i, start:start + k] = 1.0
        start += k
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(cost[None, :], -np.inf, budget)]
    if usable:
        rows = np.zeros((2 * m, n + m))
        for k, b in enumerate(usable):
            xa, xb = index[(b.a, b.label)], index[(b.b, b.label)]
            rows[2 * k, [xa, xb, n + k]] = [1.0, -1.0, -1.0]  # x_a - x_b - d <= 0
            rows[2 * k + 1, [xa, xb, n + k]] = [-1.0, 1.0, -1.0]  # x_b - x_a - d <= 0
        constraints.append(LinearConstraint(rows, -np.inf, 0.0))
    integrality = np.concatenate([np.ones(n), np.zeros(m)])
    res = milp(dist, constraints=constraints, integrality=integrality, bounds=Bounds(0, 1))
    if res.status != 0 or res.x is None:
        raise GraphoptError(f"the MILP solver failed: {res.message}")
    x = np.round(res.x[:n]).astype(int)
    choice, start = {}, 0
    for s, k in zip(sites, sizes):
        choice[s.name] = s.options[int(np.argmax(x[start:start + k]))]
        start += k
    result = _result(choice, budget, "milp", members)
    result.cost += sum(b.cost for b in usable if (choice[b.a].label == b.label) != (choice[b.b].label == b.label))
    return result


def allocate_dp(sites: Sequence[SiteOptions], budget: float, resolution: int = 2000,
                members: dict | None = None) -> Allocation:
    """Multiple-choice knapsack by dynamic programming on costs rounded up to `budget / resolution` steps.

    Rounding up keeps every returned assignment within budget; the answer is optimal for the rounded costs.
    """
    _check(sites, budget)
    floor = sum(min(o.cost for o in s.options) for s in sites)
    # Shift each site's costs by its cheapest option so the grid spans only the room above the minimum.
    room = budget - floor
    step = room / resolution if room > 0 else 1.0
    cap = resolution if room > 0 else 0
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    picks = []
    for s in sites:
        base = min(o.cost for o in s.options)
        new = np.full(cap + 1, inf)
        pick = np.full(cap + 1, -1, dtype=int)
        for j, o in enumerate(s.options):
            w = int(np.ceil((o.cost - base) / step - 1e-9)) if room > 0 else (0 if o.cost <= base else cap + 1)
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[:cap + 1 - w] + o.distortion
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        best = new
        picks.append(pick)
    c = int(np.argmin(best))
    if not np.isfinite(best[c]):
        raise BudgetInfeasible(budget, floor)
    choice = {}
    for s, pick in zip(reversed(sites), reversed(picks)):
        j = int(pick[c])
        o = s.options[j]
        choice[s.name] = o
        base = min(x.cost for x in s.options)
        c -= int(np.ceil((o.cost - base) / step - 1e-9)) if room > 0 else 0
    return _result(choice, budget, "dp", members)


def _result(choice: dict[str, Option], budget: float, method: str, members) -> Allocation:
    return Allocation(choice, sum(o.cost for o in choice.values()), sum(o.distortion for o in choice.values()),
                      budget, method, dict(members or {}))


# ------------------------------------------------------------------------------------------------ segment DP
@dataclass(frozen=True)
class Segment:
    """A stretch (start, end] of a sequence of positions that one option replaces as a whole (LayerMerge's span)."""

    start: int
    end: int
    options: tuple[Option, ...]

    def __post_init__(self):
        if not self.start < self.end:
            raise UsageError(f"segment ({self.start}, {self.end}] is empty")
        if not self.options:
            raise UsageError(f"segment ({self.start}, {self.end}] has no options")


@dataclass
class SegmentAllocation:
    choice: list[tuple[Segment, Option]]  # in order along the sequence, covering it exactly
    cost: float
    distortion: float
    budget: float
    resolution: int


def allocate_segments(length: int, segments: Sequence[Segment], budget: float,
                      resolution: int | None = None) -> SegmentAllocation:
    """Cover positions 0..length with consecutive segments, one option each, minimising the summed distortion with
    the summed cost within `budget` (LayerMerge's DP: best[end][t] = min over segments (st, end] and their options
    of best[st][t - cost] + distortion).

    Costs are rounded up to steps of budget / resolution, so every answer is within budget; the default resolution
    gives at most 0.1 % of the budget of rounding over the whole cover, so rounding does not decide it."""
    if length < 1:
        raise UsageError("nothing to allocate: no positions")
    if not np.isfinite(budget) or budget <= 0:
        raise UsageError(f"budget must be a positive finite number, got {budget}")
    ending: dict[int, list[Segment]] = {}
    for s in segments:
        if s.start < 0 or s.end > length:
            raise UsageError(f"segment ({s.start}, {s.end}] lies outside 0..{length}")
        ending.setdefault(s.end, []).append(s)
    cheapest = np.full(length + 1, np.inf)  # cheapest cover of 0..j, ignoring distortion
    cheapest[0] = 0.0
    for end in range(1, length + 1):
        for s in ending.get(end, []):
            cheapest[end] = min(cheapest[end], cheapest[s.start] + min(o.cost for o in s.options))
    if not np.isfinite(cheapest[length]):
        raise UsageError(f"the segments do not cover positions 0..{length}")
    if cheapest[length] > budget * (1 + 1e-12):
        raise BudgetInfeasible(budget, float(cheapest[length]))
    resolution = resolution or max(4000, 1000 * length)
    step = budget / resolution
    cap = resolution
    inf = np.inf
    best = np.full((length + 1, cap + 1), inf)  # best[j][t]: least distortion covering 0..j at rounded cost t
    best[0, 0] = 0.0
    pick = np.full((length + 1, cap + 1, 3), -1, dtype=np.int64)  # (segment index, option index, previous cost)
    index = {id(s): i for i, s in enumerate(segments)}
    for end in range(1, length + 1):
        for s in ending.get(end, []):
            for j, o in enumerate(s.options):
                w = int(np.ceil(o.cost / step - 1e-9))
                if w > cap:
                    continue
                cand = np.full(cap + 1, inf)
                cand[w:] = best[s.start, :cap + 1 - w] + o.distortion
                better = cand < best[end]
                if better.any():
                    best[end, better] = cand[better]
                    pick[end, better] = (index[id(s)], j, 0)
                    ts = np.nonzero(better)[0]
                    pick[end, ts, 2] = ts - w
    t = int(np.argmin(best[length]))
    if not np.isfinite(best[length, t]):  # the rounding alone pushed every cover over the budget
        raise BudgetInfeasible(budget, float(cheapest[length]),
                               f"no cover meets the budget {budget:.6g} at resolution {resolution}; the cheapest "
                               f"reachable is {cheapest[length]:.6g}")
    chosen, end = [], length
    while end > 0:
        si, oi, prev = pick[end, t]
        seg = segments[int(si)]
        chosen.append((seg, seg.options[int(oi)]))
        end, t = seg.start, int(prev)
    chosen.reverse()
    return SegmentAllocation(chosen, sum(o.cost for _, o in chosen), sum(o.distortion for _, o in chosen), budget,
                             resolution)
