#!/usr/bin/env bash
# Reproduce docs/results-cuhk03.md: AiO on real CUHK03 crops (Market layout) from an ImageNet MobileNetV2,
# with the Table 5 ablation (pyramid / self-distillation on and off), on a 2-core CPU.
#
#   bash experiments/cuhk03.sh DATA_DIR WEIGHTS OUT_DIR
#   e.g. bash experiments/cuhk03.sh ../shared/data/cuhk03np-dev ../shared/weights/mobilenet_v2_imagenet.pth runs/cuhk03
#
# The five trainings are independent (run them in parallel on a machine with more cores); aio_all only
# needs aio_cp_sd's thresholds.json at its evaluation step.
set -euo pipefail
DATA=${1:?dataset folder in Market-1501 layout}; WEIGHTS=${2:?MobileNetV2 state dict}; OUT=${3:-runs/cuhk03}
mkdir -p "$OUT"
# Fast CPU recipe: the first 3 MobileNetV2 stages (stride 8) are frozen and their outputs cached once;
# label smoothing 0.1; 30 epochs with a 3-epoch warm-up, x0.1 at 20 and 26.
COMMON=(--data "$DATA" --backbone mobilenet_v2 --weights "$WEIGHTS" --frozen-stages 3 --cache-stem
        --cache-dir "$OUT/cache" --epochs 30 --warmup-epochs 3 --milestones 20 26 --label-smoothing 0.1
        --threads 1 --num-workers 0 --quiet)
declare -A FLAGS=(
  [aio_cp_sd]=""                                          # code pyramid + self-distillation (the full AiO)
  [aio_cp]="--no-self-distillation"                       # code pyramid only
  [aio_none]="--no-self-distillation --no-pyramid"        # independent heads on v0, no distillation
)
encode() {  # encode RUN SPLIT...
  local run=$1; shift
  for split in "$@"; do
    ctfreid encode --model "$OUT/$run" --data "$DATA" --split "$split" --out "$OUT/$run/$split.npz" --threads 1 --quiet
  done
}
# 1. Ablation runs: 20 % of the training identities are held out; DTO fits the thresholds on them.
for run in aio_cp_sd aio_cp aio_none; do
  # shellcheck disable=SC2086
  ctfreid train "${COMMON[@]}" ${FLAGS[$run]} --val-fraction 0.2 --out "$OUT/$run"
  encode "$run" query gallery val
  ctfreid calibrate --val "$OUT/$run/val.npz" --beta 2 --out "$OUT/$run/thresholds.json"
  ctfreid evaluate --query "$OUT/$run/query.npz" --gallery "$OUT/$run/gallery.npz" \
    --thresholds "$OUT/$run/thresholds.json" --search-k 100 --repeats 5 --json "$OUT/$run/results.json"
done
# The paper's "no CP" row of Table 5 is separate models, one per code length: its 32-bit model alone
# (one code, so no DTO and no CtF).
ctfreid train "${COMMON[@]}" --lengths 32 --no-self-distillation --val-fraction 0.2 --out "$OUT/aio_sep32"
encode aio_sep32 query gallery
ctfreid evaluate --query "$OUT/aio_sep32/query.npz" --gallery "$OUT/aio_sep32/gallery.npz" \
  --search-k 100 --repeats 5 --json "$OUT/aio_sep32/results.json"
# 2. The paper's protocol (Sec. 4.2): thresholds from the split run, then train on all training identities.
ctfreid train "${COMMON[@]}" --val-fraction 0 --out "$OUT/aio_all"
encode aio_all query gallery
ctfreid evaluate --query "$OUT/aio_all/query.npz" --gallery "$OUT/aio_all/gallery.npz" \
  --thresholds "$OUT/aio_cp_sd/thresholds.json" --search-k 100 --repeats 5 --json "$OUT/aio_all/results.json"
ctfreid calibrate --val "$OUT/aio_cp_sd/val.npz" --beta-sweep \
  --query "$OUT/aio_cp_sd/query.npz" --gallery "$OUT/aio_cp_sd/gallery.npz" | tee "$OUT/beta_sweep.txt"
python3 "$(dirname "$0")/results_table.py" "$OUT" > "$OUT/results.md"
echo "tables in $OUT/results.md"
