#!/usr/bin/env bash
# The generalizing LensNet study (issue 29) on a 2-core CPU, one step at a time; every step resumes
# where it stopped (task files are redrawn identically, traces resume per task, evaluations with
# --resume):
#   tasks   the task files (runs/families): five needle families and code continuation, each as
#           its own file per split, kinds interleaved line by line into one file per use:
#             train.jsonl     train split, 64 tasks per kind at 2048 / 4096 tokens (labels)
#             dev-exact.jsonl dev split, 5 per kind at 1024 tokens (exact labels: >= 100 snapshots)
#             dev-cal.jsonl   dev split, 4 per kind at 2048 (calibration of each seed)
#             dev-eval.jsonl  dev split, 8 per kind at 2048 (selection of the shipped seed)
#           their sha256 go to results/families-1/TASKS.json;
#   labels  cheap-label training traces with the 'prior-lexical' features, 13 covers a task, two
#           shards in parallel (about 5 000 snapshots);
#   exact   exact labels of the dev-exact snapshots: the validation traces, and the cheap labels'
#           agreement with them (agreement.jsonl: top-1, top-3, Spearman per snapshot and kind);
#   train   three training seeds (the BM25 prior on), each calibrated on dev-cal;
#   dev     sim.evaluate of the three seeds beside every training-free selector on dev-eval;
#   status  how far each step has come.
# The kinds: niah-single, niah-single with 3 decoys, niah-multikey (4 keys), niah-multivalue
# (3 values), niah-multiquery (2 of 4 keys asked), code. Questions of up to 48 tokens are read
# whole (--query-tokens 48). No step reads the test split (heldout); the sealed test split is drawn
# and opened after the shipped seed is chosen on dev (scripts/sealed_test.sh).
#
#   scripts/lensnet_families_study.sh tasks|labels|exact|train|dev|status
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1
D=${D:-runs/families}
R=${R:-results/families-1}
TOK=${TOK:-smollm2}
SCALE=${SCALE:-1}  # tests: SCALE=0 draws 1 task per kind (tiny LM, chars tokenizer)
Q=48
mkdir -p "$D" "$R"

n() { if [[ $SCALE == 0 ]]; then echo 1; else echo "$1"; fi; }
pids=()
wait_all() {  # wait for every background job; fail if any failed (a bare `wait` never does)
  local failed=0
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  pids=()
  return $failed
}

draw() {  # draw NAME SPLIT N SEED LENGTHS...: one file per kind, interleaved into D/NAME.jsonl
  local name=$1 split=$2 count=$3 seed=$4
  shift 4
  local files=()
  for spec in niah-single niah-single:3 niah-multikey niah-multivalue niah-multiquery code; do
    local kind=${spec%%:*} decoys=0 lead=() f
    [[ $spec == *:* ]] && decoys=${spec##*:}
    # echo leads where one value is asked (the LM copies after the needle's own link words:
    # results/families-1/dev-echo); multi-value and multi-query ask several at once
    [[ $kind == niah-single || $kind == niah-multikey ]] && lead=(--lead echo)
    f="$D/parts/$name-$kind-d$decoys.jsonl"
    mkdir -p "$D/parts"
    # the decoy variant draws from its own seed: other tasks (and ids) than the plain one
    $PY -m sim.tasks --kind "$kind" --split "$split" --n-tasks "$(n "$count")" \
      --seed $((seed + 100 * (decoys > 0))) \
      --length "$@" --depths --decoys "$decoys" "${lead[@]}" --tokenizer "$TOK" --out "$f" \
      > /dev/null
    files+=("$f")
  done
  paste -d '\n' "${files[@]}" > "$D/$name.jsonl"
}

case ${1:-} in
  tasks)
    draw train train 64 0 2048 4096
    draw dev-exact dev 5 0 1024
    draw dev-cal dev 4 1 2048
    draw dev-eval dev 8 2 2048
    $PY - "$D" "$R/TASKS.json" <<'EOF'
import hashlib, json, sys
from pathlib import Path
d, out = Path(sys.argv[1]), Path(sys.argv[2])
files = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                  "tasks": sum(1 for _ in p.open())} for p in sorted(d.glob("*.jsonl"))}
out.write_text(json.dumps({"command": "scripts/lensnet_families_study.sh tasks",
                           "files": files}, indent=1) + "\n")
print(json.dumps(files, indent=1))
EOF
    ;;
  labels)
    for i in 0 1; do
      $PY -m sim.tasklabels --tasks "$D/train.jsonl" --out "$D/train-traces" --covers 13 \
        --feature-set prior-lexical --query-tokens $Q --shard $i/2 --no-progress \
        ${LM:+--lm $LM} ${WORLD:-} > "$D/labels-$i.log" 2>&1 &
      pids+=($!)
    done
    wait_all
    ;;
  exact)
    for i in 0 1; do
      $PY -m sim.tasklabels --tasks "$D/dev-exact.jsonl" --out "$D/dev-exact-traces" --covers 4 \
        --labels exact --feature-set prior-lexical --query-tokens $Q --shard $i/2 --no-progress \
        ${LM:+--lm $LM} ${WORLD:-} > "$D/exact-$i.log" 2>&1 &
      pids+=($!)
    done
    wait_all
    ;;
  train)
    train() {
      $PY -m sim.tasktrain --traces "$D/train-traces" --val-traces "$D/dev-exact-traces" \
        --cal-tasks "$D/dev-cal.jsonl" --no-progress ${LM:+--lm $LM} ${TRAIN:-} "$@"
    }
    train --out "$D/lensnet-seed0" --train.seed 0 > "$D/train-0.log" 2>&1 &
    pids+=($!)
    train --out "$D/lensnet-seed1" --train.seed 1 > "$D/train-1.log" 2>&1 &
    pids+=($!)
    wait_all
    train --out "$D/lensnet-seed2" --train.seed 2 > "$D/train-2.log" 2>&1
    for s in 0 1 2; do
      mkdir -p "$R/lensnet-seed$s"
      cp "$D/lensnet-seed$s/"{command.txt,metrics.jsonl,lensnet.json} "$R/lensnet-seed$s/"
    done
    ;;
  dev)
    # exit 1 means a task line was skipped (named in results.json's errors): keep going
    ev() { $PY -m sim.evaluate --resume --no-progress ${LM:+--lm $LM} ${WORLD:-} "$@" || true; }
    seeds="seed1=$D/lensnet-seed1/lensnet.pt seed2=$D/lensnet-seed2/lensnet.pt"
    # recency and full in both runs: each run's NGR against full context pairs rows of one run
    ev --tasks "$D/dev-eval.jsonl" --out "$R/dev-lensnet" --policies lensnet,recency,full \
      --lensnet "$D/lensnet-seed0/lensnet.pt" --lensnets $seeds > "$D/dev-a.log" 2>&1 &
    ev --tasks "$D/dev-eval.jsonl" --out "$R/dev-selectors" \
      --policies recency,sinks,random,retrieval,bm25,attention,surprisal,full \
      > "$D/dev-b.log" 2>&1 &
    wait
    ;;
  status)
    # how far each step has come (every step resumes: rerun it to go on)
    $PY - "$D" "$R" <<'EOF'
import json, sys
from pathlib import Path
d, r = Path(sys.argv[1]), Path(sys.argv[2])
def tasks(name):
    f = d / name
    return sum(1 for _ in f.open()) if f.exists() else None
def labelled(traces):  # tasks read (a cost row each), snapshots in complete shards
    parts = sorted(Path(traces).glob("part-*")) if Path(traces).exists() else []
    rows = sum(sum(1 for _ in (p / "cost.jsonl").open())
               for p in parts if (p / "cost.jsonl").exists())
    snaps = sum(len(json.loads((p / "manifest.json").read_text()).get("shards", []))
                for p in parts if (p / "manifest.json").exists())
    return rows, snaps
print(f"tasks  train {tasks('train.jsonl')}, dev-exact {tasks('dev-exact.jsonl')}, "
      f"dev-cal {tasks('dev-cal.jsonl')}, dev-eval {tasks('dev-eval.jsonl')}")
for step, traces, total in (("labels", d / "train-traces", tasks("train.jsonl")),
                            ("exact", d / "dev-exact-traces", tasks("dev-exact.jsonl"))):
    rows, shards = labelled(traces)
    print(f"{step:6s} {rows} of {total} tasks read, {shards} complete shard files")
for s in (0, 1, 2):
    done = (d / f"lensnet-seed{s}" / "lensnet.json").exists()
    print(f"train  seed {s}: {'done' if done else 'not yet'}")
for run in ("dev-lensnet", "dev-selectors"):
    f = r / run / "tasks.jsonl"
    ids = {json.loads(x)["id"] for x in f.open()} if f.exists() else set()
    print(f"dev    {run}: {len(ids)} of {tasks('dev-eval.jsonl')} tasks")
EOF
    ;;
  *)
    echo "usage: $0 tasks|labels|exact|train|dev|status" >&2
    exit 2
    ;;
esac
