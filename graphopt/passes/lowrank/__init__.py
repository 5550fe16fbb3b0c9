"""lowrank: low-rank factorization of Gemm/MatMul/Conv weights. The pass (lowrank.py) chooses ranks under a
budget; factorize.py holds the SVD / whitened-SVD math; rewrite.py finds sites and rewrites them.

May import: passes.base, analysis, core. Never another pass family.
"""

from .lowrank import LowRank

__all__ = ["LowRank"]
