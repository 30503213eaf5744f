"""Analysis results as standard DICOM in the source study: SR, SEG, Parametric Map, overlays.

Built from the in-memory :class:`~medvision.report.study.StudyReport` (prediction, mask,
saliency volume, the source datasets and the rendered key images), never from files read back.

* Structured Report, TID 1500 Measurement Report (highdicom): one measurement group for the
  result (its finding, the probability of the predicted class, the decision threshold and the
  QC evaluations) and one per class (the class's probability, or its segmented volume), each
  with the class's code as its Finding. Codes come from the pipeline's ``report.classes``
  (SNOMED CT, DCM, RadLex); a private code (scheme ``99MEDVISION``) only where a pipeline
  declares none or no standard concept exists (the decision threshold, the OOD distance).
* Segmentation (highdicom), aligned frame by frame with the source series, with each segment's
  category, type and colour from the pipeline.
* Parametric Map (highdicom) of the saliency volume (float32, no units), for 3D inputs.
* Secondary Capture key images with the saliency overlay, marked as derived and not for
  diagnosis (burned-in annotation YES).

Result UIDs are derived from the inputs (study, instance UIDs, model, weights), so analysing
the same study again yields the same objects, and the PACS and outbox deduplicate them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medvision._version import __version__
from medvision.errors import InvalidDicomError, ReportError
from medvision.io.header_checks import check_copied_values, check_dataset_uids
from medvision.report.labels import PRIVATE_SCHEME

if TYPE_CHECKING:
    from medvision.config import Pipeline
    from medvision.report.figures import KeyImage
    from medvision.report.study import StudyReport

__all__ = ["DicomResult", "class_code", "write_dicom"]

log = logging.getLogger(__name__)


#: Standard concepts used whatever the pipeline (checked against pydicom's dictionary in tests).
FINDING = ("121071", "DCM", "Finding")
PROBABILITY = ("122157", "DCM", "Probability")
VOLUME = ("118565006", "SCT", "Volume")
QUALITY = ("111052", "DCM", "Quality Finding")
YES = ("373066001", "SCT", "Yes")
NO = ("373067005", "SCT", "No")
TISSUE = ("85756007", "SCT", "Tissue")


@dataclass(frozen=True)
class DicomResult:
    """One DICOM object written: its kind (SR, SEG, PM, SC), file, SOP Instance UID, and what
    a sender needs without reading the file again (its series and SOP class)."""

    kind: str
    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str


#: SOP Class (pydicom's name) and series seed of each kind of result.
_KINDS = {"SR": ("Comprehensive3DSRStorage", "sr-series"),
          "SEG": ("SegmentationStorage", "seg-series"),
          "PM": ("ParametricMapStorage", "pm-series"),
          "SC": ("SecondaryCaptureImageStorage", "overlay-series")}


def _result(kind: str, path: Path, sop_instance_uid: str, seed: Sequence[str]) -> DicomResult:
    from pydicom import uid

    sop_class, series = _KINDS[kind]
    return DicomResult(kind, path, sop_instance_uid, _uid(seed, series),
                       str(getattr(uid, sop_class)))


def _code(triple: Sequence[str]) -> Any:
    from pydicom.sr.coding import Code

    value, scheme, meaning = triple
    return Code(value, scheme, meaning)


def class_code(pipeline: Pipeline, name: str) -> Any:
    """The pipeline's code for a class (``report.classes``), else a private one."""
    from pydicom.sr.coding import Code

    label = pipeline.report.classes.get(name)
    if label is not None and label.code is not None:
        return Code(label.code.value, label.code.scheme, label.code.meaning)
    return Code(name[:16], PRIVATE_SCHEME, name)


def _category(pipeline: Pipeline, name: str) -> Any:
    from pydicom.sr.coding import Code

    label = pipeline.report.classes.get(name)
    if label is not None and label.category is not None:
        return Code(label.category.value, label.category.scheme, label.category.meaning)
    return _code(TISSUE)


def _uid(seed: Sequence[str], kind: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[*seed, kind]))


def _algorithm(report: StudyReport) -> tuple[str, str]:
    return f"medvision {report.pipeline.name}", f"{report.pipeline.version} ({__version__})"


def _unitless() -> Any:
    from pydicom.sr.coding import Code

    return Code("1", "UCUM", "no units")


def _sr(report: StudyReport, pipeline: Pipeline, sources: list[Any], seed: Sequence[str],
        path: Path, predecessors: Sequence[Any] = ()) -> str:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    name, version = _algorithm(report)
    algorithm = hd.sr.AlgorithmIdentification(name=name, version=version)
    prediction = report.prediction
    evidence = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources[:1]]

    def group(key: str, finding: Any, measurements: list[Any], evaluations: list[Any]) -> Any:
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(seed, f"tracking-{key}"),
                                                         identifier=f"{name} {key}"[:64]),
            finding_type=finding, measurements=measurements or None,
            qualitative_evaluations=evaluations or None, algorithm_id=algorithm,
            source_images=evidence)

    main_measurements: list[Any] = []
    if prediction is not None:
        label = prediction.label
        finding = (class_code(pipeline, label) if label in prediction.classes
                   else _code(FINDING))
        if prediction.probabilities is not None:
            top = dict(zip(prediction.classes, prediction.probabilities, strict=True))[label]
            main_measurements.append(hd.sr.Measurement(
                name=_code(PROBABILITY), value=float(top), unit=_unitless(),
                algorithm_id=algorithm))
        if prediction.threshold is not None:
            main_measurements.append(hd.sr.Measurement(
                name=Code("DECISION-THR", PRIVATE_SCHEME, "Decision threshold"),
                value=float(prediction.threshold), unit=_unitless(), algorithm_id=algorithm))
        values = [class_code(pipeline, c) for c in label.split("+")
                  if c in prediction.classes] or [finding]
        evaluations = [hd.sr.QualitativeEvaluation(name=_code(FINDING), value=v)
                       for v in values]
    else:
        finding = _code(FINDING)
        evaluations = [hd.sr.QualitativeEvaluation(
            name=_code(FINDING),
            value=Code("WITHHELD", PRIVATE_SCHEME, "Result withheld (input out of distribution)"))]
    main_measurements.extend(_qc_measurements(report, algorithm))
    evaluations.extend(_qc_evaluations(report))
    groups = [group("finding", finding, main_measurements, evaluations)]
    if prediction is not None:
        for cls, value in zip(prediction.classes, prediction.probabilities or (), strict=False):
            groups.append(group(f"class {cls}", class_code(pipeline, cls), [hd.sr.Measurement(
                name=_code(PROBABILITY), value=float(value), unit=_unitless(),
                algorithm_id=algorithm)], []))
        groups.extend(_box_groups(report, pipeline, sources, seed, algorithm, name))
        for cls, ml in prediction.volumes_ml.items():
            groups.append(group(f"class {cls}", class_code(pipeline, cls), [hd.sr.Measurement(
                name=_code(VOLUME), value=float(ml), unit=Code("ml", "UCUM", "milliliter"),
                algorithm_id=algorithm)], []))
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid(seed, "device"), name="medvision", model_name=name,
            manufacturer_name="medvision")))
    content = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=Code("18748-4", "LN", "Diagnostic imaging study"),
        imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources, content=content, series_number=9901,
        series_instance_uid=_uid(seed, "sr-series"), sop_instance_uid=_uid(seed, "sr"),
        instance_number=1, manufacturer="medvision", is_complete=not report.partial,
        is_final=False, is_verified=False,
        series_description=f"{name} findings (not for diagnostic use)"[:64],
        previous_versions=list(predecessors) or None)
    sr.save_as(path)
    return str(sr.SOPInstanceUID)


#: At most this many boxes go into an SR (the highest scoring); report.json has them all.
MAX_SR_BOXES = 300


def _box_groups(report: StudyReport, pipeline: Pipeline, sources: list[Any],
                seed: Sequence[str], algorithm: Any, name: str) -> list[Any]:
    """One planar ROI group per detected box (TID 1410): the box as a closed SCOORD
    polyline in the source image's pixels, its class as the finding, its score as a
    measurement."""
    import highdicom as hd

    prediction = report.prediction
    if prediction is None or prediction.boxes is None or len(sources) != 1:
        return []
    order = np.argsort(-np.asarray(prediction.box_scores))[:MAX_SR_BOXES]
    groups = []
    for rank, k in enumerate(order):
        x1, y1, x2, y2 = (float(v) for v in prediction.boxes[k])
        # DICOM pixel coordinates: the top left corner of the top left pixel is (0, 0),
        # which is where medvision's box edges sit too
        corners = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]],
                           dtype=np.float32)
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=corners,
            source_image=hd.sr.SourceImageForRegion.from_source_image(sources[0]))
        cls = prediction.classes[int(prediction.box_labels[k])]
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=_uid(seed, f"box-{rank}"), identifier=f"{cls} {rank + 1}"),
            referenced_region=region, finding_type=class_code(pipeline, cls),
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(
                name=_code(PROBABILITY), value=float(prediction.box_scores[k]),
                unit=_unitless(), algorithm_id=algorithm)]))
    return groups


def _qc_measurements(report: StudyReport, algorithm: Any) -> list[Any]:
    """The out-of-distribution distance and its threshold, as numeric measurements."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    qc = report.qc
    out = []
    for value, code, meaning in ((qc.ood_distance, "OOD-DIST", "Out-of-distribution distance"),
                                 (qc.ood_threshold, "OOD-THR", "Out-of-distribution threshold")):
        if value is not None:
            out.append(hd.sr.Measurement(name=Code(code, PRIVATE_SCHEME, meaning),
                                         value=float(value), unit=_unitless(),
                                         algorithm_id=algorithm))
    return out


def _qc_evaluations(report: StudyReport) -> list[Any]:
    """The QC result (passed or flagged), and each flag, as qualitative evaluations."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    qc = report.qc
    flagged = report.status == "flagged"
    out = [hd.sr.QualitativeEvaluation(
        name=_code(QUALITY),
        value=Code("FLAGGED", PRIVATE_SCHEME, "Flagged: result may not apply") if flagged
        else Code("PASSED", PRIVATE_SCHEME, "Passed"))]
    if qc.out_of_distribution is not None:
        out.append(hd.sr.QualitativeEvaluation(
            name=Code("OOD", PRIVATE_SCHEME, "Out of distribution"),
            value=_code(YES) if qc.out_of_distribution else _code(NO)))
    for code in qc.flagged_by:
        if code == "out_of_distribution":
            continue
        out.append(hd.sr.QualitativeEvaluation(
            name=Code("QC-FLAG", PRIVATE_SCHEME, "Result-relevant QC warning"),
            value=Code(code[:16], PRIVATE_SCHEME, code)))
    return out


def _seg(report: StudyReport, pipeline: Pipeline, sources: list[Any], mask: np.ndarray,
         seed: Sequence[str], path: Path) -> str | None:
    import highdicom as hd

    classes = pipeline.classes
    labels = [k for k in range(1, len(classes)) if np.any(mask == k)]
    if not labels:
        return None
    name, version = _algorithm(report)
    algorithm = hd.AlgorithmIdentificationSequence(name=name, version=version,
                                                   family=_ai_family())
    frames = np.transpose(mask, (2, 1, 0)).astype(np.uint8)  # (slices, rows, columns)
    remap = np.zeros(max(int(mask.max()) + 1, len(classes)), dtype=np.uint8)
    descriptions = []
    for number, label in enumerate(labels, start=1):
        remap[label] = number
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=classes[label][:64],
            segmented_property_category=_category(pipeline, classes[label]),
            segmented_property_type=class_code(pipeline, classes[label]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=_uid(seed, f"segment-{label}"), tracking_id=classes[label])
        colour = pipeline.report.colour(classes[label], label)
        description.RecommendedDisplayCIELabValue = list(_cielab(colour))
        descriptions.append(description)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=remap[frames],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=_uid(seed, "seg-series"),
        series_number=9902, sop_instance_uid=_uid(seed, "seg"), instance_number=1,
        manufacturer="medvision", manufacturer_model_name=name, software_versions=version,
        device_serial_number="0", series_description=f"{name} segmentation"[:64])
    seg.save_as(path)
    return str(seg.SOPInstanceUID)


def _source_planes(array: np.ndarray, affine: np.ndarray, sources: Sequence[Any]
                   ) -> list[int] | None:
    """The plane (third axis) of ``array`` at each source slice, or ``None``.

    One plane per source, in order, when the counts agree; otherwise (a series with a slice
    missing, loaded onto a regular grid with more planes than files) each source's Image
    Position (Patient) located on the grid, so SEG and Parametric Map frames are built over
    the slices that are present. ``None`` when a source has no position or falls between
    planes.
    """
    if array.ndim != 3:
        return None
    if array.shape[2] == len(sources):
        return list(range(len(sources)))
    inverse = np.linalg.inv(np.asarray(affine, dtype=float))
    planes = []
    for ds in sources:
        position = ds.get("ImagePositionPatient")
        if position is None or len(position) != 3:
            return None
        x, y, z = (float(v) for v in position)
        i, j, k, _ = inverse @ np.array([-x, -y, z, 1.0])  # DICOM LPS -> RAS, then voxels
        plane = int(round(k))
        if not 0 <= plane < array.shape[2] or max(abs(i), abs(j), abs(k - plane)) > 0.1:
            return None
        planes.append(plane)
    return planes


def _cielab(rgb: Sequence[int]) -> tuple[int, int, int]:
    """sRGB 0-255 to DICOM's scaled CIELab (PS3.3 C.10.7.1.1), as highdicom does."""
    from highdicom.color import CIELabColor

    return tuple(CIELabColor.from_rgb(*[int(c) for c in rgb]).value)  # type: ignore[return-value]


def _parametric_map(report: StudyReport, sources: list[Any], saliency: np.ndarray,
                    seed: Sequence[str], path: Path) -> str:
    """The saliency volume as a float Parametric Map on the source series' frames."""
    import highdicom as hd

    name, version = _algorithm(report)
    method = report.saliency.method if report.saliency is not None else "saliency"
    frames = np.ascontiguousarray(np.transpose(saliency, (2, 1, 0)), dtype=np.float32)
    low, high = float(frames.min()), float(frames.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="saliency", lut_explanation=f"{method} attribution"[:64],
        unit=_unitless(), value_range=(low, high), slope=1.0, intercept=0.0)
    pm = hd.pm.ParametricMap(
        source_images=sources, pixel_array=frames, series_instance_uid=_uid(seed, "pm-series"),
        series_number=9904, sop_instance_uid=_uid(seed, "pm"), instance_number=1,
        manufacturer="medvision", manufacturer_model_name=name, software_versions=version,
        device_serial_number="0", contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping], window_center=(low + high) / 2,
        # a window narrower than 1 needs LINEAR_EXACT; saliency spans [0, 1] anyway
        window_width=max(high - low, 1.0), content_label="SALIENCY",
        content_description=f"{method} saliency, not for diagnostic use"[:64],
        series_description=f"{name} saliency map - NOT FOR DIAGNOSTIC USE"[:64])
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


def _overlay(report: StudyReport, source: Any, image: KeyImage, seed: Sequence[str],
             index: int, path: Path) -> str:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    rgb = np.ascontiguousarray(image.rgb, dtype=np.uint8)
    name, version = _algorithm(report)
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
                    "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, keyword, source.get(keyword, ""))
    if "SpecificCharacterSet" in source:  # the copied names keep their encoding
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    sop = _uid(seed, f"overlay-{index}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop  # type: ignore[assignment]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop
    ds.SeriesInstanceUID, ds.SeriesNumber = _uid(seed, "overlay-series"), 9903
    ds.InstanceNumber = index + 1
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.Manufacturer, ds.SoftwareVersions = "medvision", version
    ds.SeriesDescription = f"saliency overlay, NOT FOR DIAGNOSIS: {name}"[:64]  # LO: 64 chars
    method = report.saliency.method if report.saliency is not None else "saliency"
    label = report.prediction.label if report.prediction is not None else ""
    ds.ImageComments = f"{method} saliency of {label} ({image.plane}); not for diagnostic use"
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
    ds.PixelData = rgb.tobytes()
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


def write_dicom(report: StudyReport, pipeline: Pipeline, out_dir: Path, *,
                overlays: Sequence[KeyImage] = (),
                predecessors: Sequence[Any] = ()) -> list[DicomResult]:
    """Write the DICOM result objects of one analysed study (ok, flagged, or withheld).

    Args:
        report: the study's report, with its source datasets (in the volume's slice order),
            prediction (and mask) and saliency in memory.
        pipeline: the pipeline (class codes and colours).
        out_dir: where to write the ``.dcm`` files.
        overlays: the key images with the saliency overlay (as rendered for the report).
        predecessors: earlier SRs of the same study this analysis supersedes (a study
            re-analysed after more instances arrived); referenced in the new SR's Predecessor
            Documents Sequence. An earlier SR with the same SOP Instance UID (the same
            analysis repeated) is not its own predecessor.

    Returns:
        One :class:`DicomResult` per object written (none for non-DICOM input).

    Raises:
        InvalidDicomError: a patient or study value the results copy breaks its VR.
        ReportError: a result object could not be built.
    """
    if not report.sources:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = [_complete(ds) for ds in report.sources]
    try:  # the input's fault, not ours: the study is rejected, naming the attribute
        for ds in sources:
            check_dataset_uids(ds)  # present and valid: the results reference them
        check_copied_values(sources[0])
    except InvalidDicomError as e:
        raise InvalidDicomError(f"DICOM results not written: {e}") from e
    seed = [str(sources[0].StudyInstanceUID), report.pipeline.name,
            report.pipeline.weights_sha256, *sorted(str(ds.SOPInstanceUID) for ds in sources)]
    written: list[DicomResult] = []
    path = out_dir / "sr.dcm"
    try:
        sr_uid = _uid(seed, "sr")
        earlier = [ds for ds in predecessors if str(ds.SOPInstanceUID) != sr_uid]
        written.append(_result("SR", path, _sr(report, pipeline, sources, seed, path, earlier),
                               seed))
        prediction = report.prediction
        mask = prediction.mask if prediction is not None else None
        if mask is not None:
            labels = np.rint(np.asarray(mask.array[0])).astype(int)
            planes = _source_planes(labels, mask.affine, sources)
            if planes is None and labels.ndim == 3:
                log.warning("the segmentation's planes do not match the source slices: no SEG")
            elif planes is not None:
                path = out_dir / "seg.dcm"
                uid = _seg(report, pipeline, sources, labels[:, :, planes], seed, path)
                if uid:
                    written.append(_result("SEG", path, uid, seed))
        saliency = report.saliency
        if saliency is not None and len(sources) > 1:
            values = np.asarray(saliency.volume.array[0])
            planes = _source_planes(values, saliency.volume.affine, sources)
            if planes is None and values.ndim == 3:
                log.warning("the saliency map's planes do not match the source slices: no "
                            "Parametric Map")
            elif planes is not None:
                path = out_dir / "pm.dcm"
                written.append(_result("PM", path, _parametric_map(
                    report, sources, values[:, :, planes], seed, path), seed))
        for index, image in enumerate(overlays):
            path = out_dir / f"overlay_{index}.dcm"
            written.append(_result("SC", path, _overlay(
                report, sources[len(sources) // 2], image, seed, index, path), seed))
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        # the library's text is left out: it may quote the header values it refused
        raise ReportError(f"cannot build DICOM results ({type(e).__name__} while writing "
                          f"{path.name})") from e
    return written
