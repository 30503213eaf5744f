"""Analysis results as standard DICOM in the source study: SR, SEG and key-image overlays.

* Structured Report, TID 1500 Measurement Report (highdicom): the finding, the class
  probabilities or the segmented volumes, with the algorithm's name and version.
* Segmentation (highdicom), aligned frame by frame with the source series, for segmentation
  pipelines on a regular series.
* Parametric Map (highdicom) of the saliency volume (float32, real-world value mapping "no
  units") on the source series' frames, for 3D inputs.
* Secondary Capture key images with the saliency overlay, marked as derived and not for
  diagnosis (burned-in annotation YES).

Result UIDs are derived from the inputs (study, instance UIDs, model, weights), so analysing
the same study again yields the same objects, and the PACS and outbox deduplicate them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medvision._version import __version__
from medvision.errors import ReportError

__all__ = ["write_results"]

_SCHEME = "99MEDVISION"


def _uid(seed: Sequence[str], kind: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[*seed, kind]))


def _algorithm(report: dict[str, Any]) -> tuple[str, str]:
    pipeline = report["pipeline"]
    return f"medvision {pipeline['name']}", f"{pipeline['version']} ({__version__})"


def _sr(report: dict[str, Any], sources: list[Any], seed: Sequence[str], path: Path,
        predecessors: Sequence[Any] = ()) -> str:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    name, version = _algorithm(report)
    algorithm = hd.sr.AlgorithmIdentification(name=name, version=version)
    prediction = report["prediction"] or {}
    measurements = []
    for cls, value in (prediction.get("probabilities") or {}).items():
        measurements.append(hd.sr.Measurement(
            name=Code(f"P-{cls}"[:16], _SCHEME, f"Probability of {cls}"), value=float(value),
            unit=Code("1", "UCUM", "no units"), algorithm_id=algorithm))
    for cls, value in (prediction.get("volumes_ml") or {}).items():
        measurements.append(hd.sr.Measurement(
            name=Code(f"V-{cls}"[:16], _SCHEME, f"Volume of {cls}"), value=float(value),
            unit=Code("ml", "UCUM", "milliliter"), algorithm_id=algorithm))
    if prediction.get("threshold") is not None:
        measurements.append(hd.sr.Measurement(
            name=Code("DECISION-THR", _SCHEME, "Decision threshold"),
            value=float(prediction["threshold"]), unit=Code("1", "UCUM", "no units"),
            algorithm_id=algorithm))
    label = str(prediction["label"]) if prediction else "WITHHELD"
    evaluations = [hd.sr.QualitativeEvaluation(
        name=Code("FINDING", _SCHEME, "Model finding"),
        value=Code(label[:16], _SCHEME, label if prediction else
                   "Result withheld (input out of distribution)"))]
    measurements.extend(_qc_measurements(report, algorithm))
    evaluations.extend(_qc_evaluations(report))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(seed, "tracking"),
                                                     identifier=f"{name} finding"),
        measurements=measurements, qualitative_evaluations=evaluations, algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)
                       for ds in sources[:1]])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid(seed, "device"), name="medvision", model_name=name,
            manufacturer_name="medvision")))
    content = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=Code("18748-4", "LN", "Diagnostic imaging study"),
        imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources, content=content, series_number=9901,
        series_instance_uid=_uid(seed, "sr-series"), sop_instance_uid=_uid(seed, "sr"),
        instance_number=1, manufacturer="medvision", is_complete=not _partial(report),
        is_final=False, is_verified=False,
        series_description=f"{name} findings (not for diagnostic use)",
        previous_versions=list(predecessors) or None)
    sr.save_as(path)
    return str(sr.SOPInstanceUID)


def _partial(report: dict[str, Any]) -> bool:
    """Whether the analysis knowably ran on an incomplete series (files left out, or slices
    missing between those received): the SR's Completion Flag is then PARTIAL."""
    qc = report.get("qc") or {}
    if report["input"].get("unreadable_files"):
        return True
    return any(f["code"] == "geometry_note" and "missing slices" in f["message"]
               for f in qc.get("flags", []))


def _qc_measurements(report: dict[str, Any], algorithm: Any) -> list[Any]:
    """The out-of-distribution distance and its threshold, as numeric measurements."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    qc = report.get("qc") or {}
    out = []
    for key, code, meaning in (("ood_distance", "OOD-DIST", "Out-of-distribution distance"),
                               ("ood_threshold", "OOD-THR", "Out-of-distribution threshold")):
        if qc.get(key) is not None:
            out.append(hd.sr.Measurement(name=Code(code, _SCHEME, meaning),
                                         value=float(qc[key]),
                                         unit=Code("1", "UCUM", "no units"),
                                         algorithm_id=algorithm))
    return out


def _qc_evaluations(report: dict[str, Any]) -> list[Any]:
    """The QC result (passed or flagged), and each flag, as qualitative evaluations."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    qc = report.get("qc") or {}
    flagged = report["status"] == "flagged"
    out = [hd.sr.QualitativeEvaluation(
        name=Code("QC", _SCHEME, "Input quality check"),
        value=Code("FLAGGED", _SCHEME, "Flagged: result may not apply") if flagged
        else Code("PASSED", _SCHEME, "Passed"))]
    if qc.get("out_of_distribution") is not None:
        out.append(hd.sr.QualitativeEvaluation(
            name=Code("OOD", _SCHEME, "Out of distribution"),
            value=Code("373066001", "SCT", "Yes") if qc["out_of_distribution"]
            else Code("373067005", "SCT", "No")))
    for code in qc.get("flagged_by") or []:
        if code == "out_of_distribution":
            continue
        out.append(hd.sr.QualitativeEvaluation(
            name=Code("QC-FLAG", _SCHEME, "Result-relevant QC warning"),
            value=Code(code[:16], _SCHEME, code)))
    return out


def _seg(report: dict[str, Any], sources: list[Any], mask: np.ndarray,
         classes: Sequence[str], seed: Sequence[str], path: Path) -> str | None:
    import highdicom as hd
    from pydicom.sr.coding import Code

    labels = [k for k in range(1, len(classes)) if np.any(mask == k)]
    if not labels:
        return None
    name, version = _algorithm(report)
    algorithm = hd.AlgorithmIdentificationSequence(name=name, version=version,
                                                   family=_ai_family())
    frames = np.transpose(mask, (2, 1, 0)).astype(np.uint8)  # (slices, rows, columns)
    remap = np.zeros(int(mask.max()) + 1, dtype=np.uint8)
    descriptions = []
    for number, label in enumerate(labels, start=1):
        remap[label] = number
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=classes[label],
            segmented_property_category=Code("85756007", "SCT", "Tissue"),
            segmented_property_type=Code(classes[label][:16], _SCHEME, classes[label]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=_uid(seed, f"segment-{label}"), tracking_id=classes[label]))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=remap[frames],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=_uid(seed, "seg-series"),
        series_number=9902, sop_instance_uid=_uid(seed, "seg"), instance_number=1,
        manufacturer="medvision", manufacturer_model_name=name, software_versions=version,
        device_serial_number="0", series_description=f"{name} segmentation")
    seg.save_as(path)
    return str(seg.SOPInstanceUID)


def _parametric_map(report: dict[str, Any], sources: list[Any], saliency: np.ndarray,
                    seed: Sequence[str], path: Path) -> str:
    """The saliency volume as a float Parametric Map on the source series' frames."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    name, version = _algorithm(report)
    method = report["saliency"]["method"]
    frames = np.ascontiguousarray(np.transpose(saliency, (2, 1, 0)), dtype=np.float32)
    low, high = float(frames.min()), float(frames.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="saliency", lut_explanation=f"{method} attribution"[:64],
        unit=Code("1", "UCUM", "no units"), value_range=(low, high), slope=1.0, intercept=0.0)
    pm = hd.pm.ParametricMap(
        source_images=sources, pixel_array=frames, series_instance_uid=_uid(seed, "pm-series"),
        series_number=9904, sop_instance_uid=_uid(seed, "pm"), instance_number=1,
        manufacturer="medvision", manufacturer_model_name=name, software_versions=version,
        device_serial_number="0", contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping], window_center=(low + high) / 2,
        # a window narrower than 1 needs LINEAR_EXACT; saliency spans [0, 1] anyway
        window_width=max(high - low, 1.0), content_label="SALIENCY",
        content_description=f"{method} saliency, not for diagnostic use"[:64],
        series_description=f"{name} saliency map - NOT FOR DIAGNOSTIC USE")
    _laterality(pm, sources[0])
    pm.save_as(path)
    return str(pm.SOPInstanceUID)


def _laterality(ds: Any, source: Any) -> None:
    """General Series Laterality (Type 2C: present, possibly empty, for paired body parts):
    the source series' value, else empty."""
    if "Laterality" not in ds:
        ds.Laterality = source.get("Laterality", "")


def _ai_family() -> Any:
    from pydicom.sr.codedict import codes

    return codes.cid7162.ArtificialIntelligence


def _overlay(report: dict[str, Any], source: Any, png: Path, seed: Sequence[str], index: int,
             path: Path) -> str:
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    rgb = np.asarray(Image.open(png).convert("RGB"))
    name, version = _algorithm(report)
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
                    "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, keyword, source.get(keyword, ""))
    sop = _uid(seed, f"overlay-{index}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop  # type: ignore[assignment]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = _uid(seed, "overlay-series"), 9903, index + 1
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.Manufacturer, ds.SoftwareVersions = "medvision", version
    ds.SeriesDescription = f"saliency overlay, NOT FOR DIAGNOSIS: {name}"[:64]  # LO: 64 chars
    ds.ImageComments = f"{report['saliency']['method']} saliency of {report['prediction']['label']}; not for diagnostic use"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "YES"
    _laterality(ds, source)
    ds.PatientOrientation = ""
    source_ref = Dataset()
    source_ref.ReferencedSOPClassUID = source.SOPClassUID
    source_ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ds.SourceImageSequence = [source_ref]
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return sop


_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
          "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


def _complete(ds: Any) -> Any:
    """Add Type 2 patient and study attributes a sender left out (empty, as DICOM allows)."""
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def write_results(report: dict[str, Any], sources: list[Any], study_dir: Path,
                  classes: Sequence[str], out_dir: Path, *,
                  predecessors: Sequence[Any] = ()) -> list[tuple[str, Path, str]]:
    """Write the DICOM result objects of one analysed study.

    Args:
        report: the study's report.json (status ok or flagged; a withheld result gives an
            SR saying so, with the QC evaluations, and nothing else).
        sources: the analysed series' datasets, in the volume's slice order, with pixels.
        study_dir: the analysis folder (mask.nii.gz and overlay PNGs).
        classes: the pipeline's class names.
        out_dir: where to write the ``.dcm`` files.
        predecessors: earlier SRs of the same study that this analysis supersedes (a study
            re-analysed after more instances arrived); referenced in the new SR's Predecessor
            Documents Sequence. An earlier SR with the same SOP Instance UID (the same
            analysis repeated) is not its own predecessor.

    Returns:
        ``(sop_instance_uid, path, kind)`` for each object written.

    Raises:
        ReportError: a result object could not be built.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = [_complete(ds) for ds in sources]
    pipeline = report["pipeline"]
    seed = [str(sources[0].StudyInstanceUID), pipeline["name"], pipeline["weights_sha256"],
            *sorted(str(ds.SOPInstanceUID) for ds in sources)]
    written: list[tuple[str, Path, str]] = []
    try:
        sr_uid = _uid(seed, "sr")
        earlier = [ds for ds in predecessors if str(ds.SOPInstanceUID) != sr_uid]
        written.append((_sr(report, sources, seed, out_dir / "sr.dcm", earlier),
                        out_dir / "sr.dcm", "SR"))
        mask_file = (report["prediction"] or {}).get("mask_file")
        if mask_file:
            from medvision.io import read_volume

            mask = np.asarray(read_volume(study_dir / mask_file).array[0]).round().astype(int)
            if mask.ndim == 3 and mask.shape[2] == len(sources):
                uid = _seg(report, sources, mask, classes, seed, out_dir / "seg.dcm")
                if uid:
                    written.append((uid, out_dir / "seg.dcm", "SEG"))
        saliency_file = (report.get("saliency") or {}).get("files", {}).get("nifti")
        if saliency_file and len(sources) > 1:
            from medvision.io import read_volume

            saliency = np.asarray(read_volume(study_dir / saliency_file).array[0])
            if saliency.ndim == 3 and saliency.shape[2] == len(sources):
                uid = _parametric_map(report, sources, saliency, seed, out_dir / "pm.dcm")
                written.append((uid, out_dir / "pm.dcm", "PM"))
        for index, png in enumerate(sorted(study_dir.glob("overlay_*.png"))):
            target = out_dir / f"overlay_{index}.dcm"
            written.append((_overlay(report, sources[len(sources) // 2], png, seed, index, target),
                            target, "SC"))
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise ReportError(f"cannot build DICOM results: {type(e).__name__}: {e}") from e
    return written
