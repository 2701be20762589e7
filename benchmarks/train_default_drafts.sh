#!/usr/bin/env bash
# Drafts for the default model from the target's own answers: the target writes its greedy
# answers to the first 2,560 Alpaca instructions (--regenerate), the final-norm features are
# stored, a Jakiro and an EAGLE-2 draft are trained on the same features with the same budget
# (2 epochs), and their acceptance statistics are measured for --tree auto. This is the
# regenerated-data experiment in docs/speculative.md (same Spec-Bench tau as the shipped drafts, which
# come from the dataset's own answers: the "Training pipeline" commands there).
# Resumable: rerun the same command after an interruption. fp16 copies land in
# $WORK/ship/{jakiro,eagle2}.
#
# The regeneration is the expensive part on a CPU (batched greedy generation of ~2,560 answers
# of up to 256 tokens: hours on 2 cores); on a GPU it takes minutes (an H200 answered all
# 5,000 instructions in 2 min 19 s). The numbers in docs/speculative.md were made that way: answers
# regenerated on an H200, token ids exported (turbolm.speculative.draft.data.export_tokens),
# features (`turbolm draft prepare --from-tokens`, 23 min) and training on the 2-core CPU.
#
#   bash benchmarks/train_default_drafts.sh                                  # CPU only
#   DEVICE=cuda PREP_BATCH=640 SHARD_SIZE=1280 PARALLEL=1 bash benchmarks/train_default_drafts.sh   # GPU
set -euo pipefail
PY=${PYTHON:-python}
TARGET=${TARGET:-}                # model source; empty = the default SmolLM2-135M-Instruct
DATA=${DATA:-../shared/data/alpaca/alpaca_5000.json}
WORK=${WORK:-runs/default-drafts}
DEVICE=${DEVICE:-cpu}             # where the target runs while preparing (training: accelerate's choice)
MAX_SAMPLES=${MAX_SAMPLES:-2560}
MAX_LENGTH=${MAX_LENGTH:-512}
PREP_BATCH=${PREP_BATCH:-8}
SHARD_SIZE=${SHARD_SIZE:-256}      # rows per shard (and per generation round)
EPOCHS=${EPOCHS:-2}
BATCH=${BATCH:-8}
LR=${LR:-1e-3}
VOCAB=${VOCAB:-8192}
PARALLEL=${PARALLEL:-0}           # 1: train both drafts at once (a GPU has room for both)
target_flag=()
[ -n "$TARGET" ] && target_flag=(--target "$TARGET")

echo "== $(date -u +%FT%TZ) prepare: $DATA -> $WORK/prep (regenerate, $MAX_SAMPLES samples, device $DEVICE)"
$PY -m turbolm draft prepare "${target_flag[@]}" --data "$DATA" --out "$WORK/prep" --regenerate \
    --max-samples "$MAX_SAMPLES" --max-length "$MAX_LENGTH" --batch-size "$PREP_BATCH" --shard-size "$SHARD_SIZE" --device "$DEVICE"

train() {  # name, extra flags...
    local name=$1; shift
    local out="$WORK/$name" resume=()
    if [ -f "$out/model.safetensors" ]; then echo "== $name already trained"; return; fi
    [ -f "$out/latest.json" ] && resume=(--resume)
    echo "== $(date -u +%FT%TZ) train $name -> $out"
    $PY -m turbolm draft train "${target_flag[@]}" --data "$WORK/prep" --out "$out" "${resume[@]}" "$@" \
        --draft-vocab-size "$VOCAB" --epochs "$EPOCHS" --batch-size "$BATCH" --lr "$LR" --warmup-steps 100 \
        --eval-samples 64 --save-every 200 > "$WORK/$name.log" 2>&1
    echo "== $(date -u +%FT%TZ) $name done: $(tail -c 300 "$WORK/$name.log" | tr '\r' '\n' | tail -1)"
}
mkdir -p "$WORK"
if [ "$PARALLEL" = 1 ]; then
    train jakiro --arch jakiro --candidate-mode decoupled & j=$!
    train eagle2 --arch eagle2 & e=$!
    wait $j; wait $e
else
    train jakiro --arch jakiro --candidate-mode decoupled
    train eagle2 --arch eagle2
fi

echo "== fp16 copies to ship -> $WORK/ship"
$PY - "$WORK" <<'PY'
import sys, torch
from pathlib import Path
from turbolm.speculative.draft.model import load_draft
work = Path(sys.argv[1])
for name in ("jakiro", "eagle2"):
    load_draft(work / name).save(work / "ship" / name, dtype=torch.float16)
    print(work / "ship" / name)
PY

echo "== $(date -u +%FT%TZ) acceptance statistics for --tree auto (greedy, built-in prompts)"
for name in jakiro eagle2; do
    $PY -m turbolm draft calibrate "${target_flag[@]}" --draft "$WORK/ship/$name" --device "$DEVICE"
done
