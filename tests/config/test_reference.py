"""The pipeline reference and JSON Schema come from the code and cannot drift from it."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

from medvision.config_reference import json_schema, reference_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_the_reference_in_docs_is_the_generated_one() -> None:
    assert (ROOT / "docs" / "pipeline-reference.md").read_text() == reference_markdown() + "\n", \
        "regenerate: medvision pipelines schema --markdown > docs/pipeline-reference.md"


def test_every_key_has_a_meaning() -> None:
    text = reference_markdown()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows), \
        [line for line in rows if line.rstrip().endswith("|  |")][:5]


def test_the_json_schema_accepts_the_shipped_pipelines_and_rejects_a_typo() -> None:
    schema = json_schema()
    for path in sorted((ROOT / "pipelines").glob("*/pipeline.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    bad = yaml.safe_load((ROOT / "pipelines" / "chest-xray-pneumonia" / "pipeline.yaml")
                         .read_text())
    bad["trainig"] = {}
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError as e:
        assert "trainig" in str(e)
    else:
        raise AssertionError("a misspelt key passed the schema")
    json.dumps(schema)
