"""DICOM reading checked against dcm2niix's answers on real scans."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from medvision.cli.main import main
from medvision.errors import GeometryError
from medvision.io import read_volume

REPO = Path(__file__).resolve().parents[2]


def _canonical(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    canon = nib.as_closest_canonical(image)
    return np.asarray(canon.dataobj, dtype=np.float32), canon.affine


@pytest.mark.parametrize("n", range(1, 10))
def test_transfer_syntax_convert_matches_dcm2niix(n: int, shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "dicom" / "transfer_syntaxes" / "In" / f"{n}.dcm"
    out = tmp_path / f"{n}.nii.gz"
    assert main(["convert", str(source), "-o", str(out)]) == 0
    ours, our_affine = _canonical(nib.load(out))
    ref, ref_affine = _canonical(nib.load(shared_data / "dicom" / "transfer_syntaxes" / "Ref" / f"{n}.nii"))
    assert ours.shape == ref.shape == (64, 64, 35)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_allclose(our_affine, ref_affine, atol=1e-3)


def _slice_centre_lps(ds: pydicom.Dataset) -> np.ndarray:
    r = np.array(ds.ImageOrientationPatient[:3], dtype=float)
    c = np.array(ds.ImageOrientationPatient[3:], dtype=float)
    row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
    return (np.array(ds.ImagePositionPatient, dtype=float)
            + r * col_sp * (ds.Columns - 1) / 2 + c * row_sp * (ds.Rows - 1) / 2)


def test_tilted_uneven_ct_lands_on_regular_grid(shared_data: Path) -> None:
    folder = shared_data / "dicom" / "ct_head_tilt"
    volume = read_volume(folder)
    assert volume.spatial_dims == 3 and volume.channels == 1
    columns = volume.affine[:3, :3]
    gram = columns.T @ columns
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-6)  # orthogonal grid
    assert any("gantry tilt" in w for w in volume.warnings)
    assert any("uneven slice spacing" in w for w in volume.warnings)

    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
    normal = np.cross(np.array(headers[0].ImageOrientationPatient[:3], dtype=float),
                      np.array(headers[0].ImageOrientationPatient[3:], dtype=float))
    headers.sort(key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal)))
    inverse = np.linalg.inv(volume.affine)
    last_k = volume.spatial_shape[2] - 1
    for ds, expected_k in ((headers[0], 0), (headers[-1], last_k)):
        centre_ras = _slice_centre_lps(ds) * np.array([-1, -1, 1])
        i, j, k = (inverse @ np.append(centre_ras, 1.0))[:3]
        assert k == pytest.approx(expected_k, abs=1e-4)
        assert 0 <= i < volume.spatial_shape[0] and 0 <= j < volume.spatial_shape[1]
        # The plane written there is that slice's image, shifted in-plane to its true place.
        full = pydicom.dcmread(ds.filename)
        source_pixels = apply_modality_lut(full.pixel_array, full).T.astype(np.float32)
        plane = volume.array[0, :, :, expected_k]
        di, dj = int(round(i - (ds.Columns - 1) / 2)), int(round(j - (ds.Rows - 1) / 2))
        window = plane[di + 100:di + 400, dj + 100:dj + 400]
        assert np.corrcoef(window.ravel(), source_pixels[100:400, 100:400].ravel())[0, 1] > 0.98
        assert np.median(np.abs(window - source_pixels[100:400, 100:400])) < 5


def test_irregular_series_can_be_refused(shared_data: Path) -> None:
    with pytest.raises(GeometryError, match="gantry tilt"):
        read_volume(shared_data / "dicom" / "ct_head_tilt", irregular="error")


@pytest.mark.integration
def test_sample_ct_matches_dcm2niix(dcm2niix: str, tmp_path: Path) -> None:
    series = REPO / "sample_data" / "ct_phantom"
    subprocess.run([dcm2niix, "-z", "n", "-f", "ref", "-o", str(tmp_path), str(series)],
                   check=True, capture_output=True)
    ref, ref_affine = _canonical(nib.load(tmp_path / "ref.nii"))
    volume = read_volume(series)
    ours, our_affine = _canonical(nib.Nifti1Image(volume.array[0], volume.affine))
    np.testing.assert_allclose(ours, ref, atol=1e-3)  # dcm2niix keeps stored values + scl_inter
    np.testing.assert_allclose(our_affine, ref_affine, atol=1e-3)
