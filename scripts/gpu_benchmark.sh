#!/usr/bin/env bash
# One stage of the GPU training benchmark (README, "Faster DP training") on a bare GPU machine
# (torch installed; opacus, smp, dp-accounting and albumentations not), sized to fit one
# 10-minute device call. Needs the wheels of scripts/device_wheels.sh in .whl/ (carried along);
# writes the JSON report and the log to $OUT (or ./bench-out).
#
#   bash scripts/gpu_benchmark.sh check      # correctness vs Opacus hooks + per-layer costs
#   bash scripts/gpu_benchmark.sh deeplab    # DeepLabV3+ R101 OS8, frozen BN and GroupNorm
#   bash scripts/gpu_benchmark.sh pspnet     # PSPNet R101 dilated, frozen BN and GroupNorm
#   bash scripts/gpu_benchmark.sh deeplab --bf16    # extra flags go to benchmark_training.py
#
# The model stages measure non-private and bk only (Opacus hooks are several times slower and
# would not fit the call); add it with --modes nonprivate,bk,hooks --norms group.
#
# Then, here: python scripts/benchmark_training.py --markdown out1.json out2.json ...
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?stage: check, deeplab or pspnet}
shift
out=${OUT:-bench-out}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
bench=(python3 scripts/benchmark_training.py --time-limit 420)
case "$stage" in
    check)
        "${bench[@]}" --archs deeplabv3plus,pspnet --norms group --modes '' --check \
            --layer-bench 8 --out "$out/check.json" "$@" 2>&1 | tee "$out/check.log" ;;
    deeplab)
        "${bench[@]}" --archs deeplabv3plus --norms frozen,group --modes nonprivate,bk \
            --out "$out/deeplab.json" "$@" 2>&1 | tee "$out/deeplab.log" ;;
    pspnet)
        "${bench[@]}" --archs pspnet --norms frozen,group --modes nonprivate,bk \
            --out "$out/pspnet.json" "$@" 2>&1 | tee "$out/pspnet.log" ;;
    *)
        echo "unknown stage '$stage': use check, deeplab or pspnet" >&2
        exit 2 ;;
esac
