"""Renderers: figures carry correct orientation letters and millimetre aspect; no renderer
reads results back from disk; model cards are real Markdown."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from medvision.io import Volume
from medvision.report import figures
from medvision.report.html import card_sections

REPORT = Path(__file__).resolve().parents[2] / "medvision" / "report"


def test_orientation_letters_follow_the_affine_whatever_the_storage_order() -> None:
    """An LPS-stored and an RAS-stored copy of one volume show the same panels with the
    radiological letters (patient right on the viewer's left)."""
    array = np.random.default_rng(0).random((1, 6, 7, 8)).astype(np.float32)
    ras = Volume(array=array, affine=np.diag([2.0, 1.0, 3.0, 1.0]))
    lps_array = array[:, ::-1, ::-1, :].copy()
    lps_affine = np.diag([-2.0, -1.0, 3.0, 1.0])
    lps_affine[:3, 3] = [10.0, 6.0, 0.0]
    lps = Volume(array=lps_array, affine=lps_affine)
    for volume in (ras, lps):
        canonical, affine = figures._canonical(volume)
        np.testing.assert_allclose(canonical, array)
        views = {v.name: v for v in figures._views(canonical.shape[1:], affine, None, 3)}
        axial, coronal, sagittal = views["axial"], views["coronal"], views["sagittal"]
        assert (figures._letter(axial.right), figures._letter(-axial.down)) == ("L", "A")
        assert (figures._letter(coronal.right), figures._letter(-coronal.down)) == ("L", "S")
        assert (figures._letter(sagittal.right), figures._letter(-sagittal.down)) == ("P", "S")
        assert axial.aspect == pytest.approx(1.0 / 2.0)  # rows 1 mm, columns 2 mm
        assert coronal.aspect == pytest.approx(3.0 / 2.0)


def test_oblique_directions_get_two_letters() -> None:
    assert figures._letter(np.array([0.8, 0.6, 0.0])) == "RA"
    assert figures._letter(np.array([0.0, -0.1, -1.0])) == "I"


def test_a_2d_dicom_image_gets_letters_from_its_patient_orientation() -> None:
    """RG1 (a PA chest radiograph, Patient Orientation L\\F): the patient's left on the right
    edge, the feet at the bottom; a picture without that attribute gets no letters, and a
    colour picture is shown in colour."""
    from medvision.io import read_volume

    from conftest import pydicom_test_files

    rg1 = read_volume(next(p for p in pydicom_test_files() if p.name == "RG1_UNCR.dcm"))
    assert figures._patient_orientation(rg1) == ("L", "R", "F", "H")
    colour = np.zeros((3, 40, 30), dtype=np.float32)
    colour[0] = 200.0  # a red picture
    picture = Volume(array=colour, affine=np.diag([-1.0, -1.0, 1.0, 1.0]),
                     header={"spacing_known": False})
    assert figures._patient_orientation(picture) is None
    [key] = figures.key_images(picture)
    centre = key.rgb[key.rgb.shape[0] // 2, key.rgb.shape[1] // 2]
    assert centre[0] == 200 and centre[1] == centre[2] == 0  # as stored, not grey
    assert figures._patient_orientation(Volume(
        array=colour[:1], affine=np.eye(4), header={"PatientOrientation": ["A", "FR"]})) == (
        "A", "P", "FR", "HL")


def test_key_images_are_pngs_with_pixels_for_dicom() -> None:
    volume = Volume(array=np.random.default_rng(1).random((1, 20, 24, 10)).astype(np.float32),
                    affine=np.eye(4))
    mask = np.zeros((1, 20, 24, 10), dtype=np.float32)
    mask[0, 5:10, 5:12, 3:7] = 1
    mask[0, 10:14, 8:15, 3:7] = 2
    images = figures.key_images(volume, mask=Volume(array=mask, affine=np.eye(4)),
                                saliency=Volume(array=mask / 2, affine=np.eye(4)),
                                classes=("background", "a", "b"))
    assert [i.name for i in images] == ["key_axial.png", "overlay_axial.png", "key_coronal.png",
                                        "overlay_coronal.png", "key_sagittal.png",
                                        "overlay_sagittal.png"]
    for image in images:
        assert image.png.startswith(b"\x89PNG") and image.rgb.ndim == 3


def test_no_renderer_reads_a_result_back_from_disk() -> None:
    """The renderers take the in-memory report: none of them calls a reader."""
    readers = {"read_volume", "dcmread", "load", "imread", "read_text", "read_bytes", "open"}
    # templates are read by Jinja's loader, not results; a key image's PNG bytes (in memory)
    # are decoded by PIL's Image.open for DICOM overlays
    allowed = {("html.py", "read_text"), ("figures.py", "open")}
    for path in REPORT.glob("*.py"):
        if path.name in ("audit.py", "__init__.py"):  # the audit page reads the audit log
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name in readers and (path.name, name) not in allowed:
                    # json.load of the packaged schema is the one read in json.py
                    assert path.name == "json.py" and name == "read_text", (path.name, name)


def test_model_card_markdown_is_rendered_not_split_by_lines() -> None:
    card = ("# Model\n\nA *small* model.\n\n## Intended use\n\n- Research only, on images\n"
            "  like the training set.\n- Teaching.\n\n## Limitations\n\n| a | b |\n|---|---|\n"
            "| 1 | 2 |\n")
    sections = card_sections(card)
    assert "<em>small</em>" in sections["summary"]
    assert sections["intended_use"].count("<li>") == 2  # a wrapped bullet stays one item
    assert "images\nlike the training set" in sections["intended_use"]
    assert "<table>" in sections["limitations"]


def test_drift_plot_spans_the_records_days(monkeypatch: pytest.MonkeyPatch) -> None:
    """One day of records is shown as that day (one day either side), not years."""
    from datetime import date

    from matplotlib.dates import num2date

    captured = {}
    original = figures.png_bytes

    def keep(fig: object) -> bytes:
        captured["fig"] = fig
        return original(fig)

    monkeypatch.setattr(figures, "png_bytes", keep)
    png = figures.drift_plot({"m 1": {"2026-11-29": {"positive": 1, "total": 2, "rate": 0.5}}})
    assert png.startswith(b"\x89PNG")
    low, high = captured["fig"].axes[0].get_xlim()  # type: ignore[attr-defined]
    assert num2date(low).date() == date(2026, 11, 28)
    assert num2date(high).date() == date(2026, 11, 30)
