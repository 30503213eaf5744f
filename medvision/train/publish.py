"""Shipping a trained run into its pipeline folder, with the OOD guard fitted on its data.

``pipelines/<name>/`` then holds ``model.safetensors``, ``calibration.json`` and
``ood.safetensors`` beside ``pipeline.yaml``; the model card is written by hand from the
evaluation (see docs/training.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medvision.config import Pipeline, config_hash, load_pipeline
from medvision.errors import CheckpointError, ConfigError
from medvision.models import build_model, load_weights, weights_sha256
from medvision.models.bundle import MAX_SHIPPED_BYTES, RUN_WEIGHTS_FILE, ModelBundle
from medvision.models.ood import FeatureGuard
from medvision.tracking import Target
from medvision.train.data import DataSplit
from medvision.transforms import build_transforms

__all__ = ["fit_guard", "publish", "publish_ensemble", "register_model"]

log = logging.getLogger(__name__)


def _loader(pipeline: Pipeline, items: Any) -> Any:
    from monai.data import DataLoader, Dataset

    data = [{k: v for k, v in item.items() if k != "group"} for item in items]
    return DataLoader(Dataset(data, transform=build_transforms(pipeline, train=False)),
                      batch_size=pipeline.training.batch_size, shuffle=False, num_workers=0)


def fit_guard(pipeline: Pipeline, weights: str | os.PathLike[str], split: DataSplit, *,
              device: str | None = "cpu") -> FeatureGuard:
    """Fit the OOD guard: feature statistics on the training items (no augmentation), and
    the threshold at ``qc.quantile`` of the validation items' distances."""
    layer = pipeline.qc.feature_layer
    if not layer:
        raise ConfigError(f"pipeline '{pipeline.name}' names no qc.feature_layer")
    from medvision.devices import resolve_device

    target = resolve_device(device)
    model = build_model(pipeline).to(target)
    load_weights(model, weights, device=target)
    images = (batch["image"] for batch in _loader(pipeline, split.train))
    train_features = FeatureGuard.features(model, layer, images)
    guard = FeatureGuard.fit(train_features, layer=layer, quantile=pipeline.qc.quantile)
    val_images = (batch["image"] for batch in _loader(pipeline, split.val))
    val_distances = guard.distance(FeatureGuard.features(model, layer, val_images))
    threshold = float(np.quantile(val_distances, pipeline.qc.quantile))
    log.info("OOD guard on %s: %d training features, threshold %.2f", layer,
             len(train_features), threshold)
    return FeatureGuard(layer=layer, mean=guard.mean, precision=guard.precision,
                        threshold=threshold, quantile=guard.quantile)


def publish(run_dir: str | os.PathLike[str], target: str | os.PathLike[str], *,
            split: DataSplit | None, device: str | None = "cpu") -> dict[str, Any]:
    """Write a run's bundle (best weights, calibration, OOD guard fitted on ``split``) into
    the pipeline folder ``target``.

    Returns a summary (weights SHA-256, temperature, guard threshold).
    """
    run, folder = Path(run_dir), Path(target)
    if not (run / RUN_WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{run}: no {RUN_WEIGHTS_FILE} to publish")
    trained = ModelBundle.load(run, weights=run / RUN_WEIGHTS_FILE)
    pipeline = load_pipeline(folder)
    for part in ("model", "classes", "preprocess", "in_channels", "spatial_dims"):
        if getattr(trained.pipeline, part) != getattr(pipeline, part):
            raise ConfigError(f"{run}: trained with a different '{part}' than {folder}")
    guard = None
    if split is not None and pipeline.qc.feature_layer:
        guard = fit_guard(pipeline, trained.weights, split, device=device)
    bundle = replace(trained, pipeline=pipeline, guard=guard, card=None)
    weights = bundle.save(folder)
    stored = "float16" if trained.weights.stat().st_size > MAX_SHIPPED_BYTES else "float32"
    summary: dict[str, Any] = {"weights_sha256": weights_sha256(weights), "stored_as": stored,
                               "bytes": weights.stat().st_size}
    if trained.calibration:
        summary["temperature"] = trained.temperature
    if guard is not None:
        summary["ood"] = guard.describe()
    return summary


def publish_ensemble(run_dirs: list[str | os.PathLike[str]], target: str | os.PathLike[str], *,
                     split: DataSplit | None, device: str | None = "cpu") -> dict[str, Any]:
    """Ship several runs as one ensemble bundle: the fold runs of a cross-validation
    (``train --fold I`` for each I), or the members of an architecture ensemble (``train`` and
    ``train --member I``, all on the pipeline's split). Each keeps its best weights, its own
    calibration temperature and its validation metric; the OOD guard is fitted for the first
    member (fold 0, or the pipeline's own network) on ``split``.

    Returns a summary with the per-run metric, its mean and standard deviation.

    Raises:
        CheckpointError: a run without weights, or not a finished run.
        ConfigError: a run that is neither a fold nor a member of the pipeline, folds and
            members mixed, a fold or member twice, members of different splits, or a
            pipeline mismatch.
    """
    from medvision.models.bundle import EnsembleMember, ensemble_digest

    folder = Path(target)
    pipeline = load_pipeline(folder)
    runs: list[tuple[str, int, Any, EnsembleMember]] = []
    for run_dir in run_dirs:
        run = Path(run_dir)
        if not (run / RUN_WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{run}: no {RUN_WEIGHTS_FILE} to publish")
        try:
            recorded = json.loads((run / "split.json").read_text())
            state = json.loads((run / "state.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{run}: not a finished training run ({e})") from e
        trained = ModelBundle.load(run, weights=run / RUN_WEIGHTS_FILE)
        fold = recorded.get("fold")
        index = int(fold) if fold is not None else pipeline.member_index(trained.pipeline.model)
        if index is None:
            raise ConfigError(f"{run}: neither a cross-validation fold run (train --fold I) nor "
                              f"a member of {folder}'s ensemble (its network is not the "
                              "pipeline's model nor one of its members)")
        kind = "fold" if fold is not None else "member"
        parts = ["classes", "preprocess", "in_channels", "spatial_dims"]
        for part in parts + (["model"] if kind == "fold" else []):
            if getattr(trained.pipeline, part) != getattr(pipeline, part):
                raise ConfigError(f"{run}: trained with a different '{part}' than {folder}")
        metric = trained.pipeline.validation_metric
        runs.append((kind, index, recorded, EnsembleMember(
            weights=trained.weights, weights_sha256=trained.weights_sha256,
            temperature=trained.temperature, fold=None if fold is None else index,
            member=index if kind == "member" else None,
            model=trained.pipeline.model if kind == "member" and index else None,
            metrics={metric: float(state["best_metric"])} if state.get("best_metric")
            is not None else None)))
    kinds = {kind for kind, _, _, _ in runs}
    order = [index for _, index, _, _ in runs]
    if len(kinds) != 1:
        raise ConfigError("an ensemble is either the fold runs of one cross-validation or the "
                          "members of one architecture ensemble, not both")
    kind = kinds.pop()
    if kind == "fold":
        folds = {int(recorded["folds"]) for _, _, recorded, _ in runs}
        if len(folds) != 1 or len(set(order)) != len(order):
            raise ConfigError("the runs must be distinct folds of one cross-validation "
                              f"(folds {sorted(order)} of {sorted(folds)})")
    else:
        if len(set(order)) != len(order) or 0 not in order:
            raise ConfigError("the runs must be distinct members of the ensemble, member 0 (the "
                              f"pipeline's own model) among them (got members {sorted(order)})")
        missing = sorted(set(range(len(pipeline.members) + 1)) - set(order))
        if missing:
            log.warning("publishing without member(s) %s of %s", missing, pipeline.name)
        if len({json.dumps(recorded.get("val_groups")) for _, _, recorded, _ in runs}) != 1:
            raise ConfigError("the members were validated on different splits; train every "
                              "member on the pipeline's split (same data, data.split_seed)")
    runs.sort(key=lambda r: r[1])
    ordered = tuple(member for _, _, _, member in runs)
    guard = None
    if split is not None and pipeline.qc.feature_layer:
        guard = fit_guard(pipeline, ordered[0].weights, split, device=device)
    bundle = ModelBundle(pipeline=pipeline, weights=ordered[0].weights,
                         weights_sha256=ensemble_digest(ordered), guard=guard,
                         members=ordered)
    manifest = bundle.save_ensemble(folder)
    if guard is not None:
        guard.save(folder)
    saved = ModelBundle.load(folder)  # what ships: the stored (maybe float16) members
    values = [next(iter(m.metrics.values())) for m in ordered if m.metrics]
    summary: dict[str, Any] = {
        "ensemble": str(manifest), "members": len(ordered),
        "weights_sha256": saved.weights_sha256,
        "bytes": sum(m.weights.stat().st_size for m in saved.members)}
    if kind == "fold":
        summary["folds"] = int(runs[0][2]["folds"])
        summary["fold_metrics"] = {f"fold {m.fold}": m.metrics for m in ordered}
    else:
        summary["member_metrics"] = {
            f"member {m.member} ({(m.model or pipeline.model).name})": m.metrics
            for m in ordered}
    if values:
        summary[f"{kind}_metric_mean"] = float(np.mean(values))
        summary[f"{kind}_metric_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    if guard is not None:
        summary["ood"] = guard.describe()
    return summary


def register_model(targets: Sequence[Target], folder: str | os.PathLike[str],
                   run_dirs: Sequence[str | os.PathLike[str]], summary: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """Register what :func:`publish` shipped as a version of the MLflow registered model
    named after the pipeline, tagged ``weights_sha256`` (the digest every report and audit
    record of these weights carries), so a digest leads to its training runs.

    The version's files (the shipped weights, calibration, guard, pipeline file, model
    card) are stored in the tracked training run (``published/<digest>/``) when one run was
    published and it was tracked; otherwise in a ``publish`` run of its own that names the
    training runs. A registry that is down is a warning: the pipeline folder is shipped
    anyway. Returns, per MLflow target, the model name and version (or the error).
    """
    from medvision.tracking import TRACKING_FILE, Tracker, mlflow_client

    pipeline = load_pipeline(folder)
    digest = str(summary["weights_sha256"])
    files = [p for p in sorted(Path(folder).iterdir()) if p.is_file()
             and (p.suffix in (".safetensors", ".json", ".yaml") or p.name == "MODEL_CARD.md")]
    out: dict[str, Any] = {}
    for target in targets:
        if target.kind != "mlflow":
            log.warning("tracking: %s has no model registry; publish registers in MLflow only",
                        target.describe())
            continue
        uri = str(target.location)
        runs: list[str] = []
        for run_dir in run_dirs:
            saved = Path(run_dir) / TRACKING_FILE
            with contextlib.suppress(OSError, ValueError):
                entry = json.loads(saved.read_text()).get("mlflow", {})
                if entry.get("uri") == uri and entry.get("run_id"):
                    runs.append(str(entry["run_id"]))
        try:
            client = mlflow_client(uri)
            if len(run_dirs) == 1 and len(runs) == 1:
                run_id = runs[0]
            else:
                tracker = Tracker.open([target], folder=None, experiment=pipeline.name,
                                       run_name=f"publish {pipeline.name} {pipeline.version}",
                                       tags={"medvision.kind": "publish",
                                             "medvision.training_runs": ",".join(runs)})
                run_id = str(tracker.mlflow_run_id)
                tracker.finish()
            where = f"published/{digest[:16]}"
            for path in files:
                client.log_artifact(run_id, str(path), where)
            with contextlib.suppress(Exception):  # already registered: a new version of it
                client.create_registered_model(
                    pipeline.name, description=pipeline.description or None)
            version = client.create_model_version(
                pipeline.name, source=f"runs:/{run_id}/{where}", run_id=run_id,
                tags={"weights_sha256": digest, "pipeline_version": pipeline.version,
                      "config_hash": config_hash(pipeline), "training_runs": ",".join(runs),
                      "stored_as": str(summary.get("stored_as", ""))},
                description=f"{pipeline.name} {pipeline.version}, weights SHA-256 {digest}")
            client.set_tag(run_id, "medvision.published_sha256", digest)
            out[uri] = {"model": pipeline.name, "version": str(version.version),
                        "run_id": run_id, "training_runs": runs}
        except Exception as e:  # noqa: BLE001 - the registry never stops a publish
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            log.warning("tracking: %s: the model was not registered (%s); the pipeline folder "
                        "is published", uri, reason)
            out[uri] = {"error": reason}
    return out
