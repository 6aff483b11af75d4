#!/usr/bin/env bash
# Integration tests of `kvq serve` with the official `openai` Python client (installed by
# .ci/run): builds the kvq binary with the test profile (optimised, as `cargo test` builds it)
# unless KVQ_BIN names one, then runs tests/server/test_openai.py, which starts its servers on
# loopback ports and kills them when it ends.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -x scripts/fetch-model.sh ]; then
  scripts/fetch-model.sh
fi
KVQ_BIN=${KVQ_BIN:-}
if [ -z "$KVQ_BIN" ]; then
  cargo build --profile test --bin kvq
  KVQ_BIN=${CARGO_TARGET_DIR:-target}/debug/kvq
fi
exec python3 tests/server/test_openai.py --kvq "$KVQ_BIN" --model models/SmolLM2-135M-Instruct.Q4_1.gguf
