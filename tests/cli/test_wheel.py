"""The wheel ``python -m build`` makes: installed into fresh virtual environments outside the
repository, with all extras and with the core alone, and run from another directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


def _run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env})


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)],
                 REPO)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("medvision-*.whl")
    assert path.stat().st_size < 100 * 2**20
    return path


def _venv(root: Path, requirement: str) -> Path:
    assert _run([sys.executable, "-m", "venv", str(root)], root.parent).returncode == 0
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    done = _run([*pip, "torch==2.13.0"], root.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _run([*pip, "-c", str(REPO / "constraints.txt"), requirement], root.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "bin" / "medvision"


@pytest.mark.parametrize("extras", ["[all]", ""])
def test_wheel_installs_and_runs_from_anywhere(wheel: Path, tmp_path: Path,
                                               shared_data: Path, extras: str) -> None:
    require(REPO.joinpath("constraints.txt").is_file(), "constraints.txt missing")
    medvision = _venv(tmp_path / "venv", f"{wheel}{extras}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    listed = _run([str(medvision), "pipelines", "list", "--json"], elsewhere)
    assert listed.returncode == 0, listed.stderr
    names = {row["name"] for row in json.loads(listed.stdout)}
    assert {"chest-xray-pneumonia", "hippocampus-seg", "adrenal-3d"} <= names
    image = sorted((shared_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[0]
    analysed = _run([str(medvision), "analyze", str(image), "--pipeline",
                     "chest-xray-pneumonia", "-o", "out", "--json"], elsewhere,
                    MEDVISION_AUDIT_LOG=str(elsewhere / "audit.sqlite"))
    assert analysed.returncode == 0, analysed.stderr[-3000:]
    assert json.loads(analysed.stdout)["studies"][0]["status"] in ("ok", "flagged")
    assert (elsewhere / "out" / image.stem / "report.html").is_file()
    if extras:  # pynetdicom is there: the command runs (nobody listens on port 9)
        echo = _run([str(medvision), "pacs", "echo", "--port", "9"], elsewhere)
        assert echo.returncode == 1 and "no association" in echo.stderr
    else:
        listen = _run([str(medvision), "pacs", "listen", "--config",
                       str(REPO / "docs" / "examples" / "bridge.yaml"), "--workdir", "w"],
                      elsewhere)
        assert listen.returncode == 2
        assert "pip install 'medvision[pacs]'" in listen.stderr
