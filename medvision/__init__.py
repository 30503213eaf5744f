"""medvision: diagnose medical images with MONAI models and explain every prediction."""

import logging

from medvision.errors import MedvisionError
from medvision.io import Volume, read_volume, write_volume

__version__ = "0.1.0"

__all__ = ["MedvisionError", "Volume", "__version__", "read_volume", "write_volume"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
