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

__all__ = ["OnnxDetectionHead", "OnnxModel", "export_detection_onnx", "export_onnx"]


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


def export_detection_onnx(detector: Any, spatial_size: tuple[int, ...], channels: int,
                          path: str | os.PathLike[str], *, opset: int = 17) -> Path:
    """Export a RetinaNet detector's network (backbone, pyramid and heads) to ONNX.

    Anchors, box decoding and non-maximum suppression stay in PyTorch (MONAI's detector
    post-processing), so ONNX and PyTorch give the same boxes from the same head outputs.
    Outputs are ``cls_<level>`` and ``box_<level>``; spatial axes are dynamic.
    """
    import torch

    from medvision.extras import require

    require("onnx", "onnx", "ONNX export")
    network = detector.network

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.network(x)
            return (*out["classification"], *out["box_regression"])

    example = torch.zeros((1, channels, *spatial_size))
    with torch.no_grad():
        levels = len(network(example)["classification"])
    names = [f"cls_{k}" for k in range(levels)] + [f"box_{k}" for k in range(levels)]
    axes = {0: "batch", **{2 + i: f"dim{i}" for i in range(len(spatial_size))}}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.onnx.export(Flat().eval(), (example,), str(target), input_names=["image"],
                          output_names=names, opset_version=opset, dynamo=False,
                          dynamic_axes={"image": axes, **{n: axes for n in names}})
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        raise ModelError(f"cannot export to ONNX: {type(e).__name__}: {e}") from e
    return target


def _module_base() -> type:
    import torch

    return torch.nn.Module


class OnnxDetectionHead(_module_base()):  # type: ignore[misc]
    """Stands in for a RetinaNet detector's ``network``: runs the exported backbone and heads
    in onnxruntime and returns the head outputs as MONAI's detector expects them."""

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None,
                 torch_network: Any = None) -> None:
        super().__init__()
        self.model = OnnxModel(path, threads=threads)
        self.outputs = [o.name for o in self.model.session.get_outputs()]
        # attributes MONAI's detector reads from its network (anchors, sizes, keys)
        if torch_network is not None:
            for name in ("spatial_dims", "num_classes", "size_divisible", "cls_key",
                         "box_reg_key", "num_anchors"):
                if hasattr(torch_network, name):
                    setattr(self, name, getattr(torch_network, name))

    def forward(self, images: Any) -> dict[str, list[Any]]:
        import torch

        array = images.detach().cpu().numpy()
        values = self.model.session.run(
            self.outputs, {"image": np.ascontiguousarray(array, np.float32)})
        found = dict(zip(self.outputs, values, strict=True))
        levels = sorted(int(n.split("_")[1]) for n in self.outputs if n.startswith("cls_"))
        return {"classification": [torch.from_numpy(found[f"cls_{k}"]) for k in levels],
                "box_regression": [torch.from_numpy(found[f"box_{k}"]) for k in levels]}
