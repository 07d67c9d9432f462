"""Data sources and the datamodule that feeds them to training."""

from nmf_lightning.data.datamodule import NMFDataModule
from nmf_lightning.data.files import from_file
from nmf_lightning.data.newsgroups import newsgroups
from nmf_lightning.data.sources import Matrix, digits, known_factors, synthetic, toy

__all__ = [
    "Matrix",
    "NMFDataModule",
    "digits",
    "from_file",
    "known_factors",
    "newsgroups",
    "synthetic",
    "toy",
]
