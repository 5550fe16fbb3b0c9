"""Graph analysis shared by the passes: the dependency graph, channel groups (with a rule registry a user can
extend for custom ops), and the budget allocator.

May import: core (and modules of analysis). Never a pass.
"""
