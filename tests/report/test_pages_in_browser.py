"""Every page kind rendered in a real headless browser (Chromium): the study report, the batch
summary, the evaluation page, the audit report and the synthetic-image memorisation page. Each must load with every image it
references decoded, and show its headline content.

With ``MEDVISION_SCREENSHOTS=DIR`` the screenshots are kept in DIR (docs/screenshots holds
the ones of the last run made that way).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from medvision.cli.main import main

from conftest import pydicom_test_files, require

pytestmark = pytest.mark.integration

RG1 = next(p for p in pydicom_test_files() if p.name == "RG1_UNCR.dcm")

# A same-folder wrapper page loads the page under test in an iframe, waits for it, and writes
# what the browser made of every <img> into its own DOM, which --dump-dom prints.
PROBE = """<!doctype html><html><body><iframe id="f" src="{page}" width="1200"
height="900"></iframe><pre id="result">pending</pre><script>
const frame = document.getElementById("f");
frame.addEventListener("load", () => {{
  const doc = frame.contentDocument;
  const images = Array.from(doc.images).map(i => ({{src: i.getAttribute("src").slice(0, 60),
    complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}}));
  document.getElementById("result").textContent = JSON.stringify({{
    title: doc.title, text: doc.body.innerText.slice(0, 4000), images: images}});
}});
</script></body></html>"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    require(path is not None, "chromium is not installed (apt-get install chromium)")
    return str(path)


def _browse(chromium: str, page: Path, shot: Path) -> dict:
    probe = page.parent / f".probe-{page.stem}.html"
    probe.write_text(PROBE.format(page=page.name))
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--allow-file-access-from-files", "--virtual-time-budget=15000",
              "--user-data-dir=" + str(page.parent / ".chromium")]
    dumped = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True,
                            text=True, timeout=180)
    start = dumped.stdout.find('<pre id="result">')
    assert start >= 0, dumped.stderr[-2000:]
    import html

    body = html.unescape(dumped.stdout[start + len('<pre id="result">'):
                                       dumped.stdout.find("</pre>", start)])
    assert body != "pending", "the page did not finish loading"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,1500",
                    page.as_uri()], capture_output=True, timeout=180, check=True)
    assert shot.stat().st_size > 10_000
    return dict(json.loads(body))


def _check(result: dict, *, images: int, text: list[str]) -> None:
    assert len(result["images"]) >= images, result["images"]
    for image in result["images"]:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image
    for fragment in text:
        assert fragment in result["text"], (fragment, result["text"][:600])


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pages")
    audit = root / "audit.db"
    out = root / "analysis"
    assert main(["analyze", str(RG1), "--pipeline", "chest-xray-pneumonia", "-o", str(out),
                 "--audit-log", str(audit)]) == 0
    data = root / "chest"
    for label in ("NORMAL", "PNEUMONIA"):
        (data / label).mkdir(parents=True)
        for path in sorted((shared_data / "chest_xray" / "train" / label).glob("*.jpeg"))[:6]:
            (data / label / path.name).symlink_to(path)
    evaluation = root / "evaluation"
    assert main(["evaluate", "chest-xray-pneumonia", "--data", str(data), "-o",
                 str(evaluation), "--audit-log", str(audit)]) == 0
    report = root / "audit.html"
    assert main(["audit", "report", "--audit-log", str(audit), "-o", str(report)]) == 0
    return {"study": next(out.glob("*/report.html")), "summary": out / "summary.html",
            "evaluation": evaluation / "summary.html", "audit": report,
            "memorisation": _memorisation_page(root, data)}


def _memorisation_page(root: Path, data: Path) -> Path:
    """The synthetic-image page, with "synthetic" images that are two training radiographs
    (copies, flagged) and two radiographs the training side never had."""
    from medvision.config import load_pipeline
    from medvision.evaluate.synthetic import synthetic_quality, write_quality
    from medvision.train import discover_items

    pipeline = load_pipeline("chest-xray-pneumonia")
    items = discover_items(pipeline, data)
    training, unseen = items[:4] + items[6:10], items[4:6] + items[10:12]
    synthetic = training[:2] + unseen[:2]
    quality, arrays = synthetic_quality(pipeline, synthetic=synthetic, training=training,
                                        reference=unseen)
    write_quality(quality, arrays, root / "quality")
    return root / "quality" / "memorisation.html"


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keep = os.environ.get("MEDVISION_SCREENSHOTS")
    folder = Path(keep) if keep else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.parametrize(("kind", "images", "text"), [
    ("study", 2, ["FLAGGED", "P(", "calibrated", "out of distribution", "Intended use"]),
    ("summary", 0, ["Batch analysis with chest-xray-pneumonia", "p_PNEUMONIA", "flagged"]),
    ("evaluation", 4, ["Evaluation of chest-xray-pneumonia", "accuracy", "wilson", "auc"]),
    ("audit", 1, ["Audit report", "Per-study traceability", "actor"]),
    ("memorisation", 8, ["2 likely copies of training images", "Closest pairs",
                         "Fréchet distance", "likely copy"]),
])
def test_page_renders_with_every_image(pages: dict[str, Path], screenshots: Path, kind: str,
                                       images: int, text: list[str]) -> None:
    result = _browse(_chromium(), pages[kind], screenshots / f"{kind}.png")
    _check(result, images=images, text=text)
