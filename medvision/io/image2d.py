"""2D images (PNG, JPEG, BMP, TIFF) through Pillow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medvision.errors import UnreadableFileError
from medvision.io.boundary import check_voxel_budget, reading
from medvision.io.synthetic import EMBED_KEY, synthetic_provenance
from medvision.io.volume import Volume

__all__ = ["read_image2d"]


def read_image2d(path: Path) -> Volume:
    """Read a 2D image as ``(C, I, J)``: C is 1 for grey and 3 for colour (alpha dropped).

    Pixel spacing is unknown in these formats: pixels are 1 mm and the volume carries a warning
    saying so. The grid is placed as ITK places it (origin 0, identity direction in ITK's LPS
    frame), so pixel (i, j) sits at LPS (i, j), that is RAS (-i, -j): a saliency map or mask
    written as NIfTI lands on the same pixels as the image in ITK-based viewers. Axis ``I``
    runs along a row (left to right), ``J`` down the rows, as MONAI's PIL reader lays them out.
    """
    from PIL import Image, UnidentifiedImageError

    with reading(path, "image", UnreadableFileError):
        try:
            with Image.open(path) as opened:
                check_voxel_budget(path, (*opened.size, len(opened.getbands())),
                                   UnreadableFileError)
                opened.load()
                mode = opened.mode
                image: Image.Image = opened
                if mode in ("RGBA", "P", "PA", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
                    image = opened.convert("L" if mode == "LA" else "RGB")
                elif mode == "1":
                    image = opened.convert("L")
                array = np.asarray(image, dtype=np.float32)
                embedded = getattr(opened, "text", {}).get(EMBED_KEY)
        except UnidentifiedImageError as e:
            raise UnreadableFileError(f"{path}: not a readable image ({e})") from e
    if array.ndim == 2:
        array = array[np.newaxis]
    else:
        array = np.moveaxis(array, -1, 0)
    array = np.transpose(array, (0, 2, 1))
    # no physical size: one pixel is taken as 1 mm for the grid, and reports say "pixels"
    header: dict[str, Any] = {"format": path.suffix.lstrip(".").upper(), "mode": mode,
                              "spacing_known": False}
    synthetic = synthetic_provenance(path, [embedded] if embedded else [])
    if synthetic is not None:
        header["synthetic"] = synthetic
    return Volume(array=array, affine=np.diag([-1.0, -1.0, 1.0, 1.0]), modality="OT",
                  header=header, source=str(path))
