#!/usr/bin/env bash
# Runs every test: fetches the model the real-model tests use (idempotent), then the whole
# workspace's tests. Numeric code is optimised in the test profile (see Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x scripts/fetch-model.sh ]; then
  scripts/fetch-model.sh
fi
export KVQ_REQUIRE_MODEL=1
cargo test --workspace "$@"
