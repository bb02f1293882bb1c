#!/usr/bin/env bash
# Calibration targets against DTO on one trained run (docs/results-cuhk03.md, "Calibration aimed at a target"):
#   bash experiments/calibration_targets.sh RUN_DIR DATA_DIR OUT_DIR
# e.g. bash experiments/calibration_targets.sh runs/f4_aio_cp_sd_s0 ../shared/data/cuhk03np-dev runs/calib
set -euo pipefail
RUN=${1:?run directory with a validation split}; DATA=${2:?dataset folder}; D=${3:-runs/calib}
mkdir -p "$D"
for s in val query gallery; do
  [ -f "$D/$s.npz" ] || ctfreid encode --model "$RUN" --data "$DATA" --split $s --out "$D/$s.npz" --threads 1 --quiet
done
N=$(python3 -c "from ctfreid.encoded import load_encoded; print(len(load_encoded('$D/gallery.npz').pids))")
ctfreid calibrate --val "$D/val.npz" --beta 2 --out "$D/dto_beta2.json"
ctfreid calibrate --val "$D/val.npz" --beta 1 --out "$D/dto_beta1.json"
[ -f "$D/cost.json" ] || ctfreid calibrate --val "$D/val.npz" --target accuracy --tolerance 0.5 --gallery-size "$N" \
  --save-cost-model "$D/cost.json" --out "$D/accuracy_0.5.json"
COMMON=(--val "$D/val.npz" --gallery-size "$N" --cost-model "$D/cost.json")
ctfreid calibrate "${COMMON[@]}" --target accuracy --tolerance 0.5 --out "$D/accuracy_0.5.json"
ctfreid calibrate "${COMMON[@]}" --target accuracy --tolerance 1.0 --out "$D/accuracy_1.0.json"
for B in 0.012 0.02 0.03; do
  ctfreid calibrate "${COMMON[@]}" --target time --budget-ms $B --out "$D/time_$B.json"
done
for th in "$D"/dto_*.json "$D"/accuracy_*.json "$D"/time_*.json; do
  ctfreid evaluate --query "$D/query.npz" --gallery "$D/gallery.npz" --thresholds "$th" --search-k 100 \
    --json "${th%.json}.results.json"
done
python3 "$(dirname "$0")/time_thresholds.py" "$D/query.npz" "$D/gallery.npz" "$D"/dto_*.json "$D"/accuracy_*.json \
  "$D"/time_*.json --json "$D/interleaved.json"
