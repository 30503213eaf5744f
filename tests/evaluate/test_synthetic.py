"""Quality, memorisation and the with/without experiment for synthetic images, on real
radiographs and real adrenal volumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from medvision.cli.main import main
from medvision.errors import ConfigError
from medvision.evaluate.augmentation import compare_predictions
from medvision.evaluate.synthetic import precision_recall

from conftest import chest_subset

REPO = Path(__file__).resolve().parents[2]


def _pipeline(tmp_path: Path, *, size: int = 32) -> Path:
    folder = tmp_path / "chest-gen"
    folder.mkdir()
    settings = yaml.safe_load((REPO / "docs" / "examples" / "synthetic-chest.yaml").read_text())
    settings["preprocess"]["size"] = [size, size]
    settings["training"].update(epochs=1, batch_size=4)
    settings["generative"] = {"size": [16, 16], "channels": [8, 16],
                              "attention_levels": [False, False], "timesteps": 50,
                              "sample_steps": 3, "batch_size": 4, "epochs": 1}
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    return folder


def test_precision_and_recall_separate_overlapping_from_disjoint_sets() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 2))
    assert precision_recall(real, real + 1e-9) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # a generator that covers one side only: precise, not diverse
    side = real[real[:, 0] > 1.0]
    precision, recall = precision_recall(real, side)
    assert precision == 1.0 and recall < 0.5


def test_paired_differences_are_zero_for_one_model_and_positive_for_a_better_one() -> None:
    rng = np.random.default_rng(1)
    labels = np.array([0] * 20 + [1] * 80)
    noisy = np.clip(labels * 0.3 + rng.uniform(0.2, 0.7, 100), 0, 1)
    weak = np.stack([1 - noisy, noisy], axis=1)
    base, _, same = compare_predictions(weak, weak, labels, scarce=0)
    assert all(same[k]["value"] == 0 for k in same)
    better = np.stack([1 - labels * 0.9 - 0.05, labels * 0.9 + 0.05], axis=1)
    _, aug, diff = compare_predictions(weak, better, labels, scarce=0)
    assert aug["scarce_recall"]["value"] == 1.0 > base["scarce_recall"]["value"]
    assert diff["scarce_recall"]["value"] > 0 and diff["scarce_recall"]["ci95"][0] > 0
    assert diff["balanced_accuracy"]["ci95"][0] <= diff["balanced_accuracy"]["value"]


def test_the_memorisation_check_flags_a_planted_copy_of_a_training_image(
        shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _pipeline(tmp_path)
    data = chest_subset(shared_data, tmp_path / "data", per_class=10)
    run, out = tmp_path / "gen", tmp_path / "synthetic"
    assert main(["synthesize", "train", str(folder), "--data", str(data), "-o", str(run),
                 "--max-steps", "2"]) == 0
    assert main(["synthesize", "sample", str(folder), "--generator", str(run), "-o", str(out),
                 "--per-class", "4"]) == 0
    trained = json.loads((run / "training_items.json").read_text())
    source = Path(next(i["image"] for i in trained if i["label"] == 0))
    planted = out / "NORMAL" / "planted.jpeg"
    shutil.copyfile(source, planted)
    broken = out / "NORMAL" / "truncated.png"  # an unreadable sample is skipped, not fatal
    broken.write_bytes(next((out / "NORMAL").glob("synthetic-*.png")).read_bytes()[:60])
    quality_dir = tmp_path / "quality"
    assert main(["synthesize", "metrics", str(folder), "--generator", str(run), "--synthetic",
                 str(out), "--data", str(data), "--features", "chest-xray-pneumonia",
                 "-o", str(quality_dir)]) == 0
    printed = capsys.readouterr().out
    quality = json.loads((quality_dir / "quality.json").read_text())
    assert quality["copies"] == [str(planted)]  # the copy, and no noise sample
    assert quality["skipped"] == [str(broken)]
    assert quality["n_synthetic"] == {"NORMAL": 5, "PNEUMONIA": 4}
    assert set(quality["memorisation"]) == {"pixels", "classifier"}
    assert quality["memorisation"]["pixels"]["copies"] == 1
    assert set(quality["distribution"]["NORMAL"]) == {"random", "classifier"}
    for m in quality["distribution"]["PNEUMONIA"].values():
        assert m["fd"] > 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    agreement = quality["distribution"]["NORMAL"]["classifier"]
    assert 0 <= agreement["agreement"] <= 1 and 0 <= agreement["agreement_real"] <= 1
    closest = [p for p in quality["pairs"] if p["space"] == "pixels"][0]
    assert closest["synthetic"] == str(planted) and closest["training"] == str(source)
    assert closest["distance"] == pytest.approx(0.0, abs=1e-6)
    page = (quality_dir / "memorisation.html").read_text()
    assert "1 likely copy of training images" in page and "planted.jpeg" in page
    marked = [row for row in page.split("<tr")[1:] if row.startswith(' class="copy"')]
    assert len(marked) == 2  # the planted image, in pixel and in classifier space, only
    assert all("planted.jpeg" in row for row in marked)
    assert page.count("data:image/png;base64,") >= 2
    from PIL import Image

    grid = Image.open(quality_dir / "samples.png")  # 2 classes x (synthetic, training) rows
    assert grid.size == (8 * 18, 4 * 18)
    assert "1 likely copies" in printed


def test_the_experiment_trains_both_arms_on_one_split_and_resumes(
        shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _pipeline(tmp_path)
    data = chest_subset(shared_data, tmp_path / "data", per_class=12)
    out = tmp_path / "experiment"
    command = ["synthesize", "experiment", str(folder), "--data", str(data), "--scarce",
               "NORMAL", "--keep-fraction", "0.5", "--audit-log", str(tmp_path / "audit.sqlite"),
               "-o", str(out)]
    assert main(command) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    counts = comparison["n_training"]
    assert counts["NORMAL"] < counts["PNEUMONIA"]
    assert comparison["n_synthetic"] == counts["PNEUMONIA"] - counts["NORMAL"]
    for key in ("scarce_recall", "balanced_accuracy", "auc"):
        for arm in ("baseline", "augmented", "difference"):
            entry = comparison[arm][key]
            assert len(entry["ci95"]) == 2 and np.isfinite(entry["value"])
    # the augmented arm trained on the same items plus the synthetic ones
    generator_items = json.loads((out / "generator" / "training_items.json").read_text())
    assert len(generator_items) == sum(counts.values())
    synthetic = sorted((out / "synthetic" / "NORMAL").glob("*.png"))
    assert len(synthetic) == comparison["n_synthetic"]
    for arm, count in (("baseline", 0), ("augmented", len(synthetic))):
        split = json.loads((out / arm / "split.json").read_text())
        assert split["synthetic_train_items"] == count
    from medvision.audit.log import AuditLog

    runs = [r for r in AuditLog(tmp_path / "audit.sqlite").records() if r["action"] == "train"]
    assert [r["inputs"].get("synthetic_items") for r in runs] == [
        None, {"train": len(synthetic), "val": 0}]
    assert "recall of NORMAL" in capsys.readouterr().out
    stamps = {p: p.stat().st_mtime_ns for p in (out / "baseline").iterdir()}
    assert main(command) == 0  # resumes: nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in (out / "baseline").iterdir()} == stamps
    assert json.loads((out / "comparison.json").read_text())["difference"] == \
        comparison["difference"]
    with pytest.raises(ConfigError, match="split.json differs"):
        main(["--debug", *command[:7], "--keep-fraction", "0.6", "-o", str(out)])


def test_a_3d_generator_samples_volumes_that_say_they_are_synthetic(
        shared_data: Path, tmp_path: Path) -> None:
    from medvision.io import read_volume

    source = np.load(shared_data / "adrenalmnist3d" / "adrenalmnist3d_64.npz")
    small = tmp_path / "adrenal.npz"
    np.savez(small, **{f"{s}_{k}": source[f"{s}_{k}"][:8] for s in ("train", "val", "test")
                       for k in ("images", "labels")})
    folder = tmp_path / "adrenal-gen"
    folder.mkdir()
    settings = yaml.safe_load((REPO / "docs" / "examples" / "synthetic-adrenal.yaml")
                              .read_text())
    settings["generative"].update(size=[8, 8, 8], channels=[8, 16],
                                  attention_levels=[False, False], timesteps=20,
                                  sample_steps=2, batch_size=2)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    run, out = tmp_path / "gen", tmp_path / "synthetic"
    assert main(["synthesize", "train", str(folder), "--data", str(small), "-o", str(run),
                 "--max-steps", "1"]) == 0
    assert main(["synthesize", "sample", str(folder), "--generator", str(run), "-o", str(out),
                 "--per-class", "2", "--classes", "hyperplasia"]) == 0
    files = sorted((out / "hyperplasia").glob("*.nii.gz"))
    assert len(files) == 2
    for path in files:
        path.with_name(path.name + ".json").unlink()  # the file's own copy is enough
        volume = read_volume(path)
        assert volume.array.shape == (1, 8, 8, 8)
        assert volume.header["synthetic"]["class"] == "hyperplasia"
    quality_dir = tmp_path / "quality"
    assert main(["synthesize", "metrics", str(folder), "--generator", str(run), "--synthetic",
                 str(out), "--data", str(small), "-o", str(quality_dir)]) == 0
    quality = json.loads((quality_dir / "quality.json").read_text())
    assert set(quality["memorisation"]) == {"pixels", "random"} and quality["copies"] == []
