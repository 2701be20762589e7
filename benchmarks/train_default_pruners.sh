#!/usr/bin/env bash
# The recipe behind the shipped FTP pruners (turbolm/checkpoints/ftp-smollm2-135m-sNN):
# for each target sparsity, a schedule search with the static router, router training on
# Alpaca chunks, a short schedule fine-tune with the trained router. Every step resumes.
# Levels in HAND skip the search and its fine-tune: their schedule is the hand-made one in
# benchmarks/schedules/sNN-layer0-dense.json (layer 0 dense, the rest uniform), which beats the
# searched one on the full evaluation sets at 30% (docs/results.md).
#   bash benchmarks/train_default_pruners.sh            # 0.22, 0.30, 0.40 on the default model
#   LEVELS="0.30" STEPS=300 bash benchmarks/train_default_pruners.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TURBOLM=${TURBOLM:-.venv/bin/turbolm}
DATA=${DATA:-../shared/data/alpaca/alpaca_5000.json}
WORK=${WORK:-runs/prune}
LEVELS=${LEVELS:-"0.22 0.30 0.40"}
STEPS=${STEPS:-100}
GENERATIONS=${GENERATIONS:-8}
POPULATION=${POPULATION:-10}
SHIP=${SHIP:-1}
HAND=${HAND:-"0.30"}
COMMON=(--data "$DATA" --seq-len 256 --calibration 8 ${MODEL:+--model "$MODEL"})
mkdir -p "$WORK"
for s in $LEVELS; do
  pct=$(python3 -c "print(f'{round($s*100):02d}')")
  out="$WORK/ftp-s$pct"
  hand=0; [[ " $HAND " == *" $s "* ]] && hand=1
  if [ "$hand" = 1 ]; then
    search=benchmarks/schedules/s$pct-layer0-dense.json
    finetune=0
    echo "== sparsity $s: the hand schedule $search"
  else
    search="$WORK/search-s$pct.json"
    finetune=${FINETUNE_GENERATIONS:-3}
    resume=(); [ -f "$search" ] && resume=(--resume)
    echo "== sparsity $s: schedule search ($(date +%T))"
    "$TURBOLM" prune search --sparsity "$s" --out "$search" --population "$POPULATION" \
        --generations "$GENERATIONS" "${COMMON[@]}" "${resume[@]}"
  fi
  resume=(); [ -d "$out/train" ] && resume=(--resume)
  echo "== sparsity $s: router training + schedule fine-tune ($(date +%T))"
  "$TURBOLM" prune train --sparsity "$s" --schedule "$search" --out "$out" --steps "$STEPS" \
      --population "$POPULATION" --finetune-generations "$finetune" "${COMMON[@]}" "${resume[@]}"
  if [ "$SHIP" = 1 ]; then
    dest=turbolm/checkpoints/ftp-smollm2-135m-s$pct
    mkdir -p "$dest"
    cp "$out/config.json" "$out/router.safetensors" "$dest/"
    rm -f "$dest/search.json"  # a hand level has no search; its config.json holds the schedule and names the file
    [ "$hand" = 1 ] || cp "$search" "$dest/search.json"
    cp "$out/train/train_log.jsonl" "$dest/train_log.jsonl"
  fi
  echo "== sparsity $s: done ($(date +%T))"
done
