"""Reading a 4D series: the 680-file Philips DTI series, medvision against SimpleITK's series
reader (which reads it as one 3D stack of 680 planes) and dcm2niix (wall time of a full
conversion, process start included), in the same run, alternating, several rounds; ratios of
medians are printed (below 1 means medvision is faster). Absolute times mean little here.

    .venv/bin/python bench/bench_4d.py [SERIES_FOLDER] [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from medvision.io import read_volume

REPO = Path(__file__).resolve().parents[1]
DTI = REPO.parent / "shared" / "data" / "dicom" / "philips_4d" / "In" / "Vanderbilt_2018" / \
    "601_WIP_dti_ax"


def sitk_read(folder: Path) -> tuple[int, ...]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return tuple(sitk.GetArrayFromImage(reader.Execute()).shape)


def dcm2niix(folder: Path, out: Path) -> None:
    subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-o", str(out), "-f", "dti",
                    str(folder)], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=DTI)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    have_dcm2niix = shutil.which("dcm2niix") is not None
    times: dict[str, list[float]] = {"medvision": [], "simpleitk": [], "dcm2niix": []}
    volume = read_volume(args.folder)  # warm imports and the page cache
    shape = sitk_read(args.folder)
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        read_volume(args.folder)
        times["medvision"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sitk_read(args.folder)
        times["simpleitk"].append(time.perf_counter() - t0)
        if have_dcm2niix:
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                dcm2niix(args.folder, Path(out))
                times["dcm2niix"].append(time.perf_counter() - t0)
    print(f"series: {args.folder.name}: medvision {volume.volumes} volumes of "
          f"{'x'.join(map(str, volume.spatial_shape))}; SimpleITK one stack {shape}")
    ours = statistics.median(times["medvision"])
    print(f"medvision / SimpleITK series reader: {ours / statistics.median(times['simpleitk']):.2f}")
    if times["dcm2niix"]:
        print(f"medvision / dcm2niix (conversion, process included): "
              f"{ours / statistics.median(times['dcm2niix']):.2f}")
    else:
        print("dcm2niix not installed: that ratio is skipped")


if __name__ == "__main__":
    main()
