#!/usr/bin/env bash
# Every GPU test and benchmark in one go: the kernels' tests and benchmarks (issue 9), the generation tests,
# the bf16 prefill/decode benchmark and its breakdown (issue 6). Logs under $OUT (default ./gpu_results).
#   bash benchmarks/gpu_suite.sh            # on a machine with a CUDA GPU, from the repository root
#   PARTS="generation inference" bash benchmarks/gpu_suite.sh   # some parts only
set -uo pipefail
OUT=${OUT:-gpu_results}
PARTS=${PARTS:-"kernels generation inference breakdown"}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__,
jax.devices())" 2>&1 | tee -a "$OUT/gpu.txt"
for part in $PARTS; do
  case $part in
    kernels)
      $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
      $PY benchmarks/kernels_fp8.py ${FP8_ARGS:-} 2>&1 | tee "$OUT/kernels_fp8.log"
      $PY benchmarks/kernels_stc.py 2>&1 | tee "$OUT/kernels_stc.log"
      $PY benchmarks/kernels_weight_only.py 2>&1 | tee "$OUT/kernels_weight_only.log" ;;
    generation)  # float32 against the PyTorch reference: full-precision GPU matmuls; several processes share the GPU
      XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest $PY -m pytest -q -p no:cacheprovider \
        -n ${WORKERS:-6} tests/test_generate.py tests/test_generate_attention.py tests/test_generate_sampling.py \
        2>&1 | tee "$OUT/generation_tests.log" ;;
    inference)
      $PY benchmarks/gpu_inference.py ${INFERENCE_ARGS:-} 2>&1 | tee "$OUT/gpu_inference.log" ;;
    breakdown)
      $PY benchmarks/gpu_breakdown.py ${BREAKDOWN_ARGS:-} 2>&1 | tee "$OUT/gpu_breakdown.log" ;;
    *) echo "unknown part '$part' (expected kernels, generation, inference, breakdown)" >&2; exit 2 ;;
  esac
done
