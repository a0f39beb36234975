#!/usr/bin/env bash
# The cross-kind task-world LensNet study (issue 18), end to end on a 2-core CPU:
#   labels: cheap-label training traces (2k and 4k train-split tasks, 2 shards) and exact-label
#           validation traces, in parallel;
#   train:  three training seeds (seed 0 shipped as the task-world default), each trained, selected
#           on the exact labels and calibrated; the ablation without the per-entry features;
#   eval:   the three seeds, the ablation and the baselines on the held-out task files of
#           results/heldout-24 (24 tasks per world, passkey 8k 8), the W_max sweep at 4k, the code
#           oracle (for NGR), into results/heldout-v2.
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

# Sized to the 2-core CPU, into results/heldout-v2 (the deterministic baselines that need no
# rerun, e.g. sinks, random, retrieval and full context at 2k, stay in results/heldout-24's runs of
# the same task files): 24 held-out tasks per world at 2k and 4k, the W_max sweep at 4k on the
# first 12, passkey 8k and the code oracle (for NGR) on the first 8; three streams on two cores.
H=results/heldout-24
V=results/heldout-v2
ev() { OMP_NUM_THREADS=1 $PY -m sim.evaluate --no-progress "$@"; }  # exit 1: a line skipped
SEEDS="--lensnets seed1=runs/task-lensnet-v2-seed1/lensnet.pt \
  seed2=runs/task-lensnet-v2-seed2/lensnet.pt nofeatures=runs/task-lensnet-v2-nofeatures/lensnet.pt"
P=lensnet,lensnet_rank,recency,bm25,attention
first() { head -"$1" $H/$2.jsonl > $V/$2-first$1.jsonl; }
mkdir -p $V

if [[ $step == eval-a || $step == eval || $step == all ]]; then
  (
    for w in passkey-2k multikey-2k code-2k; do
      ev --tasks $H/$w.jsonl --out $V/$w --policies $P $SEEDS
    done
  ) &
fi
if [[ $step == eval-b || $step == eval || $step == all ]]; then
  (
    first 12 passkey-4k
    ev --tasks $H/passkey-4k.jsonl --out $V/passkey-4k --policies $P,full $SEEDS
    ev --tasks $V/passkey-4k-first12.jsonl --out $V/passkey-4k-sweep --policies $P,full \
      --w-max-sweep 128 256 384 512
  ) &
fi
if [[ $step == eval-c || $step == eval || $step == all ]]; then
  (
    first 8 passkey-8k; first 8 code-2k
    ev --tasks $V/passkey-8k-first8.jsonl --out $V/passkey-8k --policies $P $SEEDS
    ev --tasks $V/code-2k-first8.jsonl --out $V/code-2k-oracle --policies $P,oracle $SEEDS
  ) &
fi
wait
