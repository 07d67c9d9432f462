"""nmf-lightning: non-negative matrix factorization X ~ W H on GPUs, from Python or the command line.

``from nmf_lightning import NMF`` is a scikit-learn estimator on the training engine; it
imports neither Lightning nor Hydra. ``nmf-train`` runs configured experiments.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nmf-lightning")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

#: public names, imported when first used: ``import nmf_lightning`` stays cheap
_EXPORTS = {
    "NMF": "nmf_lightning.estimator",
    "non_negative_factorization": "nmf_lightning.estimator",
    "NMFModule": "nmf_lightning.module",
    "NMFDataModule": "nmf_lightning.data.datamodule",
}

__all__ = ["NMF", "NMFDataModule", "NMFModule", "__version__", "non_negative_factorization"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nmf_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
