"""Temperature scaling (Guo et al. 2017), fitted on validation logits."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from medvision.errors import CheckpointError

__all__ = ["CALIBRATION_FILE", "fit_temperature", "read_calibration", "read_temperature",
           "write_temperature"]

CALIBRATION_FILE = "calibration.json"


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimises the NLL of ``softmax(logits / T)``.

    A 1-D search over log T (bounded to [0.05, 20]) is exact enough and cannot diverge.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / math.exp(log_t), axis=1)[np.arange(len(labels)),
                                                                    labels].mean())

    result = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(result.x))


def write_temperature(folder: str | os.PathLike[str], temperature: float, *,
                      fitted_on: str) -> Path:
    """Store the temperature next to the weights it belongs to."""
    path = Path(folder) / CALIBRATION_FILE
    path.write_text(json.dumps({"method": "temperature_scaling", "temperature": temperature,
                                "fitted_on": fitted_on}, indent=2))
    return path


def read_calibration(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The calibration record in ``folder`` (``None`` when there is none).

    Raises:
        CheckpointError: the file exists but is not a calibration record.
    """
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        temperature = float(record["temperature"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable calibration ({e})") from e
    if not math.isfinite(temperature) or temperature <= 0:
        raise CheckpointError(f"{path}: temperature {temperature} is not a positive number")
    return dict(record)


def read_temperature(weights: str | os.PathLike[str]) -> float:
    """The temperature stored beside ``weights`` (1.0 when there is none)."""
    record = read_calibration(Path(weights).parent)
    return float(record["temperature"]) if record else 1.0
