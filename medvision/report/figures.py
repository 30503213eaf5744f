"""Every figure medvision draws: study key images, evaluation plots, the audit drift plot.

Plots are matplotlib ``Figure`` objects on the Agg canvas, created in :func:`figure` and
nowhere else: no pyplot state and no global backend switch, so library users keep their own
backend and threads can draw at the same time. A study's key images are drawn with Pillow
(every panel the same size, fonts from matplotlib's DejaVu Sans): they are written for every
study of a batch while the networks run, and matplotlib's drawing cost more than the networks.

Key images follow the radiological convention: 3D volumes are shown in the RAS frame
(reoriented, never resampled) with the patient's right on the viewer's left; every panel
of a 3D volume carries orientation letters at its edges (from the affine); panels have square
millimetres (the aspect ratio comes from the voxel spacing), a colour bar for the saliency
and a legend naming each segmented class.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from medvision.config import DEFAULT_COLOURS
from medvision.io import Volume

__all__ = ["KeyImage", "classification_plots", "dice_boxplot", "drift_plot", "figure",
           "key_images", "png_bytes", "DEFAULT_COLOURS"]

_PLANES = {2: "axial", 1: "coronal", 0: "sagittal"}



def figure(width: float, height: float, dpi: int = 120) -> Any:
    """A stand-alone figure on the Agg canvas (the one place a backend is chosen)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


@dataclass(frozen=True, eq=False)
class KeyImage:
    """One rendered panel: file name, what it shows, and its PNG; :attr:`rgb` decodes its
    pixels (for DICOM overlays) only when asked, so a figure is drawn once."""

    name: str
    kind: str
    plane: str
    png: bytes

    @property
    def rgb(self) -> np.ndarray:
        """The panel as an ``(rows, columns, 3)`` uint8 array."""
        from PIL import Image

        with Image.open(io.BytesIO(self.png)) as image:
            return np.asarray(image.convert("RGB")).copy()

    def save(self, folder: Path) -> Path:
        """Write the PNG into ``folder``."""
        path = folder / self.name
        path.write_bytes(self.png)
        return path


_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # RAS+: the letter a positive step points to


def _letter(direction: np.ndarray) -> str:
    """Patient direction of a world (RAS) vector: its dominant axis, plus a second letter
    when the vector is oblique (another component above 40% of the largest)."""
    v = np.asarray(direction, dtype=float)
    if not np.any(v):
        return ""
    order = np.argsort(-np.abs(v))
    letters = _LETTERS[order[0]][int(v[order[0]] > 0)]
    if abs(v[order[1]]) > 0.4 * abs(v[order[0]]):
        letters += _LETTERS[order[1]][int(v[order[1]] > 0)]
    return letters


@dataclass(frozen=True)
class _View:
    """A 2D display of one plane: ``rows`` top to bottom, ``columns`` left to right."""

    name: str
    axis: int
    index: int
    right: np.ndarray  # world direction of one column step to the right
    down: np.ndarray  # world direction of one row step down
    aspect: float  # row height / column width, in mm


def _canonical(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` reoriented to RAS by axis flips and permutations only."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(volume.affine)
    array = np.asarray(volume.array)
    out = np.stack([nib.orientations.apply_orientation(c, ornt) for c in array])
    shape = array.shape[1:]
    affine = volume.affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    return out, affine


def _views(shape: Sequence[int], affine: np.ndarray, focus: np.ndarray | None,
           spatial_dims: int) -> list[_View]:
    columns = affine[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if spatial_dims == 2:
        return [_View("image", -1, 0, right=columns[:, 0], down=columns[:, 1],
                      aspect=float(spacing[1] / spacing[0]))]
    if focus is None or not np.any(focus > 0):
        centre = [s // 2 for s in shape]
    else:
        weights = np.asarray(focus, dtype=np.float64)
        centre = [int(round((g * weights).sum() / weights.sum())) for g in np.indices(shape)]
    views = []
    for axis in (2, 1, 0):
        first, second = [a for a in range(3) if a != axis]
        # shown as plane.T flipped both ways: the first remaining axis runs right to left
        # (patient right on the viewer's left), the second bottom to top
        views.append(_View(_PLANES[axis], axis, int(np.clip(centre[axis], 0, shape[axis] - 1)),
                           right=-columns[:, first], down=-columns[:, second],
                           aspect=float(spacing[second] / spacing[first])))
    return views


def _display(array: np.ndarray, view: _View) -> np.ndarray:
    if view.axis < 0:
        return array.T
    return np.take(array, view.index, axis=view.axis).T[::-1, ::-1]


def _window(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def _annotate(ax: Any, view: _View, letters: bool) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if not letters:
        return
    style = {"color": "yellow", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.99, 0.5, _letter(view.right), ha="right", va="center", **style)
    ax.text(0.01, 0.5, _letter(-view.right), ha="left", va="center", **style)
    ax.text(0.5, 0.01, _letter(view.down), ha="center", va="bottom", **style)
    ax.text(0.5, 0.99, _letter(-view.down), ha="center", va="top", **style)


_PANEL = 400  # px: the longest side of every key image's picture
_MARGIN, _TITLE, _BAND = 12, 30, 64  # px: side margins, title bar, caption band
_HIDDEN = 0.2  # saliency below this is not drawn over the image (docs/report.md)


@lru_cache(maxsize=4)
def _font(size: int) -> Any:
    """DejaVu Sans (shipped with matplotlib) at ``size`` px; PIL's own font without it."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" /
                                      "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size)


@lru_cache(maxsize=1)
def _jet() -> np.ndarray:
    """The saliency colour map as a ``(256, 3)`` uint8 table."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def _resized(plane: np.ndarray, size: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """``plane`` resampled to ``size`` (width, height): smooth (bilinear up, box-averaged
    down) for intensities and maps, nearest for labels."""
    from PIL import Image

    if nearest:
        return np.asarray(Image.fromarray(plane.astype(np.uint8)).resize(
            size, Image.Resampling.NEAREST))
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    shrinking = size[0] < plane.shape[1] or size[1] < plane.shape[0]
    return np.asarray(image.resize(size, Image.Resampling.BOX if shrinking
                                   else Image.Resampling.BILINEAR))


def _outline(labels: np.ndarray, k: int) -> np.ndarray:
    """The pixels of label ``k`` that touch another label, grown to a two-pixel line."""
    inside = labels == k
    edge = np.zeros_like(inside)
    edge[1:, :] |= inside[1:, :] & ~inside[:-1, :]
    edge[:-1, :] |= inside[:-1, :] & ~inside[1:, :]
    edge[:, 1:] |= inside[:, 1:] & ~inside[:, :-1]
    edge[:, :-1] |= inside[:, :-1] & ~inside[:, 1:]
    edge[1:, :] |= edge[:-1, :].copy()
    edge[:, 1:] |= edge[:, :-1].copy()
    return edge


_OPPOSITE = str.maketrans("LRAPHF", "RLPAFH")


def _patient_orientation(volume: Volume) -> tuple[str, str, str, str] | None:
    """A 2D DICOM image's edge letters (right, left, bottom, top) from its Patient
    Orientation (0020,0020): the patient directions of its rows and of its columns
    (``L\\F``: the right edge is the patient's left, the bottom edge the feet)."""
    value = volume.header.get("PatientOrientation")
    parts = [str(p).strip().upper() for p in value] if isinstance(value, list | tuple) \
        else str(value or "").replace("\\", " ").split()
    if len(parts) != 2 or not all(p and set(p) <= set("LRAPHF") for p in parts):
        return None
    row, column = parts
    return row, row.translate(_OPPOSITE), column, column.translate(_OPPOSITE)


def _panel(picture: np.ndarray, title: str, view: _View, letters: bool,
           caption: Sequence[tuple[str, tuple[int, int, int] | None]],
           colour_bar: str | None,
           edges: tuple[str, str, str, str] | None = None) -> bytes:
    """One key image: ``picture`` (rows, columns, 3) centred in a square of ``_PANEL`` px
    under a title, orientation letters at its edges (3D from the affine; 2D DICOM from
    ``edges``: right, left, bottom, top), and a caption band below (a colour bar with its
    scale, and coloured legend entries); every panel has the same size."""
    import io as _io

    from PIL import Image, ImageDraw

    width, height = _PANEL + 2 * _MARGIN, _TITLE + _PANEL + _BAND
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    box = Image.new("RGB", (_PANEL, _PANEL), (0, 0, 0))
    left, top = (_PANEL - picture.shape[1]) // 2, (_PANEL - picture.shape[0]) // 2
    box.paste(Image.fromarray(picture), (left, top))
    canvas.paste(box, (_MARGIN, _TITLE))
    draw.text((width // 2, _TITLE // 2), title, fill=(20, 20, 20), font=_font(16), anchor="mm")
    if letters:
        x0, y0 = _MARGIN + left, _TITLE + top
        x1, y1 = x0 + picture.shape[1], y0 + picture.shape[0]
        style = {"fill": (255, 230, 0), "font": _font(16), "stroke_width": 2,
                 "stroke_fill": (0, 0, 0)}
        right, left, bottom, top = edges or (_letter(view.right), _letter(-view.right),
                                             _letter(view.down), _letter(-view.down))
        draw.text((x1 - 4, (y0 + y1) // 2), right, anchor="rm", **style)
        draw.text((x0 + 4, (y0 + y1) // 2), left, anchor="lm", **style)
        draw.text(((x0 + x1) // 2, y1 - 4), bottom, anchor="mb", **style)
        draw.text(((x0 + x1) // 2, y0 + 4), top, anchor="mt", **style)
    y = _TITLE + _PANEL + 8
    x = _MARGIN
    if colour_bar is not None:
        bar_width = 200
        ramp = np.repeat(_jet()[np.linspace(0, 255, bar_width).astype(int)][np.newaxis], 12, 0)
        canvas.paste(Image.fromarray(ramp), (x, y))
        draw.rectangle((x, y, x + bar_width - 1, y + 11), outline=(80, 80, 80))
        for value in (0.0, _HIDDEN, 0.5, 1.0):
            tick = x + round(value * (bar_width - 1))
            draw.line((tick, y + 12, tick, y + 16), fill=(80, 80, 80))
            draw.text((tick, y + 17), f"{value:g}", fill=(20, 20, 20), font=_font(12),
                      anchor="mt")
        for line, text in enumerate(colour_bar.split("\n")):
            draw.text((x + bar_width + 10, y + 6 + 16 * line), text, fill=(20, 20, 20),
                      font=_font(13), anchor="lm")
        y += 36
    for text, colour in caption:
        if colour is not None:
            draw.rectangle((x, y + 2, x + 12, y + 14), fill=colour, outline=(40, 40, 40))
            x += 18
        draw.text((x, y + 8), text, fill=(20, 20, 20), font=_font(13), anchor="lm")
        x += int(draw.textlength(text, font=_font(13))) + 16
    buffer = _io.BytesIO()
    canvas.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def key_images(volume: Volume, *, saliency: Volume | None = None, mask: Volume | None = None,
               classes: Sequence[str] = (),
               colours: Mapping[str, tuple[int, int, int]] | None = None,
               saliency_label: str = "saliency") -> list[KeyImage]:
    """``key_<plane>.png`` (the image) and ``overlay_<plane>.png`` (the saliency heat map,
    then the mask filled per class with its outline on top) through the mask's, else the
    saliency's, centre of mass; every panel the same size, in millimetre proportions.

    Drawn with Pillow, not matplotlib: a study's figures are written while the next batch is
    analysed, and matplotlib's drawing cost more than the networks' share of a study.
    ``colours`` gives each class its RGB colour (the same as the label sidecar's).
    """
    spatial = volume.spatial_dims
    if spatial == 3:
        grey_all, affine = _canonical(volume)
        sal_all = _canonical(saliency)[0] if saliency is not None else None
        lab_all = _canonical(mask)[0] if mask is not None else None
    else:
        grey_all, affine = np.asarray(volume.array), volume.affine
        sal_all = np.asarray(saliency.array) if saliency is not None else None
        lab_all = np.asarray(mask.array) if mask is not None else None
    grey = grey_all.mean(axis=0)
    # a colour picture (a blood smear, a photograph) is shown in colour, not as grey
    rgb_planes = grey_all if spatial == 2 and grey_all.shape[0] == 3 else None
    sal = sal_all[0] if sal_all is not None else None
    labels = np.rint(lab_all[0]).astype(int) if lab_all is not None else None
    focus = labels if labels is not None and np.any(labels > 0) else sal
    # 3D volumes have a patient frame; a 2D DICOM image's letters come from its Patient
    # Orientation (0020,0020: the directions of its rows and columns); a picture has none
    edges = _patient_orientation(volume) if spatial == 2 else None
    letters = spatial == 3 or edges is not None
    lo, hi = _window(grey)
    palette: list[tuple[int, int, int]] = [
        (round(rgb[0] * 255), round(rgb[1] * 255), round(rgb[2] * 255))
        for rgb in _palette(classes, colours)]
    images = []
    for view in _views(grey.shape, affine, focus, spatial):
        plane = _display(grey, view)
        rows_mm, columns_mm = plane.shape[0] * view.aspect, plane.shape[1]
        scale = _PANEL / max(rows_mm, columns_mm)
        size = (max(1, round(columns_mm * scale)), max(1, round(rows_mm * scale)))
        if rgb_planes is not None:
            low, high = float(rgb_planes.min()), float(rgb_planes.max())
            if low >= 0 and high <= 255:  # 8-bit colour: shown as it is, not stretched
                low, high = 0.0, 255.0
            high = high if high > low else low + 1
            channels = [np.clip((_resized(_display(c, view), size) - low) / (high - low), 0, 1)
                        for c in rgb_planes]
            base = (np.stack(channels, axis=-1) * 255).round().astype(np.uint8)
            window = "colour as stored" if (low, high) == (0.0, 255.0) else \
                f"colour, values {low:.4g} to {high:.4g}"
        else:
            shown = np.clip((_resized(plane, size) - lo) / (hi - lo), 0, 1)
            base = np.repeat((shown * 255).round().astype(np.uint8)[..., np.newaxis], 3, axis=2)
            window = f"grey window {lo:.4g} to {hi:.4g}"
        where = "" if view.axis < 0 else f"{view.name}, slice {view.index}: "
        images.append(KeyImage(name=f"key_{view.name}.png", kind="key", plane=view.name,
                               png=_panel(base, f"{where}input image", view, letters,
                                          [(window, None)], None, edges=edges)))
        if sal is None and labels is None:
            continue
        picture = base.astype(np.float32)
        shows, caption, bar = [], [], None
        if sal is not None:
            heat = np.clip(_resized(_display(sal, view), size), 0, 1)
            alpha = np.where(heat >= _HIDDEN, 0.45, 0.0)[..., np.newaxis]
            colour = _jet()[(heat * 255).round().astype(int)].astype(np.float32)
            picture = picture * (1 - alpha) + colour * alpha
            shows.append(saliency_label)
            bar = f"{saliency_label}\n0 to 1; below {_HIDDEN:g} not drawn"
        if labels is not None:
            plane_labels = _resized(_display(labels, view), size, nearest=True)
            present = [k for k in range(1, int(plane_labels.max()) + 1)
                       if np.any(plane_labels == k)]
            for k in present:
                rgb = np.asarray(palette[k % len(palette)], dtype=np.float32)
                inside = (plane_labels == k)[..., np.newaxis]
                picture = np.where(inside, picture * 0.7 + rgb * 0.3, picture)
            for k in present:
                picture[_outline(plane_labels, k)] = palette[k % len(palette)]
                caption.append((_name(classes, k), palette[k % len(palette)]))
            shows.append("mask" if present else "mask (empty here)")
        images.append(KeyImage(
            name=f"overlay_{view.name}.png", kind="overlay", plane=view.name,
            png=_panel(picture.round().clip(0, 255).astype(np.uint8),
                       f"{where}{' + '.join(shows)}", view, letters, caption, bar)))
    return images


def _name(classes: Sequence[str], index: int) -> str:
    return classes[index] if index < len(classes) else f"label {index}"


def _palette(classes: Sequence[str],
             colours: Mapping[str, tuple[int, int, int]] | None) -> list[tuple[float, ...]]:
    """RGB 0-1 per label index (index 0: background)."""
    count = max(len(classes), 2)
    out = []
    for k in range(count):
        rgb = (colours or {}).get(_name(classes, k)) or DEFAULT_COLOURS[k % len(DEFAULT_COLOURS)]
        out.append(tuple(c / 255 for c in rgb))
    return out


# --- evaluation ---------------------------------------------------------------------------


def _plot() -> tuple[Any, Any]:
    fig = figure(4.5, 4, dpi=110)
    return fig, fig.add_subplot()


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def _roc(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    pos = positive[order]
    tpr = np.concatenate([[0], np.cumsum(pos) / max(pos.sum(), 1)])
    fpr = np.concatenate([[0], np.cumsum(~pos) / max((~pos).sum(), 1)])
    return fpr, tpr


def classification_plots(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                         confusion: list[list[int]], out_dir: Path, *,
                         auc: Mapping[str, float] | None = None) -> list[Path]:
    """Write roc.png (with each curve's AUC), pr.png, confusion_matrix.png (counts) and
    reliability.png; returns their paths. ``auc``: the AUC per class, as reported."""
    paths = []
    targets = range(1, 2) if len(classes) == 2 else range(len(classes))
    fig, ax = _plot()
    for c in targets:
        fpr, tpr = _roc(probs[:, c], labels == c)
        value = (auc or {}).get(classes[c])
        ax.plot(fpr, tpr, label=f"{classes[c]} (AUC {value:.3f})" if value is not None
                else classes[c])
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    paths.append(_save(fig, out_dir / "roc.png"))

    fig, ax = _plot()
    for c in targets:
        order = np.argsort(-probs[:, c], kind="stable")
        hits = (labels[order] == c).astype(float)
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        recall = np.cumsum(hits) / max(hits.sum(), 1)
        ax.plot(recall, precision, label=classes[c])
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall",
           ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    paths.append(_save(fig, out_dir / "pr.png"))

    fig, ax = _plot()
    matrix = np.asarray(confusion)
    ax.imshow(matrix, cmap="Blues")
    for (t, p), value in np.ndenumerate(matrix):
        ax.text(p, t, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted class",
           ylabel="true class", title="Confusion matrix (cases)")
    ax.set_xticklabels(classes)
    ax.set_yticklabels(classes)
    paths.append(_save(fig, out_dir / "confusion_matrix.png"))

    fig, ax = _plot()
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, 11)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, 9)
    centres, accuracy = [], []
    for b in range(10):
        chosen = index == b
        if chosen.any():
            centres.append(confidence[chosen].mean())
            accuracy.append(correct[chosen].mean())
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
    ax.plot(centres, accuracy, "o-", label="model")
    ax.set(xlabel="predicted probability of the top class", ylabel="observed accuracy",
           title="Reliability", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    paths.append(_save(fig, out_dir / "reliability.png"))
    return paths


def dice_boxplot(dice: np.ndarray, classes: Sequence[str], out_dir: Path) -> Path:
    """Write dice_boxplot.png: per-case Dice for each foreground class."""
    fig, ax = _plot()
    ax.boxplot([dice[:, c][np.isfinite(dice[:, c])] for c in range(dice.shape[1])])
    ax.set_xticks(range(1, len(classes) + 1))
    ax.set_xticklabels(classes)
    ax.set(ylabel="Dice (0-1)", title="Dice per case", ylim=(0, 1))
    return _save(fig, out_dir / "dice_boxplot.png")


def volume_agreement(predicted: np.ndarray, truth: np.ndarray, classes: Sequence[str],
                     out_dir: Path) -> Path:
    """Write volumes.png: predicted against reference volume per case and class, in mL."""
    fig, ax = _plot()
    top = float(max(np.nanmax(predicted, initial=0), np.nanmax(truth, initial=0), 1e-3)) * 1.05
    for c, name in enumerate(classes):
        ax.plot(truth[:, c], predicted[:, c], "o", ms=3, label=name)
    ax.plot([0, top], [0, top], "k:", lw=0.8)
    ax.set(xlabel="reference volume (mL)", ylabel="predicted volume (mL)",
           title="Volumes per case", xlim=(0, top), ylim=(0, top))
    ax.legend(fontsize=8)
    return _save(fig, out_dir / "volumes.png")


# --- audit --------------------------------------------------------------------------------


def drift_plot(rates: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> bytes:
    """PNG of the positive-finding rate per day and model version; the time axis spans the
    records' days (one day either side), with day ticks."""
    from matplotlib.dates import AutoDateLocator, DateFormatter, date2num

    fig = figure(7, 3.2, dpi=100)
    ax = fig.add_subplot()
    days: list[date] = []
    for model, per_day in rates.items():
        dates = [datetime.fromisoformat(d).date() for d in per_day]
        days.extend(dates)
        ax.plot([date2num(d) for d in dates], [v["rate"] for v in per_day.values()], "o-",
                label=model)
    if days:
        ax.set_xlim(date2num(min(days) - timedelta(days=1)),
                    date2num(max(days) + timedelta(days=1)))
    locator = AutoDateLocator(minticks=2, maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(DateFormatter("%Y-%m-%d"))
    ax.set(ylabel="positive-finding rate", ylim=(0, 1), xlabel="day (UTC)",
           title="Positive findings per model version")
    if rates:
        ax.legend(fontsize=7)
    fig.autofmt_xdate()
    fig.tight_layout()
    return png_bytes(fig)


# --- detection ----------------------------------------------------------------------------


def _rgb_image(volume_array: np.ndarray) -> np.ndarray:
    """A ``(C, I, J)`` image as ``(rows, columns, 3)`` in [0, 1] for display."""
    array = np.asarray(volume_array, dtype=np.float32)
    image = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array[:3]
    image = np.transpose(image, (2, 1, 0))  # rows = J, columns = I
    lo, hi = np.percentile(image, [0.5, 99.5])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)


def box_figure(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
               classes: Sequence[str], colours: Mapping[str, tuple[int, int, int]], *,
               scores: np.ndarray | None = None, truth: np.ndarray | None = None,
               title: str = "") -> Any:
    """An image (``(C, I, J)``) with predicted boxes (solid, labelled with class and score)
    and, when given, true boxes (dashed white); a legend names the classes."""
    from matplotlib.patches import Patch, Rectangle

    shown = _rgb_image(image)
    height, width = shown.shape[:2]
    scale = 6.0 / max(height, width)
    fig = figure(width * scale + 0.2, height * scale + 0.5)
    ax = fig.add_subplot()
    ax.imshow(shown, interpolation="nearest")
    if truth is not None:
        for x1, y1, x2, y2 in np.asarray(truth).reshape(-1, 4):
            ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False,
                                   edgecolor="white", linestyle="--", linewidth=0.8))
    for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes).reshape(-1, 4)):
        name = classes[int(labels[k])]
        colour = tuple(c / 255 for c in colours.get(name, DEFAULT_COLOURS[1]))
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False,
                               edgecolor=colour, linewidth=1.2))
        if scores is not None:
            ax.text(x1, y1 - 1, f"{name} {scores[k]:.2f}", color=colour, fontsize=5,
                    va="bottom")
    handles = [Patch(color=tuple(c / 255 for c in colours.get(n, DEFAULT_COLOURS[1])),  # type: ignore[arg-type]
                     label=n) for n in classes]
    if truth is not None:
        handles.append(Patch(facecolor="none", edgecolor="white", linestyle="--",
                             label="reference"))
    ax.legend(handles=handles, loc="lower right", fontsize=6, framealpha=0.7)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def box_examples(images: Sequence[np.ndarray], items: Sequence[Mapping[str, Any]],
                 predictions: Sequence[Mapping[str, Any]], classes: Sequence[str],
                 colours: Mapping[str, tuple[int, int, int]], out_dir: Path, *,
                 min_score: float = 0.5) -> list[Path]:
    """``example_<n>.png``: each image (``(C, I, J)``) with its predicted (score >=
    ``min_score``) against its true boxes."""
    paths = []
    for n, (image, item, found) in enumerate(zip(images, items, predictions, strict=False)):
        keep = np.asarray(found["scores"]) >= min_score
        fig = box_figure(np.asarray(image),
                         np.asarray(found["boxes"])[keep], np.asarray(found["labels"])[keep],
                         classes, colours, scores=np.asarray(found["scores"])[keep],
                         truth=np.asarray(item["boxes"]), title=Path(str(item["image"])).name)
        paths.append(_save(fig, out_dir / f"example_{n}.png"))
    return paths


def detection_pr_curves(predictions: Sequence[Mapping[str, Any]],
                        truths: Sequence[Mapping[str, Any]], classes: Sequence[str],
                        out_dir: Path, *, ap: Mapping[str, float] | None = None) -> Path:
    """``pr.png``: precision against recall per class at IoU 0.5 (greedy matching by score)."""
    from medvision.metrics import match_detections

    fig, ax = _plot()
    matches = [match_detections(f, t) for f, t in zip(predictions, truths, strict=True)]
    for c, name in enumerate(classes):
        positives = int(sum((np.asarray(t["labels"]) == c).sum() for t in truths))
        scored = [(float(s), float(h)) for scores, labels, hits in matches
                  for s, lab, h in zip(scores, labels, hits, strict=True) if lab == c]
        if not positives:
            continue
        scored.sort(key=lambda s: -s[0])
        hits = np.array([h for _, h in scored], dtype=float)
        recall = np.cumsum(hits) / positives
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        value = (ap or {}).get(name)
        ax.plot(recall, precision, label=f"{name} (AP@0.5 {value:.3f})" if value is not None
                else name)
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)",
           title="Precision-recall at IoU 0.5", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, out_dir / "pr.png")
