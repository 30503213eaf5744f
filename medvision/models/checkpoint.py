"""Weights in safetensors (no pickle), with a SHA-256 for audit records."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medvision.errors import CheckpointError
from medvision.hashing import file_sha256

__all__ = ["load_weights", "save_weights", "tensor_aliases", "weights_sha256"]


def weights_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a weights file, hex."""
    return file_sha256(path)


def tensor_aliases(model: Any) -> dict[str, str]:
    """State-dict names that share a tensor with an earlier name (MONAI's ``DynUNet`` registers
    each block twice), mapped to that first name."""
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    aliases = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if value.numel() == 0:
            continue
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def save_weights(model: Any, path: str | os.PathLike[str], *,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write a model's state dict as safetensors, atomically (temporary file, then rename).

    A tensor registered under several names is written once, under its first name;
    :func:`load_weights` restores it under all of them.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    aliases = tensor_aliases(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if k not in aliases}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata or {})
    os.replace(tmp, path)
    return path


def load_weights(model: Any, path: str | os.PathLike[str], *, strict: bool = True,
                 skip_prefixes: tuple[str, ...] = (), device: Any = None) -> list[str]:
    """Load safetensors weights into ``model``; returns the names left untouched.

    Args:
        model: the network.
        path: a ``.safetensors`` file.
        strict: require every tensor to match (names and shapes).
        skip_prefixes: tensor names to ignore (e.g. a classifier head when fine-tuning).
        device: where the tensors are read to (the model's device; default the CPU), so
            GPU weights never pass through host memory twice.

    Raises:
        CheckpointError: missing or corrupt file, or tensors that do not fit the model.
    """
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device=str(device) if device is not None else "cpu")
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({e})") from e
    state = {k: v for k, v in state.items() if not k.startswith(skip_prefixes)}
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(f"{path}: tensors do not fit the model: {mismatched[:5]}")
    result = model.load_state_dict(state, strict=False)
    aliases = tensor_aliases(model)  # loaded through the name they share a tensor with
    untouched = [k for k in result.missing_keys if aliases.get(k) not in state]
    missing = [k for k in untouched if not k.startswith(skip_prefixes)]
    if strict and (missing or result.unexpected_keys):
        raise CheckpointError(f"{path}: weights do not match the model (missing "
                              f"{missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    return untouched
