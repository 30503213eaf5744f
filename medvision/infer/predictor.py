"""A trained pipeline ready to predict: network, weights, calibration and transforms."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvision.config import Pipeline, load_pipeline, pipeline_dir
from medvision.errors import CheckpointError
from medvision.models import build_model, load_weights, weights_sha256
from medvision.train.calibration import read_temperature
from medvision.transforms import build_transforms

__all__ = ["Predictor", "WEIGHTS_FILE"]

#: A shipped pipeline's weights, inside ``pipelines/<name>/``.
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True, eq=False)
class Predictor:
    """A pipeline with its trained network (in eval mode) and its calibration temperature."""

    pipeline: Pipeline
    model: Any
    weights: Path
    weights_sha256: str
    temperature: float

    @classmethod
    def from_pipeline(cls, name_or_path: str | os.PathLike[str], *,
                      weights: str | os.PathLike[str] | None = None) -> Predictor:
        """Load a pipeline and its weights (default: ``model.safetensors`` beside it).

        The calibration temperature is read from ``calibration.json`` beside the weights.

        Raises:
            ConfigError: invalid pipeline.
            CheckpointError: no weights, or weights that do not fit the network.
        """
        pipeline = load_pipeline(name_or_path)
        path = Path(weights) if weights is not None else pipeline_dir(name_or_path) / WEIGHTS_FILE
        if not path.is_file():
            raise CheckpointError(
                f"{path}: no trained weights for pipeline '{pipeline.name}'; train it with "
                "'medvision train' and pass --weights RUN/best.safetensors")
        model = build_model(pipeline)
        load_weights(model, path)
        model.eval()
        return cls(pipeline=pipeline, model=model, weights=path,
                   weights_sha256=weights_sha256(path), temperature=read_temperature(path))

    def logits(self, image: Any) -> Any:
        """Network output for a preprocessed batch, averaged over flip test-time augmentation."""
        import torch

        with torch.no_grad():
            out = self.model(image)
            flips = self.pipeline.inference.tta_flips
            for axis in flips:
                flipped = self.model(torch.flip(image, dims=(axis + 2,)))
                if self.pipeline.task == "segmentation":
                    flipped = torch.flip(flipped, dims=(axis + 2,))
                out = out + flipped
        return out / (1 + len(flips))

    def run_items(self, items: Sequence[dict[str, Any]], *,
                  batch_size: int | None = None) -> Iterator[tuple[dict[str, Any], Any, Any]]:
        """Yield ``(batch, logits, labels)`` over labelled items, preprocessed as in training.

        The batch's image is a MetaTensor (its ``affine`` is the model-space geometry).
        """
        from monai.data import DataLoader, Dataset

        data = [{k: v for k, v in item.items() if k != "group"} for item in items]
        dataset = Dataset(data, transform=build_transforms(self.pipeline, train=False,
                                                           keep_meta=True))
        loader = DataLoader(dataset, batch_size=batch_size or self.pipeline.training.batch_size,
                            shuffle=False, num_workers=0)
        for batch in loader:
            yield batch, self.logits(batch["image"]), batch["label"]
