"""Pipeline files: validation, closest-key suggestions, name resolution, hashing."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from medvision.config import config_hash, load_pipeline
from medvision.errors import ConfigError
from medvision.pacs.config import load_bridge_config

ROOT = Path(__file__).resolve().parents[2]

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


def test_a_key_given_twice_is_an_error_not_a_silent_overwrite(tmp_path: Path) -> None:
    text = yaml.safe_dump(MINIMAL) + "training: {epochs: 3}\ntraining: {batch_size: 2}\n"
    (tmp_path / "pipeline.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"line \d+: key 'training' given twice"):
        load_pipeline(tmp_path / "pipeline.yaml")
    nested = yaml.safe_dump(MINIMAL) + "training:\n  epochs: 3\n  epochs: 4\n"
    (tmp_path / "pipeline.yaml").write_text(nested)
    with pytest.raises(ConfigError, match="key 'epochs' given twice"):
        load_pipeline(tmp_path / "pipeline.yaml")
    (tmp_path / "pipeline.yaml").write_text("? [a, b]\n: 1\n")  # a key YAML cannot hash
    with pytest.raises(ConfigError, match="cannot read YAML"):
        load_pipeline(tmp_path / "pipeline.yaml")
    bridge = tmp_path / "bridge.yaml"
    bridge.write_text("ae_title: A\nae_title: B\n")
    with pytest.raises(ConfigError, match="key 'ae_title' given twice"):
        load_bridge_config(bridge)


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in (ROOT / "pipelines").glob(
    "*/pipeline.yaml")))
def test_every_shipped_pipeline_loads_with_its_weights_and_card(folder: str) -> None:
    from medvision.models import ModelBundle

    pipeline = load_pipeline(ROOT / "pipelines" / folder)
    assert pipeline.name == folder
    bundle = ModelBundle.load(ROOT / "pipelines" / folder)  # checks every member's SHA-256
    assert bundle.card is not None
    assert bundle.card.splitlines()[0] == f"# {pipeline.name} {pipeline.version}", (
        "the model card describes another version than pipeline.yaml")
    # `make model-*` reproduces what ships: k folds give a k-member ensemble, n members an
    # n+1-member one (each member's network as the pipeline names it), else one model
    if pipeline.members:
        assert [m.member for m in bundle.members] == list(range(len(pipeline.members) + 1))
        assert [m.model for m in bundle.members[1:]] == [m.model for m in pipeline.members]
    else:
        assert len(bundle.members) == (pipeline.training.folds or 0)
    for weights in (ROOT / "pipelines" / folder).glob("*.safetensors"):
        assert weights.stat().st_size < 25 * 1024 * 1024, f"{weights.name}: over 25 MB"


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


@pytest.mark.parametrize(("change", "message"), [
    ({"loss": {"name": "dice_ce"}}, "not implemented for classification"),
    ({"loss": {"name": "focal", "label_smoothing": 0.1}}, "does not use loss.label_smoothing"),
    ({"optimizer": {"name": "adamw", "momentum": 0.8}}, "momentum applies to sgd only"),
    ({"report": {"classes": {"CAT": {"colour": [1, 2, 3]}}}}, "not classes of this pipeline"),
    ({"explanation": {"method": "lime"}}, "explanation.method"),
])
def test_options_the_code_cannot_honour_are_errors(tmp_path: Path, change: dict,
                                                    message: str) -> None:
    """A pipeline naming something the code does not implement fails loudly, never falls
    back silently (schedule onecycle used to validate and then run cosine)."""
    import yaml

    from medvision.config import load_pipeline
    from medvision.errors import ConfigError

    raw = yaml.safe_load((ROOT / "pipelines" / "chest-xray-pneumonia" / "pipeline.yaml")
                         .read_text())
    raw.update(change)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_pipeline(tmp_path / "pipeline.yaml")


def test_onecycle_is_a_real_schedule() -> None:
    from medvision.config import load_pipeline
    from medvision.train.loop import lr_factor

    base = load_pipeline(ROOT / "pipelines" / "chest-xray-pneumonia" / "pipeline.yaml")
    training = base.training.model_copy(update={"epochs": 10, "swa_epochs": 0})

    def factors(name: str) -> list[float]:
        pipeline = base.model_copy(update={
            "training": training,
            "schedule": base.schedule.model_copy(update={"name": name,
                                                         "warmup_epochs": None})})
        return [lr_factor(pipeline, e) for e in range(10)]

    onecycle, cosine = factors("onecycle"), factors("cosine")
    assert onecycle != cosine
    assert onecycle[0] == pytest.approx(1 / 25)  # starts low...
    assert max(onecycle) == pytest.approx(1.0) and onecycle.index(1.0) == 3  # peaks at 30%
    assert onecycle[-1] < 0.05 and cosine[0] == 1.0


def test_a_dumped_pipeline_loads_again(tmp_path: Path) -> None:
    """A run folder's pipeline.yaml (every field written out, defaults included) is valid."""
    for name in ("chest-xray-pneumonia", "hippocampus-seg", "adrenal-3d", "bccd-cells"):
        pipeline = load_pipeline(ROOT / "pipelines" / name)
        (tmp_path / "pipeline.yaml").write_text(
            yaml.safe_dump(pipeline.model_dump(mode="json"), sort_keys=False))
        assert load_pipeline(tmp_path / "pipeline.yaml") == pipeline
