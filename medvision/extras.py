"""Optional dependencies: which extra brings which package, and one clear error without it."""

from __future__ import annotations

import importlib.util

from medvision.errors import MissingDependencyError

__all__ = ["require"]


def require(module: str, extra: str, what: str) -> None:
    """Raise :class:`MissingDependencyError` unless ``module`` can be imported.

    Args:
        module: the import name (``pynetdicom``, ``SimpleITK``...).
        extra: the medvision extra that installs it (``pacs``, ``itk``...).
        what: what needs it, for the message (``the PACS bridge``...).
    """
    try:
        found = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        found = None
    if found is None:
        raise MissingDependencyError(
            f"{what} needs {module}, which is not installed: pip install 'medvision[{extra}]'")
