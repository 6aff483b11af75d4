#!/usr/bin/env bash
# On a CUDA machine (no Rust toolchain needed): the GPU tests, the SDPA peer and
# `kvq bench attention`, from binaries built elsewhere and copied into DIR:
#   cargo test --release -p kvq-integration-tests --features cuda --test gpu --no-run  -> DIR/gpu-tests
#   cargo build --release --bin kvq --features cuda                                  -> DIR/kvq
# Usage: bench/gpu_check.sh [DIR] [LOGDIR]   (what each step printed is kept in LOGDIR)
set -uo pipefail
export NCCL_NVLS_ENABLE=0  # NCCL's NVLink multicast off (tensor parallelism)
DIR=${1:-.gpu}
LOG=${2:-${OUT:-/tmp/kvq-gpu}}
mkdir -p "$LOG"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
status=0
"$DIR/gpu-tests" --ignored --nocapture --test-threads=1 2>&1 | tee "$LOG/tests.log" || status=1
PYTHONUNBUFFERED=1 python3 bench/peer_sdpa.py --json "$LOG/peer.json" 2>&1 | tee "$LOG/peer.log" || status=1
"$DIR/kvq" bench attention --peer "$LOG/peer.json" 2>&1 | tee "$LOG/bench.log" || status=1
exit $status
