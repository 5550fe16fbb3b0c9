"""prune: structured pruning of channel groups and attention heads. The pass (prune.py) scores and allocates,
build.py builds the smaller network exactly; the channel groups come from analysis.channel_groups.

May import: passes.base, analysis, core. Never another pass family.
"""

from .prune import Prune

__all__ = ["Prune"]
