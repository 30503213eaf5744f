"""Reading a pipeline's MODEL_CARD.md for the parts a report shows."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["card_sections"]


def card_sections(folder: str | os.PathLike[str] | None) -> dict[str, str]:
    """``summary`` (the first paragraph), ``intended_use`` and ``limitations`` (markdown)."""
    path = Path(folder) / "MODEL_CARD.md" if folder is not None else None
    if path is None or not path.is_file():
        return {"summary": "No model card found for this pipeline.", "intended_use": "",
                "limitations": ""}
    text = path.read_text()
    sections: dict[str, str] = {}
    for match in re.finditer(r"^## +(.+?)\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S):
        sections[match.group(1).strip().lower()] = match.group(2).strip()
    body = re.sub(r"^# .*$", "", text, count=1, flags=re.M).strip()
    summary = body.split("\n\n", 1)[0].strip() if body else ""
    return {"summary": summary, "intended_use": sections.get("intended use", ""),
            "limitations": sections.get("limitations", "")}
