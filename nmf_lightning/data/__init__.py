"""Data sources and the datamodule that feeds them to training.

The sources are plain NumPy/SciPy; only the datamodule needs Lightning, so it is
imported when first asked for (``import nmf_lightning.transform`` stays Lightning-free).
"""

from typing import Any

from nmf_lightning.data.files import from_file
from nmf_lightning.data.newsgroups import newsgroups
from nmf_lightning.data.sources import Matrix, digits, known_factors, spectrogram, synthetic, toy

__all__ = [
    "Matrix",
    "NMFDataModule",
    "digits",
    "from_file",
    "known_factors",
    "newsgroups",
    "spectrogram",
    "synthetic",
    "toy",
]


def __getattr__(name: str) -> Any:
    if name == "NMFDataModule":
        from nmf_lightning.data.datamodule import NMFDataModule

        return NMFDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
