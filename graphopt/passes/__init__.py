"""Passes, registered by name for the CLI and recipes."""

from .base import REGISTRY, Context, Decision, Pass, PassResult, create, parse_pass_spec, register
from .cleanup.cleanup import DEFAULT_RECIPE, FoldBatchNorm, FoldConstants, RemoveDead, RemoveIdentity
from .qdq.qdq import QDQ
from .lowrank.lowrank import LowRank
from .prune.prune import Prune
from .recover.recover import Recover
from .layermerge.layermerge import LayerMerge
from .taylor_cache.taylor_cache import TaylorCache

__all__ = ["REGISTRY", "Context", "Decision", "Pass", "PassResult", "create", "parse_pass_spec", "register",
           "DEFAULT_RECIPE", "LayerMerge", "TaylorCache", "LowRank", "Prune", "QDQ", "Recover", "FoldBatchNorm", "FoldConstants", "RemoveDead", "RemoveIdentity"]
