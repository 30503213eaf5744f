"""training.precision: bfloat16 training steps (torch.autocast on the CPU) on real cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medvision.cli.main import main
from medvision.config import Pipeline, load_pipeline
from medvision.errors import ConfigError

from conftest import chest_subset, hippocampus_subset

REPO = Path(__file__).resolve().parents[2]


def _hippocampus(folder: Path, size: list[int] | None = None, *, shipped: str = "hippocampus-seg",
                 **training: object) -> Path:
    settings = yaml.safe_load((REPO / "pipelines" / shipped / "pipeline.yaml").read_text())
    settings.update(name=folder.name, members=[])
    settings["training"].update(training)
    if size:
        settings["preprocess"]["size"] = size
    folder.mkdir()
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    return folder


def _gradients(pipeline: Pipeline, batch: dict, precision: str) -> tuple[float, torch.Tensor]:
    from medvision.devices import autocast
    from medvision.models import build_model, load_weights
    from medvision.train.loop import _loss, supervised_loss

    model = build_model(pipeline)
    load_weights(model, REPO / "pipelines" / "hippocampus-seg" / "model.safetensors")
    model.train()
    with autocast("cpu", precision):
        output = model(batch["image"])
    assert output.dtype == (torch.bfloat16 if precision == "bfloat16" else torch.float32)
    loss = supervised_loss(_loss(pipeline), output.float(), batch["label"])
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return float(loss.detach()), grads


@pytest.mark.slow  # emulated bfloat16 on this CPU; the training run below stays in the default
def test_bfloat16_steps_follow_float32_gradients(shared_data: Path, tmp_path: Path) -> None:
    """On two real cases and the shipped weights, a bfloat16 step's loss and gradient are
    those of the float32 step up to bfloat16's rounding (8 bits of mantissa)."""
    from monai.data import DataLoader, Dataset

    from medvision.train import discover_items
    from medvision.transforms import build_transforms

    pipeline = load_pipeline("hippocampus-seg")
    data = hippocampus_subset(shared_data, tmp_path / "hippo", slice(0, 2))
    items = [{k: v for k, v in i.items() if k != "group"}
             for i in discover_items(pipeline, data)]
    batch = next(iter(DataLoader(Dataset(items, build_transforms(pipeline, train=False)),
                                 batch_size=2)))
    torch.manual_seed(0)
    loss32, grad32 = _gradients(pipeline, batch, "float32")
    loss16, grad16 = _gradients(pipeline, batch, "bfloat16")
    assert loss16 == pytest.approx(loss32, rel=0.05)
    cosine = float(torch.nn.functional.cosine_similarity(grad32, grad16, dim=0))
    assert cosine > 0.995  # measured 0.9998
    assert float(grad16.norm()) == pytest.approx(float(grad32.norm()), rel=0.1)


def test_bfloat16_training_run_keeps_float32_weights(shared_data: Path, tmp_path: Path) -> None:
    """A run trains (and resumes) with bfloat16 steps; what it writes is float32. Its patch
    (32 voxels a side) is smaller than the volumes (34-36 x 47-51 x 34-36): training crops,
    and validation runs a sliding window over the whole padded volume."""
    data = hippocampus_subset(shared_data, tmp_path / "hippo", slice(0, 4))
    folder = _hippocampus(tmp_path / "hippo-bf16", size=[32, 32, 32], precision="bfloat16")
    run = tmp_path / "run"
    args = ["train", str(folder), "--data", str(data), "-o", str(run)]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    assert load_pipeline(run).training.precision == "bfloat16"
    weights = load_file(str(run / "best.safetensors"))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3
    state = json.loads((run / "state.json").read_text())
    losses = [row["train_loss"] for row in state["history"]]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    assert all(0 <= row["val_dice"] <= 1 for row in state["history"])


@pytest.mark.parametrize("shipped", [pytest.param("hippocampus-seg", marks=pytest.mark.slow),
                                     "chest-xray-pneumonia"])
def test_bfloat16_pretraining(shipped: str, shared_data: Path, tmp_path: Path) -> None:
    """Masked (segmentation) and contrastive (classification) pretraining with bfloat16 steps:
    finite losses, float32 weights."""
    if shipped == "hippocampus-seg":
        data = hippocampus_subset(shared_data, tmp_path / "data", slice(0, 4))
    else:
        data = chest_subset(shared_data, tmp_path / "data", per_class=2)
    folder = _hippocampus(tmp_path / "bf16", shipped=shipped, precision="bfloat16")
    run = tmp_path / "ssl"
    assert main(["pretrain", str(folder), "--data", str(data), "-o", str(run), "--epochs", "1",
                 "--batch-size", "2"]) == 0
    rows = (run / "metrics.csv").read_text().splitlines()
    loss = float(rows[1].split(",")[1])
    assert len(rows) == 2 and 0 < loss < 100
    weights = load_file(str(run / "pretrained.safetensors"))
    assert weights and all(t.dtype == torch.float32 for t in weights.values()
                           if t.is_floating_point())  # batch-norm counters are integers


def test_precision_is_validated_and_refused_for_detection(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="precision"):
        load_pipeline(_hippocampus(tmp_path / "hippo-f8", precision="float8"))
    settings = yaml.safe_load((REPO / "pipelines" / "bccd-cells" / "pipeline.yaml").read_text())
    settings["training"]["precision"] = "bfloat16"
    folder = tmp_path / "bccd-bf16"
    folder.mkdir()
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(ConfigError, match="not offered for detection"):
        load_pipeline(folder)
