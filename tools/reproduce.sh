#!/usr/bin/env bash
# Reproduce a shipped model from its pipeline file: train (resuming an interrupted run),
# publish into the pipeline folder, evaluate on the validation split (folds: out of fold).
# A pipeline with `training.folds: k` trains RUNS/NAME/fold0 .. fold<k-1> (each resumable;
# finished folds are kept) and ships them as one ensemble; one with `members` (an architecture
# ensemble) trains RUNS/NAME/member0 .. member<n> the same way and ships them together.
# DEVICES=cuda:0,cuda:1 trains the folds (or members) in parallel, one per device, in waves
# of as many as there are devices (nnU-Net's advice for folds: one GPU each, no DDP);
# unset, they train one after another on --device auto.
#   usage: tools/reproduce.sh PIPELINE DATA [RUNS]      (BIN: the venv's bin, default .venv/bin)
set -euo pipefail
IFS=, read -r -a devices <<< "${DEVICES:-}"
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

running=()
train_on() {  # SLOT RUN [ARGS]: on device SLOT of DEVICES in the background, else here
  local slot=$1
  shift
  if [ "${#devices[@]}" -eq 0 ]; then train "$@"; return; fi
  local device=${devices[$((slot % ${#devices[@]}))]}
  train "$@" --device "$device" > "$1.log" 2>&1 &
  running+=($!)
  echo "$1: training on $device (log $1.log)"
  if [ "${#running[@]}" -ge "${#devices[@]}" ]; then wait_all; fi
}
wait_all() {
  local pid failed=0
  for pid in "${running[@]}"; do wait "$pid" || failed=1; done
  running=()
  [ "$failed" -eq 0 ] || { echo "a parallel training run failed (see its .log)" >&2; exit 1; }
}

if [ "$extra" -gt 0 ]; then
  members=()
  for ((i = 0; i <= extra; i++)); do
    mkdir -p "$runs/$name"
    if [ "$i" -eq 0 ]; then train_on "$i" "$runs/$name/member0"; else
      train_on "$i" "$runs/$name/member$i" --member "$i"; fi
    members+=("$runs/$name/member$i")
  done
  wait_all
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
    mkdir -p "$runs/$name"
    train_on "$i" "$runs/$name/fold$i" --fold "$i"
    members+=("$runs/$name/fold$i")
  done
  wait_all
  # publish prints every fold's validation metric, their mean and SD
  "$bin/medvision" publish "${members[@]}" --pipeline "$pipeline" --data "$data"
  # every case once, by the member that did not train on it: the ensemble's validation numbers
  "$bin/medvision" evaluate --pipeline "$pipeline" --data "$data" --out-of-fold \
    -o "$runs/$name-eval-oof" --force
fi
