"""A trained model as one object: the folder layout is known here and nowhere else.

A bundle folder (``pipelines/<name>/`` for a shipped model, or a training run) holds:

============================  ==========================================================
``pipeline.yaml``             the pipeline the network was trained with
``model.safetensors``         the weights (a training run's are ``best.safetensors``)
``calibration.json``          temperature scaling, fitted on the validation split
``ood.safetensors``           the out-of-distribution guard (:mod:`medvision.models.ood`)
``MODEL_CARD.md``             data, split, metrics with intervals, intended use, limits
============================  ==========================================================

``train`` writes bundles and ``infer`` reads them; neither imports the other.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvision.config import Pipeline, load_pipeline, pipeline_dir
from medvision.errors import CheckpointError
from medvision.models.calibration import CALIBRATION_FILE, read_calibration
from medvision.models.checkpoint import load_weights, weights_sha256
from medvision.models.ood import OOD_FILE, FeatureGuard
from medvision.models.registry import build_model

__all__ = ["CARD_FILE", "PIPELINE_FILE", "RUN_WEIGHTS_FILE", "WEIGHTS_FILE", "ModelBundle"]

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.yaml"
#: A shipped pipeline's weights.
WEIGHTS_FILE = "model.safetensors"
#: A training run's selected weights.
RUN_WEIGHTS_FILE = "best.safetensors"
CARD_FILE = "MODEL_CARD.md"

#: Shipped weights stay under 25 MB; larger float32 files are stored as float16.
MAX_SHIPPED_BYTES = 24 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class ModelBundle:
    """A pipeline with its trained weights, calibration, OOD guard and model card.

    Attributes:
        pipeline: the validated pipeline file.
        weights: the safetensors file.
        weights_sha256: its SHA-256 (what audit records and reports name).
        temperature: calibration temperature (1.0: uncalibrated).
        calibration: the calibration record as stored (empty when there is none).
        guard: the OOD guard, when one was fitted.
        card: the model card's Markdown text, when there is one.
        folder: where the bundle was read from.
    """

    pipeline: Pipeline
    weights: Path
    weights_sha256: str
    temperature: float = 1.0
    calibration: dict[str, Any] | None = None
    guard: FeatureGuard | None = None
    card: str | None = None
    folder: Path | None = None

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str], *,
             weights: str | os.PathLike[str] | None = None,
             search: tuple[str | os.PathLike[str], ...] | list[str | os.PathLike[str]] = ()
             ) -> ModelBundle:
        """Read a bundle: a pipeline by name or folder, its weights (default
        ``model.safetensors``, else a run's ``best.safetensors``), and what lies beside them.

        Raises:
            ConfigError: invalid pipeline.
            CheckpointError: no weights, or unreadable calibration or guard.
        """
        folder = pipeline_dir(name_or_path, search=search)
        pipeline = load_pipeline(folder)
        if weights is not None:
            path = Path(weights)
        elif (folder / WEIGHTS_FILE).is_file() or not (folder / RUN_WEIGHTS_FILE).is_file():
            path = folder / WEIGHTS_FILE
        else:
            path = folder / RUN_WEIGHTS_FILE
        if not path.is_file():
            raise CheckpointError(
                f"{path}: no trained weights for pipeline '{pipeline.name}'; train it with "
                "'medvision train' and pass --weights RUN/best.safetensors")
        calibration = read_calibration(path.parent)
        card = folder / CARD_FILE
        return cls(pipeline=pipeline, weights=path, weights_sha256=weights_sha256(path),
                   temperature=float((calibration or {}).get("temperature", 1.0)),
                   calibration=calibration, guard=FeatureGuard.load(path),
                   card=card.read_text() if card.is_file() else None, folder=folder)

    def build_network(self) -> Any:
        """The network with these weights loaded, in eval mode."""
        model = build_model(self.pipeline)
        load_weights(model, self.weights)
        model.eval()
        return model

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the bundle into ``folder`` (weights as ``model.safetensors``, stored as
        float16 when float32 would pass the shipped-size limit). An existing
        ``pipeline.yaml`` and ``MODEL_CARD.md`` are kept: they are written by people.

        Returns the weights file written.
        """
        import json

        import yaml

        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        weights = target / WEIGHTS_FILE
        if weights.resolve() != self.weights.resolve():
            if self.weights.stat().st_size > MAX_SHIPPED_BYTES:
                _save_half(self.weights, weights)
            else:
                shutil.copyfile(self.weights, weights)
        if self.calibration:
            (target / CALIBRATION_FILE).write_text(json.dumps(self.calibration, indent=2))
        if self.guard is not None:
            self.guard.save(target)
        if not (target / PIPELINE_FILE).is_file():
            (target / PIPELINE_FILE).write_text(
                yaml.safe_dump(self.pipeline.model_dump(mode="json"), sort_keys=False))
        if self.card and not (target / CARD_FILE).is_file():
            (target / CARD_FILE).write_text(self.card)
        return weights

    def files(self) -> dict[str, Path]:
        """The bundle's files that exist, by role."""
        parent = self.weights.parent
        found = {"weights": self.weights, "calibration": parent / CALIBRATION_FILE,
                 "ood": parent / OOD_FILE}
        if self.folder is not None:
            found["pipeline"] = self.folder / PIPELINE_FILE
            found["card"] = self.folder / CARD_FILE
        return {k: v for k, v in found.items() if v.is_file()}


def _save_half(source: Path, target: Path) -> None:
    """Copy safetensors weights with floating-point tensors stored as float16.

    Loading casts them back to the network's float32 parameters; the rounding (relative 5e-4)
    is far below what changes a prediction, and evaluate reports the shipped file's metrics.
    """
    from safetensors.torch import load_file, save_file

    state = load_file(str(source))
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_file(half, str(target), metadata={"stored_as": "float16"})
