"""Mixed precision for training steps (``training.precision``).

``bfloat16`` runs each training step's forward pass under ``torch.autocast`` on the CPU:
convolutions and matrix products in bfloat16, weights, optimizer state and the loss in
float32. bfloat16 keeps float32's exponent range, so no loss scaling is needed (unlike float16).
Autocasting itself is :func:`medvision.devices.autocast` (float16 too, on GPUs). On CPUs with
AVX-512 BF16 or AMX the steps run about 1.4-2.4x faster (bench/bench_train.py ``--precision``);
on CPUs without them oneDNN emulates bfloat16 and the steps get slower, which
:func:`warn_if_emulated` warns about once. Validation, calibration and inference stay float32, so
the epoch a run keeps and what it publishes are judged at full precision.
"""

from __future__ import annotations

import functools
import logging

__all__ = ["bfloat16_native", "warn_if_emulated"]

log = logging.getLogger(__name__)


@functools.cache
def bfloat16_native() -> bool:
    """Whether this CPU computes bfloat16 in hardware (oneDNN's own check)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


@functools.cache
def warn_if_emulated() -> None:
    """Warn once when bfloat16 training runs on a CPU that only emulates it."""
    if bfloat16_native():
        return
    log.warning("training.precision bfloat16: this CPU has no native bfloat16 (AVX-512 BF16 or "
                "AMX); steps will be slower than float32")
