"""The NMF update engine, free of Lightning: what the module, ``transform`` and the tests all run.

X reaches it as row blocks (:class:`Target`): one block when X is held in memory, many
when it is streamed from disk. An update is one pass over the blocks: each block's rows
of W are updated (they need only that block of X and H) and the block's statistics are
summed; H is then updated from the sums (see :mod:`nmf_lightning.engine.updates`).
"""

from nmf_lightning.engine.loop import FitResult, data_term, divergence, fit, sq_error
from nmf_lightning.engine.target import Target, gram, to_target
from nmf_lightning.engine.updates import GradientUpdate, SolverUpdate, Update

__all__ = [
    "FitResult",
    "GradientUpdate",
    "SolverUpdate",
    "Target",
    "Update",
    "data_term",
    "divergence",
    "fit",
    "gram",
    "sq_error",
    "to_target",
]
