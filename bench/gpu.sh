#!/usr/bin/env bash
# The prepared device run (kernels benchmark, then the serving runner): one call on a lent GPU,
#     run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=560)
# writes gpu.txt, kernels-gpu.{json,png,log} and serving-gpu.{json,png,log} under $OUT (default bench/results), and
# exits non-zero if either benchmark failed; `python bench/kernels_report.py <kernels-gpu.json>` then prints the
# targets and every table as markdown. The device image has its own torch and Triton (3.6 when last seen);
# tests/kernels/test_gpu_compile.py can be run against that Triton here first (PYTHONPATH=<unpacked wheel>:kernels:.).
#
# The device image has torch, transformers and safetensors but not pydantic or minio, which the serving runner
# imports (through cartridges.manifest and the store). Carry them as wheels in .whl/ (ignored by git, e.g. via
# .git/info/exclude; run(carry=[".whl"])):
#     python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#         pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#         typing_extensions==4.16.0 minio==7.2.20 argon2-cffi==25.1.0 argon2-cffi-bindings==26.2.0 cffi==2.1.1 pycparser==3.12 pycryptodome==4.5.0
set -uo pipefail
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH=".:serving-image:kernels" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
        PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$out/gpu.txt"
timeout 390 python3 bench/kernels_gpu.py --out "$out" 2>&1 | tee "$out/kernels-gpu.log"
kernels=${PIPESTATUS[0]}
timeout 150 python3 bench/serving_gpu.py --out "$out" 2>&1 | tee "$out/serving-gpu.log"
serving=${PIPESTATUS[0]}
echo "kernels_gpu.py exit $kernels, serving_gpu.py exit $serving"
[ "$kernels" -eq 0 ] && [ "$serving" -eq 0 ]
