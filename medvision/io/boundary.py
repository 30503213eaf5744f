"""The boundary between medvision and the file-format libraries it reads through.

pydicom, nibabel, SimpleITK, Pillow and the pixel codecs raise whatever their parsers run into
on a damaged file: ``struct.error``, ``NotImplementedError`` for an unknown VR, ``KeyError``,
``EOFError``, ``zlib.error``, and even a Rust ``PanicException`` (which derives from
``BaseException``, not ``Exception``) from pylibjpeg's RLE decoder. :func:`reading` turns every
one of them into a :class:`~medvision.errors.DataError` subclass naming the file, so callers
need to handle one kind of error and a batch never stops on one bad input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from medvision.errors import DataError

__all__ = ["MAX_VOXELS", "check_voxel_budget", "reading"]

#: The most values (voxels x channels) one file may ask us to allocate: 2**30 float32 values
#: are 4 GiB. A header asking for more is refused before any allocation.
MAX_VOXELS = 2**30

_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)


@contextmanager
def reading(path: object, what: str, error: type[DataError]) -> Iterator[None]:
    """Run a read of ``path``; any foreign exception becomes ``error`` naming the file.

    Args:
        path: the file (or folder) being read, for the message.
        what: what was being read (``"DICOM header"``, ``"pixel data"``...).
        error: the :class:`DataError` subclass to raise.
    """
    try:
        yield
    except DataError:
        raise
    except _PASS_THROUGH:
        raise
    except MemoryError as e:
        raise error(f"{path}: {what} too large to load into memory") from e
    except BaseException as e:  # noqa: BLE001 - parsers raise anything, incl. Rust panics
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise error(f"{path}: unreadable {what} ({type(e).__name__}"
                    + (f": {detail}" if detail else "") + ")") from e


def check_voxel_budget(path: object, shape: tuple[int, ...], error: type[DataError]) -> None:
    """Refuse a header whose image would need more than :data:`MAX_VOXELS` values."""
    total = 1
    for n in shape:
        if n < 0:
            raise error(f"{path}: negative image dimension in {shape}")
        total *= n
    if total > MAX_VOXELS:
        raise error(f"{path}: the header describes {total:,} values ({'x'.join(map(str, shape))}),"
                    f" more than the {MAX_VOXELS:,} medvision loads; the header is corrupt or "
                    "the image must be split")
