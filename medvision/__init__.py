"""medvision: diagnose medical images with MONAI models and explain every prediction.

The common jobs, from Python::

    import medvision

    volume = medvision.read_volume("scan/")                 # DICOM folder, NIfTI, PNG...
    pipeline = medvision.load_pipeline("chest-xray-pneumonia")
    predictor = medvision.Predictor.from_pipeline("chest-xray-pneumonia")
    results = medvision.analyze(["scans/"], predictor, "out/", auditor=...)

Names are imported when first used, so ``import medvision`` (and the ``medvision`` command's
start) does not load PyTorch or MONAI until a job needs them.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from typing import TYPE_CHECKING, Any

from medvision._version import __version__
from medvision.errors import MedvisionError

__all__ = ["MedvisionError", "Predictor", "Volume", "__version__", "analyze", "load_pipeline",
           "read_volume", "write_volume"]

_LAZY = {
    "Volume": "medvision.io",
    "read_volume": "medvision.io",
    "write_volume": "medvision.io",
    "load_pipeline": "medvision.config",
    "Predictor": "medvision.infer",
}

if TYPE_CHECKING:
    from medvision.analyze import analyze
    from medvision.config import load_pipeline
    from medvision.infer import Predictor
    from medvision.io import Volume, read_volume, write_volume


class _Package(types.ModuleType):
    """The ``medvision`` module's class: ``medvision.analyze`` is the batch function.

    The name is also the ``medvision.analyze`` sub-package's, and importing a sub-package
    rebinds the parent's attribute to the module; this property keeps the function (the
    import system's assignment is accepted and ignored; ``from medvision.analyze import ...``
    is unaffected).
    """

    @property
    def analyze(self) -> Any:
        return importlib.import_module("medvision.analyze.batch").analyze

    @analyze.setter
    def analyze(self, _module: Any) -> None:
        pass


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medvision' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)


logging.getLogger(__name__).addHandler(logging.NullHandler())
