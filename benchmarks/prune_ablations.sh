#!/usr/bin/env bash
# FTP ablations for the pruning evaluation table (issue 7), beside benchmarks/prune_eval_table.sh's runs:
# the learned router retrained (same data, steps and held-out chunks as the shipped one)
#   - without the scheduler: a uniform schedule instead of the searched one;
#   - without one of its four input factors (position, attention, rank, sparsity), on the searched schedule.
# "Without the router fine-tune" needs no run: the shipped pruners' schedule fine-tune changed nothing
# (config.json: finetune.kl_before == kl_after), so that row equals FTP (learned).
# Every step resumes (training via --resume, evaluations skipped when their JSON exists).
#   bash benchmarks/prune_ablations.sh             # at 30%
#   LEVELS="22 30 40" ABLATIONS="uniform" bash benchmarks/prune_ablations.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TURBOLM=${TURBOLM:-.venv/bin/turbolm}
OUT=${OUT:-benchmarks/results_prune_eval}
LIMIT=${LIMIT:-100}
PPL_LIMIT=${PPL_LIMIT:-10}
LEVELS=${LEVELS:-"30"}
ABLATIONS=${ABLATIONS:-"uniform position attention rank sparsity"}
DATA=${DATA:-../shared/data/alpaca/alpaca_5000.json}
TRAIN_OUT=${TRAIN_OUT:-runs/prune}
STEPS=${STEPS:-100}
TASKS=${TASKS:-piqa,arc_easy,arc_challenge,winogrande,boolq,hellaswag,wikitext}
CKPT=${CKPT:-turbolm/checkpoints/ftp-smollm2-135m-s}
COMMON=(--tasks "$TASKS" --limit "$LIMIT" --ppl-limit "$PPL_LIMIT" --context-length 512 --stride 256 --json)
mkdir -p "$OUT"
for s in $LEVELS; do
  sp=$(python3 -c "print($s/100)")
  for a in $ABLATIONS; do
    name="ablation-$a-s$s"
    dir="$TRAIN_OUT/$name"
    if [ "$a" = uniform ]; then
      args=(); label="FTP w/o scheduler (uniform)"
    else
      args=(--schedule "$CKPT$s/search.json" --drop-factor "$a"); label="FTP w/o $a factor"
    fi
    if [ ! -f "$dir/config.json" ]; then
      resume=(); [ -d "$dir/train" ] && resume=(--resume)
      echo "== training $name ($(date +%T))"
      "$TURBOLM" prune train --sparsity "$sp" --out "$dir" "${args[@]}" --data "$DATA" --seq-len 256 \
          --calibration 8 --steps "$STEPS" --finetune-generations 0 "${resume[@]}"
    fi
    if [ -s "$OUT/$name.json" ]; then echo "== $name: evaluated"; continue; fi
    echo "== evaluating $name ($(date +%T))"
    "$TURBOLM" eval "${COMMON[@]}" --out "$OUT/$name.json" --pruner "$dir" --label "$label" > /dev/null
  done
done
"$TURBOLM" prune report --results "$OUT"
