"""Name -> MONAI network, through an explicit registry (never ``eval``).

Each entry knows the constructor's own names for spatial dimensions, input channels and
outputs, so a pipeline file only gives the network name and its other keyword arguments.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medvision.config import Pipeline
from medvision.errors import ConfigError, ModelError

__all__ = ["NETWORKS", "NetworkSpec", "build_model"]


@dataclass(frozen=True)
class NetworkSpec:
    """How to call one MONAI network constructor."""

    factory: str
    tasks: tuple[str, ...]
    dims_arg: str | None = "spatial_dims"
    in_arg: str = "in_channels"
    out_arg: str = "out_channels"
    fixed: tuple[tuple[str, Any], ...] = ()

    def constructor(self) -> Callable[..., Any]:
        """The MONAI callable named by ``factory``."""
        from monai.networks import nets

        return getattr(nets, self.factory)  # type: ignore[no-any-return]


_CLS = ("classification",)
_SEG = ("segmentation",)

#: Every network a pipeline may name.
NETWORKS: dict[str, NetworkSpec] = {
    "resnet": NetworkSpec("ResNet", _CLS, in_arg="n_input_channels", out_arg="num_classes"),
    "resnet10": NetworkSpec("resnet10", _CLS, in_arg="n_input_channels", out_arg="num_classes"),
    "resnet18": NetworkSpec("resnet18", _CLS, in_arg="n_input_channels", out_arg="num_classes"),
    "resnet34": NetworkSpec("resnet34", _CLS, in_arg="n_input_channels", out_arg="num_classes"),
    "resnet50": NetworkSpec("resnet50", _CLS, in_arg="n_input_channels", out_arg="num_classes"),
    "densenet121": NetworkSpec("DenseNet121", _CLS),
    "densenet169": NetworkSpec("DenseNet169", _CLS),
    "efficientnet": NetworkSpec("EfficientNetBN", _CLS, out_arg="num_classes",
                                fixed=(("pretrained", False),)),
    "vit": NetworkSpec("ViT", _CLS, out_arg="num_classes", fixed=(("classification", True),)),
    "unet": NetworkSpec("UNet", _SEG),
    "dynunet": NetworkSpec("DynUNet", _SEG),
    "segresnet": NetworkSpec("SegResNet", _SEG),
    "swinunetr": NetworkSpec("SwinUNETR", _SEG),
    # built by medvision.models.detection (MONAI RetinaNet: backbone, pyramid, anchors)
    "retinanet": NetworkSpec("RetinaNet", ("detection",), dims_arg=None),
}


def build_model(pipeline: Pipeline) -> Any:
    """Build the pipeline's network (a ``torch.nn.Module``) with fresh weights.

    Raises:
        ConfigError: unknown network name (the message names the closest), a network for the
            other task, or constructor arguments it rejects.
    """
    name = pipeline.model.name
    spec = NETWORKS.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(NETWORKS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(NETWORKS))}"
        raise ConfigError(f"model.name '{name}' is not a known network; {hint}")
    if pipeline.task not in spec.tasks:
        raise ConfigError(f"model.name '{name}' is a {spec.tasks[0]} network, but the pipeline's "
                          f"task is {pipeline.task}")
    if name == "retinanet":
        from medvision.models.detection import build_detector

        return build_detector(pipeline)
    kwargs: dict[str, Any] = dict(spec.fixed)
    kwargs.update(pipeline.model.params)
    if spec.dims_arg:
        kwargs[spec.dims_arg] = pipeline.spatial_dims
    kwargs[spec.in_arg] = pipeline.in_channels
    kwargs[spec.out_arg] = len(pipeline.classes)
    try:
        return spec.constructor()(**kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"model '{name}' rejects its parameters {pipeline.model.params}: {e}") \
            from e
    except Exception as e:  # noqa: BLE001 - MONAI raises assorted errors for bad shapes
        raise ModelError(f"cannot build model '{name}': {e}") from e


def patch_forward(pipeline: Pipeline, network: Any, image: Any) -> Any:
    """The network's output for a preprocessed batch. A segmentation volume larger than the
    training patch (``preprocess.size``; evaluation and inference only pad to it) goes
    through a Gaussian-weighted sliding window of that patch (overlap 0.25), so a network
    whose strides need sizes divisible by 8 sees patch-sized inputs only."""
    size = pipeline.preprocess.size
    if pipeline.task == "segmentation" and size and any(
            s > p for s, p in zip(image.shape[2:], size, strict=True)):
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(image, roi_size=size, sw_batch_size=2,
                                        predictor=network, overlap=0.25, mode="gaussian")
    return network(image)
