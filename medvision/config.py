"""Pipeline files: YAML validated by pydantic, frozen, unknown keys rejected with a suggestion.

A pipeline is data, not code: ``pipelines/<name>/pipeline.yaml`` says what the task is, how the
data is laid out, how images are prepared and augmented, which MONAI network to build and how
to train it. :func:`load_pipeline` accepts a pipeline name (resolved under ``pipelines/``) or a
path to a YAML file or folder.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medvision.errors import ConfigError
from medvision.vocabulary import EXPLANATION_METHODS

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "ExplanationConfig",
    "InferenceConfig",
    "InputRules",
    "ModelConfig",
    "OptimizerConfig",
    "Pipeline",
    "PreprocessConfig",
    "QCConfig",
    "TrainingConfig",
    "config_hash",
    "load_pipeline",
    "pipeline_dir",
]



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """How a training folder is laid out and split.

    ``class_folders``: ``DIR/<class>/<files>``; ``image_label_folders``: ``DIR/images/X`` with
    ``DIR/labels/X``; ``npz``: a MedMNIST-style file with ``train_images``/``train_labels``...
    """

    layout: Literal["class_folders", "image_label_folders", "npz"]
    extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".nii.gz", ".nii", ".dcm")
    group_pattern: str | None = Field(
        default=None, description="regex whose first match in a file name is the patient key")
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    split_seed: int = 0


class IntensityConfig(_Strict):
    """Intensity normalisation: scale a fixed range, window (CT), z-score or percentiles."""

    kind: Literal["scale_range", "window", "zscore", "percentile"] = "percentile"
    a_min: float = 0.0
    a_max: float = 255.0
    lower: float = 0.5
    upper: float = 99.5
    nonzero: bool = False


class PreprocessConfig(_Strict):
    """Deterministic preparation, shared by training and inference."""

    orientation: str | None = Field(default=None, description="e.g. RAS; None keeps the input's")
    spacing: tuple[float, ...] | None = None
    intensity: IntensityConfig = IntensityConfig()
    size: tuple[int, ...] | None = Field(default=None, description="resize to this spatial size")
    crop_foreground: bool = False


class AugmentConfig(_Strict):
    """Random augmentation, training only."""

    prob: float = Field(default=0.5, ge=0, le=1)
    rotate_degrees: float = 0.0
    scale: float = 0.0
    translate_fraction: float = 0.0
    flip_axes: tuple[int, ...] = ()
    elastic: bool = False
    noise_std: float = 0.0
    gamma: tuple[float, float] | None = None
    intensity_shift: float = 0.0
    blur_sigma: tuple[float, float] | None = Field(
        default=None, description="Gaussian smoothing, sigma range in voxels (sharpness shifts)")


class ModelConfig(_Strict):
    """A MONAI network by registry name, with constructor keyword arguments."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class LossConfig(_Strict):
    name: Literal["cross_entropy", "focal", "dice_ce", "dice_focal"] = "cross_entropy"
    class_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0


class OptimizerConfig(_Strict):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    momentum: float = 0.9


class ScheduleConfig(_Strict):
    name: Literal["cosine", "constant", "onecycle"] = "cosine"
    warmup_epochs: int = Field(default=0, ge=0)


class TrainingConfig(_Strict):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=16, ge=1)
    early_stopping_patience: int | None = Field(default=None, ge=1)
    seed: int = 0
    cache: Literal["memory", "disk", "none"] = "memory"
    num_workers: int = Field(default=0, ge=0)
    threads: int | None = Field(default=None, ge=1)
    val_metric: Literal["auc", "accuracy", "dice", "loss"] | None = None
    balanced_sampling: bool = False
    swa_epochs: int = Field(
        default=0, ge=0,
        description="stochastic weight averaging: average the weights of the last N epochs, "
                    "run at a constant learning rate; the average becomes best.safetensors")
    swa_lr: float = Field(default=0.25, gt=0, le=1,
                          description="learning rate of the averaging epochs, times optimizer.lr")


class InferenceConfig(_Strict):
    """How predictions are made from a trained model."""

    threshold: float = Field(default=0.5, gt=0, lt=1,
                             description="binary: predict the last class at or above this")
    tta_flips: tuple[int, ...] = Field(default=(), description="spatial axes to flip for TTA")


class InputRules(_Strict):
    """Which inputs a pipeline accepts; anything else is rejected with the reason."""

    modalities: tuple[str, ...] = Field(
        default=(), description="allowed modality codes (OT = non-DICOM files); empty: any")
    body_parts: tuple[str, ...] = Field(
        default=(), description="allowed BodyPartExamined values, checked when present")
    min_slices: int = Field(default=1, ge=1, description="3D: fewest slices accepted")
    spacing_mm: tuple[float, float] | None = Field(
        default=None, description="plausible voxel size range; outside it is flagged")


class ExplanationConfig(_Strict):
    """The Captum attribution written next to every prediction."""

    method: Literal[EXPLANATION_METHODS] = "gradcam"  # type: ignore[valid-type]
    layer: str | None = Field(default=None, description="GradCAM: module name, e.g. layer4")
    steps: int = Field(default=32, ge=2, description="Integrated Gradients: path steps")
    internal_batch_size: int = Field(default=8, ge=1)
    window: tuple[int, ...] | None = Field(default=None, description="occlusion window")
    stride: tuple[int, ...] | None = Field(default=None, description="occlusion stride")


#: QC warnings a pipeline may declare result-relevant (``qc.result_relevant``).
QC_WARN_CODES = ("implausible_spacing", "geometry_note", "unreadable_files")


class QCConfig(_Strict):
    """Input checks: out-of-distribution guard and which warnings make a result ``flagged``.

    The guard is the Mahalanobis distance of pooled features of one layer to the training
    set's. A study above its threshold, or with a warning listed in ``result_relevant``, gets
    status ``flagged`` instead of ``ok``.
    """

    feature_layer: str | None = Field(default=None, description="module name to pool, e.g. layer4")
    quantile: float = Field(default=0.995, gt=0.5, lt=1)
    on_out_of_distribution: Literal["flag", "abstain"] = Field(
        default="flag", description="flag: report the result, status flagged; abstain: "
                                    "withhold label, probabilities, mask and saliency")
    result_relevant: tuple[Literal[QC_WARN_CODES], ...] = Field(  # type: ignore[valid-type]
        default=("unreadable_files",),
        description="QC warnings that may change the result: any of them flags the study")


class Pipeline(_Strict):
    """A whole pipeline file."""

    name: str
    version: str = "0.1.0"
    description: str = ""
    task: Literal["classification", "segmentation"]
    spatial_dims: Literal[2, 3]
    in_channels: int = Field(default=1, ge=1)
    classes: tuple[str, ...] = Field(min_length=2)
    data: DataConfig
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    training: TrainingConfig = TrainingConfig()
    inference: InferenceConfig = InferenceConfig()
    input: InputRules = InputRules()
    explanation: ExplanationConfig = ExplanationConfig()
    qc: QCConfig = QCConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Pipeline:
        size = self.preprocess.size
        if size is not None and len(size) != self.spatial_dims:
            raise ValueError(f"preprocess.size has {len(size)} values for spatial_dims "
                             f"{self.spatial_dims}")
        spacing = self.preprocess.spacing
        if spacing is not None and len(spacing) != self.spatial_dims:
            raise ValueError(f"preprocess.spacing has {len(spacing)} values for spatial_dims "
                             f"{self.spatial_dims}")
        if self.training.swa_epochs >= self.training.epochs:
            raise ValueError(f"training.swa_epochs ({self.training.swa_epochs}) must be fewer "
                             f"than training.epochs ({self.training.epochs})")
        weights = self.loss.class_weights
        if weights is not None and len(weights) != len(self.classes):
            raise ValueError(f"loss.class_weights has {len(weights)} values for "
                             f"{len(self.classes)} classes")
        return self

    @property
    def validation_metric(self) -> str:
        """The metric that picks the best epoch."""
        if self.training.val_metric is not None:
            return self.training.val_metric
        return "dice" if self.task == "segmentation" else "auc"


def _model_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid keys at ``loc`` (the parent of the offending key) inside ``model``."""
    current: Any = model
    for part in loc:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            current = annotation
        else:
            return []
    return list(current.model_fields)


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            valid = _model_fields(Pipeline, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            lines.append(f"unknown key '{where}'{hint}")
        else:
            lines.append(f"{where}: {item['msg']}")
    return f"{source}: invalid pipeline file: " + "; ".join(lines)


def pipeline_dir(name_or_path: str | os.PathLike[str], *,
                 search: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """The folder of a pipeline given by path, or by name (see :mod:`medvision.catalog`:
    the ``search`` folders first, then installed pipeline packages)."""
    from medvision.catalog import find_pipelines

    path = Path(name_or_path)
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    known = find_pipelines(search)
    if str(name_or_path) in known:
        return known[str(name_or_path)].folder
    raise ConfigError(f"no pipeline '{name_or_path}': not a file or folder, and not one of the "
                      f"installed pipelines ({', '.join(sorted(known)) or 'none'}); see "
                      "'medvision pipelines list'")


def load_pipeline(name_or_path: str | os.PathLike[str], *,
                  search: Sequence[str | os.PathLike[str]] = ()) -> Pipeline:
    """Load and validate a pipeline by name or path (``search``: extra pipeline folders).

    Raises:
        ConfigError: missing file, bad YAML, or invalid content (the message names the file
            and, for an unknown key, the closest valid one).
    """
    import yaml

    path = Path(name_or_path)
    file = path if path.is_file() else pipeline_dir(name_or_path, search=search) / "pipeline.yaml"
    if not file.is_file():
        raise ConfigError(f"{file}: pipeline file not found")
    try:
        raw = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{file}: cannot read YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping at the top level")
    try:
        return Pipeline.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e, str(file))) from e


def config_hash(pipeline: Pipeline) -> str:
    """SHA-256 of the resolved pipeline (canonical JSON), to record what a run used."""
    text = json.dumps(pipeline.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
