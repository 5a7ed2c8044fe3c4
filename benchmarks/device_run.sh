#!/usr/bin/env bash
# Everything the MoE kernel needs from a lent H100, in one call of the device tool (each start of
# a machine costs minutes of a 15-minute budget):
#   1. the kernel tests on the GPU (compiled kernels, not the CPU interpreter): the issue's
#      T x E x k grid at small H, I, NaN-poisoned outputs, both paths, empty experts;
#   2. benchmarks/kernel_bench.py with --tune: roofs, kernel vs grouped_mm vs dense at Llama 4
#      shapes, then the launch-parameter search (TUNE_BUDGET_S seconds, default 180).
# Everything lands in $OUT. Run from the repository root:
#   bash benchmarks/device_run.sh
# A failing test does not stop the benchmark: both logs come back either way.
set -uo pipefail
: "${OUT:?set OUT to the folder that comes back}"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1  # tests/conftest.py only sets it where no GPU exists
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >>"$OUT/gpu.txt" 2>&1
timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider tests/runtime/test_kernel_triton.py \
    --junitxml="$OUT/kernel_tests_gpu.xml" 2>&1 | tee "$OUT/kernel_tests_gpu.log"
tests_rc=${PIPESTATUS[0]}
python3 benchmarks/kernel_bench.py --out "$OUT/kernel_results_h100.json" --tune \
    --tune-budget-s "${TUNE_BUDGET_S:-180}" 2>&1 | tee "$OUT/kernel_bench.log"
bench_rc=${PIPESTATUS[0]}
echo "kernel tests rc=$tests_rc, benchmark rc=$bench_rc" | tee -a "$OUT/gpu.txt"
exit $(( tests_rc != 0 || bench_rc != 0 ))
