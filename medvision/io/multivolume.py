"""Telling the volumes of a 4D series apart: fMRI, diffusion, perfusion, cine.

When the planes of one series repeat positions, each position holding the same number of
planes, the series holds several volumes. What separates them is read from what the vendor
records, in this order:

1. diffusion b-value and gradient direction: DICOM's (0018,9087)/(0018,9089), Siemens'
   (0019,100C)/(0019,100E) or CSA header, GE's (0043,1039)/(0019,10BB-BD), Philips'
   (2001,1003)/(2005,10B0-B2);
2. Temporal Position Identifier (0020,0100), or the enhanced objects' Temporal Position Index;
3. Acquisition Number; 4. Trigger Time; 5. Acquisition Time;
6. Instance Number order within each position (the k-th plane at every position is in
   volume k), the last resort, named as such.

A key separates the series when every volume it yields holds each position exactly once, at
the same positions as every other volume (planes that repeat within one key value, such as
several b = 0 volumes, are told apart by Instance Number order). Nothing is guessed: when no
key does, :class:`~medvision.errors.SeriesAssemblyError` names what is missing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medvision.errors import SeriesAssemblyError
from medvision.io.dicom_files import DicomFrame

__all__ = ["Separation", "diffusion_of", "repeats_positions", "separate_volumes"]

#: Acquisition keys tried after diffusion, with their names in messages.
_TIME_KEYS = ("TemporalPositionIdentifier", "TemporalPositionIndex", "AcquisitionNumber",
              "TriggerTime", "AcquisitionTime")


@dataclass(frozen=True)
class Separation:
    """Volumes of a series, each sorted along the slice normal, in acquisition order."""

    volumes: tuple[tuple[DicomFrame, ...], ...]
    separated_by: str
    kind: str
    b_values: tuple[float, ...] = ()
    gradients_lps: tuple[tuple[float, float, float], ...] = ()
    times_s: tuple[float, ...] = ()
    dropped: str | None = None


def _position(frame: DicomFrame) -> tuple[float, ...]:
    return tuple(round(v, 2) for v in frame.position) if frame.position else (frame.frame or 0,)


def repeats_positions(frames: Sequence[DicomFrame]) -> bool:
    """Whether some planes share a position (the series may hold several volumes)."""
    positions = [_position(f) for f in frames]
    return len(set(positions)) < len(positions)


def _number(value: Any) -> float | None:
    try:
        out = float(value[0] if isinstance(value, list | tuple) or (
            hasattr(value, "__len__") and not isinstance(value, str | bytes)) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return out if math.isfinite(out) else None


def _vector(values: Sequence[Any]) -> tuple[float, float, float] | None:
    try:
        vector = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return vector if len(vector) == 3 and all(map(math.isfinite, vector)) else None  # type: ignore[return-value]


def _private(ds: Any, tag: tuple[int, int]) -> Any:
    element = ds.get(tag)
    return None if element is None else element.value


def diffusion_of(ds: Any) -> tuple[float, tuple[float, float, float]] | None:
    """``(b-value, gradient in the patient (LPS) frame)`` of an instance, or ``None``.

    The gradient is zero when the header gives a b-value without a direction (b = 0, or a
    derived isotropic image).
    """
    zero = (0.0, 0.0, 0.0)
    b = _number(ds.get("DiffusionBValue"))
    if b is not None:
        g = ds.get("DiffusionGradientOrientation")
        return b, (_vector(g) if g is not None else None) or zero
    manufacturer = str(ds.get("Manufacturer") or "").upper()
    if "SIEMENS" in manufacturer:
        b = _number(_private(ds, (0x0019, 0x100C)))
        if b is None:
            b, g = _siemens_csa(ds)
        else:
            g = _vector(_private(ds, (0x0019, 0x100E)) or ())
        if b is not None:
            return b, g or zero
    if "GE" in manufacturer.split() or manufacturer.startswith("GE "):
        b = _number(_private(ds, (0x0043, 0x1039)))
        if b is not None:
            b = b % 1e9 if b >= 1e9 else b  # some versions add 10^9
            g = _vector([_number(_private(ds, (0x0019, t))) for t in (0x10BB, 0x10BC, 0x10BD)])
            return b, g or zero
    if "PHILIPS" in manufacturer:
        b = _number(_private(ds, (0x2001, 0x1003)))
        if b is not None:
            # used as given (taken to be in the patient frame); untested: every Philips
            # series here carries the standard tags read above
            raw = _vector([_number(_private(ds, (0x2005, t))) for t in (0x10B0, 0x10B1, 0x10B2)])
            return b, raw or zero
    return None


def _siemens_csa(ds: Any) -> tuple[float | None, tuple[float, float, float] | None]:
    try:
        import warnings

        from nibabel.nicom import csareader

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            csa = csareader.get_csa_header(ds, "image")
        tags = (csa or {}).get("tags", {})
        b_items = tags.get("B_value", {}).get("items") or []
        g_items = tags.get("DiffusionGradientDirection", {}).get("items") or []
    except Exception:  # noqa: BLE001 - a malformed CSA header just means "not recorded"
        return None, None
    return (_number(b_items[0]) if b_items else None), _vector(g_items) if g_items else None


def _seconds(value: Any) -> float | None:
    """An Acquisition Time (HHMMSS.ffffff) in seconds after midnight."""
    text = str(value or "").strip()
    if len(text) < 6 or not text[:6].isdigit():
        return None
    try:
        return int(text[:2]) * 3600 + int(text[2:4]) * 60 + float(text[4:])
    except ValueError:
        return None


def _instance(frame: DicomFrame) -> float:
    value = _number(frame.dataset.get("InstanceNumber"))
    return value if value is not None else math.inf


def _time_key(name: str) -> Callable[[DicomFrame], Any]:
    def key(frame: DicomFrame) -> Any:
        split = dict(frame.split_keys)
        if name in split:
            return _number(split[name])
        value = frame.dataset.get(name)
        if value is None or str(value).strip() == "":
            return None
        return _seconds(value) if name == "AcquisitionTime" else _number(value)

    return key


def _by_instance(frames: Sequence[DicomFrame]) -> list[list[DicomFrame]] | None:
    """The k-th plane (Instance Number order) at every position goes to volume k."""
    at: dict[tuple[float, ...], list[DicomFrame]] = defaultdict(list)
    for frame in frames:
        at[_position(frame)].append(frame)
    counts = {len(v) for v in at.values()}
    if len(counts) != 1:
        return None
    for members in at.values():
        numbers = [_instance(f) for f in members]
        if any(math.isinf(n) for n in numbers) or len(set(numbers)) != len(numbers):
            return None
        members.sort(key=_instance)
    return [[members[k] for members in at.values()] for k in range(counts.pop())]


def _try(frames: Sequence[DicomFrame], key: Callable[[DicomFrame], Any]
         ) -> tuple[list[tuple[Any, list[DicomFrame]]], int] | None:
    """Volumes by ``key`` (repeats within a key value split by Instance Number order), and
    how many volumes lacked slices (left out; at least half must be complete)."""
    groups: dict[Any, list[DicomFrame]] = defaultdict(list)
    for frame in frames:
        value = key(frame)
        if value is None:
            return None
        groups[value].append(frame)
    if len(groups) < 2 and not repeats_positions(frames):
        return None
    volumes: list[tuple[Any, list[DicomFrame]]] = []
    for value, members in groups.items():
        if repeats_positions(members):
            parts = _by_instance(members)
            if parts is None:
                return None
            volumes.extend((value, part) for part in parts)
        else:
            volumes.append((value, members))
    if len(volumes) < 2:
        return None
    every = sorted({_position(f) for f in frames})
    complete = [(v, part) for v, part in volumes
                if sorted(_position(f) for f in part) == every]
    if len(complete) < 1 or 2 * len(complete) < len(volumes):
        return None
    return complete, len(volumes) - len(complete)


def separate_volumes(frames: Sequence[DicomFrame], normal: np.ndarray,
                     where: str) -> Separation:
    """Split a series whose planes repeat positions into volumes (see the module notes).

    Raises:
        SeriesAssemblyError: no recorded attribute separates the volumes.
    """
    def along(frame: DicomFrame) -> float:
        return float(np.dot(frame.position, normal)) if frame.position else float(frame.frame or 0)

    diffusion = {id(f): diffusion_of(f.dataset) for f in frames}
    chosen: list[tuple[Any, list[DicomFrame]]] | None = None
    incomplete = 0
    name = ""
    kind = "time"
    if all(v is not None for v in diffusion.values()) and len(
            {diffusion[id(f)] for f in frames}) > 1:
        found = _try(frames, lambda f: diffusion[id(f)])
        if found is not None:
            (chosen, incomplete), name, kind = found, "diffusion b-value and gradient", \
                "diffusion"
    if chosen is None:
        for keyword in _TIME_KEYS:
            found = _try(frames, _time_key(keyword))
            if found is not None:
                (chosen, incomplete), name = found, keyword
                break
    if chosen is None:
        parts = _by_instance(frames)
        if parts is not None and len(parts) > 1:
            chosen, name = [(None, p) for p in parts], "InstanceNumber order"
    if chosen is None:
        counts: dict[tuple[float, ...], int] = defaultdict(int)
        for frame in frames:
            counts[_position(frame)] += 1
        raise SeriesAssemblyError(
            f"{where}: {len(frames)} planes at {len(counts)} positions "
            f"({min(counts.values())}-{max(counts.values())} per position) and nothing "
            "separates them into volumes: no diffusion b-value/gradient, Temporal Position "
            "Identifier or Index, Acquisition Number, Trigger Time or Acquisition Time that "
            "gives every volume each position once, and no distinct Instance Numbers")
    ordered = sorted(chosen, key=lambda item: (_order(item[0], kind),
                                               min(_instance(f) for f in item[1])))
    volumes = [tuple(sorted(part, key=along)) for _, part in ordered]
    dropped = (f"{incomplete} volume(s) lacking slices left out (a file missing or "
               "unreadable)" if incomplete else None)
    b_values: tuple[float, ...] = ()
    gradients: tuple[tuple[float, float, float], ...] = ()
    if kind == "diffusion":
        info = [diffusion[id(v[0])] for v in volumes]
        trace = [i for i, d in enumerate(info)
                 if d is not None and d[0] > 0 and not any(d[1])]
        directional = [i for i, d in enumerate(info) if d is not None and any(d[1])]
        if trace and directional:
            dropped = ((dropped + "; ") if dropped else "") + (f"{len(trace)} derived isotropic (trace) volume(s) with b > 0 and no "
                       "gradient direction left out, as dcm2niix does")
            keep = [i for i in range(len(volumes)) if i not in trace]
            volumes, info = [volumes[i] for i in keep], [info[i] for i in keep]
        b_values = tuple(float(d[0]) for d in info if d is not None)
        gradients = tuple(d[1] for d in info if d is not None)
    starts = [min((t for t in (_seconds(f.dataset.get("AcquisitionTime")) for f in v)
                   if t is not None), default=None) for v in volumes]
    times: tuple[float, ...] = ()
    if all(t is not None for t in starts):
        first = starts[0]
        times = tuple(round(float(t) - float(first), 4) for t in starts)  # type: ignore[arg-type]
    return Separation(volumes=tuple(volumes), separated_by=name, kind=kind, b_values=b_values,
                      gradients_lps=gradients, times_s=times, dropped=dropped)


def _order(value: Any, kind: str) -> float:
    """Sort key of a separating value: numeric time keys in their order; diffusion keys by
    acquisition (Instance Number, the tie-breaker)."""
    if kind == "diffusion" or value is None:
        return 0.0
    number = _number(value)
    return number if number is not None else 0.0
