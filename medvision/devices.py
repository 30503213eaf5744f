"""Where tensors live: choosing a device, checking it is there, naming it in records.

Every command that runs a network takes ``--device auto|cpu|cuda|cuda:N|mps`` (the bridge's
settings and Dask workers take ``device:``). ``auto`` takes the first CUDA device when PyTorch
sees one, else Apple's ``mps`` when offered, else the CPU. Asking for a device that is not there
is a :class:`~medvision.errors.DeviceError` (a configuration error: exit 2) that names what was
found; nothing falls back silently.

The code that uses a device is written once for all of them: models and batches move with
``.to(device, non_blocking=True)``, weights load straight onto the device, and the CUDA-only
switches (cuDNN autotuning, pinned memory, float16 with a gradient scaler) are chosen here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medvision.errors import DeviceError

__all__ = ["DEVICE_CHOICES", "DeviceInfo", "autocast", "available_devices", "describe",
           "move", "resolve_device"]

log = logging.getLogger(__name__)

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class DeviceInfo:
    """A device as reports and audit records name it."""

    device: str
    """``cpu``, ``cuda:0``, ``mps``."""
    name: str
    """The GPU's name, or the CPU's."""

    def as_dict(self) -> dict[str, str]:
        return {"device": self.device, "name": self.name}

    def __str__(self) -> str:
        return f"{self.device} ({self.name})"


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """What this machine offers PyTorch, named as ``--device`` takes them."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def _found() -> str:
    import torch

    names = []
    for device in available_devices():
        if device.startswith("cuda"):
            names.append(f"{device} ({torch.cuda.get_device_name(int(device[5:]))})")
        else:
            names.append(device)
    detail = "" if torch.cuda.is_available() else (
        "; this PyTorch build has no CUDA" if torch.version.cuda is None else
        "; PyTorch was built with CUDA but sees no GPU (driver, CUDA_VISIBLE_DEVICES?)")
    return ", ".join(names) + detail


def resolve_device(spec: str | None = "auto") -> Any:
    """The ``torch.device`` that ``spec`` names, checked to be present.

    Raises:
        DeviceError: an unknown name, or a device this machine does not have (the message
            lists what it has).
    """
    import torch

    spec = (spec or "auto").strip().lower()
    if not _SPEC.match(spec):
        raise DeviceError(f"unknown device '{spec}': use {DEVICE_CHOICES}")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise DeviceError(f"device 'mps' asked for, but it is not there; found: {_found()}")
        return torch.device("mps")
    index = int(spec[5:]) if ":" in spec else 0
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise DeviceError(f"device '{spec}' asked for, but it is not there; found: {_found()}")
    return torch.device("cuda", index)


@functools.cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def describe(device: Any) -> DeviceInfo:
    """How reports name ``device``: ``cuda:0`` with the GPU's name, ``cpu`` with the CPU's."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DeviceInfo(device=f"cuda:{index}", name=torch.cuda.get_device_name(index))
    if device.type == "mps":
        return DeviceInfo(device="mps", name="Apple GPU (Metal)")
    return DeviceInfo(device=device.type, name=_cpu_name())


def prepare(device: Any) -> None:
    """Per-process switches for ``device``: cuDNN autotuning on CUDA (inputs of one size per
    pipeline, so the fastest convolution algorithm is found once)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.set_device(torch.device(device))


def pin_memory(device: Any) -> bool:
    """Whether loaders should pin their batches (only worth it when copying to a GPU)."""
    import torch

    return torch.device(device).type == "cuda"


def move(value: Any, device: Any) -> Any:
    """``value`` with every tensor in it (nested dicts, lists, tuples) on ``device``; copies
    from pinned memory do not block."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: move(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple) and not isinstance(value, str):
        moved = [move(v, device) for v in value]
        return moved if isinstance(value, list) else tuple(moved)
    return value


def autocast(device: Any, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The context a forward pass runs in for ``precision`` on ``device``: nothing for
    float32, else ``torch.autocast`` to bfloat16 or float16 (float16 only on a GPU)."""
    import torch

    if precision == "float32":
        return contextlib.nullcontext()
    kind = torch.device(device).type
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
    if dtype is torch.float16 and kind == "cpu":
        raise DeviceError("float16 runs on a GPU only; on the CPU use bfloat16 or float32")
    return torch.autocast(kind, dtype=dtype)


def check_precision(device: Any, precision: str) -> None:
    """Raise :class:`DeviceError` when ``precision`` cannot run on ``device``."""
    autocast(device, precision)


def synchronize(device: Any) -> None:
    """Wait for the device's queued work (before reading a clock); nothing on the CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))
