#!/usr/bin/env bash
# The pruning evaluation table: dense, FTP (learned), FTP (static, searched schedule), random tokens,
# ShortGPT and BlockPruner at 22/30/40% work removed, on the same tasks and items, then
# `turbolm prune report`. Each run is skipped when its JSON exists (resumable).
#   bash benchmarks/prune_eval_table.sh                        # LIMIT=100 items per task
#   LIMIT=500 METHODS="dense ftp static" bash benchmarks/prune_eval_table.sh
# Methods: dense, ftp (the shipped learned pruners), static (static router, the shipped searched
# schedules), random (random tokens, uniform), mod (Mixture-of-Depths-style hidden-state router, trained
# here on the same schedule and data as FTP's router), shortgpt, blockpruner.
set -euo pipefail
cd "$(dirname "$0")/.."
TURBOLM=${TURBOLM:-.venv/bin/turbolm}
OUT=${OUT:-benchmarks/results_prune_eval}
LIMIT=${LIMIT:-100}
PPL_LIMIT=${PPL_LIMIT:-10}  # WikiText-2 articles (~110 windows of 512 tokens)
LEVELS=${LEVELS:-"30 22 40"}
METHODS=${METHODS:-"dense ftp static random shortgpt mod blockpruner"}
DATA=${DATA:-../shared/data/alpaca/alpaca_5000.json}
TRAIN_OUT=${TRAIN_OUT:-runs/prune}
# MMLU is left out by default: --limit counts per subject (57 x LIMIT questions), too slow on 2 CPU cores,
# and the default model is at chance on it; add it with TASKS=...,mmlu.
TASKS=${TASKS:-piqa,arc_easy,arc_challenge,winogrande,boolq,hellaswag,wikitext}
CKPT=${CKPT:-turbolm/checkpoints/ftp-smollm2-135m-s}
# WikiText-2: 512-token windows scored on their last 256 tokens (pruning serves the predictions after
# the context; see the README), the same for every method.
COMMON=(--tasks "$TASKS" --limit "$LIMIT" --ppl-limit "$PPL_LIMIT" --context-length 512 --stride 256 --json)
mkdir -p "$OUT"
run() {  # run NAME ARGS...
  local name=$1; shift
  if [ -s "$OUT/$name.json" ]; then echo "== $name: done"; return; fi
  echo "== $name ($(date +%T))"
  "$TURBOLM" eval "${COMMON[@]}" --out "$OUT/$name.json" "$@" > /dev/null
}
case " $METHODS " in *" dense "*) run dense ;; esac
for s in $LEVELS; do  # every method at the first level first: the comparison at 30% comes early
  for m in $METHODS; do
    [ "$m" = dense ] && continue
    sp=$(python3 -c "print($s/100)")
    case $m in
      ftp) run "ftp-s$s" --pruner "$CKPT$s" ;;
      static) run "static-s$s" --baseline static --schedule "$CKPT$s/search.json" ;;
      random) run "random-s$s" --baseline random --sparsity "$sp" ;;
      mod)
        mod="$TRAIN_OUT/mod-s$s"
        if [ ! -f "$mod/config.json" ]; then
          resume=(); [ -d "$mod/train" ] && resume=(--resume)
          echo "== training the MoD-style router for $s% ($(date +%T))"
          "$TURBOLM" prune train --router mod --sparsity "$sp" --schedule "$CKPT$s/search.json" --out "$mod" \
              --data "$DATA" --seq-len 256 --calibration 8 --steps 100 --finetune-generations 0 "${resume[@]}"
        fi
        run "mod-s$s" --pruner "$mod" ;;
      shortgpt) run "shortgpt-s$s" --baseline shortgpt --sparsity "$sp" ;;
      blockpruner) run "blockpruner-s$s" --baseline blockpruner --sparsity "$sp" ;;
    esac
  done
done
"$TURBOLM" prune report --results "$OUT"
