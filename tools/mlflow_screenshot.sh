#!/usr/bin/env bash
# The MLflow screenshot of docs/training.md, remade: an `mlflow server` on loopback (SQLite),
# a short tracked chest run on 80 real radiographs, its evaluation and its published model
# version; then the run's page in headless Chromium, cropped to docs/screenshots/mlflow-run.png.
# Usage: bash tools/mlflow_screenshot.sh [DATA=../shared/data] (needs medvision[tracking], chromium)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DATA=$(cd "${1:-$REPO/../shared/data}" && pwd)
BIN=$REPO/.venv/bin
W=$(mktemp -d)
PORT=${PORT:-5077}
trap 'kill $(cat $W/server.pid) 2>/dev/null || true; rm -rf $W' EXIT
cd "$W"
"$BIN/mlflow" server --host 127.0.0.1 --port "$PORT" --workers 1 \
  --backend-store-uri "sqlite:///$W/mlflow.db" --artifacts-destination "$W/artifacts" > server.log 2>&1 &
echo $! > server.pid
"$BIN/python" - "$REPO" "$DATA" <<'PY'
import sys
from pathlib import Path

import yaml

repo, data = Path(sys.argv[1]), Path(sys.argv[2])
for name in ("NORMAL", "PNEUMONIA"):
    (Path("data") / name).mkdir(parents=True)
    for path in sorted((data / "chest_xray" / "train" / name).glob("*.jpeg"))[:40]:
        (Path("data") / name / path.name).symlink_to(path)
s = yaml.safe_load((repo / "pipelines/chest-xray-pneumonia/pipeline.yaml").read_text())
s.update(name="chest-demo", preprocess={**s["preprocess"], "size": [128, 128]})
s["training"].update(epochs=8, swa_epochs=2, batch_size=16, folds=None,
                     early_stopping_patience=None)
s.pop("members", None)
Path("pipeline").mkdir()
Path("pipeline/pipeline.yaml").write_text(yaml.safe_dump(s))
PY
for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
URI=http://127.0.0.1:$PORT
"$BIN/medvision" train --pipeline pipeline --data data -o runs/chest --device cpu --tracking "$URI"
"$BIN/medvision" evaluate --pipeline runs/chest --weights runs/chest/best.safetensors --data data \
  --split val -o eval --device cpu --tracking "$URI"
cp -r pipeline shipped
"$BIN/medvision" publish runs/chest --pipeline shipped --tracking "$URI"
read -r RUN EXP < <("$BIN/python" -c "import json; t = json.load(open('runs/chest/tracking.json'))['mlflow']; print(t['run_id'], t['experiment_id'])")
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1500,1700 \
  --virtual-time-budget=60000 --screenshot="$W/run.png" "$URI/#/experiments/$EXP/runs/$RUN"
"$BIN/python" - "$W/run.png" "$REPO/docs/screenshots/mlflow-run.png" <<'PY'
import sys

from PIL import Image

image = Image.open(sys.argv[1]).crop((0, 0, 1110, 1700)).convert("RGB")  # without the side panel
image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(sys.argv[2], optimize=True)
PY
echo "wrote $REPO/docs/screenshots/mlflow-run.png"
