#!/usr/bin/env bash
# Nsight Compute on one layer's decode launches (one shared 2048-token cartridge, 128 own tokens per request,
# at batch 64: the fused kernel and its merge, then the multi-launch path's partials and merge), to see where
# the cartridge walk's time goes (occupancy, warp stall reasons, memory throughput). A second device call
# after bench/gpu.sh, if the budget allows:
#     run(command="bash bench/ncu_gpu.sh", timeout_s=240)
# writes ncu-decode.csv (one row per kernel and metric) and ncu-decode.log under $OUT (default bench/results);
# exits 3 where the machine has no ncu, non-zero where the GPU refuses its counters.
set -uo pipefail
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH=".:serving-image:kernels" PYTHONUNBUFFERED=1
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -z "$ncu" ]; then
    echo "no ncu on this machine" | tee "$out/ncu-decode.log"
    exit 3
fi
sections=(--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
    --section MemoryWorkloadAnalysis --section SchedulerStats)
timeout 200 "$ncu" --kernel-name regex:'_fused_decode_kernel|_segment_partials_kernel|_merge_kernel' \
    --launch-count 5 "${sections[@]}" --csv --page details \
    python3 bench/kernels_gpu.py --one-step 64 >"$out/ncu-decode.csv" 2>"$out/ncu-decode.log"
status=$?
tail -5 "$out/ncu-decode.log"
echo "ncu exit $status: $(wc -l <"$out/ncu-decode.csv") lines in $out/ncu-decode.csv"
exit "$status"
