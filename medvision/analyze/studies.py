"""Turning input paths into studies, and choosing the series a pipeline should see.

A DICOM study (one Study Instance UID) is one study; its series are candidates and the
pipeline's input rules pick one. Every other image file is a study of its own. A file that
looked like an image (an image or DICOM name, no suffix, or the DICOM preamble) but cannot be
read becomes a rejected study, so it is reported rather than lost; a file that is plainly not
an image (``notes.txt``, ``report.pdf``) is skipped and listed; a path that does not exist
is a rejected study of its own.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from medvision.audit.records import Pseudonymizer
from medvision.config import Pipeline
from medvision.io import SourceEntry, inventory
from medvision.io.registry import detect_format

__all__ = ["Study", "StudySearch", "collect_studies", "find_studies", "looks_like_image",
           "study_key"]


@dataclass(frozen=True, eq=False)
class Study:
    """One unit of analysis.

    Attributes:
        key: folder name under the output directory; pseudonymous for DICOM
            (``study-`` + 12 hex of SHA-256 of the Study Instance UID).
        candidates: image entries of the study (DICOM series or one file).
        source_name: a display name without patient identity (file name, or the key).
        reason: why the study cannot be analysed at all (unreadable input), or ``None``.
        paths: the files the study was read from (to read it again elsewhere).
        unreadable: ``(path, reason, series UID)`` of files whose header names this study
            but which cannot be used (reported with the study, which goes on without them).
    """

    key: str
    candidates: tuple[SourceEntry, ...]
    source_name: str
    reason: str | None = None
    paths: tuple[str, ...] = ()
    unreadable: tuple[tuple[str, str, str], ...] = ()


def study_key(uid: str, pseudonymizer: Pseudonymizer | None = None) -> str:
    """Pseudonymous folder name for a Study Instance UID (keyed when a pseudonymizer is given)."""
    if pseudonymizer is not None:
        return "study-" + pseudonymizer.pseudonym("study", uid)[:12]
    return "study-" + hashlib.sha256(uid.encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "study"


@dataclass(frozen=True)
class StudySearch:
    """What a search of the inputs found."""

    studies: tuple[Study, ...]
    """Every study, rejected ones (unreadable images, missing paths) included."""
    skipped: tuple[str, ...] = ()
    """Files that are plainly not images, left out."""
    files: int = 0
    """Files looked at."""


_DICOM_SUFFIXES = ("", ".dcm", ".dicom", ".dic", ".ima")


def looks_like_image(path: str | os.PathLike[str]) -> bool:
    """Whether a file that could not be read was meant as an image: an image or DICOM
    suffix, no suffix or a numeric one (DICOM files are often named by UID or number), or
    the DICOM preamble; ``notes.txt`` or ``report.pdf`` are not."""
    file = Path(path)
    suffix = file.suffix.lower()
    if detect_format(file) != "dicom" or suffix in _DICOM_SUFFIXES or suffix[1:].isdigit():
        return True
    try:
        with file.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return True  # cannot even be opened: reported, not skipped


def collect_studies(paths: Iterable[str | os.PathLike[str]], *,
                    pseudonymizer: Pseudonymizer | None = None) -> list[Study]:
    """Every study under ``paths`` (recursively), including rejected files as studies
    (:func:`find_studies` also says which files were skipped)."""
    return list(find_studies(paths, pseudonymizer=pseudonymizer).studies)


def find_studies(paths: Iterable[str | os.PathLike[str]], *,
                 pseudonymizer: Pseudonymizer | None = None) -> StudySearch:
    """Every study under ``paths`` (recursively), including rejected files and missing paths
    as studies; files that are plainly not images are skipped and listed.

    DICOM studies are named by a pseudonym of their Study Instance UID, keyed when a
    ``pseudonymizer`` is given.
    """
    given = [Path(p) for p in paths]
    missing = [p for p in given if not p.exists()]
    found = inventory([p for p in given if p.exists()])
    dicom: dict[str, list[SourceEntry]] = defaultdict(list)
    studies: list[Study] = []
    used: set[str] = set()

    def unique(key: str) -> str:
        candidate, n = key, 2
        while candidate in used:
            candidate, n = f"{key}-{n}", n + 1
        used.add(candidate)
        return candidate

    for entry in found.entries:
        if entry.series is not None:
            uid = str(entry.series.header.get("StudyInstanceUID") or entry.series.key)
            dicom[uid].append(entry)
        else:
            name = Path(entry.source).name
            stem = name.split(".")[0]
            studies.append(Study(key=unique(_slug(stem)), candidates=(entry,), source_name=name,
                                 paths=(entry.source,)))
    broken: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    loose: list[tuple[str, str]] = [(str(p), f"{p}: no such file or folder") for p in missing]
    skipped: list[str] = []
    for path, reason in found.rejected:
        owner = found.owners.get(path)
        if owner is not None and owner[0] in dicom:
            broken[owner[0]].append((path, reason, owner[1]))
        elif looks_like_image(path):
            loose.append((path, reason))
        else:
            skipped.append(path)
    for uid, entries in dicom.items():
        key = unique(study_key(uid, pseudonymizer))
        files = tuple(dict.fromkeys(p for e in entries if e.series for p in e.series.paths))
        files += tuple(path for path, _, _ in broken[uid])
        studies.append(Study(key=key, candidates=tuple(entries), source_name=key, paths=files,
                             unreadable=tuple(broken[uid])))
    for path, reason in loose:
        name = Path(path).name
        studies.append(Study(key=unique(_slug(name)), candidates=(), source_name=name,
                             reason=reason, paths=(path,)))
    studies.sort(key=lambda s: s.key)
    looked_at = len(found.rejected) + sum(len(e.series.paths) if e.series else 1
                                          for e in found.entries)
    return StudySearch(studies=tuple(studies), skipped=tuple(skipped), files=looked_at)


def choose_series(study: Study, pipeline: Pipeline) -> tuple[SourceEntry | None, str]:
    """The candidate the pipeline's rules prefer, or ``None`` and why none fits."""
    rules = pipeline.input
    allowed = {m.upper() for m in rules.modalities}
    fitting, seen = [], []
    for entry in study.candidates:
        if entry.series is None:
            return entry, ""
        series = entry.series
        slices = len(series.frames)
        seen.append(f"{series.modality} with {slices} frame(s)")
        if allowed and series.modality.upper() not in allowed:
            continue
        if pipeline.spatial_dims == 2 and slices != 1:
            continue
        if pipeline.spatial_dims == 3 and slices < rules.min_slices:
            continue
        fitting.append(entry)
    if not fitting:
        return None, (f"no series fits pipeline '{pipeline.name}' (needs "
                      f"{'/'.join(rules.modalities) or 'any modality'}, {pipeline.spatial_dims}D"
                      f"; found {', '.join(seen) or 'nothing'})")

    def preference(entry: SourceEntry) -> tuple[int, int]:
        series = entry.series
        assert series is not None
        view = str(series.header.get("ViewPosition", "")).upper()
        return (0 if view in ("PA", "AP") else 1, -len(series.frames))

    return sorted(fitting, key=preference)[0], ""
