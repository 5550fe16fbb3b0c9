"""The channel-rule registry: a custom-domain op freezes its groups until the user registers a rule for it;
registration is undoable and validated; the groups a registered rule opens build exactly."""

from __future__ import annotations

import re

import numpy as np
import pytest
from builders import fvi, init
from onnx import helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from graphopt.analysis import channel_groups
from graphopt.analysis.channel_groups import (CHANNEL_RULES, ChannelRule, analyse, channel_rule,
                                              register_channel_rule, unregister_channel_rule)
from graphopt.core.model import Model
from graphopt.passes.prune.build import build, zero_channels

DOMAIN = "my.ops"


class ChannelScale(OpRun):
    """my.ops::ChannelScale(x[, scale]): x * alpha, times scale[c] per channel when given (channels independent)."""

    op_domain = DOMAIN

    def _run(self, x, scale=None, alpha=None):
        y = x * np.float32(1.0 if alpha is None else alpha)
        return ((y if scale is None else y * scale).astype(x.dtype),)


def net(with_scale: bool = False, seed: int = 0) -> Model:
    """conv(8) -> my.ops::ChannelScale -> Relu -> conv(4): the first conv's 8 channels cross the custom op."""
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inputs = ["a", "s"] if with_scale else ["a"]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("ChannelScale", inputs, ["b"], name="cs", domain=DOMAIN, alpha=2.0),
             helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="c2")]
    inits = [init("w1", w(8, 3, 3, 3)), init("b1", w(8)), init("w2", w(4, 8, 1, 1)), init("b2", w(4))]
    if with_scale:
        inits.append(init("s", rng.uniform(0.5, 2, (8, 1, 1)).astype(np.float32)))
    graph = helper.make_graph(nodes, "g", [fvi("x", [1, 3, 6, 6])], [fvi("y", [1, 4, 6, 6])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    proto.ir_version = 8
    return Model(proto)


def conv1_group(cg):
    return next(g for g in cg.groups() if g.producers == ["c1"])


def assert_builds_exactly(model: Model, cg) -> None:
    """Dropping channels 1, 4, 6 physically computes what zeroing them does (run with onnx's reference evaluator,
    which can be taught the custom op; onnxruntime cannot)."""
    g = conv1_group(cg)
    keep = {g.id: np.array([0, 2, 3, 5, 7])}
    pruned, zeroed = build(model, cg, keep), zero_channels(model, cg, keep)
    assert pruned.parameter_count() < model.parameter_count()
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)}
    run = lambda m: ReferenceEvaluator(m.proto, new_ops=[ChannelScale]).run(None, feeds)[0]  # noqa: E731
    np.testing.assert_allclose(run(pruned), run(zeroed), rtol=1e-4, atol=1e-4)


def test_custom_op_freezes_its_groups_without_a_rule():
    g = conv1_group(analyse(net()))
    assert g.frozen and not g.prunable
    assert any("ChannelScale" in r and "no channel rule" in r for r in g.reasons)


def test_pass_through_rule_makes_the_groups_prunable_and_is_undone_after():
    model = net()
    with channel_rule("ChannelScale", "pass_through", domain=DOMAIN) as rule:
        assert isinstance(rule, ChannelRule) and CHANNEL_RULES[(DOMAIN, "ChannelScale")] is rule
        cg = analyse(model)
        g = conv1_group(cg)
        assert g.prunable and g.size == 8 and "c2" in g.consumers
        assert_builds_exactly(model, cg)
    assert (DOMAIN, "ChannelScale") not in CHANNEL_RULES
    assert conv1_group(analyse(model)).frozen


def test_elementwise_rule_slices_a_per_channel_constant():
    model = net(with_scale=True)
    with channel_rule("ChannelScale", "elementwise", domain=DOMAIN):
        cg = analyse(model)
        assert conv1_group(cg).prunable
        assert cg.plans["cs"].slices == [(1, 0, "b")]  # the scale loses the pruned channels too
        assert_builds_exactly(model, cg)


def test_function_rule_and_explicit_unregister():
    seen = []

    def rule(cg, node, reads):  # a user's own rule, written against the analysis helpers
        seen.append(node.name)
        tr = cg.tracked[reads[0]]
        cg._set(node.output[0], tr.axis, tr.layout)

    assert register_channel_rule("ChannelScale", rule, domain=DOMAIN) is None
    try:
        assert conv1_group(analyse(net())).prunable and seen == ["cs"]
    finally:
        assert unregister_channel_rule("ChannelScale", domain=DOMAIN).apply is rule
    assert unregister_channel_rule("ChannelScale", domain=DOMAIN) is None
    assert conv1_group(analyse(net())).frozen


def test_overriding_a_builtin_rule_restores_it():
    builtin = CHANNEL_RULES[("", "Relu")]
    with channel_rule("Relu", lambda cg, node, reads: cg._freeze_inputs(node, "frozen on purpose"), domain="ai.onnx"):
        with channel_rule("ChannelScale", "pass_through", domain=DOMAIN):
            assert "frozen on purpose" in conv1_group(analyse(net())).reasons
    assert CHANNEL_RULES[("", "Relu")] is builtin


@pytest.mark.parametrize("rule, error, words", [
    (42, TypeError, "a channel rule is a ChannelRule"),
    ({"pass_through": True}, TypeError, "got dict"),
    ("passthrough", ValueError, "unknown channel rule 'passthrough'"),
    (lambda node: None, TypeError, "must take (cg, node, reads)"),
])
def test_unknown_rule_shapes_are_refused_clearly(rule, error, words):
    before = dict(CHANNEL_RULES)
    with pytest.raises(error, match=re.escape(words)):
        register_channel_rule("ChannelScale", rule, domain=DOMAIN)
    assert CHANNEL_RULES == before  # nothing half-registered
    with pytest.raises(TypeError, match="strings"):
        register_channel_rule(None, "pass_through")


def test_builtin_rule_names_are_listed():
    assert {"pass_through", "elementwise", "pool"} <= set(channel_groups.BUILTIN_RULES)
