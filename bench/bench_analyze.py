"""Analyze latency and memory per shipped pipeline, against plain MONAI inference.

For each pipeline, in one run: (a) plain MONAI inference of the same network and weights
(LoadImage + the same preprocessing + forward), (b) the medvision prediction path without
saliency, (c) with its configured saliency, (d) with Integrated Gradients, and (e) the whole
``analyze`` path (reports, NIfTI, PNG) per study. Each configuration runs in a fresh process so
its peak resident memory (ru_maxrss) is its own. Prints per-study medians and ratios.

    .venv/bin/python bench/bench_analyze.py [--studies 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def inputs(pipeline: str, n: int) -> list[str]:
    if pipeline == "chest-xray-pneumonia":
        return [str(p) for p in sorted((DATA / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))[:n]]
    if pipeline == "hippocampus-seg":
        return [str(p) for p in sorted((DATA / "hippocampus" / "images").glob("*.nii.gz"))[:n]]
    raise SystemExit(f"no bench inputs for {pipeline}")


def run_mode(pipeline: str, mode: str, files: list[str]) -> dict[str, float]:
    """Runs in the child process: time each study; returns medians and peak RSS."""
    import numpy as np
    import torch

    from medvision.explain import explain
    from medvision.infer import Predictor
    from medvision.io import read_volume

    torch.set_num_threads(2)
    predictor = Predictor.from_pipeline(pipeline)
    times = []
    if mode == "monai":
        from monai import transforms as mt

        from medvision.transforms.chain import preprocess_transforms

        p = predictor.pipeline
        chain = mt.Compose([mt.LoadImaged("image", image_only=True),
                            mt.EnsureChannelFirstd("image"),
                            mt.Lambdad("image", lambda x: x.mean(0, keepdim=True)
                                       if x.shape[0] > p.in_channels else x),
                            *preprocess_transforms(p, train=False, with_label=False)])
        for f in [files[0], *files]:  # first call warms up
            t0 = time.perf_counter()
            image = chain({"image": f})["image"].unsqueeze(0)
            with torch.no_grad():
                out = predictor.model(image)
            torch.softmax(out, 1)
            times.append(time.perf_counter() - t0)
    elif mode == "analyze":
        from medvision.analyze import analyze
        from medvision.audit import AuditLog, Auditor, Pseudonymizer

        with tempfile.TemporaryDirectory() as tmp:
            auditor = Auditor(AuditLog(Path(tmp) / "audit.sqlite"), Pseudonymizer(b"b" * 32))
            analyze([files[0]], predictor, Path(tmp) / "warm", auditor=auditor)
            for f in files:
                t0 = time.perf_counter()
                analyze([f], predictor, Path(tmp) / Path(f).name, auditor=auditor)
                times.append(time.perf_counter() - t0)
        times.insert(0, times[0])
    else:
        method = {"predict": None, "saliency": predictor.pipeline.explanation.method,
                  "ig": "integrated_gradients"}[mode]
        for f in [files[0], *files]:
            t0 = time.perf_counter()
            volume = read_volume(f)
            prepared = predictor.prepare(volume)
            prediction = predictor.predict(prepared)
            if method:
                explain(predictor, prepared, prediction, method=method)
            times.append(time.perf_counter() - t0)
    times = times[1:]
    return {"median_s": statistics.median(times), "max_rss_mb":
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "n": len(times),
            "mean_s": float(np.mean(times))}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--pipelines", nargs="*", default=["chest-xray-pneumonia", "hippocampus-seg"])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        pipeline, mode = args.child
        print(json.dumps(run_mode(pipeline, mode, inputs(pipeline, args.studies))))
        return 0
    for pipeline in args.pipelines:
        results = {}
        for mode in ("monai", "predict", "saliency", "ig", "analyze"):
            out = subprocess.run([sys.executable, __file__, "--studies", str(args.studies),
                                  "--child", pipeline, mode], capture_output=True, text=True,
                                 check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results["predict"]["median_s"]
        print(f"\n{pipeline} ({results['predict']['n']} studies, medians per study):")
        for mode, r in results.items():
            print(f"  {mode:>9}: {r['median_s'] * 1000:8.0f} ms  peak RSS {r['max_rss_mb']:6.0f} MB")
        print(f"  ratios: predict/plain MONAI {base / results['monai']['median_s']:.2f}; "
              f"configured saliency/predict {results['saliency']['median_s'] / base:.2f}; "
              f"Integrated Gradients/predict {results['ig']['median_s'] / base:.2f}; "
              f"whole analyze/plain MONAI {results['analyze']['median_s'] / results['monai']['median_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
