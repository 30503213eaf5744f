"""A trained model as one object: the folder layout is known here and nowhere else.

A bundle folder (``pipelines/<name>/`` for a shipped model, or a training run) holds:

============================  ==========================================================
``pipeline.yaml``             the pipeline the network was trained with
``model.safetensors``         the weights (a training run's are ``best.safetensors``)
``calibration.json``          temperature scaling, fitted on the validation split
``ood.safetensors``           the out-of-distribution guard (:mod:`medvision.models.ood`)
``MODEL_CARD.md``             data, split, metrics with intervals, intended use, limits
``ensemble.json``             (an ensemble) its members: one weights file each
                              (``model.safetensors``, then ``fold-1.safetensors``... for
                              the folds of a cross-validation, ``member-1.safetensors``...
                              for an architecture ensemble), each with its SHA-256, its own
                              calibration temperature, the validation metric of its run and,
                              for a member of another architecture, its network
============================  ==========================================================

An ensemble predicts the mean of its members' calibrated probabilities; the bundle's
``weights`` is then its first member (what the OOD guard uses; explanations average every
member's map) and its ``weights_sha256`` the SHA-256 of the member list, so a report names
exactly what predicted.

``train`` writes bundles and ``infer`` reads them; neither imports the other.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvision.config import ModelConfig, Pipeline, load_pipeline, pipeline_dir
from medvision.errors import CheckpointError
from medvision.models.calibration import CALIBRATION_FILE, read_calibration
from medvision.models.checkpoint import load_weights, weights_sha256
from medvision.models.ood import OOD_FILE, FeatureGuard
from medvision.models.registry import build_model

__all__ = ["CARD_FILE", "ENSEMBLE_FILE", "PIPELINE_FILE", "RUN_WEIGHTS_FILE", "WEIGHTS_FILE",
           "EnsembleMember", "ModelBundle", "calibration_note", "ensemble_digest"]

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.yaml"
#: A shipped pipeline's weights.
WEIGHTS_FILE = "model.safetensors"
#: A training run's selected weights.
RUN_WEIGHTS_FILE = "best.safetensors"
CARD_FILE = "MODEL_CARD.md"
ENSEMBLE_FILE = "ensemble.json"


@dataclass(frozen=True)
class EnsembleMember:
    """One member of an ensemble: a cross-validation fold, or a network of an architecture
    ensemble (``model``: its network when it is not the pipeline's)."""

    weights: Path
    weights_sha256: str
    temperature: float = 1.0
    fold: int | None = None
    metrics: dict[str, float] | None = None
    member: int | None = None
    model: ModelConfig | None = None


def ensemble_digest(members: tuple[EnsembleMember, ...] | list[EnsembleMember]) -> str:
    """SHA-256 naming an ensemble: of its members' weights hashes, temperatures and (where
    not the pipeline's) networks, in order."""
    import hashlib
    import json

    text = json.dumps([[m.weights_sha256, m.temperature] if m.model is None else
                       [m.weights_sha256, m.temperature, m.model.model_dump(mode="json")]
                       for m in members])
    return hashlib.sha256(text.encode()).hexdigest()

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
    members: tuple[EnsembleMember, ...] = ()

    @property
    def calibration_note(self) -> str:
        """How the probabilities are calibrated, in words (what reports and pages say)."""
        return calibration_note(self.temperature, [m.temperature for m in self.members])

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
        card = folder / CARD_FILE
        if weights is None and (folder / ENSEMBLE_FILE).is_file():
            members = _read_ensemble(folder)
            first = members[0].weights
            return cls(pipeline=pipeline, weights=first, weights_sha256=ensemble_digest(members),
                       guard=FeatureGuard.load(first),
                       card=card.read_text() if card.is_file() else None, folder=folder,
                       members=members)
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
        return cls(pipeline=pipeline, weights=path, weights_sha256=weights_sha256(path),
                   temperature=float((calibration or {}).get("temperature", 1.0)),
                   calibration=calibration, guard=FeatureGuard.load(path),
                   card=card.read_text() if card.is_file() else None, folder=folder)

    def build_network(self, weights: Path | None = None, *,
                      model: ModelConfig | None = None) -> Any:
        """The network (the pipeline's, or ``model``) with these weights (or ``weights``)
        loaded, in eval mode."""
        pipeline = self.pipeline if model is None else self.pipeline.model_copy(
            update={"model": model})
        network = build_model(pipeline)
        load_weights(network, weights or self.weights)
        network.eval()
        return network

    def member_network(self, member: EnsembleMember) -> Any:
        """An ensemble member's network (its own architecture where it has one)."""
        return self.build_network(member.weights, model=member.model)

    def save_ensemble(self, folder: str | os.PathLike[str]) -> Path:
        """Write an ensemble's members (``model.safetensors``, ``fold-1.safetensors``...,
        float16 where float32 would pass the size limit) and ``ensemble.json`` into
        ``folder``, beside :meth:`save`'s other files. Returns the manifest."""
        import json

        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        entries = []
        kind = "member" if any(m.member is not None for m in self.members) else "fold"
        shipped = {target / WEIGHTS_FILE, *(target / f"{kind}-{n}.safetensors"
                                            for n in range(1, len(self.members)))}
        for stale in [*target.glob("fold-*.safetensors"), *target.glob("member-*.safetensors")]:
            if stale not in shipped:  # another ensemble's members
                stale.unlink()
                stale.with_suffix(".onnx").unlink(missing_ok=True)
        for n, member in enumerate(self.members):
            name = WEIGHTS_FILE if n == 0 else f"{kind}-{n}.safetensors"
            path = target / name
            _ship_weights(member.weights, path)
            entry: dict[str, Any] = {"weights": name, "sha256": weights_sha256(path),
                                     "temperature": member.temperature, "fold": member.fold,
                                     "metrics": member.metrics}
            if member.member is not None:
                entry["member"] = member.member
            if member.model is not None:
                entry["model"] = member.model.model_dump(mode="json")
            entries.append(entry)
        manifest = target / ENSEMBLE_FILE
        manifest.write_text(json.dumps({"combine": "mean of calibrated probabilities",
                                        "members": entries}, indent=2))
        (target / CALIBRATION_FILE).unlink(missing_ok=True)  # each member has its own
        return manifest

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
        for stale in [target / ENSEMBLE_FILE, *target.glob("fold-*.safetensors"),
                      *target.glob("fold-*.onnx"), *target.glob("member-*.safetensors"),
                      *target.glob("member-*.onnx")]:  # a single model replaces an ensemble
            stale.unlink(missing_ok=True)
        weights = target / WEIGHTS_FILE
        _ship_weights(self.weights, weights)
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


def _read_ensemble(folder: Path) -> tuple[EnsembleMember, ...]:
    """The members ``ensemble.json`` lists, each checked against its recorded SHA-256.

    Raises:
        CheckpointError: unreadable manifest, a missing member or one whose file changed.
    """
    import json

    path = folder / ENSEMBLE_FILE
    try:
        entries = json.loads(path.read_text())["members"]
        members = []
        for entry in entries:
            weights = folder / entry["weights"]
            if not weights.is_file():
                raise CheckpointError(f"{path}: member {entry['weights']} is missing")
            digest = weights_sha256(weights)
            if digest != entry["sha256"]:
                raise CheckpointError(f"{path}: member {entry['weights']} changed since the "
                                      "ensemble was written (SHA-256 differs)")
            members.append(EnsembleMember(
                weights=weights, weights_sha256=digest,
                temperature=float(entry.get("temperature", 1.0)), fold=entry.get("fold"),
                metrics=entry.get("metrics"), member=entry.get("member"),
                model=ModelConfig.model_validate(entry["model"]) if entry.get("model")
                else None))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ensemble manifest ({e})") from e
    if not members:
        raise CheckpointError(f"{path}: an ensemble without members")
    if members[0].model is not None:
        raise CheckpointError(f"{path}: the first member must be the pipeline's own network "
                              "(its guard and explanations use it)")
    return tuple(members)


def _ship_weights(source: Path, target: Path) -> None:
    """Copy weights to where a bundle ships them: as float16 when float32 would pass the
    shipped-size limit; nothing to do when they are already there."""
    if target.resolve() == source.resolve():
        return
    if source.stat().st_size > MAX_SHIPPED_BYTES:
        _save_half(source, target)
    else:
        shutil.copyfile(source, target)


def _save_half(source: Path, target: Path) -> None:
    """Copy safetensors weights with floating-point tensors stored as float16.

    Loading casts them back to the network's float32 parameters; the rounding (relative 5e-4)
    is far below what changes a prediction, and evaluate reports the shipped file's metrics.
    """
    from safetensors.torch import load_file, save_file

    state = load_file(str(source))
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_file(half, str(target), metadata={"stored_as": "float16"})


def calibration_note(temperature: float, member_temperatures: Sequence[float] = ()) -> str:
    """``calibrated (temperature 0.71)``; for an ensemble ``each member calibrated
    (temperatures 0.66-0.73), probabilities averaged``; or ``uncalibrated``."""
    if member_temperatures:
        if all(t == 1.0 for t in member_temperatures):
            return "uncalibrated"
        low, high = min(member_temperatures), max(member_temperatures)
        span = f"{low:.2f}" if round(low, 2) == round(high, 2) else f"{low:.2f}-{high:.2f}"
        return (f"each member calibrated (temperature{'s' if span != f'{low:.2f}' else ''} "
                f"{span}), probabilities averaged")
    return "uncalibrated" if temperature == 1.0 else f"calibrated (temperature {temperature:.2f})"
