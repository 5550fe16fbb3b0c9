"""recover: knowledge distillation of a rewritten model back towards the pipeline's original, on the user's own
inputs. The pass (recover.py) chooses what trains and what it matches; distill.py holds the batches, image
augmentation, losses and the training loop. The model runs in torch through core.torch_exec.

May import: passes.base, analysis, core (torch only inside run: it is an optional extra). Never another family.
"""

from .recover import Recover

__all__ = ["Recover"]
