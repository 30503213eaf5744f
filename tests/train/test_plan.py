"""`medvision plan` on each layout (class folders, images/labels, VOC boxes) of real data,
then a short training from the planned file."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml

from medvision.cli.main import main
from medvision.config import load_pipeline
from medvision.errors import ConfigError
from medvision.train.plan import fingerprint
from medvision.train.precision import bfloat16_native

from conftest import chest_subset


def _hippocampus(shared_data: Path, root: Path, cases: int = 6) -> Path:
    for part in ("images", "labels"):
        (root / part).mkdir(parents=True)
    for path in sorted((shared_data / "hippocampus" / "images").glob("*.nii.gz"))[:cases]:
        (root / "images" / path.name).symlink_to(path)
        (root / "labels" / path.name).symlink_to(shared_data / "hippocampus" / "labels" / path.name)
    return root


def _bccd(shared_data: Path, root: Path, images: int = 6) -> Path:
    source = shared_data / "bccd" / "trainval"
    for part in ("Annotations", "JPEGImages"):
        (root / part).mkdir(parents=True)
    for xml in sorted((source / "Annotations").glob("*.xml"))[:images]:
        (root / "Annotations" / xml.name).symlink_to(xml)
        image = source / "JPEGImages" / (xml.stem + ".jpg")
        (root / "JPEGImages" / image.name).symlink_to(image)
    return root


# the detection layout trains for a minute: in the slow run (detection trains in test_detection)
@pytest.mark.parametrize("layout", ["class_folders", "image_label_folders",
                                    pytest.param("voc", marks=pytest.mark.slow)])
def test_plan_then_train(layout: str, shared_data: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    data = {"class_folders": chest_subset, "image_label_folders": _hippocampus,
            "voc": _bccd}[layout](shared_data, tmp_path / "data")
    folder = tmp_path / "planned"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracked = layout == "class_folders" and importlib.util.find_spec("mlflow") is not None
    assert main(["plan", str(data), "--budget-minutes", "2", "-o", str(folder),
                 *(["--tracking", store] if tracked else [])]) == 0
    assert "wrote" in capsys.readouterr().out
    if tracked:  # the plan on record: its settings, the data's fingerprint, its timings
        from mlflow.tracking import MlflowClient

        client = MlflowClient(store)
        experiment = client.get_experiment_by_name("planned")
        [run] = client.search_runs([experiment.experiment_id])
        planned = yaml.safe_load((folder / "pipeline.yaml").read_text())
        assert run.data.params["training.epochs"] == str(planned["training"]["epochs"])
        assert run.data.tags["medvision.kind"] == "plan"
        assert run.data.tags["medvision.data.layout"] == "class_folders"
        assert run.data.metrics["timing.epoch_estimate"] > 0
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["pipeline.yaml"]
    text = (folder / "pipeline.yaml").read_text()
    assert "# Fingerprint:" in text and "# Timing run on this machine" in text
    assert "# Reasoning:" in text and "epoch(s) fit 85% of 2 minutes" in text
    pipeline = load_pipeline(folder)
    assert pipeline.name == "planned" and pipeline.data.layout == layout
    assert pipeline.training.epochs >= 1
    expected = {"class_folders": ("NORMAL", "PNEUMONIA"),
                "image_label_folders": ("background", "label1", "label2"),
                "voc": ("Platelets", "RBC", "WBC")}[layout]
    assert pipeline.classes == expected
    if layout == "class_folders":
        assert pipeline.data.group_pattern is not None  # person123_..., IM-0001-...
        assert pipeline.in_channels == 1 and pipeline.spatial_dims == 2
    if layout == "image_label_folders":
        assert pipeline.spatial_dims == 3
        assert all(s % 16 == 0 for s in pipeline.preprocess.size)
    if layout == "voc":
        assert pipeline.in_channels == 3 and pipeline.task == "detection"
        assert pipeline.training.precision == "float32"
    elif bfloat16_native():  # the steps were timed both ways; the reason names the choice
        assert f"#   - training steps in {pipeline.training.precision}: bfloat16 steps " \
            "took" in text
    else:
        assert pipeline.training.precision == "float32"
    run = tmp_path / "run"
    assert main(["train", str(folder), "--data", str(data), "-o", str(run),
                 "--epochs", "1"]) == 0
    assert (run / "best.safetensors").is_file()


def test_fingerprint_reports_duplicates_and_refuses_a_wrong_task(shared_data: Path,
                                                                 tmp_path: Path) -> None:
    data = chest_subset(shared_data, tmp_path / "data", per_class=4)
    first = sorted((data / "NORMAL").iterdir())[0]
    shutil.copyfile(first.resolve(), data / "PNEUMONIA" / ("copy-" + first.name))
    found, items = fingerprint(data)
    assert found.duplicates == {"across classes (contradictory labels)": 1}
    assert found.counts == {"NORMAL": 4, "PNEUMONIA": 5} and len(items) == 9
    assert any("duplicate" in line for line in found.lines())
    with pytest.raises(ConfigError, match="class_folders layout is for classification"):
        fingerprint(data, task="segmentation")


def test_a_budget_too_small_for_one_epoch_says_so(shared_data: Path, tmp_path: Path) -> None:
    data = _hippocampus(shared_data, tmp_path / "data", cases=4)
    with pytest.raises(ConfigError, match="does not fit one epoch"):
        main(["--debug", "plan", str(data), "--budget-minutes", "0.001", "-o",
              str(tmp_path / "p.yaml")])
    assert not (tmp_path / "p.yaml").exists()
