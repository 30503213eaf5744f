"""Pipeline files: validation, closest-key suggestions, name resolution, hashing."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from medvision.config import config_hash, load_pipeline
from medvision.errors import ConfigError

MINIMAL = {
    "name": "t", "task": "classification", "spatial_dims": 2, "classes": ["a", "b"],
    "data": {"layout": "class_folders"}, "model": {"name": "resnet10"},
}


def _write(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_shipped_pipeline_loads_by_name() -> None:
    pipeline = load_pipeline("chest-xray-pneumonia")
    assert pipeline.task == "classification" and pipeline.classes == ("NORMAL", "PNEUMONIA")
    assert pipeline.validation_metric == "loss"  # set in the file: AUC saturates early here


def test_unknown_key_names_the_closest_valid_one(tmp_path: Path) -> None:
    bad = {**MINIMAL, "trainig": {"epochs": 3}}
    with pytest.raises(ConfigError, match=r"unknown key 'trainig'; did you mean 'training'"):
        load_pipeline(_write(tmp_path, bad))
    nested = {**MINIMAL, "training": {"epoch": 3}}
    with pytest.raises(ConfigError, match=r"'training.epoch'; did you mean 'epochs'"):
        load_pipeline(_write(tmp_path, nested))


def test_inconsistent_values_are_errors(tmp_path: Path) -> None:
    bad = {**MINIMAL, "preprocess": {"size": [64, 64, 64]}}
    with pytest.raises(ConfigError, match="preprocess.size has 3 values"):
        load_pipeline(_write(tmp_path, bad))
    with pytest.raises(ConfigError, match="task"):
        load_pipeline(_write(tmp_path, {**MINIMAL, "task": "detection"}))


def test_missing_pipeline_lists_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="chest-xray-pneumonia"):
        load_pipeline("no-such-pipeline")


def test_config_is_frozen_and_hash_is_stable(tmp_path: Path) -> None:
    one = load_pipeline(_write(tmp_path, MINIMAL))
    two = load_pipeline(_write(tmp_path, MINIMAL))
    assert config_hash(one) == config_hash(two)
    changed = load_pipeline(_write(tmp_path, {**MINIMAL, "training": {"epochs": 2}}))
    assert config_hash(changed) != config_hash(one)
    with pytest.raises(pydantic.ValidationError):
        one.name = "x"  # type: ignore[misc]
