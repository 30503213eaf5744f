"""An evaluation on record: its metrics, each with its 95% confidence interval, sent to the
tracked run of the weights it evaluated, or to a run of its own linked to that one."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medvision._version import __version__
from medvision.config import config_hash
from medvision.tracking import (
    TRACKING_FILE,
    Target,
    Tracker,
    flatten,
    metric_values,
    registered_versions,
)

__all__ = ["evaluation_label", "track_evaluation"]

log = logging.getLogger(__name__)


def evaluation_label(split: str | None, data: str | os.PathLike[str]) -> str:
    """What an evaluation's metrics are called in a tracker: ``eval_<split or data name>``."""
    name = split if split and split != "all" else Path(str(data)).stem or "data"
    return "eval_" + re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")


def track_evaluation(targets: Sequence[Target], *, pipeline: Any, weights: str | None,
                     weights_sha256: str | None, label: str,
                     output: str | os.PathLike[str], metrics: Mapping[str, Any],
                     data: Mapping[str, Any] | None = None,
                     options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Log ``metrics`` (``LABEL.auc``, ``LABEL.auc.ci95_low``...) and the evaluation page
    and metrics.json (under ``LABEL/``).

    Where they go: weights inside a tracked training run folder (``--weights
    RUN/best.safetensors``): that run. Otherwise a new run in the pipeline's experiment,
    tagged with the weights' SHA-256 and linked (``medvision.evaluates_runs``) to the runs
    that the Model Registry names for that digest.

    Returns where the metrics went (:meth:`Tracker.links`).
    """
    if not targets:
        return {}
    output = Path(output)
    run_folder = Path(weights).parent if weights else None
    tags: dict[str, str] = {"medvision.version": __version__,
                            "medvision.pipeline": pipeline.name,
                            "medvision.pipeline_version": pipeline.version,
                            "medvision.config_hash": config_hash(pipeline)}
    if run_folder is not None and (run_folder / TRACKING_FILE).is_file():
        tracker = Tracker.open(targets, folder=run_folder, experiment=pipeline.name,
                               run_name=f"train {run_folder.name}", tags=tags, save=False)
    else:
        linked: list[str] = []
        versions: list[str] = []
        if weights_sha256:
            for target in targets:
                if target.kind != "mlflow":
                    continue
                try:
                    for found in registered_versions(str(target.location), weights_sha256):
                        versions.append(f"{found['model']}/{found['version']}")
                        linked += [r["run_id"] for r in found["runs"] if "run_id" in r]
                except Exception as e:  # noqa: BLE001 - a tracker that is down: no link
                    log.warning("tracking: the registry at %s was not searched (%s)",
                                target.location, str(e).splitlines()[0][:200])
        tags.update({"medvision.kind": "evaluate",
                     "medvision.weights_sha256": weights_sha256 or "",
                     "medvision.evaluates_runs": ",".join(dict.fromkeys(linked)),
                     "medvision.model_versions": ",".join(versions)})
        tracker = Tracker.open(targets, folder=output, experiment=pipeline.name,
                               run_name=f"evaluate {label}", tags=tags, resume=False)
        tracker.log_params({f"cli.{k}": v for k, v in (options or {}).items()})
    if data:
        tracker.set_tags({f"medvision.{label}.{k}": v for k, v in flatten(data).items()})
    tracker.log_metrics(metric_values(metrics, label))
    tracker.log_artifacts([output / "summary.html", output / "metrics.json"], subdir=label)
    tracker.finish()
    return tracker.links()
