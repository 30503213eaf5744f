"""Every DICOM file pydicom and pydicom-data ship loads, or fails with a clear DataError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medvision.errors import DataError
from medvision.io import Volume, read_volume

from conftest import pydicom_test_files

FILES = pydicom_test_files()


def test_the_zoo_is_there() -> None:
    names = {p.name for p in FILES}
    assert len(FILES) > 200, "pydicom-data is not installed (pip install -e '.[test]')"
    assert {"RG1_UNCR.dcm", "CT_small.dcm", "MR_truncated.dcm", "emri_small_RLE.dcm"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_loads_or_raises_data_error(path: Path) -> None:
    try:
        volume = read_volume(path)
    except DataError as e:
        message = str(e)
        assert message and str(path.parent) in message or path.name in message, message
        return
    assert isinstance(volume, Volume)
    assert volume.array.dtype == np.float32
    assert volume.spatial_dims in (2, 3)
    assert np.all(np.isfinite(volume.array))


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "JPEG-lossy.dcm"])
def test_known_bad_files_are_data_errors_naming_the_file(name: str) -> None:
    path = next(p for p in FILES if p.name == name)
    with pytest.raises(DataError, match=name):
        read_volume(path)


def test_ybr_and_rgb_files_decode_to_the_same_colours() -> None:
    rgb = read_volume(next(p for p in FILES if p.name == "SC_rgb.dcm"))
    ybr = read_volume(next(p for p in FILES if p.name == "SC_ybr_full_uncompressed.dcm"))
    assert rgb.channels == ybr.channels == 3
    diff = np.abs(rgb.array - ybr.array)  # YBR_FULL is an 8-bit lossy round trip of RGB
    assert diff.max() <= 8 and diff.mean() < 2


def test_palette_colour_becomes_rgb() -> None:
    volume = read_volume(next(p for p in FILES if p.name == "OT-PAL-8-face.dcm"))
    assert volume.channels == 3 and volume.spatial_shape == (640, 480)


def test_enhanced_multiframe_uses_per_frame_geometry() -> None:
    volume = read_volume(next(p for p in FILES if p.name == "eCT_Supplemental.dcm"))
    assert volume.spatial_shape == (512, 512, 2)
    assert volume.spacing[2] > 0


def test_rt_dose_grid_frames_are_placed_by_offset_vector() -> None:
    import pydicom

    path = next(p for p in FILES if p.name == "rtdose.dcm")
    ds = pydicom.dcmread(path)
    volume = read_volume(path)
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    assert volume.spatial_shape[2] == len(offsets)
    assert volume.spacing[2] == pytest.approx(abs(offsets[1] - offsets[0]))
    np.testing.assert_allclose(volume.array[0, :, :, 0].T,
                               ds.pixel_array[0] * float(ds.DoseGridScaling), rtol=1e-5)


def test_dicomdir_reads_the_referenced_series() -> None:
    dicomdir = next(p for p in FILES if p.name == "DICOMDIR" and p.parent.name == "dicomdirtests")
    from medvision.io import inventory

    found = inventory([dicomdir])
    assert len(found.entries) >= 3
    assert {e.series.modality for e in found.entries if e.series} >= {"CT", "MR"}
