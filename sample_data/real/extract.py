"""Copy the four real cases of this folder out of the project's data folder (provenance).

Run from the repository root::

    .venv/bin/python sample_data/real/extract.py ../shared/data

One in-distribution case per shipped pipeline, unchanged except the adrenal volume, which is
one array of the MedMNIST .npz written as NIfTI (identity affine, uint8, as the pipeline
reads the .npz). Each was chosen among a handful of candidates because the shipped model
analyses it as ``ok`` with the right finding: they show what a result looks like, they do not
measure accuracy (see each pipeline's MODEL_CARD.md for that).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

COPIES = {
    "chest_pneumonia.jpeg": "chest_xray/train/PNEUMONIA/person1000_bacteria_2931.jpeg",
    "hippocampus_003.nii.gz": "hippocampus/images/hippocampus_003.nii.gz",
    "bccd_BloodImage_00003.jpg": "bccd/trainval/JPEGImages/BloodImage_00003.jpg",
    "LICENSE-BCCD.txt": "bccd/LICENSE",
}
ADRENAL = ("adrenal_val_035.nii.gz", "adrenalmnist3d/adrenalmnist3d_64.npz", "val", 35)


def main(data: Path) -> None:
    for name, source in COPIES.items():
        shutil.copyfile(data / source, HERE / name)
    import nibabel as nib
    import numpy as np

    name, source, split, index = ADRENAL
    arrays = np.load(data / source)
    volume = arrays[f"{split}_images"][index].astype(np.uint8)
    image = nib.Nifti1Image(volume, np.eye(4))
    image.header.set_xyzt_units("mm")
    nib.save(image, HERE / name)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
