"""The shared budget allocator against brute force on small cases."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.analysis.allocate import BudgetInfeasible, Option, SiteOptions, allocate, allocate_dp, tie
from graphopt.core.errors import UsageError


def brute_force(sites, budget):
    best = None
    for combo in itertools.product(*(s.options for s in sites)):
        cost = sum(o.cost for o in combo)
        if cost <= budget + 1e-9:
            d = sum(o.distortion for o in combo)
            if best is None or d < best - 1e-12:
                best = d
    return best


def test_hand_checked_case():
    # Two layers, each fp32 (slow, exact) or int8 (fast, some error). A budget of 14 allows one int8 layer:
    # it must go where it hurts least.
    sites = [SiteOptions("conv1", (Option("fp32", 10, 0.0), Option("int8", 4, 0.30))),
             SiteOptions("conv2", (Option("fp32", 10, 0.0), Option("int8", 4, 0.05)))]
    for solve in (allocate, allocate_dp):
        result = solve(sites, budget=14)
        assert {k: o.label for k, o in result.choice.items()} == {"conv1": "fp32", "conv2": "int8"}
        assert result.cost == 14 and result.distortion == pytest.approx(0.05)
    assert {o.label for o in allocate(sites, 8).choice.values()} == {"int8"}


OPTION = st.tuples(st.integers(0, 20), st.floats(0, 5, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(raw=st.lists(st.lists(OPTION, min_size=1, max_size=4), min_size=1, max_size=5),
       slack=st.integers(0, 40))
def test_milp_and_dp_match_brute_force(raw, slack):
    sites = [SiteOptions(f"s{i}", tuple(Option(f"o{j}", float(c), d) for j, (c, d) in enumerate(opts)))
             for i, opts in enumerate(raw)]
    budget = float(sum(min(c for c, _ in opts) for opts in raw) + slack)
    expected = brute_force(sites, budget)
    milp = allocate(sites, budget)
    assert milp.cost <= budget + 1e-9 and milp.distortion == pytest.approx(expected, abs=1e-6)
    dp = allocate_dp(sites, budget, resolution=max(1, slack))  # integer costs: the grid is exact
    assert dp.cost <= budget + 1e-9 and dp.distortion == pytest.approx(expected, abs=1e-6)


def test_infeasible_budget_reports_the_cheapest_reachable():
    sites = [SiteOptions("a", (Option("x", 5, 0), Option("y", 3, 1))), SiteOptions("b", (Option("x", 4, 0),))]
    with pytest.raises(BudgetInfeasible) as info:
        allocate(sites, 6)
    assert info.value.best_cost == 7
    with pytest.raises(BudgetInfeasible):
        allocate_dp(sites, 6)


def test_tied_sites_take_the_same_option():
    sites = [SiteOptions("add_in1", (Option("fp32", 5, 0), Option("int8", 2, 0.1))),
             SiteOptions("add_in2", (Option("fp32", 5, 0), Option("int8", 2, 0.4), Option("int4", 1, 0.9))),
             SiteOptions("other", (Option("fp32", 5, 0), Option("int8", 2, 0.2)))]
    merged, members = tie(sites, [["add_in1", "add_in2"]])
    assert [s.name for s in merged] == ["other", "add_in1+add_in2"]
    result = allocate(merged, budget=9, members=members)
    chosen = {k: o.label for k, o in result.expanded().items()}
    assert chosen["add_in1"] == chosen["add_in2"]
    assert chosen == {"add_in1": "int8", "add_in2": "int8", "other": "fp32"}
    with pytest.raises(UsageError, match="two tie groups"):
        tie(sites, [["add_in1", "add_in2"], ["add_in2", "other"]])


def test_boundary_costs_make_float_runs_contiguous():
    from graphopt.analysis.allocate import Boundary

    # a, b, c in a chain: each float site costs 1 and removes 1 distortion; a border between a float and an int8
    # neighbour costs 0.6. Budget 2: two float sites cost at least 2 + 0.6, so one fits, at an end of the chain
    # (1 + 0.6; in the middle it would pay two borders, 2.2).
    chain = [SiteOptions(n, (Option("int8", 0.0, 1.0), Option("fp32", 1.0, 0.0))) for n in "abc"]
    borders = [Boundary("a", "b", "fp32", 0.6), Boundary("b", "c", "fp32", 0.6)]
    without = allocate(chain, 2.0)
    assert sum(o.label == "fp32" for o in without.choice.values()) == 2
    one = allocate(chain, 2.0, boundaries=borders)
    assert [o.label for o in one.choice.values()].count("fp32") == 1 and one.cost == pytest.approx(1.6)
    assert one.choice["b"].label == "int8"
    # with room for all three, the whole chain goes float and pays no border at all
    whole = allocate(chain, 3.2, boundaries=borders)
    assert all(o.label == "fp32" for o in whole.choice.values()) and whole.cost == pytest.approx(3.0)
