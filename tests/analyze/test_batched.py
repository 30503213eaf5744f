"""Batched analysis (reader processes, batched predictions and saliency, writer threads)
gives the reports one study at a time gives; a fully up-to-date batch builds no network."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvision.analyze import AnalyzeOptions, analyze
from medvision.audit.log import AuditLog
from medvision.audit.records import Auditor, Pseudonymizer
from medvision.infer import LazyPredictor, Predictor

from conftest import chest_subset, hippocampus_subset


def _auditor(folder: Path) -> Auditor:
    return Auditor(AuditLog(folder / "audit.sqlite"), Pseudonymizer.from_file(folder / "a.key"))


def _reports(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/report.json")}


@pytest.mark.parametrize("shipped", ["chest-xray-pneumonia", "hippocampus-seg"])
def test_batched_equals_one_at_a_time(shipped: str, shared_data: Path, tmp_path: Path) -> None:
    if shipped == "chest-xray-pneumonia":
        data = chest_subset(shared_data, tmp_path / "data", per_class=3)
    else:
        data = hippocampus_subset(shared_data, tmp_path / "data", slice(0, 3)) / "images"
    predictor = Predictor.from_pipeline(shipped, device="cpu")
    alone = analyze([data], predictor, tmp_path / "alone", auditor=_auditor(tmp_path),
                    options=AnalyzeOptions(batch_size=1, workers=0, progress=False))
    batched = analyze([data], predictor, tmp_path / "batched", auditor=_auditor(tmp_path),
                      options=AnalyzeOptions(batch_size=4, workers=2, progress=False))
    assert [r.study for r in alone] == [r.study for r in batched]
    assert all(r.status in ("ok", "flagged") for r in batched)
    one, many = _reports(tmp_path / "alone"), _reports(tmp_path / "batched")
    assert one.keys() == many.keys() and len(one) == len(alone)
    for study, report in one.items():
        other = many[study]
        assert report["status"] == other["status"]
        assert report["prediction"]["label"] == other["prediction"]["label"]
        for name, p in (report["prediction"].get("probabilities") or {}).items():
            assert other["prediction"]["probabilities"][name] == pytest.approx(p, abs=1e-5)
        for name, v in (report["prediction"].get("volumes_ml") or {}).items():
            assert other["prediction"]["volumes_ml"][name] == v
        assert report["pipeline"]["device"]["device"] == "cpu"
        a = nib.load(tmp_path / "alone" / study / "saliency.nii.gz").get_fdata()
        b = nib.load(tmp_path / "batched" / study / "saliency.nii.gz").get_fdata()
        assert np.abs(a - b).max() <= 1e-4
        if (tmp_path / "alone" / study / "mask.nii.gz").is_file():
            assert np.array_equal(
                nib.load(tmp_path / "alone" / study / "mask.nii.gz").get_fdata(),
                nib.load(tmp_path / "batched" / study / "mask.nii.gz").get_fdata())


def test_a_bad_study_in_a_batch_fails_alone(shared_data: Path, tmp_path: Path) -> None:
    data = chest_subset(shared_data, tmp_path / "data", per_class=2)
    (data / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    results = analyze([data], Predictor.from_pipeline("chest-xray-pneumonia", device="cpu"),
                      tmp_path / "out", auditor=_auditor(tmp_path),
                      options=AnalyzeOptions(batch_size=8, workers=1, progress=False))
    statuses = {r.study: r.status for r in results}
    assert sum(s == "rejected" for s in statuses.values()) == 1
    assert sum(s in ("ok", "flagged") for s in statuses.values()) == 4


def test_an_up_to_date_batch_builds_no_network(shared_data: Path, tmp_path: Path) -> None:
    data = chest_subset(shared_data, tmp_path / "data", per_class=1)
    first = LazyPredictor.from_pipeline("chest-xray-pneumonia", device="cpu")
    analyze([data], first, tmp_path / "out", auditor=_auditor(tmp_path),
            options=AnalyzeOptions(progress=False))
    assert "loaded" in first.__dict__  # built for the first run
    again = LazyPredictor.from_pipeline("chest-xray-pneumonia", device="cpu")
    results = analyze([data], again, tmp_path / "out", auditor=_auditor(tmp_path),
                      options=AnalyzeOptions(progress=False))
    assert all(r.skipped for r in results) and len(results) == 2
    assert "loaded" not in again.__dict__  # every study was up to date: nothing built


def test_gradcam_reuses_the_predictions_forward_pass(shared_data: Path, tmp_path: Path) -> None:
    """Grad-CAM from the activations the prediction kept equals Captum's Grad-CAM of each
    whole network, and runs none of the layers before the explained one again."""
    import torch

    from medvision.explain.saliency import explain_batch, network_head
    from medvision.infer.predictor import prepare_volume
    from medvision.io import read_volume

    data = chest_subset(shared_data, tmp_path / "data", per_class=2)
    predictor = Predictor.from_pipeline("chest-xray-pneumonia", device="cpu")
    prepared = [prepare_volume(predictor.pipeline, read_volume(f))
                for f in sorted(data.rglob("*.jpeg"))]
    kept = predictor.predict_batch(prepared, capture="layer4")
    plain = predictor.predict_batch(prepared)
    assert all(p.activations is not None and len(p.activations) == len(predictor.networks)
               for p in kept)
    assert all(p.activations is None for p in plain)
    assert [p.probabilities for p in kept] == [p.probabilities for p in plain]
    stems = []
    handles = [n.conv1.register_forward_hook(lambda *_: stems.append(1))
               for n in predictor.networks]
    try:
        reused = explain_batch(predictor, prepared, kept)
        assert stems == []  # no pass through the network's first layers
        whole = explain_batch(predictor, prepared, plain)
        assert len(stems) == len(predictor.networks)
    finally:
        for handle in handles:
            handle.remove()
    for a, b in zip(reused, whole, strict=True):
        np.testing.assert_allclose(a.model_space, b.model_space, atol=1e-5)
        np.testing.assert_allclose(np.asarray(a.volume.array), np.asarray(b.volume.array),
                                   atol=1e-5)
    # a network whose layers after the explained one read an earlier value has no head

    class Skip(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x) + x)

    assert network_head(Skip(), "a") is None
    assert network_head(Skip(), "b") is not None


@pytest.mark.slow  # bfloat16 is emulated on CPUs without it (this one): 40 s for 4 images
def test_bfloat16_inference_keeps_the_labels_and_says_so(shared_data: Path,
                                                         tmp_path: Path) -> None:
    """Inference under bfloat16 autocast (the CPU has it; float16 is GPU-only): the same
    labels as float32 on these cases, probabilities within 0.05, and the reports say which
    precision made them (a float32 report is not reused for a bfloat16 run)."""
    data = chest_subset(shared_data, tmp_path / "data", per_class=2)
    runs = {}
    for precision in ("float32", "bfloat16"):
        predictor = Predictor.from_pipeline("chest-xray-pneumonia", device="cpu",
                                            precision=precision)
        results = analyze([data], predictor, tmp_path / "out", auditor=_auditor(tmp_path),
                          options=AnalyzeOptions(batch_size=4, workers=0, progress=False))
        assert not any(r.skipped for r in results)  # the precision is part of the run
        runs[precision] = _reports(tmp_path / "out")
        for report in runs[precision].values():
            assert report["pipeline"]["device"]["precision"] == precision
    for study, wide in runs["float32"].items():
        narrow = runs["bfloat16"][study]
        assert narrow["prediction"]["label"] == wide["prediction"]["label"]
        for name, p in wide["prediction"]["probabilities"].items():
            assert abs(narrow["prediction"]["probabilities"][name] - p) < 0.05
