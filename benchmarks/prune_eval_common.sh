# Shared by prune_eval_table.sh and prune_ablations.sh (sourced, not run): the evaluation settings, so
# every row of the pruning table is measured the same way, and the resumable router training.
TURBOLM=${TURBOLM:-.venv/bin/turbolm}
OUT=${OUT:-benchmarks/results_prune_eval}
LIMIT=${LIMIT:-100}         # items per task; "all" for the full sets
PPL_LIMIT=${PPL_LIMIT:-10}  # WikiText-2 articles (~110 windows of 512 tokens); "all" for the whole test set
DATA=${DATA:-../shared/data/alpaca/alpaca_5000.json}
TRAIN_OUT=${TRAIN_OUT:-runs/prune}
STEPS=${STEPS:-100}
# MMLU is left out by default: --limit counts per subject (57 x LIMIT questions), too slow on 2 CPU cores,
# and the default model is at chance on it; add it with TASKS=...,mmlu.
TASKS=${TASKS:-piqa,arc_easy,arc_challenge,winogrande,boolq,hellaswag,wikitext}
CKPT=${CKPT:-turbolm/checkpoints/ftp-smollm2-135m-s}
# WikiText-2: 512-token windows scored on their last 256 tokens (pruning serves the predictions after
# the context; see docs/results.md), the same for every method.
# EVAL_ARGS: more `turbolm eval` arguments for every run, e.g. "--device cuda --batch-size 64".
COMMON=(--tasks "$TASKS" --context-length 512 --stride 256 --json)
[ "$LIMIT" = all ] || COMMON+=(--limit "$LIMIT")
[ "$PPL_LIMIT" = all ] && PPL_LIMIT=100000  # more articles than WikiText-2's test split has
COMMON+=(--ppl-limit "$PPL_LIMIT")
read -r -a _extra <<< "${EVAL_ARGS:-}"; COMMON+=("${_extra[@]}")
mkdir -p "$OUT"

run() {  # run NAME EVAL-ARGS...: one evaluation, skipped when its JSON exists
  local name=$1; shift
  if [ -s "$OUT/$name.json" ]; then echo "== $name: done"; return; fi
  echo "== $name ($(date +%T))"
  "$TURBOLM" eval "${COMMON[@]}" --out "$OUT/$name.json" "$@" > /dev/null
}

train_router() {  # train_router DIR SPARSITY TRAIN-ARGS...: skipped when done, resumed when interrupted
  local dir=$1 sp=$2; shift 2
  [ -f "$dir/config.json" ] && return
  local resume=(); [ -d "$dir/train" ] && resume=(--resume)
  echo "== training $dir ($(date +%T))"
  "$TURBOLM" prune train --sparsity "$sp" --out "$dir" "$@" --data "$DATA" --seq-len 256 --calibration 8 \
      --steps "$STEPS" --finetune-generations 0 "${resume[@]}"
}
