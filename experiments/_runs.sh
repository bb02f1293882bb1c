# Shared by experiments/cuhk03.sh (CPU) and experiments/cuhk03_gpu.sh (GPU); sourced, not run.
# The caller sets DATA (dataset folder), CTF (the ctfreid command, an array) and ENCODE_FLAGS (an array).

# Table 5 settings: extra `ctfreid train` flags of each ablation run.
declare -A ABLATION_FLAGS=(
  [aio_cp_sd]=""                                          # code pyramid + self-distillation (the full AiO)
  [aio_cp]="--no-self-distillation"                       # code pyramid only
  [aio_none]="--no-self-distillation --no-pyramid"        # independent heads on v0, no distillation
  [aio_sep32]="--no-self-distillation --lengths 32"       # the paper's "no CP": a separate 32-bit model
)
ONE_CODE_RUN=aio_sep32  # one code: no DTO, no CtF

encode() {  # encode RUN_DIR SUFFIX [--flip] SPLIT...: RUN_DIR/SPLIT$SUFFIX.npz
  local dir=$1 suffix=$2 split; shift 2
  local flip=(); [ "${1:-}" = "--flip" ] && { flip=(--flip); shift; }
  for split in "$@"; do
    "${CTF[@]}" encode --model "$dir" --data "$DATA" --split "$split" "${flip[@]}" \
      --out "$dir/$split$suffix.npz" "${ENCODE_FLAGS[@]}" --quiet
  done
}

evaluate() {  # evaluate RUN_DIR SUFFIX [THRESHOLDS.json]: RUN_DIR/results$SUFFIX.json, the table on stdout
  local dir=$1 suffix=$2 th=()
  [ -n "${3:-}" ] && th=(--thresholds "$3")
  "${CTF[@]}" evaluate --query "$dir/query$suffix.npz" --gallery "$dir/gallery$suffix.npz" "${th[@]}" \
    --search-k 100 --repeats 5 --json "$dir/results$suffix.json"
}
