"""LayerCAM: finer explanations than Grad-CAM's last layer, selectable per run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medvision.cli.main import main
from medvision.config import ExplanationConfig
from medvision.explain.saliency import attribute, explain
from medvision.infer import Predictor
from medvision.io import read_volume


def test_layercam_at_layer3_is_finer_than_gradcam_at_layer4(shared_data: Path) -> None:
    predictor = Predictor.from_pipeline("chest-xray-pneumonia")
    image = sorted((shared_data / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    prepared = predictor.prepare(read_volume(image))
    prediction = predictor.predict(prepared)
    target = prediction.target_index
    rows = {}
    for method, layer in (("gradcam", "layer4"), ("layercam", "layer3"), ("layercam", "layer4")):
        raw, params = attribute(predictor.model, prepared.image, target,
                                ExplanationConfig(layer=layer), method)
        values = raw[0].numpy()
        assert values.shape == tuple(prepared.image.shape[2:]) and (values >= 0).all()
        assert values.max() > 0 and params["layer"] == layer
        # distinct values along the middle row: one per feature-map cell before upsampling,
        # so the count follows the layer's grid (6 cells at layer4, 12 at layer3)
        middle = values[values.shape[0] // 2]
        rows[(method, layer)] = len(np.unique(np.round(middle[:: max(1, len(middle) // 48)], 6)))
    assert rows[("layercam", "layer3")] > rows[("gradcam", "layer4")]
    saliency = explain(predictor, prepared, prediction, method="layercam", layer="layer3")
    assert saliency.volume.spatial_shape == prepared.volume.spatial_shape


def test_analyze_records_the_layer(shared_data: Path, tmp_path: Path) -> None:
    image = sorted((shared_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[0]
    out = tmp_path / "out"
    assert main(["analyze", str(image), "--pipeline", "chest-xray-pneumonia", "-o", str(out),
                 "--explain", "layercam", "--explain-layer", "layer3"]) == 0
    report = json.loads(next(out.rglob("report.json")).read_text())
    assert report["run"]["explain_layer"] == "layer3"
    assert report["saliency"]["method"] == "layercam"
    assert report["saliency"]["params"]["layer"] == "layer3"
