"""NIfTI, NRRD/MHA and 2D image reading and writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medvision.errors import UnsupportedFormatError
from medvision.io import Volume, detect_format, read_volume, write_volume

REPO = Path(__file__).resolve().parents[2]


def _oblique_affine() -> np.ndarray:
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 1.2, 2.5])
    affine[:3, 3] = [-10.0, 22.5, 3.0]
    return affine


@pytest.mark.parametrize("values", ["integer", "float"])
def test_nifti_round_trip_keeps_values_and_affine(tmp_path: Path, values: str) -> None:
    rng = np.random.default_rng(0)
    array = rng.normal(size=(1, 5, 6, 7)).astype(np.float32)
    if values == "integer":
        array = np.round(array * 1000)
    volume = Volume(array=array, affine=_oblique_affine(), modality="CT")
    path = write_volume(volume, tmp_path / "v.nii.gz")
    again = read_volume(path)
    np.testing.assert_array_equal(again.array, volume.array)
    np.testing.assert_allclose(again.affine, volume.affine, atol=1e-6)
    assert again.modality == "CT"
    written = write_volume(again, tmp_path / "w.nii")
    np.testing.assert_array_equal(read_volume(written).array, volume.array)


def test_sample_dicom_round_trips_through_nifti(tmp_path: Path) -> None:
    volume = read_volume(REPO / "sample_data" / "ct_phantom")
    again = read_volume(write_volume(volume, tmp_path / "ct.nii.gz"))
    np.testing.assert_array_equal(again.array, volume.array)
    np.testing.assert_allclose(again.affine, volume.affine, atol=1e-6)
    assert volume.array.min() == -1000 and volume.array.max() >= 1000  # HU after rescale


def test_multichannel_round_trip(tmp_path: Path) -> None:
    array = np.arange(3 * 4 * 5 * 2, dtype=np.float32).reshape(3, 4, 5, 2)
    volume = Volume(array=array, affine=np.eye(4))
    again = read_volume(write_volume(volume, tmp_path / "rgb.nii.gz"))
    np.testing.assert_array_equal(again.array, array)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_match_nifti_geometry(tmp_path: Path, suffix: str) -> None:
    import SimpleITK as sitk

    nifti = REPO / "sample_data" / "mr_phantom.nii.gz"
    reference = read_volume(nifti)
    other = tmp_path / f"mr{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(other))
    volume = read_volume(other)
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-5)


def test_png_is_channel_first_with_rows_on_second_axis(tmp_path: Path) -> None:
    from PIL import Image

    pixels = np.zeros((10, 20), dtype=np.uint8)  # 10 rows, 20 columns
    pixels[2, 15] = 255
    Image.fromarray(pixels).save(tmp_path / "x.png")
    volume = read_volume(tmp_path / "x.png")
    assert volume.spatial_shape == (20, 10) and volume.channels == 1
    assert volume.array[0, 15, 2] == 255
    assert volume.header["spacing_known"] is False and not volume.warnings  # said once, per batch


def test_real_chest_xray_jpeg(shared_data: Path) -> None:
    path = next((shared_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))
    volume = read_volume(path)
    assert volume.spatial_dims == 2 and volume.spatial_shape == (224, 224)


def test_real_hippocampus_nifti(shared_data: Path) -> None:
    path = sorted((shared_data / "hippocampus" / "images").glob("*.nii.gz"))[0]
    volume = read_volume(path)
    assert volume.spatial_dims == 3 and volume.channels == 1
    assert min(volume.spacing) == pytest.approx(1.0, abs=0.01)


def test_format_detection_and_unsupported_output(tmp_path: Path) -> None:
    assert detect_format("a/b.nii.gz") == "nifti"
    assert detect_format("x.MHA") == "itk"
    assert detect_format("IM0001") == "dicom"
    with pytest.raises(UnsupportedFormatError, match="only write NIfTI"):
        write_volume(Volume(array=np.zeros((1, 2, 2, 2)), affine=np.eye(4)), tmp_path / "x.png")


def test_garbage_image_file_is_a_data_error(tmp_path: Path) -> None:
    from medvision.errors import DataError

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="broken.png"):
        read_volume(bad)


def test_jpeg_maps_land_on_the_same_pixels_as_in_simpleitk(tmp_path: Path) -> None:
    """A JPEG's pixel (10, 20) and the saliency NIfTI's voxel (10, 20) are the same physical
    point in SimpleITK (they used to sit at (10, 20) and (-10, -20))."""
    import numpy as np
    from PIL import Image

    from medvision.io import read_volume, write_volume

    sitk = pytest.importorskip("SimpleITK")
    pixels = np.zeros((40, 30), dtype=np.uint8)
    pixels[20, 10] = 255  # row 20, column 10
    Image.fromarray(pixels).save(tmp_path / "image.png")
    volume = read_volume(tmp_path / "image.png")
    write_volume(volume, tmp_path / "map.nii.gz")
    image = sitk.ReadImage(str(tmp_path / "image.png"))
    written = sitk.ReadImage(str(tmp_path / "map.nii.gz"))
    assert image.TransformIndexToPhysicalPoint((10, 20)) == pytest.approx(
        written.TransformIndexToPhysicalPoint((10, 20, 0))[:2])
    array = sitk.GetArrayFromImage(written)
    assert array.reshape(-1, *array.shape[-2:])[0][20, 10] == 255
