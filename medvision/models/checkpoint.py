"""Weights in safetensors (no pickle), with a SHA-256 for audit records."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medvision.errors import CheckpointError
from medvision.hashing import file_sha256

__all__ = ["load_weights", "save_weights", "weights_sha256"]


def weights_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a weights file, hex."""
    return file_sha256(path)


def save_weights(model: Any, path: str | os.PathLike[str], *,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write a model's state dict as safetensors, atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata or {})
    os.replace(tmp, path)
    return path


def load_weights(model: Any, path: str | os.PathLike[str], *, strict: bool = True,
                 skip_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Load safetensors weights into ``model``; returns the names left untouched.

    Args:
        model: the network.
        path: a ``.safetensors`` file.
        strict: require every tensor to match (names and shapes).
        skip_prefixes: tensor names to ignore (e.g. a classifier head when fine-tuning).

    Raises:
        CheckpointError: missing or corrupt file, or tensors that do not fit the model.
    """
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({e})") from e
    state = {k: v for k, v in state.items() if not k.startswith(skip_prefixes)}
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(f"{path}: tensors do not fit the model: {mismatched[:5]}")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(skip_prefixes)]
    if strict and (missing or result.unexpected_keys):
        raise CheckpointError(f"{path}: weights do not match the model (missing "
                              f"{missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    return list(result.missing_keys)
