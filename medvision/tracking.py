"""Experiment tracking: a run's parameters, per-epoch metrics, tags and files sent to MLflow
(the self-hostable tracker, its Model Registry too) and TensorBoard event files.

A tracker never stops the work it records. Each backend that fails (a server that is down,
or goes down mid-run) is warned about once and skipped; the run folder's own files stay
complete, and the epochs a backend missed are sent the next time the run's history is
synchronised (the next epoch, or ``--resume``). What each backend has received is kept in
the run folder's ``tracking.json``, so a resumed run continues the same MLflow run and
sends each epoch once.

Targets (``--tracking``, or ``training.tracking`` in a pipeline file):

* ``mlflow``: MLflow at ``$MLFLOW_TRACKING_URI``, else a local store ``./mlflow.db``
  (SQLite; view it with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``);
* an MLflow URI: ``http(s)://host:port``, ``sqlite:///path.db``, ``databricks``...;
* ``tensorboard`` (event files in the run folder's ``tensorboard/``), or
  ``tensorboard:DIR``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvision.atomic import write_text_atomic
from medvision.errors import ConfigError
from medvision.extras import require

__all__ = ["TRACKING_FILE", "Target", "Tracker", "flatten", "metric_values", "mlflow_client",
           "parse_targets", "registered_versions"]

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
LOCAL_STORE = "mlflow.db"
_MLFLOW_SCHEMES = ("http://", "https://", "sqlite:", "file:", "postgresql", "mysql",
                   "mssql", "databricks")


@dataclass(frozen=True)
class Target:
    """Where a run's records go."""

    kind: str
    """``mlflow`` or ``tensorboard``."""
    location: str | None = None
    """MLflow: the tracking URI; TensorBoard: the event folder (None: the run folder's
    ``tensorboard/``)."""

    def describe(self) -> str:
        return f"{self.kind} {self.location}" if self.location else self.kind


def parse_targets(values: str | Sequence[str] | None) -> tuple[Target, ...]:
    """The targets named by ``--tracking`` values (each may list several, comma-separated).

    Raises:
        ConfigError: a value that is neither ``mlflow``, ``tensorboard[:DIR]`` nor an MLflow
            URI.
        MissingDependencyError: the extra that a target needs is not installed.
    """
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    targets: list[Target] = []
    for value in values:
        for part in (p.strip() for p in str(value).split(",")):
            if not part:
                continue
            if part == "mlflow":
                uri = os.environ.get("MLFLOW_TRACKING_URI") or \
                    f"sqlite:///{Path(LOCAL_STORE).resolve()}"
                targets.append(Target("mlflow", uri))
            elif part == "tensorboard" or part.startswith("tensorboard:"):
                folder = part.partition(":")[2] or None
                targets.append(Target("tensorboard",
                                      str(Path(folder).resolve()) if folder else None))
            elif part.startswith(_MLFLOW_SCHEMES):
                targets.append(Target("mlflow", part))
            else:
                raise ConfigError(f"--tracking {part!r}: give 'mlflow' (a local store, or "
                                  "$MLFLOW_TRACKING_URI), an MLflow URI (http://host:port, "
                                  "sqlite:///file.db), or 'tensorboard[:DIR]'")
    kinds = {t.kind for t in targets}
    if "mlflow" in kinds:
        require("mlflow", "tracking", "--tracking with MLflow")
    if "tensorboard" in kinds:
        require("tensorboard", "tracking", "--tracking tensorboard")
    return tuple(dict.fromkeys(targets))


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys (``training.epochs``, as the pipeline reference names them) to text
    values; lists and tuples as JSON, None as ``null``."""
    out: dict[str, str] = {}
    if isinstance(value, Mapping):
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list | tuple):
        text = json.dumps(value, default=str)
    elif value is None:
        text = "null"
    else:
        text = str(value)
    return {prefix: text}


def _numeric(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row (blank cells and text left out)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "epoch" or isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


def _configure_mlflow_http() -> None:
    """A tracker that is down must not hold training up: few quick retries, a short timeout
    (the user's own settings of these variables win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """MLflow's client prints "View run ..." lines on stdout, where medvision's commands put
    their results (``--json``): those lines go to the log instead; urllib3's line for each
    retry of a tracker that is down is left out (the tracker warns once itself)."""
    buffer = io.StringIO()
    pool = logging.getLogger("urllib3.connectionpool")  # a "Retrying..." line per request
    level = pool.level
    pool.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        pool.setLevel(level)
    if buffer.getvalue().strip():
        log.debug("mlflow: %s", buffer.getvalue().strip())


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` (quick to give up on a server that does not answer)."""
    require("mlflow", "tracking", "MLflow tracking")
    _configure_mlflow_http()
    from mlflow.tracking import MlflowClient

    # MLflow's own INFO lines (database set-up...) only when medvision's log shows INFO
    if logging.getLogger("medvision").getEffectiveLevel() > logging.INFO:
        logging.getLogger("mlflow").setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _read_saved(path: Path) -> dict[str, Any]:
    """``tracking.json`` as backend name -> its record; anything unreadable, truncated or
    of the wrong shape counts as nothing saved (the run is then tracked afresh)."""
    try:
        saved = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        log.warning("tracking: %s unreadable (%s); tracking starts afresh", path, e)
        return {}
    if not isinstance(saved, dict):
        return {}
    out: dict[str, Any] = {}
    for kind, record in saved.items():
        if not isinstance(record, dict):
            continue
        try:
            out[kind] = {**record, "logged_epoch": int(record.get("logged_epoch", 0))}
        except (TypeError, ValueError):
            out[kind] = {**record, "logged_epoch": 0}
    return out


_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class _Backend:
    """One destination. Subclasses send; :class:`Tracker` catches their failures."""

    key = ""

    def __init__(self, target: Target, saved: Mapping[str, Any]) -> None:
        self.target = target
        self.saved = dict(saved)
        self.logged_epoch = int(saved.get("logged_epoch", 0))
        self.down = False
        self.started = False
        self.checked = False

    def state(self) -> dict[str, Any]:
        return {**self.saved, "logged_epoch": self.logged_epoch}

    def start(self, *, experiment: str, run_name: str, tags: Mapping[str, str]) -> None:
        raise NotImplementedError

    def params(self, params: Mapping[str, str]) -> None:
        raise NotImplementedError

    def tags(self, tags: Mapping[str, str]) -> None:
        raise NotImplementedError

    def metrics(self, metrics: Mapping[str, float], step: int | None) -> None:
        raise NotImplementedError

    def artifacts(self, paths: Sequence[Path], subdir: str | None) -> None:
        raise NotImplementedError

    def finish(self, status: str) -> None:
        raise NotImplementedError

    def link(self) -> dict[str, str]:
        return {}

    def already_received(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """The last of ``rows`` (epochs after ``logged_epoch``) the tracker holds already (a
        process killed after sending an epoch but before noting it); 0 when none."""
        return 0


class _Mlflow(_Backend):
    key = "mlflow"

    def __init__(self, target: Target, saved: Mapping[str, Any]) -> None:
        super().__init__(target, saved)
        if saved.get("uri") not in (None, target.location):
            # another tracker than the one this run began in: a new run there, every epoch
            self.saved, self.logged_epoch = {}, 0
        self.uri = str(target.location)
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = mlflow_client(self.uri)
        return self._client

    @property
    def run_id(self) -> str | None:
        return self.saved.get("run_id")

    def start(self, *, experiment: str, run_name: str, tags: Mapping[str, str]) -> None:
        client = self.client
        if self.run_id:
            try:
                client.update_run(self.run_id, status="RUNNING")
                return
            except Exception as e:  # noqa: BLE001 - a deleted run: start a new one
                if "RESOURCE_DOES_NOT_EXIST" not in str(e):
                    raise
                self.saved, self.logged_epoch = {}, 0
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
        self.saved = {"uri": self.uri, "run_id": run.info.run_id,
                      "experiment_id": experiment_id, "experiment": experiment}

    def params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        # a resumed run's parameters are already there; MLflow refuses to change one
        fresh = [Param(k, v[:6000]) for k, v in params.items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start:start + 100])

    def tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def metrics(self, metrics: Mapping[str, float], step: int | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step or 0) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def artifacts(self, paths: Sequence[Path], subdir: str | None) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), subdir)

    def finish(self, status: str) -> None:
        with _quiet_stdout():
            self.client.set_terminated(self.run_id, status=status)

    def already_received(self, rows: Sequence[Mapping[str, Any]]) -> int:
        keys = list(_numeric(rows[0]))
        if not keys:
            return 0
        steps = {m.step for m in self.client.get_metric_history(self.run_id, keys[0])}
        last = 0
        for row in rows:
            if int(row["epoch"]) not in steps:
                break
            last = int(row["epoch"])
        return last

    def link(self) -> dict[str, str]:
        if not self.run_id:
            return {}
        out = {"mlflow_uri": self.uri, "mlflow_run_id": str(self.run_id)}
        if self.uri.startswith(("http://", "https://")):
            out["mlflow_run_url"] = (f"{self.uri.rstrip('/')}/#/experiments/"
                                     f"{self.saved.get('experiment_id')}/runs/{self.run_id}")
        return out


class _TensorBoard(_Backend):
    key = "tensorboard"

    def __init__(self, target: Target, saved: Mapping[str, Any], folder: Path | None) -> None:
        super().__init__(target, saved)
        where = target.location or str(((folder or Path.cwd()) / "tensorboard").resolve())
        if saved.get("dir") not in (None, where):
            self.saved, self.logged_epoch = {}, 0
        self.dir = where
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.dir)
            self.saved["dir"] = self.dir
        return self._writer

    def start(self, *, experiment: str, run_name: str, tags: Mapping[str, str]) -> None:
        self.writer.add_text("run", f"{experiment}: {run_name}", 0)

    def params(self, params: Mapping[str, str]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("parameters", "| parameter | value |\n|---|---|\n" + table, 0)

    def tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.writer.add_text(f"tags/{key}", str(value), 0)

    def metrics(self, metrics: Mapping[str, float], step: int | None) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step or 0)
        self.writer.flush()

    def artifacts(self, paths: Sequence[Path], subdir: str | None) -> None:
        import numpy as np
        from PIL import Image

        for path in paths:  # images only: TensorBoard shows pictures, not files
            if path.suffix.lower() == ".png":
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(path.stem, pixels, self.logged_epoch, dataformats="HWC")
        self.writer.flush()

    def finish(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def link(self) -> dict[str, str]:
        return {"tensorboard_dir": self.dir}


class Tracker:
    """One run as the trackers see it: sends to every backend, never raises for one."""

    def __init__(self, backends: Sequence[_Backend], folder: Path | None) -> None:
        self.backends = list(backends)
        self.folder = folder
        self._start_kwargs: dict[str, Any] = {}

    @classmethod
    def open(cls, targets: Sequence[Target], *, folder: str | os.PathLike[str] | None,
             experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
             resume: bool = True, save: bool = True) -> Tracker:
        """Start (or, with ``resume`` and the folder's ``tracking.json``, continue) a run in
        each target. ``folder``: where ``tracking.json`` lives (a run folder; None: not
        kept); ``save``: false to read it only (an evaluation adding to a training run)."""
        path = Path(folder) if folder is not None else None
        saved = _read_saved(path / TRACKING_FILE) if resume and path is not None else {}
        backends: list[_Backend] = []
        for target in targets:
            previous = saved.get(target.kind, {})
            if target.kind == "mlflow":
                backends.append(_Mlflow(target, previous))
            else:
                backends.append(_TensorBoard(target, previous, path))
        tracker = cls(backends, path if save else None)
        if not save and path is not None:  # TensorBoard still writes beside the run
            for backend in backends:
                if isinstance(backend, _TensorBoard) and backend.target.location is None:
                    backend.dir = str((path / "tensorboard").resolve())
        tracker._start_kwargs = {"experiment": experiment, "run_name": run_name,
                                 "tags": dict(tags or {})}
        for backend in tracker.backends:
            tracker._start(backend)
        for backend in tracker.backends:
            for key, value in backend.link().items():
                if key.endswith(("_url", "_dir")):
                    log.info("tracking: %s", value)
        return tracker

    @classmethod
    def disabled(cls) -> Tracker:
        return cls([], None)

    def __bool__(self) -> bool:
        return bool(self.backends)

    def _each(self, method: str, *args: Any, only: Iterable[_Backend] | None = None,
              **kwargs: Any) -> list[_Backend]:
        """Call ``method`` on each backend (starting one that could not start before);
        returns those that succeeded."""
        return [backend for backend in list(only if only is not None else self.backends)
                if self._ask(backend, method, *args, **kwargs)[0]]

    def _ask(self, backend: _Backend, method: str, *args: Any, **kwargs: Any
             ) -> tuple[bool, Any]:
        """``method`` of one backend: (whether it answered, what it returned)."""
        if not backend.started and not self._start(backend):
            return False, None
        try:
            with _quiet_stdout():
                result = getattr(backend, method)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking never stops the work
            self._failed(backend, method, e)
            return False, None
        self._answered(backend)
        return True, result

    def _start(self, backend: _Backend) -> bool:
        try:
            with _quiet_stdout():
                backend.start(**self._start_kwargs)
        except Exception as e:  # noqa: BLE001 - tracking never stops the work
            self._failed(backend, "start", e)
            return False
        backend.started = True
        self._answered(backend)
        self._save()
        return True

    def _answered(self, backend: _Backend) -> None:
        if backend.down:
            log.warning("tracking: %s answers again", backend.target.describe())
            backend.down = False

    def _failed(self, backend: _Backend, method: str, error: Exception) -> None:
        if not backend.down:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            log.warning("tracking: %s failed (%s: %s); the work goes on and its own files "
                        "are complete; what it missed is sent when it answers again (the "
                        "next epoch, or --resume)", backend.target.describe(),
                        type(error).__name__, first[:200])
        backend.down = True

    def _save(self) -> None:
        if self.folder is None or not self.backends or not self.folder.is_dir():
            return
        path = self.folder / TRACKING_FILE
        current = _read_saved(path)
        for backend in self.backends:
            current[backend.key] = backend.state()
        try:
            write_text_atomic(path, json.dumps(current, indent=1))
        except OSError as e:  # a full disk stops the checkpoint, not this note of it
            log.warning("tracking: %s not written (%s); a resumed run may send some "
                        "epochs again", path, e)

    # ------------------------------------------------------------------ what is recorded
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._each("params", {k: str(v) for k, v in params.items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._each("tags", {k: str(v) for k, v in tags.items() if v is not None})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._each("metrics", _numeric(metrics), step)

    def sync_history(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Send every epoch row a backend has not received yet (``epoch`` is the step)."""
        for backend in self.backends:
            rows = [r for r in history if int(r.get("epoch", 0)) > backend.logged_epoch]
            if rows and not backend.checked:  # once a session: what a killed one sent
                answered, received = self._ask(backend, "already_received", rows)
                if answered:
                    backend.checked = True
                    backend.logged_epoch = max(backend.logged_epoch, int(received))
                    rows = [r for r in rows if int(r["epoch"]) > backend.logged_epoch]
            for row in rows:
                if not self._each("metrics", _numeric(row), int(row["epoch"]), only=[backend]):
                    break
                backend.logged_epoch = int(row["epoch"])
        self._save()

    def log_artifacts(self, paths: Iterable[str | os.PathLike[str]],
                      subdir: str | None = None) -> None:
        existing = [Path(p) for p in paths if Path(p).is_file()]
        if existing:
            self._each("artifacts", existing, subdir)

    def finish(self, status: str = "FINISHED") -> None:
        self._each("finish", status)
        self._save()

    def links(self) -> dict[str, str]:
        """Where the run can be found: MLflow URI, run ID (and URL), TensorBoard folder."""
        out: dict[str, str] = {}
        for backend in self.backends:
            out.update(backend.link())
        return out

    @property
    def mlflow_run_id(self) -> str | None:
        for backend in self.backends:
            if isinstance(backend, _Mlflow) and backend.run_id:
                return backend.run_id
        return None


def metric_values(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """An evaluation's ``metrics.json`` as tracker metrics: each ``{"value", "ci95"}``
    entry as ``KEY``, ``KEY.ci95_low`` and ``KEY.ci95_high``; plain numbers as they are;
    nested groups (per class, per fold) with dotted keys."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            if "value" in value:
                out.update(_numeric({name: value["value"]}))
                ci = value.get("ci95")
                if isinstance(ci, list | tuple) and len(ci) == 2:
                    out.update(_numeric({f"{name}.ci95_low": ci[0],
                                         f"{name}.ci95_high": ci[1]}))
            else:
                out.update(metric_values(value, name))
        elif not isinstance(value, list | tuple | str):
            out.update(_numeric({name: value}))
    return out


def registered_versions(uri: str, weights_sha256: str) -> list[dict[str, Any]]:
    """The MLflow model versions tagged with ``weights_sha256``, each with the run that made
    it (parameters, tags, metrics): the way from a report's weights digest to its run.

    Raises:
        ConfigError: ``weights_sha256`` is not 64 hexadecimal digits (it is put in a
            search filter).
        MissingDependencyError: MLflow is not installed.
    """
    if not _DIGEST.match(weights_sha256):
        raise ConfigError(f"{weights_sha256[:80]!r} is not a SHA-256 digest (64 hexadecimal "
                          "digits, as reports and audit records give it)")
    client = mlflow_client(uri)
    out = []
    for version in client.search_model_versions(f"tags.weights_sha256 = '{weights_sha256}'"):
        entry: dict[str, Any] = {"model": version.name, "version": str(version.version),
                                 "source": version.source, "run_id": version.run_id,
                                 "tags": dict(version.tags or {})}
        runs = [r for r in str(version.tags.get("training_runs", "") or "").split(",") if r]
        entry["runs"] = []
        for run_id in runs or ([version.run_id] if version.run_id else []):
            try:
                run = client.get_run(run_id)
            except Exception as e:  # noqa: BLE001 - a deleted run is named, not fatal
                entry["runs"].append({"run_id": run_id, "error": str(e).splitlines()[0]})
                continue
            info: dict[str, Any] = {
                "run_id": run_id, "name": run.info.run_name, "status": run.info.status,
                "experiment_id": run.info.experiment_id,
                "tags": {k: v for k, v in run.data.tags.items() if k.startswith("medvision")},
                "params": dict(run.data.params), "metrics": dict(run.data.metrics)}
            if uri.startswith(("http://", "https://")):
                info["url"] = (f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}"
                               f"/runs/{run_id}")
            entry["runs"].append(info)
        out.append(entry)
    return out
