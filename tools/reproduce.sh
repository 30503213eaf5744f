#!/usr/bin/env bash
# Reproduce a shipped model from its pipeline file: train (resuming an interrupted run),
# publish into the pipeline folder, evaluate on the validation split (folds: out of fold).
# A pipeline with `training.folds: k` trains RUNS/NAME/fold0 .. fold<k-1> (each resumable;
# finished folds are kept) and ships them as one ensemble; one with `members` (an architecture
# ensemble) trains RUNS/NAME/member0 .. member<n> the same way and ships them together.
#   usage: tools/reproduce.sh PIPELINE DATA [RUNS]      (BIN: the venv's bin, default .venv/bin)
set -euo pipefail
bin=${BIN:-.venv/bin}
pipeline=$1
data=$2
runs=${3:-runs}
name=$(basename "$pipeline")
read -r folds extra < <("$bin/python" -c 'import sys
from medvision.config import load_pipeline
p = load_pipeline(sys.argv[1])
print(p.training.folds or 0, len(p.members))' "$pipeline")

train() {  # RUN [--fold I]
  local run=$1
  shift
  if "$bin/python" -c 'import json, sys
sys.exit(0 if json.load(open(sys.argv[1])).get("finished") else 1)' "$run/state.json" 2>/dev/null \
     || [ -f "$run/calibration.json" ]; then
    echo "$run: trained already"
    return
  fi
  local resume=()
  [ -f "$run/state.json" ] && resume=(--resume)
  "$bin/medvision" train --pipeline "$pipeline" --data "$data" -o "$run" "$@" "${resume[@]}"
}

if [ "$extra" -gt 0 ]; then
  members=()
  for ((i = 0; i <= extra; i++)); do
    if [ "$i" -eq 0 ]; then train "$runs/$name/member0"; else
      train "$runs/$name/member$i" --member "$i"; fi
    members+=("$runs/$name/member$i")
  done
  "$bin/medvision" publish "${members[@]}" --pipeline "$pipeline" --data "$data"
  "$bin/medvision" evaluate --pipeline "$pipeline" --data "$data" --split val \
    -o "$runs/$name-eval-val" --force
elif [ "$folds" -eq 0 ]; then
  train "$runs/$name"
  "$bin/medvision" publish "$runs/$name" --pipeline "$pipeline" --data "$data"
  "$bin/medvision" evaluate --pipeline "$pipeline" --data "$data" --split val \
    -o "$runs/$name-eval-val" --force
else
  members=()
  for ((i = 0; i < folds; i++)); do
    train "$runs/$name/fold$i" --fold "$i"
    members+=("$runs/$name/fold$i")
  done
  # publish prints every fold's validation metric, their mean and SD
  "$bin/medvision" publish "${members[@]}" --pipeline "$pipeline" --data "$data"
  # every case once, by the member that did not train on it: the ensemble's validation numbers
  "$bin/medvision" evaluate --pipeline "$pipeline" --data "$data" --out-of-fold \
    -o "$runs/$name-eval-oof" --force
fi
