"""Reading a DICOM series: medvision.read_volume against SimpleITK's ImageSeriesReader.

Both read the same files in the same run, alternating, several rounds; the ratio of medians is
printed (below 1 means medvision is faster). Absolute times on these machines mean little.

    .venv/bin/python bench/bench_io.py [SERIES_FOLDER ...]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medvision.io import read_volume

REPO = Path(__file__).resolve().parents[1]


def sitk_read(folder: Path) -> np.ndarray:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute())


def synthetic_ct(folder: Path, slices: int = 120) -> Path:
    """A 512x512xN CT series built from the sample phantom's header (realistic size)."""
    template = pydicom.dcmread(next((REPO / "sample_data" / "ct_phantom").glob("*.dcm")))
    rng = np.random.default_rng(0)
    series = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(slices):
        ds = template.copy()
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Rows = ds.Columns = 512
        ds.PixelSpacing = [0.5, 0.5]
        ds.ImagePositionPatient = [-128.0, -128.0, k * 1.25]
        ds.PixelData = rng.integers(0, 2000, (512, 512), dtype=np.int16).tobytes()
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)
    return folder


def bench(folder: Path, rounds: int = 5) -> float:
    ours, theirs = [], []
    read_volume(folder), sitk_read(folder)  # warm caches and imports
    for _ in range(rounds):
        t0 = time.perf_counter()
        volume = read_volume(folder)
        t1 = time.perf_counter()
        reference = sitk_read(folder)
        t2 = time.perf_counter()
        ours.append(t1 - t0)
        theirs.append(t2 - t1)
    assert volume.array[0].size == reference.size
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"{folder.name:>24}: {volume.spatial_shape} medvision/SimpleITK time ratio "
          f"{ratio:.2f} (medians {statistics.median(ours) * 1e3:.0f} ms vs "
          f"{statistics.median(theirs) * 1e3:.0f} ms, {rounds} rounds)")
    return ratio


def main(argv: list[str]) -> int:
    folders = [Path(a) for a in argv]
    with tempfile.TemporaryDirectory() as tmp:
        if not folders:
            folders = [REPO / "sample_data" / "ct_phantom", synthetic_ct(Path(tmp) / "ct_512x512x120")]
        for folder in folders:
            bench(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
