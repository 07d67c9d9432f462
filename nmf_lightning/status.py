"""A run's status, as its ``metrics.json`` records it and a sweep's report counts it.

- ``completed``: trained to the end; ``factors.npz`` fits X as training found.
- ``not_nonnegative``: trained to the end with ``model.project=false``, but the trained
  factors were not non-negative and the clamped ones in ``factors.npz`` fit X worse
  (``reason`` says by how much and what gives an NMF); the run still succeeded.
- ``degenerate``: the factors collapsed (all zero, or no better than zero); no factors written.
- ``interrupted``: a signal stopped it after a consistent update; it continues from its checkpoint.
- ``failed``: an error ended it (``error`` says which).
"""

#: statuses of a run that ended with its factors written (exit code 0)
SUCCEEDED = ("completed", "not_nonnegative")
#: statuses of a run whose results are in its folder
FINISHED = (*SUCCEEDED, "degenerate", "interrupted")
