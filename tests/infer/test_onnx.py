"""ONNX export and the onnxruntime backend agree with PyTorch on real files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from medvision.cli.main import main
from medvision.config import pipeline_dir
from medvision.infer import Predictor
from medvision.io import read_volume


def _copy_pipeline(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(pipeline_dir(name), folder)
    return folder


@pytest.mark.parametrize(("name", "inputs"), [
    ("chest-xray-pneumonia", lambda d: sorted((d / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))[:3]
     + sorted((d / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[:3]),
    ("hippocampus-seg", lambda d: sorted((d / "hippocampus" / "images").glob("*.nii.gz"))[:2]),
])
def test_onnx_parity(name: str, inputs, shared_data: Path, tmp_path: Path) -> None:
    folder = _copy_pipeline(name, tmp_path)
    assert main(["export", str(folder)]) == 0
    assert (folder / "model.onnx").is_file()
    torch_predictor = Predictor.from_pipeline(folder)
    onnx_predictor = Predictor.from_pipeline(folder, backend="onnx")
    assert onnx_predictor.backend_name == "onnx"
    for path in inputs(shared_data):
        volume = read_volume(path)
        a = torch_predictor.predict(torch_predictor.prepare(volume))
        b = onnx_predictor.predict(onnx_predictor.prepare(volume))
        assert a.label == b.label
        if a.probabilities is not None:
            np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-4)
        else:
            np.testing.assert_allclose(a.model_output.numpy(), b.model_output.numpy(), atol=1e-3)
            np.testing.assert_array_equal(a.mask.array, b.mask.array)


def test_onnx_backend_without_export_is_a_clear_error(tmp_path: Path) -> None:
    from medvision.errors import CheckpointError

    folder = _copy_pipeline("chest-xray-pneumonia", tmp_path)
    with pytest.raises(CheckpointError, match="medvision export"):
        Predictor.from_pipeline(folder, backend="onnx")
