#!/usr/bin/env bash
# A weighted (asymmetric) stage 1 on trained runs (issue #16): encode the dev splits with values_32, fit the
# default calibration and the weighted ones (2, 3, 4 bits) on val, evaluate them on the test split
# (experiments/weighted_stage1.py) and time them (experiments/time_thresholds.py, dev gallery and all dev
# crops).
#   bash experiments/weighted_stage1.sh DATA OUT RUN [RUN ...]
# DATA: the CUHK03 dev set in Market-1501 layout; RUN: a 'ctfreid train' run folder; OUT/<run name>/ gets
# the encoded sets, thresholds, evaluations and timings.
set -euo pipefail
DATA=$1; OUT=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
dirs=()
for run in "$@"; do
  d=$OUT/$(basename "$run"); mkdir -p "$d"; dirs+=("$d")
  for split in query gallery val train; do
    [ -f "$d/$split.npz" ] || ctfreid encode --model "$run" --data "$DATA" --split $split --out "$d/$split.npz" --threads 1 --quiet
  done
  python3 - "$d" <<'PY'
import sys
from ctfreid.demo import concat_sets
from ctfreid.encoded import load_encoded, save_encoded
d = sys.argv[1]
sets = [load_encoded(f"{d}/{s}.npz") for s in ("query", "gallery", "train")]
save_encoded(f"{d}/all_dev.npz", concat_sets(concat_sets(sets[0], sets[1]), sets[2]))  # timing only
PY
  # default.json: the Hamming default alone; weightedB.json: the default with B-bit weights beside it
  ctfreid calibrate --val "$d/val.npz" --weighted 0 --out "$d/default.json" > "$d/default.txt"
  for b in 2 3 4; do
    ctfreid calibrate --val "$d/val.npz" --weighted $b --out "$d/weighted$b.json" > "$d/weighted$b.txt"
  done
done
python3 "$here/weighted_stage1.py" "${dirs[@]}" | tee "$OUT/weighted_stage1.md"
for d in "${dirs[@]}"; do
  th=("$d/default.json" "$d/weighted2.json" "$d/weighted3.json" "$d/weighted4.json")
  python3 "$here/time_thresholds.py" "$d/query.npz" "$d/gallery.npz" "${th[@]}" --rounds 15 --json "$d/timing_dev.json" \
    | tee "$d/timing_dev.txt"
  python3 "$here/time_thresholds.py" "$d/query.npz" "$d/all_dev.npz" "${th[@]}" --rounds 15 --json "$d/timing_all.json" \
    | tee "$d/timing_all.txt"
done
