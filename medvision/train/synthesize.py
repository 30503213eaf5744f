"""Class-conditional image synthesis (``medvision synthesize``): train a diffusion model on a
pipeline's training images, then sample labelled synthetic images that never pass for patients.

Training: the pipeline's deterministic preprocessing (same reader, same intensity scaling),
resized to ``generative.size`` and mapped to [-1, 1]; MONAI's ``DiffusionModelUNet`` with one
class embedding per class predicts the noise (or the velocity) of a DDPM schedule (MSE).
Checkpoints every epoch; ``--resume`` continues; ``--max-minutes`` stops after the epoch that
passes the limit.

Sampling: DDIM with ``generative.sample_steps`` steps from seeded noise, N images per class into
``OUT/<class>/synthetic-<class>-<seed>-<n>.png`` (8-bit grey or RGB; ``.nii.gz`` volumes for a
3D pipeline), each with a sidecar ``<file>.json`` and the file's own copy (PNG text chunk,
NIfTI comment extension) of the provenance: ``synthetic: true``, the
generator's SHA-256, the seed, the training step and the class; the readers carry the flag
into reports and audit records.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvision.atomic import write_text_atomic
from medvision.config import Pipeline
from medvision.errors import ConfigError, DataError
from medvision.io.synthetic import EMBED_KEY
from medvision.models import weights_sha256
from medvision.train.data import DataSplit
from medvision.vocabulary import Task

__all__ = ["GENERATOR_FILE", "SynthesisResult", "generator_training_items", "generator_transform", "sample", "scarce_split", "train_generator"]

log = logging.getLogger(__name__)

GENERATOR_FILE = "generator.safetensors"
#: The generator's training items (paths, or groups of array items), for the memorisation check.
TRAINING_ITEMS = "training_items.json"


@dataclass(frozen=True)
class SynthesisResult:
    """What a generator training run did."""

    run_dir: Path
    epochs_run: int
    steps: int
    loss: float
    seconds: float


def generator_training_items(pipeline: Pipeline, run_dir: str | os.PathLike[str],
                             data: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The items a generator was trained on, from its ``training_items.json``: file items as
    recorded; array items (an ``.npz`` file's) found again in ``data`` by their group.

    Raises:
        ConfigError: no record, or array items without ``data``.
        DataError: a recorded item that ``data`` no longer has.
    """
    from medvision.train.data import discover_items

    path = Path(run_dir) / TRAINING_ITEMS
    if not path.is_file():
        raise ConfigError(f"{path}: missing; the generator's training items are unknown")
    recorded = json.loads(path.read_text())
    if all(r["image"] is not None for r in recorded):
        return [{"image": r["image"], "label": r["label"], "group": r["group"]}
                for r in recorded]
    if data is None:
        raise ConfigError("the generator was trained on arrays (.npz); give the data file")
    by_group: dict[str, dict[str, Any]] = {}
    for split in sorted({r["group"].rsplit("-", 1)[0] for r in recorded}):
        by_group.update({i["group"]: i for i in discover_items(pipeline, data, split=split)})
    missing = [r["group"] for r in recorded if r["group"] not in by_group]
    if missing:
        raise DataError(f"{data}: {len(missing)} of the generator's training items are not "
                        f"there (first: {missing[0]})")
    return [by_group[r["group"]] for r in recorded]


def scarce_split(pipeline: Pipeline, split: DataSplit, scarce: str,
                 keep_fraction: float) -> DataSplit:
    """``split`` with only ``keep_fraction`` of the ``scarce`` class's training patients kept
    (at least one; chosen with ``data.split_seed``); the validation side is untouched.

    This makes a class scarce on purpose, for the augmentation experiment: the generator and
    both classifiers then see the same reduced training side.

    Raises:
        ConfigError: an unknown class or a fraction outside (0, 1].
    """
    if scarce not in pipeline.classes:
        raise ConfigError(f"unknown class '{scarce}'; the pipeline has "
                          f"{list(pipeline.classes)}")
    if not 0 < keep_fraction <= 1:
        raise ConfigError(f"keep fraction {keep_fraction} is not in (0, 1]")
    label = pipeline.classes.index(scarce)
    groups = sorted({i["group"] for i in split.train if int(i["label"]) == label})
    random.Random(pipeline.data.split_seed).shuffle(groups)
    kept = set(groups[:max(1, round(len(groups) * keep_fraction))])
    train = tuple(i for i in split.train if int(i["label"]) != label or i["group"] in kept)
    return DataSplit(train=train, val=split.val, fold=split.fold)


def _network(pipeline: Pipeline) -> Any:
    from monai.networks.nets import DiffusionModelUNet

    cfg = pipeline.generative
    return DiffusionModelUNet(
        spatial_dims=pipeline.spatial_dims, in_channels=pipeline.in_channels,
        out_channels=pipeline.in_channels, channels=cfg.channels,
        attention_levels=cfg.attention_levels, num_res_blocks=cfg.num_res_blocks,
        num_head_channels=cfg.channels[-1], num_class_embeds=len(pipeline.classes),
        norm_num_groups=min(32, cfg.channels[0]))


def _check(pipeline: Pipeline) -> None:
    if pipeline.task != Task.CLASSIFICATION:
        raise ConfigError("synthesize makes labelled images for classification pipelines; "
                          f"'{pipeline.name}' is {pipeline.task}")
    if len(pipeline.generative.size) != pipeline.spatial_dims:
        raise ConfigError(f"generative.size {list(pipeline.generative.size)} does not match "
                          f"spatial_dims {pipeline.spatial_dims}")


def generator_transform(pipeline: Pipeline) -> Any:
    """The generator's view of an item: the pipeline's deterministic preprocessing, resized to
    ``generative.size`` and mapped to [-1, 1]."""
    from monai import transforms as mt

    from medvision.transforms.chain import LoadVolumed, preprocess_transforms

    size = list(pipeline.generative.size)
    return mt.Compose([
        LoadVolumed(["image"], channels=[pipeline.in_channels]),
        *preprocess_transforms(pipeline, train=False, with_label=False),
        mt.Resized("image", spatial_size=size, mode="area"),
        mt.ScaleIntensityRanged("image", a_min=0.0, a_max=1.0, b_min=-1.0, b_max=1.0,
                                clip=True),
        mt.EnsureTyped("image", track_meta=False)])


def train_generator(pipeline: Pipeline, items: Sequence[dict[str, Any]],
                    run_dir: str | os.PathLike[str], *, resume: bool = False,
                    max_minutes: float | None = None, max_steps: int | None = None,
                    device: str | None = "auto", progress: bool | None = None,
                    tracking: Sequence[str] | str | None = None,
                    options: Mapping[str, Any] | None = None) -> SynthesisResult:
    """Train the pipeline's generative model on labelled ``items`` (``image``, ``label``).

    Raises:
        ConfigError: not a classification pipeline, or a non-empty run folder without
            ``resume``.
        DeviceError: the device is not there.
        CheckpointError: nothing to resume from.
        DataError: no items.
    """
    from medvision.train.engine import Engine

    _check(pipeline)
    if not items:
        raise DataError("no training items for the generator")
    from medvision.audit.records import items_digest
    from medvision.train.engine import RunFolder
    from medvision.train.progress import tracked, tracking_targets

    targets = tracking_targets(pipeline, tracking)
    engine = Engine(device=device, seed=pipeline.generative.seed,
                    threads=pipeline.training.threads)
    try:
        run = RunFolder(run_dir, resume=resume, writer=engine.is_main)
        with tracked(targets, run, pipeline=pipeline, kind="synthesize", engine=engine,
                     options=options, data={"train": items_digest(items)}) as tracker:
            return _train_generator(pipeline, items, run, engine=engine, resume=resume,
                                    max_minutes=max_minutes, max_steps=max_steps,
                                    progress=progress, tracker=tracker)
    finally:
        engine.close()


def _train_generator(pipeline: Pipeline, items: Sequence[dict[str, Any]],
                     run: Any, *, engine: Any, resume: bool,
                     max_minutes: float | None, max_steps: int | None,
                     progress: bool | None, tracker: Any) -> SynthesisResult:
    import torch
    from monai.data import CacheDataset
    from monai.networks.schedulers import DDPMScheduler
    from monai.utils import set_determinism

    from medvision.train.engine import StepOutput, TrainingState
    from medvision.train.progress import EpochReport

    cfg = pipeline.generative
    set_determinism(seed=cfg.seed)
    network = _network(pipeline).to(engine.device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.lr)
    scheduler = DDPMScheduler(num_train_timesteps=cfg.timesteps, schedule="scaled_linear_beta",
                              beta_start=0.0015, beta_end=0.0195,
                              prediction_type=cfg.prediction)
    state = TrainingState()
    if resume and run.has_state:
        state = run.restore(model=network, optimizer=optimizer, scheduler=None,
                            device=engine.device)
        log.info("resuming generator training after epoch %d", state.epoch)
    elif resume:
        from medvision.errors import CheckpointError

        raise CheckpointError(f"{run.path}: nothing to resume (no state.json)")
    else:
        run.write_pipeline(pipeline)
        counts = np.bincount([int(i["label"]) for i in items], minlength=len(pipeline.classes))
        run.write_json("data.json", {"items": len(items), "per_class": dict(zip(
            pipeline.classes, map(int, counts), strict=True))})
        run.write_text(TRAINING_ITEMS, json.dumps(
            [{"image": i["image"] if isinstance(i["image"], str) else None,
              "label": int(i["label"]), "group": str(i.get("group", ""))} for i in items]))
    trained = engine.prepare_model(network)
    data = [{"image": i["image"], "label": int(i["label"])} for i in items]
    dataset = CacheDataset(data, transform=generator_transform(pipeline), progress=False,
                           num_workers=0)
    loader = engine.loader(dataset, batch_size=cfg.batch_size, train=True,
                           drop_last=len(data) > cfg.batch_size)

    def step(part: dict[str, Any]) -> StepOutput:
        image = part["image"]
        labels = part["label"].long().view(-1)
        noise = torch.randn_like(image)
        t = torch.randint(0, cfg.timesteps, (image.shape[0],), device=image.device)
        noisy = scheduler.add_noise(original_samples=image, noise=noise, timesteps=t)
        target = noise if cfg.prediction == "epsilon" else scheduler.get_velocity(
            image, noise, t)
        loss = torch.nn.functional.mse_loss(trained(noisy, t, class_labels=labels), target)
        return StepOutput(loss=loss, samples=int(image.shape[0]))

    def epoch(number: int, state: TrainingState) -> TrainingState:
        network.train()
        left = None if max_steps is None else max(0, max_steps - state.step)
        stats = engine.run_epoch(loader, step, optimizer=optimizer, epoch=number,
                                 description=f"generator {number}/{cfg.epochs}",
                                 progress=progress, max_steps=left)
        steps = state.step + stats.steps
        state = state.replace(
            epoch=number, step=steps, loss=stats.loss, seconds=state.seconds + stats.seconds,
            extra={**state.extra, "stopped": max_steps is not None and steps >= max_steps},
            history=(*state.history, {"epoch": number, "step": steps,
                                      "loss": round(stats.loss, 6),
                                      "seconds": round(stats.seconds, 2)}))
        run.checkpoint(state, model=network, optimizer=optimizer, scheduler=None)
        run.save_weights(network, GENERATOR_FILE)
        log.info("generator epoch %d (step %d): loss %.4f", number, steps, stats.loss)
        return state

    report = EpochReport(run, epochs=cfg.epochs, title="generator epoch", tracker=tracker)
    state = engine.fit(state, epochs=cfg.epochs, epoch=epoch, max_minutes=max_minutes,
                       report=report)
    if run.writer:
        run.write_json("generator.json", {
            "epochs": state.epoch, "steps": state.step, "loss": state.loss,
            "seconds": state.seconds, "weights": GENERATOR_FILE,
            "sha256": weights_sha256(run / GENERATOR_FILE), "device": engine.describe()})
    if tracker and (run / GENERATOR_FILE).is_file():
        tracker.set_tags({"medvision.weights_sha256": weights_sha256(run / GENERATOR_FILE)})
        report.finish()
        tracker.log_artifacts([run / "generator.json", run / "pipeline.yaml"])
    return SynthesisResult(run_dir=run.path, epochs_run=state.epoch, steps=state.step,
                           loss=float(state.loss if state.loss is not None else float("nan")),
                           seconds=state.seconds)


def _write_sample(array: np.ndarray, stem: Path, provenance: dict[str, Any]) -> Path:
    """One sample ``(C, ...)`` of uint8: a PNG with the provenance in a text chunk (2D), or a
    NIfTI volume with it in a comment extension (3D)."""
    text = json.dumps(provenance)
    if array.ndim == 3:
        from PIL import Image, PngImagePlugin

        path = stem.with_name(stem.name + ".png")
        # (C, W, H) in medvision's x-first order -> PIL rows
        image = Image.fromarray(array[0].T if array.shape[0] == 1 else
                                np.transpose(array, (2, 1, 0)))
        chunk = PngImagePlugin.PngInfo()
        chunk.add_text(EMBED_KEY, text)
        image.save(path, pnginfo=chunk)
        return path
    from medvision.io import Volume
    from medvision.io.nifti import write_nifti

    path = stem.with_name(stem.name + ".nii.gz")
    write_nifti(Volume(array=array.astype(np.float32), affine=np.eye(4), modality="OT"), path,
                comment=text)
    return path


def sample(pipeline: Pipeline, run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
           *, per_class: int, seed: int = 0, classes: Sequence[str] | None = None,
           batch_size: int = 16, device: str | None = "auto") -> list[Path]:
    """Sample ``per_class`` images of each class (or of ``classes``) from a trained generator
    into ``out_dir/<class>/``, each with its provenance; returns the files.

    Raises:
        ConfigError: an unknown class, or no generator in ``run_dir``.
    """
    import torch
    from monai.networks.schedulers import DDIMScheduler

    from medvision.devices import resolve_device
    from medvision.models import load_weights

    target = resolve_device(device)  # before anything else: a missing device is a usage error
    _check(pipeline)
    cfg = pipeline.generative
    run = Path(run_dir)
    weights = run / GENERATOR_FILE
    if not weights.is_file():
        raise ConfigError(f"{run}: no {GENERATOR_FILE}; train one with 'medvision synthesize "
                          "train'")
    info = json.loads((run / "generator.json").read_text()) if (
        run / "generator.json").is_file() else {}
    wanted = list(classes or pipeline.classes)
    unknown = set(wanted) - set(pipeline.classes)
    if unknown:
        raise ConfigError(f"unknown classes {sorted(unknown)}; the pipeline has "
                          f"{list(pipeline.classes)}")
    network = _network(pipeline).to(target)
    load_weights(network, weights, device=target)
    network.eval()
    scheduler = DDIMScheduler(num_train_timesteps=cfg.timesteps, schedule="scaled_linear_beta",
                              beta_start=0.0015, beta_end=0.0195, clip_sample=True,
                              prediction_type=cfg.prediction)
    scheduler.set_timesteps(cfg.sample_steps)
    digest = weights_sha256(weights)
    generator = torch.Generator().manual_seed(seed)
    out = Path(out_dir)
    written: list[Path] = []
    for name in wanted:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        index = pipeline.classes.index(name)
        for start in range(0, per_class, batch_size):
            count = min(batch_size, per_class - start)
            # the noise is drawn on the CPU, so a seed gives the same images on every device
            x = torch.randn((count, pipeline.in_channels, *cfg.size),
                            generator=generator).to(target)
            labels = torch.full((count,), index, dtype=torch.long, device=target)
            with torch.no_grad():
                for t in scheduler.timesteps:
                    predicted = network(x, torch.full((count,), int(t), device=target),
                                        class_labels=labels)
                    x, _ = scheduler.step(predicted, int(t), x)
            pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
            for k in range(count):
                number = start + k
                provenance = {"synthetic": True, "generator_sha256": digest,
                              "generator_steps": info.get("steps"), "seed": seed,
                              "index": number, "class": name, "pipeline": pipeline.name,
                              "sampler": f"DDIM {cfg.sample_steps} steps"}
                stem = folder / f"synthetic-{name}-{seed}-{number:05d}"
                path = _write_sample(pixels[k], stem, provenance)
                write_text_atomic(path.with_name(path.name + ".json"),
                                  json.dumps(provenance, indent=1))
                written.append(path)
    write_text_atomic(out / "provenance.json", json.dumps(
        {"synthetic": True, "generator_sha256": digest, "seed": seed, "per_class": per_class,
         "classes": wanted, "files": len(written)}, indent=2))
    return written
