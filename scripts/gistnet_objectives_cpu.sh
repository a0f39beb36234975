#!/usr/bin/env bash
# CPU comparison of GistNet objectives at a fixed, tiny step count (far below a real GPU training budget):
# both runs start from the shipped checkpoint, same seed, same batches.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON="--init gistnet/checkpoints/gistnet-smollm2.safetensors --train.total-steps 12 --train.warmup-steps 2 --train.eval-every 12 --train.ckpt-every 1000 --train.batch-size 4 --horizons 32 --no-tail-steps 0 --p-no-tail 0.25 --p-l2 0 --val-windows 12 --train.device cpu --no-progress"
for name in baseline kl_contrast; do
  extra=""
  [[ $name == kl_contrast ]] && extra="--objective.kl-weight 1 --objective.contrast-weight 1 --objective.contrast-margin 0.1"
  echo "== $name $(date +%T)"
  .venv/bin/python -m gistnet.train --out runs/gistnet-obj-$name --export runs/gistnet-obj-$name/gistnet.safetensors $COMMON $extra 2>&1 | grep -v "Warn\|^\s*$" | tail -40
  echo "== done $name $(date +%T)"
done
