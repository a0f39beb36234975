#!/usr/bin/env bash
# Unbounded history (issue 30), one resumable step at a time on a 2-core CPU:
#   tasks   pass-key (5 digits) and multi-key (4 keys, 7 digits) needle tasks with the held-out
#           filler and phrasings at 2k, 8k, 16k, 32k, 64k and 128k tokens (12 tasks each),
#           --cycle-filler past the held-out text's ~22k tokens (the text repeats; each task's meta
#           says so), into runs/long-streams. The template kinds, not the niah-* families: the
#           135M LM answers almost none of the families' single needles even with the whole stream
#           in view (results/families-1/dev-selectors), so exact match could not rank anything;
#   eval    sim.evaluate of every policy that can run (full context writes why it cannot past the
#           LM's 8 192 positions), faithful mode, slot positions, into
#           results/long-streams-1/wW/KIND-LEN. A stream costs ~20 s per 1k tokens at W_max 384
#           on one core (a 128k task: ~45 min), so each cell evaluates the file's first N tasks
#           (--max-tasks) and grows later with --resume and a larger N. CELLS lists the cells as
#           KIND:LEN:N[:W_MAX] (W_MAX default 384), run in order in one process chain; start two
#           chains with different CELLS to use both cores;
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
LENGTHS=${LENGTHS:-"2048 8192 16384 32768 65536 131072"}
POLICIES=${POLICIES:-lensnet,recency,sinks,retrieval,bm25,attention,full}
CELLS=${CELLS:-"passkey:2048:12 passkey:8192:8 passkey:16384:6 passkey:32768:4 passkey:65536:2
  passkey:131072:2 multikey:2048:12 multikey:8192:6 multikey:32768:2"}
mkdir -p "$D" "$R"

case ${1:-} in
  tasks)
    for len in $LENGTHS; do
      $PY -m sim.tasks --kind passkey --split heldout --n-tasks 12 --length "$len" --depths \
        --seed 30 --cycle-filler --tokenizer smollm2 --out "$D/passkey-$len.jsonl"
      $PY -m sim.tasks --kind multikey --split heldout --n-keys 4 --n-tasks 12 --length "$len" \
        --depths --seed 31 --cycle-filler --tokenizer smollm2 --out "$D/multikey-$len.jsonl"
    done
    ;;
  eval)
    for cell in $CELLS; do
      IFS=: read -r kind len n w <<< "$cell"
      w=${w:-384}
      echo "== $kind $len tokens, $n tasks, W_max $w ($(date -u +%H:%M))"
      # exit 1: a task line was skipped (named in results.json's errors)
      $PY -m sim.evaluate --resume --no-progress --policies "$POLICIES" --max-tasks "$n" \
        --tasks "$D/$kind-$len.jsonl" --out "$R/w$w/$kind-$len" --world.w-max "$w" || true
    done
    ;;
  plot)
    for kind in passkey multikey; do
      runs=()
      for len in $LENGTHS; do
        [[ -f $R/w384/$kind-$len/results.json ]] && runs+=("$R/w384/$kind-$len")
      done
      if (( ${#runs[@]} )); then  # a kind with no evaluated cell has no curve
        $PY -m analysis.plots --lengths "$R/plots/$kind-w384" "${runs[@]}"
      fi
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
