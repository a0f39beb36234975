#!/usr/bin/env bash
# Unbounded history (issue 30), one resumable step at a time on a 2-core CPU:
#   tasks   pass-key and multi-key (4 keys) needle tasks of the held-out families at 2k, 8k, 16k,
#           32k, 64k and 128k tokens (12 tasks each), --cycle-filler past the held-out text's ~22k
#           tokens (the text repeats; each task's meta says so), into runs/long-streams;
#   eval    sim.evaluate of every policy that can run (full context writes why it cannot past the
#           LM's 8 192 positions) at W_max 384 (and 192 up to 64k, where two levels fit), faithful
#           mode, slot positions, into results/long-streams-1/W/KIND-LEN (resumable: --resume);
#   plot    exact match against length, one curve per policy (python -m analysis.plots --lengths).
#   bench   python -m benchmarks.long_stream (seconds per 1k tokens and bytes against length).
# These are dev files (drawn from the held-out filler, read here): a final table draws a sealed split.
#
#   scripts/long_streams_study.sh tasks|eval|plot|bench
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1
D=${D:-runs/long-streams}
R=${R:-results/long-streams-1}
N=${N:-12}
LENGTHS=${LENGTHS:-"2048 8192 16384 32768 65536 131072"}
POLICIES=${POLICIES:-recency,sinks,retrieval,bm25,attention,full}
mkdir -p "$D" "$R"

case ${1:-} in
  tasks)
    for len in $LENGTHS; do
      $PY -m sim.tasks --kind niah-single --split heldout --value-type digits5 --n-tasks "$N" \
        --length "$len" --depths --seed 30 --cycle-filler --tokenizer smollm2 \
        --out "$D/passkey-$len.jsonl"
      $PY -m sim.tasks --kind niah-multikey --split heldout --n-keys 4 --n-tasks "$N" \
        --length "$len" --depths --seed 31 --cycle-filler --tokenizer smollm2 \
        --out "$D/multikey-$len.jsonl"
    done
    ;;
  eval)
    ev() {  # exit 1: a task line was skipped (named in results.json's errors)
      $PY -m sim.evaluate --resume --no-progress --policies "$POLICIES" "$@" || true
    }
    pids=()
    for kind in passkey multikey; do
      (
        for len in $LENGTHS; do
          ev --tasks "$D/$kind-$len.jsonl" --out "$R/w384/$kind-$len" --world.w-max 384
          if (( len <= 65536 )); then
            ev --tasks "$D/$kind-$len.jsonl" --out "$R/w192/$kind-$len" --world.w-max 192
          fi
        done
      ) > "$D/eval-$kind.log" 2>&1 &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    ;;
  plot)
    for kind in passkey multikey; do
      runs=()
      for len in $LENGTHS; do
        [[ -f $R/w384/$kind-$len/results.json ]] && runs+=("$R/w384/$kind-$len")
      done
      $PY -m analysis.plots --lengths "$R/plots/$kind-w384" "${runs[@]}"
    done
    ;;
  bench)
    $PY -m benchmarks.long_stream --lengths 8192 32768 131072 --w-max 384
    ;;
  *)
    echo "usage: $0 tasks|eval|plot|bench" >&2
    exit 2
    ;;
esac
