#!/usr/bin/env bash
# The whole test suite: fetch the three real test models (cached outside the repo), then run
# every test of the workspace with the models required (a missing model fails, not skips).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_models.sh all >/dev/null
export FLEA_REQUIRE_MODELS=1
cargo test --workspace --no-fail-fast "$@"
