"""Decoding DICOM pixel data into real-world values, one instance at a time.

pydicom's pixel plugins (pylibjpeg, OpenJPEG, RLE, and its own for uncompressed data) decode
every common transfer syntax. On top of that we apply the modality LUT (Rescale
Slope/Intercept, per frame for enhanced objects, or a Modality LUT Sequence), invert
MONOCHROME1 so bright always means dense, and turn palette and YBR colour into RGB.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medvision.errors import DataError, InvalidDicomError, UnsupportedFormatError
from medvision.io.boundary import reading
from medvision.io.dicom_files import DicomFrame

__all__ = ["decode_instance", "frame_pixels", "stack_frames"]

_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"}


def decode_instance(ds: Any, path: str) -> np.ndarray:
    """All frames of one instance as ``(frames, rows, columns, samples)``, stored values.

    Colour data comes back as RGB. The modality LUT is *not* applied here (it may vary per
    frame); :func:`frame_pixels` does that.

    Raises:
        InvalidDicomError: the pixel data cannot be decoded (truncated, corrupt, or a codec
            that no installed plugin handles); the message names the file.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        array = np.asarray(ds.pixel_array)
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            array = apply_color_lut(array, ds)
    except (MemoryError, KeyboardInterrupt):
        raise
    except NotImplementedError as e:
        raise UnsupportedFormatError(f"{path}: cannot decode pixel data ({e})") from e
    except Exception as e:  # noqa: BLE001 - plugins raise many types; all mean "bad pixels"
        raise InvalidDicomError(
            f"{path}: cannot decode pixel data ({type(e).__name__}: {e}); the file may be "
            "truncated or corrupt"
        ) from e
    samples = 3 if photometric in _COLOUR else int(ds.get("SamplesPerPixel") or 1)
    n_frames = int(ds.get("NumberOfFrames") or 1)
    expected_ndim = 2 + (n_frames > 1) + (samples > 1)
    if array.ndim != expected_ndim:
        raise InvalidDicomError(
            f"{path}: decoded pixel array has shape {array.shape}, expected {expected_ndim} "
            f"dimensions for {n_frames} frame(s) of {samples} sample(s)"
        )
    if n_frames == 1:
        array = array[np.newaxis]
    if samples == 1:
        array = array[..., np.newaxis]
    return array


def _stored_range(ds: Any) -> tuple[float, float]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _rescale(ds: Any, rescale: tuple[float, float] | None) -> tuple[float, float] | None:
    """(slope, intercept) of a linear modality LUT, or ``None`` for a LUT table."""
    if rescale is not None:
        return rescale
    if "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
        return None
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    return slope, intercept


def _modality(values: np.ndarray, ds: Any, rescale: tuple[float, float] | None,
              out: np.ndarray) -> None:
    """Write the modality-LUT output of ``values`` into ``out`` (float32)."""
    linear = _rescale(ds, rescale)
    if linear is None:
        from pydicom.pixels import apply_modality_lut

        out[...] = apply_modality_lut(values, ds)
        return
    out[...] = values
    slope, intercept = linear
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)


def frame_pixels(decoded: np.ndarray, frame: DicomFrame, out: np.ndarray) -> None:
    """Write one frame's real-world values into ``out``, shaped ``(channels, rows, columns)``.

    Args:
        decoded: the instance's :func:`decode_instance` output.
        frame: which frame (or mosaic tile) to take.
        out: float32 destination.
    """
    ds = frame.dataset
    image = decoded[frame.frame or 0]
    if frame.tile is not None:
        grid = int(image.shape[1]) // frame.columns
        row0, col0 = (frame.tile // grid) * frame.rows, (frame.tile % grid) * frame.columns
        image = image[row0:row0 + frame.rows, col0:col0 + frame.columns]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if image.shape[-1] != 1:
        out[...] = np.moveaxis(image, -1, 0)
        return
    _modality(image[..., 0], ds, frame.rescale, out[0])
    if photometric == "MONOCHROME1":
        ends = np.empty(2, dtype=np.float32)
        _modality(np.array(_stored_range(ds)), ds, frame.rescale, ends)
        np.subtract(ends[0] + ends[1], out[0], out=out[0])


def stack_frames(frames: Sequence[DicomFrame],
                 failures: dict[str, str] | None = None) -> np.ndarray:
    """Decode ``frames`` and stack them: ``(channels, I, J, len(frames))``.

    Files holding several frames (multi-frame, mosaic) are decoded once. The result is a
    transposed view of a ``(channels, K, rows, columns)`` buffer, so each plane is written
    contiguously and no copy is made (the memory order nibabel uses).

    Args:
        frames: the frames, in slice order.
        failures: when given, an instance that cannot be decoded is recorded here
            (path -> reason) and its planes are left unset instead of raising; the caller
            must drop them.

    Raises:
        InvalidDicomError: an instance cannot be decoded (and ``failures`` is ``None``), or
            every instance failed.
    """
    cache: dict[str, np.ndarray] = {}
    buffer: np.ndarray | None = None
    for k, frame in enumerate(frames):
        if failures is not None and frame.path in failures:
            continue
        try:
            with reading(frame.path, "pixel data", InvalidDicomError):
                decoded = cache.get(frame.path)
                if decoded is None:
                    decoded = decode_instance(frame.dataset, frame.path)
                    if frame.frame is not None or frame.tile is not None:
                        cache[frame.path] = decoded
                if buffer is None:
                    buffer = np.empty((decoded.shape[-1], len(frames), frame.rows,
                                       frame.columns), dtype=np.float32)
                elif decoded.shape[-1] != buffer.shape[0]:
                    raise InvalidDicomError(
                        f"{frame.path}: frames of one series mix grey and colour")
                frame_pixels(decoded, frame, buffer[:, k])
        except DataError as e:
            if failures is None:
                raise
            failures[frame.path] = str(e)
            cache.pop(frame.path, None)
    if buffer is None:
        reasons = "; ".join(list((failures or {}).values())[:3])
        raise InvalidDicomError(f"no instance of the series could be decoded ({reasons})")
    return buffer.transpose(0, 3, 2, 1)
