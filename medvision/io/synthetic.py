"""Recognising images that ``medvision synthesize`` made: a synthetic image is never a patient.

The provenance is a JSON object with ``"synthetic": true`` (generator SHA-256, seed, class,
sampler) stored twice: inside the file (a PNG text chunk, a NIfTI comment extension) and in a
``<file>.json`` sidecar. Either is enough; readers put it in ``Volume.header["synthetic"]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["EMBED_KEY", "synthetic_provenance"]

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
