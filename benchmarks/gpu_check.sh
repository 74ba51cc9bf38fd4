#!/usr/bin/env bash
# ft against the HF Trainer recipe on one GPU, with a random model of Qwen2.5-VL-3B's
# layer shapes: bf16 compute, activation checkpointing, Adafactor, FSDP (world size 1).
# Every path of the CPU table in docs/performance.md, each axis value at least once:
# padded and packed batches, fsdp1 and fsdp2, fp32 and bf16 (stochastically rounded)
# master weights, and flash-attention's varlen kernels on packed rows where the image has
# the flash-attn package (else sdpa, and env.txt says so).
#
#   benchmarks/gpu_check.sh wheels   # on a machine with PyPI: fetch into .cache/gpu-wheels
#                                    # the wheels the GPU image may lack
#   benchmarks/gpu_check.sh          # on the GPU machine (carry .cache/gpu-wheels there)
#
# Budget: about 7 minutes on an H100 (an estimate: no GPU has run it yet), model build
# included; compare.py rewrites its JSON after every run, so a cut keeps what finished.
# Results (environment, build log, compare log and JSON) go to $OUT, or runs/gpu-check.
#
# The model has 4 of the 3B's 36 decoder layers and 4 of its 32 vision blocks (full
# attention at block 3), with every layer at full size, the full 151,936-row tied
# embedding, lm_head and merger: about 0.7B parameters instead of 3.75B, so that ten
# loads and exports fit the budget. Per-layer time and memory are the 3B's; totals are
# not. Set TEXT_LAYERS / VISION_DEPTH for more.
#
# The demo photos are at most 448 px, at most 256 image tokens each: resized to
# MIN_PIXELS = MAX_PIXELS = 512 x 28 x 28 they take ~512 tokens each (two-image rows
# ~1,050, within max_length 2048), and 8 samples per step give the GPU ~4,500 tokens,
# closer to a real fine-tune than the CPU demo's ~300-token samples.
#
# A dry run of the plumbing on a CPU machine (an existing tiny model, no wheels, fp32;
# accelerate wherever it is installed):
#   PYTHON=.venv/bin/python PYTHONPATH=.cache/bench-deps WHEELS=/nonexistent \
#   MODEL=runs/bench/tiny-small STEPS=4 WARMUP=1 ROUNDS=1 BATCH=1 PRECISION=fp32 \
#   MIN_PIXELS=3136 MAX_PIXELS=200704 OUT=/tmp/gpu-check benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${WHEELS:-.cache/gpu-wheels}
if [[ "${1:-}" == wheels ]]; then
  # The 'cuda' image has torch 2.11, transformers 5.17 and accelerate 1.15 but not
  # these (python 3.12 there); pure Python, so one download serves any x86-64 machine.
  # torchvision (the one built for torch 2.11) and PyAV go to $WHEELS/ifmissing: the run
  # installs each only if the image cannot import its own (about 43 MB of the 64 MiB
  # that may travel with the checkout).
  mkdir -p "$WHEELS/ifmissing"
  download() {
    "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 "$@"
  }
  download -d "$WHEELS" datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 dashscope==2.0.2
  download -d "$WHEELS/ifmissing" torchvision==0.26.0 av==18.1.0
  exit 0
fi

PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-check}
MODEL=${MODEL:-/tmp/qwen2.5-vl-3b-shaped}
TEXT_LAYERS=${TEXT_LAYERS:-4}
VISION_DEPTH=${VISION_DEPTH:-4}
STEPS=${STEPS:-12}
WARMUP=${WARMUP:-4}
ROUNDS=${ROUNDS:-2}
BATCH=${BATCH:-8}
MIN_PIXELS=${MIN_PIXELS:-401408}
MAX_PIXELS=${MAX_PIXELS:-401408}
PRECISION=${PRECISION:-bf16}
mkdir -p "$OUT"

# datasets (ft.rows) and dashscope (the real tokenizer's vocabulary, ft.tinymodel), without
# their dependencies: the image has the rest.
wheels=()
if compgen -G "$WHEELS/*.whl" >/dev/null; then wheels+=("$WHEELS"/*.whl); fi
# torchvision and PyAV only where the image has none that imports (a torchvision built
# for another torch fails with a RuntimeError, which counts as missing too).
for module in torchvision av; do
  if ! "$PY" -c "import $module" 2>/dev/null && compgen -G "$WHEELS/ifmissing/$module-*.whl" >/dev/null; then
    wheels+=("$WHEELS"/ifmissing/"$module"-*.whl)
  fi
done
if (( ${#wheels[@]} )); then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# ft from this checkout (not installed there); launch.sh and compare use $PYTHON.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHON=$PY WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi -L || true
  "$PY" -c 'import sys, torch, torchvision, av, transformers, accelerate, datasets
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "torchvision", torchvision.__version__, "av", av.__version__,
      "transformers", transformers.__version__, "accelerate", accelerate.__version__,
      "datasets", datasets.__version__,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  "$PY" -c 'import flash_attn; print("flash-attn", flash_attn.__version__)' 2>/dev/null \
    || echo "flash-attn: not installed (packed rows run on sdpa with a block mask)"
} 2>&1 | tee "$OUT/env.txt"
# One path per line of the table: each axis value at least once (compare.py --paths).
VARLEN=sdpa
if "$PY" -c 'import flash_attn' 2>/dev/null; then VARLEN=flash_attention_2; fi
PATHS=${PATHS:-padded/fsdp1/fp32,padded/fsdp2/fp32,padded/fsdp1/bf16,packed/fsdp2/bf16/$VARLEN}

"$PY" benchmarks/build_model.py "$MODEL" --if-missing \
  --text-layers "$TEXT_LAYERS" --vision-depth "$VISION_DEPTH" 2>&1 | tee "$OUT/build.log"

# Stochastic rounding's cost on the GPU and its bits against the CPU's (seconds).
timeout 60 "$PY" benchmarks/rounding.py --repeats 3 2>&1 | tee "$OUT/rounding.log" || true

# The MoE experts kernels against the dense twin, at 30B-A3B's routing (seconds).
timeout 90 "$PY" benchmarks/moe.py --device cuda --dtype bf16 --hidden 1024 --experts 128 --top-k 8 \
  --tokens 8192 --kernels grouped_mm eager 2>&1 | tee "$OUT/moe.log" || true

# compare.py rewrites compare.json after every run: a run cut short keeps what finished.
timeout 330 "$PY" benchmarks/compare.py --model "$MODEL" --nproc 1 --precision "$PRECISION" \
  --data data/demo/train.jsonl --paths "$PATHS" \
  --steps "$STEPS" --warmup "$WARMUP" --rounds "$ROUNDS" --batch-size "$BATCH" \
  --min-pixels "$MIN_PIXELS" --max-pixels "$MAX_PIXELS" --json "$OUT/compare.json" \
  2>&1 | tee "$OUT/compare.log"
