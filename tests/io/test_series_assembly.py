"""Series assembly on synthetic DICOM where the right answer is known exactly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from medvision.errors import SeriesAssemblyError
from medvision.io import inventory, read_volume


def _stack(write_slice, n: int, *, step=(0.0, 0.0, 2.0), folder: Path | None = None,
           **kw) -> list[Path]:
    paths = []
    for k in range(n):
        pos = tuple(k * s for s in step)
        pixels = np.full((3, 4), 100 + k, dtype=np.uint16)
        paths.append(write_slice(pixels=pixels, position=pos, folder=folder, **kw))
    return paths


def test_slices_sorted_by_position_not_file_order(write_slice, tmp_path: Path) -> None:
    paths = _stack(write_slice, 6)
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    order = list(range(6))
    random.Random(1).shuffle(order)
    for new, old in enumerate(order):
        paths[old].rename(shuffled / f"x{new}.dcm")
    volume = read_volume(shuffled)
    assert volume.spatial_shape == (4, 3, 6)
    np.testing.assert_array_equal(volume.array[0, 0, 0, :], 100 + np.arange(6))
    assert volume.spacing == pytest.approx((1.0, 1.0, 2.0))
    # DICOM LPS origin (0, 0, 0) and +z stacking become RAS with x, y flipped.
    np.testing.assert_allclose(volume.affine[:3, 3], 0)
    np.testing.assert_allclose(volume.affine[:3, :3], np.diag([-1, -1, 2]))
    assert volume.orientation == "LPS"


def test_three_plane_localiser_is_three_series(write_slice) -> None:
    axial, coronal, sagittal = (1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0, -1), (0, 1, 0, 0, 0, -1)
    for orientation, step in ((axial, (0, 0, 5)), (coronal, (0, 5, 0)), (sagittal, (5, 0, 0))):
        _stack(write_slice, 3, step=step, orientation=orientation, series_uid="9.9.9")
    found = inventory([write_slice(pixels=np.zeros((3, 4))).parent])
    keys = sorted(e.series.key for e in found.entries if e.series and e.series.key.startswith("9.9.9"))
    assert keys == ["9.9.9.1", "9.9.9.2", "9.9.9.3"]
    for entry in found.entries:
        if entry.series and entry.series.key.startswith("9.9.9"):
            assert entry.load().spatial_shape[2] == 3


def test_missing_slice_is_reported_and_grid_stays_regular(write_slice) -> None:
    paths = _stack(write_slice, 8)
    paths[4].unlink()
    volume = read_volume(paths[0].parent)
    assert any("missing slices" in w for w in volume.warnings)
    assert volume.spatial_shape[2] == 8  # the gap is interpolated on a 2 mm grid
    assert volume.spacing[2] == pytest.approx(2.0)
    np.testing.assert_allclose(volume.array[0, 0, 0, :], [100, 101, 102, 103, 104, 105, 106, 107])


def test_uneven_spacing_refused_on_request(write_slice) -> None:
    folder = _stack(write_slice, 4)[0].parent
    write_slice(pixels=np.full((3, 4), 7, dtype=np.uint16), position=(0, 0, 6.7), folder=folder)
    from medvision.errors import GeometryError

    with pytest.raises(GeometryError, match="uneven slice spacing"):
        read_volume(folder, irregular="error")


def test_rescale_and_monochrome1(write_slice) -> None:
    pixels = np.array([[0, 100], [200, 4095]], dtype=np.uint16)
    path = write_slice(pixels=pixels, RescaleSlope=2, RescaleIntercept=-10, BitsStored=12,
                       HighBit=11, PhotometricInterpretation="MONOCHROME1")
    volume = read_volume(path)
    values = pixels.T.astype(float) * 2 - 10
    lo, hi = -10, 4095 * 2 - 10
    np.testing.assert_allclose(volume.array[0], lo + hi - values)
    assert volume.spatial_dims == 2


def test_echoes_at_same_positions_become_separate_series(write_slice) -> None:
    for echo in (1, 2):
        _stack(write_slice, 3, series_uid="7.7", EchoNumbers=echo)
    found = inventory([write_slice(pixels=np.zeros((3, 4))).parent])
    keys = sorted(e.series.key for e in found.entries if e.series and e.series.key.startswith("7.7"))
    assert keys == ["7.7.1", "7.7.2"]


def test_inseparable_duplicates_are_an_error_naming_the_file(write_slice) -> None:
    paths = _stack(write_slice, 2, series_uid="5.5")
    _stack(write_slice, 2, series_uid="5.5")
    with pytest.raises(SeriesAssemblyError, match="nothing separates them into volumes"):
        read_volume(paths[0].parent)


def test_several_series_need_a_choice(write_slice) -> None:
    _stack(write_slice, 2, series_uid="1.1")
    folder = _stack(write_slice, 2, series_uid="2.2")[0].parent
    with pytest.raises(SeriesAssemblyError, match="choose one"):
        read_volume(folder)
    assert read_volume(folder, series="2.2").source_uids
    assert read_volume(folder, series=0).spatial_shape == (4, 3, 2)


def test_non_dicom_and_truncated_files_are_rejected_not_fatal(write_slice, tmp_path: Path) -> None:
    folder = _stack(write_slice, 3)[0].parent
    (folder / "notes.bin").write_bytes(b"this is not an image")
    found = inventory([folder])
    assert len(found.entries) == 1
    assert any("notes.bin" in reason for _, reason in found.rejected)


def test_header_summary_has_no_patient_identity(write_slice) -> None:
    path = write_slice(PatientName="SECRET^NAME", PatientID="ID-4242", PatientBirthDate="19010101")
    volume = read_volume(path)
    text = repr(dict(volume.header))
    for secret in ("SECRET", "ID-4242", "19010101"):
        assert secret not in text
    assert volume.header["Modality"] == "MR"
