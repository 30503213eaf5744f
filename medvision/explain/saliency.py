"""Saliency maps with Captum: Integrated Gradients, Saliency, GradCAM, Occlusion.

The attribution is computed in model space (after preprocessing), reduced over channels,
scaled to [0, 1] and mapped back through the inverse of the preprocessing, so the map has
exactly the input's shape and affine. For segmentation the target is a region: the predicted
classes' logits summed inside their predicted masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medvision.config import ExplanationConfig
from medvision.errors import ExplainError
from medvision.infer.predictor import Ensemble, Prediction, Predictor, Prepared
from medvision.io import Volume
from medvision.vocabulary import EXPLANATION_METHODS

__all__ = ["METHODS", "RegionScore", "SaliencyMap", "attribute", "ensemble_network", "explain",
           "explain_batch", "explained_model", "gradcam_layer", "network_head"]

METHODS = EXPLANATION_METHODS


@dataclass(frozen=True, eq=False)
class SaliencyMap:
    """An attribution map on the input's grid.

    Attributes:
        volume: ``(1, ...)`` values in [0, 1], same shape and affine as the input.
        method: the Captum method.
        params: its parameters, as used.
        target: what was explained (a class, or a segmentation region).
        model_space: the map before mapping back (for faithfulness checks).
    """

    volume: Volume
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    target: str = ""
    model_space: Any = None

    @property
    def array(self) -> Any:
        """The map's values, ``(1, ...)`` in [0, 1] on the input's grid (``volume.array``)."""
        return self.volume.array

    @property
    def affine(self) -> Any:
        """The input's affine (RAS+ mm), which the map shares."""
        return self.volume.affine


class RegionScore(torch.nn.Module):
    """A segmentation network seen as a scorer: target logits summed inside a mask."""

    def __init__(self, model: torch.nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1)``: the masked logit sum of each input."""
        return (self.model(x) * self.mask.to(x.device)).flatten(1).sum(dim=1, keepdim=True)


class DetectionScore(torch.nn.Module):
    """A detector seen as a scorer: the strongest class score (sigmoid of the classification
    logits) of every anchor position whose centre lies inside one of the detected boxes,
    summed over the pyramid levels. ``boxes`` are in the model input's pixels."""

    def __init__(self, network: torch.nn.Module, boxes: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("boxes", boxes.reshape(-1, 4).float())
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1)``: the detection evidence inside the boxes."""
        heads = self.network(x)["classification"]
        size = x.shape[2:]
        total = torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)
        for level in heads:
            n, channels = level.shape[:2]
            scores = torch.sigmoid(level.reshape(n, channels // self.num_classes,
                                                 self.num_classes, *level.shape[2:]))
            strongest = scores.amax(dim=(1, 2))  # (N, I', J')
            centres = [(torch.arange(m, device=x.device) + 0.5) * (s / m)
                       for m, s in zip(strongest.shape[1:], size, strict=True)]
            inside = torch.zeros(strongest.shape[1:], dtype=torch.bool, device=x.device)
            for x1, y1, x2, y2 in self.boxes.to(x.device):  # type: ignore[union-attr]
                inside |= (((centres[0] >= x1) & (centres[0] <= x2))[:, None]
                           & ((centres[1] >= y1) & (centres[1] <= y2))[None, :])
            total = total + (strongest * inside).flatten(1).sum(dim=1, keepdim=True)
        return total


def explained_model(predictor: Predictor, prediction: Prediction, *,
                    network: Any = None) -> tuple[Any, int, str]:
    """The module, output index and description an attribution targets.

    ``network``: the network to look through (default: the predictor's first); for the
    deletion curve of an ensemble, :func:`ensemble_network` scores with all of them.
    """
    network = predictor.model if network is None else network
    if predictor.pipeline.task == "detection":
        import numpy as np

        found = prediction.model_output or {}
        boxes = prediction.boxes if prediction.boxes is not None else np.zeros((0, 4))
        scale = found.get("scale") if isinstance(found, dict) else None
        model_boxes = torch.as_tensor(np.asarray(boxes) * (scale if scale is not None else 1.0))
        if not len(model_boxes):  # nothing found: explain the strongest evidence anywhere
            model_boxes = torch.tensor([[-1e6, -1e6, 1e6, 1e6]])
        return (DetectionScore(predictor.model.network, model_boxes,
                               len(predictor.pipeline.classes)), 0,
                f"class scores inside the {len(boxes)} detected box(es)")
    if predictor.pipeline.task == "classification":
        return network, prediction.target_index, f"class {prediction.label}"
    logits = prediction.model_output
    labels = logits.argmax(dim=1, keepdim=True)
    onehot = torch.zeros_like(logits).scatter_(1, labels, 1.0)
    onehot[:, 0] = 0  # explain the foreground regions, not the background
    if onehot.sum() == 0:  # nothing found: explain every foreground class everywhere
        onehot[:, 1:] = 1.0
    return (RegionScore(network, onehot), 0,
            f"logits of {prediction.label} summed inside the predicted mask")


def ensemble_network(predictor: Predictor) -> Any:
    """What the predictions come from, as one PyTorch module: the network of a single model;
    for an ensemble its members' mean calibrated probabilities (as log-probabilities)."""
    if len(predictor.networks) == 1:
        return predictor.model
    return Ensemble(predictor.networks, [m.temperature for m in predictor.bundle.members])


def _module(model: Any, name: str | None) -> Any:
    modules = dict(model.named_modules())
    if not name or name not in modules:
        raise ExplainError(f"GradCAM needs explanation.layer naming a module of the network "
                           f"(got {name!r}); for example one of "
                           f"{[n for n in modules if n.count('.') == 0 and n][:8]}")
    return modules[name]


def attribute(model: Any, image: Any, target: int | Sequence[int], cfg: ExplanationConfig,
              method: str) -> tuple[Any, dict[str, Any]]:
    """Raw Captum attribution ``(N, ...)`` in model space (on the CPU), and the parameters
    used; ``target``: one output index, or one per item of the batch."""
    from captum import attr

    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    image = image.detach().clone().to(model_device(model)).requires_grad_(True)
    spatial = image.shape[2:]
    params: dict[str, Any]
    if method == "gradcam":
        layer = _module(model, cfg.layer)
        maps = attr.LayerGradCam(model, layer).attribute(image, target=target, relu_attributions=True)
        maps = attr.LayerAttribution.interpolate(
            maps, tuple(spatial), interpolate_mode="bilinear" if len(spatial) == 2 else "trilinear")
        params = {"layer": cfg.layer, "upsampled": "bilinear" if len(spatial) == 2 else "trilinear"}
        result = maps.sum(dim=1)
    elif method == "layercam":
        # LayerCAM (Jiang et al., 2021): each activation weighted by its own positive
        # gradient, not by the channel's mean gradient as in Grad-CAM, so shallower, finer
        # layers give usable maps.
        layer = _module(model, cfg.layer)
        gradients = attr.LayerGradientXActivation(model, layer, multiply_by_inputs=False
                                                  ).attribute(image, target=target)
        activations = attr.LayerActivation(model, layer).attribute(image)
        maps = (gradients.clamp(min=0) * activations).sum(dim=1, keepdim=True).clamp(min=0)
        maps = attr.LayerAttribution.interpolate(
            maps, tuple(spatial), interpolate_mode="bilinear" if len(spatial) == 2 else "trilinear")
        params = {"layer": cfg.layer, "upsampled": "bilinear" if len(spatial) == 2 else "trilinear"}
        result = maps.sum(dim=1)
    elif method == "integrated_gradients":
        baseline = torch.zeros_like(image)
        maps = attr.IntegratedGradients(model).attribute(
            image, baselines=baseline, target=target, n_steps=cfg.steps,
            internal_batch_size=cfg.internal_batch_size)
        params = {"steps": cfg.steps, "baseline": "zeros", "internal_batch_size":
                  cfg.internal_batch_size}
        result = maps.abs().sum(dim=1)
    elif method == "saliency":
        maps = attr.Saliency(model).attribute(image, target=target, abs=True)
        params = {"abs": True}
        result = maps.sum(dim=1)
    elif method == "occlusion":
        window = cfg.window or tuple(max(2, s // 8) for s in spatial)
        stride = cfg.stride or tuple(max(1, w // 2) for w in window)
        maps = attr.Occlusion(model).attribute(
            image, target=target, sliding_window_shapes=(image.shape[1], *window),
            strides=(image.shape[1], *stride), baselines=0.0)
        params = {"window": list(window), "stride": list(stride), "baseline": 0.0}
        result = maps.clamp(min=0).sum(dim=1)
    else:
        raise ExplainError(f"unknown explanation method '{method}'; use one of {METHODS}")
    return result.detach().float().cpu(), params


_HEADS: Any = None  # weakref.WeakKeyDictionary: network -> {layer: head or None}


def network_head(network: Any, layer: str) -> Any:
    """The part of ``network`` after ``layer`` as a module of that layer's output alone
    (torch.fx, ``layer`` kept whole), or ``None`` when the rest of the network also reads
    something computed before ``layer`` (a skip connection) or cannot be traced. Built once
    per network and layer."""
    import weakref

    global _HEADS
    if _HEADS is None:
        _HEADS = weakref.WeakKeyDictionary()
    known = _HEADS.setdefault(network, {})
    if layer not in known:
        known[layer] = _traced_head(network, layer)
    return known[layer]


def _traced_head(network: Any, layer: str) -> Any:
    import logging

    from torch import fx

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, module: Any, name: str) -> bool:
            return name == layer or super().is_leaf_module(module, name)

    try:
        graph = _Tracer().trace(network)
    except Exception as e:  # noqa: BLE001 - not traceable: GradCAM runs the whole network
        logging.getLogger(__name__).debug("no head after %s: %s", layer, e)
        return None
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        return None
    nodes = list(graph.nodes)
    after = nodes[nodes.index(calls[0]) + 1:]
    head = fx.Graph()
    activation = head.placeholder("activation")
    made = {calls[0]: activation}
    for node in after:
        used = [a for a in node.all_input_nodes if a not in made]
        if used:  # reads a value from before the layer
            return None
        made[node] = head.node_copy(node, lambda n: made[n])
    return fx.GraphModule(network, head)


def _gradcam_from_activations(head: Any, activations: Any, target: Sequence[int],
                              spatial: Sequence[int]) -> Any:
    """Captum's Grad-CAM of ``head`` at its input, for activations already computed (the
    prediction's forward pass): the same map as Grad-CAM of the whole network at the layer
    that made them, without running the layers before it again."""
    from captum import attr

    entry = torch.nn.Identity()
    model = torch.nn.Sequential(entry, head)
    maps = attr.LayerGradCam(model, entry).attribute(
        activations.detach().clone().requires_grad_(True), target=list(target),
        relu_attributions=True)
    maps = attr.LayerAttribution.interpolate(
        maps, tuple(spatial), interpolate_mode="bilinear" if len(spatial) == 2 else "trilinear")
    return maps.sum(dim=1).detach().float().cpu()


def model_device(model: Any) -> Any:
    """The device a network's parameters are on (the CPU for one without parameters)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _normalise(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(np.asarray(values, dtype=np.float32))
    top = float(np.percentile(values, 99.5)) if values.size else 0.0
    if top <= 0:
        top = float(values.max()) if values.size and values.max() > 0 else 1.0
    return np.clip(values / top, 0.0, 1.0)


def _settings(predictor: Predictor, method: str | None, layer: str | None
              ) -> tuple[ExplanationConfig, str]:
    """The pipeline's explanation settings with the call's overrides, and the method."""
    cfg = predictor.pipeline.explanation
    if layer:
        cfg = cfg.model_copy(update={"layer": layer})
    return cfg, str(method or cfg.method)


def gradcam_layer(predictor: Predictor, method: str | None, layer: str | None) -> str | None:
    """The layer whose activations a batch's predictions should keep for Grad-CAM (see
    :func:`explain_batch`), or ``None`` when another method or task explains them."""
    cfg, method = _settings(predictor, method, layer)
    if method != "gradcam" or predictor.pipeline.task != "classification":
        return None
    return cfg.layer or None


def explain(predictor: Predictor, prepared: Prepared, prediction: Prediction, *,
            method: str | None = None, layer: str | None = None) -> SaliencyMap:
    """Attribute ``prediction`` to the input and map the result onto the input's grid.

    Args:
        predictor: the model.
        prepared: the preprocessed input.
        prediction: what to explain (its predicted class, or its predicted regions).
        method: override the pipeline's ``explanation.method``.
        layer: override its ``explanation.layer`` (GradCAM, LayerCAM).

    Raises:
        ExplainError: misconfiguration, or Captum failing on this network.
    """
    cfg, method = _settings(predictor, method, layer)
    networks = predictor.networks if cfg.members == "all" else predictor.networks[:1]
    maps = []
    for network in networks:
        model, target, described = explained_model(predictor, prediction, network=network)
        try:
            raw, params = attribute(model, prepared.image, target, cfg, method)
        except ExplainError:
            raise
        except (RuntimeError, ValueError, AssertionError, IndexError) as e:
            raise ExplainError(f"{method} failed on {predictor.pipeline.model.name}: {e}") from e
        maps.append(_normalise(raw[0].numpy()))
    # an ensemble: each member's map on the same [0, 1] scale, then their mean
    model_space = maps[0] if len(maps) == 1 else _normalise(np.mean(maps, axis=0))
    if len(predictor.networks) > 1:
        params = {**params, "members": len(maps), "of_members": len(predictor.networks)}
        described += (f"; mean of the {len(maps)} members' maps" if len(maps) > 1
                      else "; first member only")
    volume = predictor.to_input_space(prepared, model_space[np.newaxis], nearest=False)
    volume = Volume(array=np.clip(np.asarray(volume.array), 0.0, 1.0), affine=volume.affine,
                    modality=volume.modality, header={"saliency_method": method},
                    source=volume.source)
    return SaliencyMap(volume=volume, method=method, params=params, target=described,
                       model_space=model_space)


#: Methods whose attribution of a batch equals, item by item, that of each item alone (each
#: item's score depends on its own input only, and the networks run in eval mode).
BATCHED_METHODS = ("gradcam", "layercam", "saliency", "integrated_gradients")


def explain_batch(predictor: Predictor, prepared: Sequence[Prepared],
                  predictions: Sequence[Prediction], *, method: str | None = None,
                  layer: str | None = None) -> list[SaliencyMap]:
    """:func:`explain` for several inputs at once: one attribution pass per network over the
    stacked batch for classification with a batchable method (each item its own target);
    otherwise item by item. The maps equal those of :func:`explain` on each input alone.
    Grad-CAM of predictions that carry their layer's activations (``predict_batch(capture=
    layer)``) runs only the part of each network after that layer.

    Raises:
        ExplainError: misconfiguration, or Captum failing on this network.
    """
    cfg, method = _settings(predictor, method, layer)
    shapes = {tuple(p.image.shape) for p in prepared}
    if (len(prepared) < 2 or predictor.pipeline.task != "classification"
            or method not in BATCHED_METHODS or len(shapes) != 1):
        return [explain(predictor, p, pred, method=method, layer=layer)
                for p, pred in zip(prepared, predictions, strict=True)]
    images = torch.cat([p.image.as_tensor() if hasattr(p.image, "as_tensor") else p.image
                        for p in prepared])
    targets = [pred.target_index for pred in predictions]
    networks = predictor.networks if cfg.members == "all" else predictor.networks[:1]
    per_network = []
    params: dict[str, Any] = {}
    found = [pred.activations for pred in predictions]
    for n, network in enumerate(networks):
        head = (network_head(network, cfg.layer) if method == "gradcam" and cfg.layer
                and all(a is not None and len(a) > n for a in found) else None)
        try:
            if head is not None:
                raw = _gradcam_from_activations(
                    head, torch.cat([a[n] for a in found]), targets, images.shape[2:])  # type: ignore[index]
                params = {"layer": cfg.layer, "upsampled": "bilinear" if images.dim() == 4
                          else "trilinear"}
            else:
                raw, params = attribute(network, images, targets, cfg, method)
        except ExplainError:
            raise
        except (RuntimeError, ValueError, AssertionError, IndexError) as e:
            raise ExplainError(f"{method} failed on {predictor.pipeline.model.name}: {e}") from e
        per_network.append([_normalise(raw[k].numpy()) for k in range(len(prepared))])
    out = []
    for k, (item, prediction) in enumerate(zip(prepared, predictions, strict=True)):
        maps = [network_maps[k] for network_maps in per_network]
        model_space = maps[0] if len(maps) == 1 else _normalise(np.mean(maps, axis=0))
        described = f"class {prediction.label}"
        item_params = dict(params)
        if len(predictor.networks) > 1:
            item_params = {**item_params, "members": len(maps),
                           "of_members": len(predictor.networks)}
            described += (f"; mean of the {len(maps)} members' maps" if len(maps) > 1
                          else "; first member only")
        volume = predictor.to_input_space(item, model_space[np.newaxis], nearest=False)
        volume = Volume(array=np.clip(np.asarray(volume.array), 0.0, 1.0),
                        affine=volume.affine, modality=volume.modality,
                        header={"saliency_method": method}, source=volume.source)
        out.append(SaliencyMap(volume=volume, method=method, params=item_params,
                               target=described, model_space=model_space))
    return out
