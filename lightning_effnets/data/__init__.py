"""LightningDataModules: embedded real data or procedural generators, plus readers for standard formats."""

from lightning_effnets.data.digits import DigitsDataModule
from lightning_effnets.data.image_folder import ImageFolderDataModule

__all__ = ["DigitsDataModule", "ImageFolderDataModule"]
