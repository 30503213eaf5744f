"""Architecture ensembles end to end on real hippocampus MRI: a pipeline whose `members` list
other networks, each trained on the same split (`train --member I`), published together,
predicting the mean of their probabilities with PyTorch and ONNX, explained by every member."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from medvision.cli.main import main
from medvision.config import Pipeline, load_pipeline
from medvision.errors import CheckpointError, ConfigError
from medvision.io import read_volume

from conftest import hippocampus_subset

REPO = Path(__file__).resolve().parents[2]

UNET = {"name": "unet", "params": {"channels": [4, 8, 16], "strides": [2, 2],
                                   "num_res_units": 1}}
DYNUNET = {"name": "dynunet", "params": {
    "kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2],
    "filters": [4, 8, 16], "deep_supervision": True, "deep_supr_num": 1}}


def _settings() -> dict[str, Any]:
    settings = yaml.safe_load((REPO / "pipelines" / "hippocampus-seg" / "pipeline.yaml")
                              .read_text())
    settings.update(name="hippo-members", model=UNET,
                    members=[{"model": DYNUNET, "training": {"swa_epochs": 1}}])
    settings["training"].update(epochs=2, early_stopping_patience=None)
    settings["inference"]["tta_flips"] = []  # the mean below is then exact
    settings["qc"] = {"feature_layer": "model.1.submodule.1.submodule"}
    return settings


def test_members_are_checked_where_the_pipeline_is_read() -> None:
    settings = _settings()
    pipeline = Pipeline.model_validate(settings)
    member = pipeline.member(1)
    assert member.model.name == "dynunet" and member.training.swa_epochs == 1
    assert member.training.epochs == 2 and member.members == []  # a plain pipeline
    assert pipeline.member(0).model == pipeline.model and not pipeline.member(0).members
    assert pipeline.member_index(member.model) == 1
    assert pipeline.member_index(pipeline.model) == 0
    with pytest.raises(ConfigError, match="there is no member 2"):
        pipeline.member(2)
    assert member.augment == pipeline.augment  # the pipeline's unless the member says
    own = Pipeline.model_validate({**settings, "members": [
        {"model": DYNUNET, "augment": {"prob": 0.3, "rotate_degrees": 30}}]})
    assert own.member(1).augment.rotate_degrees == 30 and own.member(1).augment.flip_axes == ()
    assert own.member(0).augment == own.augment != own.member(1).augment
    bad: list[tuple[dict[str, Any], str]] = [
        ({"training": {**settings["training"], "folds": 3}}, "cannot be combined"),
        ({"members": [{"model": UNET}]}, "repeats an earlier network"),
        ({"members": [{"model": DYNUNET, "training": {"swa_epochs": 5}}]},
         "swa_epochs .5. must be fewer than epochs"),
        ({"members": [{"model": DYNUNET, "training": {"batch_sise": 2}}]}, "batch_sise"),
        ({"members": [{"model": DYNUNET, "augment": {"rotate": 2}}]}, "rotate"),
        ({"explanation": {"method": "gradcam", "layer": "model.1"}},
         "explanation.members: first"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            Pipeline.model_validate({**settings, **change})
    Pipeline.model_validate({**settings, "explanation": {  # one network's layer: first only
        "method": "gradcam", "layer": "model.1", "members": "first"}})


def test_member_runs_become_an_architecture_ensemble(
        shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medvision.explain import explain
    from medvision.explain.saliency import _normalise, attribute, explained_model
    from medvision.infer import Predictor
    from medvision.models import ModelBundle
    from medvision.models.bundle import ensemble_digest

    folder = tmp_path / "hippo-members"
    folder.mkdir()
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(_settings()))
    data = hippocampus_subset(shared_data, tmp_path / "data", slice(0, 10))
    runs = [tmp_path / "member0", tmp_path / "member1"]
    assert main(["train", str(folder), "--data", str(data), "-o", str(runs[0]),
                 "--epochs", "1"]) == 0
    assert main(["train", str(folder), "--data", str(data), "-o", str(runs[1]),
                 "--member", "1"]) == 0
    out = capsys.readouterr().out
    assert "member 1 (dynunet): trained 2 epoch(s)" in out and "averaged over the last 1" in out
    trained = load_pipeline(runs[1] / "pipeline.yaml")
    assert trained.model.name == "dynunet" and trained.training.swa_epochs == 1
    with pytest.raises(ConfigError, match="resume it with --member 1"):
        main(["--debug", "train", str(folder), "--data", str(data), "-o", str(runs[1]),
              "--resume"])
    with pytest.raises(ConfigError, match="resume it without --member"):
        main(["--debug", "train", str(folder), "--data", str(data), "-o", str(runs[0]),
              "--member", "1", "--resume"])

    # publish: the runs in any order; member 0 first, the other's network in the manifest
    assert main(["publish", str(runs[1]), str(runs[0]), "--pipeline", str(folder),
                 "--data", str(data)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["members"] == 2 and summary["ood"]
    assert set(summary["member_metrics"]) == {"member 0 (unet)", "member 1 (dynunet)"}
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "member-1.safetensors", "model.safetensors", "ood.safetensors"]
    manifest = json.loads((folder / "ensemble.json").read_text())["members"]
    assert "model" not in manifest[0] and manifest[1]["model"]["name"] == "dynunet"
    bundle = ModelBundle.load(folder)
    assert [m.member for m in bundle.members] == [0, 1]
    assert bundle.members[1].model is not None and bundle.members[1].model.name == "dynunet"
    assert bundle.weights_sha256 == ensemble_digest(bundle.members)
    plain = ensemble_digest([m.__class__(weights=m.weights, weights_sha256=m.weights_sha256)
                             for m in bundle.members])
    assert plain != bundle.weights_sha256  # the member's network is part of the name

    # a manifest whose networks are malformed, or whose first member is not the pipeline's own
    # network, is refused with the reason
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    for change, message in ((lambda e: e[1].update(model={"name": 5}), "unreadable ensemble"),
                            (lambda e: e[0].update(model=e[1]["model"]), "first member must")):
        entries = [dict(m) for m in manifest]
        change(entries)
        (broken / "ensemble.json").write_text(json.dumps({"members": entries}))
        with pytest.raises(CheckpointError, match=message):
            ModelBundle.load(broken)

    # the ensemble's probabilities are the mean of the two networks'
    predictor = Predictor.from_pipeline(folder)
    assert predictor.ensemble_size == 2
    assert [type(n).__name__ for n in predictor.networks] == ["UNet", "DynUNet"]
    case = sorted((data / "images").iterdir())[0]
    prepared = predictor.prepare(read_volume(case))
    with torch.no_grad():
        mean = sum(torch.softmax(n(prepared.image), dim=1) for n in predictor.networks) / 2
    np.testing.assert_allclose(torch.softmax(predictor.logits(prepared.image), dim=1).numpy(),
                               mean.numpy(), atol=1e-5)
    prediction = predictor.predict(prepared)
    expected = predictor.to_input_space(prepared, mean[0].argmax(0, keepdim=True).float()
                                        .numpy(), nearest=True)
    np.testing.assert_array_equal(prediction.mask.array, expected.array)

    # ONNX: each member exported with its own network; the ONNX ensemble agrees
    assert main(["export", str(folder)]) == 0
    assert sorted(p.name for p in folder.glob("*.onnx")) == ["member-1.onnx", "model.onnx"]
    onnx = Predictor.from_pipeline(folder, backend="onnx")
    np.testing.assert_allclose(onnx.logits(prepared.image).exp().numpy(),
                               mean.numpy(), atol=1e-4)

    # the explanation averages both networks' maps
    cfg = predictor.pipeline.explanation
    own = []
    for network in predictor.networks:
        model, target, _ = explained_model(predictor, prediction, network=network)
        own.append(_normalise(attribute(model, prepared.image, target, cfg, cfg.method)[0][0]
                              .numpy()))
    assert not np.allclose(own[0], own[1], atol=1e-3)  # the members differ
    saliency = explain(predictor, prepared, prediction)
    np.testing.assert_allclose(saliency.model_space, _normalise(np.mean(own, axis=0)),
                               atol=1e-5)
    assert saliency.params["members"] == 2

    # the report names every member: weights, SHA-256, network (schema-validated by analyze)
    assert main(["analyze", str(case), "--pipeline", str(folder), "-o",
                 str(tmp_path / "analysis")]) == 0
    report = json.loads(next((tmp_path / "analysis").rglob("report.json")).read_text())
    assert report["pipeline"]["weights_sha256"] == bundle.weights_sha256
    assert [(m["weights"], m["network"], m["member"]) for m in report["pipeline"]["members"]] \
        == [("model.safetensors", "unet", 0), ("member-1.safetensors", "dynunet", 1)]
    assert [m["weights_sha256"] for m in report["pipeline"]["members"]] == [
        m.weights_sha256 for m in bundle.members]

    # runs that cannot ship together
    other = tmp_path / "other-split"
    assert main(["train", str(folder), "--data", str(data), "-o", str(other), "--member", "1",
                 "--epochs", "1", "--limit", "1"]) == 0
    rejected = [([runs[0], other], "validated on different splits"),
                ([runs[1]], "trained with a different 'model'"),  # alone: not the pipeline's
                ([runs[0], runs[0]], "distinct members")]
    stranger = tmp_path / "stranger"
    shutil.copytree(runs[1], stranger)
    text = (stranger / "pipeline.yaml").read_text().replace("- 4\n", "- 6\n", 1)
    (stranger / "pipeline.yaml").write_text(text)
    rejected.append(([runs[0], stranger], "neither a cross-validation fold run"))
    for group, message in rejected:
        with pytest.raises(ConfigError, match=message):
            main(["--debug", "publish", *map(str, group), "--pipeline", str(folder)])

    # a single model published over it removes the ensemble's files
    assert main(["publish", str(runs[0]), "--pipeline", str(folder)]) == 0
    assert not (folder / "ensemble.json").exists()
    assert not list(folder.glob("member-*"))
