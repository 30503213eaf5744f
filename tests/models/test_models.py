"""Networks from the registry: 2D/3D shapes, errors, and a safetensors round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medvision.config import Pipeline
from medvision.errors import CheckpointError, ConfigError
from medvision.models import build_model, load_weights, save_weights, weights_sha256


def _pipeline(task: str, dims: int, name: str, classes: int = 2, **params) -> Pipeline:
    return Pipeline.model_validate({
        "name": "t", "task": task, "spatial_dims": dims,
        "classes": [f"c{i}" for i in range(classes)],
        "data": {"layout": "class_folders"}, "model": {"name": name, "params": params},
    })


@pytest.mark.parametrize(("name", "dims", "params"), [
    ("resnet10", 2, {}), ("resnet10", 3, {}), ("densenet121", 2, {}),
    ("efficientnet", 2, {"model_name": "efficientnet-b0"}),
])
def test_classifier_output_shape(name: str, dims: int, params: dict) -> None:
    model = build_model(_pipeline("classification", dims, name, classes=3, **params)).eval()
    x = torch.zeros((2, 1) + (32,) * dims)
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("dims", [2, 3])
def test_unet_output_shape(dims: int) -> None:
    model = build_model(_pipeline("segmentation", dims, "unet", classes=3,
                                  channels=[4, 8, 16], strides=[2, 2])).eval()
    x = torch.zeros((1, 1) + (16,) * dims)
    assert model(x).shape == (1, 3) + (16,) * dims


def test_unknown_or_mismatched_network_is_config_error() -> None:
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        build_model(_pipeline("classification", 2, "resnet81"))
    with pytest.raises(ConfigError, match="segmentation network"):
        build_model(_pipeline("classification", 2, "unet"))
    with pytest.raises(ConfigError, match="rejects its parameters"):
        build_model(_pipeline("classification", 2, "resnet18", no_such_arg=1))


def test_safetensors_round_trip(tmp_path: Path) -> None:
    pipeline = _pipeline("classification", 2, "resnet10")
    model = build_model(pipeline).eval()
    path = save_weights(model, tmp_path / "w.safetensors")
    other = build_model(pipeline).eval()
    load_weights(other, path)
    x = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(model(x), other(x))
    assert len(weights_sha256(path)) == 64
    wrong = build_model(_pipeline("classification", 2, "resnet10", classes=5))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(wrong, path)


def test_shared_tensors_are_written_once_and_restored_under_every_name(tmp_path: Path) -> None:
    """MONAI's DynUNet registers each block under two names (safetensors refuses shared
    tensors): the file holds each once, and loading fills both names."""
    from safetensors.torch import load_file, save_file

    pipeline = _pipeline("segmentation", 3, "dynunet", classes=3, kernel_size=[3, 3, 3],
                         strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16])
    model = build_model(pipeline).eval()
    path = save_weights(model, tmp_path / "w.safetensors")
    stored = load_file(str(path))
    assert len(stored) < len(model.state_dict())
    assert "input_block.conv1.conv.weight" in stored
    assert "skip_layers.downsample.conv1.conv.weight" not in stored  # the same tensor
    other = build_model(pipeline).eval()
    assert load_weights(other, path) == []  # nothing left missing
    for name, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[name], value)
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(model(x), other(x))
    del stored["input_block.conv1.conv.weight"]  # a tensor missing under every name
    save_file(stored, str(tmp_path / "short.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(build_model(pipeline), tmp_path / "short.safetensors")
