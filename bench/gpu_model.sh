#!/usr/bin/env bash
# On a CUDA machine (no Rust toolchain needed), from binaries built elsewhere and copied into
# DIR (see bench/gpu_check.sh): the GPU model tests (the CUDA runner against the CPU model) and
# `kvq generate` throughput on the GPU per backend and policy, one prompt and a batch.
# Usage: bench/gpu_model.sh [DIR] [MODEL] [LOGDIR] [NEW_TOKENS]
set -uo pipefail
DIR=${1:-.gpu}
MODEL=${2:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
LOG=${3:-${OUT:-/tmp/kvq-gpu}}
NEW=${4:-256}
mkdir -p "$LOG"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
status=0
"$DIR/gpu-tests" --ignored --nocapture --test-threads=1 model:: 2>&1 | tee "$LOG/model-tests.log" || status=1
for cfg in pytorch:0 pytorch:8 pytorch:4 pytorch:42 turbomind:0 turbomind:8 turbomind:4; do
    for n in 1 32; do
        prompts=()
        for i in $(seq "$n"); do prompts+=(--prompt "Tell me a long story about robot number $i."); done
        printf '%s batch %s: ' "$cfg" "$n" | tee -a "$LOG/generate.log"
        "$DIR/kvq" generate --model "$MODEL" --device cuda --backend "${cfg%%:*}" \
            --quant-policy "${cfg##*:}" --max-batch-size "$n" --max-new-tokens "$NEW" --ignore-eos \
            "${prompts[@]}" 2>&1 >/dev/null | grep 'generated tokens' | tee -a "$LOG/generate.log" || status=1
    done
done
exit $status
