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

from medvision.errors import DataError
from medvision.io import Volume, inventory, read_volume

from fuzzing import Damage, corpus, damaged

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_COMMON = {"deadline": None, "database": None,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


def test_corpus_is_wide() -> None:
    layouts = corpus()
    assert len(layouts) >= 13
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
