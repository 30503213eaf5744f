"""Self-supervised pretraining on a pipeline's own unlabelled images (``medvision pretrain``).

No internet and no labels: the network learns from the images alone, and the weights it ends
with start a supervised run through ``train --init-from``.

* **contrastive** (classification networks; SimCLR, Chen et al. 2020): two random views of each
  image (affine, contrast, blur, noise, dropout of patches) go through the network with its
  classification head replaced by a projection MLP; MONAI's ``ContrastiveLoss`` (NT-Xent) pulls
  the two views of one image together and pushes the other images of the batch away.
* **masked** (segmentation networks; masked image modelling as in MONAI's self-supervised
  tutorials): patches of the image are dropped and the network, with one output channel per
  input channel, reconstructs them (L1 loss on the whole image, weighted towards the dropped
  patches).

The saved ``pretrained.safetensors`` uses the supervised model's tensor names, so
``--init-from`` loads everything but the head (contrastive) or the last convolution (masked),
each named in the run's ``init.json``. Checkpoints every epoch; ``--resume`` continues.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvision.audit.records import items_digest
from medvision.config import Pipeline
from medvision.errors import CheckpointError, ConfigError, DataError, DataLayoutError
from medvision.models import build_model, weights_sha256
from medvision.tracking import Tracker
from medvision.train.engine import Engine, RunFolder, StepOutput, TrainingState, engine_for
from medvision.train.progress import EpochReport, tracked, tracking_targets
from medvision.vocabulary import Task

__all__ = ["PretrainResult", "pretrain", "unlabelled_images"]

log = logging.getLogger(__name__)

PRETRAINED_FILE = "pretrained.safetensors"


@dataclass(frozen=True)
class PretrainResult:
    """What a pretraining run did."""

    run_dir: Path
    method: str
    epochs_run: int
    loss: float
    seconds: float
    images: int


def unlabelled_images(pipeline: Pipeline, data: str | os.PathLike[str]) -> list[str]:
    """Every image file under ``data`` (recursively) with one of the pipeline's extensions;
    label maps (anything under a ``labels`` folder) are left out.

    Raises:
        DataError: no images.
    """
    root = Path(data)
    found = sorted(str(p) for p in root.rglob("*") if p.is_file()
                   and p.name.lower().endswith(pipeline.data.extensions)
                   and "labels" not in p.relative_to(root).parts and not p.name.startswith("."))
    if not found:
        raise DataLayoutError(f"{root}: no images with extensions {pipeline.data.extensions}")
    return found


def _head_name(model: Any) -> str:
    for name in ("fc", "class_layers", "_fc", "classifier", "out"):
        if hasattr(model, name):
            return name
    raise ConfigError(f"{type(model).__name__}: no classification head found to replace "
                      "for contrastive pretraining")


def _views(pipeline: Pipeline, *, geometric: bool) -> Any:
    """Random views for self-supervision, stronger than supervised augmentation, made in the
    loader's workers: with ``geometric`` two independent views ``first`` and ``second`` of the
    image (affine, contrast, blur, noise, dropped patches); without, one view ``masked`` with
    only patches dropped (set to 0), so the original stays the target."""
    from monai import transforms as mt

    dims = pipeline.spatial_dims
    size = pipeline.preprocess.size
    holes = max(1, (min(size) if size else 64) // 8)
    if not geometric:
        return mt.Compose([
            mt.CopyItemsd("image", times=1, names=["masked"]),
            mt.RandCoarseDropoutd("masked", holes=4, max_holes=12, spatial_size=holes,
                                  max_spatial_size=holes * 2, fill_value=0.0, prob=1.0)])
    views = ["first", "second"]
    return mt.Compose([
        mt.CopyItemsd("image", times=2, names=views),
        *[step for key in views for step in (
            mt.RandAffined(key, prob=0.9, rotate_range=[0.3] * (1 if dims == 2 else 3),
                           scale_range=[0.25] * dims,
                           translate_range=[0.1 * (s or 64) for s in (size or [64] * dims)],
                           padding_mode="zeros"),
            mt.RandAdjustContrastd(key, prob=0.8, gamma=(0.6, 1.6)),
            mt.RandGaussianSmoothd(key, prob=0.3, sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2),
                                   sigma_z=(0.3, 1.2)),
            mt.RandGaussianNoised(key, prob=0.5, std=0.05),
            mt.RandCoarseDropoutd(key, holes=2, max_holes=6, spatial_size=holes,
                                  max_spatial_size=holes * 2, fill_value=0.0, prob=0.5))],
        mt.EnsureTyped(views, track_meta=False)])


class _Contrastive:
    """The network with its head replaced by a projection MLP: ``network(x)`` is the
    projection of the backbone's features (one module, so DDP sees one forward pass)."""

    def __init__(self, pipeline: Pipeline) -> None:
        import torch

        self.model = build_model(pipeline)
        self.head = _head_name(self.model)
        setattr(self.model, self.head, torch.nn.Identity())
        size = pipeline.preprocess.size or [64] * pipeline.spatial_dims
        with torch.no_grad():
            self.model.eval()
            width = int(self.model(torch.zeros(2, pipeline.in_channels, *size)).shape[1])
        self.projection = torch.nn.Sequential(torch.nn.Linear(width, 256), torch.nn.ReLU(),
                                              torch.nn.Linear(256, 128))

        class Projected(torch.nn.Module):
            def __init__(self, backbone: Any, projection: Any) -> None:
                super().__init__()
                self.backbone, self.projection = backbone, projection

            def forward(self, x: Any) -> Any:
                return self.projection(self.backbone(x))

        self.network = Projected(self.model, self.projection)


def pretrain(pipeline: Pipeline, images: Sequence[str], run_dir: str | os.PathLike[str], *,
             epochs: int, method: str | None = None, max_minutes: float | None = None,
             resume: bool = False, batch_size: int | None = None,
             temperature: float = 0.1, device: str | None = "auto",
             progress: bool | None = None, tracking: Sequence[str] | str | None = None,
             options: Mapping[str, Any] | None = None) -> PretrainResult:
    """Pretrain the pipeline's network on ``images`` without labels (see the module notes).

    Raises:
        ConfigError: a non-empty run folder without ``resume``, or a method that does not fit
            the pipeline's task.
        DeviceError: the device is not there.
        CheckpointError: nothing to resume from.
        DataError: fewer than two images.
    """
    method = method or ("masked" if pipeline.task == Task.SEGMENTATION else "contrastive")
    if method == "contrastive" and pipeline.task != Task.CLASSIFICATION:
        raise ConfigError("contrastive pretraining needs a classification network; use "
                          "--method masked for segmentation")
    if method not in ("contrastive", "masked") or pipeline.task == Task.DETECTION:
        raise ConfigError(f"pretraining method '{method}' does not fit a {pipeline.task} "
                          "pipeline (contrastive: classification; masked: segmentation)")
    if len(images) < 2:
        raise DataError("pretraining needs at least two images")
    targets = tracking_targets(pipeline, tracking)
    engine = engine_for(pipeline, device)
    try:
        run = RunFolder(run_dir, resume=resume, writer=engine.is_main)
        with tracked(targets, run, pipeline=pipeline, kind="pretrain", engine=engine,
                     options={**(options or {}), "method": method},
                     data={"images": items_digest({"image": i} for i in images)}) as tracker:
            return _pretrain(pipeline, images, run, engine=engine, epochs=epochs,
                             method=method, max_minutes=max_minutes, resume=resume,
                             batch_size=batch_size, temperature=temperature,
                             progress=progress, tracker=tracker)
    finally:
        engine.close()


def _pretrain(pipeline: Pipeline, images: Sequence[str], run: RunFolder, *,
              engine: Engine, epochs: int, method: str, max_minutes: float | None,
              resume: bool, batch_size: int | None, temperature: float,
              progress: bool | None, tracker: Tracker) -> PretrainResult:
    import torch
    from monai import transforms as mt
    from monai.data import CacheDataset
    from monai.losses import ContrastiveLoss
    from monai.utils import set_determinism

    from medvision.transforms.chain import LoadVolumed, preprocess_transforms

    cfg = pipeline.training
    set_determinism(seed=cfg.seed)
    batch = batch_size or cfg.batch_size
    if method == "contrastive":
        contrastive = _Contrastive(pipeline)
        network, model = contrastive.network, contrastive.model
        loss_fn: Any = ContrastiveLoss(temperature=temperature)
    else:
        # one output: deep-supervision heads (DynUNet) are left out of the reconstruction
        params = {k: v for k, v in pipeline.model.params.items() if k != "deep_supervision"}
        reconstruct = pipeline.model_copy(update={
            "classes": tuple(f"channel{c}" for c in range(max(2, pipeline.in_channels))),
            "model": pipeline.model.model_copy(update={"params": params})})
        model = build_model(reconstruct)
        network = model
        loss_fn = torch.nn.L1Loss(reduction="none")
    network.to(engine.device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=pipeline.optimizer.lr,
                                  weight_decay=pipeline.optimizer.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    state = TrainingState(extra={"method": method})
    if resume and run.has_state:
        state = run.restore(model=network, optimizer=optimizer, scheduler=scheduler,
                            scaler=engine.scaler, device=engine.device)
        if state.extra.get("method") != method:
            raise ConfigError(f"{run.path}: this run pretrains with {state.extra.get('method')}")
        log.info("resuming pretraining after epoch %d", state.epoch)
    elif resume:
        raise CheckpointError(f"{run.path}: nothing to resume (no state.json)")
    else:
        run.write_json("images.json", {"count": len(images), "method": method})
    trained = engine.prepare_model(network)

    deterministic = [LoadVolumed(["image"], channels=[pipeline.in_channels]),
                     *preprocess_transforms(pipeline, train=False, with_label=False),
                     mt.EnsureTyped("image", track_meta=False)]
    if pipeline.task == Task.SEGMENTATION and pipeline.preprocess.size:
        deterministic.append(mt.ResizeWithPadOrCropd(
            "image", spatial_size=pipeline.preprocess.size))
    dataset = CacheDataset([{"image": p} for p in images],
                           transform=mt.Compose([*deterministic, _views(
                               pipeline, geometric=method == "contrastive")]),
                           progress=False, num_workers=0)
    loader = engine.loader(dataset, batch_size=batch, train=True,
                           drop_last=len(images) > batch, num_workers=cfg.num_workers)

    def step(part: dict[str, Any]) -> StepOutput:
        image = part["image"]
        if method == "contrastive":
            with engine.autocast():  # both views in one pass
                embedded = trained(torch.cat([part["first"], part["second"]])).float()
            first, second = embedded.split(image.shape[0])
            loss = loss_fn(first, second)
        else:
            masked = part["masked"]
            dropped = (masked == 0) & (image != 0)
            with engine.autocast():
                rebuilt = trained(masked)[:, : image.shape[1]]
            error = loss_fn(rebuilt.float(), image)
            loss = error.mean() + 2.0 * (error * dropped).sum() / dropped.sum().clamp_min(1)
        return StepOutput(loss=loss, samples=int(image.shape[0]))

    def epoch(number: int, state: TrainingState) -> TrainingState:
        network.train()
        stats = engine.run_epoch(loader, step, optimizer=optimizer, epoch=number,
                                 description=f"pretraining {number}/{epochs}",
                                 progress=progress)
        scheduler.step()
        state = state.replace(epoch=number, step=state.step + stats.steps, loss=stats.loss,
                              seconds=state.seconds + stats.seconds)
        state = state.replace(history=(*state.history, {
            "epoch": number, "loss": round(stats.loss, 6),
            "seconds": round(stats.seconds, 2),
            "data_wait_share": round(stats.data_wait_share, 4)}))
        run.checkpoint(state, model=network, optimizer=optimizer, scheduler=scheduler,
                       scaler=engine.scaler)
        run.save_weights(model, PRETRAINED_FILE)
        log.info("pretraining epoch %d: %s loss %.4f", number, method, stats.loss)
        return state

    report = EpochReport(run, epochs=epochs, title="pretraining epoch", tracker=tracker)
    state = engine.fit(state, epochs=epochs, epoch=epoch, max_minutes=max_minutes,
                       report=report)
    run.write_json("pretrain.json", {"method": method, "epochs": state.epoch,
                                     "loss": state.loss, "seconds": state.seconds,
                                     "images": len(images), "weights": PRETRAINED_FILE,
                                     "device": engine.describe()})
    if tracker and (run / PRETRAINED_FILE).is_file():
        tracker.set_tags({"medvision.weights_sha256": weights_sha256(run / PRETRAINED_FILE)})
        report.finish()
        tracker.log_artifacts([run / "pretrain.json", run / "pipeline.yaml"])
    return PretrainResult(run_dir=run.path, method=method, epochs_run=state.epoch,
                          loss=float(state.loss if state.loss is not None else float("nan")),
                          seconds=state.seconds, images=len(images))
