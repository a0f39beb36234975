#!/usr/bin/env bash
# The cross-kind task-world LensNet study (issue 18), end to end on a 2-core CPU:
#   1. cheap-label training traces and exact-label validation traces (in parallel),
#   2. train + select + calibrate, ship as the task-world default,
#   3. held-out evaluation, 24 tasks per world, every policy beside the attention baseline, and the
#      W_max sweep at 4k.
# Each step writes its own command.txt; results land in results/heldout-24/. Steps can be run one
# at a time: ./scripts/task_lensnet_study.sh labels|train|eval
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_WAIT_POLICY=PASSIVE
step=${1:-all}

if [[ $step == labels || $step == all ]]; then
  OMP_NUM_THREADS=1 $PY -m sim.tasklabels --out runs/task-traces/train --n-tasks 24 \
    --length 2048 2048 4096 --covers 11 --no-progress &
  OMP_NUM_THREADS=1 $PY -m sim.tasklabels --out runs/task-traces/val-exact --first-task 1000 \
    --n-tasks 7 --length 1024 --covers 2 --labels exact --no-progress &
  wait
fi

if [[ $step == train || $step == all ]]; then
  $PY -m sim.tasktrain --traces runs/task-traces/train --val-traces runs/task-traces/val-exact \
    --out runs/task-lensnet-seed0 --no-progress --ship
  mkdir -p results/task-lensnet-seed0
  cp runs/task-lensnet-seed0/{command.txt,metrics.jsonl,lensnet.json} results/task-lensnet-seed0/
  cp runs/task-traces/val-exact/agreement.jsonl runs/task-traces/train/cost.jsonl \
    results/task-lensnet-seed0/
fi

if [[ $step == eval || $step == all ]]; then
  H=results/heldout-24
  ev() { $PY -m sim.evaluate --no-progress "$@" || true; }  # exit 1 = some task line skipped
  (
    ev --tasks $H/passkey-2k.jsonl --out $H/passkey-2k
    ev --tasks $H/multikey-2k.jsonl --out $H/multikey-2k
    ev --tasks $H/code-2k.jsonl --out $H/code-2k
    head -8 $H/code-2k.jsonl > $H/code-2k-first8.jsonl  # NGR needs the oracle: ~2 min a task
    ev --tasks $H/code-2k-first8.jsonl --out $H/code-2k-oracle \
      --policies lensnet,recency,retrieval,bm25,attention,oracle,full
  ) &
  (
    ev --tasks $H/passkey-4k.jsonl --out $H/passkey-4k --w-max-sweep 128 256 384 512
    ev --tasks $H/passkey-8k.jsonl --out $H/passkey-8k
  ) &
  wait
fi
