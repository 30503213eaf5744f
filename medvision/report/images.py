"""PNG figures for reports: key slices with saliency overlays and segmentation contours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medvision.io import Volume

__all__ = ["key_images"]

_AXES = {0: "sagittal", 1: "coronal", 2: "axial"}


def _figure(width: float, height: float) -> Any:
    """A stand-alone figure (no pyplot state), so threads can draw at the same time."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120)


def _window(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def _planes(volume: Volume, focus: np.ndarray | None) -> list[tuple[str, int, int]]:
    """(name, axis, index) of the planes to show: 2D -> one; 3D -> three through ``focus``."""
    if volume.spatial_dims == 2:
        return [("image", -1, 0)]
    shape = volume.spatial_shape
    if focus is None or not np.any(focus > 0):
        centre = [s // 2 for s in shape]
    else:
        weights = np.asarray(focus, dtype=np.float64)
        grids = np.indices(shape)
        centre = [int(round((g * weights).sum() / weights.sum())) for g in grids]
    return [(_AXES[a], a, int(np.clip(centre[a], 0, shape[a] - 1))) for a in (2, 1, 0)]


def _plane(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    plane = array if axis < 0 else np.take(array, index, axis=axis)
    return plane.T  # rows for display: J (or the slower remaining axis) vertical


def key_images(volume: Volume, out_dir: Path, *, saliency: Volume | None = None,
               mask: Volume | None = None, classes: tuple[str, ...] = ()) -> list[Path]:
    """Write ``key_<plane>.png`` (the image) and ``overlay_<plane>.png`` (with saliency and
    contours) for the planes through the saliency's (or mask's) centre of mass."""
    grey = np.asarray(volume.array).mean(axis=0)
    sal = np.asarray(saliency.array[0]) if saliency is not None else None
    labels = np.asarray(mask.array[0]) if mask is not None else None
    focus = labels if labels is not None and np.any(labels > 0) else sal
    paths = []
    for name, axis, index in _planes(volume, focus):
        image = _plane(grey, axis, index)
        lo, hi = _window(grey)
        for kind in ("key", "overlay"):
            if kind == "overlay" and sal is None and labels is None:
                continue
            height, width = image.shape
            scale = 4.5 / max(height, width)
            fig = _figure(max(width * scale, 1.5), max(height * scale, 1.5))
            ax = fig.subplots()
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, origin="upper" if axis < 0
                      else "lower", interpolation="nearest")
            if kind == "overlay":
                if sal is not None:
                    heat = _plane(sal, axis, index)
                    ax.imshow(np.ma.masked_less(heat, 0.2), cmap="jet", alpha=0.45, vmin=0,
                              vmax=1, origin="upper" if axis < 0 else "lower")
                if labels is not None:
                    plane = _plane(labels, axis, index)
                    for k in range(1, int(labels.max()) + 1):
                        if np.any(plane == k):
                            ax.contour((plane == k).astype(float), levels=[0.5],
                                       colors=[f"C{k}"], linewidths=1.2,
                                       origin="upper" if axis < 0 else "lower")
            ax.set_axis_off()
            title = name if axis < 0 else f"{name} slice {index}"
            ax.set_title(title, fontsize=8)
            path = out_dir / f"{kind}_{name}.png"
            fig.tight_layout()
            fig.savefig(path)
            paths.append(path)
    return paths
