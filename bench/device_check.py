"""The GPU check: analysis on the GPU equals analysis on the CPU, how much faster it is, and
one training epoch in float32, bfloat16 and float16. Prints one Markdown table.

Run it through ``bench/device_check.sh`` on a machine with a CUDA GPU (at most 5 minutes on
one GPU); ``--device cpu --smoke`` runs the same code paths on tiny inputs (what the CPU test
suite checks), leaving out float16.

Rows:

* ``equal: <pipeline>``: the same studies analysed on the CPU and on the device: labels the
  same, probabilities within 1e-3, masks with Dice >= 0.99 between the two.
* ``throughput: <pipeline>``: images/s of ``analyze`` on the device, on the CPU, and of the
  plain batched MONAI loop on the device (bench_throughput.py's), with the ratios.
* ``inference <precision>: <pipeline>``: ``analyze`` on the device in bfloat16 (and float16
  on a GPU) against float32 there: labels kept, the largest probability change, the smallest
  mask Dice, and the speed ratio (whether inference may run in the lower precision).
* ``train <precision>``: one epoch of the chest pipeline at 224 px: seconds, samples/s, the
  ratio to float32 and the epoch's training loss.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_throughput import inputs, plain  # noqa: E402


def _analyze(pipeline: str, files: list[str], device: str, out: Path, batch: int,
             precision: str = "float32") -> tuple[dict[str, dict], float]:
    from medvision.analyze import AnalyzeOptions, analyze
    from medvision.audit.log import AuditLog
    from medvision.audit.records import Auditor, Pseudonymizer
    from medvision.infer import Predictor

    predictor = Predictor.from_pipeline(pipeline, device=device, precision=precision)
    auditor = Auditor(AuditLog(out.parent / f"{out.name}.sqlite"),
                      Pseudonymizer.from_file(out.parent / "audit.key"))
    started = time.perf_counter()
    analyze(files, predictor, out, auditor=auditor,
            options=AnalyzeOptions(batch_size=batch, progress=False))
    seconds = time.perf_counter() - started
    reports = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/report.json")}
    return reports, seconds


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def _compare(a: dict[str, dict], b: dict[str, dict], folder_a: Path, folder_b: Path
             ) -> tuple[int, float, float]:
    """Labels that agree, the largest probability difference, the smallest mask Dice."""
    import nibabel as nib

    labels = sum(a[k]["prediction"]["label"] == b[k]["prediction"]["label"] for k in a)
    worst_p, worst_dice = 0.0, 1.0
    for key, report in a.items():
        for name, p in (report["prediction"].get("probabilities") or {}).items():
            worst_p = max(worst_p, abs(p - b[key]["prediction"]["probabilities"][name]))
        mask = folder_a / key / "mask.nii.gz"
        if mask.is_file():
            worst_dice = min(worst_dice, _dice(nib.load(mask).get_fdata(),
                                               nib.load(folder_b / key / "mask.nii.gz"
                                                        ).get_fdata()))
    return labels, worst_p, worst_dice


def equal_and_throughput(pipeline: str, n: int, device: str, batch: int, tmp: Path,
                         precisions: list[str]) -> list[str]:
    files = inputs(pipeline, n)
    on_cpu, cpu_s = _analyze(pipeline, files, "cpu", tmp / f"{pipeline}-cpu", batch)
    on_dev, dev_s = _analyze(pipeline, files, device, tmp / f"{pipeline}-dev", batch)
    labels, worst_p, worst_dice = _compare(on_cpu, on_dev, tmp / f"{pipeline}-cpu",
                                           tmp / f"{pipeline}-dev")
    ok = labels == len(on_cpu) and worst_p <= 1e-3 and worst_dice >= 0.99
    base = plain(pipeline, files, device, batch)
    plain_rate = base["images"] / base["seconds"]
    dev_rate, cpu_rate = len(files) / dev_s, len(files) / cpu_s
    name = on_dev[next(iter(on_dev))]["pipeline"]["device"]["name"]
    return [f"| equal: {pipeline} | {'PASS' if ok else 'FAIL'}: labels {labels}/{len(on_cpu)}, "
            f"max |dp| {worst_p:.2e}, min mask Dice {worst_dice:.4f} | {device} ({name}) |",
            f"| throughput: {pipeline} | analyze {dev_rate:.1f} img/s on {device}, "
            f"{cpu_rate:.1f} on cpu (x{dev_rate / cpu_rate:.1f}); plain loop {plain_rate:.1f} "
            f"on {device} | analyze/plain {dev_rate / plain_rate:.2f} |"] + [
        _precision_row(pipeline, files, device, batch, tmp, precision, on_dev, dev_s)
        for precision in precisions if precision != "float32"]


def _precision_row(pipeline: str, files: list[str], device: str, batch: int, tmp: Path,
                   precision: str, reference: dict[str, dict], seconds: float) -> str:
    found, took = _analyze(pipeline, files, device, tmp / f"{pipeline}-{precision}", batch,
                           precision)
    labels, worst_p, worst_dice = _compare(reference, found, tmp / f"{pipeline}-dev",
                                           tmp / f"{pipeline}-{precision}")
    return (f"| inference {precision}: {pipeline} | labels {labels}/{len(reference)} as "
            f"float32, max |dp| {worst_p:.2e}, min mask Dice {worst_dice:.4f} | "
            f"x{seconds / took:.2f} the float32 speed |")


def train_epochs(device: str, items: int, precisions: list[str], tmp: Path) -> list[str]:
    from medvision.config import load_pipeline
    from medvision.train import DataSplit, discover_items, split_items, train

    data = REPO.parent / "shared" / "data" / "chest_xray" / "train"
    pipeline = load_pipeline("chest-xray-pneumonia")
    pipeline = pipeline.member(0) if pipeline.members else pipeline
    all_items = discover_items(pipeline, data)
    split = split_items(pipeline, all_items)
    step = max(1, len(split.train) // items)
    split = DataSplit(train=split.train[::step][:items], val=split.val[:64])
    rows, base = [], None
    for precision in precisions:
        chosen = pipeline.model_copy(update={"training": pipeline.training.model_copy(update={
            "precision": precision, "epochs": 1, "swa_epochs": 0, "cache": "memory",
            "num_workers": 0})})
        result = train(chosen, split, tmp / f"train-{precision}", device=device,
                       progress=False)
        row = result.history[-1]
        rate = float(row["samples_per_second"])
        base = base or rate
        rows.append(f"| train {precision} | {row['train_seconds']:.1f} s, {rate:.1f} "
                    f"samples/s, loss {row['train_loss']:.4f} | x{rate / base:.2f} of float32 |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny inputs (CPU tests)")
    args = parser.parse_args()
    from medvision.devices import describe, resolve_device

    device = str(resolve_device(args.device))
    n_chest, n_hippo, n_train = (4, 2, 16) if args.smoke else (200, 20, 1024)
    precisions = ["float32", "bfloat16"] + ([] if device == "cpu" else ["float16"])
    print(f"device check on {describe(device)}\n")
    print("| check | result | note |\n|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for pipeline, n in (("chest-xray-pneumonia", n_chest), ("hippocampus-seg", n_hippo)):
            for row in equal_and_throughput(pipeline, n, device, 4 if args.smoke else 32,
                                            tmp, precisions):
                print(row, flush=True)
        for row in train_epochs(device, n_train, precisions, tmp):
            print(row, flush=True)


if __name__ == "__main__":
    main()
