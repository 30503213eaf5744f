"""The training loop: cached MONAI datasets, per-epoch checkpoints, resume, best-model choice.

Outputs in the run folder:

* ``last.safetensors``, ``optimizer.safetensors``, ``state.json``: resumable state, written
  atomically after every epoch;
* ``best.safetensors``: weights of the best epoch by the validation metric, or with
  ``training.swa_epochs`` the average of the last epochs' weights (batch-norm statistics
  recomputed), the best single epoch then kept as ``best_epoch.safetensors``;
* ``swa.safetensors``: the running weight average (resumable);
* ``metrics.csv``: one row per epoch;
* ``pipeline.yaml``: the resolved pipeline, and ``split.json``: which items validated.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvision.audit.records import Auditor, items_digest, record_run
from medvision.config import Pipeline, config_hash, load_pipeline
from medvision.errors import CheckpointError, ConfigError, DataError, MedvisionError
from medvision.io.synthetic import count_synthetic
from medvision.models import build_model, load_weights, patch_forward, weights_sha256
from medvision.models.calibration import fit_temperature, write_temperature
from medvision.models.checkpoint import tensor_aliases
from medvision.tracking import TRACKING_FILE, Target, Tracker
from medvision.train.data import DataSplit, readable_items
from medvision.train.engine import (
    BEST_EPOCH_FILE,
    BEST_FILE,
    INIT_FILE,
    METRICS_FILE,
    PIPELINE_FILE,
    SKIPPED_FILE,
    SPLIT_FILE,
    STATE_FILE,
    SWA_FILE,
    Engine,
    RunFolder,
    StepOutput,
    TrainingState,
    engine_for,
)
from medvision.train.progress import EpochReport, tracked, tracking_targets
from medvision.transforms import build_transforms

__all__ = ["SWA_FILE", "TrainResult", "train"]


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    run_dir: Path
    epochs_run: int
    best_epoch: int
    best_metric: float
    history: tuple[dict[str, float], ...]
    seconds: float
    skipped: tuple[tuple[str, str], ...] = ()
    averaged_epochs: int = 0
    device: dict[str, Any] | None = None
    """Where it trained: the device, its name, the precision, the processes."""
    tracking: dict[str, str] | None = None
    """Where the run is tracked (MLflow URI and run ID, TensorBoard folder), if it is."""


def _loss(pipeline: Pipeline) -> Any:
    """The configured loss; config validation has checked that it fits the task and that
    every option set is one it honours (``medvision.config.LOSSES``)."""
    import torch
    from monai import losses

    cfg = pipeline.loss
    weight = torch.tensor(cfg.class_weights, dtype=torch.float32) if cfg.class_weights else None
    builders: dict[str, Any] = {
        "cross_entropy": lambda: torch.nn.CrossEntropyLoss(
            weight=weight, label_smoothing=cfg.label_smoothing),
        "focal": lambda: losses.FocalLoss(to_onehot_y=True, use_softmax=True, weight=weight),
        "dice_ce": lambda: losses.DiceCELoss(to_onehot_y=True, softmax=True, weight=weight,
                                             label_smoothing=cfg.label_smoothing),
        "dice_focal": lambda: losses.DiceFocalLoss(to_onehot_y=True, softmax=True,
                                                   weight=weight),
    }
    return builders[cfg.name]()


def supervised_loss(loss_fn: Any, output: Any, label: Any) -> Any:
    """The loss of one training output against its label.

    Deep supervision (MONAI ``DynUNet`` with ``deep_supervision: true``): in training mode the
    network returns an extra axis 1 of outputs, the full-resolution one first and the coarser
    heads upsampled to it; output i is weighted by 2^-i, the weights summing to one (as in
    nnU-Net). In eval mode such a network returns only the first, so validation and
    inference are unchanged.
    """
    if label.dim() > 2 and output.dim() == label.dim() + 1:
        weights = [0.5 ** i for i in range(output.shape[1])]
        return sum(w * loss_fn(output[:, i], label)
                   for i, w in enumerate(weights)) / sum(weights)
    return loss_fn(output, label)


def _optimizer(pipeline: Pipeline, params: Any) -> Any:
    import torch

    cfg = pipeline.optimizer
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(pipeline: Pipeline, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based) as a multiple of ``optimizer.lr``."""
    cfg = pipeline.training
    epochs, name = cfg.epochs - cfg.swa_epochs, pipeline.schedule.name
    if epoch >= epochs:  # the averaging epochs run at a constant rate
        return cfg.swa_lr
    warmup = pipeline.schedule.warmup_epochs
    if warmup is None:
        warmup = round(0.3 * epochs) if name == "onecycle" else 0
    start = 1 / 25 if name == "onecycle" else 1 / (warmup + 1)
    if epoch < warmup:
        return start + (1 - start) * epoch / warmup
    if name == "constant":
        return 1.0
    floor = 1e-4 if name == "onecycle" else 0.0
    progress = (epoch - warmup) / max(1, epochs - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _scheduler(pipeline: Pipeline, optimizer: Any) -> Any:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(pipeline, e))


def _dataset(pipeline: Pipeline, items: Sequence[dict[str, Any]], *, train: bool,
             run_dir: Path) -> Any:
    from monai.data import CacheDataset, Dataset, PersistentDataset

    transform = build_transforms(pipeline, train=train)
    data = [{k: v for k, v in item.items() if k != "group"} for item in items]
    if pipeline.training.cache == "memory":
        return CacheDataset(data, transform=transform, cache_rate=1.0, num_workers=None,
                            progress=sys.stderr.isatty())
    if pipeline.training.cache == "disk" and all(isinstance(i["image"], str) for i in data):
        return PersistentDataset(data, transform=transform, cache_dir=run_dir / "cache")
    return Dataset(data, transform=transform)


def class_weights(pipeline: Pipeline, labels: Sequence[int]) -> list[float] | None:
    """Sampling weights giving each class the same share (``training.balanced_sampling``), or
    None for plain shuffling."""
    if not (pipeline.training.balanced_sampling and pipeline.task == "classification"):
        return None
    counts = np.bincount(np.asarray(labels), minlength=len(pipeline.classes))
    return [1.0 / counts[label] for label in labels]


def evaluate_batches(pipeline: Pipeline, model: Any, loader: Any,
                     loss_fn: Any | None = None, device: Any = None) -> dict[str, float]:
    """Validation metrics over a loader: loss, and AUC/accuracy or mean Dice (computed on
    ``device``, the model's; default the CPU)."""
    import torch
    from monai.metrics import DiceMetric, compute_roc_auc
    from monai.networks.utils import one_hot

    model.eval()
    losses: list[float] = []
    probs, targets = [], []
    dice = DiceMetric(include_background=False, reduction="mean_batch")
    classes = len(pipeline.classes)
    with torch.no_grad():
        for batch in loader:
            image = batch["image"].to(device or "cpu", non_blocking=True)
            logits = patch_forward(pipeline, model, image).float()
            if pipeline.task == "classification":
                label = torch.as_tensor(batch["label"]).long().view(-1).to(logits.device)
                if loss_fn is not None:
                    losses.append(float(loss_fn(logits, label)))
                probs.append(torch.softmax(logits, dim=1).cpu())
                targets.append(label.cpu())
            else:
                label = batch["label"].to(logits.device)
                if loss_fn is not None:
                    losses.append(float(loss_fn(logits, label)))
                pred = one_hot(logits.argmax(dim=1, keepdim=True), classes)
                dice(pred, one_hot(label.long(), classes))
    out: dict[str, float] = {"loss": float(np.mean(losses)) if losses else float("nan")}
    if pipeline.task == "classification":
        p = torch.cat(probs)
        y = torch.cat(targets)
        out["accuracy"] = float((p.argmax(dim=1) == y).float().mean())
        if len(torch.unique(y)) > 1:
            if classes == 2:
                auc: Any = compute_roc_auc(p[:, 1], y)
            else:
                auc = compute_roc_auc(p, one_hot(y.view(-1, 1), classes), average="macro")
            out["auc"] = float(auc)
        else:
            out["auc"] = float("nan")
    else:
        per_class = dice.aggregate()
        assert isinstance(per_class, torch.Tensor)
        out["dice"] = float(torch.nanmean(per_class))
        for name, value in zip(pipeline.classes[1:], per_class.tolist(), strict=True):
            out[f"dice_{name}"] = float(value)
    return out


def _better(metric: str, value: float, best: float | None) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def train(pipeline: Pipeline, split: DataSplit, run_dir: str | os.PathLike[str], *,
          resume: bool = False, init_from: str | os.PathLike[str] | None = None,
          freeze: Sequence[str] = (), progress: bool | None = None,
          auditor: Auditor | None = None, rgb_to_grey: bool = False,
          device: str | None = "auto", max_minutes: float | None = None,
          tracking: Sequence[str] | str | None = None,
          options: Mapping[str, Any] | None = None) -> TrainResult:
    """Train ``pipeline`` on ``split``, writing checkpoints into ``run_dir``.

    With an ``auditor`` the run is recorded (failed runs too): the data digests, the
    pipeline's config hash, the weights written, the device and the best validation metric.
    Under ``torchrun`` (DistributedDataParallel) only rank 0 writes files and the record.

    Args:
        pipeline: validated pipeline.
        split: training and validation items.
        run_dir: output folder; must be empty or absent unless ``resume``.
        resume: continue from the folder's last checkpoint.
        init_from: safetensors weights to start from (transfer learning); tensors whose shape
            does not fit (a different head) are left at their fresh values, each named in a
            warning and in ``init.json``.
        rgb_to_grey: with ``init_from``, sum a colour first convolution over colour to fit a
            1-channel model.
        freeze: parameter-name prefixes to keep fixed.
        progress: show a progress bar (default: when stderr is a terminal).
        auditor: where the run's record goes (``None``: not recorded).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        max_minutes: stop after the epoch that passes this much training time.
        tracking: ``--tracking`` values (MLflow, TensorBoard; default: the pipeline's
            ``training.tracking``); see :mod:`medvision.tracking`.
        options: the command-line options, recorded as the tracked run's parameters.

    Raises:
        ConfigError: a non-empty run folder without ``resume``.
        DeviceError: the device is not there (a ConfigError).
        CheckpointError: nothing to resume from, or unusable ``init_from`` weights.
        AuditError: the record could not be written.
    """
    started = time.perf_counter()
    targets = tracking_targets(pipeline, tracking)
    engine = engine_for(pipeline, device)
    inputs: dict[str, Any] = {"train": items_digest(split.train),
                              "val": items_digest(split.val),
                              "init_from": str(init_from) if init_from else None}
    synthetic = {side: count_synthetic(items) for side, items in
                 (("train", split.train), ("val", split.val))}
    if any(synthetic.values()):  # the record says when images were not patients
        inputs["synthetic_items"] = synthetic
    if not engine.is_main:
        auditor = None
    try:
        result = _train(pipeline, split, run_dir, engine=engine, resume=resume,
                        init_from=init_from, freeze=freeze, progress=progress,
                        rgb_to_grey=rgb_to_grey, max_minutes=max_minutes,
                        tracking=targets, options=options, data=inputs)
    except MedvisionError as e:
        if auditor is not None:
            record_run(auditor, action="train", status="failed", pipeline=pipeline,
                       inputs=inputs, outputs=[], result={"device": engine.describe()},
                       seconds=time.perf_counter() - started, reason=str(e))
        raise
    finally:
        engine.close()
    if auditor is not None:
        run = Path(run_dir)
        weights = run / BEST_FILE
        record_run(auditor, action="train", status="ok", pipeline=pipeline, inputs=inputs,
                   outputs=[run / n for n in (BEST_FILE, METRICS_FILE,
                                              "calibration.json", PIPELINE_FILE)],
                   result={"epochs": result.epochs_run, "best_epoch": result.best_epoch,
                           pipeline.validation_metric: result.best_metric,
                           "skipped_items": len(result.skipped),
                           "device": engine.describe(),
                           **({"tracking": result.tracking} if result.tracking else {})},
                   seconds=time.perf_counter() - started,
                   weights_sha256=weights_sha256(weights) if weights.is_file() else None)
    return result


def _check_resumable(run: RunFolder, pipeline: Pipeline, split: DataSplit) -> None:
    """A resumed run keeps its fold and its network."""
    if (run / SPLIT_FILE).is_file():
        recorded = run.read_json(SPLIT_FILE).get("fold")
        if recorded != split.fold:
            raise ConfigError(f"{run.path}: this run trains fold {recorded}; resume it with "
                              f"--fold {recorded}" if recorded is not None else
                              f"{run.path}: this run is not a cross-validation fold; resume "
                              "it without --fold")
    if (run / PIPELINE_FILE).is_file():
        trained = load_pipeline(run / PIPELINE_FILE)
        if trained.model != pipeline.model:
            raise ConfigError(f"{run.path}: this run trains another network "
                              f"({trained.model.name}); resume it with the pipeline (and "
                              "--member) it was started with")


def _train(pipeline: Pipeline, split: DataSplit, run_dir: str | os.PathLike[str], *,
           engine: Engine, resume: bool, init_from: str | os.PathLike[str] | None,
           freeze: Sequence[str], progress: bool | None, rgb_to_grey: bool = False,
           max_minutes: float | None = None, tracking: Sequence[Target] = (),
           options: Mapping[str, Any] | None = None,
           data: Mapping[str, Any] | None = None) -> TrainResult:
    run = RunFolder(run_dir, resume=resume, writer=engine.is_main)
    with tracked(tracking, run, pipeline=pipeline, kind="train", engine=engine,
                 options=options, data=data) as tracker:
        result = _train_tracked(pipeline, split, run, engine=engine, resume=resume,
                                init_from=init_from, freeze=freeze, progress=progress,
                                rgb_to_grey=rgb_to_grey, max_minutes=max_minutes,
                                tracker=tracker)
    return dataclasses.replace(result, tracking=tracker.links() or None)


def _train_tracked(pipeline: Pipeline, split: DataSplit, run: RunFolder, *, engine: Engine,
                   resume: bool, init_from: str | os.PathLike[str] | None,
                   freeze: Sequence[str], progress: bool | None, rgb_to_grey: bool,
                   max_minutes: float | None, tracker: Tracker) -> TrainResult:
    from monai.utils import set_determinism

    cfg = pipeline.training
    set_determinism(seed=cfg.seed)

    model = build_model(pipeline)
    if init_from is not None:
        _init_from(model, Path(init_from), run, rgb_to_grey=rgb_to_grey)
    for name, param in model.named_parameters():
        if any(name.startswith(prefix) for prefix in freeze):
            param.requires_grad_(False)
    model = model.to(engine.device)
    loss_fn = _loss(pipeline).to(engine.device)
    optimizer = _optimizer(pipeline, [p for p in model.parameters() if p.requires_grad])
    scheduler = _scheduler(pipeline, optimizer)
    metric = pipeline.validation_metric
    state = TrainingState()
    started = {PIPELINE_FILE, SPLIT_FILE, SKIPPED_FILE, TRACKING_FILE}
    if resume and not run.has_state and all(
            f.name in started or f.name.endswith(".tmp") for f in run.path.glob("*")):
        # a run stopped before its first checkpoint: nothing to continue, start it again
        log.warning("%s: no checkpoint yet (stopped during epoch 1); starting from the "
                    "beginning", run.path)
        resume = False
    if resume:
        _check_resumable(run, pipeline, split)
        if not run.has_state:
            raise CheckpointError(f"{run.path}: nothing to resume (no {STATE_FILE})")
        state = run.restore(model=model, optimizer=optimizer, scheduler=scheduler,
                            scaler=engine.scaler, device=engine.device)
        if state.config_hash != config_hash(pipeline):
            log.warning("resuming with a pipeline that differs from the checkpoint's")
        log.info("resuming after epoch %d", state.epoch)
    else:
        run.write_pipeline(pipeline)
        run.write_json(SPLIT_FILE, {
            "fold": split.fold, "folds": cfg.folds if split.fold is not None else None,
            "synthetic_train_items": count_synthetic(split.train),
            "train_groups": sorted({str(i["group"]) for i in split.train}),
            "val_groups": sorted({str(i["group"]) for i in split.val})})
    network = engine.prepare_model(model)

    split, skipped = _readable_split(split)
    run.write_json(SKIPPED_FILE, {"count": len(skipped),
                                  "items": [{"path": p, "reason": r} for p, r in skipped]})
    train_ds = _dataset(pipeline, split.train, train=True, run_dir=run.path)
    val_ds = _dataset(pipeline, split.val, train=False, run_dir=run.path)
    labels = [int(i["label"]) for i in split.train] if pipeline.task == "classification" else []
    train_loader = engine.loader(train_ds, batch_size=cfg.batch_size, train=True,
                                 weights=class_weights(pipeline, labels),
                                 num_workers=cfg.num_workers)
    val_loader = engine.loader(val_ds, batch_size=cfg.batch_size, train=False,
                               num_workers=cfg.num_workers)

    def step(batch: Any) -> StepOutput:
        label = batch["label"]
        if pipeline.task == "classification":
            label = label.long().view(-1)
        with engine.autocast():
            output = network(batch["image"])
        return StepOutput(loss=supervised_loss(loss_fn, output.float(), label),
                          samples=int(batch["image"].shape[0]))

    warned: list[str] = []

    def epoch(number: int, state: TrainingState) -> TrainingState:
        network.train()
        stats = engine.run_epoch(train_loader, step, optimizer=optimizer, epoch=number,
                                 description=f"epoch {number}/{cfg.epochs}",
                                 progress=progress)
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained at
        scheduler.step()
        val = evaluate_batches(pipeline, model, val_loader, loss_fn, device=engine.device)
        row = {"epoch": number, "train_loss": stats.loss, "lr": lr,
               "train_seconds": round(stats.seconds, 2),
               "samples_per_second": round(stats.samples_per_second, 2),
               "data_wait_share": round(stats.data_wait_share, 4),
               **{f"val_{k}": v for k, v in val.items()}}
        state = state.replace(history=(*state.history, row), loss=stats.loss,
                              step=state.step + stats.steps,
                              seconds=state.seconds + stats.seconds,
                              config_hash=config_hash(pipeline), epoch=number)
        if number in (2, 3) and not warned:
            warned.extend(_validation_warning(pipeline, state.history))
        if _better(metric, val[metric], state.best_metric):
            state = state.replace(best_metric=val[metric], best_epoch=number, stale_epochs=0)
            run.save_weights(model, BEST_FILE, metadata={"pipeline": pipeline.name,
                                                         "epoch": str(number)})
        else:
            state = state.replace(stale_epochs=state.stale_epochs + 1)
        if number > cfg.epochs - cfg.swa_epochs:
            count = (_accumulate_average(model, run / SWA_FILE, state.swa_count)
                     if run.writer else state.swa_count + 1)
            state = state.replace(swa_count=count)
        if (cfg.early_stopping_patience and state.stale_epochs >= cfg.early_stopping_patience
                and number <= cfg.epochs - cfg.swa_epochs):
            log.info("early stopping after epoch %d", number)
            state = state.replace(early_stopped=True)
        run.checkpoint(state, model=model, optimizer=optimizer, scheduler=scheduler,
                       scaler=engine.scaler)
        log.info("epoch %d: %s", number, {k: round(v, 4) for k, v in row.items()})
        return state

    report = EpochReport(run, epochs=cfg.epochs, monitor=f"val_{metric}", tracker=tracker,
                         swa_from=cfg.epochs - cfg.swa_epochs + 1 if cfg.swa_epochs else None)
    state = engine.fit(state, epochs=cfg.epochs, epoch=epoch, max_minutes=max_minutes,
                       report=report)
    engine.barrier()
    if not (run / BEST_FILE).exists() and not (run / BEST_EPOCH_FILE).exists():
        run.save_weights(model, BEST_FILE)
    engine.barrier()
    if state.swa_count and state.swa is None and state.epoch >= cfg.epochs:
        t0 = time.perf_counter()
        swa = _finish_average(pipeline, model, run, train_loader, val_loader, loss_fn,
                              count=state.swa_count, device=engine.device)
        state = state.replace(swa=swa, best_metric=swa[metric],
                              seconds=state.seconds + time.perf_counter() - t0)
        run.update_state(state)
    if pipeline.task == "classification" and engine.is_main:
        _calibrate(model, run, val_loader, device=engine.device)
    if not state.finished:
        state = state.replace(finished=True)
        run.update_state(state)
    engine.barrier()
    if tracker:
        if state.swa is not None:
            tracker.log_metrics({f"swa_val_{k}": v for k, v in state.swa.items()},
                                step=state.epoch)
        tracker.log_metrics({f"best_val_{metric}": state.best_metric,
                             "best_epoch": state.best_epoch}, step=state.epoch)
        if (run / BEST_FILE).is_file():
            tracker.set_tags({"medvision.weights_sha256": weights_sha256(run / BEST_FILE)})
        report.finish()
        tracker.log_artifacts([run / n for n in (PIPELINE_FILE, SPLIT_FILE, METRICS_FILE,
                                                 "calibration.json", SKIPPED_FILE, INIT_FILE)])
    return TrainResult(run_dir=run.path, epochs_run=state.epoch, best_epoch=state.best_epoch,
                       best_metric=float(state.best_metric if state.best_metric is not None
                                         else float("nan")),
                       history=tuple(state.history), seconds=state.seconds,
                       skipped=tuple(skipped),
                       averaged_epochs=state.swa_count if state.swa is not None else 0,
                       device=engine.describe())


def _validation_warning(pipeline: Pipeline, history: Sequence[dict[str, Any]]) -> list[str]:
    """A loud warning when, in the first epochs, the training loss falls while validation
    accuracy stays below chance: the split most likely puts whole classes or sources on one
    side (returns the warning, empty when all looks sane)."""
    if pipeline.task != "classification" or len(history) < 2:
        return []
    first, last = history[0], history[-1]
    chance = 1 / len(pipeline.classes)
    accuracy = float(last.get("val_accuracy", float("nan")))
    if not (float(last["train_loss"]) < float(first["train_loss"]) and accuracy < chance):
        return []
    text = (f"VALIDATION IS FAR WORSE THAN TRAINING after {len(history)} epochs: training loss "
            f"{float(first['train_loss']):.3f} -> {float(last['train_loss']):.3f} while "
            f"validation accuracy is {accuracy:.3f}, below chance ({chance:.3f}); the split "
            "most likely puts whole classes or sources on one side (check split.json and "
            f"data.group_pattern {pipeline.data.group_pattern!r})")
    log.warning("%s", text)
    return [text]


def _readable_split(split: DataSplit) -> tuple[DataSplit, list[tuple[str, str]]]:
    """Drop unreadable items from both sides (groups never move between sides).

    Raises:
        DataError: no readable item is left on one side.
    """
    train_items, skipped = readable_items(split.train)
    val_items, skipped_val = readable_items(split.val)
    skipped += skipped_val
    if skipped:
        log.warning("%d unreadable item(s) skipped (listed in skipped.json)", len(skipped))
    if not train_items or not val_items:
        raise DataError(f"no readable {'training' if not train_items else 'validation'} items "
                        f"left after skipping {len(skipped)} unreadable one(s)")
    return DataSplit(train=tuple(train_items), val=tuple(val_items), fold=split.fold), skipped


def _accumulate_average(model: Any, path: Path, count: int) -> int:
    """Fold the model's current floating-point parameters into the running average kept in
    ``path`` (a safetensors file, so the average survives an interruption); returns the new
    count of averaged epochs."""
    import torch
    from safetensors.torch import load_file, save_file

    current = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()
               if torch.is_floating_point(v)}
    if count and path.is_file():
        average = load_file(str(path))
        for key, value in current.items():
            current[key] = average[key] + (value - average[key]) / (count + 1)
    else:
        count = 0
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in current.items()}, str(tmp))
    os.replace(tmp, path)
    return count + 1


def _finish_average(pipeline: Pipeline, model: Any, run: RunFolder, train_loader: Any,
                    val_loader: Any, loss_fn: Any, *, count: int, device: Any = None
                    ) -> dict[str, float]:
    """Load the averaged weights, recompute batch-norm statistics with one pass over the
    training data (an average of weights has no matching running statistics), validate, and
    make the average ``best.safetensors``; the best single epoch stays as
    ``best_epoch.safetensors``."""
    from safetensors.torch import load_file
    from torch.optim.swa_utils import update_bn

    # every process reads rank 0's average
    model.load_state_dict(load_file(str(run / SWA_FILE), device=str(device or "cpu")),
                          strict=False)
    # batch-norm statistics for the averaged weights (a no-op without batch norm)
    update_bn((batch["image"] for batch in train_loader), model, device=device)
    val = evaluate_batches(pipeline, model, val_loader, loss_fn, device=device)
    if run.writer and not (run / BEST_EPOCH_FILE).exists():
        os.replace(run / BEST_FILE, run / BEST_EPOCH_FILE)
    run.save_weights(model, BEST_FILE,
                     metadata={"pipeline": pipeline.name, "epoch": f"average of last {count}"})
    log.info("weight average of the last %d epochs: %s", count,
             {k: round(v, 4) for k, v in val.items()})
    return val


def _calibrate(model: Any, run: RunFolder, val_loader: Any, device: Any = None) -> None:
    """Fit a temperature on the validation split for the best weights; store it beside them."""
    import torch

    load_weights(model, run / BEST_FILE, device=device)
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in val_loader:
            logits.append(model(batch["image"].to(device or "cpu")).float().cpu())
            labels.append(torch.as_tensor(batch["label"]).long().view(-1))
    temperature = fit_temperature(torch.cat(logits).numpy(), torch.cat(labels).numpy())
    write_temperature(run.path, temperature, fitted_on="validation split (split.json)")
    log.info("calibration temperature %.3f", temperature)


def _init_from(model: Any, path: Path, run: RunFolder | Path, *, rgb_to_grey: bool = False
               ) -> None:
    """Start from ``path``'s tensors where they fit; every tensor skipped, converted or left
    fresh is named (a warning, and ``init.json`` in the run folder).

    ``rgb_to_grey``: a first convolution trained on colour (3 input channels) is summed over
    colour to fit a 1-channel model (a grey image seen as R = G = B gives the same response).
    """
    from safetensors.torch import load_file

    try:
        source = load_file(str(path))
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({e})") from e
    own = model.state_dict()
    converted, skipped = [], []
    for name, tensor in list(source.items()):
        if name not in own:
            skipped.append({"tensor": name, "reason": "not in this model",
                            "shape": list(tensor.shape)})
            continue
        if own[name].shape == tensor.shape:
            continue
        fits_grey = (rgb_to_grey and tensor.dim() >= 4 and tensor.shape[1] == 3
                     and own[name].shape[1] == 1 and tensor.shape[0] == own[name].shape[0]
                     and tensor.shape[2:] == own[name].shape[2:])
        if fits_grey:
            source[name] = tensor.sum(dim=1, keepdim=True)
            converted.append({"tensor": name, "from": list(tensor.shape),
                              "to": list(own[name].shape)})
            continue
        skipped.append({"tensor": name, "reason": "shape differs",
                        "shape": list(tensor.shape), "model": list(own[name].shape)})
    names = {s["tensor"] for s in skipped}
    if len(names) == len(source):
        raise CheckpointError(f"{path}: no tensor fits this model")
    kept = {k: v for k, v in source.items() if k not in names}
    result = model.load_state_dict({k: v.to(own[k].dtype) for k, v in kept.items()},
                                   strict=False)
    aliases = tensor_aliases(model)  # a shared tensor is loaded through its first name
    fresh = sorted(k for k in result.missing_keys if aliases.get(k) not in kept)
    for item in skipped:
        log.warning("init-from %s: %s skipped (%s, %s)", path.name, item["tensor"],
                    item["reason"], item.get("model", item["shape"]))
    for item in converted:
        log.warning("init-from %s: %s converted from %s to %s (summed over colour)",
                    path.name, item["tensor"], item["from"], item["to"])
    if fresh:
        log.warning("init-from %s: %d model tensor(s) left at fresh values: %s", path.name,
                    len(fresh), ", ".join(fresh[:10]) + (" ..." if len(fresh) > 10 else ""))
    folder = run if isinstance(run, RunFolder) else RunFolder(run, resume=True)
    folder.write_json(INIT_FILE, {"source": str(path), "loaded": len(kept),
                                  "converted": converted, "skipped": skipped, "fresh": fresh})
