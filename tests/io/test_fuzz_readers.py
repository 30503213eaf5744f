"""Property: every damaged real DICOM file loads or fails with a DataError naming the file.

``inventory`` never raises for a damaged file (it lists it as rejected, with the reason, and
goes on); ``read_volume`` returns a valid volume or raises a ``DataError`` subclass. The
bounded run is part of ``make test``; the ``slow`` one runs thousands of cases.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medvision.errors import DataError
from medvision.io import Volume, inventory, read_volume

from fuzzing import Damage, corpus, damaged

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_COMMON = {"deadline": None, "database": None,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


def test_corpus_is_wide() -> None:
    from conftest import SHARED_DATA, require
    from fuzzing import CORPUS_NAMES, SHARED_NAMES

    layouts = corpus()
    names = {layout.name for layout in layouts}
    # every pydicom-data file named is there (the test extras install them) ...
    assert {Path(n).name for n in CORPUS_NAMES} <= names, set(CORPUS_NAMES) - names
    # ... and every shared-data file: required in CI, where the data folder must be present
    require(all((SHARED_DATA / n).is_file() for n in SHARED_NAMES),
            "../shared/data's DICOM files for the fuzz corpus are not available")
    assert len(layouts) == len(CORPUS_NAMES) + len(SHARED_NAMES)
    assert all(layout.boundaries and layout.lengths for layout in layouts)


def _check(damage: Damage) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "damaged.dcm"
        good = Path(folder) / "sub" / "other.png"
        good.parent.mkdir()
        from PIL import Image

        Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(good)
        path.write_bytes(damage.data)
        found = inventory([folder])  # never raises; the good file is still found
        assert any(e.source == str(good) for e in found.entries), damage
        assert len(found.entries) + len(found.rejected) >= 2 or any(
            e.series is not None for e in found.entries), damage
        for rejected, reason in found.rejected:
            assert rejected == str(path) and path.name in reason, (damage, reason)
        for entry in found.entries:
            if entry.series is None:
                continue
            try:
                volume = entry.load(skip_unreadable=True)
            except DataError as e:
                assert path.name in str(e) or folder in str(e), (damage, str(e))
            else:
                assert isinstance(volume, Volume)
        try:
            volume = read_volume(path)
        except DataError as e:
            assert path.name in str(e), (damage, str(e))
        else:
            assert volume.array.dtype == np.float32 and volume.spatial_dims in (2, 3)


@settings(max_examples=250, derandomize=True, **_COMMON)
@given(damaged())
def test_damaged_files_load_or_raise_data_error(damage: Damage) -> None:
    _check(damage)


@pytest.mark.slow
@settings(max_examples=5000, **_COMMON)
@given(damaged())
def test_damaged_files_load_or_raise_data_error_long(damage: Damage) -> None:
    _check(damage)


@pytest.mark.parametrize("name", [layout.name for layout in corpus()])
def test_truncation_at_every_element_boundary(name: str, tmp_path: Path) -> None:
    """Exhaustive, not sampled: the file cut at each of its data-element boundaries."""
    from fuzzing import layout_of

    layout = layout_of(name)
    path = tmp_path / "cut.dcm"
    for cut in layout.boundaries:
        path.write_bytes(layout.data[:cut])
        found = inventory([path])
        assert len(found.entries) + len(found.rejected) == 1, cut
        try:
            read_volume(path)
        except DataError as e:
            assert path.name in str(e), (cut, str(e))


# --- a 4D series with damaged members -----------------------------------------------------

_FOUR_D = {
    "philips fMRI (27 files, 3 volumes)": ("dicom", "philips_4d", "In", "Magdeburg_2014", "fmri"),
    "siemens mosaic (2 files, 2 volumes)": ("dicom", "siemens_mosaic_4d", "In", "Orientation",
                                            "ax", "axasc35"),
}


def _four_d_files(name: str) -> list[Path]:
    from conftest import SHARED_DATA, require

    folder = SHARED_DATA.joinpath(*_FOUR_D[name])
    require(folder.is_dir(), f"{folder} is not available")  # a failure in CI
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix != ".nii")


@st.composite
def damaged_series(draw: st.DrawFn) -> tuple[str, int, str, int, int]:
    """(series, file index, damage kind, position, value) for one member of a 4D series."""
    name = draw(st.sampled_from(sorted(_FOUR_D)))
    count = 27 if name.startswith("philips") else 2
    return (name, draw(st.integers(0, count - 1)),
            draw(st.sampled_from(["truncate", "flip", "pixels"])),
            draw(st.integers(0, 10**9)), draw(st.integers(1, 255)))


@settings(max_examples=40, derandomize=True, **_COMMON)
@given(damaged_series())
def test_a_4d_series_with_a_damaged_member_loads_or_says_which(
        case: tuple[str, int, str, int, int]) -> None:
    """One member of a real 4D series truncated or flipped: the series is still listed, and
    loads (as fewer volumes, the damaged one left out and named) or fails naming a file."""
    import shutil

    name, index, kind, where, value = case
    files = _four_d_files(name)
    with tempfile.TemporaryDirectory() as folder:
        for path in files:
            shutil.copy(path, Path(folder) / path.name)
        target = Path(folder) / files[index].name
        data = bytearray(target.read_bytes())
        if kind == "truncate":
            del data[where % len(data):]
        elif kind == "flip":
            data[where % min(len(data), 4096)] ^= value
        else:  # the pixel data, at the end of these files
            data[len(data) - 1 - where % (len(data) // 2)] ^= value
        target.write_bytes(bytes(data))
        found = inventory([folder])  # never raises
        series = [e for e in found.entries if e.series is not None]
        for rejected, reason in found.rejected:
            assert Path(rejected).name in reason, (case, reason)
        for entry in series:
            try:
                volume = entry.load(skip_unreadable=True)
            except DataError as e:
                assert target.name in str(e) or folder in str(e), (case, str(e))
            else:
                assert volume.array.dtype == np.float32 and np.all(np.isfinite(volume.array))
                if volume.fourth_axis is not None:
                    assert volume.channels == volume.volumes >= 1
                    assert len(volume.fourth_axis.times_s) in (0, volume.volumes)
