"""Training caches the deterministic preprocessing: each file is read once, not every epoch."""

from __future__ import annotations

from pathlib import Path

import pytest

import medvision.transforms.chain as chain
from medvision.config import load_pipeline


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_each_image_is_read_once_across_epochs(shared_data: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               cache: str) -> None:
    from monai.data import DataLoader

    from medvision.train.loop import _dataset

    pipeline = load_pipeline("chest-xray-pneumonia")
    pipeline = pipeline.model_copy(update={"training": pipeline.training.model_copy(
        update={"cache": cache})})
    images = sorted((shared_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[:6]
    items = [{"image": str(p), "label": 0, "group": p.name} for p in images]
    reads: list[str] = []
    real = chain.read_volume

    def counting(path: object, **kwargs: object) -> object:
        reads.append(str(path))
        return real(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(chain, "read_volume", counting)
    dataset = _dataset(pipeline, items, train=True, run_dir=tmp_path)
    for _epoch in range(3):
        for batch in DataLoader(dataset, batch_size=3):
            assert tuple(batch["image"].shape[-2:]) == tuple(pipeline.preprocess.size)
    assert sorted(reads) == sorted(map(str, images))  # once each, not three times
