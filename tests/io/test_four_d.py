"""4D series (fMRI, diffusion) read as one volume and converted as dcm2niix does.

References: dcm2niix's 4D NIfTI and BIDS sidecars for 19 Siemens mosaic EPI series (every
slice orientation and order) and a Philips classic fMRI; dcm2niix's .bval/.bvec for a Philips
32-direction DTI series (../shared/data/dicom, see its README).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medvision.cli.main import main
from medvision.errors import GeometryError, SeriesAssemblyError
from medvision.io import inventory, read_volume
from medvision.io.volume import reduce_volumes

MOSAIC_NAMES = [f"{plane}_{order}_{n}sl" for plane in ("ax", "cor", "sag")
                for order in ("asc", "desc", "int") for n in (35, 36)]


def _mosaic_folders(shared_data: Path) -> dict[str, Path]:
    """Reference name (SeriesDescription_SeriesNumber) -> input folder."""
    found = {}
    for folder in sorted((shared_data / "dicom" / "siemens_mosaic_4d" / "In").glob("*/*/*")):
        files = sorted(folder.glob("MR*"))
        if not files:
            continue
        ds = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)
        found[f"{ds.SeriesDescription}_{ds.SeriesNumber}"] = folder
    return found


def _canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(nib.load(path))
    return np.asarray(image.dataobj, dtype=np.float64), image.affine


def _same_up_to_scaling(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    slope, intercept = np.polyfit(ours.ravel(), ref.ravel(), 1)
    residual = np.abs(slope * ours + intercept - ref).max()
    assert residual <= 1e-3 * max(np.abs(ref).max(), 1.0), (slope, intercept, residual)


def _references(shared_data: Path) -> list[tuple[str, Path, Path, Path]]:
    """(name, input folder, reference NIfTI, reference JSON) for every 4D reference."""
    out = []
    ref = shared_data / "dicom" / "siemens_mosaic_4d" / "Ref"
    for name, folder in sorted(_mosaic_folders(shared_data).items()):
        if (ref / f"{name}.nii").is_file():
            out.append((name, folder, ref / f"{name}.nii", ref / f"{name}.json"))
    philips = shared_data / "dicom" / "philips_4d"
    out.append(("EPI_asc_CLEAR_201", philips / "In" / "Magdeburg_2014" / "fmri",
                philips / "Ref" / "EPI_asc_CLEAR_201.nii",
                philips / "Ref" / "EPI_asc_CLEAR_201.json"))
    return out


def test_every_siemens_mosaic_orientation_has_a_reference(shared_data: Path) -> None:
    names = {name for name, *_ in _references(shared_data)}
    missing = [n for n in MOSAIC_NAMES if not any(r.startswith(n + "_") for r in names)]
    assert not missing and len(names) >= 19


def test_4d_series_convert_equal_to_dcm2niix(shared_data: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Same shape, voxels up to a linear scaling, affine within 1e-3 mm (after canonical
    reorientation), TR as the fourth pixdim; the sidecar's timing fields agree."""
    for name, folder, ref_nii, ref_json in _references(shared_data):
        out = tmp_path / f"{name}.nii.gz"
        assert main(["convert", str(folder), "-o", str(out), "--series", "0"]) == 0, name
        ours, our_affine = _canonical(out)
        ref, ref_affine = _canonical(ref_nii)
        assert ours.ndim == 4 and ours.shape[3] >= 2, name
        _same_up_to_scaling(ours, ref)
        np.testing.assert_allclose(our_affine, ref_affine, atol=1e-3, err_msg=name)
        assert nib.load(out).header.get_zooms()[3] == pytest.approx(
            nib.load(ref_nii).header.get_zooms()[3], abs=1e-3)
        sidecar = json.loads(out.with_suffix("").with_suffix(".json").read_text())
        expected = json.loads(ref_json.read_text())
        for key in ("RepetitionTime", "EchoTime", "TotalReadoutTime"):
            if key in expected:
                assert sidecar[key] == pytest.approx(expected[key], abs=1e-5), (name, key)
        if "SliceTiming" in expected:  # dcm2niix rounds to 2.5 ms
            np.testing.assert_allclose(sidecar["SliceTiming"], expected["SliceTiming"],
                                       atol=0.003, err_msg=name)
        if "PhaseEncodingDirection" in expected:  # dcm2niix's j runs the other way
            ref_dir = expected["PhaseEncodingDirection"]
            if ref_dir.startswith("j"):
                ref_dir = "j" if ref_dir == "j-" else "j-"
            assert sidecar["PhaseEncodingDirection"] == ref_dir, name
    capsys.readouterr()


def test_info_lists_one_series_with_its_volume_count(shared_data: Path) -> None:
    for name, folder, ref_nii, _ in _references(shared_data):
        dicom = [e for e in inventory([folder]).entries if e.series is not None]
        assert len(dicom) == 1, name
        described = dicom[0].describe()
        assert described["volumes"] == nib.load(ref_nii).shape[3], name
        assert described["fourth_axis"]["separated_by"] in (
            "AcquisitionNumber", "TemporalPositionIdentifier"), name
        assert not described["error"] and not described["warnings"], name


def test_philips_dti_bval_equals_and_bvec_agrees_with_dcm2niix(shared_data: Path,
                                                                tmp_path: Path) -> None:
    """b-values equal; gradient directions within 1e-3 of dcm2niix's once its row flip is
    undone (its x and y components are the negatives of medvision's, see docs)."""
    root = shared_data / "dicom" / "philips_4d"
    out = tmp_path / "dti.nii.gz"
    assert main(["convert", str(root / "In" / "Vanderbilt_2018" / "601_WIP_dti_ax"), "-o",
                 str(out)]) == 0
    ours_b = np.loadtxt(tmp_path / "dti.bval")
    ref_b = np.loadtxt(root / "Ref" / "WIP_dti_ax_601.bval")
    np.testing.assert_array_equal(ours_b, ref_b)
    ours = np.loadtxt(tmp_path / "dti.bvec")
    ref = np.loadtxt(root / "Ref" / "WIP_dti_ax_601.bvec")
    assert ours.shape == ref.shape == (3, 16)
    ours[:2] *= -1
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    assert nib.load(out).shape == (80, 80, 40, 16)  # the derived isotropic volume is left out
    reread = read_volume(out)  # the table comes back with the NIfTI
    assert reread.fourth_axis is not None and reread.fourth_axis.kind == "diffusion"
    assert reread.fourth_axis.b_values == tuple(ref_b)


def test_4d_nifti_reads_as_4d_with_its_time_step(shared_data: Path) -> None:
    volume = read_volume(shared_data / "dicom" / "philips_4d" / "Ref" / "EPI_asc_CLEAR_201.nii")
    assert volume.volumes == 3 and volume.spatial_shape == (64, 64, 9)
    assert volume.fourth_axis is not None
    assert volume.fourth_axis.repetition_time_s == pytest.approx(2.0, abs=1e-3)
    assert volume.fourth_axis.times_s == pytest.approx((0.0, 2.0, 4.0), abs=1e-3)


def test_volumes_nothing_separates_are_an_error_naming_what_is_missing(
        shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "fmri"
    folder.mkdir()
    for path in sorted((shared_data / "dicom" / "philips_4d" / "In" / "Magdeburg_2014" /
                        "fmri").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword in ("TemporalPositionIdentifier", "AcquisitionNumber", "AcquisitionTime",
                        "TriggerTime"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.InstanceNumber = 1
        ds.save_as(folder / path.name)
    with pytest.raises(SeriesAssemblyError, match="Temporal Position Identifier") as caught:
        read_volume(folder)
    assert "nothing separates them into volumes" in str(caught.value)


def test_pipeline_rules_reject_or_select(shared_data: Path) -> None:
    fmri = read_volume(shared_data / "dicom" / "philips_4d" / "In" / "Magdeburg_2014" / "fmri")
    with pytest.raises(GeometryError, match="4D series of 3 time volumes"):
        reduce_volumes(fmri, "reject")
    first = reduce_volumes(fmri, "first")
    assert first.channels == 1 and first.fourth_axis is None
    np.testing.assert_array_equal(first.array[0], fmri.array[0])
    mean = reduce_volumes(fmri, "mean")
    np.testing.assert_allclose(mean.array[0], fmri.array.mean(axis=0), rtol=1e-6)
    assert reduce_volumes(fmri, "channels", channels=3).channels == 3
    with pytest.raises(GeometryError, match="takes 1 channel"):
        reduce_volumes(fmri, "channels", channels=1)


def test_a_3d_pipeline_rejects_a_4d_series_with_the_reason_or_selects(
        shared_data: Path, tmp_path: Path) -> None:
    """analyze: the hippocampus pipeline (3D MR) given a 4D fMRI series."""
    import yaml

    source = shared_data / "dicom" / "philips_4d" / "In" / "Magdeburg_2014" / "fmri"
    out = tmp_path / "out"
    assert main(["analyze", str(source), "--pipeline", "hippocampus-seg", "-o", str(out)]) == 1
    report = json.loads(next(out.glob("*/report.json")).read_text())
    assert report["status"] == "rejected"
    assert "4D series of 3 time volumes" in report["reason"]
    pipeline = tmp_path / "hippocampus-first"
    shutil.copytree(Path(__file__).resolve().parents[2] / "pipelines" / "hippocampus-seg",
                    pipeline)
    raw = yaml.safe_load((pipeline / "pipeline.yaml").read_text())
    raw["input"] = {**raw.get("input", {}), "four_d": "first"}
    (pipeline / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    assert main(["analyze", str(source), "--pipeline", str(pipeline), "-o",
                 str(tmp_path / "out2")]) in (0, 1)
    report = json.loads(next((tmp_path / "out2").glob("*/report.json")).read_text())
    # the first volume is taken: whatever else the checks say, it is not the 4D rule
    assert report["status"] != "rejected" or "4D" not in report["reason"], report["reason"]
    assert report["input"]["geometry"]["shape"] == [64, 64, 9]


def test_info_command_prints_the_volume_count(shared_data: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = shared_data / "dicom" / "philips_4d" / "In" / "Magdeburg_2014" / "fmri"
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.count("[0]") == 1 and "[1]" not in out
    assert "volumes     : 3 (time), separated by TemporalPositionIdentifier, TR 2 s" in out
