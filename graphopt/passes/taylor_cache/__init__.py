"""taylor_cache: TaylorSeer / CG-Taylor feature forecasting across diffusion sampler steps, in the ONNX graph.

plan.py chooses what a level forecasts (regions, from analysis/blocks.py's block stack); lower.py writes the `if`
model and cuts the `split` parts; schedule.py is the schedule and the Taylor recursion in numpy (the reference the
graph computes exactly); session.py is the driver (TaylorCacheSession); ddim.py the sampler; verify.py judges a
cached model on whole trajectories; taylor_cache.py is the pass.

May import: passes.base, analysis, core. Never another pass family.
"""

from .ddim import ddim_sample
from .schedule import Schedule
from .session import TaylorCacheSession
from .taylor_cache import TaylorCache

__all__ = ["TaylorCache", "TaylorCacheSession", "Schedule", "ddim_sample"]
