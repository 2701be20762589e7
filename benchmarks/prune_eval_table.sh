#!/usr/bin/env bash
# The pruning evaluation table: dense, FTP (learned), FTP (static, searched schedule), random tokens,
# ShortGPT and BlockPruner at 22/30/40% work removed, on the same tasks and items, then
# `turbolm prune report`. Each run is skipped when its JSON exists (resumable).
#   bash benchmarks/prune_eval_table.sh                        # LIMIT=100 items per task
#   LIMIT=500 METHODS="dense ftp static" bash benchmarks/prune_eval_table.sh
# Methods: dense, ftp (the shipped learned pruners), static (static router, the shipped searched
# schedules), random (random tokens, uniform), mod (Mixture-of-Depths-style hidden-state router, trained
# here on the same schedule and data as FTP's router), shortgpt, blockpruner.
# Settings (LIMIT, PPL_LIMIT, TASKS, OUT, ...): benchmarks/prune_eval_common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
LEVELS=${LEVELS:-"30 22 40"}
METHODS=${METHODS:-"dense ftp static random shortgpt mod blockpruner"}
source benchmarks/prune_eval_common.sh
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
        train_router "$TRAIN_OUT/mod-s$s" "$sp" --router mod --schedule "$CKPT$s/search.json"
        run "mod-s$s" --pruner "$TRAIN_OUT/mod-s$s" ;;
      shortgpt) run "shortgpt-s$s" --baseline shortgpt --sparsity "$sp" ;;
      blockpruner) run "blockpruner-s$s" --baseline blockpruner --sparsity "$sp" ;;
    esac
  done
done
"$TURBOLM" prune report --results "$OUT"
