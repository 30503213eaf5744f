"""`plan` on a researcher's own data must not build a broken split: a file-name prefix that
names a source or a class is not a patient key, a split that cannot keep each class on both
sides says so, and training says loudly when validation is far worse than training."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvision.config import load_pipeline
from medvision.train.data import split_items
from medvision.train.loop import _validation_warning
from medvision.train.plan import _guess_group, fingerprint

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def _brain_tumour_like(root: Path, per_source: int = 30) -> Path:
    """Four class folders whose files are numbered within two source collections per class
    (``Tr-gl_0010.jpg``, ``Tr-glTr_0000.jpg``), as in a public brain tumour MRI set."""
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for source in (f"Tr-{name[:2]}", f"Tr-{name[:2]}Tr"):
            for i in range(per_source):
                pixels = rng.integers(0, 255, (48, 48), dtype=np.uint8)
                Image.fromarray(pixels).save(root / name / f"{source}_{i:04d}.jpg")
    return root


def test_a_source_prefix_is_not_taken_for_a_patient_key(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    data = _brain_tumour_like(tmp_path / "brain")
    with caplog.at_level(logging.WARNING, logger="medvision.train.plan"):
        found, _ = fingerprint(data, sample=8)
    assert found.group_pattern is None and found.groups == 240  # a split by file instead
    assert any("8 groups for 240 files" in why for why in found.rejected_patterns)
    assert "rejected as a patient key" in caplog.text
    assert any("rejected as a patient key" in line for line in found.lines())


def test_a_plausible_patient_key_is_kept() -> None:
    names = [f"patient{p:03d}_{i}.png" for p in range(40) for i in range(3)]
    classes = ["a" if p < 20 else "b" for p in range(40) for _ in range(3)]
    pattern, groups, rejected = _guess_group(names, classes)
    assert groups == 40 and pattern is not None and not rejected
    # a key whose groups are a sixth of a class each is a source, not a patient
    names = [f"site{s}_{i:03d}.png" for s in range(12) for i in range(20)]
    classes = ["a" if s < 6 else "b" for s in range(12) for _ in range(20)]
    pattern, groups, rejected = _guess_group(names, classes)
    assert pattern is None and "holds 20 of the 120 files of class a (17%)" in rejected[-1]


def test_a_split_that_cannot_keep_the_classes_says_so(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    pipeline = load_pipeline(REPO / "pipelines" / "chest-xray-pneumonia")
    # two big groups per class: whichever goes to validation takes half the class
    items = [{"image": f"{c}{g}_{i}.png", "label": c, "group": f"{c}-{g}"}
             for c in (0, 1) for g in range(2) for i in range(25)]
    with caplog.at_level(logging.WARNING, logger="medvision.train.data"):
        split_items(pipeline, items)
    assert "cannot keep each class's share on both sides" in caplog.text
    assert "50% of its 50 items validate" in caplog.text
    caplog.clear()
    small = [{"image": f"{c}_{i}.png", "label": c, "group": f"{c}-{i}"}
             for c in (0, 1) for i in range(50)]
    with caplog.at_level(logging.WARNING, logger="medvision.train.data"):
        split_items(pipeline, small)
    assert "cannot keep" not in caplog.text  # one file per group splits fairly


def test_validation_below_chance_while_training_improves_is_loud() -> None:
    pipeline = load_pipeline(REPO / "pipelines" / "chest-xray-pneumonia")
    broken = [{"epoch": 1, "train_loss": 1.2, "val_accuracy": 0.01},
              {"epoch": 2, "train_loss": 0.6, "val_accuracy": 0.02}]
    [text] = _validation_warning(pipeline, broken)
    assert text.startswith("VALIDATION IS FAR WORSE THAN TRAINING after 2 epochs")
    sane = [{"epoch": 1, "train_loss": 1.2, "val_accuracy": 0.7},
            {"epoch": 2, "train_loss": 0.6, "val_accuracy": 0.8}]
    assert _validation_warning(pipeline, sane) == []
