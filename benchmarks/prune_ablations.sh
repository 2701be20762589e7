#!/usr/bin/env bash
# FTP ablations for the pruning evaluation table (issue 7), beside benchmarks/prune_eval_table.sh's runs
# and with its settings (benchmarks/prune_eval_common.sh): the learned router retrained (same data, steps
# and held-out chunks as the shipped one)
#   - without the scheduler: a uniform schedule instead of the searched one;
#   - without one of its four input factors (position, attention, rank, sparsity), on the searched schedule.
# "Without the router fine-tune" needs no run: the shipped pruners' schedule fine-tune changed nothing
# (config.json: finetune.kl_before == kl_after), so that row equals FTP (learned).
# Every step resumes (training via --resume, evaluations skipped when their JSON exists).
#   bash benchmarks/prune_ablations.sh             # at 30%
#   LEVELS="22 30 40" ABLATIONS="uniform" bash benchmarks/prune_ablations.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LEVELS=${LEVELS:-"30"}
ABLATIONS=${ABLATIONS:-"uniform position attention rank sparsity"}
source benchmarks/prune_eval_common.sh
for s in $LEVELS; do
  sp=$(python3 -c "print($s/100)")
  for a in $ABLATIONS; do
    name="ablation-$a-s$s"
    if [ "$a" = uniform ]; then
      args=(); label="FTP w/o scheduler (uniform)"
    else
      args=(--schedule "$CKPT$s/search.json" --drop-factor "$a"); label="FTP w/o $a factor"
    fi
    train_router "$TRAIN_OUT/$name" "$sp" "${args[@]}"
    run "$name" --pruner "$TRAIN_OUT/$name" --label "$label"
  done
done
"$TURBOLM" prune report --results "$OUT"
