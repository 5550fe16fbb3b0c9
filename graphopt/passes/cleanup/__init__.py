"""cleanup: exact rewrites (BatchNorm folding, Identity/Dropout removal, constant folding, dead-code removal).

May import: passes.base, analysis, core. Never another pass family.
"""

from .cleanup import DEFAULT_RECIPE, FoldBatchNorm, FoldConstants, RemoveDead, RemoveIdentity

__all__ = ["DEFAULT_RECIPE", "FoldBatchNorm", "FoldConstants", "RemoveDead", "RemoveIdentity"]
