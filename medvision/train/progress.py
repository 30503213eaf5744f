"""What a person and a tracker see of a training run while it runs: one line per epoch,
``curves.png`` in the run folder after each epoch, and the run's records in MLflow or
TensorBoard (:mod:`medvision.tracking`).

The epoch lines go to the ``medvision.progress`` logger: the command line shows them by
default and ``-q`` silences them (as a library, they are INFO records of that logger).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medvision._version import __version__
from medvision.tracking import Target, Tracker, flatten, parse_targets

__all__ = ["CURVES_FILE", "EpochReport", "data_fingerprint", "open_tracker", "tracked",
           "tracking_targets"]

log = logging.getLogger(__name__)
progress_log = logging.getLogger("medvision.progress")

CURVES_FILE = "curves.png"


def tracking_targets(pipeline: Any, given: Sequence[str] | str | None) -> tuple[Target, ...]:
    """The targets given on the command line, else the pipeline's ``training.tracking``."""
    return parse_targets(given if given else getattr(pipeline.training, "tracking", None))


def data_fingerprint(digests: Mapping[str, Any]) -> str:
    """One SHA-256 over the data digests of a run (training and validation items)."""
    text = "|".join(f"{k}:{v.get('items_sha256') if isinstance(v, Mapping) else v}"
                    for k, v in sorted(digests.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def open_tracker(targets: Sequence[Target], folder: str | os.PathLike[str], *, pipeline: Any,
                 kind: str, resume: bool, engine: Any = None,
                 options: Mapping[str, Any] | None = None,
                 data: Mapping[str, Any] | None = None) -> Tracker:
    """Start (or continue) the tracked run of a training run folder and record what it is:
    parameters (the flattened pipeline, the command-line options, seed, device, precision),
    tags (medvision version, pipeline name and version, config hash, data fingerprint)."""
    if not targets:
        return Tracker.disabled()
    from medvision.config import config_hash

    folder = Path(folder)
    tags: dict[str, str] = {
        "medvision.kind": kind, "medvision.version": __version__,
        "medvision.pipeline": pipeline.name, "medvision.pipeline_version": pipeline.version,
        "medvision.config_hash": config_hash(pipeline), "medvision.run_folder": str(
            folder.resolve())}
    if data:
        tags["medvision.data_fingerprint"] = data_fingerprint(data)
        for side, digest in data.items():
            if isinstance(digest, Mapping) and "items_sha256" in digest:
                tags[f"medvision.data.{side}_sha256"] = str(digest["items_sha256"])
                tags[f"medvision.data.{side}_items"] = str(digest.get("items", ""))
    tracker = Tracker.open(targets, folder=folder, experiment=pipeline.name,
                           run_name=f"{kind} {folder.name}", tags=tags, resume=resume)
    params = flatten(pipeline.model_dump(mode="json"))
    params.update({f"cli.{k}": str(v) for k, v in (options or {}).items() if v is not None})
    params["seed"] = str(pipeline.training.seed)
    if engine is not None:
        described = engine.describe()
        params.update({"device": str(described.get("device")),
                       "device_name": str(described.get("name")),
                       "precision": str(described.get("precision")),
                       "processes": str(described.get("processes"))})
    tracker.log_params(params)
    return tracker


@contextlib.contextmanager
def tracked(targets: Sequence[Target], run: Any, *, pipeline: Any, kind: str,
            engine: Any = None, options: Mapping[str, Any] | None = None,
            data: Mapping[str, Any] | None = None) -> Iterator[Tracker]:
    """The tracked run of a run folder (:func:`open_tracker`; only the writing process
    tracks), ended FINISHED, FAILED or KILLED (Ctrl-C) as the block ends."""
    tracker = (open_tracker(targets, run.path, pipeline=pipeline, kind=kind, resume=True,
                            engine=engine, options=options, data=data)
               if run.writer else Tracker.disabled())
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


def _loss_keys(row: Mapping[str, Any]) -> list[str]:
    return [k for k in row if "loss" in k and k != "val_loss"]


class EpochReport:
    """After each epoch: the line, ``curves.png``, the tracker's catch-up."""

    def __init__(self, run: Any, *, epochs: int, title: str = "epoch",
                 monitor: str | None = None, swa_from: int | None = None,
                 tracker: Tracker | None = None) -> None:
        """``monitor``: the history column that picks the best epoch (``val_auc``...),
        higher better unless it is a loss; ``swa_from``: the first weight-averaging epoch
        (marked on the curves)."""
        self.run = run
        self.epochs = epochs
        self.title = title
        self.monitor = monitor
        self.swa_from = swa_from
        self.tracker = tracker or Tracker.disabled()
        self._times: list[float] = []
        self._started = time.perf_counter()

    @property
    def writer(self) -> bool:
        return bool(getattr(self.run, "writer", True))

    def begin(self, state: Any) -> None:
        """Before the first epoch of this session: a resumed run's tracker gets the epochs
        it has not received."""
        self._started = time.perf_counter()
        if self.writer and state.history:
            self._draw(state.history)  # also replaces a drawing a kill left half-written
            self.tracker.sync_history(state.history)

    def epoch_done(self, state: Any) -> None:
        seconds = time.perf_counter() - self._started
        self._times.append(seconds)
        if not self.writer or not state.history:
            self._started = time.perf_counter()
            return
        row = state.history[-1]
        progress_log.info("%s", self.line(state, row, seconds))
        self._draw(state.history)
        self.tracker.sync_history(state.history)
        self.tracker.log_metrics({"epoch_seconds": seconds}, step=int(row.get("epoch", 0)))
        self._started = time.perf_counter()

    def line(self, state: Any, row: Mapping[str, Any], seconds: float) -> str:
        """``epoch 3/20: train loss 0.4123, val auc 0.9312 (best 0.9400, epoch 2), lr
        3.0e-04, 41 s, about 11 min left``"""
        number = int(row.get("epoch", state.epoch))
        parts = []
        for key in _loss_keys(row)[:3]:
            if _is_number(row[key]):
                parts.append(f"{key.replace('_', ' ')} {float(row[key]):.4f}")
        if self.monitor and self.monitor in row and _is_number(row[self.monitor]):
            text = f"{self.monitor.replace('_', ' ')} {float(row[self.monitor]):.4f}"
            if state.best_metric is not None and state.best_epoch:
                text += f" (best {float(state.best_metric):.4f}, epoch {state.best_epoch})"
            parts.append(text)
        if not self.monitor or "loss" in self.monitor:  # the task's metric too
            for key in ("val_auc", "val_dice", "val_map_50"):
                if _is_number(row.get(key)):
                    parts.append(f"{key.replace('_', ' ')} {float(row[key]):.4f}")
                    break
        if _is_number(row.get("lr")):
            parts.append(f"lr {float(row['lr']):.1e}")
        parts.append(_duration(seconds))
        left = self.epochs - number
        if left > 0 and self._times:
            parts.append(f"about {_duration(left * sum(self._times) / len(self._times))} left")
        return f"{self.title} {number}/{self.epochs}: " + ", ".join(parts)

    def _draw(self, history: Sequence[Mapping[str, Any]]) -> None:
        try:
            self.draw(history, self.run.path / CURVES_FILE)
        except Exception as e:  # noqa: BLE001 - a figure never stops training
            log.warning("%s not drawn (%s)", CURVES_FILE, e)

    def draw(self, history: Sequence[Mapping[str, Any]], path: Path) -> None:
        """Losses (left) and the monitored validation metric (right) against the epoch;
        weight-averaging epochs shaded, the best epoch marked; written atomically."""
        from matplotlib.figure import Figure

        epochs = [int(r["epoch"]) for r in history]
        panels = 2 if self.monitor else 1
        figure = Figure(figsize=(5.5 * panels, 3.6), dpi=100, layout="constrained")
        axes = figure.subplots(1, panels, squeeze=False)[0]
        keys = _loss_keys(history[-1]) + (["val_loss"] if "val_loss" in history[-1] else [])
        for key in keys:
            points = [(e, float(r[key])) for e, r in zip(epochs, history, strict=True)
                      if _is_number(r.get(key))]
            if points:
                axes[0].plot(*zip(*points, strict=True), marker="o", markersize=3,
                             label=key.replace("_", " "))
        axes[0].set_title("loss")
        axes[0].legend(fontsize=8)
        if self.monitor:
            points = [(e, float(r[self.monitor])) for e, r in zip(epochs, history, strict=True)
                      if _is_number(r.get(self.monitor))]
            if points:
                axes[1].plot(*zip(*points, strict=True), marker="o", markersize=3,
                             color="tab:green")
                best = (min if "loss" in self.monitor else max)(points, key=lambda p: p[1])
                axes[1].plot([best[0]], [best[1]], marker="*", markersize=12, color="tab:red",
                             linestyle="none", label=f"best: epoch {best[0]}")
                axes[1].legend(fontsize=8)
            axes[1].set_title(self.monitor.replace("_", " "))
        from matplotlib.ticker import MaxNLocator

        for axis in axes:
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
            if self.swa_from is not None and epochs and epochs[-1] >= self.swa_from:
                axis.axvspan(self.swa_from - 0.5, epochs[-1] + 0.5, color="tab:orange",
                             alpha=0.15, label="weight averaging")
        if self.swa_from is not None and epochs and epochs[-1] >= self.swa_from:
            axes[0].legend(fontsize=8)
        tmp = path.with_name(path.name + ".tmp")
        figure.savefig(tmp, format="png")
        os.replace(tmp, path)

    def finish(self) -> None:
        """The curves as a file of the tracked run (and an image in TensorBoard)."""
        if self.writer:
            self.tracker.log_artifacts([self.run.path / CURVES_FILE])


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return value != ""


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
