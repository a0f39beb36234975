#!/usr/bin/env bash
# The training-free baselines on the held-out task files of results/heldout-24 (24 tasks per
# world), every one beside the attention baseline; LensNet runs separately
# (scripts/task_lensnet_study.sh eval) on the same files, with passkey 8k on 4 tasks.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
H=results/heldout-24
P=recency,sinks,random,retrieval,bm25,attention,surprisal,full
ev() { $PY -m sim.evaluate --no-progress --policies $P "$@"; }  # exit 1 = a task line skipped
(
  ev --tasks $H/passkey-2k.jsonl --out $H/passkey-2k
  ev --tasks $H/multikey-2k.jsonl --out $H/multikey-2k
  ev --tasks $H/code-2k.jsonl --out $H/code-2k
) &
(
  ev --tasks $H/passkey-4k.jsonl --out $H/passkey-4k
) &
wait
