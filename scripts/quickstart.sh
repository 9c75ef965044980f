#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1, 98 MB, cached in ~/.cache/flea/models), build flea and
# generate an answer to a chat prompt. Usage: scripts/quickstart.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
model="$(scripts/fetch_models.sh smollm2)"
cargo build --release --quiet -p flea-cli
question="${1:-Write a haiku about memory bandwidth.}"
prompt="<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
<|im_start|>user
${question}<|im_end|>
<|im_start|>assistant
"
exec target/release/flea run -m "$model" -p "$prompt" -n 128 --temp 0
