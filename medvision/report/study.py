"""The typed result of analysing one study, which every renderer takes.

``analyze`` builds a :class:`StudyReport` from the typed stage outputs (the input
:class:`~medvision.io.Volume`, the :class:`~medvision.infer.predictor.Prediction`, the
:class:`~medvision.explain.saliency.SaliencyMap`) and hands it to the renderers:
:mod:`medvision.report.json` (``report.json``), :mod:`medvision.report.html` (the page),
:mod:`medvision.report.figures` (PNG key images) and :mod:`medvision.report.dicom` (SR, SEG,
Parametric Map, overlays). None of them reads a result back from disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from medvision.explain.saliency import SaliencyMap
from medvision.infer.predictor import Prediction
from medvision.infer.qc import QCFlag
from medvision.io import Volume
from medvision.vocabulary import Severity, Status

__all__ = ["Geometry", "InputSummary", "PipelineInfo", "QCResult", "StudyReport",
           "UnreadableFile"]


@dataclass(frozen=True)
class UnreadableFile:
    """A file of the study left out, and why."""

    file: str
    reason: str


@dataclass(frozen=True)
class Geometry:
    """The analysed volume's grid (RAS+ affine)."""

    shape: tuple[int, ...]
    spacing_mm: tuple[float, ...]
    orientation: str
    affine: tuple[tuple[float, ...], ...]
    spacing_known: bool = True
    """False for pictures (PNG, JPEG...): no physical size, one pixel taken as 1 mm."""

    @classmethod
    def of(cls, volume: Volume) -> Geometry:
        """The geometry of ``volume``, rounded to a micrometre."""
        return cls(shape=tuple(int(s) for s in volume.spatial_shape),
                   spacing_mm=tuple(round(float(s), 6) for s in volume.spacing),
                   orientation=volume.orientation,
                   affine=tuple(tuple(round(float(v), 6) for v in row) for row in volume.affine),
                   spacing_known=volume.header.get("spacing_known") is not False)


@dataclass(frozen=True)
class InputSummary:
    """What was read: hashed identifiers only (no patient identity unless ``phi``)."""

    study_key: str
    source_name: str
    format: str = "unknown"
    modality: str | None = None
    series_key_sha256: str | None = None
    instance_uid_sha256: tuple[str, ...] = ()
    geometry: Geometry | None = None
    unreadable_files: tuple[UnreadableFile, ...] = ()
    phi: Mapping[str, str] | None = None
    synthetic: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class PipelineInfo:
    """Which model made the result (the provenance an auditor asks for)."""

    name: str
    version: str
    task: str
    weights_sha256: str
    config_hash: str
    temperature: float
    backend: str
    members: tuple[Mapping[str, Any], ...] = ()
    """An ensemble's members: weights file, its SHA-256, network, temperature, fold or member."""
    device: Mapping[str, str] | None = None
    """Where the networks ran: ``device`` (cpu, cuda:0, mps) and ``name`` (the GPU's or CPU's)."""
    class_names: Mapping[str, str] = field(default_factory=dict)
    """How a finding names each class in words (``anterior`` -> ``anterior hippocampus``,
    from the class's code meaning); classes not listed keep their own name."""

    @property
    def calibration(self) -> str:
        """How the probabilities are calibrated, in words (an ensemble: its members)."""
        from medvision.models.bundle import calibration_note

        return calibration_note(self.temperature,
                                [float(m.get("temperature", 1.0)) for m in self.members])


def class_words(name: str, meaning: str | None) -> str:
    """A class as a finding says it: its name, with its code's meaning when that adds to it
    (``anterior`` coded Hippocampus: ``anterior hippocampus``)."""
    if not meaning or meaning.lower() in name.lower() or name.lower() in meaning.lower():
        return name
    return f"{name} {meaning[0].lower() + meaning[1:]}"


@dataclass(frozen=True)
class QCResult:
    """Input checks and the out-of-distribution guard.

    Attributes:
        flags: every QC flag raised on the input.
        ood_distance: the input's feature distance, when the model has a guard.
        ood_threshold: the guard's threshold.
        out_of_distribution: whether the distance is above it (``None``: no guard).
        flagged_by: the codes that made the study ``flagged``.
        withheld: the result is withheld (``qc.on_out_of_distribution: abstain``).
    """

    flags: tuple[QCFlag, ...] = ()
    ood_distance: float | None = None
    ood_threshold: float | None = None
    out_of_distribution: bool | None = None
    flagged_by: tuple[str, ...] = ()
    withheld: bool = False

    @property
    def warnings(self) -> tuple[QCFlag, ...]:
        """The flags that were reported without stopping the study."""
        return tuple(f for f in self.flags if f.severity == Severity.WARN)


@dataclass(frozen=True, eq=False)
class StudyReport:
    """One study's analysis, as the renderers see it.

    Attributes:
        study: the study key (its folder name).
        status: ok, flagged, rejected or failed.
        reason: why it is not ``ok`` (``None`` when it is).
        created: ISO 8601 time, UTC.
        input: what was read.
        pipeline: which model.
        prediction: the model's result (``None``: rejected, failed or withheld).
        saliency: its explanation on the input's grid.
        faithfulness: deletion-curve scores, when asked for.
        qc: input checks.
        timings: seconds per step.
        software: versions of what made it.
        run: the run fingerprint (what decides the outputs; see ``analyze``).
        replaces: the earlier report this one replaces, summarised.
        volume: the analysed input (for figures and DICOM renderers).
        sources: the analysed DICOM instances (pydicom datasets in slice order, without
            unreadable ones); empty for non-DICOM input.
        files: names of the files written beside report.json, by role.
    """

    study: str
    status: Status
    reason: str | None
    created: str
    input: InputSummary
    pipeline: PipelineInfo
    prediction: Prediction | None = None
    saliency: SaliencyMap | None = None
    faithfulness: Mapping[str, Any] | None = None
    qc: QCResult = QCResult()
    timings: Mapping[str, float] = field(default_factory=dict)
    software: Mapping[str, str] = field(default_factory=dict)
    run: Mapping[str, Any] = field(default_factory=dict)
    replaces: Mapping[str, Any] | None = None
    volume: Volume | None = None
    sources: tuple[Any, ...] = ()
    files: Mapping[str, Any] = field(default_factory=dict)

    @property
    def positive(self) -> bool | None:
        """Whether the result is a finding: a class other than the first (the pipeline's
        normal class), or any segmented foreground; ``None`` without a result."""
        prediction = self.prediction
        if prediction is None:
            return None
        if prediction.counts:
            return any(n > 0 for n in prediction.counts.values())
        if prediction.probabilities is not None:
            return prediction.label != prediction.classes[0]
        return any(v > 0 for v in prediction.volumes_ml.values())

    @property
    def partial(self) -> bool:
        """Whether the analysis knowably ran on an incomplete series (files left out, or
        slices missing between those received)."""
        if self.input.unreadable_files:
            return True
        return any(f.code == "geometry_note" and "missing slices" in f.message
                   for f in self.qc.flags)

    def light(self) -> StudyReport:
        """The same report without arrays and datasets (to send between processes)."""
        prediction = self.prediction
        if prediction is not None:
            prediction = replace(prediction, mask=None, model_output=None)
        return replace(self, prediction=prediction, saliency=None, volume=None, sources=())
