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
# NVRTC (a plain library, no GPU needed) so that a flea-cuda test compiles the CUDA kernels;
# installed from pip into the model cache's package dir, outside the repository.
nvrtc="${FLEA_MODELS:-$HOME/.cache/flea/models}/.pkgs/nvrtc"
if ! ls "$nvrtc"/nvidia/cuda_nvrtc/lib/libnvrtc.so.* >/dev/null 2>&1; then
  "${PYTHON:-python3}" -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$nvrtc" "nvidia-cuda-nvrtc-cu12==12.9.86" >&2
fi
export LD_LIBRARY_PATH="$nvrtc/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FLEA_REQUIRE_NVRTC=1
cargo test --workspace --no-fail-fast "$@"
