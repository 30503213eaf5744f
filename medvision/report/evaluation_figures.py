"""Evaluation plots (PNG, matplotlib's Agg backend): ROC, PR, confusion, reliability, Dice."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["classification_plots", "dice_boxplot"]


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(4.5, 4), dpi=110)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _roc(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    pos = positive[order]
    tpr = np.concatenate([[0], np.cumsum(pos) / max(pos.sum(), 1)])
    fpr = np.concatenate([[0], np.cumsum(~pos) / max((~pos).sum(), 1)])
    return fpr, tpr


def classification_plots(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                         confusion: list[list[int]], out_dir: Path) -> list[Path]:
    """Write roc.png, pr.png, confusion_matrix.png and reliability.png; returns their paths."""
    paths = []
    targets = range(1, 2) if len(classes) == 2 else range(len(classes))
    fig, ax = _figure()
    for c in targets:
        fpr, tpr = _roc(probs[:, c], labels == c)
        ax.plot(fpr, tpr, label=classes[c])
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(loc="lower right")
    paths.append(_save(fig, out_dir / "roc.png"))

    fig, ax = _figure()
    for c in targets:
        order = np.argsort(-probs[:, c], kind="stable")
        hits = (labels[order] == c).astype(float)
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        recall = np.cumsum(hits) / max(hits.sum(), 1)
        ax.plot(recall, precision, label=classes[c])
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", ylim=(0, 1.02))
    ax.legend(loc="lower left")
    paths.append(_save(fig, out_dir / "pr.png"))

    fig, ax = _figure()
    matrix = np.asarray(confusion)
    ax.imshow(matrix, cmap="Blues")
    for (t, p), value in np.ndenumerate(matrix):
        ax.text(p, t, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted",
           ylabel="true", title="Confusion matrix")
    ax.set_xticklabels(classes)
    ax.set_yticklabels(classes)
    paths.append(_save(fig, out_dir / "confusion_matrix.png"))

    fig, ax = _figure()
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, 11)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, 9)
    centres, accuracy, counts = [], [], []
    for b in range(10):
        mask = index == b
        if mask.any():
            centres.append(confidence[mask].mean())
            accuracy.append(correct[mask].mean())
            counts.append(int(mask.sum()))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.plot(centres, accuracy, "o-")
    ax.set(xlabel="confidence", ylabel="accuracy", title="Reliability", xlim=(0, 1), ylim=(0, 1))
    paths.append(_save(fig, out_dir / "reliability.png"))
    return paths


def dice_boxplot(dice: np.ndarray, classes: Sequence[str], out_dir: Path) -> Path:
    """Write dice_boxplot.png: per-case Dice for each foreground class."""
    fig, ax = _figure()
    ax.boxplot([dice[:, c][np.isfinite(dice[:, c])] for c in range(dice.shape[1])])
    ax.set_xticks(range(1, len(classes) + 1))
    ax.set_xticklabels(classes)
    ax.set(ylabel="Dice", title="Dice per case", ylim=(0, 1))
    return _save(fig, out_dir / "dice_boxplot.png")
