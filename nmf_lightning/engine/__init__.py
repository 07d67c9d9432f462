"""The NMF fit engine, free of Lightning: what ``nmf-train``, the estimator and ``nmf-transform`` all run.

A :class:`Problem` is one fit's set-up (X as row blocks, the spec, the policies that
decide the arithmetic); its updates are passes over the row blocks (:mod:`.updates`):
each block's rows of W are updated (they need only that block of X and H) and the
block's statistics are summed; H is then updated from the sums. X is one block when it
is held in memory, many when it is streamed from disk (:mod:`.blocks`).
"""

from nmf_lightning.engine.blocks import (
    Block,
    DenseBlock,
    MaskedBlock,
    ObservedBlock,
    SparseBlock,
    from_batch,
    to_block,
)
from nmf_lightning.engine.loop import Convergence, FitResult, divergence, fit, sq_error
from nmf_lightning.engine.problem import DivergenceError, Problem, Source, Spec
from nmf_lightning.engine.updates import GradientUpdate, GramForm, PassResult, SolverUpdate, Update

__all__ = [
    "Block",
    "Convergence",
    "DenseBlock",
    "DivergenceError",
    "FitResult",
    "GradientUpdate",
    "GramForm",
    "MaskedBlock",
    "ObservedBlock",
    "PassResult",
    "Problem",
    "Source",
    "SolverUpdate",
    "Spec",
    "SparseBlock",
    "Update",
    "divergence",
    "fit",
    "from_batch",
    "sq_error",
    "to_block",
]
