#!/usr/bin/env bash
# The cross-kind task-world LensNet study (issue 18), end to end on a 2-core CPU:
#   labels: cheap-label training traces (2 shards) and exact-label validation traces, in parallel;
#   train:  train + select (exact labels) + calibrate, ship as the task-world default; the ablation
#           without the attention features on the same traces;
#   eval:   LensNet on the held-out task files of results/heldout-24 (the baselines:
#           scripts/heldout_baselines.sh), the oracle on 8 code tasks (NGR), the W_max sweep at 4k.
# Each run writes its own command.txt. Steps one at a time: $0 labels|train|eval
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_WAIT_POLICY=PASSIVE
step=${1:-all}
T=runs/task-traces

if [[ $step == labels || $step == all ]]; then
  for i in 0 1; do
    # (the committed run labelled tasks 0-19 of each kind in these two shards, then 20-23 in two
    # more parts: the same tasks and covers; vt tasks whose question exceeds 32 tokens are skipped)
    OMP_NUM_THREADS=1 $PY -m sim.tasklabels --out $T/train2 --n-tasks 24 --length 2048 \
      --covers 13 --shard $i/2 --no-progress &
  done
  OMP_NUM_THREADS=1 $PY -m sim.tasklabels --out $T/val-exact2 --first-task 1000 --n-tasks 7 \
    --length 1024 --covers 2 --labels exact --no-progress &
  wait
fi

if [[ $step == train || $step == all ]]; then
  train() { $PY -m sim.tasktrain --traces $T/train2 --val-traces $T/val-exact2 --no-progress "$@"; }
  train --out runs/task-lensnet-seed0 --ship &
  OMP_NUM_THREADS=1 train --out runs/task-lensnet-seed0-nofeatures --no-features &
  wait
  for run in task-lensnet-seed0 task-lensnet-seed0-nofeatures; do
    mkdir -p results/$run
    cp runs/$run/{command.txt,metrics.jsonl,lensnet.json} results/$run/
  done
  cp $T/val-exact2/agreement.jsonl $T/val-exact2/cost.jsonl results/task-lensnet-seed0/
fi

if [[ $step == eval || $step == all ]]; then
  H=results/heldout-24
  ev() { $PY -m sim.evaluate --no-progress "$@"; }  # exit 1 = some task line skipped
  NOF=runs/task-lensnet-seed0-nofeatures/lensnet.pt
  (
    for w in passkey-2k multikey-2k code-2k; do
      ev --tasks $H/$w.jsonl --out $H/$w-lensnet --policies lensnet,lensnet_rank
      ev --tasks $H/$w.jsonl --out $H/$w-lensnet-nofeatures --policies lensnet --lensnet $NOF
    done
    head -4 $H/code-2k.jsonl > $H/code-2k-first4.jsonl  # NGR needs the oracle: ~2 min a task
    ev --tasks $H/code-2k-first4.jsonl --out $H/code-2k-oracle \
      --policies lensnet,recency,bm25,attention,oracle,full
  ) &
  (
    ev --tasks $H/passkey-4k.jsonl --out $H/passkey-4k-lensnet --policies lensnet,lensnet_rank
    head -4 $H/passkey-8k.jsonl > $H/passkey-8k-first4.jsonl  # 42:1, a few tasks only
    ev --tasks $H/passkey-8k-first4.jsonl --out $H/passkey-8k-first4 \
      --policies lensnet,attention,bm25,recency,full
    head -8 $H/passkey-4k.jsonl > $H/passkey-4k-first8.jsonl
    ev --tasks $H/passkey-4k-first8.jsonl --out $H/passkey-4k-sweep \
      --policies lensnet,attention,bm25,recency,full --w-max-sweep 128 256 384 512
  ) &
  wait
fi
