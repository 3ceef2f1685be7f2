#!/usr/bin/env bash
# Every GPU check of the project in one go (one CUDA device; about 4-6 minutes on an H200). Not run in CI.
#
#   bash eval/gpu_check.sh [OUT_DIR]          (default: outputs/gpu_check)
#
# 1. eval/gpu_check_sampling.py: the family pipelines against Diffusers' on CUDA (float32, bfloat16) and the shipped
#    teacher on CUDA against the CPU recording.
# 2. eval/bench_sampling.py --device cuda: the sampling overhead of each pipeline against Diffusers' on the GPU
#    (float32 at the medium and large sizes, bfloat16 at the large size), and APG against CFG.
# 3. eval/gpu_check_training.sh: bf16 training on CUDA, FSDP2 with world size 1 (checkpoint and resume), f-distill
#    under FSDP2.
# Each part writes under OUT_DIR; the script stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu_check}
PY=${PYTHON:-python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" \
  | tee -a "$OUT/gpu.txt"

t0=$(date +%s)
$PY eval/gpu_check_sampling.py --out "$OUT/gpu_check_sampling.json"
echo "sampling checks: $(( $(date +%s) - t0 )) s"

t0=$(date +%s)
$PY eval/bench_sampling.py --device cuda --sections ddim sdxl sd3 dit apg --sizes medium large --repeats 15 \
  --out "$OUT/bench_sampling_cuda_fp32.json" > "$OUT/bench_sampling_cuda_fp32.md"
$PY eval/bench_sampling.py --device cuda --dtype bfloat16 --sections sdxl sd3 dit --sizes large --repeats 15 \
  --out "$OUT/bench_sampling_cuda_bf16.json" > "$OUT/bench_sampling_cuda_bf16.md"
cat "$OUT"/bench_sampling_cuda_*.md
echo "sampling benchmark: $(( $(date +%s) - t0 )) s"

t0=$(date +%s)
bash eval/gpu_check_training.sh "$OUT/training"
echo "training checks: $(( $(date +%s) - t0 )) s"
