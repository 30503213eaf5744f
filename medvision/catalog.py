"""Finding pipelines: one mechanism for shipped, third-party and user pipelines.

A *pipeline root* is a folder whose sub-folders ``<name>/pipeline.yaml`` are pipelines. Roots
come from, in this order (the first root that has a name wins):

1. folders the caller passes (the command line's ``--pipelines-dir`` and
   ``$MEDVISION_PIPELINES``; the library never reads the environment itself);
2. packages registered under the ``medvision.pipelines`` entry-point group. medvision ships its
   own pipelines this way (the ``medvision_pipelines`` package, built from ``pipelines/`` at
   the repository root), and a separate package can add more by declaring, in its
   ``pyproject.toml``::

       [project.entry-points."medvision.pipelines"]
       my-pipelines = "my_package.pipelines"     # a package whose folder holds <name>/

   The entry point may also name a callable that returns the folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

__all__ = ["ENTRY_POINT_GROUP", "PipelineEntry", "find_pipelines", "pipeline_roots"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "medvision.pipelines"


@dataclass(frozen=True)
class PipelineEntry:
    """A pipeline found in a root: its name, folder and where it came from."""

    name: str
    folder: Path
    source: str


def _folder_of(target: object) -> Path | None:
    if isinstance(target, ModuleType):
        paths = list(getattr(target, "__path__", []))
        if paths:
            return Path(paths[0])
        file = getattr(target, "__file__", None)
        return Path(file).parent if file else None
    if callable(target):
        return Path(os.fspath(target()))  # type: ignore[arg-type]
    return None


def pipeline_roots(extra: Iterable[str | os.PathLike[str]] = ()) -> list[tuple[Path, str]]:
    """``(folder, description)`` of every pipeline root, in search order."""
    roots = [(Path(folder), f"folder {folder}") for folder in extra]
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        try:
            folder = _folder_of(point.load())
        except Exception as e:  # noqa: BLE001 - a broken third-party package must not stop us
            log.warning("pipelines entry point %s (%s) cannot be loaded: %s", point.name,
                        point.value, e)
            continue
        if folder is not None:
            dist = getattr(point, "dist", None)
            package = f"package {dist.name}" if dist is not None else "a package"
            roots.append((folder, f"{package} (entry point {point.name})"))
    return roots


def find_pipelines(extra: Sequence[str | os.PathLike[str]] = ()) -> dict[str, PipelineEntry]:
    """Every pipeline in every root, by name (the first root with a name wins)."""
    found: dict[str, PipelineEntry] = {}
    for root, source in pipeline_roots(extra):
        if not root.is_dir():
            log.warning("%s: no such pipelines folder (from %s)", root,
                        "a package" if "entry point" in source else "--pipelines-dir")
            continue
        for file in sorted(root.glob("*/pipeline.yaml")):
            name = file.parent.name
            found.setdefault(name, PipelineEntry(name=name, folder=file.parent, source=source))
    return found
