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

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvision.atomic import append_csv, write_text_atomic
from medvision.config import Pipeline
from medvision.errors import CheckpointError, ConfigError, DataError
from medvision.models import build_model, save_weights
from medvision.train.checkpoint_state import (
    load_training_state,
    open_run_dir,
    save_training_state,
)
from medvision.train.precision import step_precision
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
        raise DataError(f"{root}: no images with extensions {pipeline.data.extensions}")
    return found


def _head_name(model: Any) -> str:
    for name in ("fc", "class_layers", "_fc", "classifier", "out"):
        if hasattr(model, name):
            return name
    raise ConfigError(f"{type(model).__name__}: no classification head found to replace "
                      "for contrastive pretraining")


def _views(pipeline: Pipeline, *, geometric: bool) -> Any:
    """Random views for self-supervision, stronger than supervised augmentation; without
    ``geometric`` only patches are dropped (set to 0), so the original stays the target."""
    from monai import transforms as mt

    dims = pipeline.spatial_dims
    size = pipeline.preprocess.size
    holes = max(1, (min(size) if size else 64) // 8)
    if not geometric:
        return mt.RandCoarseDropoutd("image", holes=4, max_holes=12, spatial_size=holes,
                                     max_spatial_size=holes * 2, fill_value=0.0, prob=1.0)
    return mt.Compose([
        mt.RandAffined("image", prob=0.9, rotate_range=[0.3] * (1 if dims == 2 else 3),
                       scale_range=[0.25] * dims, translate_range=[0.1 * (s or 64) for s in
                                                                   (size or [64] * dims)],
                       padding_mode="zeros"),
        mt.RandAdjustContrastd("image", prob=0.8, gamma=(0.6, 1.6)),
        mt.RandGaussianSmoothd("image", prob=0.3, sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2),
                               sigma_z=(0.3, 1.2)),
        mt.RandGaussianNoised("image", prob=0.5, std=0.05),
        mt.RandCoarseDropoutd("image", holes=2, max_holes=6, spatial_size=holes,
                              max_spatial_size=holes * 2, fill_value=0.0, prob=0.5),
    ])


class _Contrastive:
    """The network with its head replaced by a projection MLP."""

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
        self.network = torch.nn.ModuleDict({"backbone": self.model,
                                            "projection": self.projection})


def pretrain(pipeline: Pipeline, images: Sequence[str], run_dir: str | os.PathLike[str], *,
             epochs: int, method: str | None = None, max_minutes: float | None = None,
             resume: bool = False, batch_size: int | None = None,
             temperature: float = 0.1) -> PretrainResult:
    """Pretrain the pipeline's network on ``images`` without labels (see the module notes).

    Raises:
        ConfigError: a non-empty run folder without ``resume``, or a method that does not fit
            the pipeline's task.
        CheckpointError: nothing to resume from.
        DataError: fewer than two images.
    """
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.losses import ContrastiveLoss
    from monai.utils import set_determinism

    from medvision.transforms.chain import LoadVolumed, preprocess_transforms

    method = method or ("masked" if pipeline.task == Task.SEGMENTATION else "contrastive")
    if method == "contrastive" and pipeline.task != Task.CLASSIFICATION:
        raise ConfigError("contrastive pretraining needs a classification network; use "
                          "--method masked for segmentation")
    if method not in ("contrastive", "masked") or pipeline.task == Task.DETECTION:
        raise ConfigError(f"pretraining method '{method}' does not fit a {pipeline.task} "
                          "pipeline (contrastive: classification; masked: segmentation)")
    if len(images) < 2:
        raise DataError("pretraining needs at least two images")
    run = open_run_dir(run_dir, resume=resume)
    cfg = pipeline.training
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
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
    optimizer = torch.optim.AdamW(network.parameters(), lr=pipeline.optimizer.lr,
                                  weight_decay=pipeline.optimizer.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    state: dict[str, Any] = {"epoch": 0, "seconds": 0.0, "method": method, "loss": None}
    if resume and (run / "state.json").is_file():
        state = load_training_state(run, model=network, optimizer=optimizer,
                                    scheduler=scheduler)
        if state.get("method") != method:
            raise ConfigError(f"{run}: this run pretrains with {state.get('method')}")
        log.info("resuming pretraining after epoch %d", state["epoch"])
    elif resume:
        raise CheckpointError(f"{run}: nothing to resume (no state.json)")
    else:
        (run / "images.json").write_text(json.dumps({"count": len(images), "method": method},
                                                    indent=1))
    from monai import transforms as mt

    deterministic = mt.Compose([LoadVolumed(["image"], channels=[pipeline.in_channels]),
                                *preprocess_transforms(pipeline, train=False, with_label=False),
                                mt.EnsureTyped("image", track_meta=False)])
    if pipeline.task == Task.SEGMENTATION and pipeline.preprocess.size:
        deterministic = mt.Compose([deterministic, mt.ResizeWithPadOrCropd(
            "image", spatial_size=pipeline.preprocess.size)])
    dataset = CacheDataset([{"image": p} for p in images], transform=deterministic,
                           progress=False, num_workers=0)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=len(images) > batch,
                        num_workers=cfg.num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed))
    views = _views(pipeline, geometric=method == "contrastive")
    started = time.perf_counter() - float(state.get("seconds", 0.0))
    epoch = int(state["epoch"])
    while epoch < epochs:
        network.train()
        epoch += 1
        t0 = time.perf_counter()
        total, seen = 0.0, 0
        for part in loader:
            image = part["image"]
            if method == "contrastive":
                first = torch.stack([views({"image": x})["image"] for x in image])
                second = torch.stack([views({"image": x})["image"] for x in image])
                first, second = (torch.as_tensor(first), torch.as_tensor(second))
                with step_precision(pipeline):
                    embedded = (contrastive.projection(model(first)),
                                contrastive.projection(model(second)))
                loss = loss_fn(embedded[0].float(), embedded[1].float())
            else:
                masked = torch.stack([torch.as_tensor(views({"image": x})["image"])
                                      for x in image])
                dropped = (masked == 0) & (image != 0)
                with step_precision(pipeline):
                    rebuilt = model(masked)[:, : image.shape[1]]
                error = loss_fn(rebuilt.float(), image)
                loss = error.mean() + 2.0 * (error * dropped).sum() / dropped.sum().clamp_min(1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * image.shape[0]
            seen += image.shape[0]
        scheduler.step()
        state.update(epoch=epoch, loss=total / max(seen, 1),
                     seconds=time.perf_counter() - started)
        append_csv(run / "metrics.csv", {"epoch": epoch, "loss": round(state["loss"], 6),
                                         "seconds": round(time.perf_counter() - t0, 2)})
        save_training_state(run, model=network, optimizer=optimizer, scheduler=scheduler,
                            state=state)
        save_weights(model, run / PRETRAINED_FILE)
        log.info("pretraining epoch %d: %s loss %.4f", epoch, method, state["loss"])
        if max_minutes is not None and state["seconds"] >= max_minutes * 60:
            log.info("stopping after %.1f minutes (--max-minutes)", state["seconds"] / 60)
            break
    write_text_atomic(run / "pretrain.json", json.dumps(
        {"method": method, "epochs": epoch, "loss": state["loss"], "seconds": state["seconds"],
         "images": len(images), "weights": PRETRAINED_FILE}, indent=2))
    return PretrainResult(run_dir=run, method=method, epochs_run=epoch,
                          loss=float(state["loss"] or float("nan")),
                          seconds=float(state["seconds"]), images=len(images))
