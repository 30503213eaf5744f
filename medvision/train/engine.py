"""The one training engine: a run folder, a typed training state, and an epoch driver that
every training loop (supervised, detection, self-supervised pretraining, the generator) uses.

What is written once here and nowhere else:

* the run folder's file names (:class:`RunFolder`), its creation rules (empty unless
  resuming) and its checkpoint: ``last.safetensors``, ``optimizer.safetensors`` and
  ``state.json`` written atomically after each epoch, then ``metrics.csv`` rewritten from the
  state's history, so the two never disagree after a kill (a resumed run rewrites the file
  from the state it resumes);
* :class:`TrainingState`, the typed state a run resumes from;
* :class:`Engine`: the device (``--device``), the precision (float32, bfloat16, or float16
  with a gradient scaler on CUDA), distribution (DistributedDataParallel under ``torchrun``,
  rank 0 alone writing), loaders (pinned memory on CUDA, class-balanced sampling split
  across ranks), and the epoch driver (:meth:`Engine.run_epoch`: batches to the device,
  the time spent waiting for data, a progress bar in a terminal) and the epoch loop
  (:meth:`Engine.fit`: resume point, ``--max-minutes``, early stop).

A loop supplies what is its own: how one batch becomes a loss, and what happens at the end
of an epoch (validation, best-epoch choice, weight averaging).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvision.atomic import signals_held, write_text_atomic
from medvision.errors import CheckpointError, ConfigError
from medvision.models import load_weights, save_weights

__all__ = ["BEST_EPOCH_FILE", "BEST_FILE", "EpochStats", "Engine", "LAST_FILE", "METRICS_FILE",
           "OPTIMIZER_FILE", "PIPELINE_FILE", "RunFolder", "SPLIT_FILE", "STATE_FILE",
           "SWA_FILE", "TrainingState"]

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
METRICS_FILE = "metrics.csv"
LAST_FILE = "last.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
BEST_FILE = "best.safetensors"
BEST_EPOCH_FILE = "best_epoch.safetensors"
SWA_FILE = "swa.safetensors"
PIPELINE_FILE = "pipeline.yaml"
SPLIT_FILE = "split.json"
SKIPPED_FILE = "skipped.json"
INIT_FILE = "init.json"

Row = dict[str, Any]


@dataclass(frozen=True)
class TrainingState:
    """Where a run stands after its last finished epoch; what ``--resume`` continues from."""

    epoch: int = 0
    step: int = 0
    """Optimiser steps taken (every loop counts them)."""
    seconds: float = 0.0
    """Training time so far, over every session of the run."""
    loss: float | None = None
    """The last epoch's training loss."""
    best_metric: float | None = None
    best_epoch: int = 0
    stale_epochs: int = 0
    history: tuple[Row, ...] = ()
    """One row per epoch: what ``metrics.csv`` holds."""
    config_hash: str | None = None
    early_stopped: bool = False
    finished: bool = False
    swa_count: int = 0
    swa: Mapping[str, float] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    """What one loop keeps of its own (the pretraining method...)."""

    def replace(self, **changes: Any) -> TrainingState:
        return dataclasses.replace(self, **changes)

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["history"] = [dict(r) for r in self.history]
        out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainingState:
        """The state from a ``state.json`` (also those written before this class: detection's
        ``best`` is its best metric; unknown keys go to ``extra``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["history"] = tuple(dict(r) for r in data.get("history", ()))
        if "best" in data and "best_metric" not in data:
            values["best_metric"] = data["best"]
        skip = names | {"best", "optimizer_param_groups", "optimizer_scalars", "scheduler",
                        "scaler"}
        values["extra"] = {**dict(data.get("extra", {})),
                           **{k: v for k, v in data.items() if k not in skip}}
        return cls(**values)


class RunFolder:
    """A training run's folder: every file name, and the checkpoint written atomically.

    Only the main process (rank 0 under DDP) writes; the others read.
    """

    def __init__(self, path: str | os.PathLike[str], *, resume: bool, writer: bool = True
                 ) -> None:
        """Open ``path``, created when absent.

        Raises:
            ConfigError: the folder holds files and ``resume`` is false.
        """
        self.path = Path(path)
        self.writer = writer
        if self.path.exists() and any(self.path.iterdir()) and not resume:
            raise ConfigError(f"{self.path}: run folder is not empty; pass --resume to "
                              "continue it or choose a new folder")
        if writer:
            self.path.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def has_state(self) -> bool:
        return (self.path / STATE_FILE).is_file()

    def write_text(self, name: str, text: str) -> None:
        if self.writer:
            write_text_atomic(self.path / name, text)

    def write_json(self, name: str, value: Any) -> None:
        self.write_text(name, json.dumps(value, indent=1))

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def write_pipeline(self, pipeline: Any) -> None:
        import yaml

        self.write_text(PIPELINE_FILE, str(yaml.safe_dump(pipeline.model_dump(mode="json"),
                                                          sort_keys=False)))

    def save_weights(self, model: Any, name: str, metadata: dict[str, str] | None = None
                     ) -> None:
        if self.writer:
            save_weights(_unwrapped(model), self.path / name, metadata=metadata)

    def checkpoint(self, state: TrainingState, *, model: Any, optimizer: Any, scheduler: Any,
                   scaler: Any = None) -> None:
        """Write the resumable state (weights, optimiser, scheduler, RNG, state) and then
        ``metrics.csv`` from the state's history, in two phases: the weights and optimiser go
        to ``*.next`` files (each naming its epoch), then ``state.json`` is replaced (the
        commit), then the ``*.next`` files take their places. A process killed anywhere in
        between leaves either the old checkpoint or the new one: :meth:`restore` rolls the
        ``*.next`` files forward when ``state.json`` has their epoch, else drops them.
        SIGINT and SIGTERM wait until the checkpoint is whole (SIGKILL cannot)."""
        if not self.writer:
            return
        with signals_held():
            self._checkpoint(state, model=model, optimizer=optimizer, scheduler=scheduler,
                             scaler=scaler)

    def _checkpoint(self, state: TrainingState, *, model: Any, optimizer: Any, scheduler: Any,
                    scaler: Any) -> None:
        import torch
        from safetensors.torch import save_file

        stamp = {"epoch": str(state.epoch)}
        save_weights(_unwrapped(model), self.path / (LAST_FILE + _NEXT), metadata=stamp)
        opt = optimizer.state_dict()
        tensors: dict[str, Any] = {}
        scalars: dict[str, dict[str, float]] = {}
        for index, slots in opt["state"].items():
            for name, value in slots.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[name] = value
        tensors["rng.torch"] = torch.get_rng_state()
        tmp = self.path / (OPTIMIZER_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata=stamp)
        os.replace(tmp, self.path / (OPTIMIZER_FILE + _NEXT))
        write_text_atomic(self.path / STATE_FILE, json.dumps({
            **state.as_json(),
            "optimizer_param_groups": opt["param_groups"],
            "optimizer_scalars": scalars,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
        }, indent=2))
        self._settle(state.epoch)
        self.write_metrics(state.history)

    def _settle(self, epoch: int) -> None:
        """Finish or undo a checkpoint's second phase: ``*.next`` files of ``epoch`` (the
        one ``state.json`` holds) replace the current ones; others are left-overs of a
        checkpoint that never committed."""
        from safetensors import safe_open

        for name in (LAST_FILE, OPTIMIZER_FILE):
            pending = self.path / (name + _NEXT)
            if not pending.is_file():
                continue
            try:
                with safe_open(str(pending), "pt") as handle:
                    stamped = (handle.metadata() or {}).get("epoch")
            except Exception:  # noqa: BLE001 - a torn file is a left-over too
                stamped = None
            if stamped == str(epoch):
                os.replace(pending, self.path / name)
            else:
                pending.unlink()

    def update_state(self, state: TrainingState) -> None:
        """Rewrite ``state.json``'s own keys (optimiser and scheduler parts kept)."""
        if not self.writer:
            return
        path = self.path / STATE_FILE
        current = json.loads(path.read_text()) if path.is_file() else {}
        write_text_atomic(path, json.dumps({**current, **state.as_json()}, indent=2))
        self.write_metrics(state.history)

    def write_metrics(self, history: Sequence[Row]) -> None:
        """``metrics.csv``: one row per epoch, written whole and atomically."""
        if not self.writer or not history:
            return
        columns: list[str] = []
        for row in history:
            columns += [k for k in row if k not in columns]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        write_text_atomic(self.path / METRICS_FILE, text.getvalue())

    def restore(self, *, model: Any, optimizer: Any, scheduler: Any, scaler: Any = None,
                device: Any = None) -> TrainingState:
        """Load what :meth:`checkpoint` wrote into the objects; returns the state.

        Raises:
            CheckpointError: no complete or a corrupt checkpoint.
        """
        import torch
        from safetensors.torch import load_file

        state_file = self.path / STATE_FILE
        if state_file.is_file():
            try:
                self._settle(int(json.loads(state_file.read_text()).get("epoch", -1)))
            except (OSError, ValueError, TypeError) as e:
                raise CheckpointError(f"{self.path}: unreadable {STATE_FILE} ({e})") from e
        if not state_file.is_file() or not (self.path / LAST_FILE).is_file():
            raise CheckpointError(f"{self.path}: no checkpoint to resume from ({STATE_FILE} "
                                  f"and {LAST_FILE})")
        try:
            data = json.loads(state_file.read_text())
            tensors = load_file(str(self.path / OPTIMIZER_FILE))
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: unreadable checkpoint ({e})") from e
        load_weights(_unwrapped(model), self.path / LAST_FILE, device=device)
        slots: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("rng."):
                continue
            index, name = key.split(".", 1)
            slots.setdefault(int(index), {})[name] = value
        for index, values in data.get("optimizer_scalars", {}).items():
            slots.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict({"state": slots,
                                   "param_groups": data["optimizer_param_groups"]})
        if scheduler is not None and data.get("scheduler") is not None:
            scheduler.load_state_dict(data["scheduler"])
        if scaler is not None and data.get("scaler"):
            scaler.load_state_dict(data["scaler"])
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        state = TrainingState.from_json(data)
        self.write_metrics(state.history)  # a kill between state and metrics is mended here
        return state


@dataclass(frozen=True)
class EpochStats:
    """What one pass over the training loader measured."""

    loss: float
    """Mean training loss per sample."""
    samples: int
    steps: int
    seconds: float
    data_wait_share: float
    """Share of the epoch spent waiting for the loader rather than computing."""
    parts: Mapping[str, float] = field(default_factory=dict)
    """Mean of each named loss part (detection's classification and box losses)."""
    stopped: bool = False
    """The epoch ended early (a step limit)."""

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class StepOutput:
    """What a loop's training step returns to the driver."""

    loss: Any
    """The loss to minimise (a scalar tensor)."""
    samples: int
    parts: Mapping[str, Any] = field(default_factory=dict)


def _unwrapped(model: Any) -> Any:
    """The network inside a ``DistributedDataParallel`` wrapper (or the network itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


class Engine:
    """Device, precision and distribution for a training run, and the epoch driver."""

    def __init__(self, *, device: str | None = "auto", precision: str = "float32",
                 seed: int = 0, threads: int | None = None) -> None:
        """Set up for this process; under ``torchrun`` (``WORLD_SIZE`` > 1) join the process
        group (NCCL on CUDA, gloo on the CPU) and take the local rank's GPU.

        Raises:
            DeviceError: the device is not there, or the precision cannot run on it.
        """
        import torch

        from medvision import devices

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        spec = device or "auto"
        if self.world_size > 1 and spec in ("auto", "cuda") and torch.cuda.is_available():
            spec = f"cuda:{local_rank % torch.cuda.device_count()}"
        self.device = devices.resolve_device(spec)
        devices.check_precision(self.device, precision)
        devices.prepare(self.device)
        self.info = devices.describe(self.device)
        self.precision = precision
        self.seed = seed
        if threads:
            torch.set_num_threads(threads)
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
        self.scaler = (torch.amp.GradScaler("cuda") if precision == "float16" else None)
        if precision == "bfloat16" and self.device.type == "cpu":
            from medvision.train.precision import warn_if_emulated

            warn_if_emulated()

    # ---------------------------------------------------------------- distribution
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """The device, precision and processes, as run records name them."""
        return {**self.info.as_dict(), "precision": self.precision,
                "processes": self.world_size}

    def prepare_model(self, model: Any) -> Any:
        """``model`` on the device; under DDP wrapped in ``DistributedDataParallel`` (batch
        norm synchronised across GPUs; on CPUs each process keeps its own statistics)."""
        import torch

        model = model.to(self.device)
        if not self.distributed:
            return model
        if self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def local_batch(self, batch_size: int) -> int:
        """Each process's share of the global ``batch_size``.

        Raises:
            ConfigError: the batch does not divide among the processes.
        """
        if batch_size % self.world_size:
            raise ConfigError(f"training.batch_size {batch_size} does not divide among "
                              f"{self.world_size} processes; choose a multiple of it")
        return batch_size // self.world_size

    def loader(self, dataset: Any, *, batch_size: int, train: bool,
               weights: Sequence[float] | None = None, num_workers: int = 0,
               collate_fn: Callable[..., Any] | None = None, drop_last: bool = False) -> Any:
        """A loader over ``dataset`` for this process.

        Training (``train``): ``batch_size`` is the global batch, each process taking its
        share; a seeded order per epoch (:class:`ShardedSampler`, so a resumed run sees the
        order an uninterrupted one would), or with ``weights`` a seeded draw with
        replacement in proportion to them (class-balanced sampling), one draw shared by
        every process. Evaluation: every item in order, the whole batch, in each process.
        """
        from monai.data import DataLoader

        from medvision import devices

        sampler = None
        if train:
            sampler = ShardedSampler(len(dataset), weights=weights, shuffle=True,
                                     seed=self.seed, rank=self.rank,
                                     world_size=self.world_size)
        extra: dict[str, Any] = {}
        if collate_fn is not None:
            extra["collate_fn"] = collate_fn
        return DataLoader(dataset, batch_size=self.local_batch(batch_size) if train
                          else batch_size, shuffle=False, sampler=sampler,
                          num_workers=num_workers, drop_last=drop_last,
                          pin_memory=devices.pin_memory(self.device), **extra)

    # ---------------------------------------------------------------- steps
    def autocast(self) -> Any:
        from medvision import devices

        return devices.autocast(self.device, self.precision)

    def to_device(self, value: Any) -> Any:
        from medvision import devices

        return devices.move(value, self.device)

    def optimise(self, loss: Any, optimizer: Any, *, clip: float | None = None,
                 parameters: Iterable[Any] | None = None) -> None:
        """One optimiser step on ``loss`` (through the gradient scaler for float16)."""
        import torch

        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if clip is not None:
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(list(parameters or ()), clip)
            self.scaler.step(optimizer)
            self.scaler.update()
            return
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(parameters or ()), clip)
        optimizer.step()

    def run_epoch(self, loader: Iterable[Any], step: Callable[[Any], StepOutput], *,
                  optimizer: Any, epoch: int, description: str = "", progress: bool | None = None,
                  clip: float | None = None, parameters: Iterable[Any] | None = None,
                  max_steps: int | None = None) -> EpochStats:
        """One pass over ``loader``: each batch to the device, ``step`` gives its loss, one
        optimiser step. Measures the time spent waiting for the loader.

        ``max_steps``: stop after this many steps (the whole run's limit, counted by the
        caller; the returned stats say ``stopped``).
        """
        import torch
        from tqdm import tqdm

        show = (sys.stderr.isatty() if progress is None else progress) and self.is_main
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ShardedSampler):
            sampler.set_epoch(epoch)
        params = list(parameters) if parameters is not None else None
        started = time.perf_counter()
        waiting, total, seen, steps = 0.0, 0.0, 0, 0
        parts: dict[str, float] = {}
        bar = tqdm(loader, desc=description, disable=not show, leave=False)
        batches: Iterator[Any] = iter(bar)
        stopped = False
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            waiting += time.perf_counter() - asked
            if batch is None:
                break
            out = step(self.to_device(batch))
            self.optimise(out.loss, optimizer, clip=clip, parameters=params)
            total += float(out.loss.detach()) * out.samples
            for name, value in out.parts.items():
                parts[name] = parts.get(name, 0.0) + float(value)
            seen += out.samples
            steps += 1
            bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
            if max_steps is not None and steps >= max_steps:
                stopped = True
                break
        seconds = time.perf_counter() - started
        if self.distributed:  # every process reports the whole epoch's mean loss
            sums = torch.tensor([total, float(seen)], dtype=torch.float64)
            torch.distributed.all_reduce(sums)
            total, seen = float(sums[0]), int(sums[1])
        return EpochStats(loss=total / max(seen, 1), samples=seen, steps=steps,
                          seconds=seconds,
                          data_wait_share=waiting / seconds if seconds else 0.0,
                          parts={k: v / max(steps, 1) for k, v in parts.items()},
                          stopped=stopped)

    def fit(self, state: TrainingState, *, epochs: int,
            epoch: Callable[[int, TrainingState], TrainingState],
            max_minutes: float | None = None, report: Any = None) -> TrainingState:
        """Run ``epoch(n, state)`` for the epochs after ``state.epoch`` up to ``epochs``;
        stops early when the state says so (early stopping), or once the run's training time
        passes ``max_minutes`` (after the epoch that passed it).

        ``report`` (an :class:`~medvision.train.progress.EpochReport`) hears of each
        finished (checkpointed) epoch: the epoch line, the curves, the tracker."""
        if report is not None:
            report.begin(state)
        if state.early_stopped:
            log.info("stopped early after epoch %d", state.epoch)
            return state
        for number in range(state.epoch + 1, epochs + 1):
            state = epoch(number, state)
            if report is not None:
                report.epoch_done(state)
            if state.early_stopped or state.extra.get("stopped"):
                break
            if max_minutes is not None and state.seconds >= max_minutes * 60:
                log.info("stopping after %.1f minutes (--max-minutes)", state.seconds / 60)
                break
        return state

    def barrier(self) -> None:
        import torch

        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        import torch

        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


_NEXT = ".next"  # a checkpoint file written but not yet committed by state.json


class ShardedSampler:
    """Indices for one process: a seeded permutation (or, with ``weights``, a seeded draw with
    replacement in proportion to them), the same in every process, dealt round-robin so that
    batch k of process r holds items r, r+N, ... of the single-process batch k. Together the
    processes see exactly what one process would."""

    def __init__(self, size: int, *, weights: Sequence[float] | None, shuffle: bool, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.size, self.weights, self.shuffle = size, weights, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the order of ``epoch`` (each epoch has its own, the same in a resumed run)."""
        self.epoch = epoch

    def _order(self) -> list[int]:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            w = torch.as_tensor(np.asarray(self.weights, dtype=np.float64))
            return torch.multinomial(w, self.size, replacement=True,
                                     generator=generator).tolist()
        if self.shuffle:
            return torch.randperm(self.size, generator=generator).tolist()
        return list(range(self.size))

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.world_size > 1:  # pad so every process takes as many batches
            order += order[: (-len(order)) % self.world_size]
        return iter(order[self.rank::self.world_size])

    def __len__(self) -> int:
        return -(-self.size // self.world_size)


def engine_for(pipeline: Any, device: str | None) -> Engine:
    """The engine for a pipeline's training settings on ``device``."""
    cfg = pipeline.training
    return Engine(device=device, precision=cfg.precision, seed=cfg.seed, threads=cfg.threads)
