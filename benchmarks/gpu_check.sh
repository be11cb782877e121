#!/usr/bin/env bash
# The GPU check: the whole test suite with CuPy as the default backend (tests/test_gpu.py and
# tests/test_cublas.py hold the GPU-only checks), with the CUDA fast paths on (NPGPT_FAST_CUDA=1), then the
# GPU benchmark (whose npgpt worker turns them on itself).
# Run from the repository root on a machine with a CUDA GPU, CuPy, PyTorch, pytest and hypothesis:
#     OUT=gpu-results bash benchmarks/gpu_check.sh
# Results (test logs, benchmark table and JSON) go to $OUT (default: gpu-results).
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import cupy, numpy, torch; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
NPGPT_DEVICE=gpu NPGPT_FAST_CUDA=1 timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" | tail -8
timeout "${BENCH_TIMEOUT:-400}" python3 -m benchmarks --device gpu ${BENCH_ARGS:-} --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
