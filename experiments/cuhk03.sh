#!/usr/bin/env bash
# Reproduce docs/results-cuhk03.md: AiO on real CUHK03 crops (Market layout) from an ImageNet MobileNetV2,
# on a 2-core CPU: the Table 4 runs (frozen-2 recipe, flip test) and the Table 5 ablation (frozen-3 recipe).
#
#   bash experiments/cuhk03.sh DATA_DIR WEIGHTS OUT_DIR [table4|ablation|all]
#   e.g. bash experiments/cuhk03.sh ../shared/data/cuhk03np-dev ../shared/weights/mobilenet_v2_imagenet.pth runs/cuhk03
#
# Every training is independent of the others (run them in parallel on a machine with more cores), except
# that aio_all's evaluation uses aio_cp_sd's thresholds.
set -euo pipefail
DATA=${1:?dataset folder in Market-1501 layout}; WEIGHTS=${2:?MobileNetV2 state dict}; OUT=${3:-runs/cuhk03}
PART=${4:-all}
mkdir -p "$OUT"
# Fast CPU recipe: the first backbone stages are frozen and their outputs cached once (for each image and
# its mirror); label smoothing 0.1; 30 epochs with a 3-epoch warm-up, x0.1 at 20 and 26.
COMMON=(--data "$DATA" --backbone mobilenet_v2 --weights "$WEIGHTS" --cache-stem
        --epochs 30 --warmup-epochs 3 --milestones 20 26 --label-smoothing 0.1
        --threads 1 --num-workers 0 --quiet)
CTF=(ctfreid); ENCODE_FLAGS=(--threads 1)
# shellcheck source=experiments/_runs.sh
source "$(dirname "$0")/_runs.sh"

if [ "$PART" = all ] || [ "$PART" = table4 ]; then
  # Table 4: frozen-2 recipe (features[0:4] frozen, stride 4), the full AiO (pyramid + self-distillation).
  # 1. 20 % of the training identities held out; DTO fits the thresholds on them (plain and flip-tested codes).
  ctfreid train "${COMMON[@]}" --frozen-stages 2 --cache-dir "$OUT/cache2" --val-fraction 0.2 --out "$OUT/aio_cp_sd"
  encode "$OUT/aio_cp_sd" "" query gallery val
  encode "$OUT/aio_cp_sd" _flip --flip query gallery val
  for suffix in "" _flip; do
    ctfreid calibrate --val "$OUT/aio_cp_sd/val$suffix.npz" --beta 2 --out "$OUT/aio_cp_sd/thresholds$suffix.json"
    evaluate "$OUT/aio_cp_sd" "$suffix" "$OUT/aio_cp_sd/thresholds$suffix.json"
  done
  ctfreid calibrate --val "$OUT/aio_cp_sd/val_flip.npz" --beta-sweep \
    --query "$OUT/aio_cp_sd/query_flip.npz" --gallery "$OUT/aio_cp_sd/gallery_flip.npz" | tee "$OUT/beta_sweep.txt"
  # 2. The paper's protocol (Sec. 4.2): the same training on all training identities, thresholds from step 1.
  ctfreid train "${COMMON[@]}" --frozen-stages 2 --cache-dir "$OUT/cache2" --val-fraction 0 --out "$OUT/aio_all"
  encode "$OUT/aio_all" "" query gallery
  encode "$OUT/aio_all" _flip --flip query gallery
  for suffix in "" _flip; do evaluate "$OUT/aio_all" "$suffix" "$OUT/aio_cp_sd/thresholds$suffix.json"; done
fi

if [ "$PART" = all ] || [ "$PART" = ablation ]; then
  # Table 5: frozen-3 recipe (features[0:7] frozen, stride 8; about 2/3 of the frozen-2 training time),
  # each setting with its own 20 % validation split and DTO thresholds; no flip test.
  AB="$OUT/ablation"; mkdir -p "$AB"
  for run in aio_cp_sd aio_cp aio_none aio_sep32; do
    # shellcheck disable=SC2086
    ctfreid train "${COMMON[@]}" --frozen-stages 3 --cache-dir "$AB/cache3" ${ABLATION_FLAGS[$run]} --val-fraction 0.2 \
      --out "$AB/$run"
    encode "$AB/$run" "" query gallery
    if [ "$run" = "$ONE_CODE_RUN" ]; then
      evaluate "$AB/$run" ""
    else
      encode "$AB/$run" "" val
      ctfreid calibrate --val "$AB/$run/val.npz" --beta 2 --out "$AB/$run/thresholds.json"
      evaluate "$AB/$run" "" "$AB/$run/thresholds.json"
    fi
  done
fi
python3 "$(dirname "$0")/results_table.py" "$OUT" > "$OUT/results.md"
echo "tables in $OUT/results.md"
