"""Temperature scaling (Guo et al. 2017), fitted on validation logits."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

__all__ = ["fit_temperature", "read_temperature", "write_temperature"]

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


def read_temperature(weights: str | os.PathLike[str]) -> float:
    """The temperature stored beside ``weights`` (1.0 when there is none)."""
    path = Path(weights).parent / CALIBRATION_FILE
    if not path.is_file():
        return 1.0
    return float(json.loads(path.read_text()).get("temperature", 1.0))
