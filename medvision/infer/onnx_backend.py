"""ONNX export and an onnxruntime backend for prediction on CPU.

Explanations need gradients, so saliency maps always come from the PyTorch network; the ONNX
session replaces it for the forward passes that make predictions (including every window of a
sliding-window inference).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from medvision.errors import CheckpointError, MissingDependencyError, ModelError

__all__ = ["OnnxModel", "export_onnx"]


def export_onnx(model: Any, spatial_size: tuple[int, ...], channels: int,
                path: str | os.PathLike[str], *, dynamic_spatial: bool, opset: int = 17) -> Path:
    """Export ``model`` to ONNX with a dynamic batch axis (and spatial axes if asked).

    Args:
        model: the network (eval mode).
        spatial_size: example input size (the pipeline's ``preprocess.size``).
        channels: input channels.
        path: output file.
        dynamic_spatial: allow any spatial size (fully convolutional segmentation networks).
    """
    import torch

    from medvision.extras import require

    require("onnx", "onnx", "ONNX export")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((1, channels, *spatial_size))
    axes = {0: "batch"}
    if dynamic_spatial:
        axes.update({2 + i: f"dim{i}" for i in range(len(spatial_size))})
    model.eval()
    try:
        torch.onnx.export(model, (example,), str(target), input_names=["image"],
                          output_names=["logits"], opset_version=opset, dynamo=False,
                          dynamic_axes={"image": axes, "logits": axes if dynamic_spatial
                                        else {0: "batch"}})
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        raise ModelError(f"cannot export to ONNX: {type(e).__name__}: {e}") from e
    return target


class OnnxModel:
    """Callable like the torch network: ``(N, C, ...)`` tensor in, logits tensor out."""

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MissingDependencyError("the onnx backend needs onnxruntime: "
                                         "pip install 'medvision[onnx]'") from e
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no ONNX model; create it with "
                                  "'medvision export PIPELINE --format onnx'")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, image: Any) -> Any:
        import torch

        array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        (out,) = self.session.run(["logits"], {"image": np.ascontiguousarray(array, np.float32)})
        return torch.from_numpy(out)
