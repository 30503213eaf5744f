"""Out-of-distribution guard stored with a model: Mahalanobis distance of pooled features.

Features pooled from one layer of the network are compared with the training set's by
Mahalanobis distance (Lee et al., 2018, with Ledoit-Wolf-style shrinkage); above the
validation distances' ``quantile`` a study is flagged ``out_of_distribution``. Stored beside
the weights as ``ood.safetensors``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvision.errors import CheckpointError, ConfigError

__all__ = ["OOD_FILE", "FeatureGuard", "capture_features", "pooled_features"]

OOD_FILE = "ood.safetensors"


def _pooled(output: Any) -> Any:
    if isinstance(output, tuple | list):
        output = output[0]
    return output.flatten(2).mean(dim=2) if output.dim() > 2 else output


class capture_features:  # noqa: N801 - a context manager, named as it reads
    """``layer``'s activations in the first forward pass through ``model`` inside the block,
    without a pass of their own: ``with capture_features(model, layer) as found: model(x)``,
    then ``found.features`` is ``(N, F)`` pooled (a float64 array), or with ``pooled=False``
    the layer's output as it was (a detached tensor on its device); ``None`` when ``layer``
    did not run.
    """

    def __init__(self, model: Any, layer: str, *, pooled: bool = True) -> None:
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ConfigError(f"'{layer}' is not a module of the network")
        self.module, self.pooled, self.features = modules[layer], pooled, None
        self._handle: Any = None

    def _hook(self, _module: Any, _inputs: Any, output: Any) -> None:
        if self.features is not None:  # the first pass only (later ones are flipped copies)
            return
        if self.pooled:
            self.features = _pooled(output).detach().float().cpu().double().numpy()
        else:
            found = output[0] if isinstance(output, tuple | list) else output
            self.features = found.detach().float()  # float32 even under autocast

    def __enter__(self) -> capture_features:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *_: Any) -> None:
        self._handle.remove()


def pooled_features(model: Any, layer: str, images: Iterable[Any], *,
                    keep_outputs: bool = False) -> tuple[np.ndarray, Any]:
    """Pooled ``layer`` activations ``(N, F)`` for each batch of preprocessed images, and with
    ``keep_outputs`` the network's outputs for them, concatenated (else ``None``)."""
    import torch

    modules = dict(model.named_modules())
    if layer not in modules:
        raise ConfigError(f"qc.feature_layer '{layer}' is not a module of the network")
    captured: list[Any] = []
    outputs: list[Any] = []
    handle = modules[layer].register_forward_hook(
        lambda _m, _i, out: captured.append(_pooled(out).detach().float().cpu()))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        with torch.no_grad():
            for image in images:
                out = model(image.to(device))
                out = out.float().cpu()
                if keep_outputs:
                    outputs.append(out)
    finally:
        handle.remove()
    return torch.cat(captured).double().numpy(), torch.cat(outputs) if keep_outputs else None


@dataclass(frozen=True, eq=False)
class FeatureGuard:
    """Mahalanobis distance of pooled layer features to the training distribution."""

    layer: str
    mean: np.ndarray
    precision: np.ndarray
    threshold: float
    quantile: float

    @staticmethod
    def features(model: Any, layer: str, images: Iterable[Any]) -> np.ndarray:
        """Pooled ``layer`` activations for each batch of preprocessed images, ``(N, F)``."""
        return pooled_features(model, layer, images)[0]

    @classmethod
    def fit(cls, features: np.ndarray, *, layer: str, quantile: float) -> FeatureGuard:
        """Fit mean, shrunk covariance and the distance threshold on training features."""
        mean = features.mean(axis=0)
        centred = features - mean
        cov = centred.T @ centred / max(len(features) - 1, 1)
        shrink = min(1.0, features.shape[1] / max(len(features), 1))
        target = np.eye(cov.shape[0]) * np.trace(cov) / cov.shape[0]
        precision = np.linalg.pinv((1 - shrink) * cov + shrink * target)
        distances = np.sqrt(np.einsum("nf,fg,ng->n", centred, precision, centred))
        return cls(layer=layer, mean=mean, precision=precision,
                   threshold=float(np.quantile(distances, quantile)), quantile=quantile)

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features``."""
        centred = np.atleast_2d(features) - self.mean
        return np.sqrt(np.einsum("nf,fg,ng->n", centred, self.precision, centred))

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``ood.safetensors`` (arrays) with the rest as metadata."""
        import torch
        from safetensors.torch import save_file

        path = Path(folder) / OOD_FILE
        save_file({"mean": torch.from_numpy(self.mean), "precision": torch.from_numpy(self.precision)},
                  str(path), metadata={"layer": self.layer, "threshold": repr(self.threshold),
                                       "quantile": repr(self.quantile)})
        return path

    @classmethod
    def load(cls, weights: str | os.PathLike[str]) -> FeatureGuard | None:
        """The guard stored beside ``weights``, or ``None`` when there is none."""
        from safetensors import safe_open

        path = Path(weights).parent / OOD_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="np") as handle:
                meta = handle.metadata()
                return cls(layer=meta["layer"], mean=handle.get_tensor("mean"),
                           precision=handle.get_tensor("precision"),
                           threshold=float(meta["threshold"]), quantile=float(meta["quantile"]))
        except (OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable OOD statistics ({e})") from e

    def describe(self) -> dict[str, Any]:
        """JSON summary (without the matrices)."""
        return {"layer": self.layer, "threshold": self.threshold, "quantile": self.quantile,
                "features": int(self.mean.shape[0])}
