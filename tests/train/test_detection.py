"""Detection: box transforms keep boxes on their pixels, data layouts, and a tiny end-to-end
train / evaluate / analyze (with a DICOM-wrapped image whose SR carries the same boxes)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medvision.cli.main import main
from medvision.config import load_pipeline

SQUARES = [(10, 8, 30, 24, 0), (50, 30, 70, 56, 1)]  # x1, y1, x2, y2 (pixel edges), class


def _pipeline(tmp_path: Path, layout: str = "voc", **training: object) -> Path:
    folder = tmp_path / "pipeline"
    folder.mkdir(exist_ok=True)
    raw = {
        "name": "squares", "task": "detection", "spatial_dims": 2, "in_channels": 3,
        "classes": ["small", "large"], "data": {"layout": layout},
        "preprocess": {"size": [96, 64]},
        "augment": {"prob": 0.5, "flip_axes": [0, 1], "rotate_degrees": 90, "scale": 0.1},
        "model": {"name": "retinanet", "params": {"depth": 10, "anchor_sizes": [8, 12, 16],
                                                  "score_thresh": 0.001}},
        "optimizer": {"name": "adamw", "lr": 0.001},
        "training": {"epochs": 2, "batch_size": 4, "threads": 2, **training},
        "inference": {"threshold": 0.001},
        "input": {"modalities": ["OT", "XC"]},
        "explanation": {"method": "saliency"},
    }
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    return folder


def _image(path: Path, squares: list[tuple[int, int, int, int, int]], shape=(64, 96)) -> None:
    pixels = np.full((*shape, 3), 30, dtype=np.uint8)
    for x1, y1, x2, y2, label in squares:
        pixels[y1:y2, x1:x2] = (220, 60, 60) if label == 0 else (60, 60, 220)
    Image.fromarray(pixels).save(path)


def _voc(root: Path, count: int = 12) -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    names = []
    rng = np.random.default_rng(0)
    for n in range(count):
        shift = int(rng.integers(0, 12))
        squares = [(x1 + shift, y1, x2 + shift, y2, c) for x1, y1, x2, y2, c in SQUARES]
        name = f"img_{n:03d}"
        _image(root / "JPEGImages" / f"{name}.png", squares)
        objects = "".join(
            f"<object><name>{['small', 'large'][c]}</name><bndbox><xmin>{x1 + 1}</xmin>"
            f"<ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for x1, y1, x2, y2, c in squares)
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.png</filename>{objects}</annotation>")
        names.append(name)
    (root / "train.txt").write_text("\n".join(names[:8]))
    (root / "val.txt").write_text("\n".join(names[8:]))
    return root


def _bright_box(image: np.ndarray) -> tuple[float, float, float, float]:
    """Pixel-edge box around the bright pixels of a ``(C, I, J)`` image."""
    bright = np.argwhere(image.max(axis=0) > 0.5)
    (i1, j1), (i2, j2) = bright.min(axis=0), bright.max(axis=0)
    return float(i1), float(j1), float(i2 + 1), float(j2 + 1)


@pytest.mark.parametrize("step", ["resize", "flip0", "flip1", "rotate90", "zoom"])
def test_box_transforms_keep_boxes_on_their_pixels(step: str) -> None:
    """One bright square with its box, through each transform: the box still bounds it."""
    import torch
    from monai.apps.detection.transforms import dictionary as bt
    from monai.data import MetaTensor

    from medvision.transforms.chain import BOX_KEYS, ResizeWithBoxesd

    image = np.zeros((1, 80, 60), dtype=np.float32)  # (C, I=x, J=y)
    image[0, 20:36, 10:30] = 1.0
    data = {"image": MetaTensor(torch.as_tensor(image)),
            "boxes": np.array([[20, 10, 36, 30]], dtype=np.float32),
            "labels": np.array([0])}
    transform = {
        "resize": ResizeWithBoxesd((40, 30)),
        "flip0": bt.RandFlipBoxd(prob=1.0, spatial_axis=0, **BOX_KEYS),
        "flip1": bt.RandFlipBoxd(prob=1.0, spatial_axis=1, **BOX_KEYS),
        "rotate90": bt.RotateBox90d(k=1, spatial_axes=(0, 1), image_keys="image",
                                    box_keys="boxes", box_ref_image_keys="image"),
        "zoom": bt.ZoomBoxd(zoom=[1.5, 1.5], keep_size=False, **BOX_KEYS),
    }[step]
    out = transform(data)
    box = np.asarray(out["boxes"], dtype=float)[0]
    expected = _bright_box(np.asarray(out["image"]))
    np.testing.assert_allclose(box, expected, atol=1.0)


def test_voc_coco_and_csv_layouts_give_the_same_boxes(tmp_path: Path) -> None:
    from medvision.train.boxes import detection_items

    root = _voc(tmp_path / "voc", count=3)
    voc = detection_items(load_pipeline(_pipeline(tmp_path, "voc")), root)
    assert [i["labels"].tolist() for i in voc] == [[0, 1]] * 3
    first = voc[0]
    # COCO: [x, y, w, h] with 0-based edges
    coco = {"images": [{"id": 1, "file_name": Path(first["image"]).name}],
            "categories": [{"id": 7, "name": "small"}, {"id": 8, "name": "large"}],
            "annotations": [{"image_id": 1, "category_id": 7 + int(c),
                             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]),
                                      float(b[3] - b[1])]}
                            for b, c in zip(first["boxes"], first["labels"], strict=True)]}
    (root / "JPEGImages" / "annotations.json").write_text(json.dumps(coco))
    from_coco = detection_items(load_pipeline(_pipeline(tmp_path, "coco")),
                                root / "JPEGImages")
    np.testing.assert_allclose(from_coco[0]["boxes"], first["boxes"])
    with (root / "JPEGImages" / "boxes.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "class", "x1", "y1", "x2", "y2"])
        for box, label in zip(first["boxes"], first["labels"], strict=True):
            writer.writerow([Path(first["image"]).name, ["small", "large"][label], *box])
    from_csv = detection_items(load_pipeline(_pipeline(tmp_path, "csv")), root / "JPEGImages")
    np.testing.assert_allclose(from_csv[0]["boxes"], first["boxes"])
    np.testing.assert_array_equal(from_csv[0]["labels"], first["labels"])
    # VOC's 1-based inclusive corners became 0-based pixel edges: the square's rows 8-23
    _, y1, _, y2, _ = SQUARES[0]
    assert first["boxes"][0][1] == y1 and first["boxes"][0][3] == y2


def _dicom_wrapped(png: Path, path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    rgb = np.asarray(Image.open(png).convert("RGB"))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.ConversionType = "Cells^Test", "C1", "XC", "DV"
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20260101", 1, 1
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("det")
    data = _voc(root / "voc")
    pipeline = _pipeline(root)
    run = root / "run"
    assert main(["train", "--pipeline", str(pipeline), "--data", str(data), "-o",
                 str(run)]) == 0
    return pipeline, data, run


def test_tiny_train_then_evaluate(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    pipeline, data, run = trained
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 2 and rows[-1]["val_map_50"] != ""
    out = tmp_path / "eval"
    assert main(["evaluate", "--pipeline", str(pipeline), "--data", str(data), "--split", "val",
                 "-o", str(out), "--weights", str(run / "best.safetensors")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 4
    for key in ("map_50", "map_50_95", "count_mae", "recall_at_1_fp_per_image"):
        value = metrics[key]
        assert {"value", "ci95"} <= set(value)
        if key == "count_mae":  # objects per image: not a fraction
            assert value["value"] >= 0
        else:
            assert 0 <= value["value"] <= 1, (key, value)
        low, high = value["ci95"]
        if low == low and high == high:  # a defined interval holds its estimate
            assert low - 1e-9 <= value["value"] <= high + 1e-9, (key, value)
    assert set(metrics["per_class"]) == {"small", "large"}
    assert "ap_50" in metrics["per_class"]["small"]
    page = (out / "summary.html").read_text()
    assert "pr.png" in page and "example_0.png" in page
    assert (out / "predictions.csv").is_file()


def test_analyze_writes_boxes_counts_overlay_saliency_and_an_sr(
        trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import highdicom as hd

    pipeline, data, run = trained
    png = sorted((data / "JPEGImages").glob("*.png"))[0]
    dicom = tmp_path / "wrapped.dcm"
    _dicom_wrapped(png, dicom)
    out = tmp_path / "out"
    assert main(["analyze", str(png), str(dicom), "--pipeline", str(pipeline), "--weights",
                 str(run / "best.safetensors"), "-o", str(out), "--dicom"]) == 0
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("*/report.json"))]
    assert len(reports) == 2
    for report in reports:
        prediction = report["prediction"]
        assert set(prediction["counts"]) == {"small", "large"}
        assert sum(prediction["counts"].values()) == len(prediction["detections"]) > 0
        for found in prediction["detections"]:
            assert len(found["box_px"]) == 4 and len(found["box_mm"]) == 2
        assert report["saliency"]["method"] == "saliency"
        folder = out / report["study"]
        assert (folder / "overlay_boxes.png").is_file() and (folder / "saliency.nii.gz").is_file()
    with_dicom = next(r for r in reports if r.get("dicom"))
    sr_file = out / with_dicom["study"] / next(d["file"] for d in with_dicom["dicom"]
                                               if d["kind"] == "SR")
    sr = hd.sr.srread(sr_file)
    rois = sr.content.get_planar_roi_measurement_groups()
    boxes = sorted(tuple(float(v) for v in np.asarray(g.roi.value).reshape(-1, 2)[[0, 2]].ravel())
                   for g in rois)
    expected = sorted(tuple(d["box_px"]) for d in with_dicom["prediction"]["detections"])
    assert len(rois) == len(expected)
    distance = np.abs(np.array(boxes)[:, None, :] - np.array(expected)[None, :, :]).max(axis=2)
    assert distance.min(axis=1).max() <= 0.01  # every SR box is a box of report.json
    assert distance.min(axis=0).max() <= 0.01  # and the other way round
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert {"count_small", "count_large"} <= set(summary[0])


def test_onnx_backend_gives_the_same_boxes(trained: tuple[Path, Path, Path],
                                           tmp_path: Path) -> None:
    import importlib.util

    from conftest import require

    # the [onnx] extra is installed by `make setup`: in CI a missing one fails, never skips
    require(importlib.util.find_spec("onnxruntime") is not None, "onnxruntime not installed")
    pipeline, data, run = trained
    weights = tmp_path / "model.safetensors"
    weights.write_bytes((run / "best.safetensors").read_bytes())
    assert main(["export", "--pipeline", str(pipeline), "--weights", str(weights)]) == 0
    png = sorted((data / "JPEGImages").glob("*.png"))[1]
    found = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        assert main(["analyze", str(png), "--pipeline", str(pipeline), "--weights",
                     str(weights), "-o", str(out), "--backend", backend]) == 0
        report = json.loads(next(out.glob("*/report.json")).read_text())
        assert report["pipeline"]["backend"] == backend
        found[backend] = report["prediction"]["detections"]
    assert len(found["torch"]) == len(found["onnx"]) > 0
    for a, b in zip(found["torch"], found["onnx"], strict=True):
        assert a["class"] == b["class"]
        assert abs(a["score"] - b["score"]) < 1e-3
        np.testing.assert_allclose(a["box_px"], b["box_px"], atol=0.05)


def test_a_3d_detector_trains_a_step_and_predicts_boxes() -> None:
    """spatial_dims 3 builds the same RetinaNet in 3D: a loss step, then 3D boxes out."""
    import torch

    from medvision.config import Pipeline
    from medvision.models.detection import build_detector

    pipeline = Pipeline.model_validate({
        "name": "cubes", "task": "detection", "spatial_dims": 3, "classes": ["nodule", "cyst"],
        "data": {"layout": "csv"},
        "model": {"name": "retinanet", "params": {"depth": 10, "anchor_sizes": [6, 10],
                                                  "score_thresh": 0.0}}})
    detector = build_detector(pipeline)
    detector.train()
    image = torch.rand(1, 32, 32, 32)
    target = {"boxes": torch.tensor([[4.0, 4.0, 4.0, 14.0, 14.0, 14.0]]),
              "labels": torch.tensor([1])}
    losses = detector([image], [target])
    loss = losses["classification"] + losses["box_regression"]
    loss.backward()
    assert torch.isfinite(loss)
    detector.eval()
    with torch.no_grad():
        found = detector([image])[0]
    assert found["boxes"].shape[1] == 6 and len(found["labels"]) == len(found["boxes"])


def test_bad_annotations_say_which_file_and_why(tmp_path: Path) -> None:
    from medvision.errors import DataError
    from medvision.train.boxes import detection_items

    pipeline = load_pipeline(_pipeline(tmp_path, "voc"))
    root = _voc(tmp_path / "voc", count=2)
    first = sorted((root / "Annotations").glob("*.xml"))[0]
    first.write_text(first.read_text()[:40])  # truncated XML
    with pytest.raises(DataError, match=first.name):
        detection_items(pipeline, root)
    first.write_text("<annotation><filename>img_000.png</filename><object><name>tumour"
                     "</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>"
                     "</bndbox></object></annotation>")
    with pytest.raises(DataError, match="class 'tumour' is not one of"):
        detection_items(pipeline, root)
    (root / "JPEGImages" / "annotations.json").write_text("{not json")
    with pytest.raises(DataError, match="not a COCO annotation file"):
        detection_items(load_pipeline(_pipeline(tmp_path, "coco")), root / "JPEGImages")
