"""Analysis throughput: ``analyze`` against a plain batched MONAI loop, in one run.

The plain loop is what a researcher would write to get the same numbers: a MONAI DataLoader
(2 worker processes, batch 32) over the pipeline's own preprocessing, every network of the
shipped ensemble with its flip pass, the mean of calibrated softmax, and Captum GradCAM at the
pipeline's layer for every member (the saliency ``analyze`` reports), upsampled to the
network's input. It writes nothing. ``analyze`` does that and everything else: reports, NIfTI
maps, figures, pages, audit records.

Each mode runs in a fresh process (so its peak resident memory is its own); the clock starts
after imports and model loading, for both. Prints images/s, the ratio analyze / plain (the
goal is >= 0.8 on the chest pipeline) and peak RSS, and with ``--memory-check N`` the peak
RSS of analyze over N images against the first count (streaming: within 10%).

    .venv/bin/python bench/bench_throughput.py [--images 200] [--pipeline chest-xray-pneumonia]
        [--device cpu] [--batch-size 32] [--memory-check 800]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def inputs(pipeline: str, n: int) -> list[str]:
    if pipeline == "chest-xray-pneumonia":
        files = sorted((DATA / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg")) + sorted(
            (DATA / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))
        files = files[:: max(1, len(files) // n)][:n]
    elif pipeline == "hippocampus-seg":
        files = sorted((DATA / "hippocampus" / "images").glob("*.nii.gz"))[:n]
    else:
        raise SystemExit(f"no bench inputs for {pipeline}")
    return [str(p) for p in files]


def plain(pipeline_name: str, files: list[str], device: str, batch: int) -> dict[str, float]:
    import torch
    from captum.attr import LayerAttribution, LayerGradCam
    from monai.data import DataLoader, Dataset

    from medvision.infer import Predictor
    from medvision.models.registry import patch_forward
    from medvision.transforms import build_transforms

    predictor = Predictor.from_pipeline(pipeline_name, device=device)
    pipeline = predictor.pipeline
    networks = predictor.networks
    temps = ([m.temperature for m in predictor.bundle.members] or [predictor.temperature])
    seg = pipeline.task == "segmentation"
    transform = build_transforms(pipeline, train=False)
    data = [{"image": f} for f in files]
    if seg:
        data = [{"image": f, "label": f} for f in files]  # the label is not used
    loader = DataLoader(Dataset(data, transform=transform), batch_size=1 if seg else batch,
                        num_workers=2, shuffle=False)
    target_device = predictor.device
    started = time.perf_counter()
    count = 0
    for part in loader:
        image = torch.as_tensor(part["image"]).to(target_device)
        with torch.no_grad():
            probs = 0
            for network, t in zip(networks, temps, strict=True):
                out = patch_forward(pipeline, network, image)
                for axis in pipeline.inference.tta_flips:
                    flipped = patch_forward(pipeline, network, torch.flip(image, (axis + 2,)))
                    out = out + (torch.flip(flipped, (axis + 2,)) if seg else flipped)
                out = out / (1 + len(pipeline.inference.tta_flips))
                probs = probs + torch.softmax(out / t, dim=1)
            probs = probs / len(networks)
        if not seg:
            target = probs.argmax(dim=1).tolist()
            layer = pipeline.explanation.layer
            for network in networks:
                module = dict(network.named_modules())[layer]
                maps = LayerGradCam(network, module).attribute(
                    image.clone().requires_grad_(True), target=target,
                    relu_attributions=True)
                LayerAttribution.interpolate(maps, tuple(image.shape[2:]),
                                             interpolate_mode="bilinear").cpu()
        count += image.shape[0]
    seconds = time.perf_counter() - started
    return {"images": count, "seconds": seconds}


def analyze_mode(pipeline_name: str, files: list[str], device: str, batch: int
                 ) -> dict[str, float]:
    from medvision.analyze import AnalyzeOptions, analyze
    from medvision.audit.log import AuditLog
    from medvision.audit.records import Auditor, Pseudonymizer
    from medvision.infer import Predictor

    predictor = Predictor.from_pipeline(pipeline_name, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        auditor = Auditor(AuditLog(Path(tmp) / "audit.sqlite"),
                          Pseudonymizer.from_file(Path(tmp) / "audit.key"))
        started = time.perf_counter()
        results = analyze(files, predictor, Path(tmp) / "out", auditor=auditor,
                          options=AnalyzeOptions(batch_size=batch, progress=False))
        seconds = time.perf_counter() - started
    bad = [r.study for r in results if r.status not in ("ok", "flagged")]
    if bad:
        raise SystemExit(f"analyze failed on {len(bad)} studies: {bad[:3]}")
    return {"images": len(results), "seconds": seconds}


def child(mode: str, pipeline: str, n: int, device: str, batch: int) -> None:
    import resource

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    files = inputs(pipeline, n)
    result = (plain if mode == "plain" else analyze_mode)(pipeline, files, device, batch)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the largest reader process (DataLoader workers; ended by now)
    result["child_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(result))


def run(mode: str, pipeline: str, n: int, device: str, batch: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--pipeline", pipeline,
                          "--images", str(n), "--device", device, "--batch-size", str(batch)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", action="append")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--memory-check", type=int, default=0, metavar="N")
    parser.add_argument("--child", choices=["plain", "analyze"])
    args = parser.parse_args()
    pipelines = args.pipeline or ["chest-xray-pneumonia"]
    if args.child:
        child(args.child, pipelines[0], args.images, args.device, args.batch_size)
        return
    print("| pipeline | images | plain images/s | analyze images/s | ratio | plain peak MB | "
          "analyze peak MB |\n|---|---|---|---|---|---|---|")
    for name in pipelines:
        n = args.images if name == "chest-xray-pneumonia" else min(args.images, 40)
        base = run("plain", name, n, args.device, args.batch_size)
        ours = run("analyze", name, n, args.device, args.batch_size)
        rate = {k: v["images"] / v["seconds"] for k, v in (("plain", base), ("ours", ours))}
        print(f"| {name} | {n} | {rate['plain']:.2f} | {rate['ours']:.2f} | "
              f"{rate['ours'] / rate['plain']:.2f} | {base['peak_rss_mb']:.0f} | "
              f"{ours['peak_rss_mb']:.0f} |", flush=True)
        if args.memory_check and name == pipelines[0]:
            more = run("analyze", name, args.memory_check, args.device, args.batch_size)
            print(f"\nanalyze peak RSS: {n} images {ours['peak_rss_mb']:.0f} MB, "
                  f"{args.memory_check} images {more['peak_rss_mb']:.0f} MB "
                  f"(ratio {more['peak_rss_mb'] / ours['peak_rss_mb']:.2f}; goal within 10%); "
                  f"largest reader process {ours['child_peak_rss_mb']:.0f} and "
                  f"{more['child_peak_rss_mb']:.0f} MB; {args.memory_check} images at "
                  f"{more['images'] / more['seconds']:.2f} images/s")


if __name__ == "__main__":
    main()
