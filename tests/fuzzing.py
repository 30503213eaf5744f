"""A corpus of real DICOM files and hypothesis strategies that damage them.

The corpus spans vendors (GE, Toshiba, Siemens, Philips-free synthetic RT, unknown), modalities
(CT, MR, NM, US, OT, RTDOSE, CR-free to stay small) and transfer syntaxes (explicit/implicit
little endian, big endian, deflate, RLE, JPEG lossless, JPEG-LS, JPEG 2000). Each file is parsed
once to find where its data elements start and end, where their length fields and VRs sit and
where the pixel data begins, so damage can be aimed where parsers are weakest: truncation at
every data-element boundary and at random offsets, byte flips in the header and in the pixel
data, wrong lengths and bogus VRs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from hypothesis import strategies as st

from conftest import SHARED_DATA, pydicom_test_files

__all__ = ["CORPUS_NAMES", "Damage", "Layout", "corpus", "damaged", "layout_of"]

#: pydicom / pydicom-data files in the corpus.
CORPUS_NAMES = (
    "CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
    "JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_rle.dcm", "image_dfl.dcm",
    "rtdose.dcm", "SC_rgb.dcm", "emri_small_RLE.dcm", "JPEG-LL.dcm", "US1_J2KR.dcm",
)
#: Files of ../shared/data in the corpus (Siemens MR in JPEG-LS and JPEG 2000, GE head CT).
SHARED_NAMES = ("dicom/transfer_syntaxes/In/5.dcm", "dicom/transfer_syntaxes/In/8.dcm",
                "dicom/ct_head_tilt/01.dcm")

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


@dataclass(frozen=True)
class Layout:
    """Where things are in one file."""

    name: str
    data: bytes
    boundaries: tuple[int, ...]
    lengths: tuple[tuple[int, int, str], ...]  # (offset, size in bytes, struct byte order)
    vrs: tuple[int, ...]
    pixel_start: int
    meta_end: int
    sop_class: str
    transfer_syntax: str


def _layout(path: Path) -> Layout:
    import pydicom

    data = path.read_bytes()
    ds = pydicom.dcmread(path, defer_size=0)
    boundaries: set[int] = {128, 132}
    lengths, vrs = [], []
    pixel_start = len(data)
    for dataset, explicit, little in ((ds.file_meta, True, True),
                                      (ds, not ds.original_encoding[0], ds.original_encoding[1])):
        if dataset is ds and path.name == "image_dfl.dcm":
            break  # deflated: the body is compressed, offsets are not file offsets
        order = "<" if little else ">"
        for tag in dataset.keys():
            raw = dataset.get_item(tag, keep_deferred=True)
            tell = getattr(raw, "value_tell", None)
            if tell is None:
                continue
            vr = data[tell - 8 + 4: tell - 8 + 6] if explicit else b""
            long = explicit and data[tell - 12 + 4: tell - 12 + 6] in _LONG_VRS
            start = tell - (12 if long else 8)
            boundaries.add(start)
            length = int(raw.length)
            if length != 0xFFFFFFFF:
                boundaries.add(tell + length)
            if explicit and not long:
                lengths.append((tell - 2, 2, order))
                if vr:
                    vrs.append(start + 4)
            else:
                lengths.append((tell - 4, 4, order))
                if explicit:
                    vrs.append(start + 4)
            if tag == 0x7FE00010:
                pixel_start = tell
    boundaries = {b for b in boundaries if 0 < b < len(data)}
    meta = ds.file_meta
    return Layout(name=path.name, data=data, boundaries=tuple(sorted(boundaries)),
                  lengths=tuple(lengths), vrs=tuple(vrs), pixel_start=pixel_start,
                  meta_end=132 + 12 + int(meta.FileMetaInformationGroupLength),
                  sop_class=str(meta.MediaStorageSOPClassUID),
                  transfer_syntax=str(meta.TransferSyntaxUID))


@lru_cache(maxsize=1)
def corpus() -> tuple[Layout, ...]:
    """The parsed corpus (pydicom-data files, plus shared data when present)."""
    files = {p.name: p for p in pydicom_test_files() if p.name in CORPUS_NAMES}
    paths = [files[name] for name in CORPUS_NAMES if name in files]
    paths += [SHARED_DATA / name for name in SHARED_NAMES if (SHARED_DATA / name).is_file()]
    return tuple(_layout(p) for p in paths)


def layout_of(name: str) -> Layout:
    """The corpus file called ``name``."""
    return next(layout for layout in corpus() if layout.name == name)


@dataclass(frozen=True)
class Damage:
    """One damaged file: which source, what was done, the bytes."""

    source: str
    what: str
    data: bytes

    def __repr__(self) -> str:  # hypothesis prints this for a failing case
        return f"Damage({self.source}: {self.what})"


@st.composite
def damaged(draw: st.DrawFn) -> Damage:
    """A corpus file truncated, flipped, given a wrong length or a bogus VR."""
    layout = draw(st.sampled_from(corpus()))
    data = bytearray(layout.data)
    kind = draw(st.sampled_from(["boundary", "truncate", "flip_header", "flip_pixels",
                                 "length", "vr", "several"]))
    steps = draw(st.integers(2, 4)) if kind == "several" else 1
    what = []
    for _ in range(steps):
        step = kind if kind != "several" else draw(st.sampled_from(
            ["flip_header", "flip_pixels", "length", "vr"]))
        if step == "boundary":
            cut = draw(st.sampled_from(layout.boundaries))
            del data[cut:]
            what.append(f"cut at element boundary {cut}")
        elif step == "truncate":
            cut = draw(st.integers(0, len(data) - 1))
            del data[cut:]
            what.append(f"cut at {cut}")
        elif step == "flip_header" or (step == "flip_pixels" and layout.pixel_start >= len(data)):
            at = draw(st.integers(0, min(layout.pixel_start, len(data)) - 1))
            bit = draw(st.integers(0, 7))
            data[at] ^= 1 << bit
            what.append(f"bit {bit} of header byte {at}")
        elif step == "flip_pixels":
            at = draw(st.integers(layout.pixel_start, len(data) - 1))
            value = draw(st.integers(1, 255))
            data[at] ^= value
            what.append(f"pixel byte {at} ^ {value}")
        elif step == "length" and layout.lengths:
            offset, size, order = draw(st.sampled_from(layout.lengths))
            if offset + size > len(data):
                continue
            value = draw(st.one_of(st.integers(0, 2 ** (8 * size) - 1),
                                   st.sampled_from([0, 1, 3, 2 ** (8 * size) - 1,
                                                    2 ** (8 * size) - 2])))
            data[offset:offset + size] = struct.pack(order + ("H" if size == 2 else "I"), value)
            what.append(f"length at {offset} = {value}")
        elif step == "vr" and layout.vrs:
            offset = draw(st.sampled_from(layout.vrs))
            if offset + 2 > len(data):
                continue
            vr = draw(st.one_of(st.binary(min_size=2, max_size=2),
                                st.sampled_from([b"IR", b"XX", b"SQ", b"OB", b"UN", b"US",
                                                 b"FD", b"\x00\x00"])))
            data[offset:offset + 2] = vr
            what.append(f"VR at {offset} = {vr!r}")
    return Damage(source=layout.name, what="; ".join(what) or "unchanged", data=bytes(data))
