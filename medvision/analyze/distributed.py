"""Running studies on a Dask distributed cluster.

The client sends each worker a study's key and file paths (not its parsed headers); the
worker reads the study again, loads the pipeline once per process, and processes the study
into a staging folder on the shared output folder. The client appends the audit records and
publishes the folders (see :mod:`medvision.analyze.batch`). When a worker dies mid-study, the
scheduler reruns its tasks elsewhere; the staging folder is reset at the start of each try, so
a study still ends with exactly one report and one record.

Start a cluster (see docs/distributed.md)::

    dask scheduler --host 0.0.0.0 --port 8786
    dask worker tcp://SCHEDULER:8786 --nworkers 1 --nthreads 1   # on each machine
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from medvision.analyze.runner import AnalyzeOptions, StudyOutcome, run_study
from medvision.analyze.studies import Study, collect_studies
from medvision.audit.records import Pseudonymizer
from medvision.errors import MissingDependencyError
from medvision.infer import LazyPredictor, Predictor

__all__ = ["run_on_cluster"]


@lru_cache(maxsize=4)
def _worker_predictor(pipeline: str, weights: str, backend: str,
                      device: str = "cpu") -> Predictor:
    """One loaded pipeline per worker process (loading takes longer than a study);
    ``weights`` empty: the pipeline's own (an ensemble loads all its members); ``device``
    as the worker sees it (``auto``: the GPU its ``CUDA_VISIBLE_DEVICES`` leaves it)."""
    return Predictor.from_pipeline(pipeline, weights=weights or None, backend=backend,
                                   device=device)


def _remote_study(key: str, paths: tuple[str, ...], pipeline: str, weights: str,
                  backend: str, out: str, options: AnalyzeOptions,
                  pseudonymizer: Pseudonymizer,
                  previous: dict[str, Any] | None = None, device: str = "cpu") -> StudyOutcome:
    """Runs on a worker: read the study again from its files and process it."""
    studies = collect_studies(paths, pseudonymizer=pseudonymizer)
    if studies:
        study = replace(studies[0], key=key)
    else:
        study = Study(key=key, candidates=(), source_name=key,
                      reason="the study's files could not be found on the worker", paths=paths)
    predictor = _worker_predictor(pipeline, weights, backend, device)
    return run_study(study, predictor, Path(out), options, pseudonymizer, previous=previous)


def run_on_cluster(studies: Sequence[Study], predictor: Predictor | LazyPredictor, out: Path,
                   options: AnalyzeOptions, pseudonymizer: Pseudonymizer, *,
                   scheduler: str,
                   previous: Mapping[str, dict[str, Any]] | None = None,
                   device: str = "cpu",
                   ) -> Iterator[StudyOutcome]:
    """Submit one task per study to ``scheduler``; yield outcomes as they complete.

    ``previous`` maps study keys to the older reports they replace. ``device``: where the
    workers run the networks; for ``cuda`` each task asks for one ``GPU`` worker resource,
    so it runs only on workers started with ``--resources GPU=1`` (one per GPU, pinned to
    it by ``CUDA_VISIBLE_DEVICES``; docs/distributed.md); ``auto`` takes whatever each
    worker has.
    """
    try:
        from distributed import Client, as_completed
    except ImportError as e:
        raise MissingDependencyError("--scheduler needs dask distributed: "
                                     "pip install 'medvision[dask]'") from e
    if predictor.folder is None:
        raise MissingDependencyError("a predictor loaded from a pipeline folder is needed")
    batch = uuid.uuid4().hex[:8]
    with Client(scheduler, timeout="30s") as client:
        futures = [
            client.submit(_remote_study, study.key, study.paths, str(predictor.folder),
                          "" if predictor.ensemble_size > 1 else str(predictor.weights),
                          predictor.backend_name, str(out.resolve()),
                          options, pseudonymizer, (previous or {}).get(study.key), device,
                          key=f"medvision-{batch}-{study.key}",
                          pure=False, retries=2,
                          resources={"GPU": 1} if device.startswith("cuda") else None)
            for study in studies
        ]
        for future in as_completed(futures):
            outcome = future.result()
            # Forget the result at once: if its worker dies later, the scheduler must not
            # recompute a study whose result is already in hand.
            future.release()
            yield outcome
