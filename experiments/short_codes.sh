#!/usr/bin/env bash
# The short-code study (issue #16 part 2): Table 5 rows and the short-code options of the training loss, on
# CUHK03 with the frozen-4 CPU recipe (MobileNetV2 features[0:14] frozen and cached; about 15-20 min per run
# on a free core, 30 epochs), seeds 0 and 1, each run with its own 20 % validation split and DTO thresholds.
#
#   bash experiments/short_codes.sh DATA_DIR WEIGHTS OUT_DIR [JOBS] [SETTING ...]
#   e.g. bash experiments/short_codes.sh ../shared/data/cuhk03np-dev ../shared/weights/mobilenet_v2_imagenet.pth \
#          runs/short_codes 2 aio_cp_sd q1d10 v0q01d1 aio_sep32
#
# JOBS trainings run at once (default 1; each uses one thread). Without SETTINGs, all of them. Then
#   python3 experiments/short_codes_table.py OUT_DIR aio_sep32 aio_none aio_cp aio_cp_sd q1d10 v0q01d1 ts10 ts10nd cpts10 det detv0 sdprob sdsim l1_01 l2_100 l2_10 t4
# prints the table (per seed and mean).
set -euo pipefail
DATA=${1:?dataset folder in Market-1501 layout}; WEIGHTS=${2:?MobileNetV2 state dict}; OUT=${3:-runs/short_codes}
JOBS=${4:-1}; shift $(( $# < 4 ? $# : 4 ))
SEEDS=${SEEDS:-0 1}
mkdir -p "$OUT"

declare -A FLAGS=(
  # Table 5 rows
  [aio_sep32]="--no-self-distillation --lengths 32"       # a separate 32-bit model
  [aio_none]="--no-self-distillation --no-pyramid"        # independent heads on v0
  [aio_cp]="--no-self-distillation"                       # code pyramid only
  [aio_cp_sd]=""                                          # the full AiO (Eqs. 3-5 as written)
  # short-code options (ctfreid/learn/losses.py, self_distillation.py)
  [q1d10]="--quantization-weight 1 --decorrelation-weight 10"
  [v0q01d1]="--sim-teacher v0 --quantization-weight 0.1 --decorrelation-weight 1"
  # saturation (ctfreid/learn/train.py): HashNet's continuation tanh(s * bn(v)), s from 1 to 10 over the epochs;
  # with --no-decay-bn, no weight decay on BN weights / biases and biases
  [ts10]="--tanh-scale-end 10"
  [ts10nd]="--tanh-scale-end 10 --no-decay-bn"
  [cpts10]="--no-self-distillation --tanh-scale-end 10"  # pyramid only, saturated
  # light-reid's detached heads (ctfreid/learn/model.py): the shorter codes learn from a backbone that only the
  # 2048-bit code's losses train; with v0 as the similarity teacher of every code
  [det]="--detach-heads"
  [detv0]="--detach-heads --sim-teacher v0"
  # which half of self-distillation holds the codes back (issue #16: "lower lambda1 or raise T"): each half
  # alone, a weaker probability distillation, and a softer one
  [sdprob]="--lambda2 0"                                  # probability distillation (Eq. 3) only
  [sdsim]="--lambda1 0"                                   # similarity distillation (Eq. 4) only
  [l1_01]="--lambda1 0.1"
  [l2_100]="--lambda2 100"
  [l2_10]="--lambda2 10"
  [t4]="--temperature 4"
  # the shortest code's CE and triplet weighted 4x (the code that carries CtF's first stage), pyramid without SD
  [cpw4]="--no-self-distillation --shortest-weight 4"
  # not in the default list: with the inner-product student of the first version of --sim-teacher v0 (its
  # zero diagonal forced saturation) this setting made all bits equal and kept the cross-entropy at chance
  [v0q1d10]="--sim-teacher v0 --quantization-weight 1 --decorrelation-weight 10"
)
SETTINGS=("$@"); [ ${#SETTINGS[@]} -gt 0 ] || SETTINGS=(aio_cp_sd q1d10 v0q01d1 aio_sep32 aio_none aio_cp ts10 ts10nd cpts10 det detv0 sdprob sdsim l1_01 l2_100 l2_10 t4)

one() {  # one SETTING SEED: train, encode, DTO (beta 2), evaluate
  local name=$1 seed=$2 dir="$OUT/f4_$1_s$2" split
  # shellcheck disable=SC2086
  ctfreid train --data "$DATA" --backbone mobilenet_v2 --weights "$WEIGHTS" --cache-stem --epochs 30 \
    --warmup-epochs 3 --milestones 20 26 --label-smoothing 0.1 --threads 1 --num-workers 0 --frozen-stages 4 \
    --cache-dir "$OUT/cache4" --val-fraction 0.2 --seed "$seed" --out "$dir" --quiet ${FLAGS[$name]}
  for split in query gallery val; do
    ctfreid encode --model "$dir" --data "$DATA" --split "$split" --out "$dir/$split.npz" --threads 1 --quiet
  done
  if [ "$name" = aio_sep32 ]; then  # one code: no DTO, no CtF
    ctfreid evaluate --query "$dir/query.npz" --gallery "$dir/gallery.npz" --search-k 100 --json "$dir/results.json"
  else
    ctfreid calibrate --val "$dir/val.npz" --beta 2 --out "$dir/thresholds.json"
    ctfreid evaluate --query "$dir/query.npz" --gallery "$dir/gallery.npz" --thresholds "$dir/thresholds.json" \
      --search-k 100 --json "$dir/results.json"
  fi > "$dir/evaluate.txt"
}

for seed in $SEEDS; do
  for name in "${SETTINGS[@]}"; do
    [ -n "${FLAGS[$name]+x}" ] || { echo "unknown setting $name" >&2; exit 2; }
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    one "$name" "$seed" &
  done
done
wait
python3 "$(dirname "$0")/short_codes_table.py" "$OUT" "${SETTINGS[@]}" | tee "$OUT/results.md"
