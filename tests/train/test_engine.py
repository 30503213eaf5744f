"""The training engine: devices, the run folder's consistency, sharded sampling, and
DistributedDataParallel on CPUs (gloo) against one process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medvision.cli.main import main
from medvision.devices import available_devices, describe, resolve_device
from medvision.errors import ConfigError, DeviceError
from medvision.train.engine import (
    METRICS_FILE,
    STATE_FILE,
    Engine,
    RunFolder,
    ShardedSampler,
    TrainingState,
)

from conftest import chest_subset, hippocampus_subset

REPO = Path(__file__).resolve().parents[2]
NO_CUDA = not torch.cuda.is_available()


def test_devices_resolve_and_name_what_is_missing() -> None:
    assert str(resolve_device("cpu")) == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else
                                           resolve_device("auto").type)
    assert "cpu" in available_devices()
    info = describe("cpu")
    assert info.device == "cpu" and info.name
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    missing = f"cuda:{torch.cuda.device_count() + 3}"
    with pytest.raises(DeviceError, match=rf"'{missing}' asked for, but it is not there; "
                                          r"found: cpu"):
        resolve_device(missing)
    assert issubclass(DeviceError, ConfigError)  # exit 2, as every usage error


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [
    ["train", "--pipeline", "chest-xray-pneumonia", "--data", "DATA", "-o", "OUT", "--epochs",
     "1"],
    ["evaluate", "--pipeline", "chest-xray-pneumonia", "--data", "DATA", "-o", "OUT"],
    ["analyze", "DATA", "--pipeline", "chest-xray-pneumonia", "-o", "OUT"],
    ["pretrain", "--pipeline", "chest-xray-pneumonia", "--data", "DATA", "-o", "OUT",
     "--epochs", "1"],
    ["synthesize", "sample", "--pipeline", "chest-xray-pneumonia", "--generator", "OUT",
     "-o", "OUT2", "--per-class", "1"],
    ["plan", "DATA", "--budget-minutes", "1", "-o", "OUT/plan.yaml"],
])
def test_a_missing_gpu_is_a_usage_error_on_every_command(
        command: list[str], shared_data: Path, tmp_path: Path, capsys) -> None:
    data = chest_subset(shared_data, tmp_path / "data", per_class=2)
    (tmp_path / "out").mkdir()
    args = [str(data) if a == "DATA" else str(tmp_path / "out") if a == "OUT" else
            a.replace("OUT", str(tmp_path / "out")) for a in command]
    assert main([*args, "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda:1' asked for, but it is not there; found: cpu" in err
    assert "Traceback" not in err
    assert not list((tmp_path / "out").glob("*/report.json"))


@pytest.mark.skipif(not NO_CUDA, reason="float16 on a CPU-only machine")
def test_float16_is_refused_on_the_cpu(shared_data: Path, tmp_path: Path, capsys) -> None:
    data = chest_subset(shared_data, tmp_path / "data", per_class=2)
    assert main(["train", "--pipeline", "chest-xray-pneumonia", "--data", str(data), "-o",
                 str(tmp_path / "run"), "--precision", "float16", "--device", "cpu"]) == 2
    assert "float16 runs on a GPU only" in capsys.readouterr().err
    for command in (["analyze", str(data)], ["evaluate", "--data", str(data)]):
        assert main([*command, "--pipeline", "chest-xray-pneumonia", "-o",
                     str(tmp_path / "out"), "--precision", "float16", "--device", "cpu"]) == 2
        assert "float16 runs on a GPU only" in capsys.readouterr().err


@pytest.mark.parametrize("weights", [None, [1.0, 1.0, 1.0, 4.0, 4.0, 0.5, 0.5, 2.0, 1.0]])
def test_sharded_sampling_deals_the_single_process_batches(weights) -> None:
    """Batch k of rank r holds items r, r+2, ... of the one-process batch k: two processes
    see exactly what one would, also with class-balanced (weighted) draws; every epoch has
    its own order, the same again when a run resumes."""
    size, batch = 9 if weights else 10, 4
    one = list(ShardedSampler(size, weights=weights, shuffle=True, seed=3))
    ranks = [list(ShardedSampler(size, weights=weights, shuffle=True, seed=3, rank=r,
                                 world_size=2)) for r in (0, 1)]
    for k in range(0, size - size % batch, batch):
        full = one[k:k + batch]
        halves = ranks[0][k // 2:k // 2 + batch // 2] + ranks[1][k // 2:k // 2 + batch // 2]
        assert sorted(full) == sorted(halves)
    sampler = ShardedSampler(size, weights=weights, shuffle=True, seed=3)
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != one
    again = ShardedSampler(size, weights=weights, shuffle=True, seed=3)
    again.set_epoch(1)
    assert list(again) == second


def test_run_folder_keeps_metrics_and_state_together(tmp_path: Path) -> None:
    """metrics.csv is written from the state's history after the state, so a kill between
    the two is mended when the run resumes: each epoch once, as the state says."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    run = RunFolder(tmp_path / "run", resume=False)
    state = TrainingState()
    for epoch in (1, 2):
        state = state.replace(epoch=epoch, history=(*state.history,
                                                    {"epoch": epoch, "loss": 1.0 / epoch}))
        run.checkpoint(state, model=model, optimizer=optimizer, scheduler=None)
    # a kill after epoch 3's row reached metrics.csv but before its state did
    with (tmp_path / "run" / METRICS_FILE).open("a") as handle:
        handle.write("3,0.3333\n")
    with pytest.raises(ConfigError, match="not empty"):
        RunFolder(tmp_path / "run", resume=False)
    resumed = RunFolder(tmp_path / "run", resume=True).restore(
        model=model, optimizer=optimizer, scheduler=None)
    assert resumed.epoch == 2
    rows = list(csv.DictReader((tmp_path / "run" / METRICS_FILE).open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_a_checkpoint_is_whole_or_absent_after_a_kill(tmp_path: Path) -> None:
    """The weights of an epoch whose state.json never got written are dropped on resume;
    those of an epoch whose state.json did are put in place: never the weights of one epoch
    with the state of another."""
    from medvision.models.checkpoint import save_weights

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    folder = tmp_path / "run"
    run = RunFolder(folder, resume=False)
    first = TrainingState().replace(epoch=1, history=({"epoch": 1, "loss": 1.0},))
    run.checkpoint(first, model=model, optimizer=optimizer, scheduler=None)
    kept = model.weight.detach().clone()
    assert not list(folder.glob("*.next"))
    # killed in epoch 2's checkpoint before its commit: new weights written, state not
    with torch.no_grad():
        model.weight.add_(1.0)
    save_weights(model, folder / "last.safetensors.next", metadata={"epoch": "2"})
    back = RunFolder(folder, resume=True).restore(model=model, optimizer=optimizer,
                                                  scheduler=None)
    assert back.epoch == 1 and torch.equal(model.weight, kept)
    assert not list(folder.glob("*.next"))
    # killed after the commit, before the new files took their places
    second = first.replace(epoch=2, history=(*first.history, {"epoch": 2, "loss": 0.5}))
    with torch.no_grad():
        model.weight.add_(1.0)
    moved = model.weight.detach().clone()
    run.checkpoint(second, model=model, optimizer=optimizer, scheduler=None)
    (folder / "last.safetensors").rename(folder / "last.safetensors.next")
    (folder / "optimizer.safetensors").rename(folder / "optimizer.safetensors.next")
    with torch.no_grad():
        model.weight.zero_()
    again = RunFolder(folder, resume=True).restore(model=model, optimizer=optimizer,
                                                   scheduler=None)
    assert again.epoch == 2 and torch.equal(model.weight, moved)
    assert not list(folder.glob("*.next"))


def test_states_written_before_the_engine_still_resume() -> None:
    old = {"epoch": 4, "best": 0.61, "best_epoch": 2, "optimizer_param_groups": [],
           "method": "masked"}
    state = TrainingState.from_json(old)
    assert (state.epoch, state.best_metric, state.best_epoch) == (4, 0.61, 2)
    assert state.extra == {"method": "masked"}
    assert TrainingState.from_json(state.as_json()) == state


def test_engine_records_its_device_and_divides_the_batch() -> None:
    engine = Engine(device="cpu")
    assert engine.describe()["device"] == "cpu" and engine.describe()["processes"] == 1
    assert engine.local_batch(6) == 6
    with pytest.raises(DeviceError):
        Engine(device="cpu", precision="float16")


def _no_augmentation(tmp_path: Path) -> Path:
    settings = yaml.safe_load((REPO / "pipelines" / "hippocampus-seg" /
                               "pipeline.yaml").read_text())
    settings.update(name="hippo-ddp", members=[])
    settings["augment"] = {"prob": 0.0}
    # SGD: an update proportional to the gradient, so rounding stays rounding (Adam divides
    # each gradient by its own magnitude and turns rounding noise in near-zero gradients
    # into full-size steps)
    settings["optimizer"] = {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}
    settings["training"].update(batch_size=2, epochs=1, swa_epochs=0, threads=1,
                                num_workers=0)
    folder = tmp_path / "hippo-ddp"
    folder.mkdir()
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    return folder


def test_ddp_on_two_cpu_processes_equals_one_process(shared_data: Path, tmp_path: Path) -> None:
    """torchrun with 2 gloo processes, each half the batch, ends the epoch with the weights
    of 1 process with the whole batch. DDP averages the two halves' gradients, which for a
    loss that is a mean over the batch (Dice and cross-entropy per case, instance norm) is
    the whole batch's gradient; what differs is float rounding in the sums (summing
    in another order), so with SGD the weights agree to 1e-5 of the largest weight. (With
    AdamW they differ by up to 1% of it after one epoch, measured: Adam's first steps are
    about lr times the sign of each gradient, so rounding noise in near-zero gradients
    flips whole steps.)"""
    data = hippocampus_subset(shared_data, tmp_path / "data", slice(0, 8))
    pipeline = _no_augmentation(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [sys.executable, "-m", "medvision", "train", "--pipeline", str(pipeline),
              "--data", str(data), "--limit", "4", "--device", "cpu"]
    one = subprocess.run([*common, "-o", str(tmp_path / "one")], env=env, text=True,
                         capture_output=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*common, "-o", str(tmp_path / "two"), "--nproc", "2"], env=env,
                         text=True, capture_output=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trained 1 epoch") == 1  # rank 0 alone reports
    a = load_file(str(tmp_path / "one" / "last.safetensors"))
    b = load_file(str(tmp_path / "two" / "last.safetensors"))
    assert a.keys() == b.keys()
    scale = max(float(t.abs().max()) for t in a.values() if t.is_floating_point())
    worst = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert worst <= 1e-5 * scale
    state = json.loads((tmp_path / "two" / STATE_FILE).read_text())
    assert state["epoch"] == 1 and state["finished"]
    rows = list(csv.DictReader((tmp_path / "two" / METRICS_FILE).open()))
    assert [r["epoch"] for r in rows] == ["1"]
    one_rows = list(csv.DictReader((tmp_path / "one" / METRICS_FILE).open()))
    assert float(rows[0]["train_loss"]) == pytest.approx(float(one_rows[0]["train_loss"]),
                                                         rel=1e-4)


@pytest.mark.slow
def test_the_gpu_check_runs_its_code_paths_on_the_cpu() -> None:
    """bench/device_check.py --device cpu --smoke: every row of the GPU check, on tiny inputs
    (the CPU against itself must be equal)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(repo / "bench" / "device_check.py"), "--device",
                          "cpu", "--smoke"], capture_output=True, text=True, check=False,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert sum("equal:" in r and "PASS" in r for r in rows) == 2
    assert any(r.startswith("| inference bfloat16: chest") for r in rows)
    assert sum(r.startswith("| train ") for r in rows) == 2
