#!/usr/bin/env bash
# The prepared device run (kernels benchmark, then the serving runner): one call on a lent GPU,
#     run(command="bash bench/gpu.sh", timeout_s=560)
# writes gpu.txt, kernels-gpu.{json,png,log} and serving-gpu.{json,log} under $OUT (default bench/results), and
# exits non-zero if either benchmark failed. The device image has its own torch and Triton (3.6 when last seen);
# tests/kernels/test_gpu_compile.py can be run against that Triton here first (PYTHONPATH=<unpacked wheel>:kernels:.).
set -uo pipefail
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH=".:serving-image:kernels" PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$out/gpu.txt"
timeout 420 python3 bench/kernels_gpu.py --out "$out" 2>&1 | tee "$out/kernels-gpu.log"
kernels=${PIPESTATUS[0]}
timeout 110 python3 bench/serving_gpu.py --out "$out" 2>&1 | tee "$out/serving-gpu.log"
serving=${PIPESTATUS[0]}
echo "kernels_gpu.py exit $kernels, serving_gpu.py exit $serving"
[ "$kernels" -eq 0 ] && [ "$serving" -eq 0 ]
