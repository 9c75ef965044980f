#!/usr/bin/env bash
# The whole test suite: fetch the three real test models (cached outside the repo) and the
# `openai` Python client for the server tests, then run every test of the workspace with the
# models required (a missing model fails, not skips).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_models.sh all >/dev/null
# The official OpenAI client (crates/flea-cli/tests/serve_openai.rs), isolated in the cache.
export FLEA_OPENAI_PYTHONPATH="${FLEA_OPENAI_PYTHONPATH:-$HOME/.cache/flea/py-openai}"
if ! PYTHONPATH="$FLEA_OPENAI_PYTHONPATH" python3 -c "import openai" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$FLEA_OPENAI_PYTHONPATH" \
    "openai==3.57.0" >&2
fi
export FLEA_REQUIRE_MODELS=1
cargo test --workspace --no-fail-fast "$@"
