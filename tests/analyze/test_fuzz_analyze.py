"""Property: a damaged DICOM file in a batch is rejected (or analysed), never stops the batch.

The pipeline is the shipped chest model with its input rules opened to every modality, so a
damaged CT, MR, US or NM file is decoded and run through the model instead of being turned
away by its modality before any pixel is read.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from PIL import Image

from medvision.analyze import AnalyzeOptions, analyze
from medvision.audit import AuditLog, Auditor, Pseudonymizer
from medvision.infer import Predictor

from fuzzing import Damage, damaged

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_COMMON = {"deadline": None, "database": None,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture]}


@pytest.fixture(scope="module")
def open_predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    folder = tmp_path_factory.mktemp("pipeline") / "chest-any-input"
    shutil.copytree(REPO / "pipelines" / "chest-xray-pneumonia", folder)
    config = yaml.safe_load((folder / "pipeline.yaml").read_text())
    config["input"] = {"modalities": [], "body_parts": []}
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(config))
    return Predictor.from_pipeline(str(folder))


def _check(damage: Damage, predictor: Predictor) -> None:
    with tempfile.TemporaryDirectory() as root:
        inputs = Path(root) / "in"
        inputs.mkdir()
        (inputs / "damaged.dcm").write_bytes(damage.data)
        gradient = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8) * 2
        Image.fromarray(gradient).save(inputs / "control.png")
        auditor = Auditor(AuditLog(Path(root) / "audit.sqlite"), Pseudonymizer(b"k" * 32))
        results = analyze([inputs], predictor, Path(root) / "out", auditor=auditor,
                          options=AnalyzeOptions(progress=False))
        statuses = {r.study: r.status for r in results}
        assert statuses.pop("control") in ("ok", "flagged"), damage
        assert len(statuses) == 1, (damage, statuses)
        (status,) = statuses.values()
        assert status in ("ok", "flagged", "rejected"), (damage, results)
        assert auditor.log.verify().ok and auditor.log.verify().records == 2


@settings(max_examples=30, derandomize=True, **_COMMON)
@given(damage=damaged())
def test_damaged_file_never_stops_a_batch(damage: Damage, open_predictor: Predictor) -> None:
    _check(damage, open_predictor)


@pytest.mark.slow
@settings(max_examples=600, **_COMMON)
@given(damage=damaged())
def test_damaged_file_never_stops_a_batch_long(damage: Damage, open_predictor: Predictor) -> None:
    _check(damage, open_predictor)
