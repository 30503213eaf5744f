"""Training throughput: medvision's loop against plain MONAI tutorial-style loops.

Same network (the pipeline's), same images, same batch size, in the same run. The tutorial
loops use MONAI's LoadImaged with a Dataset (no caching, as MONAI's classification tutorials
do) and with a CacheDataset; medvision's loop caches the deterministic preprocessing too.
Prints samples/s for each, the ratios (above 1 means medvision trains faster) and the share of
medvision's epochs spent waiting for data (metrics.csv ``data_wait_share``); then medvision's
loop again with ``training.precision: bfloat16`` and its ratio to the float32 loop
(``--precision float32`` skips it).

    .venv/bin/python bench/bench_train.py [--pipeline chest-xray-pneumonia] [--items 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from medvision.config import load_pipeline
from medvision.models import build_model
from medvision.train import discover_items, split_items, train
from medvision.train.data import DataSplit
from medvision.train.precision import bfloat16_native

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "chest_xray" / "train"


def tutorial_loop(pipeline, items, epochs: int, *, cache: bool = False) -> float:
    """MONAI-tutorial style: LoadImaged and the transforms; samples/s. ``cache``: a MONAI
    CacheDataset (the deterministic part computed once), else a plain Dataset."""
    from monai import transforms as mt
    from monai.data import CacheDataset, DataLoader, Dataset

    size = pipeline.preprocess.size
    transform = mt.Compose([
        mt.LoadImaged("image", image_only=True), mt.EnsureChannelFirstd("image"),
        mt.Lambdad("image", lambda x: x.mean(0, keepdim=True) if x.shape[0] > 1 else x),
        mt.ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True),
        mt.Resized("image", spatial_size=size, mode="area"),
        mt.RandAffined("image", prob=0.7, rotate_range=(0.17,), scale_range=(0.12, 0.12)),
        mt.EnsureTyped("image", track_meta=False),
    ])
    data = [{"image": i["image"], "label": i["label"]} for i in items]
    dataset = CacheDataset(data, transform, progress=False) if cache else Dataset(data, transform)
    loader = DataLoader(dataset, batch_size=pipeline.training.batch_size, shuffle=True,
                        num_workers=0)
    model = build_model(pipeline)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    seen, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(batch["image"]), batch["label"].long())
            loss.backward()
            optimizer.step()
            seen += batch["image"].shape[0]
    return seen / (time.perf_counter() - t0)


def medvision_loop(pipeline, items, epochs: int,
                   precision: str = "float32") -> tuple[float, float, float]:
    """medvision.train over the same items; (samples/s in epochs, cache-building seconds,
    mean share of each epoch spent waiting for data)."""
    split = DataSplit(train=tuple(items), val=tuple(items[:: max(1, len(items) // 8)]))
    cfg = pipeline.model_copy(update={"training": pipeline.training.model_copy(
        update={"epochs": epochs, "balanced_sampling": False, "early_stopping_patience": None,
                "precision": precision})})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train(cfg, split, Path(tmp) / "run", progress=False)
        total = time.perf_counter() - t0
    rates = [row["samples_per_second"] for row in result.history]
    waits = [row["data_wait_share"] for row in result.history]
    return sum(rates) / len(rates), total - result.seconds, sum(waits) / len(waits)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", default="chest-xray-pneumonia")
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="bfloat16",
                        help="bfloat16: also time medvision's loop with bfloat16 steps")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"needs {DATA}")
        return 1
    pipeline = load_pipeline(args.pipeline)
    items = split_items(pipeline, discover_items(pipeline, DATA)).train
    step = max(1, len(items) // args.items)
    subset = list(items[::step][: args.items])
    torch.manual_seed(0)
    theirs = tutorial_loop(pipeline, subset, args.epochs)
    cached = tutorial_loop(pipeline, subset, args.epochs, cache=True)
    ours, overhead, wait = medvision_loop(pipeline, subset, args.epochs)
    print(f"{len(subset)} images x {args.epochs} epochs, {pipeline.model.name}, "
          f"{pipeline.preprocess.size}: MONAI tutorial loop {theirs:.1f} samples/s, MONAI "
          f"CacheDataset loop {cached:.1f}, medvision {ours:.1f} (plus {overhead:.0f} s "
          f"caching and validation; {wait:.1%} of each epoch waiting for data); ratio "
          f"medvision/tutorial {ours / theirs:.2f}, medvision/CacheDataset {ours / cached:.2f}")
    if args.precision == "bfloat16":
        mixed, _, wait16 = medvision_loop(pipeline, subset, args.epochs, precision="bfloat16")
        print(f"medvision with training.precision bfloat16: {mixed:.1f} samples/s "
              f"({wait16:.1%} waiting for data); ratio bfloat16/float32 {mixed / ours:.2f}"
              + ("" if bfloat16_native() else " (this CPU has no native bfloat16)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
