#!/usr/bin/env bash
# Every GPU test and benchmark of the kernels (issue 9) in one go; logs under $OUT (default ./gpu_results).
#   bash benchmarks/gpu_suite.sh            # on a machine with a CUDA GPU, from the repository root
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/gpu.txt"
$PY -m pytest -q -m gpu tests/test_kernels_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
$PY benchmarks/kernels_fp8.py ${FP8_ARGS:-} 2>&1 | tee "$OUT/kernels_fp8.log"
$PY benchmarks/kernels_stc.py 2>&1 | tee "$OUT/kernels_stc.log"
$PY benchmarks/kernels_weight_only.py 2>&1 | tee "$OUT/kernels_weight_only.log"
