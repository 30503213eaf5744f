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
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medvision.errors import ConfigError
from medvision.vocabulary import ExplanationMethod, Task

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "ExplanationConfig",
    "GenerativeConfig",
    "InferenceConfig",
    "InputRules",
    "ModelConfig",
    "OptimizerConfig",
    "Pipeline",
    "PreprocessConfig",
    "QCConfig",
    "TrainingConfig",
    "DEFAULT_COLOURS",
    "config_hash",
    "load_pipeline",
    "read_yaml",
    "pipeline_dir",
]



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class DataConfig(_Strict):
    """How a training folder is laid out and split.

    ``class_folders``: ``DIR/<class>/<files>``; ``image_label_folders``: ``DIR/images/X`` with
    ``DIR/labels/X``; ``npz``: a MedMNIST-style file with ``train_images``/``train_labels``...;
    detection: ``voc`` (Pascal VOC XML), ``coco`` (COCO JSON), ``csv`` (file,class,x1,y1,x2,y2);
    see :mod:`medvision.train.boxes`.
    """

    layout: Literal["class_folders", "image_label_folders", "npz", "voc", "coco", "csv"]
    """Folder layout: class folders, image/label folders, a MedMNIST .npz, or boxes (voc, coco,
    csv).
    """
    extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".nii.gz", ".nii", ".dcm")
    """File suffixes that count as images."""
    group_pattern: str | None = Field(
        default=None, description="regex whose first match in a file name is the patient key")
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    """Share of patients (groups) held out for validation when the data has no official split."""
    split_seed: int = 0
    """Seed of the patient-grouped split (the same seed gives the same split)."""


class IntensityConfig(_Strict):
    """Intensity normalisation: scale a fixed range, window (CT), z-score or percentiles."""

    kind: Literal["scale_range", "window", "zscore", "percentile"] = "percentile"
    """scale_range: a_min..a_max to 0..1; window: the same, clipped (CT); zscore; percentile:
    lower..upper percentiles to 0..1.
    """
    a_min: float = 0.0
    """scale_range/window: the value mapped to 0."""
    a_max: float = 255.0
    """scale_range/window: the value mapped to 1."""
    lower: float = 0.5
    """percentile: the lower percentile mapped to 0."""
    upper: float = 99.5
    """percentile: the upper percentile mapped to 1."""
    nonzero: bool = False
    """zscore/percentile: computed over non-zero voxels only."""


class PreprocessConfig(_Strict):
    """Deterministic preparation, shared by training and inference."""

    orientation: str | None = Field(default=None, description="e.g. RAS; None keeps the input's")
    spacing: tuple[float, ...] | None = None
    """Resample to this voxel size in mm (None keeps the input's)."""
    intensity: IntensityConfig = IntensityConfig()
    """Intensity normalisation."""
    size: tuple[int, ...] | None = Field(default=None, description="resize to this spatial size")
    crop_foreground: bool = False
    """Crop to the non-zero foreground before resizing."""


class AugmentConfig(_Strict):
    """Random augmentation, training only."""

    prob: float = Field(default=0.5, ge=0, le=1)
    """Probability of each random transform."""
    rotate_degrees: float = 0.0
    """Random rotation range in degrees (detection: 90 or more turns images by multiples of 90
    degrees).
    """
    scale: float = 0.0
    """Random zoom range, as a fraction (0.1: 0.9 to 1.1)."""
    translate_fraction: float = 0.0
    """Random shift, as a fraction of the image size."""
    flip_axes: tuple[int, ...] = ()
    """Spatial axes to flip at random."""
    elastic: bool = False
    """Random elastic deformation (volumes)."""
    noise_std: float = 0.0
    """Standard deviation of added Gaussian noise (after intensity scaling)."""
    gamma: tuple[float, float] | None = None
    """Random gamma (contrast) range."""
    intensity_shift: float = 0.0
    """Random intensity offset range."""
    blur_sigma: tuple[float, float] | None = Field(
        default=None, description="Gaussian smoothing, sigma range in voxels (sharpness shifts)")


class ModelConfig(_Strict):
    """A MONAI network by registry name, with constructor keyword arguments."""

    name: str
    """Network name from the registry (medvision/models/registry.py)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the network's MONAI constructor (detection: see models/detection.py)."""


#: Each loss: the tasks it is implemented for, and the options it honours.
LOSSES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "cross_entropy": (frozenset({"classification"}),
                      frozenset({"class_weights", "label_smoothing"})),
    "focal": (frozenset({"classification", "segmentation", "detection"}),
              frozenset({"class_weights"})),
    "dice_ce": (frozenset({"segmentation"}), frozenset({"class_weights", "label_smoothing"})),
    "dice_focal": (frozenset({"segmentation"}), frozenset({"class_weights"})),
}

#: Learning-rate schedules (per epoch): cosine annealing after an optional linear warm-up;
#: constant after the warm-up; one-cycle (Smith 2018): from lr/25 up to lr over the warm-up
#: (default 30% of the epochs), then cosine down to lr/10^4.
SCHEDULES = ("cosine", "constant", "onecycle")


class LossConfig(_Strict):
    """The training loss; which losses fit which task, and which options each honours, is in
    :data:`LOSSES` (a combination not listed is a configuration error)."""

    name: Literal["cross_entropy", "focal", "dice_ce", "dice_focal"] = "cross_entropy"
    """Loss (which tasks each fits: see the table at the end)."""
    class_weights: tuple[float, ...] | None = None
    """One weight per class."""
    label_smoothing: float = 0.0
    """Label smoothing (cross_entropy, dice_ce)."""


class OptimizerConfig(_Strict):
    """The optimizer; ``momentum`` applies to ``sgd`` only (Nesterov)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    """Optimizer."""
    lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(default=1e-4, ge=0)
    """Weight decay."""
    momentum: float = Field(default=0.9, ge=0, lt=1)
    """SGD momentum (Nesterov); an error for the other optimizers."""

    @model_validator(mode="after")
    def _honoured(self) -> OptimizerConfig:
        # a dumped pipeline (a run's pipeline.yaml) carries the default; only another value
        # is a request the optimizer would silently ignore
        if self.name != "sgd" and self.momentum != 0.9:
            raise ValueError(f"optimizer.momentum applies to sgd only, not {self.name} "
                             "(Adam-type optimizers use their own moment estimates)")
        return self


class ScheduleConfig(_Strict):
    """The learning-rate schedule (see :data:`SCHEDULES`)."""

    name: Literal["cosine", "constant", "onecycle"] = "cosine"
    """cosine, constant, or onecycle (from lr/25 up, then down to lr/10^4)."""
    warmup_epochs: int | None = Field(
        default=None, ge=0, description="linear warm-up epochs (default: 0; onecycle: 30% "
                                        "of the epochs)")


class TrainingConfig(_Strict):
    epochs: int = Field(default=10, ge=1)
    """Training epochs."""
    batch_size: int = Field(default=16, ge=1)
    """Batch size."""
    early_stopping_patience: int | None = Field(default=None, ge=1)
    """Stop after this many epochs without a better validation metric (None: never)."""
    seed: int = 0
    """Seed of initialisation, shuffling and augmentation."""
    cache: Literal["memory", "disk", "none"] = "memory"
    """Cache the deterministic preprocessing in memory, on disk (in the run folder), or not at all.
    """
    num_workers: int = Field(default=0, ge=0)
    """Data-loading worker processes (0: load in the training process)."""
    threads: int | None = Field(default=None, ge=1)
    """PyTorch threads (None: PyTorch's default, one per core)."""
    precision: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="bfloat16: mixed precision (torch.autocast) for the training steps, with "
                    "weights, optimizer and loss in float32; about 1.4-2.4x faster steps on "
                    "CPUs with AVX-512 BF16 or AMX, slower on CPUs without (a warning says "
                    "so), and on GPUs. float16: the same with a gradient scaler, on a GPU "
                    "only (exit 2 on the CPU). Validation, calibration and inference stay "
                    "float32")
    val_metric: Literal["auc", "accuracy", "dice", "loss", "map_50"] | None = None
    """Metric that picks the best epoch (None: auc, dice or map_50 by task)."""
    balanced_sampling: bool = False
    """Draw training items with equal probability per class."""
    swa_epochs: int = Field(
        default=0, ge=0,
        description="stochastic weight averaging: average the weights of the last N epochs, "
                    "run at a constant learning rate; the average becomes best.safetensors")
    swa_lr: float = Field(default=0.25, gt=0, le=1,
                          description="learning rate of the averaging epochs, times optimizer.lr")
    folds: int | None = Field(
        default=None, ge=2, le=20,
        description="cross-validation: split the patients (groups) into this many folds, "
                    "stratified by class; `train --fold I` trains on all folds but I and "
                    "validates on I; `publish` of the fold runs ships their ensemble")
    tracking: tuple[str, ...] = Field(
        default=(),
        description="where runs are recorded when the command gives no --tracking: 'mlflow' "
                    "(a local store, or $MLFLOW_TRACKING_URI), an MLflow URI "
                    "(http://host:5000, sqlite:///runs.db), 'tensorboard' or "
                    "'tensorboard:DIR' (needs medvision[tracking]); not part of the config "
                    "hash")

    @field_validator("tracking", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value


class MemberConfig(_Strict):
    """Another network of an architecture ensemble: trained on the pipeline's own split
    (``train --member I``), its probabilities averaged with the others' at inference."""

    model: ModelConfig
    """The member's network (different from the pipeline's and the other members')."""
    training: dict[str, Any] = Field(default_factory=dict)
    """Keys of ``training`` that differ for this member (epochs, swa_epochs, threads...)."""
    augment: AugmentConfig | None = None
    """This member's augmentation, whole, in place of the pipeline's (None: the pipeline's)."""


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
    four_d: Literal["reject", "first", "mean", "b_value", "channels"] = Field(
        default="reject",
        description="a series of several volumes (fMRI, diffusion, perfusion): reject it "
                    "with the reason, take the first volume, the mean over volumes, the mean "
                    "of the volumes at b_value, or the volumes as the model's channels")
    b_value: float | None = Field(default=None, ge=0,
                                  description="four_d: b_value selects volumes at this b-value")

    @model_validator(mode="after")
    def _b_value_given(self) -> InputRules:
        if self.four_d == "b_value" and self.b_value is None:
            raise ValueError("input.four_d: b_value needs input.b_value")
        return self


class ExplanationConfig(_Strict):
    """The Captum attribution written next to every prediction."""

    method: ExplanationMethod = ExplanationMethod.GRADCAM
    """Captum method: gradcam, layercam, integrated_gradients, saliency or occlusion."""
    layer: str | None = Field(default=None, description="GradCAM/LayerCAM: module name, e.g. "
                              "layer4 (coarsest), layer3 (twice as fine)")
    steps: int = Field(default=32, ge=2, description="Integrated Gradients: path steps")
    internal_batch_size: int = Field(default=8, ge=1)
    """Integrated Gradients / occlusion: inputs per forward pass."""
    window: tuple[int, ...] | None = Field(default=None, description="occlusion window")
    stride: tuple[int, ...] | None = Field(default=None, description="occlusion stride")
    members: Literal["all", "first"] = Field(
        default="all", description="an ensemble: the mean of every member's map (each scaled "
                                   "to [0, 1] first), or the first member's only (faster)")


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
    """Quantile of the validation distances used as the OOD threshold."""
    on_out_of_distribution: Literal["flag", "abstain"] = Field(
        default="flag", description="flag: report the result, status flagged; abstain: "
                                    "withhold label, probabilities, mask and saliency")
    result_relevant: tuple[Literal[QC_WARN_CODES], ...] = Field(  # type: ignore[valid-type]
        default=("unreadable_files",),
        description="QC warnings that may change the result: any of them flags the study")


class CodeConfig(_Strict):
    """A coded concept: SNOMED CT (``SCT``), DICOM (``DCM``), RadLex (``RADLEX``), LOINC
    (``LN``), or the private scheme ``99MEDVISION`` where no standard concept exists."""

    scheme: str = Field(min_length=1, max_length=16)
    """Coding scheme designator (SCT, DCM, RADLEX, LN, or 99MEDVISION)."""
    value: str = Field(min_length=1, max_length=64)
    """Code value in that scheme."""
    meaning: str = Field(min_length=1, max_length=64)
    """Code meaning (human-readable)."""


class ClassLabel(_Strict):
    """How results name one class: its code (the SR finding, the SEG segmented property
    type), the SEG category, and its display colour (RGB 0-255)."""

    code: CodeConfig | None = None
    """The class's coded concept (SR finding, SEG segmented property type)."""
    category: CodeConfig | None = Field(
        default=None, description="SEG segmented property category (default: SCT Tissue)")
    colour: tuple[int, int, int] | None = Field(default=None, description="RGB, 0-255")

    @model_validator(mode="after")
    def _colour_range(self) -> ClassLabel:
        if self.colour is not None and not all(0 <= c <= 255 for c in self.colour):
            raise ValueError(f"colour {self.colour}: each value must lie in 0-255")
        return self


class ReportConfig(_Strict):
    """Codes and colours results use, per class name (classes not listed get a private code
    and a default colour)."""

    classes: dict[str, ClassLabel] = Field(default_factory=dict)
    """Per class name: its code, SEG category and colour."""

    def colour(self, name: str, index: int) -> tuple[int, int, int]:
        """The class's colour: declared, else the default palette's."""
        from_config = self.classes.get(name)
        if from_config is not None and from_config.colour is not None:
            return from_config.colour
        return DEFAULT_COLOURS[index % len(DEFAULT_COLOURS)]


#: Label colours when a pipeline declares none (index 0: the background).
DEFAULT_COLOURS = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230))


class GenerativeConfig(_Strict):
    """A class-conditional generative model of the pipeline's training images
    (``medvision synthesize``): a pixel-space denoising diffusion model (MONAI
    ``DiffusionModelUNet`` with a DDPM noise schedule; DDIM sampling)."""

    kind: Literal["diffusion"] = "diffusion"
    """Pixel-space diffusion: at 64 px a training step of 16 images takes about 0.4 s on 2 CPU
    cores, where a latent model would first need its autoencoder trained."""
    size: tuple[int, ...] = Field(default=(64, 64), description="generated image size")
    channels: tuple[int, ...] = Field(default=(32, 64, 64),
                                      description="UNet channels per level")
    attention_levels: tuple[bool, ...] = Field(default=(False, False, True),
                                               description="self-attention per level")
    num_res_blocks: int = Field(default=1, ge=1, description="residual blocks per level")
    timesteps: int = Field(default=1000, ge=10, description="training noise steps")
    prediction: Literal["epsilon", "v_prediction"] = Field(
        default="epsilon",
        description="what the network predicts: the added noise, or the velocity (v, Salimans "
                    "and Ho 2022; use it for images far from zero mean, such as binary masks)")
    sample_steps: int = Field(default=50, ge=2, description="DDIM steps when sampling")
    epochs: int = Field(default=30, ge=1, description="generator training epochs")
    batch_size: int = Field(default=16, ge=2, description="generator batch size")
    lr: float = Field(default=2.5e-4, gt=0, description="AdamW learning rate")
    seed: int = Field(default=0, description="seed of initialisation, noise and shuffling")

    @model_validator(mode="after")
    def _levels_match(self) -> GenerativeConfig:
        if len(self.attention_levels) != len(self.channels):
            raise ValueError("generative.attention_levels needs one entry per channels level")
        return self


class Pipeline(_Strict):
    """A whole pipeline file."""

    name: str
    """Unique pipeline name (what --pipeline and reports call it)."""
    version: str = "0.1.0"
    """Version of the pipeline and its weights, shown in reports and audit records."""
    description: str = ""
    """One line on what the pipeline does."""
    task: Task
    """What the model does: classify images, segment them or detect objects in them."""
    spatial_dims: Literal[2, 3]
    """2 for images, 3 for volumes."""
    in_channels: int = Field(default=1, ge=1)
    """Input channels of the network: colour is averaged to grey for 1, grey repeated for 3."""
    classes: tuple[str, ...] = Field(min_length=2)
    """Class names in label order (segmentation: index 0 is the background)."""
    data: DataConfig
    """How training data is laid out and split."""
    preprocess: PreprocessConfig = PreprocessConfig()
    """Deterministic preparation shared by training and inference."""
    augment: AugmentConfig = AugmentConfig()
    """Random augmentation during training."""
    model: ModelConfig
    """The network."""
    loss: LossConfig = LossConfig()
    """The training loss."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """The optimizer."""
    schedule: ScheduleConfig = ScheduleConfig()
    """The learning-rate schedule."""
    training: TrainingConfig = TrainingConfig()
    """Epochs, batches, caching, threads, selection metric."""
    inference: InferenceConfig = InferenceConfig()
    """Decision threshold and test-time augmentation."""
    input: InputRules = InputRules()
    """Which inputs the pipeline accepts (anything else is rejected with a reason)."""
    explanation: ExplanationConfig = ExplanationConfig()
    """The Captum attribution written next to every prediction."""
    qc: QCConfig = QCConfig()
    """Out-of-distribution guard and which warnings flag a result."""
    report: ReportConfig = ReportConfig()
    """Codes and colours of the classes in DICOM results and label sidecars."""
    generative: GenerativeConfig = GenerativeConfig()
    """The generative model ``medvision synthesize`` trains on this pipeline's data."""
    members: list[MemberConfig] = Field(
        default_factory=list,
        description="an architecture ensemble: more networks trained on the same split "
                    "(`train --member I`, I from 1; member 0 is `model`), shipped together by "
                    "`publish` and averaged at inference")

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, raw: Any) -> Any:
        """Segmentation trains with Dice + cross-entropy unless a loss is named."""
        defaults = {"segmentation": "dice_ce", "detection": "focal"}
        if isinstance(raw, dict) and raw.get("task") in defaults:
            loss = raw.get("loss")
            if loss is None or (isinstance(loss, dict) and "name" not in loss):
                raw = {**raw, "loss": {**(loss or {}), "name": defaults[raw["task"]]}}
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> Pipeline:
        tasks, options = LOSSES[self.loss.name]
        fits = [k for k, v in LOSSES.items() if self.task in v[0]]
        if self.task not in tasks:
            raise ValueError(f"loss '{self.loss.name}' is not implemented for {self.task} "
                             f"(use one of {', '.join(fits)})")
        for option in ("class_weights", "label_smoothing"):
            if option in self.loss.model_fields_set and option not in options and \
                    getattr(self.loss, option) not in (None, 0.0):
                raise ValueError(f"loss '{self.loss.name}' does not use loss.{option}")
        box_layouts = {"voc", "coco", "csv"}
        if (self.task == "detection") != (self.data.layout in box_layouts):
            raise ValueError(f"data.layout '{self.data.layout}' does not fit task {self.task} "
                             "(detection reads voc, coco or csv; the others read the rest)")
        if self.task == "detection" and self.model.name != "retinanet":
            raise ValueError(f"model.name '{self.model.name}' is not a detection network "
                             "(use retinanet)")
        if self.task == "detection" and self.training.precision != "float32":
            raise ValueError("training.precision bfloat16/float16 is not offered for detection: box "
                             "regression and anchor matching need float32 coordinates")
        unknown = sorted(set(self.report.classes) - set(self.classes))
        if unknown:
            raise ValueError(f"report.classes names {unknown}, which are not classes of this "
                             f"pipeline ({', '.join(self.classes)})")
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
        if self.members:
            self._check_members()
        weights = self.loss.class_weights
        if weights is not None and len(weights) != len(self.classes):
            raise ValueError(f"loss.class_weights has {len(weights)} values for "
                             f"{len(self.classes)} classes")
        return self

    def _check_members(self) -> None:
        if self.training.folds:
            raise ValueError("members (an architecture ensemble) and training.folds (a "
                             "cross-validation ensemble) cannot be combined")
        if self.task == "detection":
            raise ValueError("detection pipelines cannot have members")
        models = [self.model, *(m.model for m in self.members)]
        for n, model in enumerate(models[1:], start=1):
            if model in models[:n]:
                raise ValueError(f"members[{n - 1}].model repeats an earlier network; each "
                                 "member needs its own (publish tells them apart by it)")
        if self.explanation.method in (ExplanationMethod.GRADCAM, ExplanationMethod.LAYERCAM) \
                and self.explanation.members == "all":
            raise ValueError("explanation.layer names a module of one network; with members "
                             "of other architectures set explanation.members: first, or a "
                             "method without a layer")
        for n in range(1, len(models)):
            try:
                self.member(n)  # every member's training settings validate
            except ConfigError as e:
                raise ValueError(str(e)) from e

    def member(self, index: int) -> Pipeline:
        """The pipeline that trains member ``index``: a plain pipeline (no ``members``) with
        this one's network (0) or ``members[I-1]``'s network, training settings and
        augmentation (``I``).

        Raises:
            ConfigError: no such member, or training settings that do not validate.
        """
        if index == 0:
            return self.model_copy(update={"members": []}) if self.members else self
        if not 0 < index <= len(self.members):
            raise ConfigError(f"pipeline '{self.name}' has members 0..{len(self.members)}; "
                              f"there is no member {index}")
        spec = self.members[index - 1]
        try:
            training = TrainingConfig.model_validate(
                {**self.training.model_dump(), **spec.training})
        except ValidationError as e:
            raise ConfigError(f"members[{index - 1}].training: {e}") from e
        if training.swa_epochs >= training.epochs:
            raise ConfigError(f"members[{index - 1}].training: swa_epochs "
                              f"({training.swa_epochs}) must be fewer than epochs "
                              f"({training.epochs})")
        return self.model_copy(update={"model": spec.model, "training": training, "members": [],
                                       "augment": spec.augment or self.augment})

    def member_index(self, model: ModelConfig) -> int | None:
        """Which member trains ``model`` (None: none of them)."""
        models = [self.model, *(m.model for m in self.members)]
        return models.index(model) if model in models else None

    @property
    def validation_metric(self) -> str:
        """The metric that picks the best epoch."""
        if self.training.val_metric is not None:
            return self.training.val_metric
        return {"segmentation": "dice", "detection": "map_50"}.get(str(self.task), "auc")


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


def read_yaml(file: Path) -> Any:
    """Parse a YAML settings file; a key given twice in one mapping is an error (plain YAML
    keeps the last one silently, so half of a section would vanish).

    Raises:
        ConfigError: unreadable file, bad YAML or a duplicate key, naming the file and line.
    """
    import yaml

    class _Strict(yaml.SafeLoader):
        pass

    def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if not isinstance(key, Hashable):  # construct_mapping reports it as bad YAML
                continue
            if key in seen:
                raise ConfigError(f"{file}: line {key_node.start_mark.line + 1}: key "
                                  f"'{key}' given twice")
            seen.add(key)
        return loader.construct_mapping(node)

    _Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
    try:
        return yaml.load(file.read_text(), Loader=_Strict)  # noqa: S506 - a SafeLoader
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{file}: cannot read YAML ({e})") from e


def load_pipeline(name_or_path: str | os.PathLike[str], *,
                  search: Sequence[str | os.PathLike[str]] = ()) -> Pipeline:
    """Load and validate a pipeline by name or path (``search``: extra pipeline folders).

    Raises:
        ConfigError: missing file, bad YAML, or invalid content (the message names the file
            and, for an unknown key, the closest valid one).
    """
    path = Path(name_or_path)
    file = path if path.is_file() else pipeline_dir(name_or_path, search=search) / "pipeline.yaml"
    if not file.is_file():
        raise ConfigError(f"{file}: pipeline file not found")
    raw = read_yaml(file)
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping at the top level")
    try:
        return Pipeline.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e, str(file))) from e


def config_hash(pipeline: Pipeline) -> str:
    """SHA-256 of the resolved pipeline (canonical JSON), to record what a run used. A
    ``generative`` section left at its defaults is not part of it (files written before it
    existed keep their hash), nor is ``training.tracking``."""
    resolved = pipeline.model_dump(mode="json")
    if pipeline.generative == GenerativeConfig():
        del resolved["generative"]
    del resolved["training"]["tracking"]  # where a run is recorded, not what it trains
    text = json.dumps(resolved, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
