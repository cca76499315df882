#!/usr/bin/env bash
# The prepared device run (kernels benchmark, then the serving runner): one call on a lent GPU,
#     run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=560)
# writes gpu.txt, kernels-gpu.{json,png,log} and serving-gpu.{json,png,log} under $OUT (default bench/results), and
# exits non-zero if either benchmark failed; `python bench/kernels_report.py <kernels-gpu.json>` then prints the
# targets and every table as markdown. Both scripts rewrite their JSON after every row, so a run cut short keeps
# what it measured; kernels_gpu.py's measure_all docstring estimates each phase's share of its 390 s. The device image has its own torch and Triton (3.6 when last seen);
# tests/kernels/test_gpu_compile.py can be run against that Triton here first (PYTHONPATH=<unpacked wheel>:kernels:.).
#
# The device image has torch, transformers and safetensors but not pydantic or minio, which the serving runner
# imports (through cartridges.manifest and the store). Carry them as wheels in .whl/ (ignored by git, e.g. via
# .git/info/exclude; run(carry=[".whl"])), built for Python 3.12 (pydantic_core and cffi are cp312-only), the
# image's when last seen; the script says loudly if that changed, and if the imports fail it still runs the
# kernels benchmark:
#     python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#         pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#         typing_extensions==4.16.0 minio==7.2.20 argon2-cffi==25.1.0 argon2-cffi-bindings==26.2.0 cffi==2.1.1 pycparser==3.12 pycryptodome==4.5.0 \
#         urllib3==2.8.0 certifi==2026.10.19.post1
set -uo pipefail
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH=".:serving-image:kernels" PYTHONUNBUFFERED=1
python3 --version 2>&1 | tee "$out/gpu.txt"
if ! python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    echo "WARNING: not Python 3.12: the cp312 wheels in .whl/ will not import; serving_gpu.py will fail" |
        tee -a "$out/gpu.txt"
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
        PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee -a "$out/gpu.txt"
if ! python3 -c 'import cartridges.store, cartridges.manifest, cartridges_serving.runner' 2>&1 | tee -a "$out/gpu.txt"; then
    echo "WARNING: the serving runner's imports fail (see above): serving_gpu.py will fail; the kernels run goes on" |
        tee -a "$out/gpu.txt"
fi
timeout 390 python3 bench/kernels_gpu.py --out "$out" 2>&1 | tee "$out/kernels-gpu.log"
kernels=${PIPESTATUS[0]}
timeout 150 python3 bench/serving_gpu.py --out "$out" 2>&1 | tee "$out/serving-gpu.log"
serving=${PIPESTATUS[0]}
echo "kernels_gpu.py exit $kernels, serving_gpu.py exit $serving"
[ "$kernels" -eq 0 ] && [ "$serving" -eq 0 ]
