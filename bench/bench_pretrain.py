"""Self-supervised pretraining vs training from scratch at equal CPU minutes, on the chest
X-rays: the same pipeline (the shipped chest settings at a smaller size), the same patient-
grouped validation split, the same total wall-clock budget.

* scratch: ``train`` for as many epochs as fit ``--minutes``;
* pretrained: ``pretrain`` (contrastive) for half the budget on the training folder's images,
  then ``train --init-from`` for the epochs that fit the other half.

Both are evaluated on the validation split; AUC and accuracy with their intervals and the
paired bootstrap difference of AUC are printed. Run folders go under ``--out``.

    .venv/bin/python bench/bench_pretrain.py [--minutes 12] [--size 128] [--out /tmp/bench-pretrain]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "chest_xray" / "train"
MEDVISION = str(Path(sys.executable).parent / "medvision")


def _run(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([MEDVISION, *args], check=True)
    return time.perf_counter() - start


def _probabilities(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """P(PNEUMONIA), the truth (1: pneumonia) and the item of each row of predictions.csv."""
    import csv

    rows = list(csv.DictReader((folder / "predictions.csv").open()))
    return (np.array([float(r["p_PNEUMONIA"]) for r in rows]),
            np.array([int(r["label"] == "PNEUMONIA") for r in rows]), [r["item"] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-pretrain"))
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "pipeline"
    folder.mkdir(exist_ok=True)
    settings = yaml.safe_load((REPO / "pipelines" / "chest-xray-pneumonia" / "pipeline.yaml")
                              .read_text())
    settings.update(name="chest-bench-ssl")
    settings["preprocess"]["size"] = [args.size, args.size]
    settings["training"].update(swa_epochs=0, val_metric="auc")
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    budget = args.minutes * 60
    # one epoch of scratch training measures the epoch time; the rest fill the budget
    probe = out / "probe"
    if not (probe / "state.json").is_file():
        _run("train", str(folder), "--data", str(DATA), "-o", str(probe), "--epochs", "1")
    epoch_s = json.loads((probe / "state.json").read_text())["seconds"]
    scratch_epochs = max(1, math.floor(budget / epoch_s))
    half_epochs = max(1, math.floor(budget / 2 / epoch_s))
    print(f"epoch {epoch_s:.0f} s: scratch {scratch_epochs} epochs; pretrained: "
          f"{args.minutes / 2:g} min of pretraining, then {half_epochs} epochs", flush=True)
    scratch_s = _run("train", str(folder), "--data", str(DATA), "-o", str(out / "scratch"),
                     "--epochs", str(scratch_epochs))
    ssl_s = _run("pretrain", str(folder), "--data", str(DATA), "-o", str(out / "ssl"),
                 "--max-minutes", str(args.minutes / 2), "--epochs", "1000")
    ft_s = _run("train", str(folder), "--data", str(DATA), "-o", str(out / "finetune"),
                "--epochs", str(half_epochs), "--init-from",
                str(out / "ssl" / "pretrained.safetensors"))
    results = {}
    for name in ("scratch", "finetune"):
        target = out / f"eval-{name}"
        _run("evaluate", str(folder), "--data", str(DATA), "-o", str(target), "--split", "val",
             "--weights", str(out / name / "best.safetensors"), "--force")
        results[name] = json.loads((target / "metrics.json").read_text())
    from medvision.metrics import binary_auc, bootstrap_interval

    p_scratch, y, images = _probabilities(out / "eval-scratch")
    p_ft, y_ft, images_ft = _probabilities(out / "eval-finetune")
    assert images == images_ft and (y == y_ft).all()

    def difference(index: np.ndarray) -> float:
        return binary_auc(p_ft[index], y[index]) - binary_auc(p_scratch[index], y[index])

    paired = bootstrap_interval(difference, [np.flatnonzero(y == 0), np.flatnonzero(y == 1)])
    low, high = paired["ci95"]
    print(f"wall: scratch {scratch_s / 60:.1f} min; pretrained {ssl_s / 60:.1f} + "
          f"{ft_s / 60:.1f} min")
    for name, metrics in results.items():
        print(f"{name:9s} AUC {metrics['auc']['value']:.4f} {metrics['auc']['ci95']}  accuracy "
              f"{metrics['accuracy']['value']:.4f} {metrics['accuracy']['ci95']}")
    print(f"AUC difference (pretrained - scratch): "
          f"{paired['value']:+.4f} (95% CI {low:+.4f} .. {high:+.4f}, paired "
          "stratified bootstrap)")


if __name__ == "__main__":
    main()
