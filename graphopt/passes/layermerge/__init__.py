"""layermerge: depth compression (LayerMerge). spans.py finds positions, skips, breaks and valid spans in the
dependency graph; merge.py composes a span's convs into one (and refits it); tables.py measures the latency and
importance tables; build.py rewrites the model; layermerge.py is the pass (tables, segment DP, build, measure).

May import: passes.base, analysis, core. Never another pass family.
"""

from .layermerge import LayerMerge

__all__ = ["LayerMerge"]
