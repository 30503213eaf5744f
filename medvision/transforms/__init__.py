"""MONAI dictionary-transform chains built from a pipeline's config."""

from medvision.transforms.chain import LoadVolumed, build_transforms

__all__ = ["LoadVolumed", "build_transforms"]
