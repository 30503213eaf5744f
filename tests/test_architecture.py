"""The stages import downward only (contract in pyproject.toml, drawn in docs/architecture.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_upward_import() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_the_diagram_names_every_layer() -> None:
    """docs/architecture.md lists the same layers as the contract."""
    import tomllib

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = contract["contracts"][0]["layers"]
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for layer in layers:
        for module in layer.replace(":", "|").split("|"):
            assert f"`{module.strip()}`" in doc, f"{module.strip()} missing from the diagram"
