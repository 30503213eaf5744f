"""Recognising images that ``medvision synthesize`` made: a synthetic image is never a patient.

The provenance is a JSON object with ``"synthetic": true`` (generator SHA-256, seed, class,
sampler) stored twice: inside the file (a PNG text chunk, a NIfTI comment extension) and in a
``<file>.json`` sidecar. Either is enough; readers put it in ``Volume.header["synthetic"]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["EMBED_KEY", "count_synthetic", "file_provenance", "synthetic_provenance"]

#: The PNG text chunk key holding the provenance of a synthetic image.
EMBED_KEY = "medvision-synthetic"


def synthetic_provenance(path: Path, embedded: Iterable[str | bytes] = ()) -> dict[str, Any] | None:
    """The provenance of a synthetic image from texts found inside the file, else from its
    ``<file>.json`` sidecar; ``None`` for any other image."""
    texts: list[str | bytes] = [t for t in embedded if t]
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file():
        try:
            texts.append(sidecar.read_text())
        except OSError:
            pass
    for text in texts:
        try:
            found = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(found, dict) and found.get("synthetic") is True:
            return found
    return None


def file_provenance(path: str | Path) -> dict[str, Any] | None:
    """The synthetic provenance of an image file without reading its pixels: the sidecar,
    a PNG's text chunks, a NIfTI header's comment extensions; ``None`` for anything else or
    an unreadable file."""
    path = Path(path)
    found = synthetic_provenance(path)
    if found is not None:
        return found
    name = path.name.lower()
    try:
        if name.endswith(".png"):
            from PIL import Image

            with Image.open(path) as image:
                text = image.info.get(EMBED_KEY)
            return synthetic_provenance(path, [text] if isinstance(text, str) else [])
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            header: Any = nib.load(str(path)).header
            return synthetic_provenance(path, [e.get_content() for e in header.extensions
                                               if e.get_code() == 6])
    except Exception:  # noqa: BLE001 - a file that cannot be opened is not known synthetic
        return None
    return None


def count_synthetic(items: Iterable[Mapping[str, Any]]) -> int:
    """How many labelled items (``image`` paths) are synthetic images."""
    return sum(1 for item in items if isinstance(item.get("image"), str)
               and file_provenance(item["image"]) is not None)
