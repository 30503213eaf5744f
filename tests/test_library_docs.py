"""docs/library.md's example runs as written (from the repository's root), so the documented
Python API cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_library_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    text = (REPO / "docs" / "library.md").read_text()
    [code] = re.findall(r"```python\n(.*?)```", text, flags=re.S)[:1]
    # the files it reads are the repository's; what it writes goes to a temporary folder
    code = code.replace('"sample_data/', f'"{REPO / "sample_data"}/')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/library.md", "exec"), {"__name__": "library_example"})
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("PNEUMONIA ")  # label, P(PNEUMONIA), OOD distance
    assert "'NORMAL':" in out[3] and "'PNEUMONIA':" in out[3]
    assert "(1, " in out[4]  # the saliency map's array, on the input's grid
    statuses = {line.split()[0]: line.split()[1] for line in out[5:]}
    assert statuses["chest_pneumonia"] == "ok"
    assert (tmp_path / "out" / "summary.html").is_file() and (tmp_path / "audit.sqlite").is_file()
