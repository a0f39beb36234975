#!/usr/bin/env bash
# Behaviour unchanged across a refactor: four documented pipelines at tiny sizes (tiny LM, chars
# tokenizer), each into its own run folder under OUT, then compared with an earlier OUT file by
# file. Run it on the commit before the change and on the commit after:
#   git worktree add /tmp/before <commit> && cp scripts/behaviour_check.sh /tmp/before/scripts/
#   (cd /tmp/before && PY=$OLDPWD/.venv/bin/python scripts/behaviour_check.sh run /tmp/a)
#   scripts/behaviour_check.sh run /tmp/b && scripts/behaviour_check.sh compare /tmp/a /tmp/b
# The runs:
#   synthetic  python -m sim.run, the small synthetic study of tests/sim/test_run.py
#   taskstudy  python -m sim.taskstudy --lm tiny: labels, training and evaluation of one study
#   pipeline   sim.tasks, sim.tasklabels (cheap and exact), sim.tasktrain and sim.evaluate --lm tiny
#   rl         python -m envs.rl, a short PPO run (the synthetic world)
# compare reports every file that differs; JSON files are compared with what a clock measured
# removed (keys ending in 'seconds', '_s', '_ms', 'time', '_per_step'; keys starting with 'speedup',
# 'cost_vs_lm_forward', 'wall', 'date', 'machine', 'versions'), every other file byte for byte
# (logs and plots aside), each run's own folder name read as OUT. Checkpoints (*.pt) are compared
# tensor by tensor.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 PYTHONHASHSEED=0

case ${1:-} in
  run)
    OUT=${2:?usage: $0 run OUT}
    OUT=$(realpath -m "$OUT")
    rm -rf "$OUT" && mkdir -p "$OUT"
    $PY -m sim.run --out "$OUT/synthetic" --train-docs 3 --eval-docs 2 --preset tiny --no-progress \
      --no-plots --world.tree.block-size 4 --world.tree.d-model 8 --world.synthetic.block-size 4 \
      --world.synthetic.d-model 8 --world.synthetic.n-blocks 40 \
      --world.synthetic.recent-window 6 --world.synthetic.n-recent 3 --world.step-tokens 4 \
      --world.horizon 8 --world.n-tail-gists 3 --world.warmup-tokens 16 --world.w-max 40 \
      --world.tail-tokens 8 --train.total-steps 40 --train.eval-every 20 \
      --train.warmup-steps 5 --train.ckpt-every 40 > "$OUT/synthetic.log" 2>&1
    $PY -m sim.taskstudy --lm tiny --out "$OUT/taskstudy" --train-tasks 2 --eval-tasks 1 \
      --train-lengths 300 --eval-lengths 300 --policies lensnet,recency,bm25,oracle \
      --world.block-size 4 --world.w-max 110 --world.tail-tokens 72 --world.step-tokens 4 \
      --train.total-steps 4 --train.eval-every 2 --train.ckpt-every 2 --train.warmup-steps 1 \
      --preset tiny --no-progress > "$OUT/taskstudy.log" 2>&1
    # tasks -> labels (cheap, exact) -> train -> evaluate, each entry point on its own
    P="$OUT/pipeline"
    mkdir -p "$P"
    W="--world.block-size 8 --world.w-max 140 --world.tail-tokens 100 --world.step-tokens 8"
    $PY -m sim.tasks --kind passkey --split train --n-tasks 8 --seed 0 --length 150 \
      --tokenizer chars --out "$P/train.jsonl" > /dev/null
    $PY -m sim.tasks --kind passkey --split train --n-tasks 4 --seed 1 --length 150 \
      --tokenizer chars --out "$P/dev.jsonl" > /dev/null
    $PY -m sim.tasklabels --lm tiny --tasks "$P/train.jsonl" --out "$P/train-traces" --covers 3 \
      --feature-set prior-lexical --query-tokens 48 --no-progress $W > "$OUT/labels.log" 2>&1
    $PY -m sim.tasklabels --lm tiny --tasks "$P/dev.jsonl" --out "$P/val-traces" --covers 2 \
      --labels exact --feature-set prior-lexical --query-tokens 48 --no-progress $W \
      > "$OUT/exact.log" 2>&1
    $PY -m sim.tasktrain --lm tiny --traces "$P/train-traces" --val-traces "$P/val-traces" \
      --cal-tasks "$P/dev.jsonl" --out "$P/lensnet" --preset tiny --train.total-steps 6 \
      --train.eval-every 3 --train.ckpt-every 3 --train.warmup-steps 1 --no-progress \
      > "$OUT/train.log" 2>&1
    $PY -m sim.evaluate --lm tiny --tasks "$P/dev.jsonl" --out "$P/eval" --lensnet \
      "$P/lensnet/lensnet.pt" --policies lensnet,recency,bm25,attention,retrieval,full \
      --no-progress $W > "$OUT/evaluate.log" 2>&1 || [[ $? == 1 ]]  # 1: a task line skipped
    $PY -m envs.rl --action scores --lr 3e-4 --total-steps 128 --n-envs 2 --rollout-steps 32 \
      --epochs 2 --eval-docs 2 --eval-every 2 --out "$OUT/rl" --no-progress > "$OUT/rl.log" 2>&1
    echo "runs in $OUT"
    ;;
  compare)
    A=${2:?usage: $0 compare A B}
    B=${3:?usage: $0 compare A B}
    $PY - "$A" "$B" <<'EOF'
import json, re, sys
from pathlib import Path

import torch

a, b = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
CLOCK = re.compile(  # what a clock measured: seconds, ms, speed-ups and costs against a forward
    r"(seconds|_s|_ms|time|ms_per_step|seconds_per_task|_s_per_\w+|_ms_at_w_max)$"
    r"|^(date|started|machine|versions|wall|speedup|cost_vs_lm_forward|reread_vs_lm_forward)"
)


def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if not CLOCK.search(k)}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x


def text_of(p):  # each run names its own folder: the same name for both
    return p.read_text().replace(str(a if p.is_relative_to(a) else b), "OUT")


def load_json(p):
    text = text_of(p)
    try:
        return strip(json.loads(text))
    except json.JSONDecodeError:  # JSON lines
        return [strip(json.loads(line)) for line in text.splitlines() if line.strip()]


def same(pa, pb):
    if pa.suffix in (".json", ".jsonl"):
        return load_json(pa) == load_json(pb)
    if pa.suffix == ".pt":
        sa, sb = torch.load(pa, weights_only=False), torch.load(pb, weights_only=False)
        return _eq(sa, sb, str(a), str(b))
    if pa.suffix in (".log", ".png"):  # logs carry timings; plots carry renderer metadata
        return True
    try:
        return text_of(pa) == text_of(pb)
    except UnicodeDecodeError:
        return pa.read_bytes() == pb.read_bytes()


def _eq(x, y, ra, rb):
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, dict):
        return (isinstance(y, dict) and x.keys() == y.keys()
                and all(_eq(x[k], y[k], ra, rb) for k in x if not CLOCK.search(str(k))))
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_eq(u, v, ra, rb) for u, v in zip(x, y))
    if isinstance(x, str) and isinstance(y, str):
        return x.replace(ra, "OUT") == y.replace(rb, "OUT")
    return x == y


fa = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
fb = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
bad = [f"only in {a}: {p}" for p in sorted(fa - fb)] + [f"only in {b}: {p}" for p in sorted(fb - fa)]
bad += [f"differs: {p}" for p in sorted(fa & fb) if not same(a / p, b / p)]
print("\n".join(bad) or f"{len(fa)} files, all the same (wall-clock fields and logs aside)")
sys.exit(1 if bad else 0)
EOF
    ;;
  *)
    echo "usage: $0 run OUT | compare A B" >&2
    exit 2
    ;;
esac
