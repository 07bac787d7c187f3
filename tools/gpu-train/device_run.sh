#!/usr/bin/env bash
# Trains the session's entropy-model candidates side by side on one GPU, each for a wall-clock
# budget, and packs the weights, records and logs under $OUT (a few tar files).
#
# Usage (repository root; data from `unimic train entropy ... --export-data`, see
# tools/gpu-train/README.md): tools/gpu-train/device_run.sh BUDGET_S DATA_DIR
set -u
BUDGET=${1:-360}
DATA=${2:-runs/gpu}
OUT=${OUT:-runs/gpu/out}
mkdir -p "$OUT/w" "$OUT/log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
T=tools/gpu-train/train_entropy.py
M=models/entropy
common="--time-budget $BUDGET --batch-size 128 --eval-every 200 --val-samples 256 --seed 1 --warmup 200"
run() { # name, then the trainer's arguments
  local name=$1; shift
  python3 $T "$@" $common --out "$OUT/w/$name.safetensors" >"$OUT/log/$name.log" 2>&1 &
}
BF="--data $DATA/bsds --data $DATA/flickr"
run generic-a --kind generic $BF --init $M/unimic-entropy-generic-v2.safetensors --lr 5e-4 --dropout 0.1 --weight-decay 0.05
run generic-b --kind generic $BF --lr 1e-3 --dropout 0.1 --weight-decay 0.05
run masked-a --kind masked $BF --init $M/unimic-entropy-masked-v2.safetensors --lr 5e-4 --dropout 0.1 --weight-decay 0.05
run masked-b --kind masked $BF --init $M/unimic-entropy-generic-v2.safetensors --lr 1e-3 --dropout 0.1 --weight-decay 0.05
run text-a --kind text --data $DATA/flickr --init $M/unimic-entropy-text-v2.safetensors --lr 3e-4 --dropout 0.2 --weight-decay 0.05
run text-b --kind text --data $DATA/flickr --init $M/unimic-entropy-generic-v2.safetensors --lr 5e-4 --dropout 0.2 --weight-decay 0.05
wait
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader || true
tail -n 3 "$OUT"/log/*.log
cd "$OUT"
for k in generic masked text; do tar cf "$k.tar" w/$k-* 2>/dev/null; done
tar cf logs.tar log
rm -rf w log
ls -la
