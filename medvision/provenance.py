"""One provenance record for every stage: software versions, config hash, weights hash."""

from __future__ import annotations

import sys
from functools import lru_cache
from importlib import metadata

__all__ = ["software_versions"]

#: Distributions whose versions change results; reported when installed.
_PACKAGES = ("torch", "monai", "captum", "numpy", "scipy", "pydicom", "nibabel", "highdicom",
             "pynetdicom", "onnxruntime", "SimpleITK")


@lru_cache(maxsize=1)
def software_versions() -> dict[str, str]:
    """``{"medvision": ..., "python": ..., <package>: <version>}`` for what is installed.

    Read from package metadata, so nothing heavy is imported to get them.
    """
    from medvision._version import __version__

    found = {"medvision": __version__, "python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            found[name.lower()] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
