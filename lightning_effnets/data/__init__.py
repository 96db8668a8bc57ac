"""LightningDataModules: embedded real data or procedural generators, plus readers for standard formats."""

from lightning_effnets.data.coco import CocoDetectionDataModule
from lightning_effnets.data.digits import DigitsDataModule
from lightning_effnets.data.image_folder import ImageFolderDataModule
from lightning_effnets.data.referring import RefCOCOStyleDataModule, Vocabulary
from lightning_effnets.data.reid import Market1501DataModule, PKSampler, ReIDDataModule, ReIDDataset
from lightning_effnets.data.reid_synthetic import MultiCameraReIDDataModule
from lightning_effnets.data.shapes_detection import ShapesDetectionDataModule
from lightning_effnets.data.shapes_referring import ShapesReferringDataModule
from lightning_effnets.data.super_resolution import ImageFolderSRDataModule, PhotoSRDataModule

__all__ = ["DigitsDataModule", "ImageFolderDataModule", "CocoDetectionDataModule", "ShapesDetectionDataModule",
           "RefCOCOStyleDataModule", "ShapesReferringDataModule", "Vocabulary",
           "ImageFolderSRDataModule", "PhotoSRDataModule", "Market1501DataModule", "MultiCameraReIDDataModule",
           "PKSampler", "ReIDDataModule", "ReIDDataset"]
