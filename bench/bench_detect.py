"""Detection inference latency per image on CPU: medvision's Predictor (read, prepare, detect,
map boxes back) against plain MONAI inference of the same RetinaNet (PIL read, scale, zoom,
``detector([image])``), same images, same run, alternating; the ratio of medians is printed
(above 1 means medvision's path costs more).

    .venv/bin/python bench/bench_detect.py [--n 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "data" / "bccd" / "trainval" / "JPEGImages"


def main() -> None:
    import torch
    from monai import transforms as mt
    from PIL import Image

    from medvision.infer import Predictor
    from medvision.io import read_volume
    from medvision.models import ModelBundle

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    args = parser.parse_args()
    folder = REPO / "pipelines" / "bccd-cells"
    if (folder / "model.safetensors").is_file():
        predictor = Predictor.from_pipeline(folder)
        note = "shipped weights"
    else:  # untrained weights: the same computation, so the same latency
        from medvision.config import load_pipeline
        from medvision.models import save_weights
        from medvision.models.detection import build_detector

        pipeline = load_pipeline(folder)
        weights = Path("/tmp/bench-detect.safetensors")
        save_weights(build_detector(pipeline), weights)
        predictor = Predictor.from_bundle(ModelBundle.load(folder, weights=weights))
        note = "freshly initialised weights (no shipped model yet)"
    detector, pipeline = predictor.model, predictor.pipeline
    torch.set_num_threads(pipeline.training.threads or 2)
    zoom = mt.Zoom(zoom=0.5, keep_size=False, mode="area")
    paths = sorted(IMAGES.glob("*.jpg"))[: args.n]

    def plain(path: Path) -> int:
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        image = zoom(torch.from_numpy(np.transpose(rgb, (2, 1, 0)).copy()))
        with torch.no_grad():
            found = detector([torch.as_tensor(image)])[0]
        return int((found["labels_scores"] >= pipeline.inference.threshold).sum())

    def ours(path: Path) -> int:
        prediction = predictor.predict(predictor.prepare(read_volume(path)))
        return int(sum(prediction.counts.values()))

    plain(paths[0]), ours(paths[0])  # warm up
    times: dict[str, list[float]] = {"medvision": [], "monai": []}
    for path in paths:
        t0 = time.perf_counter()
        ours(path)
        times["medvision"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        plain(path)
        times["monai"].append(time.perf_counter() - t0)
    ratio = statistics.median(times["medvision"]) / statistics.median(times["monai"])
    print(f"{len(paths)} BCCD images, {note}: medvision / plain MONAI inference "
          f"(median per image): {ratio:.2f}")


if __name__ == "__main__":
    main()
