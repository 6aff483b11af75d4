#!/usr/bin/env bash
# On a CUDA machine (no Rust toolchain needed), from binaries built elsewhere and copied into
# DIR (see bench/gpu_check.sh): the GPU model tests (the CUDA runner against the CPU model),
# `kvq bench generate` on the GPU (batch 1, every policy) and `kvq generate` with a batch of 32
# prompts per policy.
# Usage: bench/gpu_model.sh [DIR] [MODEL] [LOGDIR]
set -uo pipefail
export NCCL_NVLS_ENABLE=0  # NCCL's NVLink multicast off (tensor parallelism)
DIR=${1:-.gpu}
MODEL=${2:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
LOG=${3:-${OUT:-/tmp/kvq-gpu}}
CONFIGS="pytorch:0 pytorch:8 pytorch:4 pytorch:42 turbomind:0 turbomind:8 turbomind:4"
mkdir -p "$LOG"
nvidia-smi --query-gpu=name,driver_version --format=csv
status=0
"$DIR/gpu-tests" --ignored --nocapture --test-threads=1 model:: 2>&1 | tee "$LOG/model-tests.log" || status=1
"$DIR/kvq" bench generate --model "$MODEL" --device cuda --runs 3 --prompt-tokens 512 \
    --new-tokens 256 --configs "${CONFIGS// /,}" 2>&1 | tee "$LOG/bench.log" || status=1
for cfg in $CONFIGS; do
    prompts=()
    for i in $(seq 32); do prompts+=(--prompt "Tell me a long story about robot number $i."); done
    printf '%s batch 32: ' "$cfg" | tee -a "$LOG/generate.log"
    "$DIR/kvq" generate --model "$MODEL" --device cuda --backend "${cfg%%:*}" \
        --quant-policy "${cfg##*:}" --max-batch-size 32 --max-new-tokens 512 --ignore-eos \
        "${prompts[@]}" 2>&1 >/dev/null | grep 'generated tokens' | tee -a "$LOG/generate.log" || status=1
done
"$DIR/kvq" eval --model "$MODEL" --device cuda --text texts/gpl-3.0.txt --ctx 512 2>&1 | tee "$LOG/eval.log" || status=1
exit $status
