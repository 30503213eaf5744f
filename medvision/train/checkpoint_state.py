"""Resumable training state: weights, optimizer and RNG tensors in safetensors, the rest JSON.

No pickle anywhere, so a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medvision.atomic import write_text_atomic
from medvision.errors import CheckpointError, ConfigError
from medvision.models import load_weights, save_weights

__all__ = ["load_training_state", "open_run_dir", "save_training_state"]


def open_run_dir(run_dir: str | os.PathLike[str], *, resume: bool) -> Path:
    """The run folder, created; a non-empty one only with ``resume``.

    Raises:
        ConfigError: the folder holds files and ``resume`` is false.
    """
    run = Path(run_dir)
    if run.exists() and any(run.iterdir()) and not resume:
        raise ConfigError(f"{run}: run folder is not empty; pass --resume to continue it")
    run.mkdir(parents=True, exist_ok=True)
    return run


def save_training_state(run_dir: Path, *, model: Any, optimizer: Any, scheduler: Any,
                        state: dict[str, Any]) -> None:
    """Write ``last.safetensors``, ``optimizer.safetensors`` and ``state.json`` in ``run_dir``."""
    import torch
    from safetensors.torch import save_file

    save_weights(model, run_dir / "last.safetensors")
    opt = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    scalars: dict[str, dict[str, float]] = {}
    for index, slots in opt["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    tmp = run_dir / "optimizer.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, run_dir / "optimizer.safetensors")
    write_text_atomic(run_dir / "state.json", json.dumps({
        **state,
        "optimizer_param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }, indent=2))


def load_training_state(run_dir: Path, *, model: Any, optimizer: Any,
                        scheduler: Any) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote; returns the JSON state.

    Raises:
        CheckpointError: the run folder has no complete checkpoint.
    """
    import torch
    from safetensors.torch import load_file

    state_file = run_dir / "state.json"
    if not state_file.is_file() or not (run_dir / "last.safetensors").is_file():
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from (state.json and "
                              "last.safetensors)")
    try:
        state = json.loads(state_file.read_text())
        tensors = load_file(str(run_dir / "optimizer.safetensors"))
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{run_dir}: unreadable checkpoint ({e})") from e
    load_weights(model, run_dir / "last.safetensors")
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("rng."):
            continue
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    for index, values in state.get("optimizer_scalars", {}).items():
        slots.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": slots, "param_groups": state["optimizer_param_groups"]})
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return state
