#!/usr/bin/env bash
# The cross-kind task-world LensNet study (issue 18), end to end on a 2-core CPU:
#   labels: cheap-label training traces (2 shards) and exact-label validation traces, in parallel;
#   train:  train + select (exact labels) + calibrate, ship as the task-world default; the ablation
#           without the attention features on the same traces;
#   eval:   every policy on the held-out task files of results/heldout-24 (24 tasks per world;
#           passkey 8k and the code oracle, for NGR, on 4 tasks), the W_max sweep at 4k (8 tasks).
# Each run writes its own command.txt. Steps one at a time: $0 labels|train|eval (or eval-a, eval-b: one stream each)
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

# Sized to the 2-core CPU: passkey and multi-key 2k on 24 tasks, code 2k and passkey 4k (with the
# W_max sweep) on 12, passkey 8k and the code oracle (for NGR) on 4; two streams, one per core.
H=results/heldout-24
ev() { OMP_NUM_THREADS=1 $PY -m sim.evaluate --no-progress "$@"; }  # exit 1: a line skipped
NOF=runs/task-lensnet-seed0-nofeatures/lensnet.pt
# retrieval and surprisal read every block alone (11 s a 2k task on this CPU): multi-key only
P=lensnet,lensnet_rank,recency,sinks,random,bm25,attention,full
first() { head -"$1" $H/$2.jsonl > $H/$2-first$1.jsonl; }

if [[ $step == eval-a || $step == eval || $step == all ]]; then
  (
    first 12 code-2k
    ev --tasks $H/passkey-2k.jsonl --out $H/passkey-2k --policies $P
    ev --tasks $H/multikey-2k.jsonl --out $H/multikey-2k --policies $P,retrieval,surprisal
    ev --tasks $H/code-2k-first12.jsonl --out $H/code-2k --policies $P
    for w in passkey-2k multikey-2k; do  # the ablation reads no attention: cheap
      ev --tasks $H/$w.jsonl --out $H/$w-nofeatures --policies lensnet --lensnet $NOF
    done
  ) &
fi
if [[ $step == eval-b || $step == eval || $step == all ]]; then
  (
    first 12 passkey-4k; first 4 passkey-8k; first 4 code-2k
    ev --tasks $H/passkey-4k-first12.jsonl --out $H/passkey-4k --policies $P \
      --w-max-sweep 128 256 384 512
    ev --tasks $H/passkey-8k-first4.jsonl --out $H/passkey-8k \
      --policies lensnet,attention,bm25,recency,full
    ev --tasks $H/code-2k-first4.jsonl --out $H/code-2k-oracle \
      --policies lensnet,recency,bm25,attention,oracle,full
  ) &
fi
wait
