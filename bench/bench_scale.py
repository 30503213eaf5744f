"""Throughput of analyze with 1 and 2 Dask workers, and onnxruntime against PyTorch.

Starts a real scheduler and workers on 127.0.0.1 (separate processes), analyzes the same chest
X-rays with one worker and then two, and prints studies/s and the scaling ratio. Then times
prediction (no saliency) with the PyTorch and ONNX backends on the same inputs, and prints the
speed ratio. On a 2-core machine two single-threaded workers can at best double one worker.

    .venv/bin/python bench/bench_scale.py [--studies 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "chest_xray" / "train"
BIN = Path(sys.executable).parent


def _cluster(tmp: Path, workers: int) -> tuple[str, list[subprocess.Popen]]:
    sched_file = tmp / f"scheduler-{workers}.json"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                               "0", "--no-dashboard", "--scheduler-file", str(sched_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    while not sched_file.exists():
        time.sleep(0.2)
    address = json.loads(sched_file.read_text())["address"]
    for i in range(workers):
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1",
                                       "--no-nanny", "--no-dashboard", "--host", "127.0.0.1",
                                       "--local-directory", str(tmp / f"w{workers}-{i}")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    with Client(address) as client:
        client.wait_for_workers(workers, timeout=120)
    return address, procs


def _analyze(inputs: Path, out: Path, scheduler: str | None) -> float:
    command = [str(BIN / "medvision"), "analyze", str(inputs), "--pipeline",
               "chest-xray-pneumonia", "-o", str(out), "--audit-log", str(out / "audit.sqlite")]
    if scheduler:
        command += ["--scheduler", scheduler]
    t0 = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        inputs = tmp / "in"
        inputs.mkdir()
        files = sorted(DATA.glob("*/*.jpeg"))[:: max(1, 5216 // args.studies)][: args.studies]
        for path in files:
            shutil.copy(path, inputs / path.name)
        rates = {}
        for workers in (1, 2):
            address, procs = _cluster(tmp, workers)
            try:
                _analyze(inputs, tmp / f"warm{workers}", address)  # workers load the model
                seconds = _analyze(inputs, tmp / f"out{workers}", address)
            finally:
                for proc in procs:
                    proc.kill()
            rates[workers] = len(files) / seconds
            print(f"{workers} worker(s): {rates[workers]:.2f} studies/s ({seconds:.1f} s)")
        print(f"scaling 2 workers / 1 worker: {rates[2] / rates[1]:.2f}")

        from medvision.infer import Predictor
        from medvision.infer.onnx_backend import export_onnx
        from medvision.io import read_volume

        folder = tmp / "pipeline"
        shutil.copytree(REPO / "pipelines" / "chest-xray-pneumonia", folder)
        torch_p = Predictor.from_pipeline(folder)
        export_onnx(torch_p.model, tuple(torch_p.pipeline.preprocess.size or (192, 192)), 1,
                    folder / "model.onnx", dynamic_spatial=False)
        onnx_p = Predictor.from_pipeline(folder, backend="onnx")
        prepared = [torch_p.prepare(read_volume(p)) for p in files]
        timings = {}
        for name, predictor in (("torch", torch_p), ("onnx", onnx_p)):
            predictor.logits(prepared[0].image)
            per = []
            for item in prepared:
                t0 = time.perf_counter()
                predictor.logits(item.image)
                per.append(time.perf_counter() - t0)
            timings[name] = statistics.median(per)
        print(f"prediction per image: torch {timings['torch'] * 1e3:.1f} ms, onnx "
              f"{timings['onnx'] * 1e3:.1f} ms; speed ratio onnx/torch "
              f"{timings['torch'] / timings['onnx']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
