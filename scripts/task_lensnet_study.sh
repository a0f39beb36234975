#!/usr/bin/env bash
# The cross-kind task-world LensNet study (issue 18), end to end on a 2-core CPU:
#   labels: cheap-label training traces (2k and 4k train-split tasks, 2 shards) and exact-label
#           validation traces, in parallel;
#   train:  three training seeds (seed 0 shipped as the task-world default), each trained, selected
#           on the exact labels and calibrated; the ablation without the per-entry features;
#   eval:   every policy and the three seeds on the held-out task files of results/heldout-24
#           (24 tasks per world, passkey 8k 8), the W_max sweep at 4k; the code oracle (for NGR).
# Each run writes its own command.txt. Steps one at a time: $0 labels|train|eval (or eval-a, eval-b,
# eval-c: one stream each).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_WAIT_POLICY=PASSIVE
step=${1:-all}
T=runs/task-traces

if [[ $step == labels || $step == all ]]; then
  for i in 0 1; do  # vt tasks whose question exceeds the 32 query tokens are skipped
    OMP_NUM_THREADS=1 $PY -m sim.tasklabels --out $T/train3 --n-tasks 24 --length 2048 4096 \
      --covers 13 --shard $i/2 --no-progress &
  done
  OMP_NUM_THREADS=1 $PY -m sim.tasklabels --out $T/val-exact3 --first-task 1000 --n-tasks 7 \
    --length 1024 --covers 2 --labels exact --no-progress &
  wait
fi

if [[ $step == train || $step == all ]]; then
  train() { OMP_NUM_THREADS=1 $PY -m sim.tasktrain --traces $T/train3 --val-traces $T/val-exact3 \
    --no-progress "$@"; }
  train --out runs/task-lensnet-v2-seed0 --ship &
  train --out runs/task-lensnet-v2-seed1 --train.seed 1 &
  wait
  train --out runs/task-lensnet-v2-seed2 --train.seed 2 &
  train --out runs/task-lensnet-v2-nofeatures --no-features --no-calibrate &
  wait
  for run in task-lensnet-v2-seed0 task-lensnet-v2-seed1 task-lensnet-v2-seed2 \
    task-lensnet-v2-nofeatures; do
    mkdir -p results/$run
    cp runs/$run/{command.txt,metrics.jsonl,lensnet.json} results/$run/
  done
  cp $T/val-exact3/agreement.jsonl $T/val-exact3/cost.jsonl results/task-lensnet-v2-seed0/
fi

# Sized to the 2-core CPU: 24 held-out tasks per world at 2k and 4k, 8 at 8k, the code oracle (for
# NGR) on 8; two streams, one per core.
H=results/heldout-24
ev() { OMP_NUM_THREADS=1 $PY -m sim.evaluate --no-progress "$@"; }  # exit 1: a line skipped
SEEDS="--lensnets seed1=runs/task-lensnet-v2-seed1/lensnet.pt \
  seed2=runs/task-lensnet-v2-seed2/lensnet.pt nofeatures=runs/task-lensnet-v2-nofeatures/lensnet.pt"
P=lensnet,lensnet_rank,recency,sinks,random,bm25,attention,full
first() { head -"$1" $H/$2.jsonl > $H/$2-first$1.jsonl; }

if [[ $step == eval-a || $step == eval || $step == all ]]; then
  (
    ev --tasks $H/passkey-2k.jsonl --out $H/passkey-2k --policies $P $SEEDS
    ev --tasks $H/multikey-2k.jsonl --out $H/multikey-2k --policies $P $SEEDS
    ev --tasks $H/code-2k.jsonl --out $H/code-2k --policies $P $SEEDS
  ) &
fi
if [[ $step == eval-b || $step == eval || $step == all ]]; then
  (
    ev --tasks $H/passkey-4k.jsonl --out $H/passkey-4k --policies $P $SEEDS \
      --w-max-sweep 128 256 384 512
  ) &
fi
if [[ $step == eval-c || $step == eval || $step == all ]]; then
  (
    first 8 passkey-8k; first 8 code-2k
    ev --tasks $H/passkey-8k-first8.jsonl --out $H/passkey-8k \
      --policies lensnet,lensnet_rank,attention,bm25,recency,full $SEEDS
    ev --tasks $H/code-2k-first8.jsonl --out $H/code-2k-oracle \
      --policies lensnet,lensnet_rank,recency,bm25,attention,oracle $SEEDS
  ) &
fi
wait
