"""ImageNet weights for MONAI's 2D ResNets, for users whose machine can download them.

MONAI's ``ResNet`` names its tensors as torchvision's does (``conv1``, ``bn1``,
``layer1.0.conv1`` ... ``fc``), so torchvision's ImageNet checkpoints load into it by name.
:func:`fetch_imagenet_resnet` downloads one (torchvision's published URL, checked against its
SHA-256 prefix) and writes safetensors that ``medvision train --init-from FILE
--rgb-to-grey`` accepts: the colour first convolution is summed to one channel and the
1000-class head is skipped (both named in the run's ``init.json``). Nothing here runs without
a network; :func:`to_safetensors` converts a checkpoint already on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medvision.errors import CheckpointError

__all__ = ["IMAGENET_RESNET", "fetch_imagenet_resnet", "to_safetensors"]

#: torchvision's ImageNet checkpoints (IMAGENET1K_V1), by ResNet depth.
IMAGENET_RESNET = {
    18: "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    34: "https://download.pytorch.org/models/resnet34-b627a593.pth",
    50: "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}


def to_safetensors(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a state dict (tensors only) as safetensors."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in state.items()
               if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target))
    return target


def fetch_imagenet_resnet(depth: int, path: str | os.PathLike[str]) -> Path:
    """Download torchvision's ImageNet ResNet-``depth`` weights into ``path`` (safetensors).

    Raises:
        CheckpointError: unknown depth, or the download failed (no network here).
    """
    import torch

    if depth not in IMAGENET_RESNET:
        raise CheckpointError(f"no ImageNet checkpoint for ResNet-{depth} "
                              f"(known: {sorted(IMAGENET_RESNET)})")
    try:
        state = torch.hub.load_state_dict_from_url(IMAGENET_RESNET[depth], check_hash=True,
                                                   map_location="cpu", progress=False)
    except Exception as e:  # noqa: BLE001 - network and hash errors of many kinds
        raise CheckpointError(f"cannot download {IMAGENET_RESNET[depth]}: {e}") from e
    return to_safetensors(state, path)
