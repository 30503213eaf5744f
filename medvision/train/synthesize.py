"""Class-conditional image synthesis (``medvision synthesize``): train a diffusion model on a
pipeline's training images, then sample labelled synthetic images that never pass for patients.

Training: the pipeline's deterministic preprocessing (same reader, same intensity scaling),
resized to ``generative.size`` and mapped to [-1, 1]; MONAI's ``DiffusionModelUNet`` with one
class embedding per class predicts the noise added by a DDPM schedule (MSE). Checkpoints every
epoch; ``--resume`` continues; ``--max-minutes`` stops after the epoch that passes the limit.

Sampling: DDIM with ``generative.sample_steps`` steps from seeded noise, N images per class into
``OUT/<class>/synthetic-<class>-<n>.png`` (8-bit grey or RGB), each with a sidecar
``<file>.json`` and the PNG's own text chunk carrying the provenance: ``synthetic: true``, the
generator's SHA-256, the seed, the training step and the class. (Carrying that flag into
reports and audit records is not built yet.)
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

import numpy as np

from medvision.atomic import append_csv, write_text_atomic
from medvision.config import Pipeline
from medvision.errors import ConfigError, DataError
from medvision.models import save_weights, weights_sha256
from medvision.train.checkpoint_state import (
    load_training_state,
    open_run_dir,
    save_training_state,
)
from medvision.vocabulary import Task

__all__ = ["GENERATOR_FILE", "SynthesisResult", "sample", "train_generator"]

log = logging.getLogger(__name__)

GENERATOR_FILE = "generator.safetensors"
#: The PNG text chunk key holding the provenance of a synthetic image.
PNG_KEY = "medvision-synthetic"


@dataclass(frozen=True)
class SynthesisResult:
    """What a generator training run did."""

    run_dir: Path
    epochs_run: int
    steps: int
    loss: float
    seconds: float


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


def _transform(pipeline: Pipeline) -> Any:
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
                    max_minutes: float | None = None, max_steps: int | None = None
                    ) -> SynthesisResult:
    """Train the pipeline's generative model on labelled ``items`` (``image``, ``label``).

    Raises:
        ConfigError: not a classification pipeline, or a non-empty run folder without
            ``resume``.
        CheckpointError: nothing to resume from.
        DataError: no items.
    """
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.networks.schedulers import DDPMScheduler
    from monai.utils import set_determinism

    _check(pipeline)
    if not items:
        raise DataError("no training items for the generator")
    cfg = pipeline.generative
    run = open_run_dir(run_dir, resume=resume)
    if pipeline.training.threads:
        torch.set_num_threads(pipeline.training.threads)
    set_determinism(seed=cfg.seed)
    network = _network(pipeline)
    optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.lr)
    scheduler = DDPMScheduler(num_train_timesteps=cfg.timesteps, schedule="scaled_linear_beta",
                              beta_start=0.0015, beta_end=0.0195)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "seconds": 0.0, "loss": None}
    if resume and (run / "state.json").is_file():
        state = load_training_state(run, model=network, optimizer=optimizer, scheduler=None)
        log.info("resuming generator training after epoch %d", state["epoch"])
    elif resume:
        from medvision.errors import CheckpointError

        raise CheckpointError(f"{run}: nothing to resume (no state.json)")
    else:
        import yaml

        (run / "pipeline.yaml").write_text(yaml.safe_dump(pipeline.model_dump(mode="json"),
                                                          sort_keys=False))
        counts = np.bincount([int(i["label"]) for i in items], minlength=len(pipeline.classes))
        (run / "data.json").write_text(json.dumps(
            {"items": len(items), "per_class": dict(zip(pipeline.classes,
                                                        map(int, counts), strict=True))},
            indent=1))
    data = [{"image": i["image"], "label": int(i["label"])} for i in items]
    dataset = CacheDataset(data, transform=_transform(pipeline), progress=False, num_workers=0)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                        drop_last=len(data) > cfg.batch_size, num_workers=0,
                        generator=torch.Generator().manual_seed(cfg.seed + state["epoch"]))
    started = time.perf_counter() - float(state["seconds"])
    epoch, step = int(state["epoch"]), int(state["step"])
    stop = False
    while epoch < cfg.epochs and not stop:
        network.train()
        epoch += 1
        t0 = time.perf_counter()
        total, seen = 0.0, 0
        for part in loader:
            image = torch.as_tensor(part["image"])
            labels = torch.as_tensor(part["label"]).long().view(-1)
            noise = torch.randn_like(image)
            t = torch.randint(0, cfg.timesteps, (image.shape[0],))
            noisy = scheduler.add_noise(original_samples=image, noise=noise, timesteps=t)
            loss = torch.nn.functional.mse_loss(network(noisy, t, class_labels=labels), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * image.shape[0]
            seen += image.shape[0]
            step += 1
            if max_steps is not None and step >= max_steps:
                stop = True
                break
        state.update(epoch=epoch, step=step, loss=total / max(seen, 1),
                     seconds=time.perf_counter() - started)
        append_csv(run / "metrics.csv", {"epoch": epoch, "step": step,
                                         "loss": round(state["loss"], 6),
                                         "seconds": round(time.perf_counter() - t0, 2)})
        save_training_state(run, model=network, optimizer=optimizer, scheduler=None,
                            state=state)
        save_weights(network, run / GENERATOR_FILE)
        log.info("generator epoch %d (step %d): loss %.4f", epoch, step, state["loss"])
        if max_minutes is not None and state["seconds"] >= max_minutes * 60:
            log.info("stopping after %.1f minutes (--max-minutes)", state["seconds"] / 60)
            break
    write_text_atomic(run / "generator.json", json.dumps(
        {"epochs": epoch, "steps": step, "loss": state["loss"], "seconds": state["seconds"],
         "weights": GENERATOR_FILE, "sha256": weights_sha256(run / GENERATOR_FILE)},
        indent=2))
    return SynthesisResult(run_dir=run, epochs_run=epoch, steps=step,
                           loss=float(state["loss"] or float("nan")),
                           seconds=float(state["seconds"]))


def sample(pipeline: Pipeline, run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
           *, per_class: int, seed: int = 0, classes: Sequence[str] | None = None,
           batch_size: int = 16) -> list[Path]:
    """Sample ``per_class`` images of each class (or of ``classes``) from a trained generator
    into ``out_dir/<class>/``, each with its provenance; returns the files.

    Raises:
        ConfigError: an unknown class, or no generator in ``run_dir``.
    """
    import torch
    from monai.networks.schedulers import DDIMScheduler
    from PIL import Image, PngImagePlugin

    from medvision.models import load_weights

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
    network = _network(pipeline)
    load_weights(network, weights)
    network.eval()
    scheduler = DDIMScheduler(num_train_timesteps=cfg.timesteps, schedule="scaled_linear_beta",
                              beta_start=0.0015, beta_end=0.0195, clip_sample=True)
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
            x = torch.randn((count, pipeline.in_channels, *cfg.size), generator=generator)
            labels = torch.full((count,), index, dtype=torch.long)
            with torch.no_grad():
                for t in scheduler.timesteps:
                    predicted = network(x, torch.full((count,), int(t)), class_labels=labels)
                    x, _ = scheduler.step(predicted, int(t), x)
            pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
            for k in range(count):
                number = start + k
                path = folder / f"synthetic-{name}-{seed}-{number:05d}.png"
                provenance = {"synthetic": True, "generator_sha256": digest,
                              "generator_steps": info.get("steps"), "seed": seed,
                              "index": number, "class": name, "pipeline": pipeline.name,
                              "sampler": f"DDIM {cfg.sample_steps} steps"}
                array = pixels[k]
                # (C, W, H) in medvision's x-first order -> PIL rows
                image = Image.fromarray(array[0].T if array.shape[0] == 1 else
                                        np.transpose(array, (2, 1, 0)))
                text = PngImagePlugin.PngInfo()
                text.add_text(PNG_KEY, json.dumps(provenance))
                image.save(path, pnginfo=text)
                write_text_atomic(path.with_name(path.name + ".json"),
                                  json.dumps(provenance, indent=1))
                written.append(path)
    write_text_atomic(out / "provenance.json", json.dumps(
        {"synthetic": True, "generator_sha256": digest, "seed": seed, "per_class": per_class,
         "classes": wanted, "files": len(written)}, indent=2))
    return written
