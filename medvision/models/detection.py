"""Detection networks: MONAI's RetinaNet (``monai.apps.detection``), 2D and 3D.

Why MONAI's and not torchvision's: the same code serves 2D and 3D (``spatial_dims``), its box
utilities and box transforms (zoom, flip, rotate, crop keeping boxes with the image) are the
ones medvision's transforms use, and it needs no extra dependency; torchvision's detectors are
2D only. The backbone is a MONAI ResNet with a feature pyramid (``resnet_fpn_feature_extractor``);
anchors come from ``AnchorGeneratorWithAnchorShape``; matching is ATSS; the classification loss
is a focal loss with hard negative sampling, the box loss smooth L1 on encoded boxes.

``model.params`` (all optional):

* ``depth``: ResNet depth, 10, 18, 34 or 50 (default 18);
* ``conv1_stride``: stride of the first convolution (default 2: faster, coarser);
* ``returned_layers``: backbone layers fed to the pyramid (default ``[1, 2, 3]``);
* ``anchor_sizes``: anchor side lengths in pixels at the finest pyramid level (default
  ``[8, 12, 16]``; each level doubles them);
* ``score_thresh`` (0.05), ``nms_thresh`` (0.45), ``detections_per_image`` (150): inference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medvision.config import Pipeline
from medvision.errors import ConfigError

__all__ = ["DETECTION_PARAMS", "build_detector"]


def _torchvision_helpers() -> None:
    """Give MONAI's detection code the pure-Python torchvision helpers it borrows when
    torchvision is not importable.

    MONAI's RetinaNet imports ``IntermediateLayerGetter`` and ``_validate_trainable_layers``
    from torchvision, and checks whether its matcher is torchvision's ``Matcher``. PyPI's torchvision wheels are CUDA builds whose compiled operators do not
    load against the CPU build of PyTorch these machines use, so ``import torchvision`` fails.
    Both helpers are a few lines of plain PyTorch (the same behaviour as torchvision 0.12's,
    which MONAI's code was adapted from); with a working torchvision they are not touched.
    """
    from collections import OrderedDict

    import torch
    from monai.apps.detection.networks import retinanet_network
    from monai.networks.blocks import backbone_fpn_utils

    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        pass

    class IntermediateLayerGetter(torch.nn.ModuleDict):
        """Run a backbone's top-level children in order, returning the named outputs."""

        def __init__(self, model: torch.nn.Module, return_layers: dict[str, str]) -> None:
            wanted = dict(return_layers)
            layers: OrderedDict[str, torch.nn.Module] = OrderedDict()
            for name, module in model.named_children():
                layers[name] = module
                wanted.pop(name, None)
                if not wanted:
                    break
            super().__init__(layers)
            self.return_layers = dict(return_layers)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            out: OrderedDict[str, torch.Tensor] = OrderedDict()
            for name, module in self.items():
                x = module(x)
                if name in self.return_layers:
                    out[self.return_layers[name]] = x
            return out

    def validate_trainable_layers(is_trained: bool, trainable: int | None, max_value: int,
                                  default_value: int) -> int:
        if not is_trained:
            return max_value
        value = default_value if trainable is None else trainable
        if not 0 <= value <= max_value:
            raise ValueError(f"trainable layers should be in [0, {max_value}], got {value}")
        return value

    class _Utils:
        pass

    class _Models:
        _utils = _Utils()

    class TorchvisionMatcher:
        """Stands for torchvision's IoU matcher, which medvision does not use (it uses MONAI's
        ATSS matcher); MONAI's detector only checks whether its matcher is one."""

    from monai.apps.detection.networks import retinanet_detector

    retinanet_detector.Matcher = TorchvisionMatcher  # type: ignore[attr-defined,misc]
    _Models._utils.IntermediateLayerGetter = IntermediateLayerGetter  # type: ignore[attr-defined]
    backbone_fpn_utils.torchvision_models = _Models()  # type: ignore[attr-defined]
    retinanet_network._validate_trainable_layers = validate_trainable_layers  # type: ignore[attr-defined]

DETECTION_PARAMS = {"depth": 18, "conv1_stride": 2, "returned_layers": [1, 2, 3],
                    "anchor_sizes": [8, 12, 16], "score_thresh": 0.05, "nms_thresh": 0.45,
                    "detections_per_image": 150}


def build_detector(pipeline: Pipeline) -> Any:
    """A ``RetinaNetDetector`` (a ``torch.nn.Module``) with fresh weights.

    Raises:
        ConfigError: unknown parameters or values the network cannot take.
    """
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import (
        RetinaNet,
        resnet_fpn_feature_extractor,
    )
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.networks.nets import resnet

    _torchvision_helpers()
    unknown = sorted(set(pipeline.model.params) - set(DETECTION_PARAMS))
    if unknown:
        raise ConfigError(f"model.params {unknown} are not RetinaNet parameters (known: "
                          f"{', '.join(DETECTION_PARAMS)})")
    params = {**DETECTION_PARAMS, **pipeline.model.params}
    dims = pipeline.spatial_dims
    depths = {10: resnet.resnet10, 18: resnet.resnet18, 34: resnet.resnet34,
              50: resnet.resnet50}
    if params["depth"] not in depths:
        raise ConfigError(f"model.params.depth {params['depth']}: use 10, 18, 34 or 50")
    stride = int(params["conv1_stride"])
    backbone = depths[params["depth"]](spatial_dims=dims, n_input_channels=pipeline.in_channels,
                                       conv1_t_stride=stride, conv1_t_size=7)
    layers = tuple(int(v) for v in params["returned_layers"])
    extractor = resnet_fpn_feature_extractor(backbone, dims, returned_layers=layers)
    sizes = [float(s) for s in params["anchor_sizes"]]
    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[2 ** level for level in range(len(layers) + 1)],
        base_anchor_shapes=[[s] * dims for s in sizes])
    network = RetinaNet(spatial_dims=dims, num_classes=len(pipeline.classes),
                        num_anchors=anchors.num_anchors_per_location()[0],
                        feature_extractor=extractor,
                        size_divisible=[stride * 2 ** (max(layers) + 1)] * dims)
    detector = RetinaNetDetector(network=network, anchor_generator=anchors, spatial_dims=dims,
                                 num_classes=len(pipeline.classes),
                                 size_divisible=[stride * 2 ** (max(layers) + 1)] * dims)
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    detector.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3,
                                       pool_size=20, min_neg=16)
    detector.set_target_keys(box_key="boxes", label_key="labels")
    detector.set_box_selector_parameters(
        score_thresh=float(params["score_thresh"]), topk_candidates_per_level=1000,
        nms_thresh=float(params["nms_thresh"]),
        detections_per_img=int(params["detections_per_image"]))
    return detector


def detect(detector: Any, image: Any, zoom: Any) -> dict[str, np.ndarray]:
    """Every box the detector keeps for one preprocessed image ``(C, ...)``, mapped back to
    the input's pixels by the ``zoom`` preprocessing applied; labels and scores with them.

    Training's validation, ``evaluate`` and ``analyze`` all predict through this.
    """
    import torch

    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    device = next((p.device for p in detector.parameters()), torch.device("cpu"))
    with torch.no_grad():
        found = detector([torch.as_tensor(image).float().to(device)])[0]
    zoom = np.asarray(zoom, dtype=np.float32).reshape(-1)
    scale = np.concatenate([zoom, zoom]).astype(np.float32)
    return {"boxes": found["boxes"].detach().cpu().numpy().astype(np.float32) / scale,
            "labels": found["labels"].detach().cpu().numpy().astype(np.int64),
            "scores": found["labels_scores"].detach().cpu().numpy().astype(np.float32)}
