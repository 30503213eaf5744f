"""Label sidecars for a segmentation mask, so viewers show names and colours.

Beside ``mask.nii.gz``:

* ``mask.labels.json``: each label's value, name, code (scheme, value, meaning) and RGB colour;
* ``mask.ctbl``: a 3D Slicer colour table (``index name R G B A``; load it with the mask and
  choose it as the label map's colour node);
* ``mask.itksnap.txt``: an ITK-SNAP label description file (Segmentation > Import Label
  Descriptions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medvision.config import Pipeline

__all__ = ["label_table", "write_label_sidecars"]

PRIVATE_SCHEME = "99MEDVISION"


def label_table(pipeline: Pipeline) -> list[dict[str, Any]]:
    """One entry per label value (0 is the background)."""
    rows = []
    for index, name in enumerate(pipeline.classes):
        declared = pipeline.report.classes.get(name)
        code = declared.code if declared is not None else None
        rows.append({"value": index, "name": name,
                     "code": {"scheme": code.scheme, "value": code.value,
                              "meaning": code.meaning} if code is not None else
                     {"scheme": PRIVATE_SCHEME, "value": name[:16], "meaning": name},
                     "colour": list(pipeline.report.colour(name, index))})
    return rows


def _safe(name: str) -> str:
    """A name without spaces (both colour-table formats split on whitespace)."""
    return "_".join(name.split()) or "unnamed"


def write_label_sidecars(pipeline: Pipeline, folder: Path, stem: str) -> dict[str, str]:
    """Write the three sidecars of ``<stem>.nii.gz``; returns their file names by role."""
    rows = label_table(pipeline)
    labels = folder / f"{stem}.labels.json"
    labels.write_text(json.dumps({"pipeline": pipeline.name, "labels": rows}, indent=2))
    slicer = folder / f"{stem}.ctbl"
    lines = ["# Color table file " + slicer.name, f"# {len(rows)} values"]
    lines += [f"{r['value']} {_safe(r['name'])} {r['colour'][0]} {r['colour'][1]} "
              f"{r['colour'][2]} {0 if r['value'] == 0 else 255}" for r in rows]
    slicer.write_text("\n".join(lines) + "\n")
    snap = folder / f"{stem}.itksnap.txt"
    lines = ["# ITK-SNAP Label Description File",
             "#    IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL"]
    lines += [f"{r['value']:>8} {r['colour'][0]:>5} {r['colour'][1]:>4} {r['colour'][2]:>4} "
              f"{0 if r['value'] == 0 else 1:>8} {0 if r['value'] == 0 else 1:>2} "
              f"{0 if r['value'] == 0 else 1:>2}    \"{r['name']}\"" for r in rows]
    snap.write_text("\n".join(lines) + "\n")
    return {"labels_json": labels.name, "labels_slicer": slicer.name,
            "labels_itksnap": snap.name}
